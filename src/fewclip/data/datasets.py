"""Dataset registry, folder resolution and split readers.

The datasets are described as data in ``datasets.json`` (folder names and aliases, image root, split files,
template, published counts); this module is the one loader. :func:`load_dataset` returns a
:class:`DatasetSplits` whose items open as ``splits.root / item.path``.

Readers (datasets_and_protocols.md §2-§5, §9, §11):

- ``split_json``: CoOp's ``split_zhou_*.json`` (``{"train"|"val"|"test": [[path, label, classname], ...]}``),
  paths relative to the image root. Labels and names come from the file.
- ``fgvc``: ``variants.txt`` (label = line index) and ``images_variant_{train,val,test}.txt``.
- ``imagenet``: ``images/train/<wnid>/`` and ``images/val/<wnid>/`` (val is the test set), ``classnames.txt``;
  labels = index of the wnid in the sorted train folders.
- ``imagenet_v2`` (folders ``0..999``) and ``imagenet_folders`` (Sketch, A, R: sorted wnid folders): test only.
- ``lt_list``: ``<path> <label>`` lists (ImageNet-LT, Places-LT) with ``classnames.txt``.
- ``folder`` and ``csv``: users' own data (see :func:`load_dataset`).

A missing split file is an error that says where the file goes; nothing is re-split silently.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import DataError, DataWarning
from ..io import atomic_write_text
from .classnames import imagenet_classnames_difference

#: File suffixes read as images in users' own folders (case-insensitive).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SPLITS = ("train", "val", "test")


@dataclass(frozen=True, slots=True)
class Item:
    """One image: ``path`` relative to :attr:`DatasetSplits.root` (absolute only for absolute CSV rows)."""

    path: str
    label: int
    classname: str


@dataclass(frozen=True)
class DatasetSplits:
    """A loaded dataset. Open an image as ``root / item.path``.

    - ``root``: the image root, the folder the split file's paths are relative to (e.g.
      ``caltech-101/101_ObjectCategories``); ``dataset_dir`` is the dataset folder itself.
    - ``classnames[label]``: the cleaned name (underscores kept; replace them at prompt time).
    - ``val`` is empty when the dataset has none (ImageNet: its val images are ``test``); ``train`` and ``val``
      are empty for the test-only ImageNet variants.
    - ``split_sha256``: SHA-256 of the split file's bytes when one file defines the split (``split_zhou_*.json``,
      a user's JSON), else of the loaded listing (lines ``split\\tpath\\tlabel\\tclassname``).
    - ``template``: the dataset's single template (``{}`` placeholder); ``template_set``: the default set name.
    - ``wnids`` / ``imagenet_indices``: for the ImageNet family, each class's wnid and its index among ImageNet's
      1000 classes (for 1000-way evaluation of the variants).
    """

    name: str
    root: Path
    classnames: list[str]
    train: list[Item]
    val: list[Item]
    test: list[Item]
    split_sha256: str
    template_set: str = "single"
    template: str = "a photo of a {}."
    dataset_dir: Path | None = None
    folder_alias: str | None = None
    split_source: str = ""
    standard_split: bool = True
    wnids: list[str] | None = None
    imagenet_indices: list[int] | None = None
    warnings: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def has_val(self) -> bool:
        return bool(self.val)

    def counts(self) -> dict[str, int]:
        return {"classes": self.num_classes, "train": len(self.train), "val": len(self.val), "test": len(self.test)}


# --------------------------------------------------------------------------- registry (data, one loader)


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
        if self.obtain:
            return self.obtain
        if self.split_file:
            return f"{self.split_file} from {_table()['sources']['coop']}"
        return "see datasets_and_protocols.md §2"


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

    for test in (lambda f: has_root(f) and (has_split(f) or not info.split_file), has_root, has_split):
        for f in existing:
            if test(f):
                return root / f.name, f.name, root / f.name / f.image_root
    f = existing[0]
    return root / f.name, f.name, root / f.name / f.image_root


# --------------------------------------------------------------------------- helpers


def listing_sha256(train: Sequence[Item], val: Sequence[Item], test: Sequence[Item]) -> str:
    """SHA-256 of a split given as a listing (lines ``split\\tpath\\tlabel\\tclassname``)."""
    h = hashlib.sha256()
    for split, items in zip(SPLITS, (train, val, test)):
        for start in range(0, len(items), 100_000):
            chunk = items[start : start + 100_000]
            h.update("".join(f"{split}\t{i.path}\t{i.label}\t{i.classname}\n" for i in chunk).encode("utf-8"))
    return h.hexdigest()


def find_missing(root: str | Path, paths: Iterable[str]) -> list[str]:
    """The ``paths`` (relative to ``root``, or absolute) that are not files; one directory scan per folder."""
    root = os.fspath(root)
    by_dir: dict[str, list[str]] = {}
    for p in paths:
        by_dir.setdefault(os.path.dirname(p), []).append(p)
    missing: list[str] = []
    for d, ps in by_dir.items():
        try:
            with os.scandir(os.path.join(root, d)) as it:
                present = {e.name for e in it if not e.is_dir()}
        except (FileNotFoundError, NotADirectoryError):
            present = set()
        missing.extend(p for p in ps if os.path.basename(p) not in present)
    return missing


def _scan(folder: Path) -> tuple[list[str], list[str]]:
    """(sorted sub-folder names, sorted file names) of ``folder``, hidden entries skipped."""
    dirs, files = [], []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            (dirs if e.is_dir() else files).append(e.name)
    return sorted(dirs), sorted(files)


def _read_text(path: Path, what: str, dataset: str, hint: str) -> str:
    if not path.is_file():
        raise DataError(f"{dataset}: {what} {path} not found. {hint}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None


def _classnames_from_items(splits: dict[str, list[Item]], where: str) -> list[str]:
    """Names per label: from train (as Dassl does), else from val/test; labels must be 0..C-1 without gaps."""
    names: dict[int, str] = {}
    for split in SPLITS:
        seen: dict[int, str] = {}
        for it in splits[split]:
            prev = seen.setdefault(it.label, it.classname)
            if prev != it.classname:
                raise DataError(
                    f"{where}: label {it.label} has two class names in {split} ({prev!r} and {it.classname!r}); "
                    "every label needs one name."
                )
        for label, name in seen.items():
            names.setdefault(label, name)
    if not names:
        raise DataError(f"{where}: the split lists no images.")
    num = max(names) + 1
    gaps = [y for y in range(num) if y not in names]
    if gaps:
        raise DataError(
            f"{where}: labels must run 0..{num - 1} without gaps; label(s) {gaps[:5]} never appear. "
            "Relabel the rows or restore the missing classes."
        )
    return [names[y] for y in range(num)]


def _parse_label(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: label {value!r} is not an integer.")
    if isinstance(value, int):
        label = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        label = int(value)
    else:
        raise DataError(f"{where}: label {value!r} is not an integer.")
    if label < 0:
        raise DataError(f"{where}: label {label} is negative; labels are 0-based class indices.")
    return label


def _rel(path: str) -> str:
    path = path.replace("\\", "/")
    return path[2:] if path.startswith("./") else path


# --------------------------------------------------------------------------- readers


@dataclass
class _Raw:
    train: list[Item]
    val: list[Item]
    test: list[Item]
    classnames: list[str]
    split_sha256: str
    split_source: str
    standard: bool = True
    wnids: list[str] | None = None
    imagenet_indices: list[int] | None = None
    warnings: list[str] = field(default_factory=list)


def read_split_json(path: str | Path) -> tuple[dict[str, list[Item]], str]:
    """A CoOp-format split file -> ({"train"|"val"|"test": items}, sha256 of the file bytes)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid JSON split file ({exc}).") from None
    if not isinstance(obj, dict) or set(obj) != set(SPLITS):
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path}: a split file is an object with exactly the keys train, val, test; found {found}.")
    out: dict[str, list[Item]] = {}
    for split in SPLITS:
        rows = obj[split]
        if not isinstance(rows, list):
            raise DataError(f"{path}: '{split}' must be a list of [path, label, classname] rows.")
        items = []
        for i, row in enumerate(rows):
            where = f"{path}: {split}[{i}]"
            if not isinstance(row, list | tuple) or len(row) != 3:
                raise DataError(f"{where} is {row!r}; expected [relative_path, label, classname].")
            p, y, c = row
            if not isinstance(p, str) or not p or not isinstance(c, str):
                raise DataError(f"{where} is {row!r}; path and classname must be strings.")
            items.append(Item(_rel(p).lstrip("/"), _parse_label(y, where), c))
        out[split] = items
    return out, hashlib.sha256(data).hexdigest()


