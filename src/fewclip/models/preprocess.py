"""Preprocessing and augmentation presets, built for the image size of the loaded model.

Evaluation presets (one transform per backbone, used for val/test and the clean support view):

============== ============================================================================================
``clip``       Resize(size, shortest side, bicubic) → CenterCrop(size) → RGB → ToTensor → Normalize(OpenAI)
``lift``       Resize(size·256/224, bilinear) → CenterCrop(size) → RGB → ToTensor → Normalize(OpenAI)
``model_default`` the loaded model's own pretrained preprocessing (SigLIP, CLIPA, ... differ from ``clip``)
``auto``       ``clip`` when the model's own preprocessing is OpenAI's (it then equals it), else ``model_default``
============== ============================================================================================

Augmentation presets (random; :mod:`fewclip.features.extract` seeds them per image and view):

================ ==========================================================================================
``tip_cache``    RandomResizedCrop(size, scale (0.5, 1), bicubic) + RandomHorizontalFlip(0.5) + Normalize
``dassl_train``  RandomResizedCrop(size, scale (0.08, 1), bicubic) + RandomHorizontalFlip(0.5) + Normalize
``flier_timm``   timm: RandomResizedCrop (0.08, 1) bicubic, flip, RandAugment rand-m9-mstd0.5-inc1, erasing 0.25
================ ==========================================================================================

Every transform comes with a description string (a canonical JSON object) that is part of the feature-cache key
and of the results, so two runs share features exactly when their pixels went through the same pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

from PIL import Image

from ..errors import PresetError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

EVAL_PRESETS = ("auto", "clip", "lift", "model_default")
AUGMENT_PRESETS = ("tip_cache", "dassl_train", "flier_timm")


@dataclass(frozen=True)
class ImageSpec:
    """What a model's own (pretrained) preprocessing does: crop ``size``, shortest side resized to ``resize``."""

    size: int
    resize: int
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"  # bicubic | bilinear
    resize_mode: str = "shortest"  # shortest | longest | squash

    def is_openai(self) -> bool:
        """True when this is exactly ``clip.load``'s preprocessing at this size."""
        close = lambda a, b: len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b))  # noqa: E731
        return (
            close(self.mean, OPENAI_MEAN)
            and close(self.std, OPENAI_STD)
            and self.interpolation == "bicubic"
            and self.resize_mode == "shortest"
            and self.resize == self.size
        )


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    modes = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
    if name not in modes:
        raise PresetError(f"interpolation {name!r} is not supported; use one of {sorted(modes)}.")
    return modes[name]


def _describe(**fields) -> str:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def resolve_eval_preset(preset: str, spec: ImageSpec) -> str:
    """The concrete preset ``auto`` stands for with this model; other names are validated and returned."""
    if preset not in EVAL_PRESETS:
        raise PresetError(f"preprocessing preset {preset!r} is unknown; choose one of {list(EVAL_PRESETS)}.")
    if preset == "auto":
        return "clip" if spec.is_openai() else "model_default"
    return preset


def eval_transform(preset: str, spec: ImageSpec) -> tuple[Callable, str, ImageSpec]:
    """(PIL image → [3, size, size] tensor, description, the spec actually applied) for an evaluation preset."""
    from torchvision import transforms as T

    preset = resolve_eval_preset(preset, spec)
    if preset == "clip":
        used = ImageSpec(size=spec.size, resize=spec.size)
    elif preset == "lift":
        used = ImageSpec(size=spec.size, resize=spec.size * 256 // 224, interpolation="bilinear")
    else:
        used = spec
    if used.resize_mode == "shortest":
        geometry = [T.Resize(used.resize, interpolation=_interp(used.interpolation)), T.CenterCrop(used.size)]
    elif used.resize_mode == "squash":
        geometry = [T.Resize((used.size, used.size), interpolation=_interp(used.interpolation))]
    elif used.resize_mode == "longest":
        from open_clip.transform import CenterCropOrPad, ResizeKeepRatio

        geometry = [
            ResizeKeepRatio(used.size, interpolation=_interp(used.interpolation), longest=1),
            CenterCropOrPad(used.size, fill=0),
        ]
    else:
        raise PresetError(f"resize_mode {used.resize_mode!r} is unknown; expected shortest, longest or squash.")
    transform = T.Compose([*geometry, _rgb, T.ToTensor(), T.Normalize(used.mean, used.std)])
    return transform, _describe(preset=preset, **asdict(used)), used


def augment_transform(preset: str, spec: ImageSpec) -> tuple[Callable, str]:
    """(random PIL image → tensor transform, description) for an augmentation preset.

    ``spec`` is the evaluation spec actually applied (its size, mean and std are reused), so augmented and clean
    views are normalised alike. The transform draws from the global ``torch``/``random``/``numpy`` generators;
    callers seed them (see :func:`fewclip.features.extract.view_seed`).
    """
    from torchvision import transforms as T

    size, mean, std = spec.size, tuple(spec.mean), tuple(spec.std)
    if preset in ("tip_cache", "dassl_train"):
        scale = (0.5, 1.0) if preset == "tip_cache" else (0.08, 1.0)
        transform = T.Compose(
            [
                _rgb,
                T.RandomResizedCrop(size, scale=scale, interpolation=_interp("bicubic")),
                T.RandomHorizontalFlip(p=0.5),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )
        return transform, _describe(preset=preset, size=size, scale=list(scale), flip=0.5, mean=mean, std=std)
    if preset == "flier_timm":
        from timm.data import create_transform

        timm_transform = create_transform(
            input_size=(3, size, size),
            is_training=True,
            scale=(0.08, 1.0),
            interpolation="bicubic",
            auto_augment="rand-m9-mstd0.5-inc1",
            re_prob=0.25,
            re_mode="pixel",
            re_count=1,
            mean=mean,
            std=std,
        )
        transform = T.Compose([_rgb, timm_transform])
        return transform, _describe(
            preset=preset,
            size=size,
            scale=[0.08, 1.0],
            randaugment="rand-m9-mstd0.5-inc1",
            re_prob=0.25,
            mean=mean,
            std=std,
        )
    raise PresetError(f"augmentation preset {preset!r} is unknown; choose one of {list(AUGMENT_PRESETS)}.")
