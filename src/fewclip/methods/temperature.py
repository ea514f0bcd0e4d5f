"""Temperature scaling (Guo et al. 2017): one scalar T > 0 such that softmax(logits / T) has the lowest negative
log-likelihood on held-out rows. It divides every logit alike, so the arg-max (and the accuracy) never changes; only
the probabilities do.

The NLL of softmax(β · z) is convex in the inverse temperature β = 1/T, its derivative
``mean(E_p[z] − z_y)`` increasing in β, so the minimum is the root of that derivative: found by bisection on log β
within [1/T_MAX, 1/T_MIN], in float64, deterministic.

A floor from the rule of succession: on held-out rows that the model classifies perfectly the NLL keeps falling as
T → 0, and the maximum-likelihood T would make every probability one-hot. M rows all right do not show that the
model is never wrong: Laplace's rule of succession estimates its accuracy as (M + 1)/(M + 2). The fitted T is
therefore never below :func:`confidence_floor`, the T at which the mean top probability on those rows equals
(M + 1)/(M + 2), so that a calibrated model's confidence does not claim more than M correct rows can support. With
many rows or errors the NLL optimum lies above it and the floor changes nothing.
"""

from __future__ import annotations

import math

import torch

from ..metrics import expected_calibration_error

#: bounds of the fitted temperature, relative to the logits' own scale (:func:`logit_scale`): logits separating the
#: rows perfectly push T towards 0, ones carrying no signal towards ∞; either stops at a bound. Relative, so that a
#: method whose logits are tiny (a linear probe at C = 1e-7) or huge is calibrated like any other: the fitted T is
#: equivariant, T(s · logits) = s · T(logits).
T_MIN, T_MAX = 1e-3, 1e3
_STEPS = 80
#: bisection steps of the floor: log T within [log T_MIN, log T_MAX] to 14/2^40, far below the 4 digits kept
_FLOOR_STEPS = 40


def _nll_slope(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> float:
    """d/dβ of mean NLL(softmax(β · logits)) = mean over rows of E_p[z] − z_y."""
    p = torch.softmax(beta * logits, dim=1)
    return float(((p * logits).sum(dim=1) - logits.gather(1, labels[:, None]).squeeze(1)).mean())


def _mean_confidence(logits: torch.Tensor, temperature: float) -> float:
    return float(torch.softmax(logits / temperature, dim=1).max(dim=1).values.mean())


def logit_scale(logits: torch.Tensor) -> float:
    """The logits' scale: the standard deviation of the row-centred logits (1.0 when they are all equal, or none)."""
    z = logits.detach().double().cpu()
    if z.numel() == 0:
        return 1.0
    spread = float((z - z.mean(dim=1, keepdim=True)).std(correction=0))
    return spread if math.isfinite(spread) and spread > 0.0 else 1.0


def confidence_floor(logits: torch.Tensor) -> float:
    """The smallest T in [T_MIN, T_MAX] · :func:`logit_scale` at which the mean top probability of
    softmax(``logits`` / T) over the M rows is at most (M + 1)/(M + 2) (the rule of succession's accuracy for M rows
    all right); the lower bound when even that keeps it below. The mean top probability falls as T grows, so the
    floor is found by bisection on log T."""
    z = logits.detach().double().cpu()
    m = z.shape[0]
    scale = logit_scale(z)
    t_min, t_max = T_MIN * scale, T_MAX * scale
    if m == 0 or z.shape[1] < 2:
        return t_min
    target = (m + 1) / (m + 2)
    lo, hi = math.log(t_min), math.log(t_max)
    if _mean_confidence(z, t_min) <= target:
        return t_min
    if _mean_confidence(z, t_max) > target:
        return t_max
    for _ in range(_FLOOR_STEPS):
        mid = 0.5 * (lo + hi)
        if _mean_confidence(z, math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, floor: bool = True) -> float:
    """The temperature T in [T_MIN, T_MAX] · :func:`logit_scale` minimising the NLL of softmax(logits / T) for
    ``logits`` [M, C] and ``labels`` [M], and (``floor``) at least :func:`confidence_floor`; 1.0 without rows or when
    the logits do not depend on the class (every T is as good). Rounded to 4 significant digits: finer digits carry no
    calibration and would follow the float32 rounding of the logits (a permuted support set must record the same T)."""
    t = _nll_temperature(logits, labels)
    if floor and labels.numel():
        t = max(t, confidence_floor(logits))
    return float(f"{t:.4g}")


def _nll_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The maximum-likelihood T (unrounded; see :func:`fit_temperature`)."""
    if labels.numel() == 0:
        return 1.0
    z = logits.detach().double().cpu()
    z = z - z.mean(dim=1, keepdim=True)  # the softmax ignores a per-row shift
    y = labels.detach().long().cpu()
    if float(z.abs().max()) == 0.0:
        return 1.0
    scale = logit_scale(z)
    lo, hi = -math.log(T_MAX * scale), -math.log(T_MIN * scale)  # log β
    if _nll_slope(z, y, math.exp(lo)) >= 0.0:
        return T_MAX * scale
    if _nll_slope(z, y, math.exp(hi)) <= 0.0:
        return T_MIN * scale
    for _ in range(_STEPS):
        mid = 0.5 * (lo + hi)
        if _nll_slope(z, y, math.exp(mid)) < 0.0:
            lo = mid
        else:
            hi = mid
    return 1.0 / math.exp(0.5 * (lo + hi))


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
