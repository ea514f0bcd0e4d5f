"""Loading Hugging Face transformers ``CLIPModel`` checkpoints (``--backend hf``): hub ids or saved folders."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import BackboneError
from ..io import file_sha256
from .backbone import PRECISIONS, Backbone
from .names import ModelSpec
from .preprocess import ImageSpec

logger = logging.getLogger("fewclip.models")


def _pooled(output: Any) -> torch.Tensor:
    """transformers 4.x returns a tensor from get_*_features, 5.x a BaseModelOutputWithPooling."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise BackboneError(f"unexpected output type {type(output).__name__} from transformers' CLIPModel.")
    return pooled


class HFBackbone(Backbone):
    """A :class:`Backbone` over a transformers ``CLIPModel`` and its ``CLIPTokenizer``."""

    backend: ClassVar[str] = "hf"
    image_tower: ClassVar[tuple[str, ...]] = ("vision_model", "visual_projection")

    @staticmethod
    def forward_image(model: Any, images: torch.Tensor) -> torch.Tensor:
        return _pooled(model.get_image_features(pixel_values=images))

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.context_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _forward_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return _pooled(self.model.get_text_features(**tokens))

    def _token_lengths(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]


def _hf_image_spec(source: str, image_size: int) -> ImageSpec:
    try:
        from transformers import CLIPImageProcessor

        proc = CLIPImageProcessor.from_pretrained(source)
    except Exception as exc:  # no preprocessor_config.json: OpenAI's preprocessing at the model's size
        logger.warning("%s: no usable image processor config (%s); using OpenAI preprocessing.", source, exc)
        return ImageSpec(size=image_size, resize=image_size)
    size = getattr(proc, "size", None) or {}
    crop = getattr(proc, "crop_size", None) or {}
    size = dict(size) if not isinstance(size, int) else {"shortest_edge": size}
    crop = dict(crop) if not isinstance(crop, int) else {"height": crop, "width": crop}
    resize = int(size.get("shortest_edge") or size.get("height") or image_size)
    crop_size = int(crop.get("height") or resize) if getattr(proc, "do_center_crop", True) else resize
    resample = getattr(proc, "resample", 3)
    resample = int(getattr(resample, "value", resample))
    return ImageSpec(
        size=crop_size,
        resize=resize,
        mean=tuple(float(x) for x in (getattr(proc, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))),
        std=tuple(float(x) for x in (getattr(proc, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))),
        interpolation="bilinear" if resample == 2 else "bicubic",
        resize_mode="shortest",
    )


def hf_local_weights(spec: ModelSpec, sha256: Callable[[Path], str] = file_sha256) -> dict[str, Any] | None:
    """The ``weights`` record of a Hugging Face model saved in a folder (SHA-256s through ``sha256``); None for an
    id (its files live in the Hugging Face cache)."""
    folder = Path(spec.name)
    if not folder.is_dir():
        return None
    names = ("model.safetensors", "pytorch_model.bin")
    weights_file = next((folder / n for n in names if (folder / n).is_file()), None)
    return {
        "folder": str(folder),
        "sha256": sha256(weights_file) if weights_file else None,
        "config_sha256": sha256(folder / "config.json"),
    }


def load_hf(
    spec: ModelSpec, precision: str, device: torch.device, preprocess: str, sha256: Callable[[Path], str] = file_sha256
) -> HFBackbone:
    """Load the transformers ``CLIPModel`` ``spec`` names (see :func:`fewclip.models.load_backbone`)."""
    try:
        import transformers
        from transformers import CLIPModel, CLIPTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise BackboneError("--backend hf needs the 'transformers' package: pip install transformers") from exc
    source = spec.name
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    dtype_arg = "dtype" if version >= (4, 56) else "torch_dtype"  # 'dtype' replaced 'torch_dtype' in 4.56
    try:
        model = CLIPModel.from_pretrained(source, **{dtype_arg: PRECISIONS[precision]})
        tokenizer = CLIPTokenizer.from_pretrained(source)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise BackboneError(
            f"could not load Hugging Face CLIP {source!r}: {exc}"
            + (" (HF_HUB_OFFLINE=1 is set: download it once online or give a local folder)" if offline else "")
        ) from exc
    model.to(device).eval()
    weights = hf_local_weights(spec, sha256) or {
        "hf_id": source,
        "commit": getattr(model.config, "_commit_hash", None),
    }
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    return HFBackbone.assemble(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        precision=precision,
        device=device,
        image_spec=_hf_image_spec(source, int(vcfg.image_size)),
        preprocess=preprocess,
        weights=weights,
        quick_gelu=vcfg.hidden_act == "quick_gelu" and tcfg.hidden_act == "quick_gelu",
        embed_dim=int(model.config.projection_dim),
        context_length=int(tcfg.max_position_embeddings),
    )
