"""Generation settings (FLIER-faithful defaults), the generation error type, and per-item seeds and keys.

The defaults are the spec's inferred FLIER settings (flier.md §8.1): Stable Diffusion 2.x base at 512 x 512, DDIM
with 50 steps and eta 0, classifier-free guidance 9.0, 2 images per prompt, seed 42.

Every image is one *item*: (prompt, image index j). Its seed is derived from (base seed, prompt, j), so an image does
not depend on which other prompts were generated, in which batch, or whether the run was resumed; its *key* hashes
(pipeline weights identity, prompt, item seed, the settings that change the image) and names it in the store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import FewclipError

#: the historical Hub id of Stable Diffusion 2.1 base (512 px); any diffusers Stable Diffusion folder works
DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
}
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
INSTALL_HINT = "pip install 'fewclip[generate]'"


class GenerationError(FewclipError, ValueError):
    """Generation settings, a model, a description source or a store that cannot be used."""


class GenerationWarning(UserWarning):
    """A store shard set aside as corrupt, descriptions shorter than asked, or extra description keys."""


@dataclass(frozen=True)
class GenerationSettings:
    """How images are sampled. ``precision='auto'`` is fp16 on CUDA and fp32 elsewhere; ``device='auto'`` is CUDA
    when available. ``batch_size`` counts images per pipeline call (classifier-free guidance doubles the UNet
    batch)."""

    model: str = DEFAULT_MODEL
    scheduler: str = "ddim"
    steps: int = 50
    guidance_scale: float = 9.0
    resolution: int = 512
    images_per_prompt: int = 2
    batch_size: int = 8
    seed: int = 42
    precision: str = "auto"
    device: str = "auto"
    eta: float = 0.0
    negative_prompt: str = ""

    def validate(self) -> GenerationSettings:
        """Self, or a :class:`GenerationError` naming the first bad value and the valid ones."""
        checks = [
            ("scheduler", self.scheduler in SCHEDULERS, f"one of {', '.join(SCHEDULERS)}"),
            ("steps", isinstance(self.steps, int) and self.steps >= 1, "an integer >= 1"),
            ("guidance_scale", self.guidance_scale >= 0, "a number >= 0 (1 or less turns guidance off)"),
            (
                "resolution",
                isinstance(self.resolution, int) and self.resolution >= 8 and self.resolution % 8 == 0,
                "a multiple of 8 (512 for SD 2.x base)",
            ),
            ("images_per_prompt", isinstance(self.images_per_prompt, int) and self.images_per_prompt >= 1, ">= 1"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, ">= 1"),
            ("seed", isinstance(self.seed, int) and self.seed >= 0, "an integer >= 0"),
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            ("eta", 0.0 <= self.eta <= 1.0, "between 0 and 1"),
            ("device", bool(self.device), "auto, cpu, cuda or cuda:N"),
        ]
        for name, ok, valid in checks:
            if not ok:
                raise GenerationError(f"generation setting {name}={getattr(self, name)!r} is not valid; use {valid}.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GenerationSettings:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise GenerationError(f"unknown generation setting(s) {unknown}; valid: {', '.join(sorted(names))}.")
        return cls(**values)

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise GenerationError(f"device {self.device!r}: CUDA is not available here; pass --device cpu.")
        return self.device

    def resolved_precision(self, device: str) -> str:
        if self.precision != "auto":
            return self.precision
        return "fp16" if device.startswith("cuda") else "fp32"

    def sampling_identity(self, device: str) -> dict[str, Any]:
        """The settings that change an image (so belong in its key); batch size, device and model id do not (the
        model enters the key through its weights' identity)."""
        return {
            "scheduler": self.scheduler,
            "steps": self.steps,
            "guidance_scale": float(self.guidance_scale),
            "resolution": self.resolution,
            "eta": float(self.eta),
            "negative_prompt": self.negative_prompt,
            "precision": self.resolved_precision(device),
        }


def item_seed(seed: int, prompt: str, index: int) -> int:
    """The seed of image ``index`` of ``prompt`` under base ``seed``: 63 bits of SHA-256 of the three."""
    digest = hashlib.sha256(f"{seed}\x00{index}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def item_key(identity: str, prompt: str, seed: int, sampling: dict[str, Any]) -> str:
    """Hex SHA-256 naming one image in the store: (weights identity, prompt, item seed, sampling settings)."""
    payload = json.dumps(
        {"weights": identity, "prompt": prompt, "seed": seed, "sampling": sampling}, sort_keys=True, ensure_ascii=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()
