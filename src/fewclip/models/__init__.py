"""CLIP backbones (open_clip by default, Hugging Face transformers on request) and their preprocessing.

============================ ====================================================================================
:mod:`.names`                which model a ``--model``/``--pretrained`` pair names (no download)
:mod:`.backbone`             the :class:`Backbone` type every loader returns
:mod:`.load_open_clip`       open_clip tags, weights files, ``local-dir:``/``hf-hub:``, OpenAI TorchScript archives
:mod:`.load_hf`              transformers ``CLIPModel`` ids and folders
:mod:`.backbones`            :func:`load_backbone`, the one door
:mod:`.spec`                 :class:`BackboneSpec`, the arguments of ``load_backbone`` as data a worker can rebuild
:mod:`.trainable`            :class:`TrainableBackbone`, the image encoder in train mode for fine-tuning
:mod:`.preprocess`           evaluation and augmentation transforms
:mod:`.tiny`                 tiny random models saved to disk, for tests
============================ ====================================================================================

open_clip, transformers, torchvision and timm are imported inside the functions that use them, not at module top:
``import open_clip`` alone costs about 2.3 s after torch, and ``fewclip fit`` on a feature bundle never needs it.
"""

from ..errors import BackboneError, PresetError
from ..io import default_cache_dir
from .backbone import PRECISIONS, Backbone
from .backbones import load_backbone
from .load_hf import HFBackbone
from .load_open_clip import OpenClipBackbone
from .names import HF_OPENAI_IDS, OPENAI_MODELS, WEIGHT_SUFFIXES, ModelSpec, resolve_model
from .preprocess import AUGMENT_PRESETS, EVAL_PRESETS, ImageSpec
from .spec import BackboneSpec
from .trainable import SCOPES, TrainableBackbone

__all__ = [
    "AUGMENT_PRESETS",
    "EVAL_PRESETS",
    "HF_OPENAI_IDS",
    "OPENAI_MODELS",
    "PRECISIONS",
    "SCOPES",
    "WEIGHT_SUFFIXES",
    "Backbone",
    "BackboneError",
    "BackboneSpec",
    "HFBackbone",
    "ImageSpec",
    "ModelSpec",
    "OpenClipBackbone",
    "PresetError",
    "TrainableBackbone",
    "default_cache_dir",
    "load_backbone",
    "resolve_model",
]