def _read_split_json_dataset(info: DatasetInfo, dataset_dir: Path, image_root: Path, opts: dict[str, Any]) -> _Raw:
    regen = opts.pop("regenerate_split", None)
    split_file = opts.pop("split_file", None)
    if regen is not None:
        if not info.regenerate:
            raise DataError(
                f"{info.key}: regenerate_split is supported only for "
                f"{', '.join(k for k, i in _registry().items() if i.regenerate)}; "
                f"use CoOp's {info.split_file} ({info.where_from()})."
            )
        return _regenerate_from_folders(info, image_root, int(regen))
    path = Path(split_file).expanduser() if split_file else dataset_dir / info.split_file
    if not path.is_file():
        regen_hint = (
            ", or regenerate_split=SEED (CLI --regenerate-split SEED) for a recorded NON-standard split"
            if info.regenerate
            else ""
        )
        raise DataError(
            f"{info.key}: split file {path} not found. It is CoOp's published split: {info.where_from()}. "
            f"Put it at that path, or pass split_file=PATH (CLI --split-file){regen_hint}; "
            "fewclip never re-splits silently."
        )
    splits, sha = read_split_json(path)
    names = _classnames_from_items(splits, str(path))
    raw = _Raw(splits["train"], splits["val"], splits["test"], names, sha, path.name)
    renames = (info.regenerate or {}).get("renames") or {}
    raw_names = sorted({n for n in names if n in renames and renames[n] != n})
    if raw_names:
        raw.warnings.append(
            f"{info.key}: {path.name} uses raw folder names as class names ({', '.join(raw_names[:4])}); CoOp's "
            f"split uses the renamed ones ({', '.join(renames[n] for n in raw_names[:4])}), which zero-shot "
            "accuracy depends on."
        )
    return raw


