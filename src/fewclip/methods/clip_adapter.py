"""CLIP-Adapter (Gao et al., IJCV 2024): a residual bottleneck MLP on the image features.

    a(x) = ReLU(ReLU(x·W₁)·W₂),  W₁ [D, D/r], W₂ [D/r, D] (no biases, reduction r = 4), x = n(image feature)
    x′ = ρ·a(x) + (1 − ρ)·x,     Z = 100·n(x′)·Wᵀ

The residual ratio ρ is chosen on validation: one adapter per candidate ratio is trained side by side
(parameters stacked on a leading dimension, one batched computation, the same initial weights for every
ratio), each keeps its best epoch, and the ratio with the best validation accuracy wins (ties: the first
in ``ratios``). With selection ``none`` only ``init_ratio`` is trained and the last epoch is kept. With selection
``cv`` each fold trains every ratio side by side and the (ratio, epoch) with the most summed correct counts wins
(:class:`~fewclip.methods.training.SelectsEpoch`); all support then trains that ratio to that epoch.

The published code feeds raw features and trains on images with SGD for 200 epochs; fewclip feeds
L2-normalised features (so one learning rate suits every backbone) and, on cached views, uses AdamW
(lr 1e-3, weight decay 0.01), a cosine schedule, batch 256 and 50 epochs by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import MethodError
from ..features.bundle import Bundle
from .base import Method
from .params import Integral, Interval, Real, SequenceOf, param
from .registry import register
from .training import (
    ADAM_EPS,
    BATCH_SIZE,
    EPOCHS,
    LEARNING_RATE,
    SEED,
    STOP_EPOCH,
    STOP_EPOCH_DOC,
    WEIGHT_DECAY,
    SelectsEpoch,
    chunked,
    cross_entropy,
    train_adapter,
)

#: the residual ratio ρ
RATIO = Interval(Real, 0, 1, closed="both")


def adapter_features(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """x′ = ρ·ReLU(ReLU(x·W₁)·W₂) + (1 − ρ)·x for R adapters at once: x [B, D], W₁ [R, D, H], W₂ [R, H, D],
    ρ [R] → [R, B, D]."""
    hidden = torch.relu(torch.einsum("bd,rdh->rbh", x, w1))
    adapted = torch.relu(torch.bmm(hidden, w2))
    return ratios[:, None, None] * adapted + (1.0 - ratios[:, None, None]) * x[None]


def adapter_logits(
    x: torch.Tensor, text: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ratios: torch.Tensor
) -> torch.Tensor:
    """Z = 100·n(x′)Wᵀ for R adapters: [R, B, C]."""
    return 100.0 * F.normalize(adapter_features(x, w1, w2, ratios), dim=-1) @ text.T


@register("clip-adapter")
@dataclass(kw_only=True, repr=False, eq=False)
class CLIPAdapter(SelectsEpoch, Method):
    reduction: int = param(4, Interval(Integral, 1, None, closed="left"), doc="r: the hidden width is D // r")
    ratios: Sequence[float] = param((0.2, 0.4, 0.6, 0.8), SequenceOf(RATIO), doc="ρ candidates (selection 'val')")
    init_ratio: float = param(0.2, RATIO, doc="ρ without selection")
    epochs: int = param(50, EPOCHS, doc="training epochs")
    lr: float = param(1e-3, LEARNING_RATE, doc="AdamW learning rate")
    eps: float = param(1e-8, ADAM_EPS, doc="AdamW eps")
    weight_decay: float = param(0.01, WEIGHT_DECAY, doc="AdamW weight decay")
    batch_size: int = param(256, BATCH_SIZE, doc="training batch size")
    seed: int = param(1, SEED, doc="seed of the initial weights, view draws and batch order")
    stop_epoch: int | None = param(None, STOP_EPOCH, doc=STOP_EPOCH_DOC)

    def _ratios(self) -> list[float]:
        """The ratios trained: every candidate under selection 'val', else ``init_ratio``."""
        return [float(r) for r in self.ratios] if self.selection == "val" else [float(self.init_ratio)]

    def check_dim(self, dim: int) -> None:
        if self.reduction > dim:
            raise MethodError(
                f"{self.name}: reduction={self.reduction!r} is not valid; expected a positive integer ≤ D = {dim}."
            )

    def _check_params(self) -> None:
        if self.selection == "val" and not self.ratios:
            raise MethodError(
                f"{self.name}: ratios={self.ratios!r} is not valid under selection='val'; expected a non-empty list "
                "of ratios in [0, 1]."
            )

    def _fit(self, bundle: Bundle) -> dict[str, Any]:
        ratios_list = self._ratios()
        device = bundle.support_features.device
        text = bundle.text_weights.float()
        dim, hidden = bundle.dim, max(1, bundle.dim // int(self.reduction))
        num = len(ratios_list)
        ratios = torch.tensor(ratios_list, device=device)
        # nn.Linear's default initialisation, U(−1/√fan_in, 1/√fan_in), drawn once and shared by every ratio
        g = torch.Generator().manual_seed(int(self.seed))
        w1 = (torch.rand(dim, hidden, generator=g) * 2 - 1) / math.sqrt(dim)
        w2 = (torch.rand(hidden, dim, generator=g) * 2 - 1) / math.sqrt(hidden)
        w1 = w1.to(device).expand(num, -1, -1).clone().requires_grad_(True)
        w2 = w2.to(device).expand(num, -1, -1).clone().requires_grad_(True)

        def loss_fn(queries: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            logits = adapter_logits(queries, text, w1, w2, ratios)  # [R, B, C]
            # the sum over adapters of their batch-mean losses: each adapter gets its own gradient
            return cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.repeat(num)) * num

        evaluate = None
        if self.selection == "val":
            val = F.normalize(bundle.val_features.float().to(device), dim=-1)
            val_labels = bundle.val_labels.to(device)

            def evaluate() -> torch.Tensor:
                logits = chunked(lambda rows: adapter_logits(rows, text, w1, w2, ratios), val, dim=1)  # [R, M, C]
                return torch.tensor([self._selection_accuracy(logits[r], val_labels) for r in range(num)])

        result = train_adapter(self, {"w1": w1, "w2": w2}, loss_fn, bundle, evaluate)
        if evaluate is not None:
            self.record_epochs(result, bundle.val_labels.numel())
        best = 0
        if result.best_accuracies is not None:
            best = max(range(num), key=lambda r: (result.best_accuracies[r], -r))
        self.text_ = text.clone()
        self.w1_ = result.state["w1"][best]
        self.w2_ = result.state["w2"][best]
        self.ratio_ = ratios_list[best]
        self.best_epoch_ = result.best_epochs[best]
        self.history_ = result.history
        self.trained_parameters_ = int(self.w1_.numel() + self.w2_.numel())
        return {"ratio": self.ratio_, "epoch": self.best_epoch_}

    def _cv_epoch_values(self, candidate: int, epoch: int) -> dict[str, Any]:
        return {"init_ratio": float(self.ratios[candidate]), "stop_epoch": epoch + 1}

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        ratio = torch.tensor([self.ratio_])
        return adapter_logits(F.normalize(features, dim=-1), self.text_, self.w1_[None], self.w2_[None], ratio)[0]
