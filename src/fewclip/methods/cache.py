"""What Tip-Adapter and APE share: the support cache, its logits and the (β, α[, γ]) grid search.

    Z = 100 · n(f) Wᵀ + α · Σ_{k: y_k = c} exp(−β(1 − n(f_Q)·F_Q,kᵀ)) · r_k

Tip-Adapter: all channels (Q = D), r = 1. APE: Q refined channels, r = exp(γ·d_k).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..features.bundle import Bundle
from ..progress import progress
from .base import Method
from .calibration import JOINT_OFFSET_POINTS, gaps_along_alpha, offset_grid, refine_offset
from .params import Integral, Interval, Real, SequenceOf
from .search import (
    ClassLayout,
    cache_search,
    first_argmax,
    memory_limit,
    phi,
    refuse_search_memory,
    search_memory,
    search_row_chunk,
    tip_grid,
)

#: α, β and γ of the cache logits (γ ≥ 0: APE's code sign, r = exp(+γ·d))
CACHE_WEIGHT = Interval(Real, 0, None, closed="left")


def search_scale(size: int) -> SequenceOf:
    """``search_scale``: the upper ends of the ``size`` grids (β, α[, γ]), positive."""
    return SequenceOf(Interval(Real, 0, None, closed="neither"), length=size)


def search_step(size: int) -> SequenceOf:
    """``search_step``: the number of points of each of the ``size`` grids."""
    return SequenceOf(Interval(Integral, 1, None, closed="left"), length=size)


def support_cache(bundle: Bundle) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [N, D] = n(mean over views of the raw support features) and their labels, ordered by label
    (stable), so nothing downstream can depend on the order of the bundle's support rows."""
    keys = F.normalize(bundle.support_features.mean(dim=0), dim=-1)
    order = torch.sort(bundle.support_labels, stable=True).indices
    return keys[order], bundle.support_labels[order]


