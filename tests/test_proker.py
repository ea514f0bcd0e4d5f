"""ProKeR: the spec's toy case by hand, the limits in λ and β, the eigen form against a direct solve, the grid search
against a naive loop, the memory refusal and its fallbacks, selection without test, cv, classes without support."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fewclip.methods as M
from conftest import FAST, make_pets
from fewclip.cli.main import main
from fewclip.errors import MethodError
from fewclip.features.bundle import make_bundle
from fewclip.features.synthetic import make_synthetic_bundle
from fewclip.methods import proker
from fewclip.methods.cv import cv_fold_count, cv_fold_ids, fold_bundle
from fewclip.methods.proker import (
    TRANSFER,
    eigen_filters,
    eigen_pays,
    grid_counts,
    grid_logits,
    kernel,
    kernel_memory,
    proker_coefficients,
    residual_targets,
)
from fewclip.models.tiny import save_tiny_openclip

E = math.exp(-1.0)


def toy_tensors():
    """The spec's §3.6 toy: S = [e₁, e₂, e₃] (labels 0, 1, 2), t_k = (e_k + e₄)/√2, float64."""
    eye = torch.eye(4, dtype=torch.float64)
    return eye[:3], torch.arange(3), (eye[:3] + eye[3]) / math.sqrt(2)


QUERIES = torch.tensor([[1.0, 0, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 0, 1.0]], dtype=torch.float64)
EXPECTED = [
    [0.844676, 0.024132, 0.024132],
    [0.499746, 0.667801, 0.021207],
    [0.746492, 0.746492, 0.746492],
]


def toy_bundle(**extra):
    points, labels, text = toy_tensors()
    return make_bundle(
        support_features=points.float()[None],
        support_labels=labels,
        text_weights=text.float(),
        test_features=QUERIES.float(),
        test_labels=torch.tensor([0, 1, 2]),
        **extra,
    )


def fast(**kw):
    return M.create("proker", **{**FAST["proker"], **kw})


@pytest.fixture(scope="module")
def data():
    """20 classes, 4 shots, D = 32, 3 views (240 points), 6 validation rows per class."""
    return make_synthetic_bundle(classes=20, shots=4, dim=32, views=3, val_per_class=6, test_per_class=10, seed=11)


# --------------------------------------------------------------------------- the toy case, by hand


def test_toy_case_by_hand():
    points, labels, text = toy_tensors()
    gram = kernel(points, points, 1.0)
    assert torch.allclose(gram, torch.full((3, 3), E, dtype=torch.float64).fill_diagonal_(1.0), atol=1e-12)
    residual = residual_targets(points, labels, text)
    assert torch.allclose(residual, (1 - 1 / math.sqrt(2)) * torch.eye(3, dtype=torch.float64), atol=1e-12)
    alpha = proker_coefficients(gram, residual, 1.0)
    on, off = 0.155324, -0.024132
    assert torch.allclose(alpha, torch.full((3, 3), off, dtype=torch.float64).fill_diagonal_(on), atol=1e-6)
    # Sherman–Morrison: (K/λ + I)⁻¹ = (1/c)(I − d/(c + 3d)·𝟙𝟙ᵀ), c = 2 − e⁻¹, d = e⁻¹
    c, d = 2 - E, E
    inverse = (torch.eye(3, dtype=torch.float64) - d / (c + 3 * d) * torch.ones(3, 3, dtype=torch.float64)) / c
    assert torch.allclose(alpha, inverse @ residual, atol=1e-12)
    logits = QUERIES @ text.T + kernel(QUERIES, points, 1.0) @ alpha
    assert torch.allclose(logits, torch.tensor(EXPECTED, dtype=torch.float64), atol=1e-6)


def test_toy_case_through_the_estimator():
    model = M.create("proker", selection="none", init_beta=1.0, init_lambda=1.0).fit(toy_bundle())
    assert model.selected_["support_used"] == "views" and model.selected_["points"] == 3
    assert model.selected_["init_from"] == "init_beta, init_lambda" and model.selected_["precision"] == "float64"
    logits = model.predict_logits(QUERIES.float())
    assert torch.allclose(logits, torch.tensor(EXPECTED), atol=1e-6)


# --------------------------------------------------------------------------- limits


