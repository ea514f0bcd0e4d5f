"""``load_backbone``: the one door to a CLIP model, whichever library holds its weights.

>>> bb = load_backbone("RN50", "openai")            # open_clip 'RN50-quickgelu' + tag 'openai' (= clip.load)
>>> bb = load_backbone("ViT-B-16", "/ckpt/ft.safetensors")
>>> bb = load_backbone("local-dir:/models/my_clip")
>>> bb = load_backbone("ViT-B/16", backend="hf")    # transformers 'openai/clip-vit-base-patch16'
>>> feats = bb.encode_images(torch.stack([bb.preprocess(img) for img in images]))   # [B, D] float32, raw

The names accepted are described in :mod:`fewclip.models.names`. The names this module held before the models
package was split stay importable from here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import BackboneError
from ..io import default_cache_dir
from .backbone import PRECISIONS, Backbone
from .load_hf import load_hf
from .load_open_clip import convert_torchscript, is_torchscript_archive, load_open_clip
from .names import HF_OPENAI_IDS, OPENAI_MODELS, WEIGHT_SUFFIXES, ModelSpec, resolve_model

__all__ = [
    "HF_OPENAI_IDS",
    "OPENAI_MODELS",
    "PRECISIONS",
    "WEIGHT_SUFFIXES",
    "Backbone",
    "ModelSpec",
    "convert_torchscript",
    "is_torchscript_archive",
    "load_backbone",
    "resolve_model",
]


def load_backbone(
    model: str,
    pretrained: str | None = None,
    *,
    backend: str = "open_clip",
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    preprocess: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    trust_checkpoint: bool = False,
) -> Backbone:
    """Load a CLIP model (see :mod:`fewclip.models.names` for the accepted names) as a :class:`Backbone`.

    ``preprocess`` is an evaluation preset of :mod:`fewclip.models.preprocess` (``auto``, ``clip``, ``lift``,
    ``model_default``). ``cache_dir`` (default :func:`default_cache_dir`) holds converted TorchScript archives.
    """
    if precision not in PRECISIONS:
        raise BackboneError(f"precision {precision!r} is unknown; choose one of {list(PRECISIONS)}.")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BackboneError(f"device {str(device)!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps).") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"device {str(device)!r} requested but CUDA is not available here; use --device cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BackboneError(f"device {str(device)!r} requested but MPS is not available here; use --device cpu.")
    spec = resolve_model(model, pretrained, backend)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if spec.backend == "hf":
        return load_hf(spec, precision, device, preprocess)
    return load_open_clip(spec, precision, device, preprocess, cache_dir, trust_checkpoint)
