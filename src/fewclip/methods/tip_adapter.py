"""Tip-Adapter (training-free): Z = 100·n(x)Wᵀ + α·exp(−β(1 − n(x)Kᵀ))·L, α and β chosen on validation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..features.bundle import Bundle
from .cache import CACHE_WEIGHT, CacheMethod, search_scale, search_step, support_cache
from .params import param
from .registry import register


@register("tip-adapter")
@dataclass(kw_only=True, repr=False, eq=False)
class TipAdapter(CacheMethod):
    """Hyperparameters use the published code's names: α is the residual ratio, β the sharpness.

    The default grid is β, α ∈ {0.1 + i·(7 − 0.1)/n} with (n_β, n_α) = (200, 20); presets carry the
    per-dataset ranges of the published configs.
    """

    cross_validates = True

    init_alpha: float = param(1.0, CACHE_WEIGHT, doc="α without search (selection 'none')")
    init_beta: float = param(1.0, CACHE_WEIGHT, doc="β without search (selection 'none')")
    search_scale: Sequence[float] = param((7.0, 7.0), search_scale(2), doc="upper ends of the β and α grids")
    search_step: Sequence[int] = param((200, 20), search_step(2), doc="points of the β and α grids")

    def _fit(self, bundle: Bundle) -> dict[str, Any]:
        scale, step = self._grid()
        self.text_ = bundle.text_weights.clone()
        self.cache_keys_, self.key_labels_ = support_cache(bundle)
        self.entry_weights_ = torch.ones(self.key_labels_.numel())
        self.alpha_, self.beta_ = float(self.init_alpha) * self._alpha_scale(bundle), float(self.init_beta)
        if self.selection == "val":
            self._search(bundle, scale, step, self.entry_weights_[None])
        return {"alpha": self.alpha_, "beta": self.beta_}