def test_lambda_to_zero_is_zero_shot_and_to_infinity_is_the_kernel_sum_of_residuals(data):
    """λ is the released code's *inverse* regulariser: A = (K/λ + I)⁻¹R. The zero-shot limit (the issue's "strong
    regularisation" limit) is therefore λ → 0 here; λ → ∞ is Tip-Adapter's unnormalised kernel sum, A = R."""
    points, labels, text = toy_tensors()
    gram, residual = kernel(points, points, 1.0), residual_targets(points, labels, text)
    assert proker_coefficients(gram, residual, 1e-12).abs().max() < 1e-11
    assert torch.allclose(proker_coefficients(gram, residual, 1e12), residual, atol=1e-11)

    zero_shot = M.create("zero-shot").fit(data)
    tiny = M.create("proker", selection="none", init_beta=1.0, init_lambda=1e-12).fit(data)
    expected = zero_shot.predict_logits(data.test_features) / 100  # ProKeR's logits are plain cosines
    assert torch.allclose(tiny.predict_logits(data.test_features), expected, atol=1e-6)
    assert torch.equal(tiny.predict(data.test_features), zero_shot.predict(data.test_features))
    regular = M.create("proker", selection="none", init_beta=1.0, init_lambda=1.0).fit(data)
    assert not torch.allclose(regular.predict_logits(data.test_features), expected, atol=1e-3)


def test_beta_to_infinity_is_zero_shot_off_the_support_and_a_shrunk_step_on_it():
    points, labels, text = toy_tensors()
    lam, beta = 0.5, 1e4
    alpha = proker_coefficients(kernel(points, points, beta), residual_targets(points, labels, text), lam)
    off = torch.tensor([[0.0, 0.0, 0.6, 0.8]], dtype=torch.float64)
    assert torch.allclose(off @ text.T + kernel(off, points, beta) @ alpha, off @ text.T, atol=1e-12)
    z = points @ text.T
    on = z + kernel(points, points, beta) @ alpha
    y = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(on, z + lam / (1 + lam) * (y - z), atol=1e-12)


def test_duplicated_views_are_not_deduplicated(data):
    """V → 2V with identical copies doubles the kernel mass: the fit changes (nothing merges duplicates)."""
    doubled = replace(data, support_features=torch.cat([data.support_features, data.support_features]))
    kw = {"selection": "none", "init_beta": 2.0, "init_lambda": 0.5}
    a, b = M.create("proker", **kw).fit(data), M.create("proker", **kw).fit(doubled)
    assert b.selected_["points"] == 2 * a.selected_["points"]
    assert not torch.allclose(a.predict_logits(data.test_features), b.predict_logits(data.test_features), atol=1e-4)


# --------------------------------------------------------------------------- the eigen form


@pytest.mark.parametrize("beta", [0.5, 2.0, 7.0])
def test_eigen_form_equals_a_direct_solve(beta):
    g = torch.Generator().manual_seed(int(beta * 10))
    points = F.normalize(torch.randn(60, 8, generator=g, dtype=torch.float64), dim=-1)
    points = torch.cat([points, points[:5]])  # duplicates: K is singular, K/λ + I is not
    labels = torch.randint(0, 5, (65,), generator=g)
    text = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    queries = F.normalize(torch.randn(30, 8, generator=g, dtype=torch.float64), dim=-1)
    gram, residual = kernel(points, points, beta), residual_targets(points, labels, text)
    sigma, q = torch.linalg.eigh(gram)
    lambdas = torch.tensor([1e-3, 0.05, 1.0, 30.0], dtype=torch.float64)
    filters = eigen_filters(sigma, lambdas)
    base, projected, rotated = queries @ text.T, kernel(queries, points, beta) @ q, q.T @ residual
    batched = grid_logits(base, projected, rotated, filters)
    for l, lam in enumerate(lambdas.tolist()):
        system = gram / lam + torch.eye(65, dtype=torch.float64)
        direct = torch.linalg.solve(system, residual)
        assert torch.allclose(q @ (filters[l, :, None] * rotated), direct, atol=1e-10)
        assert torch.allclose(proker_coefficients(gram, residual, lam), direct, atol=1e-10)
        assert torch.allclose(batched[l], base + kernel(queries, points, beta) @ direct, atol=1e-10)


def test_auto_solver_takes_the_eigen_form_for_long_lambda_axes(data):
    assert not eigen_pays(10, 1600) and eigen_pays(16, 1600) and eigen_pays(100, 16000)
    assert not eigen_pays(20, 8000) and eigen_pays(27, 8000)  # measured break-even about 25 λ at 8,000 points
    assert fast(search_step=[2, 5]).fit(data).search_["solver"] == "cholesky"
    long = fast(search_step=[2, 16]).fit(data)
    assert long.search_["solver"] == "eigen" and long.search_["factorisations"] == 2


