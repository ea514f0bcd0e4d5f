"""Tip-Adapter (training-free): Z = 100·n(x)Wᵀ + α·exp(−β(1 − n(x)Kᵀ))·L, α and β chosen on validation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..features.bundle import Bundle
from .cache import CacheMethod, check_grid, support_cache
from .registry import register


@register("tip-adapter")
class TipAdapter(CacheMethod):
    """Hyperparameters use the published code's names: α is the residual ratio, β the sharpness.

    The default grid is β, α ∈ {0.1 + i·(7 − 0.1)/n} with (n_β, n_α) = (200, 20); presets carry the
    per-dataset ranges of the published configs.
    """

    def __init__(
        self,
        *,
        init_alpha: float = 1.0,
        init_beta: float = 1.0,
        search_scale: Sequence[float] = (7.0, 7.0),
        search_step: Sequence[int] = (200, 20),
        selection: str = "val",
        preset: str | None = None,
    ):
        self.init_alpha = init_alpha
        self.init_beta = init_beta
        self.search_scale = search_scale
        self.search_step = search_step
        self.selection = selection
        self.preset = preset

    def _fit(self, bundle: Bundle) -> None:
        scale, step = check_grid(self.name, self.search_scale, self.search_step, 2)
        self.text_ = bundle.text_weights.clone()
        self.cache_keys_, self.key_labels_ = support_cache(bundle)
        self.entry_weights_ = torch.ones(self.key_labels_.numel())
        self.alpha_, self.beta_ = float(self.init_alpha), float(self.init_beta)
        if self.selection == "val":
            self._search(bundle, scale, step, self.entry_weights_[None])
        self._finish(bundle, {"alpha": self.alpha_, "beta": self.beta_})
