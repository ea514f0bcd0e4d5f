"""CLIP backbones: one object that encodes images and text, whichever library loaded the weights.

>>> bb = load_backbone("RN50", "openai")            # open_clip 'RN50-quickgelu' + tag 'openai' (= clip.load)
>>> bb = load_backbone("ViT-B-16", "/ckpt/ft.safetensors")
>>> bb = load_backbone("local-dir:/models/my_clip")
>>> bb = load_backbone("ViT-B/16", backend="hf")    # transformers 'openai/clip-vit-base-patch16'
>>> feats = bb.encode_images(torch.stack([bb.preprocess(img) for img in images]))   # [B, D] float32, raw

Name rules (spec §12): the OpenAI paper names (``RN50``, ``ViT-B/16``, ...) map to open_clip's ``-quickgelu``
configs with tag ``openai``; an open_clip name whose pretrained tag was trained with QuickGELU (``ViT-B-16`` +
``openai``) is switched to its ``-quickgelu`` config, because open_clip ≥ 2.29 only warns about the mismatch.
OpenAI TorchScript archives given as ``pretrained`` are converted once into a safetensors state dict under the
cache folder; ``torch.load(weights_only=False)`` is used only with ``trust_checkpoint=True``.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import BackboneError
from ..io import atomic_write, default_cache_dir, file_sha256
from .preprocess import ImageSpec, augment_transform, eval_transform

logger = logging.getLogger("fewclip.models")

#: ``clip.load`` names → open_clip configs that reproduce OpenAI CLIP (QuickGELU); the tag is ``openai``.
OPENAI_MODELS: dict[str, str] = {
    "RN50": "RN50-quickgelu",
    "RN101": "RN101-quickgelu",
    "RN50x4": "RN50x4-quickgelu",
    "RN50x16": "RN50x16-quickgelu",
    "RN50x64": "RN50x64-quickgelu",
    "ViT-B/32": "ViT-B-32-quickgelu",
    "ViT-B/16": "ViT-B-16-quickgelu",
    "ViT-L/14": "ViT-L-14-quickgelu",
    "ViT-L/14@336px": "ViT-L-14-336-quickgelu",
}
#: ``clip.load`` names → Hugging Face ids (ViT only; transformers has no ResNet CLIP).
HF_OPENAI_IDS: dict[str, str] = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}
BACKENDS = ("open_clip", "hf")
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


# --------------------------------------------------------------------------- name resolution


@dataclass(frozen=True)
class ModelSpec:
    """Where a backbone comes from, decided before anything is loaded or downloaded."""

    backend: str  # open_clip | hf
    requested: str  # the --model value as given
    name: str  # what the library is asked for: an open_clip config name, 'local-dir:…', 'hf-hub:…', an HF id/dir
    pretrained: str | None  # open_clip tag or weights file; None when ``name`` carries its own weights
    source: str  # tag | file | local-dir | hf-hub | hf
    force_quick_gelu: bool = False


def _paper_name(model: str) -> str | None:
    lowered = {k.lower(): k for k in OPENAI_MODELS}
    return lowered.get(model.strip().lower())


def resolve_model(model: str, pretrained: str | None = None, backend: str = "open_clip") -> ModelSpec:
    """Turn ``--model``/``--pretrained`` into a :class:`ModelSpec` (pure: no download, no weights read).

    ``resolve_model("RN50", "openai")`` gives open_clip's ``RN50-quickgelu`` with tag ``openai``.
    """
    if backend not in BACKENDS:
        raise BackboneError(f"backend {backend!r} is unknown; choose one of {list(BACKENDS)}.")
    if not model:
        raise BackboneError("model name is empty; give e.g. --model RN50 --pretrained openai.")
    if backend == "hf":
        return _resolve_hf(model, pretrained)
    import open_clip

    if model.startswith(("local-dir:", "hf-hub:")):
        schema, ident = model.split(":", 1)
        if not ident:
            raise BackboneError(f"model {model!r} names no folder or repository after '{schema}:'.")
        if pretrained:
            raise BackboneError(
                f"--pretrained {pretrained!r} cannot be combined with model {model!r}: the weights come from the "
                f"{'folder' if schema == 'local-dir' else 'repository'}; drop --pretrained."
            )
        if schema == "local-dir":
            folder = Path(ident).expanduser()
            if not (folder / "open_clip_config.json").is_file():
                raise BackboneError(
                    f"model {model!r}: {folder / 'open_clip_config.json'} does not exist; a local-dir: folder needs "
                    "open_clip_config.json (with model_cfg and preprocess_cfg) next to its weights."
                )
            return ModelSpec("open_clip", model, f"local-dir:{folder}", None, "local-dir")
        return ModelSpec("open_clip", model, model, None, "hf-hub")

    paper = _paper_name(model)
    name = OPENAI_MODELS[paper] if paper else model.replace("/", "-")
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known + list(OPENAI_MODELS), n=4, cutoff=0.6)
        raise BackboneError(
            f"model {model!r} is not an open_clip architecture"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + "; see open_clip.list_models(), the OpenAI names "
            + ", ".join(OPENAI_MODELS)
            + ", or give 'local-dir:FOLDER' / 'hf-hub:ORG/REPO'."
        )
    if pretrained is None:
        if not paper:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise BackboneError(
                f"model {model!r} needs --pretrained: a tag ({', '.join(tags) or 'none known'}) or a weights file "
                f"({'/'.join(WEIGHT_SUFFIXES)})."
            )
        pretrained = "openai"

    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        config_quick_gelu = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
        force = False
        if tag_cfg.get("quick_gelu", False) and not config_quick_gelu:
            if f"{name}-quickgelu" in known and open_clip.get_pretrained_cfg(f"{name}-quickgelu", pretrained):
                name = f"{name}-quickgelu"
            else:
                force = True
        return ModelSpec("open_clip", model, name, pretrained, "tag", force)

    path = Path(pretrained).expanduser()
    if path.is_file():
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise BackboneError(
                f"weights file {str(path)!r} has suffix {path.suffix!r}; expected one of {list(WEIGHT_SUFFIXES)}."
            )
        return ModelSpec("open_clip", model, name, str(path), "file")
    tags = open_clip.list_pretrained_tags_by_model(name)
    looks_like_path = any(sep in pretrained for sep in ("/", os.sep)) or pretrained.endswith(WEIGHT_SUFFIXES)
    if looks_like_path:
        raise BackboneError(f"--pretrained {pretrained!r}: no such weights file.")
    raise BackboneError(
        f"--pretrained {pretrained!r} is neither a weights file nor a tag of open_clip model {name!r}; "
        f"known tags: {', '.join(tags) or 'none'}."
    )


def _resolve_hf(model: str, pretrained: str | None) -> ModelSpec:
    paper = _paper_name(model)
    if paper:
        if paper not in HF_OPENAI_IDS:
            raise BackboneError(
                f"model {model!r} has no Hugging Face transformers version (transformers has no ResNet CLIP); "
                "use --backend open_clip."
            )
        if pretrained not in (None, "openai"):
            raise BackboneError(
                f"--pretrained {pretrained!r} with --backend hf: the weights come from the model id or folder; "
                f"drop --pretrained (model {model!r} means {HF_OPENAI_IDS[paper]})."
            )
        return ModelSpec("hf", model, HF_OPENAI_IDS[paper], None, "hf")
    if pretrained is not None:
        raise BackboneError(
            f"--pretrained {pretrained!r} with --backend hf: give the Hugging Face folder or id as --model "
            "and drop --pretrained."
        )
    ident = model[len("hf-hub:") :] if model.startswith("hf-hub:") else model
    folder = Path(ident).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise BackboneError(
                f"model folder {str(folder)!r} has no config.json; save the model with CLIPModel.save_pretrained."
            )
        return ModelSpec("hf", model, str(folder), None, "hf")
    return ModelSpec("hf", model, ident, None, "hf")


# --------------------------------------------------------------------------- the backbone object


@dataclass
class Backbone:
    """A loaded CLIP model: image and text encoders plus the transforms that go with them.

    ``encode_images`` and ``encode_text`` return raw (unnormalised) float32 CPU tensors; the model runs in
    ``precision`` on ``device`` under ``torch.inference_mode``. ``identity`` holds everything that determines the
    features (backend, model, weights, precision, preprocessing) and goes into cache keys and results.
    """

    model: Any
    backend: str
    device: torch.device
    dtype: torch.dtype
    image_spec: ImageSpec  # the model's own preprocessing
    preprocess: Callable  # PIL image -> [3, S, S] tensor: the evaluation transform
    preprocess_name: str
    preprocess_description: str
    applied_spec: ImageSpec  # the spec of the evaluation transform actually used
    identity: dict[str, Any]
    _tokenize: Callable[[list[str]], dict[str, torch.Tensor]] = field(repr=False)
    _encode_text: Callable[[dict[str, torch.Tensor]], torch.Tensor] = field(repr=False)
    _encode_image: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    _token_lengths: Callable[[list[str]], list[int]] | None = field(repr=False, default=None)
    context_length: int = 77

    @property
    def image_size(self) -> int:
        return self.applied_spec.size

    @property
    def embed_dim(self) -> int:
        return int(self.identity["embed_dim"])

    def cache_key(self) -> dict[str, Any]:
        """The identity fields that change features: not paths (weights are identified by their SHA-256, so a
        moved checkpoint keeps its cache), device or library versions."""
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
            out = self._encode_image(images.to(self.device, self.dtype, non_blocking=True))
            out = out.float().cpu()
        return out.clone()  # a normal tensor, usable in autograd outside inference mode

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """T prompts → [T, D] float32 raw embeddings (on CPU). Overlong prompts are truncated (see count_truncated)."""
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.embed_dim)
        with torch.inference_mode():
            tokens = {k: v.to(self.device) for k, v in self._tokenize(texts).items()}
            out = self._encode_text(tokens).float().cpu()
        return out.clone()

    def count_truncated(self, texts: Sequence[str]) -> int | None:
        """How many of ``texts`` exceed the context length (SOT and EOT included); None if the tokenizer can't say."""
        if self._token_lengths is None:
            return None
        return sum(n > self.context_length for n in self._token_lengths(list(texts)))


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
    """Load a CLIP model (see the module docstring for the accepted names) as a :class:`Backbone`.

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
        return _load_hf(spec, precision, device, preprocess)
    return _load_open_clip(spec, precision, device, preprocess, cache_dir, trust_checkpoint)


def _finish(
    *,
    spec: ModelSpec,
    model: Any,
    precision: str,
    device: torch.device,
    image_spec: ImageSpec,
    preprocess: str,
    weights: dict[str, Any],
    quick_gelu: bool,
    embed_dim: int,
    context_length: int,
    tokenize,
    encode_text,
    encode_image,
    token_lengths,
) -> Backbone:
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
    return Backbone(
        model=model,
        backend=spec.backend,
        device=device,
        dtype=PRECISIONS[precision],
        image_spec=image_spec,
        preprocess=transform,
        preprocess_name=preset,
        preprocess_description=description,
        applied_spec=applied,
        identity=identity,
        _tokenize=tokenize,
        _encode_text=encode_text,
        _encode_image=encode_image,
        _token_lengths=token_lengths,
        context_length=context_length,
    )


# --------------------------------------------------------------------------- open_clip


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
    from safetensors.torch import save_file

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


def _load_open_clip(
    spec: ModelSpec, precision: str, device: torch.device, preprocess: str, cache_dir: Path, trust: bool
) -> Backbone:
    import open_clip
    from open_clip.transformer import QuickGELU

    checkpoint = spec.pretrained
    force_quick_gelu = spec.force_quick_gelu
    if spec.source == "tag":
        tag_cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained) or {}
        weights = {"tag": spec.pretrained, "source": tag_cfg.get("hf_hub") or tag_cfg.get("url") or None}
    elif spec.source == "file":
        path = Path(spec.pretrained)
        weights = {"file": str(path), "sha256": file_sha256(path)}
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
        folder = Path(spec.name.split(":", 1)[1])
        found = _find_open_clip_checkpoint(folder)
        if found is None:
            raise BackboneError(
                f"model {spec.requested!r}: {folder} has open_clip_config.json but no weights "
                "(open_clip_model.safetensors, open_clip_pytorch_model.bin, ...)."
            )
        weights = {
            "file": str(found),
            "sha256": file_sha256(found),
            "config_sha256": file_sha256(folder / "open_clip_config.json"),
        }
    else:  # hf-hub
        weights = {"hf_hub": spec.name.split(":", 1)[1]}
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

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        return {"text": tokenizer(texts)}

    def token_lengths(texts: list[str]) -> list[int]:
        if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):  # SimpleTokenizer
            return [len(tokenizer.encode(t)) + 2 for t in texts]
        inner = getattr(tokenizer, "tokenizer", None)  # HFTokenizer / SigLipTokenizer wrap an HF tokenizer
        if inner is not None:
            return [len(ids) for ids in inner(texts, truncation=False)["input_ids"]]
        return [0 for _ in texts]

    return _finish(
        spec=spec,
        model=model,
        precision=precision,
        device=device,
        image_spec=image_spec,
        preprocess=preprocess,
        weights=weights,
        quick_gelu=any(isinstance(m, QuickGELU) for m in model.modules()),
        embed_dim=int(embed_dim),
        context_length=context_length,
        tokenize=tokenize,
        encode_text=lambda tokens: model.encode_text(tokens["text"]),
        encode_image=lambda images: model.encode_image(images),
        token_lengths=token_lengths,
    )


# --------------------------------------------------------------------------- Hugging Face transformers


def _pooled(output: Any) -> torch.Tensor:
    """transformers 4.x returns a tensor from get_*_features, 5.x a BaseModelOutputWithPooling."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise BackboneError(f"unexpected output type {type(output).__name__} from transformers' CLIPModel.")
    return pooled


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


def _load_hf(spec: ModelSpec, precision: str, device: torch.device, preprocess: str) -> Backbone:
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
    folder = Path(source)
    if folder.is_dir():
        weights_file = next(
            (folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None
        )
        weights = {
            "folder": str(folder),
            "sha256": file_sha256(weights_file) if weights_file else None,
            "config_sha256": file_sha256(folder / "config.json"),
        }
    else:
        weights = {"hf_id": source, "commit": getattr(model.config, "_commit_hash", None)}
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    context_length = int(tcfg.max_position_embeddings)

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=context_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def token_lengths(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]

    return _finish(
        spec=spec,
        model=model,
        precision=precision,
        device=device,
        image_spec=_hf_image_spec(source, int(vcfg.image_size)),
        preprocess=preprocess,
        weights=weights,
        quick_gelu=vcfg.hidden_act == "quick_gelu" and tcfg.hidden_act == "quick_gelu",
        embed_dim=int(model.config.projection_dim),
        context_length=context_length,
        tokenize=tokenize,
        encode_text=lambda tokens: _pooled(model.get_text_features(**tokens)),
        encode_image=lambda images: _pooled(model.get_image_features(pixel_values=images)),
        token_lengths=token_lengths,
    )