@pytest.mark.parametrize("solver", ["eigen", "cholesky"])
def test_grid_counts_match_a_naive_loop_over_direct_solves(data, solver):
    points = F.normalize(data.support_features, dim=-1).reshape(-1, data.dim).double()
    labels = data.support_labels.repeat(data.views)
    text = data.text_weights
    x = F.normalize(data.val_features, dim=-1).double()
    residual = residual_targets(points, labels, text)
    betas, lambdas = torch.tensor([0.5, 3.0, 9.0], dtype=torch.float64), torch.tensor([0.01, 0.3, 2.0, 50.0])
    counts = grid_counts(
        points, residual, x @ points.T, x @ text.T.double(), data.val_labels, betas, lambdas, solver=solver
    )
    for i, beta in enumerate(betas.tolist()):
        for j, lam in enumerate(lambdas.tolist()):
            alpha = torch.linalg.solve(kernel(points, points, beta) / lam + torch.eye(len(points)), residual)
            logits = x @ text.T.double() + kernel(x, points, beta) @ alpha
            assert int(counts[i, j]) == int((logits.argmax(1) == data.val_labels).sum())


@pytest.mark.parametrize("solver", ["eigen", "cholesky"])
def test_the_search_picks_what_a_naive_loop_of_fits_picks(data, solver):
    """The estimator's (β, λ) equals the first maximum of a β-outer, λ-inner loop of fits without search, each
    scored on the validation split (the released strict ">"), whichever solver searches."""
    step = [4, 5]
    model = M.create("proker", search_step=step, solver=solver).fit(data)
    betas = torch.linspace(0.5, 3.0, step[0], dtype=torch.float64).tolist()
    lambdas = torch.linspace(0.001, 1.0, step[1], dtype=torch.float64).tolist()
    best, choice, naive = -1, None, []
    for beta in betas:
        for lam in lambdas:
            fit = M.create("proker", selection="none", init_beta=beta, init_lambda=lam).fit(data)
            correct = int((fit.predict(data.val_features) == data.val_labels).sum())
            naive.append(correct)
            if correct > best:
                best, choice = correct, (beta, lam)
    assert model._cv_counts_.reshape(-1).tolist() == naive
    assert (model.beta_, model.lambda_) == choice and model.search_["best_correct"] == best
    assert model.search_["evaluations"] == 20 and model.search_["solver"] == solver
    assert model.search_["factorisations"] == (4 if solver == "eigen" else 20)
    assert model.val_accuracy_ == pytest.approx(100 * best / data.val_labels.numel())


# --------------------------------------------------------------------------- memory: the refusal and the fallbacks


def test_memory_refusal_names_the_size_and_the_fallbacks_before_any_work(monkeypatch, data):
    """V·N = 240 points: the refusal gives the estimate in GiB, V and N, and the fallbacks that fit."""
    kernel = kernel_memory(240, 120, 20, 8, lambdas=5)
    assert kernel == 8 * (5 * 240**2 + 3 * 120 * 240 + 2 * 240 * 20 + 5 * (240 * 20 + 2 * 120 * 20))
    need = kernel + 8 * 4 * 5  # and the int64 counts of the 4 × 5 grid
    monkeypatch.setattr(proker, "memory_limit", lambda: (need - 1) / proker.MEMORY_FRACTION)  # the share planned for
    monkeypatch.setattr(proker.ProKeR, "_fit", lambda self, b: pytest.fail("_fit ran"))
    with pytest.raises(MethodError) as info:
        fast().fit(data)
    message = str(info.value)
    assert f"V·N = 3 views × 80 images = 240 support points needs about {need / 2**30:.3g} GiB" in message
    assert "float64 [240 × 240]" in message and f"{(need - 1) / 2**30:.3g} GiB" in message
    assert "support='images' (one point per image, as with V = 1: 80 points" in message
    assert "support='class-means' (one point per class: 20 points" in message and "support='auto'" in message
    monkeypatch.setattr(proker, "memory_limit", lambda: 1000)
    with pytest.raises(MethodError, match="no fallback fits either"):
        fast().fit(data)


