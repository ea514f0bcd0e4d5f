"""CLIP-Adapter (Gao et al., IJCV 2024): a residual bottleneck MLP on the image features.

    a(x) = ReLU(ReLU(x·W₁)·W₂),  W₁ [D, D/r], W₂ [D/r, D] (no biases, reduction r = 4), x = n(image feature)
    x′ = ρ·a(x) + (1 − ρ)·x,     Z = 100·n(x′)·Wᵀ

The residual ratio ρ is chosen on validation: one adapter per candidate ratio is trained side by side
(parameters stacked on a leading dimension, one batched computation, the same initial weights for every
ratio), each keeps its best epoch, and the ratio with the best validation accuracy wins (ties: the first
in ``ratios``). With selection ``none`` only ``init_ratio`` is trained and the last epoch is kept.

The published code feeds raw features and trains on images with SGD for 200 epochs; fewclip feeds
L2-normalised features (so one learning rate suits every backbone) and, on cached views, uses AdamW
(lr 1e-3, weight decay 0.01), a cosine schedule, batch 256 and 50 epochs by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..features.bundle import Bundle
from ..metrics import accuracy
from .base import Method, MethodError, l2n
from .registry import register
from .training import check_adapter_settings, cross_entropy, train_adapter


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
    return 100.0 * l2n(adapter_features(x, w1, w2, ratios)) @ text.T


@register("clip-adapter")
class CLIPAdapter(Method):
    def __init__(
        self,
        *,
        reduction: int = 4,
        ratios: Sequence[float] = (0.2, 0.4, 0.6, 0.8),
        init_ratio: float = 0.2,
        epochs: int = 50,
        lr: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        batch_size: int = 256,
        seed: int = 1,
        selection: str = "val",
    ):
        self.reduction = reduction
        self.ratios = ratios
        self.init_ratio = init_ratio
        self.epochs = epochs
        self.lr = lr
        self.eps = eps
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.seed = seed
        self.selection = selection

    def _check(self, dim: int) -> list[float]:
        check_adapter_settings(self)
        if isinstance(self.reduction, bool) or not isinstance(self.reduction, int) or not 1 <= self.reduction <= dim:
            raise MethodError(f"{self.name}: reduction={self.reduction!r} must be an integer in [1, D = {dim}].")
        ratios = list(self.ratios) if self.selection == "val" else [self.init_ratio]
        if not ratios or any(isinstance(r, bool) or not isinstance(r, int | float) or not 0 <= r <= 1 for r in ratios):
            key = "ratios" if self.selection == "val" else "init_ratio"
            raise MethodError(f"{self.name}: {key}={getattr(self, key)!r} must hold numbers in [0, 1].")
        return [float(r) for r in ratios]

    def _fit(self, bundle: Bundle) -> None:
        ratios_list = self._check(bundle.dim)
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
            val = l2n(bundle.val_features.float().to(device))
            val_labels = bundle.val_labels.to(device)

            def evaluate() -> torch.Tensor:
                logits = torch.cat([adapter_logits(val[i : i + 4096], text, w1, w2, ratios) for i in
                                    range(0, val.shape[0], 4096)], dim=1)  # fmt: skip
                return torch.tensor([accuracy(logits[r], val_labels) for r in range(num)])

        result = train_adapter(self, {"w1": w1, "w2": w2}, loss_fn, bundle, evaluate)
        best = 0
        if result.best_accuracies is not None:
            best = max(range(num), key=lambda r: (result.best_accuracies[r], -r))
        self.text_ = text.cpu().clone()
        self.w1_ = result.state["w1"][best].cpu()
        self.w2_ = result.state["w2"][best].cpu()
        self.ratio_ = ratios_list[best]
        self.best_epoch_ = result.best_epochs[best]
        self.history_ = result.history
        self.trained_parameters_ = int(self.w1_.numel() + self.w2_.numel())
        self.selected_ = {"ratio": self.ratio_, "epoch": self.best_epoch_}
        self.val_accuracy_ = self.score(bundle.val_features.cpu(), bundle.val_labels.cpu()) if bundle.has_val else None

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        ratio = torch.tensor([self.ratio_])
        return adapter_logits(l2n(features), self.text_, self.w1_[None], self.w2_[None], ratio)[0]
