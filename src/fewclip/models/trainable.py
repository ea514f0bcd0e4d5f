"""The image encoder of a loaded CLIP model in train mode, for methods that fine-tune it on images.

>>> tb = TrainableBackbone.from_spec(BackboneSpec("ViT-B/16", "openai", device="cuda"), scope="last")
>>> opt = torch.optim.AdamW(tb.parameters(), lr=1e-5)
>>> scaler = torch.amp.GradScaler(enabled=tb.autocast_dtype == torch.float16)
>>> feats = tb.image_features(images)               # [B, D] float32, with autograd, image tower in train mode
>>> encoder = tb.frozen()                           # an inference Backbone over the fine-tuned weights
>>> state = tb.trainable_state()                    # rebuild elsewhere: from_spec(spec, "last", state=state)

What trains (``scope``):

========= ===============================================================================================
``all``   every parameter of the image tower, its projection included
``last``  the tower's final block and everything after it: open_clip ViT ``transformer.resblocks[-1]``,
          ``ln_post``, ``proj`` (and an attention pool if the model has one); open_clip ModifiedResNet
          ``layer4[-1]`` and ``attnpool``; transformers ``CLIPModel`` ``vision_model.encoder.layers[-1]``,
          ``vision_model.post_layernorm`` and ``visual_projection``
========= ===============================================================================================

The rest of the model, the text tower included, is frozen (``requires_grad=False``). The trainable copy holds
its own float32 image tower (the master weights, whatever the backbone's inference precision); the text tower
and everything else outside the image tower is the loaded backbone's own storage, never written. BatchNorm
layers (ModifiedResNet) stay in eval mode in :meth:`TrainableBackbone.train`: they keep the statistics learnt in
pre-training instead of re-estimating them on few-shot batches, so the fine-tuned state is the trainable
parameters alone (open_clip's ``lock(freeze_bn_stats=True)`` makes the same choice).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import BackboneError
from .backbone import PRECISIONS, Backbone
from .spec import BackboneSpec

SCOPES = ("all", "last")


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _last_prefixes(backbone: Backbone) -> tuple[str, ...]:
    """Parameter-name prefixes of the image tower's final block and what follows it."""
    model = backbone.model
    if backbone.backend == "hf":
        from transformers import CLIPModel

        if isinstance(model, CLIPModel):
            last = len(model.vision_model.encoder.layers) - 1
            return (f"vision_model.encoder.layers.{last}", "vision_model.post_layernorm", "visual_projection")
    elif backbone.backend == "open_clip":
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import VisionTransformer

        visual = model.visual
        if isinstance(visual, VisionTransformer):
            tail = [f"visual.transformer.resblocks.{len(visual.transformer.resblocks) - 1}"]
            for name in ("attn_pool", "attn_pool_contrastive", "ln_post", "proj"):
                if getattr(visual, name, None) is not None:
                    tail.append(f"visual.{name}")
            return tuple(tail)
        if isinstance(visual, ModifiedResNet):
            return (f"visual.layer4.{len(visual.layer4) - 1}", "visual.attnpool")
    tower = ", ".join(f"{type(getattr(model, n, None)).__name__} ({n})" for n in backbone.image_tower)
    raise BackboneError(
        f"scope 'last' is not defined for model {backbone.identity.get('model')!r}: its image tower is {tower}, "
        "and fewclip knows the final block of open_clip VisionTransformer and ModifiedResNet and of transformers "
        f"CLIPModel only. Scopes: {', '.join(SCOPES)}; 'all' works for every model."
    )


