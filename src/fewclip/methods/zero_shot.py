"""Zero-shot CLIP: logits = 100 · n(x) · Wᵀ. Nothing is learned or selected."""

from __future__ import annotations

import torch

from ..features.bundle import Bundle
from .base import Method, l2n
from .registry import register


@register("zero-shot")
class ZeroShot(Method):
    selects = False

    def __init__(self, *, selection: str = "val", preset: str | None = None):
        self.selection = selection
        self.preset = preset

    def _fit(self, bundle: Bundle) -> None:
        self.text_ = bundle.text_weights.clone()
        self.selected_ = {}
        self.val_accuracy_ = self.score(bundle.val_features, bundle.val_labels) if bundle.has_val else None

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        return 100.0 * l2n(features) @ self.text_.T
