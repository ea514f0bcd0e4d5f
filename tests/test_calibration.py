"""Calibrated stacking (issue 18): the pure functions against their formulas and a naive loop, and the contract
(every method that scores classes without support; δ = 0 is today's logits; test labels are never read)."""

import dataclasses

import pytest
import torch

import fewclip.methods as M
from conftest import FAST
from fewclip.features.synthetic import make_synthetic_bundle
from fewclip.methods.calibration import (
    apply_offset,
    best_offset,
    count_correct_per_offset,
    first_best,
    gaps_along_alpha,
    offset_grid,
    refine_offset,
    top_gaps,
)

FEATURE_METHODS = [n for n in M.list_methods() if M.get_class(n).inputs == "features"]
UNSEEN_OK = [n for n in FEATURE_METHODS if not M.get_class(n).needs_support_for_every_class]


@pytest.fixture(scope="module")
def split_bundle():
    """12 classes, the last 4 without support; validation and test rows for all."""
    return make_synthetic_bundle(
        classes=12, shots=[4] * 8 + [0] * 4, dim=48, views=3, val_per_class=4, test_per_class=6, seed=5
    )


def make(name, **kw):
    return M.create(name, **{**FAST.get(name, {}), **kw})


# --------------------------------------------------------------------------- pure functions


def test_grid_count_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(57, 9, generator=g) * 3, torch.randint(0, 9, (57,), generator=g)
    seen = torch.tensor([True, False, True, True, False, True, False, False, True])
    grid = offset_grid(top_gaps(logits, seen))
    naive = [int(((logits - float(d) * seen.float()).argmax(1) == labels).sum()) for d in grid]
    assert count_correct_per_offset(logits, labels, seen, grid, budget=100).tolist() == naive


def test_grid_starts_at_zero_orders_by_magnitude_and_follows_the_scale():
    gaps = torch.tensor([-2.0, 1.0, 3.0, 0.5])
    grid = offset_grid(gaps, points=5)
    assert float(grid[0]) == 0.0 and grid.abs().tolist() == sorted(grid.abs().tolist())
    assert float(grid.min()) == -2.0 and float(grid.max()) == 3.0
    assert torch.allclose(offset_grid(100 * gaps, points=5), 100 * grid)
    assert offset_grid(torch.zeros(0)).tolist() == [0.0]


def test_first_best_takes_the_first_maximum():
    assert first_best(torch.tensor([3, 5, 5, 1])) == 1


def test_apply_offset_is_the_same_tensor_at_zero():
    z, seen = torch.randn(4, 3), torch.tensor([True, False, True])
    assert apply_offset(z, seen, 0.0) is z
    assert torch.equal(apply_offset(z, seen, 2.0), z - 2.0 * seen.float())


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_search_recovers_a_constant_shift_of_the_seen_classes(scale):
    """Logits whose rows are right once the seen classes lose c: the chosen δ lies within the grid's resolution of
    c (between the quantiles around it), and the calibrated predictions are all correct."""
    g = torch.Generator().manual_seed(1)
    classes, rows = 10, 400
    seen = torch.arange(classes) < 5
    labels = torch.arange(rows) % classes
    clean = torch.randn(rows, classes, generator=g) * 0.3
    clean[torch.arange(rows), labels] += 1.0  # the label wins by a margin, before the shift
    c = 2.0
    logits = scale * (clean + c * seen.float())
    offset, correct, grid = best_offset(logits, labels, seen)
    clean_correct = int(clean.argmax(1).eq(labels).sum())
    assert correct == clean_correct > int(logits.argmax(1).eq(labels).sum())
    spacing = float(torch.sort(grid).values.diff().max())
    assert abs(offset - scale * c) <= spacing


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_calibrate_none_reproduces_the_uncalibrated_logits_bit_for_bit(name, split_bundle, bundle):
    data = bundle if M.get_class(name).needs_support_for_every_class else split_bundle
    off = make(name, calibrate="none").fit(data)
    assert off.calibration_offset_ == 0.0 and off.selected_["calibration"] == "none"
    logits = off.predict_logits(data.test_features)
    # the raw logits of the fitted model, without the base class's offset step
    raw = torch.cat([off._logits(data.test_features.float())])
    assert torch.equal(logits, raw)
    if name == "zero-shot":
        return
    # a model whose calibration chose δ = 0 predicts exactly the uncalibrated logits of the same state
    on = make(name).fit(data)
    delta = on.calibration_offset_
    on.calibration_offset_ = 0.0
    assert torch.equal(on.predict_logits(data.test_features), on._logits(data.test_features.float()))
    on.calibration_offset_ = delta