def _split_groups(
    groups: list[tuple[str, str, list[str]]], seed: int, where: str
) -> tuple[list[Item], list[Item], list[Item]]:
    """Per class (label order): shuffle with ``random.Random(seed)``; train round(0.5n), val round(0.2n), test rest.

    ``groups`` holds (classname, folder prefix, sorted file names). DTD.read_and_split_data's rule on a sorted
    listing, one RNG stream over the classes.
    """
    rng = random.Random(seed)
    train, val, test = [], [], []
    for label, (name, prefix, files) in enumerate(groups):
        files = list(files)
        rng.shuffle(files)
        n = len(files)
        n_train, n_val = round(n * 0.5), round(n * 0.2)
        if n_train == 0:
            raise DataError(f"{where}: class {name!r} has {n} image(s); a generated split needs at least 2.")
        paths = [f"{prefix}{f}" for f in files]
        train += [Item(p, label, name) for p in paths[:n_train]]
        val += [Item(p, label, name) for p in paths[n_train : n_train + n_val]]
        test += [Item(p, label, name) for p in paths[n_train + n_val :]]
    return train, val, test


def _regenerate_from_folders(info: DatasetInfo, image_root: Path, seed: int) -> _Raw:
    if not image_root.is_dir():
        raise DataError(f"{info.key}: image folder {image_root} not found; it is needed to regenerate the split.")
    ignored = set(info.regenerate.get("ignored", []))
    renames = info.regenerate.get("renames", {})
    categories = [c for c in _scan(image_root)[0] if c not in ignored]
    groups = [(renames.get(c, c), f"{c}/", _scan(image_root / c)[1]) for c in categories]
    train, val, test = _split_groups(groups, seed, str(image_root))
    raw = _Raw(
        train,
        val,
        test,
        [g[0] for g in groups],
        listing_sha256(train, val, test),
        f"regenerated 50/20/30 per class, seed {seed} (NON-standard: not CoOp's {info.split_file})",
        standard=False,
    )
    raw.warnings.append(f"{info.key}: using a regenerated split (seed {seed}), not CoOp's {info.split_file}.")
    return raw


