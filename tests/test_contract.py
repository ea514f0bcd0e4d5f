"""One suite over every registered method (scikit-learn's check_estimator, fewclip style).

A method gets these checks the day it is registered.
"""

import importlib.util
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fewclip.methods as M
from conftest import FAST
from fewclip.cli.demo import DEMO_GRIDS
from fewclip.methods.base import MethodError, NotFittedError
from fewclip.methods.params import Constraint, constraint_of
from fewclip.protocols.protocol import LONGTAIL_METHOD_DEFAULTS

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def as_json(d):
    """Tuples and lists compare equal once both went through JSON (as saved models do)."""
    return json.loads(json.dumps(d))


def make(name, **kw):
    return M.create(name, **{**FAST.get(name, {}), **kw})


#: the methods fitted on a feature bundle (the image methods have their own suite, tests/test_image_methods.py)
FEATURE_METHODS = [m for m in M.list_methods() if M.get_class(m).inputs == "features"]


@pytest.fixture(params=FEATURE_METHODS)
def name(request):
    return request.param


@pytest.fixture(params=M.list_methods())
def any_method(request):
    return request.param


def fitted_names(model):
    return sorted(k for k in vars(model) if k.endswith("_"))


def test_fit_returns_self_and_records_state(bundle, name):
    model = make(name)
    assert model.fit(bundle) is model
    hp = model.hyperparameters()
    assert set(model.get_params()) <= set(hp) and hp["preset"] is None
    assert model.val_accuracy_ == pytest.approx(model.score(bundle.val_features, bundle.val_labels))
    assert model.selection_used_ == ("val" if model.selects_on_validation else "none")
    assert all(v in hp and hp[v] == value for v, value in model.selected_.items())
    assert model.inputs == "features"


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
    """A guard against a method that overrides ``fit`` (the base strips the test split before ``_fit``)."""
    g = torch.Generator().manual_seed(0)
    scrambled = replace(
        bundle,
        test_labels=bundle.test_labels[torch.randperm(bundle.test_labels.numel(), generator=g)],
        test_features=torch.randn(bundle.test_features.shape, generator=g),
    )
    a, b = make(name).fit(bundle), make(name).fit(scrambled)
    assert a.hyperparameters() == b.hyperparameters()
    assert getattr(a, "history_", None) == getattr(b, "history_", None)
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


# --------------------------------------------------------------------------- hyperparameters and their constraints


def test_every_hyperparameter_has_a_constraint_and_a_doc(any_method):
    name = any_method
    cls = M.get_class(name)
    fields = cls.param_fields()
    assert [f.name for f in fields] == cls.param_names() == list(cls.default_params())
    assert cls.param_names()[-2:] == ["selection", "calibrate"]
    for f in fields:
        assert isinstance(constraint_of(f), Constraint), f"{name}: {f.name} has no constraint"
        assert f.metadata["doc"], f"{name}: {f.name} has no doc"
        assert constraint_of(f).invalid_values(), f"{name}: {f.name} yields no invalid value"


class Untouchable:
    """Data that fails the test if ``fit`` reads anything from it."""

    def __getattr__(self, key):
        raise AssertionError(f"fit read data.{key} before refusing an invalid hyperparameter")


INVALID = [
    (method, key, value)
    for method in M.list_methods()
    for key, constraint in M.get_class(method).constraints().items()
    for value in constraint.invalid_values()
]


@pytest.mark.parametrize(
    "method, key", sorted({(m, k) for m, k, _ in INVALID}), ids=lambda v: v if isinstance(v, str) else None
)
def test_every_invalid_value_is_refused_before_any_work(monkeypatch, method, key):
    cls = M.get_class(method)
    constraint = cls.constraints()[key]

    def no_work(self, data):
        raise AssertionError("the method started work on an invalid hyperparameter")

    monkeypatch.setattr(cls, "_check", no_work)
    monkeypatch.setattr(cls, "_fit", no_work)
    values = [v for m, k, v in INVALID if (m, k) == (method, key)]
    for value in values:
        assert not constraint.is_satisfied_by(value)
        model = M.create(method, **{key: value})
        expected = f"{method}: {key}={value!r} is not valid; expected {constraint.describe()}."
        with pytest.raises(MethodError, match="^" + re.escape(expected)):
            model.fit(Untouchable())
        with pytest.raises(NotFittedError):
            model.predict_logits(torch.zeros(1, 64))


