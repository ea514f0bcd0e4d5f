"""One registry for every method (timm style) and one loader for the published presets (data, not code)."""

from __future__ import annotations

import json
import os
from functools import cache
from importlib import resources
from typing import Any

from ..errors import MethodError
from ..io import read_safetensors
from .base import MODEL_FORMAT, Method

_REGISTRY: dict[str, type[Method]] = {}

#: Other names for preset datasets used by the published code bases (APE's and Tip-Adapter's config files).
PRESET_ALIASES = {
    "fgvc": "fgvc_aircraft",
    "fgvcaircraft": "fgvc_aircraft",
    "flowers102": "oxford_flowers",
    "oxfordpets": "oxford_pets",
    "stanfordcars": "stanford_cars",
}


def register(name: str):
    """Class decorator: ``@register("ape")``."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(list_methods())}.")
    return _REGISTRY[name]


@cache
def _preset_file(method: str) -> dict[str, Any]:
    try:
        text = resources.files("fewclip.methods").joinpath("presets", f"{method}.json").read_text()
    except FileNotFoundError:
        return {}
    return json.loads(text)


def list_presets(method: str) -> list[str]:
    return sorted(_preset_file(method).get("presets", {}))


def preset_params(method: str, preset: str) -> dict[str, Any]:
    """The hyperparameters a published per-dataset configuration sets for ``method``."""
    get_class(method)
    table = _preset_file(method)
    presets = table.get("presets", {})
    key = PRESET_ALIASES.get(preset, preset)
    if key not in presets:
        valid = ", ".join(sorted(presets)) or "none (this method has no published presets)"
        raise MethodError(f"{method}: unknown preset {preset!r}; valid presets: {valid}.")
    params = dict(table.get("common", {}))
    params.update(presets[key])
    return params


def preset_source(method: str) -> str | None:
    return _preset_file(method).get("source")


def create(name: str, *, preset: str | None = None, **params: Any) -> Method:
    """Build a method by name. ``preset`` loads the published per-dataset values; ``params`` override them."""
    cls = get_class(name)
    merged: dict[str, Any] = {}
    if preset is not None:
        merged.update(preset_params(name, preset))
        if "channels" in params and "channels_reference_dim" not in params:
            # An explicit channel count is used verbatim, not rescaled from the preset's RN50 dimension.
            merged["channels_reference_dim"] = None
    merged.update(params)
    valid = cls.param_names()
    unknown = sorted(set(merged) - set(valid))
    if unknown:
        raise MethodError(f"{name}: unknown hyperparameter(s) {unknown}; valid: {', '.join(valid)}.")
    if "preset" in valid:
        merged["preset"] = PRESET_ALIASES.get(preset, preset) if preset else merged.get("preset")
    return cls(**merged)


def load_model(path: str | os.PathLike) -> Method:
    """Load an estimator written by :meth:`Method.save`."""
    meta, tensors = read_safetensors(path, expected_format=MODEL_FORMAT, what="model", error=MethodError)
    model = create(meta["method"], **json.loads(meta["params"]))
    for key, value in json.loads(meta["fitted"]).items():
        setattr(model, key, value)
    for key, value in tensors.items():
        setattr(model, key, value)
    return model
