"""Training: one epoch loop for every trained method (:func:`fit_epochs`), and training on cached augmented views
(what Tip-Adapter-F, APE-T and CLIP-Adapter share).

The published code re-encodes every augmented support image through CLIP at every step. The bundle already holds V
augmented views of each support image, so an epoch draws, for every support image, one of its V views (uniformly,
from the run's seeded generator) and trains on those normalised features. CLIP is never run, and an epoch costs a
few matrix products.

Epoch selection is honest: after every epoch the method's validation accuracy is recorded; the best epoch wins,
ties to the earliest. Without validation (selection ``none``) the last epoch is used. Test data never reaches this
module (``fit`` only sees data without it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F

from ..errors import MethodError
from ..features.bundle import Bundle
from ..progress import progress
from .params import Integral, Interval, Optional, Real

#: constraints of the optimiser hyperparameters every trained method declares
EPOCHS = Interval(Integral, 1, None, closed="left")
BATCH_SIZE = Interval(Integral, 1, None, closed="left")
LEARNING_RATE = Interval(Real, 0, None, closed="neither")
ADAM_EPS = Interval(Real, 0, None, closed="neither")
WEIGHT_DECAY = Interval(Real, 0, None, closed="left")
SEED = Interval(Integral, 0, None, closed="left")
#: ``stop_epoch``: keep the state after this epoch of the ``epochs``-epoch schedule (what ``selection="cv"`` fixes)
STOP_EPOCH = Optional(Interval(Integral, 1, None, closed="left"))
STOP_EPOCH_DOC = (
    "keep the state after this epoch of the epochs-epoch schedule (the schedule is unchanged); None: the best "
    "validation epoch (selection 'val') or the last. selection='cv' sets it to the epoch chosen on the folds"
)
#: validation rows per chunk in the trained methods' per-epoch evaluation (bounds memory; results do not depend on it)
EVAL_ROWS = 4096

Batch = TypeVar("Batch")


# --------------------------------------------------------------------------- the epoch loop


@dataclass
class TrainResult:
    """What :func:`fit_epochs` returns: the chosen state and the per-epoch record.

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