def _copy_model(model: nn.Module, tower: tuple[str, ...]) -> nn.Module:
    """A copy of ``model`` with its own image tower (the children named ``tower``); every other parameter is the
    same storage as ``model``'s behind a new, frozen ``nn.Parameter``, every other buffer the same tensor."""
    memo: dict[int, Any] = {}
    for name, param in model.named_parameters():
        if not _under(name, tower):
            memo[id(param)] = nn.Parameter(param.detach(), requires_grad=False)
    for name, buffer in model.named_buffers():
        if not _under(name, tower):
            memo[id(buffer)] = buffer
    return copy.deepcopy(model, memo)


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 of a state dict's names, shapes, dtypes and bytes, independent of the dict's order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, list(tensor.shape), str(tensor.dtype)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class TrainableBackbone:
    """The image encoder of ``backbone`` as a trainable module; ``scope`` (``all``, ``last``) says what trains.

    Built in train mode. ``backbone`` itself is left as it was: it keeps encoding with the pre-trained weights.
    With an fp16 or bf16 ``backbone`` the float32 master weights start from its rounded weights: the weights its
    features come from.

    Attributes: ``backbone`` (the loaded :class:`Backbone`), ``scope``, ``spec`` (the :class:`BackboneSpec`
    ``backbone`` was loaded from, if given: what a worker needs to rebuild it), ``model`` (the whole model, the
    image tower its own float32 copy) and ``trainable_names`` (the trainable parameters' names, in model order).
    """

    def __init__(self, backbone: Backbone, scope: str, *, spec: BackboneSpec | None = None):
        if scope not in SCOPES:
            raise BackboneError(f"scope {scope!r} is unknown; choose one of {list(SCOPES)}.")
        tower = backbone.image_tower
        prefixes = tower if scope == "all" else _last_prefixes(backbone)
        self.backbone = backbone
        self.scope = scope
        self.spec = spec
        self.model = _copy_model(backbone.model, tower)
        for child in tower:
            getattr(self.model, child).float()
        self.trainable_names = tuple(n for n, _ in self.model.named_parameters() if _under(n, prefixes))
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in self.trainable_names)
        self.model.eval()
        self.train()

    def __repr__(self) -> str:
        count = sum(p.numel() for p in self.parameters())
        return (
            f"TrainableBackbone(model={self.backbone.identity.get('model')!r}, scope={self.scope!r}, "
            f"trainable={count:,} parameters, training={self.training})"
        )

    @classmethod
    def from_spec(
        cls, spec: BackboneSpec, scope: str, *, state: Mapping[str, torch.Tensor] | None = None
    ) -> TrainableBackbone:
        """Load ``spec`` and make it trainable; ``state`` (a :meth:`trainable_state`) restores fine-tuned weights."""
        trainable = cls(spec.load(), scope, spec=spec)
        if state is not None:
            trainable.load_trainable_state(state)
        return trainable

    # ------------------------------------------------------------------ training

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def precision(self) -> str:
        return str(self.backbone.identity["precision"])

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype :meth:`image_features` autocasts to: the backbone's precision when it is fp16 or bf16 on CUDA,
        else None (float32). Use ``torch.amp.GradScaler(enabled=tb.autocast_dtype == torch.float16)``."""
        if self.device.type == "cuda" and self.precision in ("fp16", "bf16"):
            return PRECISIONS[self.precision]
        return None

    @property
    def training(self) -> bool:
        return getattr(self.model, self.backbone.image_tower[0]).training

    def train(self, mode: bool = True) -> TrainableBackbone:
        """Put the image tower in train mode (``mode=False``: eval mode); BatchNorm layers always stay in eval."""
        for child in self.backbone.image_tower:
            module = getattr(self.model, child)
            module.train(mode)
            for sub in module.modules():
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    sub.eval()
        return self

    def eval(self) -> TrainableBackbone:
        return self.train(False)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the trainable parameters, named as in the model's state dict."""
        names = set(self.trainable_names)
        return ((n, p) for n, p in self.model.named_parameters() if n in names)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters (float32, on the backbone's device): what an optimiser updates."""
        return [p for _, p in self.named_parameters()]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] preprocessed images → [B, D] float32 raw embeddings on the device, with autograd."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise BackboneError(f"image_features expects a [B, 3, H, W] batch, got shape {list(images.shape)}.")
        images = images.to(self.device, torch.float32, non_blocking=True)
        dtype = self.autocast_dtype
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with autocast:
            out = self.backbone.forward_image(self.model, images)
        return out.float()

    def train_transform(self, preset: str = "tip_cache") -> Callable:
        """The random augmentation of ``preset`` (:mod:`fewclip.models.preprocess`) at the model's size."""
        return self.backbone.augment(preset)

    def eval_transform(self) -> Callable:
        """The backbone's evaluation transform (``backbone.preprocess``)."""
        return self.backbone.preprocess

    # ------------------------------------------------------------------ state

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Detached float32 CPU copies of the trainable parameters, named as in the model's state dict."""
        return {n: p.detach().float().cpu().clone() for n, p in self.named_parameters()}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> TrainableBackbone:
        """Copy a :meth:`trainable_state` (of the same model and scope) into the trainable parameters."""
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [
            f"{n} {list(state[n].shape)} (model: {list(own[n].shape)})"
            for n in sorted(set(own) & set(state))
            if tuple(state[n].shape) != tuple(own[n].shape)
        ]
        if missing or unexpected or shapes:
            problems = [
                f"missing keys {missing}" if missing else "",
                f"unexpected keys {unexpected}" if unexpected else "",
                f"shape mismatches {shapes}" if shapes else "",
            ]
            raise BackboneError(
                f"trainable state does not fit model {self.backbone.identity.get('model')!r} with scope "
                f"{self.scope!r}: {'; '.join(p for p in problems if p)}."
            )
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(state[name])
        return self

    def state_sha256(self, state: Mapping[str, torch.Tensor] | None = None) -> str:
        """:func:`state_sha256` of ``state`` (default: the current :meth:`trainable_state`)."""
        return state_sha256(self.trainable_state() if state is None else state)

    def frozen(self) -> Backbone:
        """An inference :class:`Backbone` over the current fine-tuned weights, at the backbone's precision.

        It owns a copy of the image tower, so later training steps do not change it; its text tower is the
        backbone's. Its ``identity`` (and ``cache_key()``) adds ``finetuned``: the scope and :meth:`state_sha256`
        (and, if the backbone was itself fine-tuned, that record under ``from``).
        """
        base = self.backbone
        model = _copy_model(base.model, base.image_tower)  # the tower in the backbone's own dtypes
        own = dict(self.named_parameters())
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in own:
                    param.copy_(own[name])
        model.eval().requires_grad_(False)
        identity = copy.deepcopy(base.identity)
        finetuned: dict[str, Any] = {"scope": self.scope, "sha256": self.state_sha256()}
        if base.identity.get("finetuned") is not None:
            finetuned["from"] = base.identity["finetuned"]
        identity["finetuned"] = finetuned
        return dataclasses.replace(base, model=model, identity=identity)
