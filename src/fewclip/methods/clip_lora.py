"""CLIP-LoRA (Zanella & Ben Ayed, CVPRW'24): low-rank adapters on q, k and v of every attention block of both
CLIP encoders, trained on the support images.

    t_c = n(TextEnc_θ(template(c)))  for every class c, recomputed with gradients at every step
    z   = 100 · n(ImageEnc_θ(aug(x))) · tᵀ,   loss = CE(z, y)
    θ   = LoRA pairs (A_p [r, E], B_p [E, r]) on p ∈ {q, k, v}: W_p x + s·B_pA_p·drop(x),  s = α/√r

AdamW (lr 2e-4, weight decay 1e-2, betas 0.9/0.999) over the LoRA parameters only, a cosine schedule stepped every
iteration down to 1e-6, ``iterations_per_shot`` × K iterations (500 × K released) of batch 32, each support image
augmented on the fly (RandomResizedCrop 0.08–1 + flip; drawn per image and pass over the support set from ``seed``,
so a run is reproducible whatever the batching or loader workers). Autocast (fp16 with loss scaling, or bf16) on
CUDA; the LoRA parameters and the frozen weights they train against are float32 (the fix of the spec's L5).

Selection. The released code keeps the final iterate without validation: ``selection="none"`` reproduces it.
``selection="val"`` (fewclip's default, a labelled deviation) scores the validation images every
⌈iterations/``evaluations``⌉ steps and keeps the best checkpoint (ties: the earlier). ``selection="cv"`` is refused
(the base class says so and names the fallbacks): refitting 500 × K iterations per fold is not worth it for a method
published with fixed hyperparameters.

After training the LoRA branches are merged into the weights: the fitted state (``encoder_state_``) is the image
tower's merged q/k/v weights, so test images go through a plain copy of the backbone (no LoRA code path), via the
ordinary extraction and feature cache, keyed by those weights' SHA-256. The head's text rows (``text_``) are the
adapted text tower's features of ``template`` for every class: what ``predict_logits`` scores against. The LoRA pairs
themselves are kept too (``lora_state_``, 184,320 numbers for ViT-B/16).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import Item, fill_template
from ..errors import MethodError
from ..features.pipeline import ExtractionOptions
from ..models import AUGMENT_PRESETS, Backbone, BackboneSpec
from ..models.lora import (
    POSITIONS,
    add_lora,
    encode_text_trimmed,
    lora_parameters,
    lora_state,
    merged_backbone,
    merged_weights,
    seed_dropout,
    set_lora_training,
    training_copy,
)
from ..models.trainable import state_sha256
from .image import (
    LOGIT_SCALE,
    ImageEpisode,
    ImageItems,
    ImageMethod,
    checked_batches,
    collate_images,
    image_batches,
    readable_accuracy,
)
from .params import Constraint, Integral, Interval, Optional, Options, Real, param
from .registry import register
from .training import BATCH_SIZE, LEARNING_RATE, SEED, WEIGHT_DECAY, adamw, fit_epochs

logger = logging.getLogger("fewclip.methods")

#: the ``encoders`` hyperparameter → the towers that get LoRA
ENCODERS = {"both": ("image", "text"), "vision": ("image",), "text": ("text",)}
AMP = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}
#: the image-tower prefix of each backend's parameter names (the merged weights saved are those under it)
IMAGE_PREFIX = {"open_clip": "visual.", "hf": "vision_model."}
SCOPE = "lora"


class Template(Constraint):
    """A prompt template: a string with exactly one ``{}`` (the class name)."""

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, str) and value.count("{}") == 1

    def describe(self, plural: bool = False) -> str:
        return "strings with one '{}'" if plural else "a string with exactly one '{}' (the class name)"

    def invalid_values(self) -> list[Any]:
        return ["a photo", 1]

    def example(self) -> Any:
        return "a photo of a {}."


def total_iterations(iterations: int | None, per_shot: int, shots: int) -> int:
    """``iterations`` when given, else ``per_shot`` × K (the released 500 × K, whatever the dataset)."""
    return int(iterations) if iterations is not None else int(per_shot) * max(1, int(shots))


def evaluation_rounds(total: int, evaluations: int) -> list[int]:
    """Steps per round between two validations: ⌈total/evaluations⌉ each, the last round what is left."""
    every = math.ceil(total / max(1, int(evaluations)))
    return [min(every, total - start) for start in range(0, total, every)]


def cosine_lr(step: int, total: int, lr: float, eta_min: float) -> float:
    """The learning rate after ``step`` of ``total`` scheduler steps: η_min + (lr − η_min)(1 + cos(π·step/T))/2."""
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * step / total)) / 2


def support_schedule(num: int, batch_size: int, total: int, generator: torch.Generator) -> list[list[tuple[int, int]]]:
    """The ``total`` training batches as (support index, pass) keys: passes over the ``num`` support images, each in
    a new order drawn from ``generator``, cut into batches of ``batch_size`` (a pass's last batch smaller: the
    released loader's ``drop_last=False``), stopping after exactly ``total`` batches. The pass number picks the
    augmentation draw, so each pass sees each image under a new random view."""
    if num < 1:
        raise MethodError("clip-lora: the support set is empty.")
    out: list[list[tuple[int, int]]] = []
    for draw in itertools.count():
        order = torch.randperm(num, generator=generator).tolist()
        for start in range(0, num, batch_size):
            out.append([(i, draw) for i in order[start : start + batch_size]])
            if len(out) == total:
                return out
    return out  # pragma: no cover - the loop returns


class _SupportViews(ImageItems):
    """Support image i under augmentation draw d, for the key (i, d); a failure returned, not raised."""

    def __getitem__(self, key: tuple[int, int]):  # type: ignore[override]
        index, draw = key
        return self.read(self.items[index], draw)


def loader_workers(requested: int | None, device: torch.device, images: int) -> int:
    """Support loader workers: ``requested`` when set (``--workers``); otherwise 0 on the CPU, where the model is the
    bottleneck, and for runs reading under 256 images; on CUDA one per core but one, up to 16 (one worker decodes and
    augments a few hundred images a second; a ViT-B/16 step on a large GPU takes 32 in well under 0.1 s)."""
    if requested is not None:
        return int(requested)
    if device.type != "cuda" or images < 256:
        return 0
    return max(0, min(16, (os.cpu_count() or 1) - 1))


def support_batches(
    root: Path,
    items: list[Item],
    transform: Callable,
    options: ExtractionOptions,
    keys: list[list[tuple[int, int]]],
    seed: int,
    unreadable: set[str],
    workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of each batch of ``keys`` (:func:`support_schedule`), read by one loader for the whole run
    (``workers`` processes, started once, not once per pass: a 1-shot run has 500 passes). An unreadable image is an
    error naming the file, unless ``options.skip_bad_images`` (then it is left out and recorded)."""
    loader = torch.utils.data.DataLoader(
        _SupportViews(root, items, transform, seed),
        batch_sampler=keys,
        num_workers=workers,
        collate_fn=collate_images,
    )
    yield from checked_batches(loader, root, options, unreadable)


@register("clip-lora")
@dataclass(kw_only=True, repr=False, eq=False)
class CLIPLoRA(ImageMethod):
    #: without a validation split, ``selection="val"`` keeps the final iterate (the released behaviour), recorded as
    #: ``selection_used_ = "none"``, instead of refusing the data
    falls_back_without_validation = True

    rank: int = param(2, Interval(Integral, 1, None, closed="left"), doc="LoRA rank r")
    lora_alpha: float = param(
        1.0, Interval(Real, 0, None, closed="neither"), doc="LoRA α; the branch is scaled by s = α/√r (rsLoRA)"
    )
    dropout: float = param(0.25, Interval(Real, 0, 1, closed="left"), doc="dropout on the LoRA branch's input")
    encoders: str = param("both", Options(tuple(ENCODERS)), doc="which towers get LoRA: both, vision or text")
    position: str = param("all", Options(tuple(POSITIONS)), doc="which blocks (fractions of the tower's depth)")
    iterations_per_shot: int = param(
        500, Interval(Integral, 1, None, closed="left"), doc="training iterations per shot K (ignored if iterations)"
    )
    iterations: int | None = param(
        None, Optional(Interval(Integral, 1, None, closed="left")), doc="training iterations (None: per_shot × K)"
    )
    batch_size: int = param(32, BATCH_SIZE, doc="support images per iteration (passes reshuffle; no drop_last)")
    lr: float = param(2e-4, LEARNING_RATE, doc="AdamW learning rate (cosine to eta_min, stepped every iteration)")
    weight_decay: float = param(1e-2, WEIGHT_DECAY, doc="AdamW weight decay (on A and B)")
    eta_min: float = param(1e-6, Interval(Real, 0, None, closed="left"), doc="final learning rate of the cosine")
    evaluations: int = param(
        10, Interval(Integral, 1, None, closed="left"), doc="selection='val': validations, every ⌈iterations/this⌉"
    )
    amp: str = param("fp16", Options(tuple(AMP)), doc="autocast dtype on CUDA (fp16 adds loss scaling); CPU: fp32")
    template: str = param("a photo of a {}.", Template(), doc="the prompt of the trained text classifier")
    augmentation: str = param("dassl_train", Options(AUGMENT_PRESETS), doc="augmentation of the support images")
    seed: int = param(1, SEED, doc="seed of the LoRA init, dropout, batch order and augmentation draws")

    def _check_params(self) -> None:
        if self.lr < self.eta_min:
            raise MethodError(f"{self.name}: lr={self.lr} is below eta_min={self.eta_min}; the cosine would rise.")

    def _fit(self, data: ImageEpisode) -> dict[str, Any]:
        backbone = data.loaded if data.loaded is not None else data.backbone.load()
        if backbone.backend not in IMAGE_PREFIX:
            raise MethodError(f"{self.name}: backend {backbone.backend!r} is not supported (open_clip, hf).")
        device = backbone.device
        model = training_copy(backbone)
        adapters = add_lora(
            model,
            backbone.backend,
            towers=ENCODERS[self.encoders],
            position=self.position,
            rank=int(self.rank),
            alpha=float(self.lora_alpha),
            dropout=float(self.dropout),
            generator=torch.Generator().manual_seed(int(self.seed)),
        )
        params = lora_parameters(model)
        dropout_rng = torch.Generator(device).manual_seed(int(self.seed) + 1)
        seed_dropout(model, dropout_rng)
        set_lora_training(model, True)

        train, val = data.train, data.val
        root, options = data.splits.root, data.options
        shots = int(data.shots_per_class().max()) if train else 0
        total = total_iterations(self.iterations, self.iterations_per_shot, shots)
        rounds = evaluation_rounds(total, self.evaluations if self.selection == "val" and val else 1)
        augment, plain = backbone.augment(self.augmentation), backbone.preprocess
        prompts = [fill_template(self.template, c) for c in data.classnames]  # underscores become spaces
        tokens = {k: v.to(device) for k, v in backbone._tokenize(prompts).items()}
        adapted = dataclasses.replace(backbone, model=model)
        train_text = "text" in ENCODERS[self.encoders]

        def text_features() -> torch.Tensor:
            if backbone.backend == "open_clip":
                out = encode_text_trimmed(model, tokens["text"])
            else:
                out = adapted._forward_text(tokens)
            return F.normalize(out.float(), dim=-1)

        def image_features(images: torch.Tensor) -> torch.Tensor:
            return backbone.forward_image(model, images.to(device, non_blocking=True)).float()

        fixed_text = None
        if not train_text:
            with torch.no_grad():
                fixed_text = text_features()

        unreadable: set[str] = set()
        order_rng = torch.Generator().manual_seed(int(self.seed))
        schedule_keys = support_schedule(len(train), int(self.batch_size), total, order_rng)
        workers = loader_workers(options.num_workers, device, sum(len(b) for b in schedule_keys))
        batches_left = support_batches(
            root, train, augment, options, schedule_keys, int(self.seed), unreadable, workers
        )

        def loss(images_labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            images, labels = images_labels
            text = fixed_text if fixed_text is not None else text_features()
            logits = LOGIT_SCALE * F.normalize(image_features(images), dim=-1) @ text.T
            return F.cross_entropy(logits.float(), labels.to(device))

        val_options = dataclasses.replace(options, num_workers=loader_workers(options.num_workers, device, len(val)))

        def val_accuracy() -> float:
            set_lora_training(model, False)
            text = fixed_text if fixed_text is not None else text_features()
            batches = image_batches(root, val, plain, val_options, 128, unreadable=unreadable)
            accuracy = readable_accuracy(batches, lambda images: image_features(images) @ text.T, val, unreadable)
            set_lora_training(model, True)
            return accuracy

        optimizer = adamw(list(params.values()), lr=float(self.lr), weight_decay=float(self.weight_decay))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=float(self.eta_min))
        amp = AMP[self.amp] if device.type == "cuda" else None
        try:
            result = fit_epochs(
                params,
                optimizer,
                len(rounds),
                lambda r: itertools.islice(batches_left, rounds[r - 1]),
                loss,
                name=self.name,
                lr=float(self.lr),
                evaluate=val_accuracy if self.selection == "val" and val else None,
                scheduler=schedule,
                weight=lambda images_labels: images_labels[1].numel(),
                steps_per_epoch=rounds[0],
                mixed_precision=amp,
            )
        finally:
            batches_left.close()
        taken = [int(optimizer.state[p]["step"]) if "step" in optimizer.state[p] else 0 for p in params.values()]
        self.skipped_steps_ = total - (max(taken) if taken else 0)
        if self.skipped_steps_:
            logger.warning("%s: loss scaling skipped %d of %d steps (overflow)", self.name, self.skipped_steps_, total)

        with torch.no_grad():
            for name, value in result.state.items():
                params[name].copy_(value)
        set_lora_training(model, False)
        seed_dropout(model, None)
        ends = list(itertools.accumulate(rounds))
        for record in result.history:
            record["iteration"] = ends[record["epoch"] - 1]
        state = merged_weights(model, IMAGE_PREFIX[backbone.backend])
        with torch.no_grad():
            self.text_ = (fixed_text if fixed_text is not None else text_features()).float().cpu().clone()
        self.encoder_state_ = state
        self.encoder_scope_ = SCOPE
        self.encoder_sha256_ = state_sha256(state) if state else None
        self.lora_state_ = lora_state(model)
        self.backbone_spec_ = data.backbone.to_dict()
        self.skipped_images_ = sorted(unreadable)
        self.trained_parameters_ = int(sum(p.numel() for p in params.values()))
        self.adapted_modules_ = sorted(adapters)
        self.iterations_ = total
        self.best_epoch_ = result.best_epoch
        self.best_iteration_ = ends[result.best_epoch - 1]
        self.history_ = result.history
        if result.best_accuracies is not None:
            self._val_accuracy_ = float(result.best_accuracies[0])
        else:  # selection "none": the final iterate, scored once on the validation images if there are any
            with torch.no_grad():
                self._val_accuracy_ = val_accuracy() if val else None
        self._encoder_ = self._merged(backbone)
        return {"iterations": total, "best_iteration": self.best_iteration_}

    def _merged(self, backbone: Backbone) -> Backbone:
        """``backbone`` with the merged image weights (itself when the image tower has no LoRA)."""
        if not self.encoder_state_:
            return backbone
        return merged_backbone(backbone, self.encoder_state_, {"scope": SCOPE, "sha256": self.encoder_sha256_})

    def _build_encoder(self, spec: BackboneSpec) -> Backbone:
        """The image encoder with the merged LoRA weights, a plain inference :class:`~fewclip.models.Backbone`
        (the backbone of ``spec`` with ``encoder_state_``; no LoRA code path)."""
        return self._merged(spec.load())
