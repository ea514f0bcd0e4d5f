"""Training on cached augmented views: what Tip-Adapter-F, APE-T and CLIP-Adapter share.

The published code re-encodes every augmented support image through CLIP at every step. The bundle
already holds V augmented views of each support image, so an epoch draws, for every support image, one of
its V views (uniformly, from the run's seeded generator) and trains on those normalised features. CLIP is
never run, and an epoch costs a few matrix products.

Epoch selection is honest: after every epoch the method's validation accuracy (at its initial α, β) is
recorded; the best epoch wins, ties to the earliest. Without validation (selection ``none``) the last epoch
is used. Test data never reaches this module (``fit`` only sees a bundle without it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .base import MethodError, l2n


def check_training_params(name: str, **values: Any) -> None:
    """Validate the training hyperparameters that are present: epochs and batch_size positive integers,
    lr and eps positive finite numbers, weight_decay a finite number ≥ 0."""
    for key in ("epochs", "batch_size"):
        if key in values:
            v = values[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or int(v) != v or int(v) < 1:
                raise MethodError(f"{name}: {key}={v!r} must be a positive integer.")
    for key in ("lr", "eps"):
        if key in values:
            v = values[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise MethodError(f"{name}: {key}={v!r} must be a positive number.")
    if "weight_decay" in values:
        v = values["weight_decay"]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise MethodError(f"{name}: weight_decay={v!r} must be a number >= 0.")


def canonical_order(support_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A permutation of the N support rows that depends on their content, not on their position.

    Rows are sorted by label, then by a fixed projection of their first view (float64), so that a shuffled
    copy of a bundle draws the same views in the same batches and trains to the same weights.
    """
    probe = torch.linspace(-1.0, 1.0, support_features.shape[-1], dtype=torch.float64, device=labels.device)
    key = (support_features[0].double() * probe).sum(1)
    order = torch.sort(key, stable=True).indices
    return order[torch.sort(labels[order], stable=True).indices]


def draw_views(support_features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One view per support image: [V, N, D] → normalised float32 [N, D], view indices drawn uniformly."""
    num_views, num = support_features.shape[:2]
    views = torch.randint(num_views, (num,), generator=generator).to(support_features.device)
    rows = torch.arange(num, device=support_features.device)
    return l2n(support_features[views, rows].float())


def adamw(params: list[torch.Tensor], **kw: float) -> torch.optim.Optimizer:
    """AdamW, with the fused kernel where the device has one (an order of magnitude faster on CPU for the
    16M keys of Tip-Adapter-F on ImageNet); the same update rule either way."""
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # pragma: no cover - devices without a fused kernel
        return torch.optim.AdamW(params, **kw)


@dataclass
class TrainResult:
    """What :func:`train_on_views` returns: the chosen state and the per-epoch record.

    With one candidate ``best_epochs`` has one entry; with a batch of R candidates trained side by side
    (parameters stacked on dim 0, ``evaluate`` returning R accuracies) each candidate has its own epoch.
    """

    state: dict[str, torch.Tensor]
    best_epochs: list[int]  # 1-based
    best_accuracies: list[float] | None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_epoch(self) -> int:
        return self.best_epochs[0]


def train_on_views(
    params: Mapping[str, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    support_features: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    eps: float,
    weight_decay: float,
    seed: int,
    evaluate: Callable[[], float | torch.Tensor] | None = None,
    desc: str = "train",
) -> TrainResult:
    """AdamW with a cosine schedule stepped every iteration (T_max = epochs × iterations), shuffled batches.

    ``params`` are leaf tensors with ``requires_grad``; ``loss_fn(queries [B, D], labels [B])`` returns the
    loss. ``evaluate()`` returns the validation accuracy after an epoch, or R accuracies when R candidates
    are trained at once (every parameter then has R rows on dim 0, and each candidate keeps its own best
    epoch); None keeps the last epoch. The best epoch is the first with the highest accuracy. Deterministic
    on CPU for a given seed: view draws and batch order come from one generator seeded with ``seed``.
    """
    epochs, batch_size = int(epochs), int(batch_size)
    num = labels.numel()
    iters = math.ceil(num / batch_size)
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = adamw(list(params.values()), lr=float(lr), eps=float(eps), weight_decay=float(weight_decay))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * iters)
    best_acc: torch.Tensor | None = None
    best_epochs: list[int] = [epochs]
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = []
    with tqdm(range(1, epochs + 1), desc=desc, unit="epoch", leave=False, disable=None) as bar:
        for epoch in bar:
            queries = draw_views(support_features, generator)
            order = torch.randperm(num, generator=generator).to(labels.device)
            total = 0.0
            for start in range(0, num, batch_size):
                batch = order[start : start + batch_size]
                loss = loss_fn(queries[batch], labels[batch])
                if not torch.isfinite(loss):
                    raise MethodError(
                        f"{desc}: the training loss became {float(loss)} at epoch {epoch}; lower lr (now {lr})."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * batch.numel()
            record: dict[str, Any] = {"epoch": epoch, "loss": total / num, "val_accuracy": None}
            postfix = {"loss": f"{record['loss']:.4f}"}
            if evaluate is not None:
                with torch.no_grad():
                    acc = torch.as_tensor(evaluate(), dtype=torch.float64).reshape(-1).cpu()
                record["val_accuracy"] = float(acc[0]) if acc.numel() == 1 else acc.tolist()
                postfix["val"] = f"{float(acc.max()):.2f}"
                if best_acc is None:
                    best_acc = acc.clone()
                    best_epochs = [epoch] * acc.numel()
                    best_state = {k: v.detach().clone() for k, v in params.items()}
                else:
                    improved = acc > best_acc
                    for r in improved.nonzero().flatten().tolist():
                        best_epochs[r] = epoch
                        for k, v in params.items():
                            if acc.numel() == 1:
                                best_state[k] = v.detach().clone()
                            else:
                                best_state[k][r] = v.detach()[r]
                    best_acc = torch.where(improved, acc, best_acc)
            history.append(record)
            bar.set_postfix(postfix)
    if best_state is None:
        best_state = {k: v.detach().clone() for k, v in params.items()}
    return TrainResult(
        state=best_state,
        best_epochs=best_epochs,
        best_accuracies=None if best_acc is None else best_acc.tolist(),
        history=history,
    )


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Batch-mean cross-entropy (the published losses; APE-T's SmoothCrossEntropy has smoothing 0)."""
    return F.cross_entropy(logits, labels)


ADAMW_SETTINGS = ("epochs", "batch_size", "lr", "eps", "weight_decay")


def check_adapter_settings(method: Any) -> None:
    """:func:`check_training_params` on an estimator's AdamW settings (epochs, batch_size, lr, eps, weight_decay)."""
    check_training_params(method.name, **{key: getattr(method, key) for key in ADAMW_SETTINGS})


def train_adapter(
    method: Any,
    params: Mapping[str, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    bundle: Any,
    evaluate: Callable[[], float | torch.Tensor] | None,
) -> TrainResult:
    """:func:`train_on_views` on ``bundle``'s support in canonical row order, with the estimator's AdamW settings
    and ``seed``."""
    order = canonical_order(bundle.support_features, bundle.support_labels)
    return train_on_views(
        params,
        loss_fn,
        bundle.support_features[:, order],
        bundle.support_labels[order],
        **{key: getattr(method, key) for key in ADAMW_SETTINGS},
        seed=method.seed,
        evaluate=evaluate,
        desc=f"{method.name} train",
    )
