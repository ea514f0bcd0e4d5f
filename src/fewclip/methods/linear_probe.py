"""Linear probe (CoOp's lpclip protocol): multinomial logistic regression on normalised support features.

Objective per C: ½‖W‖² + C·Σ_n CE(W x_n + b, y_n) (bias unpenalised), minimised as mean CE + ‖W‖²/(2·C·N) by
full-batch L-BFGS until the loss changes by less than ``tol`` (relative, floored at 1) from one iteration to the next.
C is chosen on validation: 13 values 10⁻⁶ … 10⁶, then 17 log-uniform points over [10^(e−1), 10^(e+1)] around the
best 10^e (fewclip's refinement; lpclip used a binary search). Validation ties go to the smaller C.

The probe trains on what lpclip trains on: one clean (test-transform) feature per support image
(``support_clean_features``; the mean of the views when a bundle has none).

Speed, with the same minimiser: the features are centred (exact, since the bias is unpenalised: W(x − m) + b'
is W x + b with b = b' − W m), and when there are fewer support images than dimensions the problem is solved
in an orthonormal basis of their span, where the minimiser lies (representer theorem; the penalty is unchanged
by the rotation). Each fit starts from the solution at the previous, smaller C (warm starts along the C path); the
fine grid starts from the coarse fit below it and reuses the coarse fits it contains. The loss and its gradient are
computed in closed form (no autograd).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..features.bundle import Bundle
from ..progress import progress
from .base import Method
from .params import Boolean, Integral, Interval, Real, param
from .registry import register

COARSE_C = tuple(10.0**e for e in range(-6, 7))
FINE_POINTS = 17
HISTORY = 10  # L-BFGS curvature pairs kept


def logistic_objective(
    x: torch.Tensor, onehot: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mean_n CE(W x_n + b, y_n) + λ/2·‖W‖² and its gradient: (loss [], ∂W [K, D], ∂b [K]).

    x [N, D], onehot [N, K]; ∂W = (P − Y)ᵀ X / N + λ W and ∂b = mean_n (P − Y) with P the softmax of the logits.
    """
    # The [N, K] part runs in float64 whatever the features' precision: near the uniform softmax (small C) the bias
    # gradient mean(P − Y) is a difference of nearly equal numbers, which float32 would leave at rounding noise.
    logits = torch.addmm(bias, x, weight.T).double()
    lse = torch.logsumexp(logits, dim=1)
    data = (lse - (logits * onehot).sum(1)).mean()  # row by row, then the mean: no cancellation between sums
    residual = torch.exp(logits - lse[:, None]).sub_(onehot).div_(x.shape[0])
    loss = data + 0.5 * lam * (weight * weight).sum().double()  # float64: the line search compares tiny decreases
    return loss, torch.addmm(weight, residual.T.to(x.dtype), x, beta=lam), residual.sum(0).to(x.dtype)


@dataclass
class Minimum:
    theta: torch.Tensor
    loss: float
    iterations: int
    evaluations: int


def lbfgs(
    fun: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    theta: torch.Tensor,
    max_iter: int,
    tol: float,
    history: int = HISTORY,
) -> Minimum:
    """Minimise a smooth function ``fun(θ) -> (f, ∇f)`` from ``theta`` with L-BFGS and a backtracking (Armijo) search.

    Stops after ``max_iter`` iterations, or when an iteration lowers f by at most ``tol``·max(|f_k|, |f_k+1|, 1) (the
    relative change of the loss, floored at 1 as in scipy's L-BFGS-B, so that a loss falling towards 0 on separable
    data stops too), or when no step along the search direction lowers f (the minimum to working precision).
    """
    f, g = fun(theta)
    evaluations = 1
    steps: list[torch.Tensor] = []
    changes: list[torch.Tensor] = []
    for iteration in range(1, max_iter + 1):
        d = _two_loop(g, steps, changes)
        slope = float(g @ d)
        if not slope < 0:  # not a descent direction (curvature lost to rounding): restart from steepest descent
            steps.clear()
            changes.clear()
            d, slope = -g, -float(g @ g)
            if slope == 0:
                return Minimum(theta, float(f), iteration - 1, evaluations)
        t = 1.0 if steps else min(1.0, 1.0 / float(g.abs().sum()))
        for _ in range(40):
            candidate = theta + t * d
            f_new, g_new = fun(candidate)
            evaluations += 1
            if float(f_new) <= float(f) + 1e-4 * t * slope:
                break
            t *= 0.5
        else:
            return Minimum(theta, float(f), iteration - 1, evaluations)
        s, y = candidate - theta, g_new - g
        if float(s @ y) > 1e-10 * float(y @ y):
            steps.append(s)
            changes.append(y)
            if len(steps) > history:
                steps.pop(0)
                changes.pop(0)
        converged = float(f) - float(f_new) <= tol * max(abs(float(f)), abs(float(f_new)), 1.0)
        theta, f, g = candidate, f_new, g_new
        if converged:
            return Minimum(theta, float(f), iteration, evaluations)
    return Minimum(theta, float(f), max_iter, evaluations)