def _read_fgvc(info: DatasetInfo, dataset_dir: Path, image_root: Path, opts: dict[str, Any]) -> _Raw:
    hint = f"Expected: {info.where_from()}."
    text = _read_text(dataset_dir / "variants.txt", "class list", info.key, hint)
    variants = [line.strip() for line in text.splitlines() if line.strip()]
    label_of = {v: i for i, v in enumerate(variants)}
    splits: dict[str, list[Item]] = {}
    for split in SPLITS:
        path = dataset_dir / f"images_variant_{split}.txt"
        items = []
        for n, line in enumerate(_read_text(path, "split list", info.key, hint).splitlines(), 1):
            parts = line.strip().split(" ")
            if not parts[0]:
                continue
            variant = " ".join(parts[1:])
            if variant not in label_of:
                raise DataError(
                    f"{path}:{n}: variant {variant!r} is not in variants.txt; the lists and variants.txt must come "
                    "from the same fgvc-aircraft-2013b archive."
                )
            items.append(Item(f"{parts[0]}.jpg", label_of[variant], variant))
        splits[split] = items
    sha = listing_sha256(splits["train"], splits["val"], splits["test"])
    return _Raw(splits["train"], splits["val"], splits["test"], variants, sha, "images_variant_*.txt + variants.txt")


def read_wnid_classnames(path: Path, dataset: str) -> dict[str, str]:
    """``classnames.txt`` lines ``<wnid> <name with spaces>`` -> {wnid: name}, file order."""
    hint = "Copy ImageNet's classnames.txt (CoOp's DATASETS.md) into the dataset folder."
    out: dict[str, str] = {}
    for n, line in enumerate(_read_text(path, "class-name file", dataset, hint).splitlines(), 1):
        parts = line.strip().split(" ")
        if not parts[0]:
            continue
        if len(parts) < 2:
            raise DataError(f"{path}:{n}: {line.strip()!r} has no class name; lines are '<wnid> <class name>'.")
        out[parts[0]] = " ".join(parts[1:])
    return out


def _read_imagenet(info: DatasetInfo, dataset_dir: Path, images: Path, opts: dict[str, Any]) -> _Raw:
    cn_path = dataset_dir / "classnames.txt"
    names = read_wnid_classnames(cn_path, info.key)
    raw_warnings = []
    diff = imagenet_classnames_difference(list(names.values()), str(cn_path))
    if diff:
        raw_warnings.append(diff)
    train_dir, val_dir = images / "train", images / "val"
    if not val_dir.is_dir():
        raise DataError(
            f"{info.key}: {val_dir} not found; ImageNet needs images/val/<wnid>/ (the test set) and "
            f"images/train/<wnid>/ under {dataset_dir}. Expected: {info.where_from()}."
        )
    val_dirs, val_files = _scan(val_dir)
    if not val_dirs:
        raise DataError(
            f"{info.key}: {val_dir} holds {len(val_files)} files and no class folders. The raw ILSVRC2012 val "
            "tarball is flat; move each image into images/val/<wnid>/ (e.g. with valprep.sh from the "
            "pytorch/examples ImageNet README), otherwise the test set is empty."
        )
    train_dirs = _scan(train_dir)[0] if train_dir.is_dir() else []
    if not train_dirs:
        raw_warnings.append(f"{info.key}: {train_dir} has no class folders; labels follow the val folders.")
    wnids = train_dirs or val_dirs
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise DataError(
            f"{info.key}: folder(s) {unknown[:3]} are not in {cn_path} ({len(unknown)} in all); "
            "use ImageNet's classnames.txt with one '<wnid> <name>' line per class."
        )
    label_of = {w: i for i, w in enumerate(wnids)}
    extra = [w for w in val_dirs if w not in label_of]
    if extra:
        raise DataError(f"{info.key}: {val_dir} has class folder(s) {extra[:3]} that {train_dir} lacks.")
    train = [Item(f"train/{w}/{f}", y, names[w]) for y, w in enumerate(train_dirs) for f in _scan(train_dir / w)[1]]
    test = [Item(f"val/{w}/{f}", label_of[w], names[w]) for w in val_dirs for f in _scan(val_dir / w)[1]]
    index = {w: i for i, w in enumerate(names)}
    raw = _Raw(
        train,
        [],
        test,
        [names[w] for w in wnids],
        listing_sha256(train, [], test),
        "images/train and images/val class folders + classnames.txt",
        wnids=list(wnids),
        imagenet_indices=[index[w] for w in wnids],
    )
    raw.warnings += raw_warnings
    return raw