class CacheMethod(Method):
    """Base of Tip-Adapter and APE (and the trained Tip-Adapter-F, APE-T). Subclasses declare ``search_scale`` and
    ``search_step``, fill ``text_``, ``cache_keys_``, ``key_labels_``, ``channels_`` (or None) and supply the
    per-entry weight candidates of the search."""

    channels_: torch.Tensor | None = None
    search_scale: Sequence[float]
    search_step: Sequence[int]

    def _check_params(self) -> None:
        self._check_search_memory()

    def _check(self, bundle: Bundle) -> None:
        if bundle.has_val:
            rows = int(bundle.val_labels.numel())
            offsets = (
                JOINT_OFFSET_POINTS + 1 if self._calibration_applies(bundle) else 1
            )  # the δ axis of the joint search
            self._check_search_memory(
                val_rows=rows, entries=bundle.num_support, classes=bundle.num_classes, offsets=offsets
            )

    def _check_search_memory(self, **sizes: int) -> None:
        """Refuse a ``search_step`` whose search would not fit in this machine's memory (``sizes``: the data's, see
        :func:`~fewclip.methods.search.search_memory`; without them the grids' part alone)."""
        if self.selection != "val":
            return
        step = [int(s) for s in self.search_step]
        default = type(self).default_params()["search_step"]
        refuse_search_memory(self.name, self.search_step, default, search_memory(step, **sizes), memory_limit())

    def _layout(self) -> ClassLayout:
        """The class layout of the cache keys (a private fitted cache, ``_layout_``)."""
        layout = getattr(self, "_layout_", None)
        if layout is None or layout.labels is not self.key_labels_:
            layout = ClassLayout(self.key_labels_, self.text_.shape[0])
            self._layout_ = layout
        return layout

    def _alpha_scale(self, bundle: Bundle) -> float:
        """1.0, except on a cross-validation fold: N_full/N_fold. The cache term sums over a class's entries, so its
        scale grows with the support count; a fold scores α_j at α_j·N_full/N_fold, the weight α_j has on all
        support (a count-invariant α, as GDA's)."""
        full = self._cv_full_rows
        return float(full) / float(bundle.num_support) if full and bundle.num_support else 1.0

    def _grid(self) -> tuple[list[float], list[int]]:
        """``search_scale`` and ``search_step`` as floats and ints."""
        return [float(s) for s in self.search_scale], [int(s) for s in self.search_step]

    def _cv_values(self, index: tuple[int, ...]) -> dict[str, Any]:
        """β and α at ``index`` of the (β, α, candidate) counts, as the values a fit without search uses."""
        scale, step = self._grid()
        betas, alphas = tip_grid(scale[0], step[0]), tip_grid(scale[1], step[1])
        return {"init_beta": float(betas[index[0]]), "init_alpha": float(alphas[index[1]])}

    def _query(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Z₀ = 100·n(f)Wᵀ [M, C] and the affinity A = n(f_Q)·F_Qᵀ [M, N]."""
        f = F.normalize(features, dim=-1)
        z0 = 100.0 * f @ self.text_.T
        fq = f if self.channels_ is None else F.normalize(f[:, self.channels_], dim=-1)
        return z0, fq @ self.cache_keys_.T

    def _cache_term(self, affinity: torch.Tensor, beta: float, weights: torch.Tensor) -> torch.Tensor:
        layout = self._layout()
        return layout.class_sum(phi(layout.arrange(affinity), beta), layout.arrange_weights(weights[None]))[0]

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        z0, affinity = self._query(features)
        return z0 + self.alpha_ * self._cache_term(affinity, self.beta_, self.entry_weights_)

    def _search(
        self, bundle: Bundle, scale: list[float], step: list[int], weight_candidates: torch.Tensor
    ) -> tuple[int, int, int, torch.Tensor]:
        """Run the (β, α, candidate) grid on the validation split; return the first maximiser and the counts.

        While calibrating (classes without support, see :meth:`Method._calibration_applies`) the grid has a fourth,
        innermost axis, the offset δ subtracted from the seen classes' logits: α and δ are chosen together, since the
        best α without an offset is the one that barely touches the unseen classes' share. The δ candidates are
        ``JOINT_OFFSET_POINTS`` quantiles of the seen-minus-unseen gaps of Z₀ + α·G(β₀) over the whole α grid (β₀
        the first β, the broadest kernel: the largest G), so they span the shifts of every α; each candidate costs
        one more α scan of the grid. Ties: the first in (β, α, candidate, δ) order, δ by increasing |δ|. The chosen
        model's δ is then refined on the full ``OFFSET_POINTS`` grid of its own validation logits (never below the
        joint choice's count: :func:`~fewclip.methods.calibration.refine_offset`). The search runs on the CPU: the
        fitted tensors are moved there first (a trained method trains on the bundle's device)."""
        self._move_fitted_to_cpu()
        bundle, weight_candidates = bundle.to("cpu"), weight_candidates.cpu()
        betas, alphas = tip_grid(scale[0], step[0]), tip_grid(scale[1], step[1]) * self._alpha_scale(bundle)
        z0, affinity = self._query(bundle.val_features)
        chunks = math.ceil(affinity.shape[0] / search_row_chunk(affinity.shape[1]))
        offsets = None
        if getattr(self, "_calibrating_", False):
            g0 = self._cache_term(affinity, float(betas[0]), weight_candidates[0])
            offsets = offset_grid(gaps_along_alpha(z0, g0, alphas, self.seen_classes_), JOINT_OFFSET_POINTS)
        with progress(betas.numel() * chunks, f"{self.name} search", "β", leave=False) as bar:
            counts = cache_search(
                z0, affinity, self._layout(), weight_candidates, bundle.val_labels, betas, alphas, progress=bar,
                offsets=offsets, seen=self.seen_classes_,
            )  # fmt: skip
        if offsets is None:
            i, j, l = first_argmax(counts)
        else:
            i, j, l, t = first_argmax(counts)
            counts = counts[..., t]
            chosen = z0 + alphas[j] * self._cache_term(affinity, float(betas[i]), weight_candidates[l])
            offset, correct, points = refine_offset(chosen, bundle.val_labels, self.seen_classes_, float(offsets[t]))
            self.calibration_offset_ = offset
            self.calibration_search_ = {
                "joint_points": int(offsets.numel()),
                "joint_offset": float(offsets[t]),
                "points": points,
                "best_correct": correct,
            }
        self.beta_, self.alpha_ = float(betas[i]), float(alphas[j])
        self._cv_counts_ = counts  # [β, α, candidate]: what selection="cv" sums over its folds
        self.search_ = {
            "evaluations": int(counts.numel()),
            "val_rows": int(bundle.val_labels.numel()),
            "best_correct": int(counts[i, j, l]),
            "beta_grid": [float(betas[0]), float(betas[-1]), int(betas.numel())],
            "alpha_grid": [float(alphas[0]), float(alphas[-1]), int(alphas.numel())],
        }
        return i, j, l, counts
