"""The dataset registry: ``datasets.json`` read into :class:`DatasetInfo` entries, names and folders resolved.

Datasets are described as data (folder names and aliases, image root, split file, template, published counts,
where to get the files); this module is the one loader of that table. :func:`resolve_folder` finds a dataset's
folder under a data root: CoOp's folder name first, then the names APE, Candle and LIFT use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import DataError

#: CoOp's instructions for downloading and laying out the standard datasets.
COOP_DATASETS_URL = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


@dataclass(frozen=True)
class Folder:
    """One accepted folder name of a dataset under ``--data-root``, with its image root."""

    name: str
    by: str
    image_root: str


@dataclass(frozen=True)
class DatasetInfo:
    """One entry of ``datasets.json``."""

    key: str
    display: str
    kind: str
    names: tuple[str, ...]
    folders: tuple[Folder, ...]
    image_root: str
    template: str
    split_file: str | None = None
    lists: dict[str, str] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    template_sets: tuple[str, ...] = ("single",)
    counts: dict[str, int | None] = field(default_factory=dict)
    obtain: str | None = None
    regenerate: dict[str, Any] | None = None
    custom: bool = False

    def where_from(self) -> str:
        """Where the dataset's files come from, for error messages: the entry's ``obtain`` text, else CoOp's
        split file and its source, else the expected folder and CoOp's layout instructions."""
        if self.obtain:
            return self.obtain
        if self.split_file:
            return f"{self.split_file} from {_table()['sources']['coop']}"
        folder = Path(self.folders[0].name if self.folders else self.key, self.image_root).as_posix()
        return f"the images under {folder}/, laid out as in {COOP_DATASETS_URL}"


@cache
def _table() -> dict[str, Any]:
    return json.loads(resources.files("fewclip.data").joinpath("datasets.json").read_text(encoding="utf-8"))


@cache
def _registry() -> dict[str, DatasetInfo]:
    out: dict[str, DatasetInfo] = {}
    for key, d in _table()["datasets"].items():
        image_root = d.get("image_root", ".")
        folders = tuple(Folder(f["name"], f.get("by", ""), f.get("image_root", image_root)) for f in d["folders"])
        out[key] = DatasetInfo(
            key=key,
            display=d.get("display", key),
            kind=d["kind"],
            names=tuple(d.get("names", [])),
            folders=folders,
            image_root=image_root,
            template=d["template"],
            split_file=d.get("split_file"),
            lists=dict(d.get("lists", {})),
            files=tuple(d.get("files", [])),
            template_sets=tuple(d.get("template_sets", ["single"])),
            counts=dict(d.get("counts", {})),
            obtain=d.get("obtain"),
            regenerate=d.get("regenerate"),
            custom=bool(d.get("custom", False)),
        )
    return out


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


@cache
def _name_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for key, info in _registry().items():
        for alias in (key, info.display, *info.names, *(f.name for f in info.folders)):
            index.setdefault(_norm(alias), key)
    return index


def list_datasets() -> list[str]:
    """Canonical dataset keys, registry order (the 11 standard datasets first, custom kinds last)."""
    return list(_registry())


def resolve_name(name: str) -> str:
    """The canonical key for a key, Dassl class name, folder alias or config key (``fgvc`` -> ``fgvc_aircraft``)."""
    key = _name_index().get(_norm(name))
    if key is None:
        raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(list_datasets())}.")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name`` (any accepted spelling)."""
    return _registry()[resolve_name(name)]


# --------------------------------------------------------------------------- folder resolution


def resolve_folder(
    name: str, data_root: str | Path | None, path: str | Path | None = None
) -> tuple[Path, str | None, Path]:
    """(dataset folder, alias used or None for an explicit ``path``, image root).

    Aliases are tried in registry order (CoOp's name first); the first existing folder that holds its image
    root (and split file, where there is one) wins.
    """
    info = dataset_info(name)
    if path is not None:
        d = Path(path).expanduser()
        if not d.is_dir():
            raise DataError(f"{info.key}: the dataset path {d} is not a folder.")
        roots = list(dict.fromkeys([f.image_root for f in info.folders] or [info.image_root]))
        for r in roots:
            if (d / r).is_dir():
                return d, None, d / r
        return d, None, d / roots[0]
    if info.custom:
        raise DataError(f"{info.key}: a custom dataset needs its folder or file: pass path= (CLI: --path).")
    if data_root is None:
        raise DataError(
            f"{info.key}: no data root; pass --data-root DIR (the folder holding {info.folders[0].name}/) "
            "or --path to the dataset folder itself."
        )
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"{info.key}: the data root {root} is not a folder.")
    existing = [f for f in info.folders if (root / f.name).is_dir()]
    tried = ", ".join(f"{f.name}/ ({f.by})" for f in info.folders)
    if not existing:
        raise DataError(
            f"{info.key}: no dataset folder under {root}; tried {tried}. Expected content: {info.where_from()}. "
            "Or pass --path to the dataset folder."
        )

    def has_root(f: Folder) -> bool:
        return (root / f.name / f.image_root).is_dir()

    def has_split(f: Folder) -> bool:
        return bool(info.split_file) and (root / f.name / info.split_file).is_file()

    # complete folders first, then one with its images, then one with its split file; ties keep registry order
    f = max(existing, key=lambda f: (has_root(f) and (has_split(f) or not info.split_file), has_root(f), has_split(f)))
    return root / f.name, f.name, root / f.name / f.image_root
