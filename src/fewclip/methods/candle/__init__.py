"""Candle (Shi et al., KDD'24, arXiv 2406.12638): joint cross-modal attention over images and class prototypes.

The model (every formula from the released code ``shijxcs/Candle`` d285eb3):

- Text prototypes T [C, D], one per class, frozen. Visual prototypes P [C, D]: for a class with support images, the
  mean of its clean support features (frozen); for a class without support (a *new* class, wherever its label is),
  a learnable virtual prototype v_c initialised from a **copy** of t_c (``vir_init="text"``) or from the mean base
  prototype plus N(0, 0.05²) noise (``vir_init="visual"``).
- Token set X = [x_1 W_I; …; x_B W_I; P W_I; T W_T] (W_I, W_T full D×D, identity init, rows times W from the right),
  X̄ = LayerNorm(X), Y = X̄ + λ·MHA(X̄, X̄, X̄): one unbatched sequence, 8 heads, attention dropout 0.1 in training,
  PyTorch's default MHA initialisation, λ learnable from 0.1. ``mask`` blocks edges between token kinds
  (:mod:`.attention`).
- Logits (s = 100): z⁰ = s·n(q W_I)·n(T W_T)ᵀ, z^{vt} = s·n(ŷ(q))·n(ŷ(T))ᵀ, z^{vv} = s·α·n(ŷ(q))·n(ŷ(P))ᵀ. In training
  the query rows are the B images and the C prototypes (targets [y; 0…C−1]); each matrix is (B + C)×C and gets the
  compensating logit-adjusted loss CE(z + τ·log π) with π_c ∝ n_c + 1 (``prior_virtual_count``); the three losses
  are summed. Prediction = z^{vt} + z^{vv} over all C columns (the protocol restricts columns), each test image in
  its own token set, computed exactly without a per-image attention (:mod:`.head`).
- Trainable parameters: 6D² + 6D + 1 + C_n·D (W_I, W_T, MHA in/out projections with biases, LayerNorm affine, λ,
  virtual prototypes).

Training (the released trainer and its Dassl configuration): SGD (momentum 0.9, weight decay 5e-4 on every
parameter), lr 3e-4, batch 128, 50 epochs, ⌊N/B⌋ iterations per epoch (at least one; the remainder of the shuffled
support set is dropped, as Dassl does; ``iterations_per_epoch`` sets another number, drawn from fresh shuffles of the
support set, which the long-tail protocol uses to bound a 115k-image training set, see
:mod:`fewclip.protocols.protocol`), one constant warm-up epoch at 1e-5 then a cosine over the epochs stepped once per
epoch (Dassl's ``ConstantWarmupScheduler`` around ``CosineAnnealingLR(T_max=epochs)``: lr(e) = lr₀·(1 + cos(π(e −
1)/E))/2 for the 0-based epoch e ≥ 1). Every epoch draws one of the bundle's V cached augmented views per support
image (raw, not normalised), so CLIP never runs during training. Weights and compute are float32. With
``selection="val"`` and validation data the epoch with the best validation accuracy (per-image inference, no dropout)
is kept, ties to the earliest; otherwise the last epoch (the released behaviour); with ``selection="cv"`` the epoch with
the most correct held-out images summed over the folds (:class:`~fewclip.methods.training.SelectsEpoch`).
Deterministic on CPU for a given ``seed``; support rows are put in a canonical order first, so the row order of the
bundle does not matter.

Fixed defects of the released code, each with an option reproducing the released behaviour:

- C1: v_c is a copy of t_c and the text prototypes stay frozen. ``tie_virtual_text=True`` sets t_c := sg(v_c) for
  the new classes before every forward, as the released aliasing does (only with ``vir_init="text"``).
- C3: ``inference_context="per_image"`` (default) scores every test image in its own token set {x W_I} ∪ P W_I ∪
  T W_T, so a prediction depends on nothing but that image. ``"transductive"`` evaluates consecutive chunks of
  ``test_batch_size`` (100) rows in the given order, one token set per chunk, as released.
- C2: float32 weights and compute. ``precision="fp16"`` trains fp16 weights with plain SGD and no float32 master copy
  (losses in float32) and evaluates in fp16, as released: updates below half the fp16 spacing round away.

Deviations forced by the data (recorded, not options):

- The bundle stores L2-normalised text rows (raw text embeddings are not available), so T holds unit rows; image
  features and the base prototypes are raw. LayerNorm acts per token and z⁰ uses cosines, so the scale of a token
  changes the forward pass only through LayerNorm's eps; it does change training dynamics of the virtual prototypes
  (a parameter that is itself a token: its gradient scales as 1/‖v‖, so a unit-norm ``text`` initialisation moves
  faster relative to its size than a raw CLIP text embedding would). ``vir_init="visual"`` uses raw magnitudes, as
  specified.
- Base prototypes are the mean of ``support_clean_features`` (the test transform); a bundle without them falls back
  to the mean over all cached views of the class (``prototype_source_`` records which).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import MethodError
from ...features.bundle import Bundle
from ..base import Method
from ..params import Boolean, Integral, Interval, Optional, Options, Real, param
from ..registry import register
from ..training import (
    BATCH_SIZE,
    EPOCHS,
    LEARNING_RATE,
    SEED,
    STOP_EPOCH,
    STOP_EPOCH_DOC,
    WEIGHT_DECAY,
    SelectsEpoch,
    TrainResult,
    canonical_order,
    fit_epochs,
)
from .attention import (
    IMAGE,
    MASKS,
    TEXT,
    VISUAL,
    PrototypeContext,
    attention_mask,
    blocked_edges,
    image_key_weight,
    multi_head_attention,
    token_kinds,
)
from .head import (
    FITTED_PARAMETERS,
    LN_EPS,
    LOGIT_SCALE,
    PER_IMAGE_BUDGET,
    VIR_INITS,
    VISUAL_INIT_STD,
    CandleHead,
    initial_parameters,
    initial_prototypes,
)

__all__ = [
    "FITTED_PARAMETERS",
    "IMAGE",
    "INFERENCE_CONTEXTS",
    "LN_EPS",
    "LOGIT_SCALE",
    "MASKS",
    "PER_IMAGE_BUDGET",
    "PRECISIONS",
    "TEXT",
    "VIR_INITS",
    "VISUAL",
    "VISUAL_INIT_STD",
    "Candle",
    "CandleHead",
    "PrototypeContext",
    "attention_mask",
    "blocked_edges",
    "candle_lr",
    "cla_loss",
    "cla_prior",
    "epoch_order",
    "image_key_weight",
    "initial_parameters",
    "initial_prototypes",
    "multi_head_attention",
    "token_kinds",
]

INFERENCE_CONTEXTS = ("per_image", "transductive")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
#: the hyperparameters read at prediction time (checked there too)
INFERENCE_PARAMS = ("inference_context", "test_batch_size")
FINITE = Interval(Real, None, None, closed="neither")
POSITIVE = Interval(Real, 0, None, closed="neither")
FRACTION = Interval(Real, 0, 1, closed="left")


# --------------------------------------------------------------------------- the loss and the schedule


def cla_prior(counts: torch.Tensor, virtual_count: float = 1.0) -> torch.Tensor:
    """π_c = (n_c + k) / Σ_j (n_j + k) for the per-class training counts n (any numeric dtype); ``counts`` is not
    modified (the released loss adds 1 in place, defect C9)."""
    shifted = counts.to(torch.float64) + float(virtual_count)
    return (shifted / shifted.sum()).float()


def cla_loss(
    logits: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor, tau: float = 1.0, virtual_count: float = 1.0
) -> torch.Tensor:
    """Compensating logit-adjusted loss: mean over rows of −log softmax(z + τ·log π)_y, π from :func:`cla_prior`."""
    log_prior = torch.log(cla_prior(counts, virtual_count)).to(logits.device, logits.dtype)
    return F.cross_entropy(logits + float(tau) * log_prior, targets)


def candle_lr(epoch: int, epochs: int, lr: float, warmup_lr: float) -> float:
    """Learning rate of the 0-based ``epoch``: ``warmup_lr`` for epoch 0, then lr·(1 + cos(π(e − 1)/E))/2 (Dassl's
    constant warm-up of one epoch wrapping ``CosineAnnealingLR(T_max=E)``, stepped once per epoch)."""
    if epoch == 0:
        return float(warmup_lr)
    return float(lr) * (1.0 + math.cos(math.pi * (epoch - 1) / epochs)) / 2.0


def epoch_order(num: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """The first ``count`` support rows of one epoch: fresh random permutations of range(num), concatenated as far
    as needed. With count ≤ num this is one permutation, truncated (Dassl's shuffled epoch with ``drop_last``)."""
    parts = [torch.randperm(num, generator=generator) for _ in range(max(1, -(-count // num)))]
    return torch.cat(parts)[:count]


# --------------------------------------------------------------------------- the estimator


@register("candle")
@dataclass(kw_only=True, repr=False, eq=False)
class Candle(SelectsEpoch, Method):
    """Candle with the released defaults of the run example (ViT-B/16, batch 128, lr 3e-4, 50 epochs, α = 1).

    ``inference_context`` and ``test_batch_size`` are read at prediction time, so a fitted model can be evaluated
    both ways.

    Fitted attributes: the learned tensors ``w_image_``, ``w_text_`` [D, D], ``ln_weight_``, ``ln_bias_`` [D],
    ``in_proj_weight_`` [3D, D], ``in_proj_bias_`` [3D], ``out_proj_weight_`` [D, D], ``out_proj_bias_`` [D],
    ``ratio_`` (λ, 0-d), ``virtual_prototypes_`` [C_n, D]; the frozen ``base_prototypes_`` [C, D] (zero rows for new
    classes), ``text_prototypes_`` [C, D] (as used: tied rows under ``tie_virtual_text``), ``new_classes_`` [C_n];
    ``class_counts_`` n_c and ``prior_`` π [C]; ``prototype_source_``; ``trained_parameters_``,
    ``iterations_per_epoch_``, ``history_`` (epoch, lr, loss, val_accuracy), ``best_epoch_``, and the base class's
    ``selection_used_`` (``"val"``, or ``"none"`` when the last epoch was kept), ``selected_`` and ``val_accuracy_``.
    """

    #: with ``selection="val"`` and no validation split the last epoch is kept (the released behaviour)
    falls_back_without_validation = True

    scale: float = param(1.0, POSITIVE, doc="α, the weight of the visual-prototype logits z^{vv}")
    mask: str = param("none", Options(MASKS), doc="which attention edges are blocked")
    vir_init: str = param("text", Options(VIR_INITS), doc="initial virtual prototypes: the text rows or visual noise")
    tau: float = param(1.0, FINITE, doc="τ of the logit adjustment")
    prior_virtual_count: float = param(
        1.0, Interval(Real, 0, None, closed="left"), doc="k in the prior π_c ∝ n_c + k (the released +1)"
    )
    inference_context: str = param(
        "per_image",
        Options(INFERENCE_CONTEXTS),
        doc="each test image in its own token set, or chunks of test_batch_size as released",
        hint="'transductive' reproduces the released batched evaluation.",
    )
    test_batch_size: int = param(
        100, Interval(Integral, 1, None, closed="left"), doc="rows per token set under inference_context='transductive'"
    )
    tie_virtual_text: bool = param(False, Boolean(), doc="reproduce the released aliasing t_c := sg(v_c) (defect C1)")
    precision: str = param(
        "fp32",
        Options(tuple(PRECISIONS)),
        doc="weights and compute; 'fp16' as released (defect C2)",
        hint="'fp16' reproduces the released fp16 weights.",
    )
    heads: int = param(8, Interval(Integral, 1, None, closed="left"), doc="attention heads (must divide D)")
    dropout: float = param(0.1, FRACTION, doc="dropout on the attention weights, in training")
    ratio_init: float = param(0.1, FINITE, doc="initial λ, the weight of the attention residual")
    lr: float = param(3e-4, LEARNING_RATE, doc="SGD learning rate after the warm-up epoch")
    epochs: int = param(50, EPOCHS, doc="training epochs (the first is the warm-up)")
    batch_size: int = param(128, BATCH_SIZE, doc="support images per step")
    iterations_per_epoch: int | None = param(
        None,
        Optional(Interval(Integral, 1, None, closed="left")),
        doc="steps per epoch; None: ⌊N/B⌋, every support image once per epoch as released",
        hint="None means ⌊N/B⌋, the released epoch: every support image once.",
    )
    momentum: float = param(0.9, FRACTION, doc="SGD momentum")
    weight_decay: float = param(5e-4, WEIGHT_DECAY, doc="SGD weight decay (every parameter)")
    warmup_lr: float = param(1e-5, POSITIVE, doc="learning rate of the warm-up epoch")
    seed: int = param(1, SEED, doc="seed of the initialisation, view draws, batches and dropout")
    stop_epoch: int | None = param(None, STOP_EPOCH, doc=STOP_EPOCH_DOC)

    # ----------------------------------------------------------------- checks that need the data
    def check_dim(self, dim: int) -> None:
        if dim % self.heads:
            divisors = [k for k in range(1, min(dim, 16) + 1) if dim % k == 0]
            raise MethodError(
                f"candle: D = {dim} is not divisible by heads = {self.heads}; set heads to a divisor of D "
                f"(e.g. {divisors})."
            )

    def _check_params(self) -> None:
        if self.tie_virtual_text and self.vir_init != "text":
            raise MethodError(
                "candle: tie_virtual_text=True reproduces the released aliasing of the virtual prototypes with the "
                f"new classes' text rows, which only exists with vir_init='text' (got vir_init={self.vir_init!r})."
            )

    def _check(self, bundle: Bundle) -> None:
        counts = bundle.shots_per_class()
        if int(counts.sum()) == 0:
            raise MethodError(
                "candle: no class has support images; Candle needs labelled images of at least one (base) class "
                "to build visual prototypes. Use zero-shot for a bundle without support."
            )
        prior_counts = counts.double() + float(self.prior_virtual_count)
        if bool((prior_counts <= 0).any()):
            empty = [bundle.classnames[i] for i in (prior_counts <= 0).nonzero().flatten()[:5].tolist()]
            raise MethodError(
                f"candle: prior_virtual_count=0 gives the classes without support (e.g. {empty}) a zero prior and an "
                "infinite loss; use prior_virtual_count > 0 (the released value is 1)."
            )

    # ----------------------------------------------------------------- fitting
    def _fit(self, bundle: Bundle) -> dict[str, Any]:
        device = bundle.support_features.device
        counts = bundle.shots_per_class()
        order = canonical_order(bundle.support_features, bundle.support_labels)
        support = bundle.support_features[:, order].float()
        labels = bundle.support_labels[order]
        if bundle.support_clean_features is not None:
            proto_rows, source = bundle.support_clean_features[order].float(), "support_clean_features"
        else:
            proto_rows, source = support.mean(dim=0), "support_features_mean_over_views"
        text = bundle.text_weights.float()
        generator = torch.Generator().manual_seed(int(self.seed))
        base_prototypes, new_classes, virtual = initial_prototypes(
            proto_rows, labels, counts, text, self.vir_init, generator
        )
        init = initial_parameters(bundle.dim, virtual, float(self.ratio_init), generator)
        dtype = PRECISIONS[self.precision]
        head = CandleHead(
            init, base_prototypes, text, new_classes,
            heads=self.heads, mask=self.mask, scale=float(self.scale), tie_virtual_text=self.tie_virtual_text,
        ).to(device, dtype)  # fmt: skip
        support = support.to(dtype)

        evaluate = None
        if self.selection == "val" and bundle.has_val:
            val = bundle.val_features.to(device, dtype)
            val_labels = bundle.val_labels.to(device)

            def evaluate() -> float:
                return self._selection_accuracy(head.per_image_scores(val), val_labels)

        result = self._train(head, support, labels, counts, generator, evaluate)
        if evaluate is not None:
            self.record_epochs(result, bundle.val_labels.numel())
        with torch.no_grad():
            for name, parameter in head.named_parameters():
                parameter.copy_(result.state[name])
            _, used_text = head.prototypes()
        for name, attr in FITTED_PARAMETERS.items():
            setattr(self, attr, getattr(head, name).detach().clone())
        self.base_prototypes_ = head.base_prototypes.clone()
        self.text_prototypes_ = used_text.detach().clone()
        self.new_classes_ = new_classes.clone()
        self.class_counts_ = counts.clone()
        self.prior_ = cla_prior(counts, float(self.prior_virtual_count))
        self.prototype_source_ = source
        self.iterations_per_epoch_ = self._iterations(labels.numel())
        self.trained_parameters_ = int(sum(p.numel() for p in head.parameters()))
        self.best_epoch_ = result.best_epoch
        self.history_ = result.history
        return {"epoch": self.best_epoch_}

    def _iterations(self, num: int) -> int:
        """Steps per epoch: ``iterations_per_epoch``, or ⌊N/B⌋ (at least 1) for N support images."""
        if self.iterations_per_epoch is not None:
            return int(self.iterations_per_epoch)
        return max(1, num // int(self.batch_size))

    def _train(
        self,
        head: CandleHead,
        support: torch.Tensor,
        labels: torch.Tensor,
        counts: torch.Tensor,
        generator: torch.Generator,
        evaluate: Callable[[], float] | None,
    ) -> TrainResult:
        """SGD over the epochs through :func:`~fewclip.methods.training.fit_epochs`: the learning rate set per epoch
        (:func:`candle_lr`), one view per support image and a fresh shuffle per epoch, the three CLA losses summed."""
        device = support.device
        epochs = int(self.epochs)
        num_views, num = support.shape[:2]
        batch = min(int(self.batch_size), num)
        iters = self._iterations(self._cv_full_rows or num)  # a cv fold: the steps of an epoch of all support
        optimizer = torch.optim.SGD(
            head.parameters(), lr=float(self.warmup_lr), momentum=float(self.momentum),
            weight_decay=float(self.weight_decay),
        )  # fmt: skip
        tau, virtual_count = float(self.tau), float(self.prior_virtual_count)
        prototype_targets = torch.arange(head.num_classes, device=device)
        dropout = float(self.dropout)

        def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
            views = torch.randint(num_views, (num,), generator=generator).to(device)  # one view per image
            order = epoch_order(num, iters * batch, generator).to(device)
            for it in range(iters):
                idx = order[it * batch : (it + 1) * batch]
                yield support[views[idx], idx], torch.cat([labels[idx], prototype_targets])

        def loss(step: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            images, targets = step
            logits = head.train_logits(images, dropout, generator)
            return sum(cla_loss(z.float(), targets, counts, tau, virtual_count) for z in logits)

        return fit_epochs(
            dict(head.named_parameters()),
            optimizer,
            epochs,
            batches,
            loss,
            name=self.name,
            lr=self.lr,
            evaluate=evaluate,
            epoch_lr=lambda epoch: candle_lr(epoch - 1, epochs, float(self.lr), float(self.warmup_lr)),
            steps_per_epoch=iters,
            stop_epoch=self.stop_epoch,
        )

    # ----------------------------------------------------------------- prediction
    def head(self) -> CandleHead:
        """The fitted head (a fresh module around the fitted tensors)."""
        self._check_fitted()
        params = {name: getattr(self, attr) for name, attr in FITTED_PARAMETERS.items()}
        return CandleHead(
            params, self.base_prototypes_, self.text_prototypes_, self.new_classes_,
            heads=self.heads, mask=self.mask, scale=float(self.scale), tie_virtual_text=self.tie_virtual_text,
        )  # fmt: skip

    def predict_logits(self, features: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        """[M, C] = z^{vt} + z^{vv}. Per image by default; under ``inference_context="transductive"`` the rows are
        scored in consecutive chunks of ``test_batch_size`` (the outer ``batch_size`` is rounded to a multiple)."""
        self._check_fitted()
        self.validate_params(INFERENCE_PARAMS)
        if self.inference_context == "transductive":
            step = int(self.test_batch_size)
            batch_size = max(step, (int(batch_size) // step) * step)
        return super().predict_logits(features, batch_size)

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        head = self.head().to(features.device)
        features = features.to(head.w_image.dtype)
        if self.inference_context == "transductive":
            return head.transductive_scores(features, int(self.test_batch_size)).float()
        return head.per_image_scores(features).float()
