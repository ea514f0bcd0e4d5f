"""CLIP backbones (open_clip by default, Hugging Face transformers on request) and text classifiers."""

from .backbones import (
    HF_OPENAI_IDS,
    OPENAI_MODELS,
    Backbone,
    BackboneError,
    ModelSpec,
    default_cache_dir,
    load_backbone,
    resolve_model,
)
from .preprocess import AUGMENT_PRESETS, EVAL_PRESETS, ImageSpec, PresetError
from .text import TextClassifierError, build_prompts, encode_prompts, text_classifier

__all__ = [
    "AUGMENT_PRESETS",
    "EVAL_PRESETS",
    "HF_OPENAI_IDS",
    "OPENAI_MODELS",
    "Backbone",
    "BackboneError",
    "ImageSpec",
    "ModelSpec",
    "PresetError",
    "TextClassifierError",
    "build_prompts",
    "default_cache_dir",
    "encode_prompts",
    "load_backbone",
    "resolve_model",
    "text_classifier",
]