@pytest.mark.parametrize("name", UNSEEN_OK)
def test_calibration_is_chosen_on_validation_and_recorded(name, split_bundle):
    model = make(name).fit(split_bundle)
    expected = "none" if name == "zero-shot" else "val"  # zero-shot selects nothing: calibrate='val' opts in
    assert model.selected_["calibration"] == expected
    assert model.hyperparameters()["calibration_offset"] == model.calibration_offset_
    seen = split_bundle.shots_per_class() > 0
    assert model.seen_classes_.tolist() == seen.tolist()
    raw = model._logits(split_bundle.test_features.float())
    expected_logits = raw - model.calibration_offset_ * seen.float() if model.calibration_offset_ else raw
    assert torch.equal(model.predict_logits(split_bundle.test_features), expected_logits)


@pytest.mark.parametrize("name", UNSEEN_OK)
def test_the_offset_never_reads_test_labels(name, split_bundle):
    garbage = dataclasses.replace(split_bundle, test_labels=torch.flip(split_bundle.test_labels, [0]))
    a, b = make(name).fit(split_bundle), make(name).fit(garbage)
    assert a.calibration_offset_ == b.calibration_offset_
    assert a.selected_ == b.selected_


def test_no_calibration_without_classes_without_support_or_without_validation(bundle, split_bundle):
    assert make("tip-adapter").fit(bundle).selected_["calibration"] == "none"  # every class has support
    no_val = dataclasses.replace(split_bundle, val_features=None, val_labels=None)
    candle = make("candle").fit(no_val)  # falls back to the last epoch: nothing to calibrate on
    assert candle.selected_["calibration"] == "none" and candle.calibration_offset_ == 0.0
    zero = M.create("zero-shot", calibrate="val").fit(split_bundle)
    assert zero.selected_["calibration"] == "val"


def test_model_file_keeps_the_offset(split_bundle, tmp_path):
    model = make("gda").fit(split_bundle)
    model.calibration_offset_ = 1.5  # a nonzero offset, whatever the search chose
    loaded = M.load(model.save(tmp_path / "m.safetensors"))
    assert torch.equal(
        loaded.predict_logits(split_bundle.test_features), model.predict_logits(split_bundle.test_features)
    )


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_default_changes_nothing_when_every_class_has_support(name, bundle):
    auto, off = make(name).fit(bundle), make(name, calibrate="none").fit(bundle)
    assert auto.selected_ == off.selected_
    assert torch.equal(auto.predict_logits(bundle.test_features), off.predict_logits(bundle.test_features))


def test_gaps_along_alpha_equal_the_dense_computation_in_any_chunking():
    torch.manual_seed(0)
    z0, g = torch.randn(7, 5), torch.rand(7, 5)
    alphas = torch.linspace(0.0, 3.0, 11)
    seen = torch.tensor([True, False, True, False, False])
    dense = top_gaps(z0[None] + alphas[:, None, None] * g[None], seen)
    for budget in (1, 35, 36, 1 << 24):  # one α per chunk, one, two, all at once
        torch.testing.assert_close(gaps_along_alpha(z0, g, alphas, seen, budget=budget), dense, rtol=0, atol=0)


def test_refine_offset_never_falls_below_the_joint_choice_and_finds_a_finer_shift():
    seen = torch.tensor([True, True, False, False])
    # every row's own class is unseen; the seen classes lead by 1.0 to 3.0: any δ above a row's lead fixes it
    leads = torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0])
    logits = torch.zeros(5, 4)
    logits[:, 0] = leads
    labels = torch.full((5,), 2)
    start = 2.2  # a coarse choice that fixes the first three rows
    assert count_correct_per_offset(logits, labels, seen, torch.tensor([start])).item() == 3
    offset, correct, points = refine_offset(logits, labels, seen, start)
    # the full grid's candidates are quantiles of the gaps, the largest the largest gap itself: the row whose lead is
    # exactly 3.0 would tie with its own class there and go to the lowest index, a seen class; so 4 rows, at the
    # smallest δ past 2.5
    assert correct == 4 and 2.5 < offset <= 3.0 and points > 1
    assert count_correct_per_offset(logits, labels, seen, torch.tensor([offset])).item() == correct
    # where the joint choice is already the best, its count is kept
    offset, correct, _ = refine_offset(logits[:3], labels[:3], seen, 2.2)
    assert correct == 3 and count_correct_per_offset(logits[:3], labels[:3], seen, torch.tensor([offset])) == 3
