"""Tip-Adapter-F: Tip-Adapter whose cache keys are learned, trained from the bundle's cached views.

    Z = 100·n(x)Wᵀ + α·exp(−β(1 − n(x)F_θᵀ))·L,   F_θ initialised at the Tip-Adapter keys

α = ``init_alpha`` and β = ``init_beta`` stay fixed during training; F_θ is not re-normalised (as published).
Cross-entropy, AdamW (lr 1e-3, eps 1e-4, weight decay 0.01), cosine schedule per iteration, batch 256,
20 epochs. The epoch is chosen on validation at the initial (α, β), then Tip-Adapter's α/β grid runs on
validation with the trained keys. Parameters: N·D (the number of cache entries times the dimension).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..features.bundle import Bundle
from ..metrics import accuracy
from .base import l2n
from .cache import CacheMethod, check_grid, support_cache
from .registry import register
from .search import ClassLayout, phi
from .training import check_adapter_settings, cross_entropy, train_adapter


def cache_logits(
    queries: torch.Tensor, text: torch.Tensor, keys: torch.Tensor, layout: ClassLayout, alpha: float, beta: float
) -> torch.Tensor:
    """100·qWᵀ + α·φ_β(qKᵀ)·L for normalised queries [B, D] (differentiable in ``keys``)."""
    affinity = layout.arrange(queries @ keys.T)
    ones = layout.arrange_weights(torch.ones(1, keys.shape[0], device=keys.device))
    return 100.0 * queries @ text.T + alpha * layout.class_sum(phi(affinity, beta), ones)[0]


@register("tip-adapter-f")
class TipAdapterF(CacheMethod):
    def __init__(
        self,
        *,
        init_alpha: float = 1.0,
        init_beta: float = 1.0,
        search_scale: Sequence[float] = (7.0, 7.0),
        search_step: Sequence[int] = (200, 20),
        epochs: int = 20,
        lr: float = 1e-3,
        eps: float = 1e-4,
        weight_decay: float = 0.01,
        batch_size: int = 256,
        seed: int = 1,
        selection: str = "val",
        preset: str | None = None,
    ):
        self.init_alpha = init_alpha
        self.init_beta = init_beta
        self.search_scale = search_scale
        self.search_step = search_step
        self.epochs = epochs
        self.lr = lr
        self.eps = eps
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.seed = seed
        self.selection = selection
        self.preset = preset

    def _fit(self, bundle: Bundle) -> None:
        scale, step = check_grid(self.name, self.search_scale, self.search_step, 2)
        check_adapter_settings(self)
        device = bundle.support_features.device
        text = bundle.text_weights.float()
        init_keys, key_labels = support_cache(bundle)
        layout = ClassLayout(key_labels, bundle.num_classes)
        alpha, beta = float(self.init_alpha), float(self.init_beta)
        keys = init_keys.float().clone().requires_grad_(True)

        def loss_fn(queries: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return cross_entropy(cache_logits(queries, text, keys, layout, alpha, beta), labels)

        evaluate = None
        if self.selection == "val":
            val = l2n(bundle.val_features.float().to(device))
            val_labels = bundle.val_labels.to(device)

            def evaluate() -> float:
                parts = [
                    cache_logits(val[i : i + 4096], text, keys, layout, alpha, beta)
                    for i in range(0, val.shape[0], 4096)
                ]
                return accuracy(torch.cat(parts), val_labels)

        result = train_adapter(self, {"keys": keys}, loss_fn, bundle, evaluate)
        self.text_ = text.cpu().clone()
        self.cache_keys_ = result.state["keys"].cpu()
        self.key_labels_ = key_labels.cpu()
        self.entry_weights_ = torch.ones(self.key_labels_.numel())
        self.best_epoch_ = result.best_epoch
        self.history_ = result.history
        self.trained_parameters_ = int(keys.numel())
        self.alpha_, self.beta_ = alpha, beta
        if self.selection == "val":
            self._search(bundle.to("cpu"), scale, step, self.entry_weights_[None])
        self._finish(bundle.to("cpu"), {"alpha": self.alpha_, "beta": self.beta_, "epoch": self.best_epoch_})
