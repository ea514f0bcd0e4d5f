"""One suite over every registered method (scikit-learn's check_estimator, fewclip style).

A method gets these checks the day it is registered.
"""

import json
from dataclasses import replace

import pytest
import torch

import fewclip.methods as M
from fewclip.methods.base import MethodError, NotFittedError

FAST = {
    "tip-adapter": {"search_step": [12, 6]},
    "ape": {"search_step": [12, 6, 4], "channels": 40},
    "tip-adapter-f": {"search_step": [12, 6], "epochs": 4, "batch_size": 32},
    "ape-t": {"search_step": [12, 6], "channels": 40, "epochs": 4, "batch_size": 32},
    "clip-adapter": {"epochs": 4, "batch_size": 32},
    "candle": {"epochs": 4, "batch_size": 32},
}


def as_json(d):
    """Tuples and lists compare equal once both went through JSON (as saved models do)."""
    return json.loads(json.dumps(d))


def make(name, **kw):
    return M.create(name, **{**FAST.get(name, {}), **kw})


@pytest.fixture(params=M.list_methods())
def name(request):
    return request.param


def test_fit_returns_self_and_records_state(bundle, name):
    model = make(name)
    assert model.fit(bundle) is model
    hp = model.hyperparameters()
    assert set(model.get_params()) <= set(hp)
    assert model.val_accuracy_ == pytest.approx(model.score(bundle.val_features, bundle.val_labels))


def test_save_load_round_trip_gives_identical_logits(tmp_path, bundle, name):
    model = make(name).fit(bundle)
    path = model.save(tmp_path / f"{name}.safetensors")
    back = M.load(path)
    assert type(back) is type(model) and as_json(back.get_params()) == as_json(model.get_params())
    assert torch.equal(back.predict_logits(bundle.test_features), model.predict_logits(bundle.test_features))
    assert as_json(back.hyperparameters()) == as_json(model.hyperparameters())


def test_invariant_to_support_row_order(bundle, name):
    perm = torch.randperm(bundle.num_support, generator=torch.Generator().manual_seed(7))
    shuffled = replace(
        bundle,
        support_features=bundle.support_features[:, perm],
        support_labels=bundle.support_labels[perm],
        support_clean_features=bundle.support_clean_features[perm],
    )
    a, b = make(name).fit(bundle), make(name).fit(shuffled)
    assert as_json(a.hyperparameters()) == as_json(b.hyperparameters())
    assert torch.allclose(
        a.predict_logits(bundle.test_features), b.predict_logits(bundle.test_features), atol=1e-3, rtol=1e-4
    )


def test_test_labels_are_never_read_during_fit(bundle, name):
    g = torch.Generator().manual_seed(0)
    scrambled = replace(
        bundle,
        test_labels=bundle.test_labels[torch.randperm(bundle.test_labels.numel(), generator=g)],
        test_features=torch.randn(bundle.test_features.shape, generator=g),
    )
    a, b = make(name).fit(bundle), make(name).fit(scrambled)
    assert a.hyperparameters() == b.hyperparameters()
    assert torch.equal(a.predict_logits(bundle.val_features), b.predict_logits(bundle.val_features))


def test_deterministic(bundle, name):
    a, b = make(name).fit(bundle), make(name).fit(bundle)
    assert torch.equal(a.predict_logits(bundle.test_features), b.predict_logits(bundle.test_features))


def test_predict_before_fit_and_bad_features(bundle, name):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        make(name).predict_logits(bundle.test_features)
    model = make(name).fit(bundle)
    with pytest.raises(MethodError, match=r"features have shape \[3, 5\]; expected \[M, 64\]"):
        model.predict_logits(torch.randn(3, 5))
    with pytest.raises(MethodError, match="NaN or infinite"):
        model.predict_logits(torch.full((2, 64), float("nan")))


def test_unequal_shots(bundle, name):
    keep = torch.ones(bundle.num_support, dtype=torch.bool)
    keep[(bundle.support_labels == 1).nonzero()[:5]] = False  # class 1: 3 shots, the others 8
    uneven = replace(
        bundle,
        support_features=bundle.support_features[:, keep],
        support_labels=bundle.support_labels[keep],
        support_clean_features=bundle.support_clean_features[keep],
    )
    assert uneven.shots()[1] == 3
    model = make(name).fit(uneven)
    assert model.score(bundle.test_features, bundle.test_labels) > 100 / bundle.num_classes