def test_auto_support_falls_back_and_records_it(monkeypatch, data):
    full = kernel_memory(240, 120, 20, 8, lambdas=5) + 8 * 4 * 5
    images = kernel_memory(80, 120, 20, 8, lambdas=5) + 8 * 4 * 5
    assert fast(support="auto").fit(data).selected_["support_used"] == "views"
    monkeypatch.setattr(proker, "memory_limit", lambda: (full - 1) / proker.MEMORY_FRACTION)
    model = fast(support="auto").fit(data)
    assert model.hyperparameters()["support_used"] == "images" and model.selected_["points"] == 80
    assert model.hyperparameters()["support"] == "auto"
    monkeypatch.setattr(proker, "memory_limit", lambda: (images - 1) / proker.MEMORY_FRACTION)
    model = fast(support="auto").fit(data)
    assert model.selected_["support_used"] == "class-means" and model.selected_["points"] == 20


def test_cv_resolves_auto_support_once_on_all_the_support(monkeypatch, data):
    """Under cv a fold holds fewer images, so 'auto' could pick every view there while the final fit, on all the
    support, falls back to one point per image: β and λ would be tuned for another kernel. The policy is resolved
    once on all the support and fixed for the folds."""
    train = data.without_test()
    full = fast(selection="cv")._memory(train, 240)
    fold = fast(selection="cv")._memory(fold_bundle(train, cv_fold_ids(train.support_labels, 20, 4, 0) == 0), 180)
    assert fold < full
    monkeypatch.setattr(proker, "memory_limit", lambda: (full - 1) / proker.MEMORY_FRACTION)  # the folds' would fit
    used = []
    real_fit = proker.ProKeR._fit

    def spy(self, bundle):
        out = real_fit(self, bundle)
        used.append(out["support_used"])
        return out

    monkeypatch.setattr(proker.ProKeR, "_fit", spy)
    model = fast(support="auto", selection="cv").fit(data)
    assert model.selected_["support_used"] == "images" and model.support == "auto"
    assert len(used) > 4 and set(used) == {"images"}  # every fold probe, the out-of-fold copies and the final fit


def test_fallback_points(data):
    kw = {"selection": "none", "init_beta": 1.0, "init_lambda": 0.5}
    images = M.create("proker", support="images", **kw).fit(data)
    assert images.selected_["support_source"] == "clean view"
    assert torch.allclose(images.points_, F.normalize(data.support_clean_features, dim=-1))
    no_clean = M.create("proker", support="images", **kw).fit(replace(data, support_clean_features=None))
    assert no_clean.selected_["support_source"] == "mean of the views"
    assert torch.allclose(no_clean.points_, F.normalize(data.support_features.mean(0), dim=-1))
    means = M.create("proker", support="class-means", **kw).fit(data)
    unit = F.normalize(data.support_features, dim=-1)
    for c in (0, 7):
        expected = F.normalize(unit[:, data.support_labels == c].reshape(-1, data.dim).mean(0), dim=0)
        assert torch.allclose(means.points_[c], expected, atol=1e-6)
    for model in (images, no_clean, means):
        assert model.score(data.test_features, data.test_labels) > 100 / data.num_classes


def test_float32_precision_agrees_with_float64(data):
    kw = {"selection": "none", "init_beta": 2.0, "init_lambda": 0.2}
    a = M.create("proker", precision="float64", **kw).fit(data)
    b = M.create("proker", precision="float32", **kw).fit(data)
    assert b.selected_["precision"] == "float32" and b.coefficients_.dtype == torch.float32
    assert torch.allclose(a.predict_logits(data.test_features), b.predict_logits(data.test_features), atol=1e-4)


# --------------------------------------------------------------------------- selection


def test_val_selection_never_reads_test(data):
    g = torch.Generator().manual_seed(0)
    scrambled = replace(data, test_labels=data.test_labels[torch.randperm(data.test_labels.numel(), generator=g)])
    a, b = fast().fit(data), fast().fit(scrambled)
    assert a.hyperparameters() == b.hyperparameters() and a.search_ == b.search_
    assert torch.equal(a.predict_logits(data.test_features), b.predict_logits(data.test_features))


