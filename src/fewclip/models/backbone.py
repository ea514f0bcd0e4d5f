"""The :class:`Backbone` type: a loaded CLIP model that encodes images and text, whichever library loaded it.

Each library gets a small subclass (:class:`~fewclip.models.load_open_clip.OpenClipBackbone`,
:class:`~fewclip.models.load_hf.HFBackbone`) that says how to tokenise and how to run the two towers; everything
the rest of fewclip relies on (float32 CPU outputs, inference mode, the identity and cache key, the transforms)
lives here once.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch

from ..errors import BackboneError
from .names import ModelSpec
from .preprocess import ImageSpec, augment_transform, eval_transform

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

BackboneT = TypeVar("BackboneT", bound="Backbone")


@dataclass(eq=False)
class Backbone(ABC):
    """A loaded CLIP model: image and text encoders plus the transforms that go with them.

    ``encode_images`` and ``encode_text`` return raw (unnormalised) float32 CPU tensors; the model runs in
    ``precision`` on ``device`` under ``torch.inference_mode``. ``identity`` holds everything that determines the
    features (backend, model, weights, precision, preprocessing) and goes into cache keys and results.
    """

    #: the library that loaded the model: ``open_clip`` or ``hf``
    backend: ClassVar[str]
    #: names of the children of ``model`` that make up the image encoder (its projection included)
    image_tower: ClassVar[tuple[str, ...]]

    model: Any
    tokenizer: Any = field(repr=False)
    device: torch.device
    dtype: torch.dtype
    image_spec: ImageSpec  # the model's own preprocessing
    preprocess: Callable  # PIL image -> [3, S, S] tensor: the evaluation transform
    preprocess_name: str
    preprocess_description: str
    applied_spec: ImageSpec  # the spec of the evaluation transform actually used
    identity: dict[str, Any]
    context_length: int = 77

    # ------------------------------------------------------------------ what each library says

    @staticmethod
    @abstractmethod
    def forward_image(model: Any, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] → [B, D] through the image tower of ``model`` (this backbone's or a copy of it).

        No inference mode, dtype or device handling: callers decide (``encode_images``, a trainable copy).
        """

    @abstractmethod
    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts → the keyword tensors ``_forward_text`` takes (on CPU)."""

    @abstractmethod
    def _forward_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokens (on ``device``) → [T, D] text embeddings."""

    @abstractmethod
    def _token_lengths(self, texts: list[str]) -> list[int] | None:
        """Untruncated token counts (SOT and EOT included), or None when the tokenizer cannot tell."""

    # ------------------------------------------------------------------ shared

    @classmethod
    def assemble(
        cls: type[BackboneT],
        *,
        spec: ModelSpec,
        model: Any,
        tokenizer: Any,
        precision: str,
        device: torch.device,
        image_spec: ImageSpec,
        preprocess: str,
        weights: dict[str, Any],
        quick_gelu: bool,
        embed_dim: int,
        context_length: int,
    ) -> BackboneT:
        """The step every loader ends with: build the evaluation transform and the identity, then the object."""
        transform, description, applied = eval_transform(preprocess, image_spec)
        preset = json.loads(description)["preset"]
        identity = {
            "backend": spec.backend,
            "model": spec.name,
            "model_requested": spec.requested,
            "pretrained": spec.pretrained,
            "weights": weights,
            "quick_gelu": quick_gelu,
            "precision": precision,
            "preprocess": preset,
            "preprocess_description": description,
            "image_size": applied.size,
            "embed_dim": embed_dim,
        }
        return cls(
            model=model,
            tokenizer=tokenizer,
            device=device,
            dtype=PRECISIONS[precision],
            image_spec=image_spec,
            preprocess=transform,
            preprocess_name=preset,
            preprocess_description=description,
            applied_spec=applied,
            identity=identity,
            context_length=context_length,
        )

    @property
    def image_size(self) -> int:
        return self.applied_spec.size

    @property
    def embed_dim(self) -> int:
        return int(self.identity["embed_dim"])

    def cache_key(self) -> dict[str, Any]:
        """The identity fields that change features: not paths (weights are identified by their SHA-256, so a
        moved checkpoint keeps its cache), device or library versions. A fine-tuned copy
        (:meth:`fewclip.models.TrainableBackbone.frozen`) adds its ``finetuned`` record."""
        keep = ("backend", "model", "weights", "quick_gelu", "precision", "preprocess_description")
        key = {k: self.identity.get(k) for k in keep}
        weights = dict(key["weights"] or {})
        if weights.get("sha256"):
            weights = {k: v for k, v in weights.items() if k in ("sha256", "config_sha256")}
            if str(key["model"]).startswith("local-dir:"):
                key["model"] = "local-dir"
            elif self.backend == "hf":
                key["model"] = "hf-folder"
        key["weights"] = weights
        if self.identity.get("finetuned") is not None:
            key["finetuned"] = self.identity["finetuned"]
        return key

    def augment(self, preset: str = "tip_cache") -> Callable:
        """The random augmentation transform of ``preset`` at this model's size and normalisation."""
        return augment_transform(preset, self.applied_spec)[0]

    def augment_description(self, preset: str = "tip_cache") -> str:
        return augment_transform(preset, self.applied_spec)[1]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] preprocessed images → [B, D] float32 raw embeddings (on CPU)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise BackboneError(f"encode_images expects a [B, 3, H, W] batch, got shape {list(images.shape)}.")
        with torch.inference_mode():
            out = self.forward_image(self.model, images.to(self.device, self.dtype, non_blocking=True))
            out = out.float().cpu()
        return out.clone()  # a normal tensor, usable in autograd outside inference mode

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """T prompts → [T, D] float32 raw embeddings (on CPU). Overlong prompts are truncated (see count_truncated)."""
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.embed_dim)
        with torch.inference_mode():
            tokens = {k: v.to(self.device) for k, v in self._tokenize(texts).items()}
            out = self._forward_text(tokens).float().cpu()
        return out.clone()

    def count_truncated(self, texts: Sequence[str]) -> int | None:
        """How many of ``texts`` exceed the context length (SOT and EOT included); None if the tokenizer can't say."""
        lengths = self._token_lengths(list(texts))
        if lengths is None:
            return None
        return sum(n > self.context_length for n in lengths)
