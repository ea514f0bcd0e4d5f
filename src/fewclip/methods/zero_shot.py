"""Zero-shot CLIP: logits = 100 · n(x) · Wᵀ. Nothing is learned or selected."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..features.bundle import Bundle
from .base import Method
from .registry import register


@register("zero-shot")
@dataclass(kw_only=True, repr=False, eq=False)
class ZeroShot(Method):
    selects_on_validation = False

    def _fit(self, bundle: Bundle) -> dict[str, Any]:
        self.text_ = bundle.text_weights.clone()
        return {}

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        return 100.0 * F.normalize(features, dim=-1) @ self.text_.T
