"""Temperature scaling: the fit recovers a known temperature, ECE against hand-computed numbers, and the contract
(test labels never read, arg-max unchanged, save/load)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import fewclip.methods as M
from fewclip.features.synthetic import make_synthetic_bundle
from fewclip.methods.registry import load_model
from fewclip.methods.temperature import confidence_floor, fit_temperature, logit_scale, nll
from fewclip.metrics import expected_calibration_error


def sample(m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """True logits [m, 4] of a known model and labels drawn from softmax(true logits)."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(m, 4, generator=g, dtype=torch.float64) * 1.5
    labels = torch.multinomial(torch.softmax(true, dim=1), 1, generator=g).squeeze(1)
    return true, labels


def test_fit_temperature_recovers_a_known_temperature_and_lowers_held_out_nll():
    true, labels = sample(20000, 0)
    t = fit_temperature(5.0 * true, labels)  # logits 5× too sharp
    assert t == pytest.approx(5.0, rel=0.05)
    held_true, held_labels = sample(5000, 1)
    assert nll(5.0 * held_true, held_labels, t) < nll(5.0 * held_true, held_labels) - 0.5
    assert fit_temperature(true, labels) == pytest.approx(1.0, rel=0.05)


def test_fit_temperature_edge_cases():
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0
    assert fit_temperature(torch.ones(5, 3), torch.zeros(5, dtype=torch.long)) == 1.0  # no signal at all
    # perfectly separated rows: the NLL keeps falling as T → 0, so the maximum-likelihood T stops at its lower bound,
    # 1e-3 times the logits' scale (the std of the row-centred eye(3): √(2/9))
    assert logit_scale(torch.eye(3)) == pytest.approx(math.sqrt(2 / 9))
    assert fit_temperature(torch.eye(3), torch.arange(3), floor=False) == pytest.approx(
        1e-3 * math.sqrt(2 / 9), rel=1e-3
    )
    true, labels = sample(500, 2)
    assert fit_temperature(true, labels) == fit_temperature(true, labels)  # deterministic


def test_the_floor_on_perfectly_separated_rows_by_hand():
    """3 rows, logits eye(3), all right: the rule of succession caps the mean top probability at (3 + 1)/(3 + 2) = 0.8;
    each row's top probability e^{1/T}/(e^{1/T} + 2) = 0.8 gives e^{1/T} = 8, T = 1/ln 8."""
    expected = 1.0 / math.log(8.0)
    assert confidence_floor(torch.eye(3)) == pytest.approx(expected, rel=1e-9)
    t = fit_temperature(torch.eye(3), torch.arange(3))
    assert t == pytest.approx(expected, rel=1e-3)
    top = torch.softmax(torch.eye(3) / t, dim=1).max(dim=1).values
    assert float(top.max()) <= 0.8 + 1e-3  # no one-hot probabilities
    # more rows, all right: a higher cap (M = 30: 31/32), so a lower floor
    assert confidence_floor(torch.eye(3).repeat(10, 1)) < expected
    # with errors the NLL optimum lies above the floor, which then changes nothing
    true, labels = sample(2000, 3)
    assert fit_temperature(5.0 * true, labels) == fit_temperature(5.0 * true, labels, floor=False)


def test_a_method_perfect_on_validation_keeps_probabilities_below_one():
    b = make_synthetic_bundle(classes=4, shots=8, dim=32, views=2, val_per_class=3, test_per_class=5, seed=0,
                              within=0.1, text_noise=0.1)  # fmt: skip
    model = M.create("tip-adapter", search_step=[4, 4]).fit(b)
    assert model.val_accuracy_ == 100.0
    m = b.val_labels.numel()
    assert model.temperature_ > 1e-3
    mean_top = float(model.predict_proba(b.val_features).max(dim=1).values.mean())
    assert mean_top <= (m + 1) / (m + 2) + 1e-3


