"""Temperature scaling (Guo et al. 2017): one scalar T > 0 such that softmax(logits / T) has the lowest negative
log-likelihood on held-out rows. It divides every logit alike, so the arg-max (and the accuracy) never changes; only
the probabilities do.

The NLL of softmax(β · z) is convex in the inverse temperature β = 1/T, its derivative
``mean(E_p[z] − z_y)`` increasing in β, so the minimum is the root of that derivative: found by bisection on log β
within [1/T_MAX, 1/T_MIN], in float64, deterministic.
"""

from __future__ import annotations

import math

import torch

from ..metrics import expected_calibration_error

#: bounds of the fitted temperature: logits separating the rows perfectly push T towards 0, ones carrying no signal
#: towards ∞; either stops at a bound.
T_MIN, T_MAX = 1e-3, 1e3
_STEPS = 80


def _nll_slope(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> float:
    """d/dβ of mean NLL(softmax(β · logits)) = mean over rows of E_p[z] − z_y."""
    p = torch.softmax(beta * logits, dim=1)
    return float(((p * logits).sum(dim=1) - logits.gather(1, labels[:, None]).squeeze(1)).mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T in [T_MIN, T_MAX] minimising the NLL of softmax(logits / T) for ``logits`` [M, C] and
    ``labels`` [M]; 1.0 without rows or when the logits do not depend on the class (every T is as good). Rounded to 4
    significant digits: finer digits carry no calibration and would follow the float32 rounding of the logits (a
    permuted support set must record the same T)."""
    if labels.numel() == 0:
        return 1.0
    z = logits.detach().double().cpu()
    z = z - z.mean(dim=1, keepdim=True)  # the softmax ignores a per-row shift
    y = labels.detach().long().cpu()
    if float(z.abs().max()) == 0.0:
        return 1.0
    lo, hi = -math.log(T_MAX), -math.log(T_MIN)  # log β
    if _nll_slope(z, y, math.exp(lo)) >= 0.0:
        return T_MAX
    if _nll_slope(z, y, math.exp(hi)) <= 0.0:
        return T_MIN
    for _ in range(_STEPS):
        mid = 0.5 * (lo + hi)
        if _nll_slope(z, y, math.exp(mid)) < 0.0:
            lo = mid
        else:
            hi = mid
    return float(f"{1.0 / math.exp(0.5 * (lo + hi)):.4g}")


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature) (nats); NaN without rows."""
    if labels.numel() == 0:
        return float("nan")
    log_p = torch.log_softmax(logits.double() / temperature, dim=1)
    return float(-log_p.gather(1, labels.long()[:, None]).mean())


def ece(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, bins: int = 15) -> float:
    """Expected calibration error (percent) of softmax(logits / temperature)."""
    return expected_calibration_error(torch.softmax(logits.double() / temperature, dim=1), labels, bins)


def calibration_record(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, float | None]:
    """ECE before (T = 1) and after (``temperature``) for a results file; None where there are no rows."""

    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    return {"before": finite(ece(logits, labels)), "after": finite(ece(logits, labels, temperature))}