def test_cv_sums_the_folds_counts_over_the_grid(data):
    model = fast(selection="cv").fit(data)
    assert model.selection_used_ == "cv" and model.selected_["cv_folds"] == 4
    assert model.selected_["init_from"] == "init_beta, init_lambda"  # the values cv chose, fixed for the final fit
    train = data.without_test()
    k = cv_fold_count(train.shots_per_class())
    ids = cv_fold_ids(train.support_labels, train.num_classes, k, seed=0)
    total = sum(fast().fit(fold_bundle(train, ids == f))._cv_counts_ for f in range(k))
    flat = total.reshape(-1)
    i, j = divmod(int((flat == flat.max()).nonzero()[0]), total.shape[1])
    steps = FAST["proker"]["search_step"]
    assert model.beta_ == float(torch.linspace(0.5, 3.0, steps[0], dtype=torch.float64)[i])
    assert model.lambda_ == float(torch.linspace(0.001, 1.0, steps[1], dtype=torch.float64)[j])
    assert model.cv_["best_correct"] == int(flat.max())
    no_val = replace(data, val_features=None, val_labels=None, test_labels=data.test_labels.flip(0))
    assert fast(selection="cv").fit(no_val).selected_ == model.selected_


def test_selection_none_uses_the_released_transfer_values_by_shot_count(data):
    model = M.create("proker", selection="none").fit(data)  # 4 shots
    assert (model.beta_, model.lambda_) == TRANSFER[4]
    assert (
        "imagenet-transfer 4-shot" in model.selected_["init_from"] and "ImageNet test" in model.selected_["init_from"]
    )
    own = M.create("proker", selection="none", init_lambda=0.3).fit(data)
    assert (own.beta_, own.lambda_) == (TRANSFER[4][0], 0.3)


def test_bad_grid_ends_are_refused():
    with pytest.raises(MethodError, match=r"search_lambda=\[1.0, 0.1\] must be \[first, last\] with first ≤ last"):
        M.create("proker", search_lambda=[1.0, 0.1]).validate_params()


def test_presets_carry_the_released_grids():
    assert M.create("proker", preset="dtd").search_step == [20, 100]
    pets = M.create("proker", preset="oxford_pets")
    assert pets.search_beta == [0.01, 5] and pets.search_lambda == [0.01, 0.3] and pets.search_step == [40, 20]
    assert len(M.list_presets("proker")) == 11


# --------------------------------------------------------------------------- classes without support


def test_classes_without_support_keep_zero_shot_away_from_the_support():
    """A class without support has target 0 at every support point (its residual column is −Z_S); far from the
    support (a sharp kernel) every logit is the zero-shot cosine, so such a class is still predicted there."""
    b = make_synthetic_bundle(classes=8, shots=[4] * 5 + [0] * 3, dim=32, views=2, val_per_class=4, test_per_class=5)
    model = fast().fit(b)
    assert model.selected_["calibration"] == "val" and model.selected_["points"] == 2 * 20
    unseen = b.test_labels >= 5
    assert bool((model.predict(b.test_features[unseen]) >= 5).any())
    sharp = M.create("proker", selection="none", init_beta=500.0, init_lambda=1.0).fit(b)
    far = b.text_weights[5:]  # queries at the unseen classes' text rows: cosines to the support well below 1
    assert float((far @ sharp.points_.T).max()) < 0.9
    assert torch.allclose(sharp.predict_logits(far), far @ b.text_weights.T, atol=1e-6)
    assert torch.equal(sharp.predict(far), torch.tensor([5, 6, 7]))
    points = sharp.points_.double()
    residual = residual_targets(points, b.support_labels.repeat(2), b.text_weights)
    assert torch.allclose(residual[:, 5:], -(points @ b.text_weights[5:].T.double()))


# --------------------------------------------------------------------------- end to end


def test_fewclip_run_proker_end_to_end(tmp_path):
    root = make_pets(tmp_path / "data", train=4, val=3, test=3, size=32)
    tiny = save_tiny_openclip(tmp_path / "model", "vit", name="fewclip-test-proker-vit", seed=0)
    out = tmp_path / "results"
    argv = [
        "run", "--dataset", "oxford_pets", "--data-root", str(root), "--model", f"local-dir:{tiny.folder}",
        "--views", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress",
        "--shots", "2", "--seeds", "1", "--method", "proker", "--set", "proker:search_step=[3,4]",
    ]  # fmt: skip
    assert main(argv) == 0
    (path,) = Path(out).rglob("proker/shots_2-seed_1.json")
    result = json.loads(path.read_text())
    assert result["method"] == "proker" and result["selection"] == "val" and result["test_tuned"] is False
    assert result["selected"]["support_used"] == "views" and result["selected"]["points"] == 2 * 3 * 2
    assert 0 <= result["accuracy"]["test_accuracy"] <= 100