def test_expected_calibration_error_on_a_hand_computed_example():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0])
    # 2 bins: (0, .5] holds nothing (confidences ≥ .5 ... .55 and .7 go to (.5, 1]); so 1 bin:
    # confidences .9 .8 .7 .55, hits 1 0 1 0 → |2 − 2.95| / 4 = .2375
    assert expected_calibration_error(probs, labels, bins=2) == pytest.approx(23.75)
    # 10 bins: (.5,.6]: .55 miss → .55; (.6,.7]: .7 hit → .3; (.7,.8]: .8 miss → .8; (.8,.9]: .9 hit → .1
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(100 * (0.55 + 0.3 + 0.8 + 0.1) / 4)
    assert math.isnan(expected_calibration_error(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))


@pytest.fixture(scope="module")
def data():
    return make_synthetic_bundle(classes=6, shots=4, dim=32, views=2, val_per_class=8, test_per_class=10, seed=3)


def test_temperature_is_fitted_on_validation_and_never_on_test(data):
    model = M.create("tip-adapter").fit(data)
    assert model.temperature_fit_["source"] == "val" and model.temperature_fit_["rows"] == data.val_labels.numel()
    assert model.selected_["temperature"] == model.temperature_ > 0
    g = torch.Generator().manual_seed(0)
    scrambled = replace(data, test_labels=data.test_labels[torch.randperm(data.test_labels.numel(), generator=g)])
    assert M.create("tip-adapter").fit(scrambled).temperature_ == model.temperature_


def test_temperature_leaves_logits_unchanged_and_scales_probabilities(data):
    model = M.create("tip-adapter").fit(data)
    logits = model.predict_logits(data.test_features)
    model.temperature_ = 1.0
    assert torch.equal(model.predict_logits(data.test_features), logits)  # bit-identical whatever T
    model.temperature_ = 3.0
    assert torch.equal(model.predict_logits(data.test_features), logits)
    assert torch.allclose(model.predict_proba(data.test_features), torch.softmax(logits / 3.0, dim=1))


def test_without_validation_the_temperature_is_one(data):
    no_val = replace(data, val_features=None, val_labels=None)
    model = M.create("tip-adapter", selection="none").fit(no_val)
    assert model.temperature_ == 1.0 and model.temperature_fit_["source"] == "none"


def test_cv_fits_the_temperature_on_out_of_fold_logits(data):
    model = M.create("tip-adapter", selection="cv").fit(data)
    assert model.temperature_fit_["source"] == "cv" and model.temperature_fit_["rows"] == data.num_support
    assert math.isfinite(model.temperature_fit_["val_ece_after"])


def test_save_load_keeps_the_temperature(data, tmp_path):
    model = M.create("ape").fit(data)
    back = load_model(model.save(tmp_path / "m.safetensors"))
    assert back.temperature_ == model.temperature_ and back.temperature_fit_ == model.temperature_fit_
    assert torch.equal(back.predict_proba(data.test_features), model.predict_proba(data.test_features))


def test_the_temperature_follows_the_logits_scale():
    """Bounds relative to the logits' scale: T(s · z) = s · T(z) (to the 4 digits kept), so logits of a probe at a
    tiny C are calibrated like any other instead of stopping at an absolute bound."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=g)
    logits = torch.randn(200, 5, generator=g) * 2.0
    logits[torch.arange(200), labels] += 2.5  # informative but not separable: the NLL optimum is inside the bounds
    base = fit_temperature(logits, labels)
    for s in (1e-7, 1e-3, 1e4):
        assert fit_temperature(logits * s, labels) == pytest.approx(base * s, rel=1e-3)
    # a separable tiny-scale case keeps probabilities off one-hot through the (relative) floor
    tiny = torch.eye(3)[[0, 1, 2]] * 1e-6
    t = fit_temperature(tiny, torch.arange(3))
    assert t == pytest.approx(1e-6 / math.log(8), rel=1e-3)