def _read_imagenet_v2(info: DatasetInfo, dataset_dir: Path, image_root: Path, opts: dict[str, Any]) -> _Raw:
    cn_path = dataset_dir / "classnames.txt"
    names = read_wnid_classnames(cn_path, info.key)
    wnids, classnames = list(names), list(names.values())
    raw = _Raw([], [], [], classnames, "", "class folders 0..999 + classnames.txt", wnids=wnids)
    raw.imagenet_indices = list(range(len(wnids)))
    diff = imagenet_classnames_difference(classnames, str(cn_path))
    if diff:
        raw.warnings.append(diff)
    if not image_root.is_dir():
        raise DataError(f"{info.key}: image folder {image_root} not found. Expected: {info.where_from()}.")
    folders = [d for d in _scan(image_root)[0] if d.isdigit()]
    for d in sorted(folders, key=int):
        label = int(d)
        if label >= len(classnames):
            raise DataError(
                f"{info.key}: folder {image_root / d} is label {label}, but {cn_path} has only "
                f"{len(classnames)} classes."
            )
        raw.test += [Item(f"{d}/{f}", label, classnames[label]) for f in _scan(image_root / d)[1]]
    raw.split_sha256 = listing_sha256([], [], raw.test)
    return raw


def _read_imagenet_folders(info: DatasetInfo, dataset_dir: Path, image_root: Path, opts: dict[str, Any]) -> _Raw:
    cn_path = dataset_dir / "classnames.txt"
    names = read_wnid_classnames(cn_path, info.key)
    if not image_root.is_dir():
        raise DataError(f"{info.key}: image folder {image_root} not found. Expected: {info.where_from()}.")
    wnids = _scan(image_root)[0]
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise DataError(
            f"{info.key}: folder(s) {unknown[:3]} under {image_root} are not in {cn_path}; "
            "use ImageNet's classnames.txt."
        )
    test = [Item(f"{w}/{f}", y, names[w]) for y, w in enumerate(wnids) for f in _scan(image_root / w)[1]]
    index = {w: i for i, w in enumerate(names)}
    raw = _Raw(
        [],
        [],
        test,
        [names[w] for w in wnids],
        listing_sha256([], [], test),
        "sorted wnid folders + classnames.txt",
        wnids=wnids,
        imagenet_indices=[index[w] for w in wnids],
    )
    if len(names) == 1000:
        diff = imagenet_classnames_difference(list(names.values()), str(cn_path))
        if diff:
            raw.warnings.append(diff)
    return raw


