"""CLIP backbones (open_clip by default, Hugging Face transformers on request) and their preprocessing."""

from ..errors import BackboneError, PresetError
from ..io import default_cache_dir
from .backbones import (
    HF_OPENAI_IDS,
    OPENAI_MODELS,
    Backbone,
    ModelSpec,
    load_backbone,
    resolve_model,
)
from .preprocess import AUGMENT_PRESETS, EVAL_PRESETS, ImageSpec
from .spec import BackboneSpec

__all__ = [
    "AUGMENT_PRESETS",
    "EVAL_PRESETS",
    "HF_OPENAI_IDS",
    "OPENAI_MODELS",
    "Backbone",
    "BackboneError",
    "BackboneSpec",
    "ImageSpec",
    "ModelSpec",
    "PresetError",
    "default_cache_dir",
    "load_backbone",
    "resolve_model",
]
