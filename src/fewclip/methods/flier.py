"""FLIER (Zhou, Zhou & Pan, arXiv 2410.07648): CLIP's image encoder fine-tuned on the real support images and on
Stable Diffusion images, with a small latent encoder trained jointly on those images' final denoised latents.

Two branches (``/work/shared/specs/flier.md`` §4–§6):

- the CLIP branch h: the open_clip (or transformers) image tower, fine-tuned (``blocks``: all of it, or the last N
  transformer blocks and what follows them; the patch-embedding convolution stays frozen, as released), then a
  linear head over the L2-normalised projected embedding, z = 100·n(f)·Wᵀ + b, W initialised from the zero-shot
  text classifier (``head_init="text"``) or FT-CLIP's random init (``"random"``: trunc-normal std 0.02 × 0.001);
- the latent branch g (:class:`LatentEncoder`): 1×1 conv 4→10, max-pool 2, ReLU, 1×1 conv 10→3, max-pool 2, ReLU,
  flatten, linear to C logits; its input size is read from the latents (4×64×64 for SD at 512 px).

Loss per epoch (two passes, as released): over the real support, CE_ε(h(x), y); over the generated images drawn for
the episode (as many per class as the class has real support images, seeded), (1 − λ)·CE_ε(h(x̃), y) +
λ·CE_ε(g(z̃), y), with label smoothing ε. AdamW with layer-wise LR decay (scale decay^(L + 1 − layer id)), linear
warm-up then a per-step cosine to ``min_lr``, an EMA of the trained weights, and mixed precision on CUDA when the
backbone runs in fp16/bf16.

Differences from the released code, each deliberate: g's parameters are optimised (the released optimiser never
received them, so g stayed at its random init; ``train_latent_encoder=False`` reproduces that, labelled); the epoch
and raw-vs-EMA weights are chosen on validation, never on test (the released scripts took the best test epoch); the
head reads the projected CLIP embedding (so it can start from the text classifier, and test images go through the
ordinary extraction with the fine-tuned encoder) instead of FT-CLIP's ``fc_norm`` over the mean patch token.

At test time only the CLIP branch predicts, as released: g has no path to the classifier, so its loss acts as an
auxiliary term only through the (1 − λ) down-weighting of the generated images' CLIP loss (spec §7, [analysis]).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Item
from ..errors import MethodError
from ..generation.types import GeneratedSet
from ..models import AUGMENT_PRESETS
from .image import LOGIT_SCALE, ImageEpisode, ImageMethod, image_batches, readable_accuracy
from .params import Boolean, Integral, Interval, Options, Real, param
from .registry import register
from .training import BATCH_SIZE, EPOCHS, LEARNING_RATE, SEED, WEIGHT_DECAY, adamw, fit_epochs

HEAD_INITS = ("text", "random")
#: FT-CLIP's head init: trunc-normal weights (std 0.02), then weights and biases scaled by 0.001
HEAD_INIT_STD, HEAD_INIT_SCALE = 0.02, 0.001
UNIT = Interval(Real, 0, 1, closed="both")

# --------------------------------------------------------------------------- the maths


def flier_loss(
    clip_logits: torch.Tensor,
    labels: torch.Tensor,
    latent_logits: torch.Tensor | None = None,
    *,
    latent_weight: float,
    smoothing: float,
) -> torch.Tensor:
    """FLIER's batch loss. Real images (``latent_logits`` None): CE_ε(h(x), y). Generated images:
    (1 − λ)·CE_ε(h(x̃), y) + λ·CE_ε(g(z̃), y). CE_ε is the batch-mean label-smoothing cross-entropy
    (1 − ε)·(−log p_y) + ε·mean_c(−log p_c) (timm's ``LabelSmoothingCrossEntropy``). Logits [B, C], labels [B]."""
    clip = F.cross_entropy(clip_logits.float(), labels, label_smoothing=smoothing)
    if latent_logits is None:
        return clip
    latent = F.cross_entropy(latent_logits.float(), labels, label_smoothing=smoothing)
    return (1.0 - latent_weight) * clip + latent_weight * latent


def lr_at(step: int, *, base: float, minimum: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate before optimiser step ``step`` (0-based): linear warm-up from 0 (``base·step/warmup``)
    for ``warmup_steps`` steps, then a cosine from ``base`` down to ``minimum`` over the remaining steps (BEiT/FT-CLIP's
    ``cosine_scheduler``, per step)."""
    if step < warmup_steps:
        return base * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return minimum + 0.5 * (base - minimum) * (1.0 + math.cos(math.pi * progress))


_BLOCK = re.compile(r"^(?:visual\.transformer\.resblocks|vision_model\.encoder\.layers)\.(\d+)\.")
_EMBEDDINGS = (
    "visual.class_embedding",
    "visual.positional_embedding",
    "visual.conv1.",
    "visual.ln_pre.",
    "vision_model.embeddings.",
    "vision_model.pre_layrnorm.",
)
#: the patch-embedding convolution: frozen, as in FT-CLIP ("copied from the DeCLIP codebase")
PATCH_EMBEDDING = ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight")
_NO_DECAY_NAMES = ("class_embedding", "positional_embedding", "position_embedding.weight")


def layer_id(name: str, num_blocks: int) -> int:
    """The LLRD layer of a parameter: 0 for the embeddings and the pre-norm, k + 1 for transformer block k, and
    ``num_blocks + 1`` for what follows the blocks (final norm, projection) and FLIER's heads."""
    match = _BLOCK.match(name)
    if match:
        return int(match.group(1)) + 1
    if name.startswith(_EMBEDDINGS):
        return 0
    return num_blocks + 1


def lr_scale(layer: int, num_blocks: int, decay: float) -> float:
    """decay^(num_blocks + 1 − layer): 1 for the heads, decay^(L − k) for block k, decay^(L + 1) for the embeddings."""
    return float(decay ** (num_blocks + 1 - layer))


def no_weight_decay(name: str, tensor: torch.Tensor) -> bool:
    """timm's rule, as FT-CLIP applies it: no decay on biases, 1-D parameters (norms) and the class and
    positional embeddings."""
    return tensor.dim() <= 1 or name.endswith(".bias") or name.endswith(_NO_DECAY_NAMES)


def param_groups(
    named: Iterable[tuple[str, torch.Tensor]], *, num_blocks: int, layer_decay: float, weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW parameter groups, one per (layer, decay or not): each with ``params``, ``names``, ``layer``,
    ``lr_scale`` (:func:`lr_scale`) and ``weight_decay`` (0 where :func:`no_weight_decay`)."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, tensor in named:
        layer = layer_id(name, num_blocks)
        skip = no_weight_decay(name, tensor)
        group = groups.setdefault(
            (layer, skip),
            {
                "params": [],
                "names": [],
                "layer": layer,
                "lr_scale": lr_scale(layer, num_blocks, layer_decay),
                "weight_decay": 0.0 if skip else float(weight_decay),
            },
        )
        group["params"].append(tensor)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def ema_update(ema: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """In place: ema ← decay·ema + (1 − decay)·param (timm ``ModelEma``), for every pair."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema), [p.detach() for p in params], 1.0 - decay)


def select_weights(scores: Sequence[tuple[float, float | None]]) -> tuple[int, str, float]:
    """(1-based epoch, ``"raw"`` or ``"ema"``, accuracy): the best of every epoch's (raw, EMA) validation accuracies
    (EMA None: not evaluated); ties go to the earliest epoch, then to the raw weights."""
    best: tuple[int, str, float] | None = None
    for epoch, (raw, averaged) in enumerate(scores, 1):
        for kind, accuracy in (("raw", raw), ("ema", averaged)):
            if accuracy is not None and (best is None or accuracy > best[2]):
                best = (epoch, kind, float(accuracy))
    if best is None:
        raise MethodError("flier: no validation accuracy was recorded to select from.")
    return best


def draw_generated(labels: torch.Tensor, per_class: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``per_class[c]`` samples of each class c among ``labels`` [n], drawn without replacement (all of
    a class's samples when it has fewer), sorted by class then draw order."""
    chosen = []
    for c in range(per_class.numel()):
        rows = (labels == c).nonzero().flatten()
        want = min(int(per_class[c]), rows.numel())
        if want:
            chosen.append(rows[torch.randperm(rows.numel(), generator=generator)[:want]])
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)


class LatentEncoder(nn.Module):
    """FLIER's latent encoder g: [B, c, h, w] latents → [B, C] logits (spec §4, size-agnostic).

    1×1 conv c→10, max-pool 2, ReLU, 1×1 conv 10→3, max-pool 2, ReLU, flatten (3·⌊⌊h/2⌋/2⌋·⌊⌊w/2⌋/2⌋ features),
    linear to C. The convolutions keep PyTorch's default init; the linear layer FT-CLIP's head init."""

    def __init__(self, latent_shape: Sequence[int], num_classes: int):
        super().__init__()
        channels, height, width = (int(s) for s in latent_shape)
        if height < 4 or width < 4:
            raise MethodError(f"flier: latents of shape {list(latent_shape)} are too small; the latent encoder pools "
                              "twice by 2, so it needs h, w ≥ 4 (Stable Diffusion at 512 px: 4×64×64).")  # fmt: skip
        self.latent_shape = (channels, height, width)
        self.conv1 = nn.Conv2d(channels, 10, kernel_size=1)
        self.conv2 = nn.Conv2d(10, 3, kernel_size=1)
        self.head = nn.Linear(3 * (height // 4) * (width // 4), num_classes)
        with torch.no_grad():
            nn.init.trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
            self.head.weight.mul_(HEAD_INIT_SCALE)
            self.head.bias.mul_(HEAD_INIT_SCALE)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(latents), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return self.head(x.flatten(1))


def _num_blocks(model: nn.Module, backend: str, what: str) -> int:
    """Transformer blocks of the image tower (open_clip VisionTransformer or transformers CLIPModel)."""
    if backend == "open_clip":
        from open_clip.transformer import VisionTransformer

        if isinstance(model.visual, VisionTransformer):
            return len(model.visual.transformer.resblocks)
    elif backend == "hf" and hasattr(model, "vision_model"):
        return len(model.vision_model.encoder.layers)
    raise MethodError(
        f"flier fine-tunes a ViT image tower with layer-wise learning rates, but {what} is not one (image tower "
        f"{type(getattr(model, 'visual', model)).__name__}); use a ViT backbone such as ViT-B/16."
    )


def set_lr(optimizer: torch.optim.Optimizer, rate: float) -> None:
    """Every parameter group's learning rate: ``rate`` × its ``lr_scale`` (the layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = rate * group.get("lr_scale", 1.0)


def _swap(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> None:
    """Exchange the storage of each pair (no copy): swapping twice restores both."""
    for x, y in zip(a, b):
        x.data, y.data = y.data, x.data


class _StepHook:
    """Called by the epoch loop after every optimiser step (its ``scheduler``): the EMA update, then the learning
    rate of the next step (:func:`lr_at` × each group's ``lr_scale``)."""

    def __init__(self, optimizer, rate, trained: list[torch.Tensor], ema: list[torch.Tensor] | None, decay: float):
        self.optimizer, self.rate, self.trained, self.ema, self.decay = optimizer, rate, trained, ema, decay
        self.steps = 0
        set_lr(optimizer, rate(0))

    def step(self) -> None:
        self.steps += 1
        if self.ema is not None:
            ema_update(self.ema, self.trained, self.decay)
        set_lr(self.optimizer, self.rate(self.steps))


def generated_items(generated: GeneratedSet, rows: torch.Tensor) -> list[Item]:
    """The drawn generated images as items whose ``label`` is their row in ``rows`` (so a batch finds its labels
    and latents even when an unreadable image is left out); paths are absolute."""
    return [
        Item(str(generated.images[r]), i, generated.classnames[int(generated.labels[r])])
        for i, r in enumerate(rows.tolist())
    ]


@register("flier")
@dataclass(kw_only=True, repr=False, eq=False)
class FLIER(ImageMethod):
    blocks: int = param(
        0,
        Interval(Integral, 0, None, closed="left"),
        doc="transformer blocks fine-tuned, counted from the last (with the final norm and projection); 0: every "
        "block and the embeddings (the patch-embedding convolution stays frozen, as released)",
    )
    epochs: int = param(150, EPOCHS, doc="epochs; each is a pass over the real support, then one over the generated")
    batch_size: int = param(64, BATCH_SIZE, doc="images per step (the released global batch: 32 per GPU × 2)")
    lr: float = param(1e-4, LEARNING_RATE, doc="peak AdamW learning rate (of the heads; blocks get less, by LLRD)")
    min_lr: float = param(1e-6, Interval(Real, 0, None, closed="left"), doc="end of the cosine schedule")
    warmup_epochs: int = param(5, Interval(Integral, 0, None, closed="left"), doc="linear warm-up from 0, in epochs")
    weight_decay: float = param(0.05, WEIGHT_DECAY, doc="AdamW weight decay (none on biases, norms, embeddings)")
    layer_decay: float = param(
        0.7, Interval(Real, 0, 1, closed="right"), doc="layer-wise LR decay: scale decay^(L + 1 − layer)"
    )
    smoothing: float = param(0.1, Interval(Real, 0, 1, closed="left"), doc="label smoothing ε of every CE term")
    latent_weight: float = param(0.5, UNIT, doc="λ: weight of the latent branch's CE on generated samples")
    ema_decay: float = param(
        0.9998,
        Interval(Real, 0, 1, closed="left"),
        doc="decay of the EMA of the trained weights; raw or EMA weights are chosen on validation (0: no EMA)",
    )
    head_init: str = param(
        "text",
        Options(HEAD_INITS),
        doc="classification head from the zero-shot text classifier, or FT-CLIP's random init (as released; refused "
        "when a class has no support images, base-to-new or cross-dataset, as its rows would stay random)",
    )
    train_latent_encoder: bool = param(
        True,
        Boolean(),
        doc="optimise the latent encoder jointly; False reproduces the released code, whose optimiser never "
        "received its parameters (it stays at its random init)",
    )
    use_generated: bool = param(
        True,
        Boolean(),
        doc="train on the generated set (fewclip run --generated DIR); False: real images only (the released "
        "'nosd' scripts)",
    )
    generated_shots: int = param(
        0,
        Interval(Integral, 0, None, closed="left"),
        doc="generated samples per class, drawn with the seed; 0: as many as the class has real support images "
        "(as released)",
    )
    augmentation: str = param(
        "flier_timm", Options(AUGMENT_PRESETS), doc="augmentation of real and generated images (released: timm's)"
    )
    seed: int = param(1, SEED, doc="seed of the batch order, augmentation draws, generated draws and random inits")

    def _check_params(self) -> None:
        if self.warmup_epochs >= self.epochs:
            raise MethodError(
                f"flier: warmup_epochs={self.warmup_epochs} leaves no epoch after the warm-up (epochs={self.epochs}); "
                "give fewer warm-up epochs or more epochs."
            )
        if self.min_lr > self.lr:
            raise MethodError(f"flier: min_lr={self.min_lr} exceeds lr={self.lr}; the cosine decays from lr to min_lr.")

    def wants_generated(self) -> bool:
        return bool(self.use_generated)

    def _check(self, data: ImageEpisode) -> None:
        if self.head_init == "random":
            unseen = (data.shots_per_class() == 0).nonzero().flatten().tolist()
            if unseen:
                names = ", ".join(repr(data.classnames[c]) for c in unseen[:5])
                more = f" and {len(unseen) - 5} more" if len(unseen) > 5 else ""
                raise MethodError(
                    f"flier: head_init='random' with {len(unseen)} class(es) without support images ({names}{more}; "
                    "base-to-new or cross-dataset): nothing trains their head rows, so they would stay at the random "
                    "init and be predicted at chance. Use head_init='text' (the default; --set flier:head_init=text), "
                    "whose rows for those classes are the zero-shot text classifier."
                )
        generated = getattr(data, "generated", None)
        if self.use_generated and generated is None:
            raise MethodError(
                "flier trains on generated images, but the episode has none: pass a generated set (fewclip run "
                "--generated DIR, made by fewclip generate), or set use_generated=false (--set "
                "flier:use_generated=false) for the released real-images-only variant."
            )
        if self.use_generated and generated is not None:
            if len(generated.classnames) != data.num_classes:
                raise MethodError(
                    f"flier: the generated set has {len(generated.classnames)} classes, the episode "
                    f"{data.num_classes}; restrict it with generated_for_episode()."
                )
            if not len(generated):
                raise MethodError("flier: the generated set has no samples for the episode's classes.")

    # ------------------------------------------------------------------ fitting

    def _fit(self, data: ImageEpisode) -> dict[str, Any]:
        model = data.trainable("all")
        device = model.device
        backbone = model.backbone
        num_blocks = _num_blocks(model.model, backbone.backend, repr(backbone.identity.get("model")))
        if self.blocks > num_blocks:
            raise MethodError(f"flier: blocks={self.blocks}, but the image tower has {num_blocks} blocks.")
        encoder_trained = [
            n
            for n in model.trainable_names
            if n not in PATCH_EMBEDDING and (self.blocks == 0 or layer_id(n, num_blocks) > num_blocks - self.blocks)
        ]
        keep = set(encoder_trained)
        for name, p in model.named_parameters():
            p.requires_grad_(name in keep)
        num_classes = data.num_classes
        generator = torch.Generator().manual_seed(int(self.seed))
        head_w, head_b = self._init_head(data, generator)
        head_w, head_b = nn.Parameter(head_w.to(device)), nn.Parameter(head_b.to(device))

        generated = data.generated if self.use_generated else None
        latent: LatentEncoder | None = None
        rows = torch.zeros(0, dtype=torch.long)
        if generated is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self.seed))
                latent = LatentEncoder(generated.latent_shape, num_classes).to(device)
            latent.requires_grad_(bool(self.train_latent_encoder))
            per_class = data.shots_per_class() if self.generated_shots == 0 else torch.full(
                (num_classes,), int(self.generated_shots)
            )  # fmt: skip
            rows = draw_generated(generated.labels, per_class * (data.shots_per_class() > 0), generator)
        gen_items = [] if generated is None else generated_items(generated, rows)
        gen_labels = None if generated is None else generated.labels[rows]
        gen_latents = None if generated is None else generated.latents[rows]

        named = {n: p for n, p in model.named_parameters() if n in keep}
        named["head.weight"], named["head.bias"] = head_w, head_b
        if latent is not None and self.train_latent_encoder:
            named.update({f"latent.{n}": p for n, p in latent.named_parameters()})
        groups = param_groups(
            named.items(),
            num_blocks=num_blocks,
            layer_decay=float(self.layer_decay),
            weight_decay=float(self.weight_decay),
        )
        optimizer = adamw(groups, lr=float(self.lr), weight_decay=float(self.weight_decay))

        train, val = data.train, data.val
        root, options = data.splits.root, data.options
        batch = min(int(self.batch_size), max(len(train), len(gen_items)))
        steps = -(-len(train) // batch) + -(-len(gen_items) // batch)
        total = int(self.epochs) * steps

        def rate(step: int) -> float:
            return lr_at(
                step,
                base=float(self.lr),
                minimum=float(self.min_lr),
                warmup_steps=int(self.warmup_epochs) * steps,
                total_steps=total,
            )

        trained = list(named.values())
        use_ema = self.ema_decay > 0
        ema = [p.detach().clone() for p in trained] if use_ema else None
        hook = _StepHook(optimizer, rate, trained, ema, float(self.ema_decay))
        augment, plain = model.train_transform(self.augmentation), model.eval_transform()
        unreadable: set[str] = set()
        latent_loss: dict[int, list[Any]] = {}  # epoch -> [Σ batch loss × rows (a tensor), rows] of the latent branch
        epoch_now = [0]

        def head(features: torch.Tensor) -> torch.Tensor:
            return LOGIT_SCALE * F.normalize(features.float(), dim=-1) @ head_w.T + head_b

        def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
            epoch_now[0] = epoch
            order = torch.randperm(len(train), generator=generator).tolist()
            for images, labels in image_batches(
                root, train, augment, options, batch, seed=int(self.seed), draw=epoch, order=order,
                unreadable=unreadable,
            ):  # fmt: skip
                yield images, labels, None
            if not gen_items:
                return
            order = torch.randperm(len(gen_items), generator=generator).tolist()
            for images, index in image_batches(
                Path(), gen_items, augment, options, batch, seed=int(self.seed), draw=epoch, order=order,
                unreadable=unreadable,
            ):  # fmt: skip
                yield images, gen_labels[index], gen_latents[index]

        def loss(b: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
            images, labels, latents = b
            labels = labels.to(device)
            clip_logits = head(model.image_features(images))
            latent_logits = None if latents is None else latent(latents.to(device))
            if latent_logits is not None:
                part = F.cross_entropy(latent_logits.float(), labels, label_smoothing=float(self.smoothing))
                sums = latent_loss.setdefault(epoch_now[0], [0.0, 0])
                sums[0] = sums[0] + part.detach() * labels.numel()  # on the device: no sync before backward
                sums[1] += labels.numel()
            return flier_loss(
                clip_logits,
                labels,
                latent_logits,
                latent_weight=float(self.latent_weight),
                smoothing=float(self.smoothing),
            )

        def accuracy_now() -> float:
            model.eval()
            batches = image_batches(root, val, plain, options, max(batch, 64), unreadable=unreadable)
            accuracy = readable_accuracy(batches, lambda images: head(model.image_features(images)), val, unreadable)
            model.train()
            return accuracy

        scores: list[tuple[float, float | None]] = []

        def evaluate() -> float:
            raw = accuracy_now()
            averaged = None
            if ema is not None:
                _swap(trained, ema)
                try:
                    averaged = accuracy_now()
                finally:
                    _swap(trained, ema)
            scores.append((raw, averaged))
            return raw if averaged is None else max(raw, averaged)

        tracked = dict(named)
        if ema is not None:
            tracked.update({f"ema/{n}": e for n, e in zip(named, ema)})
        selecting = self.selection == "val" and bool(val)
        result = fit_epochs(
            tracked,
            optimizer,
            int(self.epochs),
            batches,
            loss,
            name=self.name,
            lr=float(self.lr),
            evaluate=evaluate if selecting else None,
            scheduler=hook,
            weight=lambda b: b[1].numel(),
            steps_per_epoch=steps,
            mixed_precision=model.autocast_dtype,
        )
        best = result.best_epoch
        chose_ema = False
        if selecting:
            epoch, weights, _ = select_weights(scores)
            if epoch != best:  # pragma: no cover - the epoch loop keeps the same earliest maximum
                raise MethodError(f"flier: epoch selection disagrees ({epoch} vs {best}); please report this.")
            chose_ema = weights == "ema"
        prefix = "ema/" if chose_ema else ""
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(result.state[prefix + name])
        for record, (raw, averaged) in zip(result.history, scores):
            record["val_accuracy_raw"], record["val_accuracy_ema"] = raw, averaged
        for record in result.history:  # the latent branch's own CE_ε, row-weighted over the epoch's generated batches
            weighted, count = latent_loss.get(record["epoch"], (0.0, 0))
            record["latent_loss"] = float(weighted) / count if count else None

        self.head_weight_ = head_w.detach().float().cpu().clone()
        self.head_bias_ = head_b.detach().float().cpu().clone()
        self.latent_state_ = (
            {} if latent is None else {k: v.detach().cpu().clone() for k, v in latent.state_dict().items()}
        )
        self.latent_shape_ = None if generated is None else list(generated.latent_shape)
        self.encoder_state_ = model.trainable_state()
        self.encoder_scope_ = "all"
        self.encoder_sha256_ = model.state_sha256(self.encoder_state_)
        self.backbone_spec_ = data.backbone.to_dict()
        self.skipped_images_ = sorted(unreadable)
        self.trained_parameters_ = int(sum(p.numel() for p in trained))
        self.trained_blocks_ = num_blocks if self.blocks == 0 else int(self.blocks)
        self.best_epoch_ = best
        self.weights_ = "ema" if chose_ema else "raw"
        self.history_ = result.history
        self.generated_used_ = len(gen_items)
        if latent is None:
            self.latent_encoder_used_ = "none (real images only)"
        else:
            trained_g = self.train_latent_encoder
            self.latent_encoder_used_ = "trained jointly" if trained_g else "untrained (the released code's behaviour)"
        drawn = [] if generated is None else [Path(generated.images[r]) for r in rows.tolist()]
        listing = "\n".join(sorted(f"{p.parent.name}/{p.name}" for p in drawn))  # independent of the folder's place
        self.generated_sha256_ = hashlib.sha256(listing.encode("utf-8")).hexdigest() if gen_items else None
        if selecting:
            self._val_accuracy_ = float(result.best_accuracies[0])
        else:  # selection "none": the raw weights of the last epoch, scored once on validation if there is one
            with torch.no_grad():
                self._val_accuracy_ = accuracy_now() if val else None
        model.eval()
        self._encoder_ = model.frozen()
        return {
            "epoch": best,
            "weights": self.weights_,
            "generated_images": self.generated_used_,
            "generated_drawn_sha256": self.generated_sha256_,
            "latent_encoder": self.latent_encoder_used_,
        }

    def _init_head(self, data: ImageEpisode, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [C, D], b [C]): the zero-shot text rows and 0, or FT-CLIP's init (trunc-normal std 0.02, × 0.001)."""
        num_classes, dim = data.num_classes, data.dim
        if self.head_init == "text":
            return data.text_weights.float().cpu().clone(), torch.zeros(num_classes)
        weight = torch.empty(num_classes, dim)
        nn.init.trunc_normal_(weight, std=HEAD_INIT_STD, generator=generator)
        return weight * HEAD_INIT_SCALE, torch.zeros(num_classes)

    # ------------------------------------------------------------------ prediction

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        """The CLIP branch's head over the fine-tuned encoder's features: 100·n(f)·Wᵀ + b (the latent branch is not
        used at test time, as released)."""
        return LOGIT_SCALE * F.normalize(features, dim=-1) @ self.head_weight_.T + self.head_bias_

    def latent_encoder(self) -> LatentEncoder:
        """The fitted latent encoder g (for inspection: it plays no part in predictions)."""
        self._check_fitted()
        if not self.latent_state_:
            raise MethodError("flier: this model was trained without generated images, so it has no latent encoder.")
        module = LatentEncoder(self.latent_shape_, int(self.latent_state_["head.weight"].shape[0]))
        module.load_state_dict(self.latent_state_)
        return module
