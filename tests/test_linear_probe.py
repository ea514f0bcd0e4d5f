"""The linear probe's maths against formulas: loss and gradient, L-BFGS, the exact reparametrisations, warm starts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fewclip import methods as M
from fewclip.features.synthetic import make_synthetic_bundle
from fewclip.methods.linear_probe import (
    COARSE_C,
    LogisticProblem,
    fine_grid,
    fit_logistic,
    lbfgs,
    logistic_objective,
)


def toy(n: int, d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = torch.randn(k, d, generator=g, dtype=torch.float64)[y] + 0.8 * torch.randn(
        n, d, generator=g, dtype=torch.float64
    )
    return F.normalize(x + 1.0, dim=-1), y  # a common offset, as in CLIP features


def objective_gradient(x, y, w, b, c):
    """∇ of ½‖W‖² + C·Σ CE by autograd: the optimality condition of L2-regularised logistic regression."""
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    value = 0.5 * (w * w).sum() + c * F.cross_entropy(x @ w.T + b, y, reduction="sum")
    value.backward()
    return w.grad, b.grad


def test_objective_and_gradient_match_the_formula():
    x, y = toy(12, 4, 3)
    g = torch.Generator().manual_seed(1)
    w, b, lam = (
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(3, generator=g, dtype=torch.float64),
        0.3,
    )
    loss, gw, gb = logistic_objective(x, F.one_hot(y, 3).double(), w, b, lam)
    wr, br = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    expected = F.cross_entropy(x @ wr.T + br, y) + 0.5 * lam * (wr * wr).sum()
    expected.backward()
    assert torch.allclose(loss, expected) and torch.allclose(gw, wr.grad) and torch.allclose(gb, br.grad)


def test_lbfgs_finds_the_minimiser_of_a_quadratic():
    a = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
    rhs = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    found = lbfgs(lambda t: (0.5 * t @ a @ t - rhs @ t, a @ t - rhs), torch.zeros(3, dtype=torch.float64), 100, 1e-15)
    assert torch.allclose(found.theta, torch.linalg.solve(a, rhs), atol=1e-6)


def test_centring_and_span_basis_are_exact_reparametrisations():
    for n, d in [(9, 20), (30, 5)]:  # fewer rows than dimensions (a basis of their span), and more
        x, y = toy(n, d, 3)
        problem = LogisticProblem.build(x, y, 3)
        assert (problem.basis is not None) == (n < d)
        theta = torch.randn(problem.zeros().shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        w, b = problem.from_theta(theta)
        assert torch.allclose(problem.to_theta(w, b), theta)
        zlogits = problem.z @ theta[: 3 * problem.z.shape[1]].view(3, -1).T + theta[-3:]
        assert torch.allclose(x @ w.T + b, zlogits)  # the same logits in both coordinates


def test_solutions_satisfy_the_optimality_condition():
    for n, d, c in [(40, 5, 0.5), (12, 30, 10.0), (60, 8, 1e3)]:
        x, y = toy(n, d, 4)
        w, b = fit_logistic(x, y, 4, c, max_iter=2000, tol=1e-15)
        gw, gb = objective_gradient(x, y, w, b, c)
        scale = c * n  # the objective's gradient is C·N times that of mean CE + λ/2‖W‖²
        assert float(torch.cat([gw.flatten(), gb]).norm()) / scale < 1e-7, (n, d, c)


def test_warm_and_cold_starts_agree():
    x, y = toy(50, 6, 3)
    cold = fit_logistic(x, y, 3, 5.0, max_iter=2000, tol=1e-15)
    start = fit_logistic(x, y, 3, 0.5, max_iter=2000, tol=1e-15)
    warm = fit_logistic(x, y, 3, 5.0, init=start, max_iter=2000, tol=1e-15)
    assert torch.allclose(cold[0], warm[0], atol=1e-6) and torch.allclose(cold[1], warm[1], atol=1e-6)


def test_fine_grid_spans_two_decades_around_the_best():
    grid = fine_grid(10.0)
    assert (
        len(grid) == 17 and abs(grid[0] - 1.0) < 1e-12 and abs(grid[8] - 10.0) < 1e-9 and abs(grid[-1] - 100.0) < 1e-9
    )
    assert all(b / a > 1 for a, b in zip(grid, grid[1:], strict=False))


def test_search_reuses_coarse_fits_and_picks_the_best_validation_c():
    bundle = make_synthetic_bundle(classes=6, shots=8, dim=16, views=2, val_per_class=10, test_per_class=5, seed=6)
    probe = M.create("linear-probe").fit(bundle)
    best = probe.search_["coarse_best"]
    shared = sum(any(abs(c - g) <= 1e-9 * g for g in fine_grid(best)) for c in COARSE_C)
    assert probe.search_["evaluations"] == 30 and probe.search_["fits"] == 30 - shared
    # the chosen C's fit, refitted alone from zero, predicts the same classes on validation
    c = probe.selected_["C"]
    assert 0.1 < c < 100  # an interior C on this bundle (where the weights are not at rounding level)
    x = F.normalize(bundle.support_clean_features, dim=-1)
    w, b = fit_logistic(x, bundle.support_labels, 6, c, max_iter=2000, tol=1e-12)
    xv = F.normalize(bundle.val_features, dim=-1)
    assert torch.equal((xv @ w.T + b).argmax(1), probe.predict_logits(bundle.val_features).argmax(1))
