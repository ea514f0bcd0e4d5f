"""The configuration of a run, in parts a sweep can vary one at a time: data, backbone, extraction, methods and
protocol. Built from command-line options or read from a TOML file (stdlib ``tomllib``)::

    [data]
    dataset = "caltech101"
    data_root = "/data"

    [backbone]
    model = "RN50"
    pretrained = "openai"
    device = "cuda"

    [extraction]
    views = 10

    [methods]
    names = ["zero-shot", "tip-adapter", "ape"]
    preset = "paper"
    overrides = { ape = { search_step = [100, 10, 10] } }

    [protocol]
    name = "fewshot"
    shots = [1, 2, 4, 8, 16]
    seeds = [1, 2, 3]

Unknown sections or keys are errors that name the file, the key and the valid keys.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ResultsError
from ..features.pipeline import ExtractionOptions
from ..io import read_toml
from ..models import BackboneSpec

PROTOCOLS = ("fewshot", "base2new", "base2new-imbalanced", "longtail", "transfer")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, how its episodes are drawn, and the prompts of its zero-shot classifier."""

    dataset: str
    data_root: str | None = None
    path: str | None = None
    kind_options: Mapping[str, Any] = field(default_factory=dict)
    prompts: str = "single"
    sampler: str | None = None
    val_kind: str = "fewshot"
    generated: str | None = None  # a generated set (fewclip generate) for methods that train on it (FLIER)


@dataclass(frozen=True)
class MethodsConfig:
    """The methods to fit. ``preset='paper'`` uses each method's published configuration for the dataset where it has
    one; ``overrides`` maps a method name (or ``"*"``, every method) to hyperparameters. ``selection`` None (not
    given): "val", or "cv" for a folder or CSV dataset without a validation split of its own (resolved by
    :func:`fewclip.protocols.runner.plan`)."""

    names: Sequence[str] = ("zero-shot", "tip-adapter", "ape")
    preset: str | None = None
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    selection: str | None = None


@dataclass(frozen=True)
class ProtocolConfig:
    """The protocol and its episodes: shot counts, seeds and the protocol's own options."""

    name: str = "fewshot"
    shots: Sequence[int] = (1, 2, 4, 8, 16)
    seeds: Sequence[int] = (1, 2, 3)
    imbalance_ratio: float | None = None  # base2new-imbalanced
    base_eval: str = "within_base"  # base2new*
    targets: Sequence[str] = ()  # transfer
    variant_eval: str = "200way"  # transfer
    variant_scoring: str = "source_columns"  # transfer


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; ``cache_dir`` is the feature cache (default ``$FEWCLIP_CACHE``, ``~/.cache/fewclip``)."""

    data: DataConfig
    backbone: BackboneSpec
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    extraction: ExtractionOptions = field(default_factory=ExtractionOptions)
    cache_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the sections of the TOML file)."""
        return {
            "data": dataclasses.asdict(self.data),
            "backbone": self.backbone.to_dict(),
            "methods": dataclasses.asdict(self.methods),
            "protocol": dataclasses.asdict(self.protocol),
            "extraction": dataclasses.asdict(self.extraction),
            "cache_dir": self.cache_dir,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], where: str = "run configuration") -> RunConfig:
        """Build from plain data (sections as in the TOML file); ``where`` names the source in errors."""
        unknown = sorted(set(obj) - set(SECTIONS) - {"cache_dir"})
        if unknown:
            raise ResultsError(f"{where}: unknown section(s) {unknown}; valid: {', '.join(SECTIONS)}, cache_dir.")
        parts: dict[str, Any] = {}
        for name, kind in SECTIONS.items():
            values = obj.get(name, {})
            if not isinstance(values, Mapping):
                raise ResultsError(f"{where}: [{name}] must be a table of keys, got {type(values).__name__}.")
            parts[name] = _build(kind, values, f"{where} [{name}]")
        cache_dir = obj.get("cache_dir")
        if cache_dir is not None and not isinstance(cache_dir, str | os.PathLike):
            raise ResultsError(f"{where}: cache_dir must be a folder path, got {cache_dir!r}.")
        if cache_dir is not None and parts["backbone"].cache_dir is None:  # converted checkpoints go there too
            parts["backbone"] = dataclasses.replace(parts["backbone"], cache_dir=str(cache_dir))
        return cls(**parts, cache_dir=None if cache_dir is None else str(cache_dir))


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "backbone": BackboneSpec,
    "methods": MethodsConfig,
    "protocol": ProtocolConfig,
    "extraction": ExtractionOptions,
}


def _build(kind: type, values: Mapping[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ResultsError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(fields)}.")
    missing = [
        name
        for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ResultsError(f"{where}: {', '.join(missing)} must be given.")
    for key, value in values.items():
        expected = SCALAR_TYPES.get(str(fields[key].type))
        # a bool is an int to isinstance: accept it only where a bool is expected
        if expected is not None and not (bool in expected if isinstance(value, bool) else isinstance(value, expected)):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in expected)
            raise ResultsError(f"{where}: {key} = {value!r} is not valid; expected {names}.")
    return kind(**values)


#: the scalar field types of the configuration's parts, as their annotations spell them, and what they accept
SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "str | None": (str, type(None)),
    "bool": (bool,),
    "float | None": (float, int, type(None)),
}


def load_config(path: str | os.PathLike, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> RunConfig:
    """Read a TOML run configuration; ``overrides`` (section → key → value, e.g. from command-line options) win
    over the file's values."""
    obj = read_toml(path, what="configuration", error=ResultsError)
    return RunConfig.from_dict(merge_sections(obj, overrides or {}), where=str(Path(path)))


def merge_sections(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` laid over it, tables merged key by key at every depth (so ``--set ape:alpha=1``
    adds to the file's ``[methods.overrides]`` instead of replacing them), other values replaced."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_sections(out[key], value)
        else:
            out[key] = value
    return out