class MixedPrecision:
    """Autocast to ``dtype`` plus, for float16, loss scaling (``torch.amp.GradScaler``): on CUDA only. Elsewhere, or
    with ``dtype`` None, both are no-ops (the scaler is disabled and passes the loss and the step straight through)."""

    def __init__(self, dtype: torch.dtype | None, device: torch.device):
        self.device_type = device.type
        self.enabled = dtype is not None and device.type == "cuda"
        self.dtype = dtype
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.enabled and dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def fit_epochs(
    params: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batches: Callable[[int], Iterable[Batch]],
    loss: Callable[[Batch], torch.Tensor],
    *,
    name: str,
    lr: float,
    evaluate: Callable[[], float | torch.Tensor] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    epoch_lr: Callable[[int], float] | None = None,
    weight: Callable[[Batch], float] | None = None,
    steps_per_epoch: int | None = None,
    mixed_precision: torch.dtype | None = None,
    stop_epoch: int | None = None,
) -> TrainResult:
    """Train for ``epochs`` epochs; keep the state of the best validation epoch (or of the last without ``evaluate``).

    Every epoch (1-based ``epoch``): ``epoch_lr(epoch)``, if given, sets every parameter group's learning rate (a
    per-epoch schedule, recorded as the record's ``"lr"``); then for each batch of ``batches(epoch)`` (an iterable
    drawn lazily, so random draws happen in the order they always did) the step is ``loss(batch)`` under autocast, a
    finite-loss check (one :class:`MethodError` naming the epoch and ``lr``), ``zero_grad``, ``backward``,
    ``optimizer.step()`` and ``scheduler.step()`` (a per-step schedule). The epoch's loss is the mean of the batch
    losses weighted by ``weight(batch)`` (default 1). Then ``evaluate()`` runs under ``no_grad``: the validation
    accuracy, or R accuracies when R candidates train side by side (each parameter stacked on dim 0); each candidate
    keeps its own best epoch, ties to the earliest, and a snapshot of ``params`` (its rows) at that epoch.
    ``evaluate`` switches a module with dropout to eval mode and back itself.

    History records are ``{"epoch", ["lr",] "loss", "val_accuracy"}`` (None without ``evaluate``). The progress bar
    counts steps when ``steps_per_epoch`` is given, else epochs. ``mixed_precision`` (e.g. ``torch.float16``) runs
    the loss and ``evaluate`` under ``torch.autocast`` with a ``GradScaler`` on CUDA; on the CPU it changes nothing.

    ``stop_epoch`` (1 ≤ stop_epoch ≤ epochs) stops after that epoch and keeps its state whatever ``evaluate`` says
    (the schedules still span ``epochs``, so the first ``stop_epoch`` epochs are those of the full run: a fixed
    epoch chosen by cross-validation reproduces the trajectory it was chosen on); ``best_accuracies`` are then that
    epoch's.

    A method that fine-tunes CLIP's image tower on images (one step = a forward and backward on a batch of images)
    uses the same loop::

        loader = DataLoader(episode_images, batch_size=32, shuffle=True, generator=g)
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW(params.values(), lr=2e-4)
        result = fit_epochs(
            params, opt, epochs, lambda epoch: loader,
            lambda batch: F.cross_entropy(model(batch[0].to(device)), batch[1].to(device)),
            name="flier", lr=2e-4, evaluate=val_accuracy,
            scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader)),
            steps_per_epoch=len(loader), mixed_precision=torch.float16,
        )
        model.load_state_dict(result.state, strict=False)
    """
    epochs = int(epochs)
    last = epochs if stop_epoch is None else int(stop_epoch)
    if not 1 <= last <= epochs:
        raise MethodError(f"{name}: stop_epoch={stop_epoch!r} is not valid; expected an epoch in [1, epochs={epochs}].")
    first = next(iter(params.values()))
    amp = MixedPrecision(mixed_precision, first.device)
    best_acc: torch.Tensor | None = None
    best_epochs: list[int] = [epochs]
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = []
    by_step = steps_per_epoch is not None
    total_units = last * int(steps_per_epoch) if by_step else last
    unit = "step" if by_step else "epoch"
    with progress(total_units, f"{name} train", unit, leave=False) as bar:
        for epoch in range(1, last + 1):
            record: dict[str, Any] = {"epoch": epoch}
            if epoch_lr is not None:
                rate = epoch_lr(epoch)
                for group in optimizer.param_groups:
                    group["lr"] = rate
                record["lr"] = rate
            total, weights = 0.0, 0
            for batch in batches(epoch):
                with amp.autocast():
                    value = loss(batch)
                if not torch.isfinite(value):
                    bad = float(value.detach())
                    raise MethodError(f"{name}: the training loss became {bad} at epoch {epoch}; lower lr (now {lr}).")
                optimizer.zero_grad(set_to_none=True)
                amp.scaler.scale(value).backward()
                amp.scaler.step(optimizer)
                amp.scaler.update()
                if scheduler is not None:
                    scheduler.step()
                w = 1 if weight is None else weight(batch)
                total += float(value.detach()) * w
                weights += w
                if by_step:
                    bar.update()
            if not weights:
                raise MethodError(f"{name}: epoch {epoch} had no training batches (is the support set empty?).")
            record["loss"] = total / weights
            record["val_accuracy"] = None
            postfix: dict[str, Any] = {"epoch": epoch} if by_step else {}
            postfix["loss"] = f"{record['loss']:.4f}"
            if evaluate is not None:
                with torch.no_grad(), amp.autocast():
                    acc = torch.as_tensor(evaluate(), dtype=torch.float64).reshape(-1).cpu()
                record["val_accuracy"] = float(acc[0]) if acc.numel() == 1 else acc.tolist()
                postfix["val"] = f"{float(acc.max()):.2f}"
                if stop_epoch is not None:  # a fixed epoch: its accuracy, its state (taken after the loop)
                    best_acc, best_epochs = acc.clone(), [last] * acc.numel()
                elif best_acc is None or best_state is None:
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
            if not by_step:
                bar.update()
    if best_state is None or stop_epoch is not None:
        best_state = {k: v.detach().clone() for k, v in params.items()}
        best_epochs = [last] * len(best_epochs)
    return TrainResult(
        state=best_state,
        best_epochs=best_epochs,
        best_accuracies=None if best_acc is None else best_acc.tolist(),
        history=history,
    )


