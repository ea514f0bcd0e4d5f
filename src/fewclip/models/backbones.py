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
from typing import Any

import torch

from ..errors import BackboneError, FewclipError
from ..hashing import MEMO_NAME, HashMemo
from ..io import default_cache_dir
from .backbone import PRECISIONS, Backbone
from .load_hf import hf_local_weights, load_hf
from .load_open_clip import convert_torchscript, is_torchscript_archive, load_open_clip, local_weights
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
    "weights_identity",
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
    sha256 = _memo_sha256(HashMemo(cache_dir / MEMO_NAME))  # a weights file unchanged since last time is not re-read
    if spec.backend == "hf":
        return load_hf(spec, precision, device, preprocess, sha256)
    return load_open_clip(spec, precision, device, preprocess, cache_dir, trust_checkpoint, sha256)


def _memo_sha256(memo: HashMemo):
    def sha256(path: Path) -> str:
        try:
            return memo.sha256(path)
        except FewclipError as exc:
            raise BackboneError(f"{exc} Check the weights path and its permissions.") from exc

    return sha256


def weights_identity(
    model: str,
    pretrained: str | None = None,
    *,
    backend: str = "open_clip",
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """What identifies the weights ``model``/``pretrained`` names, without loading them: the SHA-256 of a local
    weights file (and of a folder's config), through the file-hash memo under ``cache_dir``, so an unchanged file is
    only stat'ed; the tag, hub repository or Hugging Face id otherwise (those name published weights).

    The same SHA-256s as the loaded backbone's ``identity["weights"]``, so results can be keyed on them at plan time.
    """
    spec = resolve_model(model, pretrained, backend)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    sha256 = _memo_sha256(HashMemo(cache_dir / MEMO_NAME))
    if spec.backend == "hf":
        local = hf_local_weights(spec, sha256)
        return {"sha256": local["sha256"], "config_sha256": local["config_sha256"]} if local else {"hf_id": spec.name}
    local = local_weights(spec, sha256)
    if local is not None:
        return {k: v for k, v in local.items() if k in ("sha256", "config_sha256")}
    if spec.source == "tag":
        return {"tag": spec.pretrained}
    return {"hf_hub": spec.name.split(":", 1)[1]}
