"""APE-T (ICCV'23): a learnable per-class residual on Q_T refined channels plus learnable entry weights.

Parameters R [C, Q_T] (zeros) and v [N] (ones), C·Q_T + N in all:

    W̃[i, idx_T] = W[i, idx_T] + R[i]          F̃[k, idx_T] = F[k, idx_T] + R[y_k]     L̃ = diag(v)·L
    Z = 100·n(x)W̃ᵀ + α·exp(−β(1 − n(x)F̃ᵀ))·L̃        (full dimension, no re-normalisation; α, β fixed)

R is shared by a class's text row and all its cache keys, grouped by label (never by row position). The
channels idx_T come from APE's refinement with Q_T = ``channels`` and the weights (w_sim, w_var) =
(0.2, 0.8), by default on the text pool (the published code's stated intent; ``criterion_pool="text+cache"``
is the alternative). Training runs on the cached views; the epoch is chosen on validation, then the α/β
grid of Tip-Adapter runs on validation with the trained R and v.

Training uses an exact factorisation instead of materialising W̃ and F̃ each step. With P = n(x)[idx_T]·Rᵀ
[B, C]: n(x)·W̃_cᵀ = n(x)·W_cᵀ + P_c and n(x)·F̃_kᵀ = n(x)·F_kᵀ + P_{y_k}, so

    Z = 100·(n(x)Wᵀ + P) + α·exp(β·P) ⊙ Σ_{k: y_k = c} φ_β(n(x)F_kᵀ)·v_k

and the [B, N] affinity n(x)Fᵀ carries no gradient.

``selection="cv"`` chooses the epoch, then (β, α) with it fixed, as Tip-Adapter-F does
(:class:`~fewclip.methods.training.SelectsEpoch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..features.bundle import Bundle
from .ape import CHANNELS, CRITERION_WEIGHT, RefinedChannels
from .ape_refine import ape_criterion, select_channels
from .cache import CACHE_WEIGHT, search_scale, search_step, support_cache
from .params import Optional, Options, param
from .registry import register
from .search import ClassLayout, phi, search_row_chunk
from .tip_adapter_f import fixed_after_training, fixed_values
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
    cross_entropy,
    train_adapter,
)

CRITERION_POOLS = ("text", "text+cache")


def ape_t_weights(
    text: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor, channels: torch.Tensor, residual: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """W̃ [C, D] and F̃ [N, D]: the residual R [C, Q] added on ``channels`` to each class's text row and to
    every cache key of that class (by label)."""
    new_text, new_keys = text.clone(), keys.clone()
    new_text[:, channels] += residual
    new_keys[:, channels] += residual[key_labels]
    return new_text, new_keys


def ape_t_logits(
    queries: torch.Tensor,
    text: torch.Tensor,
    keys: torch.Tensor,
    key_labels: torch.Tensor,
    channels: torch.Tensor,
    residual: torch.Tensor,
    value_weights: torch.Tensor,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """The APE-T logits by the formula: materialise W̃, F̃ and L̃ = diag(v)·L (the reference for tests)."""
    new_text, new_keys = ape_t_weights(text, keys, key_labels, channels, residual)
    values = torch.zeros(keys.shape[0], text.shape[0], dtype=queries.dtype, device=queries.device)
    values[torch.arange(keys.shape[0]), key_labels] = value_weights
    return 100.0 * queries @ new_text.T + alpha * phi(queries @ new_keys.T, beta) @ values


def factored_logits(
    z_text: torch.Tensor,
    grouped_phi: torch.Tensor,
    queries_sel: torch.Tensor,
    residual: torch.Tensor,
    values: torch.Tensor,
    layout: ClassLayout,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """APE-T logits from what does not depend on (R, v): z_text = n(x)Wᵀ [B, C], grouped_phi = φ_β(n(x)Fᵀ)
    arranged by class, queries_sel = n(x)[:, idx_T] [B, Q]; ``values`` is v arranged by class."""
    p = queries_sel @ residual.T  # [B, C]
    cache = layout.class_sum(grouped_phi, values)[0]  # [B, C]
    return 100.0 * (z_text + p) + alpha * torch.exp(beta * p) * cache


@register("ape-t")
@dataclass(kw_only=True, repr=False, eq=False)
class APET(SelectsEpoch, RefinedChannels):
    searches_after_training = True

    channels: int | None = param(None, CHANNELS, doc="Q_T, channels the residual acts on (None: 70% of D)")
    channels_reference_dim: int | None = param(
        None, CHANNELS, doc="D for which ``channels`` is given (a preset's RN50 1024): Q_T keeps its fraction of D"
    )
    w_sim: float = param(0.2, CRITERION_WEIGHT, doc="weight of the inter-class similarity S")
    w_var: float = param(0.8, CRITERION_WEIGHT, doc="weight of the inter-class variance V")
    criterion_pool: str = param("text", Options(CRITERION_POOLS), doc="what the channel criterion pools per class")
    init_alpha: float = param(1.0, CACHE_WEIGHT, doc="α during training, and without search")
    init_beta: float = param(1.0, CACHE_WEIGHT, doc="β during training, and without search")
    search_scale: Sequence[float] = param((7.0, 7.0), search_scale(2), doc="upper ends of the β and α grids")
    search_step: Sequence[int] = param((200, 20), search_step(2), doc="points of the β and α grids")
    epochs: int = param(20, EPOCHS, doc="training epochs")
    lr: float = param(1e-3, LEARNING_RATE, doc="AdamW learning rate")
    eps: float = param(1e-3, ADAM_EPS, doc="AdamW eps")
    weight_decay: float = param(0.1, WEIGHT_DECAY, doc="AdamW weight decay")
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
        q = self._channels(bundle)
        text = bundle.text_weights.float()
        keys, key_labels = support_cache(bundle)
        pool = (keys, key_labels) if self.criterion_pool == "text+cache" else (None, None)
        criterion = ape_criterion(text, *pool)
        channels = select_channels(text, criterion, q, float(self.w_sim), float(self.w_var))
        layout = ClassLayout(key_labels, bundle.num_classes)
        alpha, beta = float(self.init_alpha) * self._alpha_scale(bundle), float(self.init_beta)
        residual = torch.zeros(bundle.num_classes, q, device=text.device, requires_grad=True)
        value_weights = torch.ones(keys.shape[0], device=text.device, requires_grad=True)

        def arranged_values() -> torch.Tensor:
            return layout.arrange_weights(value_weights[None])  # [1, C, K_max], zeros on padding

        def constant_parts(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                return queries @ text.T, phi(layout.arrange(queries @ keys.T), beta), queries[:, channels]

        def loss_fn(queries: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            z, g, sel = constant_parts(queries)
            logits = factored_logits(z, g, sel, residual, arranged_values(), layout, alpha, beta)
            return cross_entropy(logits, labels)

        evaluate = None
        if self.selection == "val":
            val = F.normalize(bundle.val_features.float().to(text.device), dim=-1)
            val_labels = bundle.val_labels.to(text.device)
            rows = search_row_chunk(keys.shape[0])
            val_parts = [constant_parts(val[i : i + rows]) for i in range(0, val.shape[0], rows)]

            def evaluate() -> float:
                values = arranged_values()
                logits = [factored_logits(*part, residual, values, layout, alpha, beta) for part in val_parts]
                return self._selection_accuracy(torch.cat(logits), val_labels)

        result = train_adapter(self, {"residual": residual, "value_weights": value_weights}, loss_fn, bundle, evaluate)
        self.channels_train_ = channels
        self.residual_ = result.state["residual"]
        self.value_weights_ = result.state["value_weights"]
        self.text_, self.cache_keys_ = ape_t_weights(text, keys, key_labels, channels, result.state["residual"])
        self.key_labels_ = key_labels
        self.entry_weights_ = self.value_weights_
        self.best_epoch_ = result.best_epoch
        self.history_ = result.history
        self.trained_parameters_ = int(residual.numel() + value_weights.numel())
        final_alpha, self.beta_ = fixed_after_training(self)
        self.alpha_ = final_alpha * self._alpha_scale(bundle)
        if evaluate is not None:
            self.record_epochs(result, bundle.val_labels.numel())
            if not self._cv_epochs_only:
                self._search(bundle, scale, step, self.entry_weights_[None])
        return {
            "alpha": self.alpha_,
            "beta": self.beta_,
            "epoch": self.best_epoch_,
            "channels_used": q,
            "channels_requested": self.channels,
        }

    def _cv_values(self, index: tuple[int, ...]) -> dict[str, Any]:
        return fixed_values(super()._cv_values(index))
