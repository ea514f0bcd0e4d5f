"""Tip-Adapter-F: Tip-Adapter whose cache keys are learned, trained from the bundle's cached views.

    Z = 100·n(x)Wᵀ + α·exp(−β(1 − n(x)F_θᵀ))·L,   F_θ initialised at the Tip-Adapter keys

α = ``init_alpha`` and β = ``init_beta`` stay fixed during training; F_θ is not re-normalised (as published).
Cross-entropy, AdamW (lr 1e-3, eps 1e-4, weight decay 0.01), cosine schedule per iteration, batch 256,
20 epochs. The epoch is chosen on validation at the initial (α, β), then Tip-Adapter's α/β grid runs on
validation with the trained keys. Parameters: N·D (the number of cache entries times the dimension).

``selection="cv"`` (:class:`~fewclip.methods.training.SelectsEpoch`): the epoch by the folds' summed per-epoch
counts at the initial (α, β), then (β, α) by the folds' summed grid counts with that epoch fixed; the final fit
trains on all support to that epoch (``stop_epoch``) and predicts with the chosen ``final_alpha``, ``final_beta``.
On a fold, α (in training and in the grid) is scaled by N_full/N_fold (the cache term sums over the entries) and an
epoch draws N_full rows, so that an epoch and an α mean there what they mean for the final fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..features.bundle import Bundle
from .cache import CACHE_WEIGHT, CacheMethod, search_scale, search_step, support_cache
from .params import Optional, param
from .registry import register
from .search import ClassLayout, phi
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


def cache_logits(
    queries: torch.Tensor, text: torch.Tensor, keys: torch.Tensor, layout: ClassLayout, alpha: float, beta: float
) -> torch.Tensor:
    """100·qWᵀ + α·φ_β(qKᵀ)·L for normalised queries [B, D] (differentiable in ``keys``)."""
    affinity = layout.arrange(queries @ keys.T)
    ones = layout.arrange_weights(torch.ones(1, keys.shape[0], device=keys.device))
    return 100.0 * queries @ text.T + alpha * layout.class_sum(phi(affinity, beta), ones)[0]


@register("tip-adapter-f")
@dataclass(kw_only=True, repr=False, eq=False)
class TipAdapterF(SelectsEpoch, CacheMethod):
    searches_after_training = True

    init_alpha: float = param(1.0, CACHE_WEIGHT, doc="α during training, and without search")
    init_beta: float = param(1.0, CACHE_WEIGHT, doc="β during training, and without search")
    search_scale: Sequence[float] = param((7.0, 7.0), search_scale(2), doc="upper ends of the β and α grids")
    search_step: Sequence[int] = param((200, 20), search_step(2), doc="points of the β and α grids")
    epochs: int = param(20, EPOCHS, doc="training epochs")
    lr: float = param(1e-3, LEARNING_RATE, doc="AdamW learning rate")
    eps: float = param(1e-4, ADAM_EPS, doc="AdamW eps")
    weight_decay: float = param(0.01, WEIGHT_DECAY, doc="AdamW weight decay")
    batch_size: int = param(256, BATCH_SIZE, doc="training batch size")
    seed: int = param(1, SEED, doc="seed of the view draws and batch order")
    stop_epoch: int | None = param(None, STOP_EPOCH, doc=STOP_EPOCH_DOC)
    final_alpha: float | None = param(
        None, Optional(CACHE_WEIGHT), doc="α of the predictions when not searched (what cv chose); None: init_alpha"
    )
    final_beta: float | None = param(
        None, Optional(CACHE_WEIGHT), doc="β of the predictions when not searched (what cv chose); None: init_beta"
    )

    def _fit(self, bundle: Bundle) -> dict[str, Any]:
        scale, step = self._grid()
        device = bundle.support_features.device
        text = bundle.text_weights.float()
        init_keys, key_labels = support_cache(bundle)
        layout = ClassLayout(key_labels, bundle.num_classes)
        alpha, beta = float(self.init_alpha) * self._alpha_scale(bundle), float(self.init_beta)
        keys = init_keys.float().clone().requires_grad_(True)

        def loss_fn(queries: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return cross_entropy(cache_logits(queries, text, keys, layout, alpha, beta), labels)

        evaluate = None
        if self.selection == "val":
            val = F.normalize(bundle.val_features.float().to(device), dim=-1)
            val_labels = bundle.val_labels.to(device)

            def evaluate() -> float:
                logits = chunked(lambda rows: cache_logits(rows, text, keys, layout, alpha, beta), val)
                return self._selection_accuracy(logits, val_labels)

        result = train_adapter(self, {"keys": keys}, loss_fn, bundle, evaluate)
        self.text_ = text.clone()
        self.cache_keys_ = result.state["keys"]
        self.key_labels_ = key_labels
        self.entry_weights_ = torch.ones(self.key_labels_.numel())
        self.best_epoch_ = result.best_epoch
        self.history_ = result.history
        self.trained_parameters_ = int(keys.numel())
        final_alpha, final_beta = fixed_after_training(self)
        self.alpha_, self.beta_ = final_alpha * self._alpha_scale(bundle), final_beta
        if evaluate is not None:
            self.record_epochs(result, bundle.val_labels.numel())
            if not self._cv_epochs_only:
                self._search(bundle, scale, step, self.entry_weights_[None])
        return {"alpha": self.alpha_, "beta": self.beta_, "epoch": self.best_epoch_}

    def _cv_values(self, index: tuple[int, ...]) -> dict[str, Any]:
        return fixed_values(super()._cv_values(index))


def fixed_after_training(method: Any) -> tuple[float, float]:
    """(α, β) of the predictions without search: ``final_alpha``/``final_beta``, else the training values."""
    alpha = method.init_alpha if method.final_alpha is None else method.final_alpha
    beta = method.init_beta if method.final_beta is None else method.final_beta
    return float(alpha), float(beta)


def fixed_values(values: dict[str, Any]) -> dict[str, Any]:
    """A cache grid point (``init_beta``, ``init_alpha``, ...) as the values a trained cache method predicts with
    after training (``final_beta``, ``final_alpha``): its training (α, β) stay the initial ones."""
    renamed = {"init_alpha": "final_alpha", "init_beta": "final_beta"}
    return {renamed.get(k, k): v for k, v in values.items()}
