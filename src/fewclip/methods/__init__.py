"""Methods: one module each, one registry.

>>> import fewclip.methods as M
>>> model = M.create("ape", preset="caltech101").fit(bundle)
>>> logits = model.predict_logits(bundle.test_features)
"""

from ..errors import MethodError, NotFittedError
from . import (  # noqa: F401  (importing a method's module registers it)
    ape,
    ape_t,
    candle,
    clap,
    clip_adapter,
    clip_ft,
    clip_lora,
    flier,
    gda,
    linear_probe,
    lp_plus_plus,
    proker,
    tip_adapter,
    tip_adapter_f,
    zero_shot,
)
from .base import Method
from .image import ImageEpisode, ImageMethod, generated_for_episode
from .registry import create, get_class, list_methods, list_presets, preset_params, register
from .registry import load_model as load

__all__ = [
    "ImageEpisode",
    "ImageMethod",
    "Method",
    "MethodError",
    "NotFittedError",
    "create",
    "generated_for_episode",
    "get_class",
    "list_methods",
    "list_presets",
    "load",
    "preset_params",
    "register",
]