def test_defaults_presets_and_shipped_settings_pass_validation(any_method):
    """The defaults, every preset, the demo's grids, the protocols' method defaults, the benchmarks' grids and the
    suite's own FAST settings are all valid values."""
    name = any_method
    settings = [{}, FAST.get(name, {}), DEMO_GRIDS.get(name, {}), LONGTAIL_METHOD_DEFAULTS.get(name, {})]
    spec = importlib.util.spec_from_file_location("bench_fit", BENCHMARKS / "bench_fit.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    settings += [grid[name] for grid in bench.GRIDS.values() if name in grid]
    for params in settings:
        params = dict(params)
        M.create(name, preset=params.pop("preset", None), **params).validate_params()
    for preset in M.list_presets(name):
        M.create(name, preset=preset).validate_params()
        for selection in ("val", "none"):
            M.create(name, preset=preset, selection=selection).validate_params()


def test_selection_flags_say_what_happens_without_validation(bundle, name):
    cls = M.get_class(name)
    no_val = replace(bundle, val_features=None, val_labels=None)
    if cls.selects_on_validation and not cls.falls_back_without_validation:
        with pytest.raises(MethodError, match="selection='val' needs validation data"):
            make(name).fit(no_val)
    else:  # zero-shot has nothing to select; Candle keeps its last epoch
        model = make(name).fit(no_val)
        assert model.selection_used_ == "none" and model.val_accuracy_ is None
    model = make(name, selection="none").fit(no_val)
    assert model.selection_used_ == "none" and model.val_accuracy_ is None


# --------------------------------------------------------------------------- a failed fit leaves nothing fitted


def test_failed_fit_leaves_an_unfitted_estimator(monkeypatch, bundle, name):
    cls = M.get_class(name)
    model = make(name).fit(bundle)  # an earlier success must not survive a failed refit either
    assert fitted_names(model)

    def fails_half_way(self, data):
        self.text_ = torch.zeros(2, 2)
        self.partial_ = 1
        self._cache_ = {}
        raise MethodError("boom")

    monkeypatch.setattr(cls, "_fit", fails_half_way)
    with pytest.raises(MethodError, match="boom"):
        model.fit(bundle)
    assert fitted_names(model) == []
    with pytest.raises(NotFittedError):
        model.predict_logits(bundle.test_features)
    with pytest.raises(NotFittedError):
        model.hyperparameters()
    monkeypatch.undo()

    def fails_after_fit(self, data):  # the fitted markers are set by then: they must go too
        raise RuntimeError("validation scoring failed")

    monkeypatch.setattr(cls, "_validation_accuracy", fails_after_fit)
    broken = make(name)
    with pytest.raises(RuntimeError, match="validation scoring failed"):
        broken.fit(bundle)
    assert fitted_names(broken) == []
    with pytest.raises(NotFittedError):
        broken.predict_logits(bundle.test_features)


#: a value each method refuses only once it sees the data (the D = 64 bundle), through its real code path
DATA_DEPENDENT = {
    "ape": {"channels": 100},
    "ape-t": {"channels": 100},
    "clip-adapter": {"reduction": 65},
    "candle": {"heads": 5},
}


@pytest.mark.parametrize("method", sorted(DATA_DEPENDENT))
def test_data_dependent_refusal_happens_before_work_and_leaves_no_state(monkeypatch, bundle, method):
    cls = M.get_class(method)

    def no_work(self, data):
        raise AssertionError("_fit ran")

    model = make(method).fit(bundle)
    monkeypatch.setattr(cls, "_fit", no_work)
    for key, value in DATA_DEPENDENT[method].items():
        setattr(model, key, value)
    with pytest.raises(MethodError, match=f"{key}"):
        model.fit(bundle)
    assert fitted_names(model) == []
    with pytest.raises(NotFittedError):
        model.predict_logits(bundle.test_features)


# --------------------------------------------------------------------------- presets are provenance


def test_preset_is_recorded_reported_saved_and_loaded(tmp_path, bundle, name):
    presets = M.list_presets(name)
    preset = presets[0] if presets else None
    model = M.create(name, preset=preset, **FAST.get(name, {}))
    assert model.preset == preset and "preset" not in model.get_params()
    model.fit(bundle)
    assert model.hyperparameters()["preset"] == preset
    back = M.load(model.save(tmp_path / "model.safetensors"))
    assert back.preset == preset and back.hyperparameters()["preset"] == preset
    assert torch.equal(back.predict_logits(bundle.test_features), model.predict_logits(bundle.test_features))


def test_model_files_with_preset_among_the_params_still_load(tmp_path, bundle):
    """Files written before ``preset`` became provenance kept it inside ``params``."""
    path = M.create("tip-adapter", preset="dtd", **FAST["tip-adapter"]).fit(bundle).save(tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta["params"] = json.dumps({**json.loads(meta["params"]), "preset": "dtd"})
    del meta["preset"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(path), str(old), metadata=meta)
    back = M.load(old)
    assert back.preset == "dtd" and back.hyperparameters()["preset"] == "dtd"
    assert torch.equal(back.predict_logits(bundle.test_features), M.load(path).predict_logits(bundle.test_features))


def test_bad_model_files_raise_method_errors_naming_the_file(tmp_path, bundle):
    from fewclip.features import bundle as bundle_io

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(MethodError, match=re.escape(str(missing))):
        M.load(missing)
    not_a_model = bundle_io.save(bundle, tmp_path / "bundle.safetensors")
    with pytest.raises(MethodError, match=re.escape(str(not_a_model)) + ".*expected 'fewclip-model/1'"):
        M.load(not_a_model)
    path = M.create("zero-shot").fit(bundle).save(tmp_path / "zs.safetensors")
    tensors, meta = load_file(path), {"format": "fewclip-model/1", "method": "zero-shot", "params": "{"}
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata=meta)
    with pytest.raises(MethodError, match=re.escape(str(tmp_path / "broken.safetensors")) + ": not a usable model"):
        M.load(tmp_path / "broken.safetensors")
