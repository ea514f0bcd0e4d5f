"""Loading open_clip models: tags, weights files, ``local-dir:`` folders, ``hf-hub:`` repositories.

OpenAI TorchScript archives given as ``pretrained`` are converted once into a safetensors state dict under the
cache folder; ``torch.load(weights_only=False)`` is used only with ``trust_checkpoint=True``.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file

from ..errors import BackboneError
from ..io import atomic_write, file_sha256
from .backbone import PRECISIONS, Backbone
from .names import ModelSpec
from .preprocess import ImageSpec

logger = logging.getLogger("fewclip.models")

#: entries of OpenAI's TorchScript state dicts that are not weights
_TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class OpenClipBackbone(Backbone):
    """A :class:`Backbone` over an open_clip ``CLIP`` / ``CustomTextCLIP`` model and its tokenizer."""

    backend: ClassVar[str] = "open_clip"
    image_tower: ClassVar[tuple[str, ...]] = ("visual",)

    @staticmethod
    def forward_image(model: Any, images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(images)

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"text": self.tokenizer(texts)}

    def _forward_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_text(tokens["text"])

    def _token_lengths(self, texts: list[str]) -> list[int]:
        tokenizer = self.tokenizer
        if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):  # SimpleTokenizer
            return [len(tokenizer.encode(t)) + 2 for t in texts]
        inner = getattr(tokenizer, "tokenizer", None)  # HFTokenizer / SigLipTokenizer wrap an HF tokenizer
        if inner is not None:
            return [len(ids) for ids in inner(texts, truncation=False)["input_ids"]]
        return [0 for _ in texts]


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a TorchScript zip (OpenAI's original ``.pt`` files): it holds ``code/`` and ``constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    has_code = any("/code/" in n or n.startswith("code/") for n in names)
    has_constants = any(n.endswith("constants.pkl") for n in names)
    return has_code and has_constants


def convert_torchscript(path: str | os.PathLike, cache_dir: str | os.PathLike, sha256: str | None = None) -> Path:
    """Convert a TorchScript archive once into ``cache_dir/checkpoints/<sha256>.safetensors`` and return that path."""
    sha256 = sha256 or file_sha256(path)
    out = Path(cache_dir) / "checkpoints" / f"{sha256}.safetensors"
    if out.is_file():
        return out
    logger.warning(
        "%s is a TorchScript archive (OpenAI's original format); converting it once to a safetensors state dict at %s",
        path,
        out,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch ≥ 2.9 marks torch.jit as deprecated
            scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise BackboneError(f"{path}: looks like a TorchScript archive but torch.jit.load failed ({exc}).") from exc
    state = {k: v.detach().clone().contiguous() for k, v in scripted.state_dict().items()}
    for key in _TORCHSCRIPT_EXTRA_KEYS:
        state.pop(key, None)
    atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata={"converted_from": str(path)}))
    return out


def _find_open_clip_checkpoint(folder: Path) -> Path | None:
    preferred = [
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.safetensors",
        "open_clip_pytorch_model.bin",
        "open_clip_pytorch_model.pth",
        "model.safetensors",
        "pytorch_model.bin",
        "pytorch_model.pth",
        "model.pth",
    ]
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth"))
    found.sort(key=lambda p: p.suffix != ".safetensors")
    return found[0] if found else None


def _image_spec_from_cfg(cfg: dict) -> ImageSpec:
    size = cfg.get("size", 224)
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise BackboneError(f"non-square image size {size} is not supported by fewclip's presets.")
        size = size[0]
    mean = cfg.get("mean")
    std = cfg.get("std")
    mean = tuple(mean) if isinstance(mean, list | tuple) else (mean,) * 3
    std = tuple(std) if isinstance(std, list | tuple) else (std,) * 3
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear"):
        interpolation = "bicubic"  # open_clip: 'random' means bicubic at inference
    return ImageSpec(
        size=int(size),
        resize=int(size),
        mean=mean,
        std=std,
        interpolation=interpolation,
        resize_mode=cfg.get("resize_mode", "shortest"),
    )


def local_weights(spec: ModelSpec, sha256: Callable[[Path], str] = file_sha256) -> dict[str, Any] | None:
    """The ``weights`` record of a file or ``local-dir:`` spec (its SHA-256 through ``sha256``); None otherwise."""
    if spec.source == "file":
        path = Path(spec.pretrained or "")
        return {"file": str(path), "sha256": sha256(path)}
    if spec.source == "local-dir":
        folder = Path(spec.name.split(":", 1)[1])
        found = _find_open_clip_checkpoint(folder)
        if found is None:
            raise BackboneError(
                f"model {spec.requested!r}: {folder} has open_clip_config.json but no weights "
                "(open_clip_model.safetensors, open_clip_pytorch_model.bin, ...)."
            )
        return {
            "file": str(found),
            "sha256": sha256(found),
            "config_sha256": sha256(folder / "open_clip_config.json"),
        }
    return None


def _weights_record(
    spec: ModelSpec, cache_dir: Path, sha256: Callable[[Path], str] = file_sha256
) -> tuple[dict[str, Any], str | None, bool]:
    """(identity ``weights`` record, checkpoint for ``open_clip.create_model``, force QuickGELU)."""
    import open_clip

    checkpoint = spec.pretrained
    force_quick_gelu = spec.force_quick_gelu
    if spec.source == "tag":
        tag_cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained) or {}
        weights = {"tag": spec.pretrained, "source": tag_cfg.get("hf_hub") or tag_cfg.get("url") or None}
    elif spec.source == "file":
        path = Path(spec.pretrained)
        weights = local_weights(spec, sha256) or {}
        if is_torchscript_archive(path):
            checkpoint = str(convert_torchscript(path, cache_dir, weights["sha256"]))
            force_quick_gelu = True  # OpenAI's archives are QuickGELU models
            weights["converted_from_torchscript"] = True
        else:
            config = open_clip.get_model_config(spec.name) or {}
            if not config.get("quick_gelu") and f"{spec.name}-quickgelu" in open_clip.list_models():
                logger.warning(
                    "model %s uses nn.GELU; if %s holds OpenAI weights or weights fine-tuned from them, use "
                    "--model %s-quickgelu instead (open_clip issues #771, #441).",
                    spec.name,
                    path.name,
                    spec.name,
                )
    elif spec.source == "local-dir":
        weights = local_weights(spec, sha256) or {}
    else:  # hf-hub
        weights = {"hf_hub": spec.name.split(":", 1)[1]}
    return weights, checkpoint, force_quick_gelu


def load_open_clip(
    spec: ModelSpec,
    precision: str,
    device: torch.device,
    preprocess: str,
    cache_dir: Path,
    trust: bool,
    sha256: Callable[[Path], str] = file_sha256,
) -> OpenClipBackbone:
    """Load the open_clip model ``spec`` names (see :func:`fewclip.models.load_backbone` for the options)."""
    import open_clip
    from open_clip.transformer import QuickGELU

    weights, checkpoint, force_quick_gelu = _weights_record(spec, cache_dir, sha256)
    try:
        model = open_clip.create_model(
            spec.name,
            pretrained=checkpoint,
            precision=precision,
            device=device,
            force_quick_gelu=force_quick_gelu,
            weights_only=not trust,
            require_pretrained=True,
        )
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Weights only load failed" in text:
            raise BackboneError(
                f"{spec.pretrained}: torch.load(weights_only=True) refused this checkpoint (it pickles objects "
                "other than tensors). If you trust the file, pass --trust-checkpoint (trust_checkpoint=True), "
                "or re-save it as .safetensors."
            ) from exc
        raise BackboneError(
            f"could not load open_clip model {spec.requested!r} (config {spec.name!r}) with pretrained "
            f"{spec.pretrained!r}: {text}"
        ) from exc
    model.eval()
    image_spec = _image_spec_from_cfg(getattr(model.visual, "preprocess_cfg", {}) or {})
    tokenizer = open_clip.get_tokenizer(spec.name)
    context_length = int(getattr(tokenizer, "context_length", None) or getattr(model, "context_length", 77))
    embed_dim = getattr(model.visual, "output_dim", None)
    if embed_dim is None:
        with torch.inference_mode():
            dummy = torch.zeros(1, 3, image_spec.size, image_spec.size, device=device, dtype=PRECISIONS[precision])
            embed_dim = int(model.encode_image(dummy).shape[-1])
    return OpenClipBackbone.assemble(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        precision=precision,
        device=device,
        image_spec=image_spec,
        preprocess=preprocess,
        weights=weights,
        quick_gelu=any(isinstance(m, QuickGELU) for m in model.modules()),
        embed_dim=int(embed_dim),
        context_length=context_length,
    )
