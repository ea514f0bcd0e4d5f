"""One registry for every method (timm style) and one loader for the published presets (data, not code)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

import torch

from ..data import resolve_name
from ..errors import DataError, MethodError
from ..io import read_safetensors
from .base import INPUTS, MODEL_FORMAT, STATE_SEPARATOR, Method

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: ``@register("ape")`` above ``@dataclass(kw_only=True, repr=False, eq=False)``.

    Refuses a class that is not itself a dataclass (its hyperparameters would not be fields), a hyperparameter
    without a constraint, and an unknown ``inputs`` kind.
    """

    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is registered twice")
        if "__dataclass_fields__" not in vars(cls):
            raise TypeError(f"{cls.__name__}: decorate it with @dataclass(kw_only=True, repr=False, eq=False)")
        missing = [key for key, constraint in cls.constraints().items() if constraint is None]
        if missing:
            raise TypeError(f"{cls.__name__}: hyperparameter(s) {missing} lack a constraint; declare them with param()")
        if cls.inputs not in INPUTS:
            raise TypeError(f"{cls.__name__}: inputs={cls.inputs!r}; expected one of {list(INPUTS)}")
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


def preset_key(method: str, preset: str) -> str:
    """The key of ``preset`` in ``method``'s table: the name itself when the table has it, else the canonical dataset
    key of a dataset name (``fgvc`` → ``fgvc_aircraft``, ``flowers102`` → ``oxford_flowers``, see
    :func:`fewclip.data.resolve_name`). Raises a :class:`MethodError` listing the valid presets."""
    presets = _preset_file(method).get("presets", {})
    key = preset
    if key not in presets:
        try:
            key = resolve_name(preset)
        except DataError:
            pass
    if key not in presets:
        valid = ", ".join(sorted(presets)) or "none (this method has no published presets)"
        raise MethodError(f"{method}: unknown preset {preset!r}; valid presets: {valid}.")
    return key


def preset_params(method: str, preset: str) -> dict[str, Any]:
    """The hyperparameters a published per-dataset configuration sets for ``method``."""
    get_class(method)
    table = _preset_file(method)
    params = dict(table.get("common", {}))
    params.update(table["presets"][preset_key(method, preset)])
    return params


def _build(cls: type[Method], params: dict[str, Any]) -> Method:
    valid = cls.param_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise MethodError(f"{cls.name}: unknown hyperparameter(s) {unknown}; valid: {', '.join(valid)}.")
    return cls(**params)


def create(name: str, *, preset: str | None = None, **params: Any) -> Method:
    """Build a method by name. ``preset`` loads the published per-dataset values and ``params`` override them; the
    preset's canonical key is recorded on the instance (``model.preset``), not as a hyperparameter."""
    cls = get_class(name)
    key = None
    if preset is not None:
        key = preset_key(name, preset)
        params = cls.merge_preset(preset_params(name, key), params)
    model = _build(cls, params)
    model.preset = key
    return model


def load_model(path: str | os.PathLike) -> Method:
    """Load an estimator written by :meth:`Method.save` (also files that kept ``preset`` among the params)."""
    meta, tensors = read_safetensors(path, expected_format=MODEL_FORMAT, what="model", error=MethodError)
    return model_from_state(meta, tensors, where=str(path))


def model_from_state(meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor], where: str = "model") -> Method:
    """The fitted estimator :meth:`Method.state` describes (``where`` names its source in errors)."""
    path = where
    try:
        cls = get_class(meta["method"])
        params = json.loads(meta["params"])
        fitted = json.loads(meta["fitted"])
        preset = params.pop("preset", None)
        if "preset" in meta:
            preset = json.loads(meta["preset"])
        model = _build(cls, params)
    except (KeyError, ValueError, TypeError) as exc:  # MethodError and JSONDecodeError are ValueErrors
        raise MethodError(f"{path}: not a usable model file ({exc}).") from exc
    model.preset = preset
    for key, value in fitted.items():
        setattr(model, key, value)
    for key, value in tensors.items():
        attr, sep, entry = key.partition(STATE_SEPARATOR)
        if sep:  # an entry of a fitted state dict
            if not isinstance(getattr(model, attr, None), dict):
                setattr(model, attr, {})
            getattr(model, attr)[entry] = value
        else:
            setattr(model, key, value)
    return model


__all__ = [
    "create",
    "get_class",
    "list_methods",
    "list_presets",
    "load_model",
    "model_from_state",
    "preset_key",
    "preset_params",
    "register",
]