def chunked(fn: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``fn`` over consecutive chunks of :data:`EVAL_ROWS` rows of ``rows``, concatenated along ``dim``."""
    return torch.cat([fn(rows[i : i + EVAL_ROWS]) for i in range(0, rows.shape[0], EVAL_ROWS)], dim=dim)


# --------------------------------------------------------------------------- training on cached views


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
    return F.normalize(support_features[views, rows].float(), dim=-1)


def adamw(params: list[torch.Tensor], **kw: float) -> torch.optim.Optimizer:
    """AdamW, with the fused kernel where the device has one (an order of magnitude faster on CPU for the
    16M keys of Tip-Adapter-F on ImageNet); the same update rule either way."""
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # pragma: no cover - devices without a fused kernel
        return torch.optim.AdamW(params, **kw)


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
    name: str = "views",
    stop_epoch: int | None = None,
    epoch_rows: int | None = None,
) -> TrainResult:
    """AdamW with a cosine schedule stepped every iteration (T_max = epochs × iterations), shuffled batches, through
    :func:`fit_epochs`.

    ``params`` are leaf tensors with ``requires_grad``; ``loss_fn(queries [B, D], labels [B])`` returns the batch-mean
    loss (an epoch's loss is the mean over its rows). ``evaluate`` and ``stop_epoch`` as in :func:`fit_epochs`.
    Deterministic on CPU for a given seed: view draws and batch order come from one generator seeded with ``seed``.

    ``epoch_rows`` (default: the N support rows, one pass) sets the rows an epoch draws: consecutive fresh
    permutations of the rows, truncated. A cross-validation fold trains with the full support's count, so an epoch
    there is as many steps of the same batch sizes as an epoch of the final fit, and the epoch it chooses means the
    same length of training.
    """
    epochs, batch_size = int(epochs), int(batch_size)
    num = labels.numel()
    rows_per_epoch = num if epoch_rows is None else int(epoch_rows)
    iters = math.ceil(rows_per_epoch / batch_size)
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = adamw(list(params.values()), lr=float(lr), eps=float(eps), weight_decay=float(weight_decay))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * iters)

    def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        queries = draw_views(support_features, generator)
        if rows_per_epoch == num:
            order = torch.randperm(num, generator=generator)
        else:
            parts = [torch.randperm(num, generator=generator) for _ in range(-(-rows_per_epoch // num))]
            order = torch.cat(parts)[:rows_per_epoch]
        order = order.to(labels.device)
        for start in range(0, rows_per_epoch, batch_size):
            rows = order[start : start + batch_size]
            yield queries[rows], labels[rows]

    return fit_epochs(
        params,
        optimizer,
        epochs,
        batches,
        lambda batch: loss_fn(*batch),
        name=name,
        lr=lr,
        evaluate=evaluate,
        scheduler=schedule,
        weight=lambda batch: batch[1].numel(),
        stop_epoch=stop_epoch,
    )


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Batch-mean cross-entropy (the published losses; APE-T's SmoothCrossEntropy has smoothing 0)."""
    return F.cross_entropy(logits, labels)


class TrainsOnViews(Protocol):
    """An estimator trained by :func:`train_adapter`: its name and AdamW hyperparameters."""

    @property
    def name(self) -> str: ...

    @property
    def epochs(self) -> int: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def lr(self) -> float: ...

    @property
    def eps(self) -> float: ...

    @property
    def weight_decay(self) -> float: ...

    @property
    def seed(self) -> int: ...

    @property
    def stop_epoch(self) -> int | None: ...


def train_adapter(
    method: TrainsOnViews,
    params: Mapping[str, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    bundle: Bundle,
    evaluate: Callable[[], float | torch.Tensor] | None,
) -> TrainResult:
    """:func:`train_on_views` on ``bundle``'s support in canonical row order, with the estimator's AdamW settings,
    ``seed`` and ``stop_epoch``; on a cross-validation fold, epochs of the full support's row count."""
    order = canonical_order(bundle.support_features, bundle.support_labels)
    return train_on_views(
        params,
        loss_fn,
        bundle.support_features[:, order],
        bundle.support_labels[order],
        epochs=method.epochs,
        batch_size=method.batch_size,
        lr=method.lr,
        eps=method.eps,
        weight_decay=method.weight_decay,
        seed=method.seed,
        evaluate=evaluate,
        name=method.name,
        stop_epoch=method.stop_epoch,
        epoch_rows=getattr(method, "_cv_full_rows", None),
    )


# --------------------------------------------------------------------------- selection="cv" of the epoch


def epoch_counts(history: Sequence[Mapping[str, Any]], rows: int) -> torch.Tensor:
    """[R, E] float64 validation correct counts of R candidates (1 for a single model) over the E epochs of a
    :func:`fit_epochs` history (its ``val_accuracy`` percentages times ``rows``/100, rounded: exact for any row count
    a float64 percentage holds)."""
    table = [[a] if not isinstance(a, list) else a for a in (r["val_accuracy"] for r in history)]
    if any(a is None for row in table for a in row):
        raise MethodError("the training history has epochs without a validation accuracy; cannot cross-validate.")
    return torch.round(torch.tensor(table, dtype=torch.float64).T * int(rows) / 100.0)


class SelectsEpoch:
    """``selection="cv"`` for a trained method, shared by Candle, CLIP-Adapter, Tip-Adapter-F and APE-T (a mixin
    placed before the method's base class).

    The grid that does not depend on the data is (candidate, epoch) of the ``epochs``-epoch schedule: each fold
    trains with ``selection="val"`` on its part of the support and records its validation correct counts at every
    epoch (``_cv_epoch_counts_``, [R, E], R candidates trained side by side, e.g. CLIP-Adapter's ratios, else 1;
    :meth:`record_epochs`); their sum over the folds picks (candidate, epoch), the first maximum in
    (candidate, epoch) order (the earliest epoch, as on validation). :meth:`_cv_epoch_values` maps it to constructor
    values (``stop_epoch``, and e.g. ``init_ratio``). A method that searches a grid on validation after training
    (Tip-Adapter-F, APE-T: α, β) sets ``searches_after_training``; a second pass fits each fold again with the chosen
    epoch fixed and sums that grid's counts (``_cv_counts_``) over the folds (:meth:`Method._cv_select`), mapped by
    ``_cv_values``. The final fit on all support then runs with every chosen value fixed (``selection="none"``)."""

    cross_validates = True
    #: True when a grid is searched on validation after training (its counts in ``_cv_counts_``)
    searches_after_training: bool = False
    #: set on a first-pass fold probe: record the epoch counts, skip the after-training search
    _cv_epochs_only: bool = False

    def _check_params(self) -> None:
        super()._check_params()  # type: ignore[misc]
        stop, epochs = getattr(self, "stop_epoch", None), int(getattr(self, "epochs", 0))
        if stop is not None and stop > epochs:
            raise MethodError(
                f"{getattr(self, 'name', 'method')}: stop_epoch={stop} is after the last epoch (epochs={epochs}); "
                "use a stop_epoch ≤ epochs, or raise epochs."
            )

    def record_epochs(self, result: TrainResult, rows: int) -> None:
        """Keep the per-epoch validation correct counts of a training with validation on ``rows`` rows."""
        if result.history and result.history[0].get("val_accuracy") is not None:
            self._cv_epoch_counts_ = epoch_counts(result.history, rows)

    def _cv_epoch_values(self, candidate: int, epoch: int) -> dict[str, Any]:
        """The constructor values fixing ``candidate`` (an index into the candidates trained side by side) and the
        0-based ``epoch``."""
        return {"stop_epoch": epoch + 1}

    def _cv_select(self, folds: Sequence[Any]) -> tuple[dict[str, Any], int]:
        total = None
        for fold in folds:
            probe = self._cv_probe()
            probe._cv_epochs_only = True
            probe.fit(fold)
            counts = probe._cv_epoch_counts_
            total = counts if total is None else total + counts
        flat = total.reshape(-1)
        pos = int((flat == flat.max()).nonzero()[0])
        candidate, epoch = divmod(pos, total.shape[1])
        chosen, correct = self._cv_epoch_values(candidate, epoch), int(flat[pos])
        self.cv_epochs_ = {"best_correct": correct, "correct_per_epoch": total.max(dim=0).values.int().tolist()}
        if not self.searches_after_training:
            return chosen, correct
        saved = {key: getattr(self, key) for key in chosen}
        try:
            for key, value in chosen.items():
                setattr(self, key, value)
            values, correct = super()._cv_select(folds)  # type: ignore[misc]
        finally:
            for key, value in saved.items():
                setattr(self, key, value)
        return {**chosen, **values}, correct
