"""Stable Diffusion through ``diffusers``: load a pipeline (a Hub id or a local folder), name its weights by content,
and sample latents and images from one sampling call.

>>> sampler = load_sampler(GenerationSettings(model="/models/sd-2-1-base"))
>>> latents, images = sampler.sample(["a photo of a Sphynx cat"], [item_seed(42, "a photo of a Sphynx cat", 0)])

``sample`` calls the pipeline with ``output_type="latent"``: it returns the final denoised latent z0 in the UNet's
scaled latent space (flier.md §3.3), which is kept, and this module decodes it with the pipeline's VAE, so the latent
and the image come from the same sampling. Each image has its own ``torch.Generator`` (on the CPU, so the initial
noise is the same on any device), so an image does not depend on the batch it was sampled in.

``diffusers`` is imported only here and only when a pipeline is loaded; without it the error says
``pip install 'fewclip[generate]'``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..hashing import HashMemo
from .settings import INSTALL_HINT, SCHEDULERS, GenerationError, GenerationSettings

if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger("fewclip.generation")

#: file kinds that make up a pipeline's weights identity (weights, configurations, tokenizer files)
IDENTITY_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def require_diffusers():
    """The ``diffusers`` module, or a :class:`GenerationError` saying how to install it."""
    try:
        import diffusers
    except ImportError as exc:
        raise GenerationError(
            f"generating images needs the diffusers package, which is not installed ({exc}); install it with "
            f"{INSTALL_HINT}."
        ) from None
    return diffusers


def _looks_like_path(model: str) -> bool:
    """A Hub id is ``owner/name``; anything else (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x``) is meant as a folder."""
    return model.startswith((".", "/", "~")) or model.count("/") != 1 or "\\" in model


def resolve_model_folder(model: str) -> Path:
    """The local folder of ``model``: the folder itself, or the Hub snapshot ``diffusers`` downloads (or finds in
    the Hugging Face cache when ``HF_HUB_OFFLINE=1``)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise GenerationError(
                f"{path}: not a diffusers pipeline folder (no model_index.json); pass a folder written by "
                "save_pretrained, or a Hub id such as stabilityai/stable-diffusion-2-1-base."
            )
        return path.resolve()
    if _looks_like_path(model):
        raise GenerationError(f"--model {model!r}: no such folder. Pass a diffusers pipeline folder or a Hub id.")
    diffusers = require_diffusers()
    try:
        folder = diffusers.DiffusionPipeline.download(model)
    except Exception as exc:  # network, offline mode, gated or removed repositories
        raise GenerationError(
            f"--model {model!r}: cannot get this pipeline from the Hugging Face Hub or its cache ({type(exc).__name__}:"
            f" {exc}). Download it once with network access (unset HF_HUB_OFFLINE), or pass a local folder written by "
            "save_pretrained."
        ) from None
    return Path(folder)


def identity_files(folder: Path) -> list[Path]:
    """The files whose bytes define a pipeline: model_index.json and the weight, configuration and tokenizer files
    of every part it names, in a fixed order."""
    index_file = folder / "model_index.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GenerationError(f"{index_file}: cannot be read as JSON ({exc}).") from None
    parts = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None)
    files = [index_file]
    for part in parts:
        sub = folder / part
        if sub.is_dir():
            files += sorted(p for p in sub.rglob("*") if p.suffix in IDENTITY_SUFFIXES and p.is_file())
    return files


def weights_identity(folder: str | os.PathLike, memo: HashMemo | None = None) -> str:
    """Hex SHA-256 over (relative path, SHA-256 of bytes) of :func:`identity_files`: the same weights give the same
    identity wherever they are stored. File hashes are memoised in ``memo`` (re-read only when a file changes)."""
    folder = Path(folder)
    files = identity_files(folder)
    memo = memo or HashMemo(None)
    errors: dict[str, str] = {}
    digests = memo.sha256_many(files, errors=errors)
    if errors:
        raise GenerationError(f"{folder}: cannot read pipeline files to hash them: {errors}.")
    listing = [[p.relative_to(folder).as_posix(), d] for p, d in zip(files, digests)]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPES[name])