def _read_lt(info: DatasetInfo, dataset_dir: Path, image_root: Path, opts: dict[str, Any]) -> _Raw:
    lists_dir = Path(opts.pop("lists_dir", dataset_dir)).expanduser()
    hint = f"Expected: {info.where_from()}."
    cn_path = lists_dir / "classnames.txt"
    if not cn_path.is_file():
        cn_path = dataset_dir / "classnames.txt"
    classnames = []
    for line in _read_text(cn_path, "class-name file", info.key, hint).splitlines():
        parts = line.split()
        if parts:
            classnames.append(" ".join(parts[1:]) or parts[0])
    splits = {}
    for split in SPLITS:
        path = lists_dir / info.lists[split]
        items = []
        for n, line in enumerate(_read_text(path, f"{split} list", info.key, hint).splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise DataError(f"{path}:{n}: {line.strip()!r}; expected '<relative_path> <label>'.")
            label = _parse_label(parts[1], f"{path}:{n}")
            if label >= len(classnames):
                raise DataError(f"{path}:{n}: label {label}, but {cn_path} lists {len(classnames)} classes.")
            items.append(Item(_rel(parts[0]), label, classnames[label]))
        splits[split] = items
    raw = _Raw(
        splits["train"],
        splits["val"],
        splits["test"],
        classnames,
        listing_sha256(splits["train"], splits["val"], splits["test"]),
        " + ".join(info.lists[s] for s in SPLITS),
    )
    if info.key == "imagenet_lt":
        diff = imagenet_classnames_difference(classnames, str(cn_path))
        if diff:
            raw.warnings.append(diff)
    return raw


def _read_folder(info: DatasetInfo, folder: Path, image_root: Path, opts: dict[str, Any]) -> _Raw:
    split_file = opts.pop("split_file", None)
    seed = int(opts.pop("split_seed", 1))
    if split_file is not None:
        splits, sha = read_split_json(Path(split_file).expanduser())
        names = _classnames_from_items(splits, str(split_file))
        return _Raw(splits["train"], splits["val"], splits["test"], names, sha, Path(split_file).name, standard=False)
    if not image_root.is_dir():
        raise DataError(f"folder: {image_root} is not a folder (expected one sub-folder per class).")

    def classes_in(d: Path, prefix: str) -> list[tuple[str, str, list[str]]]:
        out = []
        for c in _scan(d)[0]:
            files = [f for f in _scan(d / c)[1] if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
            out.append((c, f"{prefix}{c}/", files))
        return out

    top = _scan(image_root)[0]
    if "train" in top and "test" in top:
        parts = {s: classes_in(image_root / s, f"{s}/") if s in top else [] for s in SPLITS}
        names = sorted({c for groups in parts.values() for c, _, files in groups if files})
        label_of = {c: i for i, c in enumerate(names)}
        items = {s: [Item(p + f, label_of[c], c) for c, p, fs in parts[s] for f in fs] for s in SPLITS}
        source = "train/, val/, test/ class folders" if "val" in top else "train/, test/ class folders (no val)"
        sha = listing_sha256(items["train"], items["val"], items["test"])
        return _Raw(items["train"], items["val"], items["test"], names, sha, source, standard=False)
    groups = [g for g in classes_in(image_root, "") if g[2]]
    if not groups:
        raise DataError(
            f"folder: {image_root} has no class sub-folders with images ({', '.join(sorted(IMAGE_EXTENSIONS))})."
        )
    train, val, test = _split_groups(groups, seed, str(image_root))
    source = f"generated 50/20/30 per class, seed {seed}"
    return _Raw(train, val, test, [g[0] for g in groups], listing_sha256(train, val, test), source, standard=False)


def _read_csv_file(path: Path) -> list[tuple[str, int, str | None]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"csv: {path} not found.") from None
    rows: list[tuple[str, int, str | None]] = []
    for n, row in enumerate(csv.reader(text.splitlines()), 1):
        if not "".join(row).strip():
            continue
        where = f"{path}:{n}"
        if len(row) not in (2, 3):
            raise DataError(f"{where}: {len(row)} columns; rows are path,label[,classname].")
        if n == 1 and not row[1].strip().lstrip("-").isdigit():
            continue  # a header row
        p = row[0].strip()
        p = p if os.path.isabs(p) else _rel(p)
        rows.append((p, _parse_label(row[1].strip(), where), row[2].strip() if len(row) == 3 else None))
    return rows


def _read_csv(info: DatasetInfo, location: Path, image_root: Path, opts: dict[str, Any]) -> _Raw:
    seed = int(opts.pop("split_seed", 1))
    files: dict[str, Path | None] = {s: opts.pop(s, None) for s in SPLITS}
    if any(files.values()):
        files = {s: Path(p).expanduser() if p else None for s, p in files.items()}
        if files["train"] is None:
            raise DataError("csv: train= (CLI --train-csv) is needed when CSV files are named one by one.")
    elif location.is_dir():
        files = {s: (location / f"{s}.csv" if (location / f"{s}.csv").is_file() else None) for s in SPLITS}
        if files["train"] is None:
            raise DataError(f"csv: {location} has no train.csv (expected train.csv, test.csv, optional val.csv).")
    else:
        files = {"train": location, "val": None, "test": None}
    rows = {s: _read_csv_file(p) if p else [] for s, p in files.items()}
    names: dict[int, str] = {}
    for s in SPLITS:
        for _, y, c in rows[s]:
            if c is not None and names.setdefault(y, c) != c:
                raise DataError(f"csv: label {y} has two class names ({names[y]!r} and {c!r}) in {files[s]}.")
    num = 1 + max((y for s in SPLITS for _, y, _ in rows[s]), default=-1)
    if num == 0:
        raise DataError(f"csv: {files['train']} lists no images.")
    cn_file = opts.pop("classnames_file", None)
    cn_path = Path(cn_file).expanduser() if cn_file else files["train"].parent / "classnames.txt"
    if len(names) < num and cn_path.is_file():
        lines = [ln.strip() for ln in cn_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        for y, name in enumerate(lines):
            names.setdefault(y, name)
    gaps = [y for y in range(num) if y not in names]
    if gaps:
        raise DataError(
            f"csv: no class name for label(s) {gaps[:5]}; add a third column (path,label,classname) or a "
            f"classnames.txt with one name per line (line i = label i) at {cn_path}."
        )
    classnames = [names[y] for y in range(num)]
    if files["test"] is None and files["val"] is None:
        by_label: dict[int, list[str]] = {}
        for p, y, _ in rows["train"]:
            by_label.setdefault(y, []).append(p)
        groups = [(classnames[y], "", sorted(by_label.get(y, []))) for y in range(num)]
        train, val, test = _split_groups(groups, seed, str(files["train"]))
        source = f"{files['train'].name}, generated 50/20/30 per class, seed {seed}"
    else:
        train, val, test = ([Item(p, y, classnames[y]) for p, y, _ in rows[s]] for s in SPLITS)
        source = " + ".join(p.name for p in files.values() if p is not None)
    return _Raw(train, val, test, classnames, listing_sha256(train, val, test), source, standard=False)


_READERS = {
    "split_json": _read_split_json_dataset,
    "fgvc": _read_fgvc,
    "imagenet": _read_imagenet,
    "imagenet_v2": _read_imagenet_v2,
    "imagenet_folders": _read_imagenet_folders,
    "lt_list": _read_lt,
    "folder": _read_folder,
    "csv": _read_csv,
}

#: Options each kind accepts through ``load_dataset(**kind_options)``.
KIND_OPTIONS = {
    "split_json": ("split_file", "regenerate_split"),
    "fgvc": (),
    "imagenet": (),
    "imagenet_v2": (),
    "imagenet_folders": (),
    "lt_list": ("lists_dir",),
    "folder": ("split_file", "split_seed", "image_root"),
    "csv": ("train", "val", "test", "split_seed", "image_root", "classnames_file"),
}


# --------------------------------------------------------------------------- public loader


def count_warnings(info: DatasetInfo, splits: DatasetSplits) -> list[str]:
    """Differences from the published class and image counts (users keep subsets: warnings, not errors)."""
    found = splits.counts()
    out = []
    for what in ("classes", "train", "val", "test"):
        expected = info.counts.get(what)
        if expected is None or found[what] == expected:
            continue
        if what == "classes":
            cause = "a partial download, another version of the dataset, or a subset of the classes"
        elif info.kind == "split_json" and splits.standard_split:
            cause = f"a split file other than CoOp's {info.split_file}, or a subset"
        elif info.kind == "imagenet" and what == "test":
            cause = "an incomplete images/val (it must hold 50 images in each of the 1000 wnid folders)"
        elif info.kind == "lt_list":
            cause = "other list files than the OLTR/LIFT ones (their path prefixes and sizes vary between copies)"
        else:
            cause = "a partial download or another version of the dataset"
        out.append(
            f"{info.key}: {found[what]} {what if what == 'classes' else what + ' images'}, "
            f"published {expected}; likely cause: {cause}."
        )
    return out


def load_dataset(
    name: str,
    data_root: str | Path | None = None,
    *,
    path: str | Path | None = None,
    check_files: bool = True,
    warn: bool = True,
    **kind_options: Any,
) -> DatasetSplits:
    """Load a registered dataset (or a ``folder`` / ``csv`` custom one) into :class:`DatasetSplits`.

    ``data_root`` holds one folder per dataset (CoOp's names; APE's and Candle's accepted); ``path`` points at
    the dataset folder itself and overrides the data root. Custom kinds need ``path``: ``folder`` = one
    sub-folder per class (or ``train/``, ``test/`` [``val/``] holding class folders; or any tree with a
    ``split_file``); ``csv`` = a folder with ``train.csv``, ``test.csv`` [``val.csv``], or one CSV file. Without
    a split, custom data is split 50/20/30 per class with ``split_seed`` (recorded in ``split_source``).

    ``check_files`` verifies that every image the split names exists (one directory scan per folder); missing
    files raise :class:`DataError`. Differences from the published counts become :class:`DataWarning`\\ s (also
    kept in ``splits.warnings``).

    ``kind_options``: split files ``split_file``, ``regenerate_split`` (a seed; Caltech101, DTD, EuroSAT and
    Food101 only; the split is then marked non-standard); LT lists ``lists_dir``; ``folder``: ``split_file``,
    ``split_seed`` (default 1), ``image_root``; ``csv``: ``train``, ``val``, ``test`` (file paths),
    ``split_seed``, ``image_root`` (what relative CSV paths are relative to; default the CSV's folder),
    ``classnames_file``.
    """
    info = dataset_info(name)
    valid = KIND_OPTIONS[info.kind]
    opts = {k: v for k, v in kind_options.items() if v is not None}
    unknown = sorted(k for k in opts if k not in valid)
    if unknown:
        raise DataError(
            f"{info.key}: unknown option(s) {unknown}; valid for this dataset: {', '.join(valid) or 'none'}."
        )
    if info.custom:
        if path is None:
            raise DataError(f"{info.key}: a custom dataset needs its folder or file: pass path= (CLI: --path).")
        location = Path(path).expanduser()
        if not location.exists():
            raise DataError(f"{info.key}: {location} does not exist.")
        dataset_dir, alias = (location if location.is_dir() else location.parent), None
        image_root = Path(opts.pop("image_root", dataset_dir)).expanduser()
        if info.kind == "csv" and any(opts.get(s) for s in SPLITS) and "image_root" not in kind_options:
            image_root = Path(opts["train"]).expanduser().parent if opts.get("train") else dataset_dir
    else:
        dataset_dir, alias, image_root = resolve_folder(info.key, data_root, path)
        location = dataset_dir
    raw = _READERS[info.kind](info, location, image_root, opts)
    splits = DatasetSplits(
        name=info.key,
        root=image_root,
        classnames=raw.classnames,
        train=raw.train,
        val=raw.val,
        test=raw.test,
        split_sha256=raw.split_sha256,
        template=info.template,
        dataset_dir=dataset_dir,
        folder_alias=alias,
        split_source=raw.split_source,
        standard_split=raw.standard and not info.custom,
        wnids=raw.wnids,
        imagenet_indices=raw.imagenet_indices,
        warnings=tuple(raw.warnings),
    )
    all_warnings = (*raw.warnings, *count_warnings(info, splits))
    object.__setattr__(splits, "warnings", all_warnings)
    if check_files:
        missing = find_missing(image_root, (i.path for part in (raw.train, raw.val, raw.test) for i in part))
        if missing:
            total = len(raw.train) + len(raw.val) + len(raw.test)
            raise DataError(
                f"{info.key}: {len(missing)} of {total} images named by {raw.split_source} are missing under "
                f"{image_root} (first: {', '.join(missing[:3])}); run `fewclip datasets check {info.key}` for "
                f"the full list, or re-download ({info.where_from()})."
            )
    if warn:
        for w in all_warnings:
            warnings.warn(w, DataWarning, stacklevel=2)
    return splits


def save_split(splits: DatasetSplits, path: str | Path) -> Path:
    """Write ``splits`` as a CoOp-format split JSON (atomic); reload it with ``split_file=path``."""
    path = Path(path)
    obj = {s: [[i.path, i.label, i.classname] for i in getattr(splits, s)] for s in SPLITS}
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False))
    return path