def _two_loop(g: torch.Tensor, steps: list[torch.Tensor], changes: list[torch.Tensor]) -> torch.Tensor:
    """The L-BFGS direction −H g from the stored pairs (s, y), with H₀ = (sᵀy / yᵀy)·I."""
    q = g.clone()
    alphas = []
    for s, y in zip(reversed(steps), reversed(changes), strict=True):
        rho = 1.0 / float(y @ s)
        a = rho * float(s @ q)
        q.add_(y, alpha=-a)
        alphas.append((a, rho))
    if steps:
        q.mul_(float(steps[-1] @ changes[-1]) / float(changes[-1] @ changes[-1]))
    for (s, y), (a, rho) in zip(zip(steps, changes, strict=True), reversed(alphas), strict=True):
        q.add_(s, alpha=a - rho * float(y @ q))
    return q.neg_()


@dataclass(frozen=True)
class LogisticProblem:
    """One support set, centred and (when N < D) rotated into the basis of its span.

    z [N, r] = (x − mean) @ basis, or x − mean with ``basis`` None (r = D); ``onehot`` [N, K]. Parameters travel as
    one flat vector θ = [W_z (K·r), b_z (K)], with W = W_z basisᵀ and b = b_z − W·mean in the original coordinates.
    """

    z: torch.Tensor
    onehot: torch.Tensor
    mean: torch.Tensor
    basis: torch.Tensor | None

    @classmethod
    def build(cls, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> LogisticProblem:
        mean = x.mean(dim=0)
        centred = x - mean
        basis = None
        if x.shape[0] < x.shape[1]:
            basis, _ = torch.linalg.qr(centred.T)  # [D, N], orthonormal columns spanning the centred rows
            centred = centred @ basis
        return cls(centred, F.one_hot(y, num_classes).double(), mean, basis)

    @property
    def shape(self) -> tuple[int, int]:
        return self.onehot.shape[1], self.z.shape[1]

    def objective(self, c: float) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """θ -> (loss, ∇loss) of mean CE + ‖W‖²/(2·C·N)."""
        k, r = self.shape
        lam = 1.0 / (c * self.z.shape[0])

        def fun(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            loss, gw, gb = logistic_objective(self.z, self.onehot, theta[: k * r].view(k, r), theta[k * r :], lam)
            return loss, torch.cat([gw.flatten(), gb])

        return fun

    def zeros(self) -> torch.Tensor:
        k, r = self.shape
        return torch.zeros(k * r + k, dtype=self.z.dtype)

    def to_theta(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        w = weight if self.basis is None else weight @ self.basis
        return torch.cat([w.flatten(), bias + weight @ self.mean])

    def from_theta(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, r = self.shape
        w = theta[: k * r].view(k, r)
        weight = w.clone() if self.basis is None else w @ self.basis.T
        return weight, theta[k * r :] - weight @ self.mean


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    c: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 300,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean CE + ‖W‖²/(2·C·N) (the same minimiser as ½‖W‖² + C·ΣCE); returns (W [K, D], b [K])."""
    problem = LogisticProblem.build(x, y, num_classes)
    theta = problem.zeros() if init is None else problem.to_theta(*init)
    return problem.from_theta(lbfgs(problem.objective(c), theta, max_iter, tol).theta)


def fine_grid(best: float, points: int = FINE_POINTS) -> list[float]:
    """``points`` log-uniform values over [best/10, best·10]."""
    e = math.log10(best)
    return torch.logspace(e - 1, e + 1, points, dtype=torch.float64).tolist()


@dataclass
class PathFit:
    correct: int
    weight: torch.Tensor
    bias: torch.Tensor
    theta: torch.Tensor
    iterations: int


@register("linear-probe")
@dataclass(kw_only=True, repr=False, eq=False)
class LinearProbe(Method):
    needs_support_for_every_class = True
    cross_validates = True

    C: float = param(
        1.0, Interval(Real, 0, None, closed="neither"), doc="inverse regularisation strength, without search"
    )
    normalize: bool = param(True, Boolean(), doc="L2-normalise the features")
    max_iter: int = param(300, Interval(Integral, 1, None, closed="left"), doc="L-BFGS iterations per C")
    tol: float = param(
        1e-6, Interval(Real, 0, None, closed="neither"), doc="L-BFGS stops when the loss changes by less (relative)"
    )

    def _prepare(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=-1) if self.normalize else features

    def _train_features(self, bundle: Bundle) -> tuple[torch.Tensor, str]:
        if bundle.support_clean_features is not None:
            return bundle.support_clean_features, "support_clean_features"
        return bundle.support_features.mean(dim=0), "mean of support views"

    def _fit(self, bundle: Bundle) -> dict[str, Any]:
        raw, source = self._train_features(bundle)
        problem = LogisticProblem.build(self._prepare(raw), bundle.support_labels, bundle.num_classes)

        def solve(c: float, theta: torch.Tensor) -> Minimum:
            return lbfgs(problem.objective(c), theta, self.max_iter, self.tol)

        if self.selection == "none":
            chosen = float(self.C)
            found = solve(chosen, problem.zeros())
            w, b = problem.from_theta(found.theta)
            self.search_ = {"evaluations": 0, "iterations": found.iterations}
        else:
            xv, yv = self._prepare(bundle.val_features), bundle.val_labels
            fits: dict[float, PathFit] = {}

            def sweep(cs: Iterable[float], start: torch.Tensor, bar) -> dict[float, PathFit]:
                """Fit every C from the smallest up, each from the previous solution; reuse fits already made."""
                out, theta = {}, start
                for c in sorted(cs):
                    done = next((fits[k] for k in fits if math.isclose(k, c, rel_tol=1e-9)), None)
                    if done is None:
                        found = solve(c, theta)
                        w, b = problem.from_theta(found.theta)
                        correct = int((torch.addmm(b, xv, w.T).argmax(1) == yv).sum())
                        done = fits[c] = PathFit(correct, w, b, found.theta, found.iterations)
                    bar.update(1)
                    bar.set_postfix(C=f"{c:.3g}", val=done.correct)
                    out[c], theta = done, done.theta
                return out

            with progress(len(COARSE_C) + FINE_POINTS, f"{self.name} C search", "C", leave=False) as bar:
                coarse = sweep(COARSE_C, problem.zeros(), bar)
                best = max(coarse, key=lambda c: (coarse[c].correct, -c))  # ties: smaller C
                grid = fine_grid(best)
                below = max((c for c in coarse if c <= grid[0] * (1 + 1e-9)), default=min(coarse))
                fine = sweep(grid, coarse[below].theta, bar)
            chosen = max(fine, key=lambda c: (fine[c].correct, -c))
            w, b = fine[chosen].weight, fine[chosen].bias
            self.search_ = {
                "evaluations": len(coarse) + len(fine),
                "fits": len(fits),
                "iterations": sum(f.iterations for f in fits.values()),
                "coarse_best": best,
                "best_correct": fine[chosen].correct,
            }
        self.weight_, self.bias_ = w, b
        self.train_features_ = source
        return {"C": chosen}

    def _cv_select(self, folds: Sequence[Bundle]) -> tuple[dict[str, Any], int]:
        """C by cross-validation: the coarse grid's counts summed over the folds, then the fine grid around the best
        coarse C the same way (ties: the smaller C, as on validation). Each fold's path is fitted from the smallest C
        up, each from the previous solution."""
        fitted = []
        for fold in folds:
            raw, _ = self._train_features(fold)
            problem = LogisticProblem.build(self._prepare(raw), fold.support_labels, fold.num_classes)
            fitted.append((problem, self._prepare(fold.val_features), fold.val_labels))

        def summed(cs: Iterable[float]) -> tuple[float, int]:
            cs = sorted(cs)
            total = [0] * len(cs)
            for problem, xv, yv in fitted:
                theta = problem.zeros()
                for i, c in enumerate(cs):
                    theta = lbfgs(problem.objective(c), theta, self.max_iter, self.tol).theta
                    w, b = problem.from_theta(theta)
                    total[i] += int((torch.addmm(b, xv, w.T).argmax(1) == yv).sum())
            return max(zip(cs, total), key=lambda t: (t[1], -t[0]))

        coarse, _ = summed(COARSE_C)
        chosen, correct = summed(fine_grid(coarse))
        return {"C": chosen}, correct

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        return self._prepare(features) @ self.weight_.T + self.bias_
