"""Linear probe (CoOp's lpclip protocol): multinomial logistic regression on normalised support features.

Objective per C: ½‖W‖² + C·Σ_n CE(W x_n + b, y_n) (bias unpenalised), solved to a tolerance by full-batch
L-BFGS, warm-started along the C path. C is chosen on validation: 13 values 10⁶ … 10⁻⁶, then 17 log-uniform
points over [10^(e−1), 10^(e+1)] around the best 10^e (fewclip's refinement; lpclip used a binary search).
Validation ties go to the smaller C.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..features.bundle import Bundle
from .base import Method
from .params import Boolean, Integral, Interval, Real, param
from .registry import register

COARSE_C = tuple(10.0**e for e in range(-6, 7))


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    c: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 300,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean CE + ‖W‖²/(2·C·N) (the same minimiser as ½‖W‖² + C·ΣCE) with L-BFGS; returns (W [K, D], b [K])."""
    n, dim = x.shape
    weight = torch.zeros(num_classes, dim, dtype=x.dtype) if init is None else init[0].clone()
    bias = torch.zeros(num_classes, dtype=x.dtype) if init is None else init[1].clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    lam = 1.0 / (c * n)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + 0.5 * lam * (weight * weight).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


@register("linear-probe")
@dataclass(kw_only=True, repr=False, eq=False)
class LinearProbe(Method):
    needs_support_for_every_class = True

    C: float = param(
        1.0, Interval(Real, 0, None, closed="neither"), doc="inverse regularisation strength, without search"
    )
    normalize: bool = param(True, Boolean(), doc="L2-normalise the features")
    max_iter: int = param(300, Interval(Integral, 1, None, closed="left"), doc="L-BFGS iterations per C")
    tol: float = param(1e-6, Interval(Real, 0, None, closed="neither"), doc="L-BFGS gradient tolerance")

    def _prepare(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=-1) if self.normalize else features

    def _train_features(self, bundle: Bundle) -> tuple[torch.Tensor, str]:
        if bundle.support_clean_features is not None:
            return bundle.support_clean_features, "support_clean_features"
        return bundle.support_features.mean(dim=0), "mean of support views"

    def _fit(self, bundle: Bundle) -> dict[str, Any]:
        raw, source = self._train_features(bundle)
        x, y, k = self._prepare(raw), bundle.support_labels, bundle.num_classes
        fit = lambda c, init=None: fit_logistic(x, y, k, c, init, self.max_iter, self.tol)  # noqa: E731
        if self.selection == "none":
            chosen, (w, b) = float(self.C), fit(float(self.C))
            self.search_ = {"evaluations": 0}
        else:
            xv, yv = self._prepare(bundle.val_features), bundle.val_labels

            def sweep(cs):
                results, init = {}, None
                for c in sorted(cs):  # warm start from strong to weak regularisation
                    init = fit(c, init)
                    acc = int(((xv @ init[0].T + init[1]).argmax(1) == yv).sum())
                    results[c] = (acc, init)
                return results

            coarse = sweep(COARSE_C)
            best = max(coarse, key=lambda c: (coarse[c][0], -c))  # ties: smaller C
            fine_cs = torch.logspace(
                torch.log10(torch.tensor(best)) - 1, torch.log10(torch.tensor(best)) + 1, 17, dtype=torch.float64
            ).tolist()
            fine = sweep(fine_cs)
            chosen = max(fine, key=lambda c: (fine[c][0], -c))
            w, b = fine[chosen][1]
            self.search_ = {
                "evaluations": len(coarse) + len(fine),
                "coarse_best": best,
                "best_correct": fine[chosen][0],
            }
        self.weight_, self.bias_ = w, b
        self.train_features_ = source
        return {"C": chosen}

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        return self._prepare(features) @ self.weight_.T + self.bias_