class Sampler:
    """A loaded Stable Diffusion pipeline with the settings it samples with.

    ``identity`` is the weights identity (:func:`weights_identity`); ``sampling`` the settings that enter every
    item key; ``calls`` counts pipeline calls and ``sampled`` images (tests count them to prove resumption
    regenerates nothing)."""

    def __init__(self, pipe: Any, settings: GenerationSettings, identity: str, device: str):
        self.pipe = pipe
        self.settings = settings
        self.identity = identity
        self.device = device
        self.sampling = settings.sampling_identity(device)
        self.calls = 0
        self.sampled = 0
        vae = pipe.vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def describe(self) -> dict[str, Any]:
        """What a store records about the pipeline (besides the settings)."""
        import diffusers
        import torch

        return {
            "model": self.settings.model,
            "weights_identity": self.identity,
            "pipeline": type(self.pipe).__name__,
            "scheduler_class": type(self.pipe.scheduler).__name__,
            "scaling_factor": self.scaling_factor,
            "latents_scaled": True,
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
        }

    def sample(self, prompts: Sequence[str], seeds: Sequence[int]) -> tuple[torch.Tensor, list[Image.Image]]:
        """One pipeline call: latents [B, c, h, w] (CPU, the pipeline's dtype; scaled, before the VAE) and the B
        decoded RGB images, image i from ``prompts[i]`` with initial noise from ``seeds[i]``."""
        import torch
        from PIL import Image

        if len(prompts) != len(seeds) or not prompts:
            raise GenerationError(f"sample: {len(prompts)} prompts and {len(seeds)} seeds; expected as many, >= 1.")
        s = self.settings
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        kwargs: dict[str, Any] = {}
        if "eta" in _call_parameters(self.pipe):
            kwargs["eta"] = s.eta
        with torch.inference_mode():
            latents = self.pipe(
                prompt=list(prompts),
                negative_prompt=[s.negative_prompt] * len(prompts) if s.negative_prompt else None,
                num_images_per_prompt=1,
                num_inference_steps=s.steps,
                guidance_scale=s.guidance_scale,
                height=s.resolution,
                width=s.resolution,
                generator=generators,
                output_type="latent",
                **kwargs,
            ).images
            vae = self.pipe.vae
            decoded = vae.decode((latents / self.scaling_factor + self.shift_factor).to(vae.dtype), return_dict=False)[
                0
            ]
            pixels = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
        self.calls += 1
        self.sampled += len(prompts)
        return latents.detach().cpu(), [Image.fromarray(p) for p in pixels]


def _call_parameters(pipe: Any) -> set[str]:
    import inspect

    return set(inspect.signature(pipe.__call__).parameters)


def _dtype_keyword(diffusers: Any) -> str:
    """``dtype`` where diffusers has deprecated ``torch_dtype`` (0.36 and later), else ``torch_dtype``."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:  # pragma: no cover - older diffusers
        return "torch_dtype"
    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def load_sampler(settings: GenerationSettings, *, memo: HashMemo | None = None, compile_unet: bool = False) -> Sampler:
    """Load ``settings.model`` (a Hub id or a local folder) as a ``StableDiffusionPipeline`` with the chosen
    scheduler, precision and device, and name its weights (:func:`weights_identity`)."""
    settings.validate()
    diffusers = require_diffusers()
    import torch

    device = settings.resolved_device()
    precision = settings.resolved_precision(device)
    folder = resolve_model_folder(settings.model)
    identity = weights_identity(folder, memo)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    extra: dict[str, Any] = {}
    if index.get("safety_checker", [None])[0] is not None:  # images are decoded here, never checked: skip loading it
        extra.update(safety_checker=None, requires_safety_checker=False)
    extra[_dtype_keyword(diffusers)] = _dtype(precision)
    try:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **extra)
    except Exception as exc:
        raise GenerationError(
            f"{folder}: cannot be loaded as a Stable Diffusion pipeline ({type(exc).__name__}: {exc})."
        ) from None
    scheduler_cls = getattr(diffusers, SCHEDULERS[settings.scheduler])
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if device.startswith("cuda"):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs", fullgraph=True)
    logger.info("loaded %s (%s, %s on %s), weights %s", settings.model, settings.scheduler, precision, device,
                identity[:12])  # fmt: skip
    return Sampler(pipe, settings, identity, device)
