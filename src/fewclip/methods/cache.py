"""What Tip-Adapter and APE share: the support cache, its logits and the (β, α[, γ]) grid search.

    Z = 100 · n(f) Wᵀ + α · Σ_{k: y_k = c} exp(−β(1 − n(f_Q)·F_Q,kᵀ)) · r_k

Tip-Adapter: all channels (Q = D), r = 1. APE: Q refined channels, r = exp(γ·d_k).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from ..features.bundle import Bundle
from .base import Method, MethodError, l2n
from .search import ClassLayout, cache_search, first_argmax, phi, search_row_chunk, tip_grid


def support_cache(bundle: Bundle) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [N, D] = n(mean over views of the raw support features) and their labels, ordered by label
    (stable), so nothing downstream can depend on the order of the bundle's support rows."""
    keys = l2n(bundle.support_features.mean(dim=0))
    order = torch.sort(bundle.support_labels, stable=True).indices
    return keys[order], bundle.support_labels[order]


def check_grid(name: str, scale: Any, step: Any, size: int) -> tuple[list[float], list[int]]:
    if not isinstance(scale, list | tuple) or len(scale) != size:
        raise MethodError(f"{name}: search_scale={scale!r} must list {size} numbers.")
    if not isinstance(step, list | tuple) or len(step) != size:
        raise MethodError(f"{name}: search_step={step!r} must list {size} integers.")
    if any(int(s) < 1 or int(s) != s for s in step):
        raise MethodError(f"{name}: search_step={list(step)} must hold positive integers.")
    if any(not math.isfinite(float(s)) for s in scale):
        raise MethodError(f"{name}: search_scale={list(scale)} must hold finite numbers.")
    return [float(s) for s in scale], [int(s) for s in step]


class CacheMethod(Method):
    """Base of Tip-Adapter and APE. Subclasses fill ``text_``, ``cache_keys_``, ``key_labels_``,
    ``channels_`` (or None) and supply the per-entry weight candidates of the search."""

    channels_: torch.Tensor | None = None

    def _layout(self) -> ClassLayout:
        layout = getattr(self, "_layout_cache", None)
        if layout is None or layout.labels is not self.key_labels_:
            layout = ClassLayout(self.key_labels_, self.num_classes_)
            self._layout_cache = layout
        return layout

    def _query(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Z₀ = 100·n(f)Wᵀ [M, C] and the affinity A = n(f_Q)·F_Qᵀ [M, N]."""
        f = l2n(features)
        z0 = 100.0 * f @ self.text_.T
        fq = f if self.channels_ is None else l2n(f[:, self.channels_])
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
        """Run the (β, α, candidate) grid on the validation split; return the first maximiser and the counts."""
        betas, alphas = tip_grid(scale[0], step[0]), tip_grid(scale[1], step[1])
        z0, affinity = self._query(bundle.val_features)
        chunks = math.ceil(affinity.shape[0] / search_row_chunk(affinity.shape[1]))
        with tqdm(total=betas.numel() * chunks, desc=f"{self.name} search", unit="β", leave=False, disable=None) as bar:
            counts = cache_search(
                z0, affinity, self._layout(), weight_candidates, bundle.val_labels, betas, alphas, progress=bar
            )
        i, j, l = first_argmax(counts)
        self.beta_, self.alpha_ = float(betas[i]), float(alphas[j])
        self.search_ = {
            "evaluations": int(counts.numel()),
            "val_rows": int(bundle.val_labels.numel()),
            "best_correct": int(counts[i, j, l]),
            "beta_grid": [float(betas[0]), float(betas[-1]), int(betas.numel())],
            "alpha_grid": [float(alphas[0]), float(alphas[-1]), int(alphas.numel())],
        }
        return i, j, l, counts

    def _finish(self, bundle: Bundle, selected: dict[str, Any]) -> None:
        self.selected_ = selected
        self.val_accuracy_ = self.score(bundle.val_features, bundle.val_labels) if bundle.has_val else None
