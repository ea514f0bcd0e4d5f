"""Split readers: one per dataset ``kind`` of ``datasets.json``, each returning the raw listing of a dataset.

- ``split_json``: CoOp's ``split_zhou_*.json`` (``{"train"|"val"|"test": [[path, label, classname], ...]}``),
  paths relative to the image root; labels and names come from the file (CoOp, ``KaiyangZhou/CoOp``, DATASETS.md).
  ``regenerate_split`` redraws the 50/20/30 per-class split of CoOp's
  ``DTD.read_and_split_data`` from the image folders (marked non-standard).
- ``fgvc``: ``variants.txt`` (label = line index) and ``images_variant_{train,val,test}.txt`` of the official
  fgvc-aircraft-2013b archive.
- ``imagenet``: ``images/train/<wnid>/`` and ``images/val/<wnid>/`` (val is the test set), ``classnames.txt``;
  labels = index of the wnid in the sorted train folders.
- ``imagenet_v2`` (folders ``0..999``) and ``imagenet_folders`` (Sketch, A, R: sorted wnid folders): test only.
- ``lt_list``: ``<path> <label>`` lists (ImageNet-LT, Places-LT, as released with OLTR) with ``classnames.txt``.
- ``folder`` and ``csv``: users' own data (see :func:`fewclip.data.load_dataset`).

A missing split file is an error that says where the file goes; nothing is re-split silently.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from .classnames import imagenet_classnames_difference
from .registry import DatasetInfo, dataset_info, list_datasets
from .types import IMAGE_EXTENSIONS, SPLITS, Item

# --------------------------------------------------------------------------- parse helpers


def listing_sha256(train: Sequence[Item], val: Sequence[Item], test: Sequence[Item]) -> str:
    """SHA-256 of a split given as a listing (lines ``split\\tpath\\tlabel\\tclassname``)."""
    h = hashlib.sha256()
    for split, items in zip(SPLITS, (train, val, test)):
        for start in range(0, len(items), 100_000):
            chunk = items[start : start + 100_000]
            h.update("".join(f"{split}\t{i.path}\t{i.label}\t{i.classname}\n" for i in chunk).encode("utf-8"))
    return h.hexdigest()


def unreadable_entry(path: str | os.PathLike[str], exc: OSError) -> DataError:
    """The error for a folder entry that cannot even be stat'ed: a symbolic-link loop (ELOOP) or no permission."""
    if exc.errno == errno.ELOOP:
        return DataError(
            f"{os.fspath(path)}: a symbolic-link loop (following it never reaches a file or folder); remove the "
            "link or point it at a real image or folder."
        )
    return DataError(f"{os.fspath(path)}: cannot be read ({exc.strerror}); fix its permissions or remove it.")


def entry_is_dir(entry: os.DirEntry[str]) -> bool:
    """``entry.is_dir()`` (symbolic links followed), a link loop or an unreadable entry a :class:`DataError`."""
    try:
        return entry.is_dir()
    except OSError as exc:
        raise unreadable_entry(entry.path, exc) from None


def _scan(folder: Path) -> tuple[list[str], list[str]]:
    """(sorted sub-folder names, sorted file names) of ``folder``, hidden entries skipped.

    Symbolic links are followed (a dataset folder linked from another disk is common); a link that loops, or an
    entry that cannot be read, is a :class:`DataError` naming it.
    """
    dirs, files = [], []
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                (dirs if entry_is_dir(e) else files).append(e.name)
    except DataError:
        raise
    except OSError as exc:
        raise unreadable_entry(folder, exc) from None
    return sorted(dirs), sorted(files)


def decode_text(raw: bytes, path: str | Path) -> str:
    """``raw`` (the bytes of ``path``) decoded as UTF-8, a leading byte-order mark dropped; anything else is a
    one-line :class:`DataError` naming the file and the byte offset of the first undecodable byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{bad} at offset {exc.start}: {exc.reason}); save it as UTF-8."
        ) from None


def read_text_file(path: Path) -> str:
    """The UTF-8 text of ``path`` (see :func:`decode_text`); ``OSError`` (missing file, ...) passes through."""
    return decode_text(path.read_bytes(), path)


def _read_text(path: Path, what: str, dataset: str, hint: str) -> str:
    if not path.is_file():
        raise DataError(f"{dataset}: {what} {path} not found. {hint}")
    return read_text_file(path)


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
    top = max(names)
    if top >= len(names):  # C distinct labels must be exactly 0..C-1
        split, row = next((s, i) for s in SPLITS for i, it in enumerate(splits[s]) if it.label == top)
        raise DataError(
            f"{where}: {split}[{row}] has label {top}, but the split has {len(names)} distinct labels, so they must "
            f"run 0..{len(names) - 1} without gaps (label(s) {_first_gaps(names, top + 1)} never appear). "
            "Relabel the rows or restore the missing classes."
        )
    return [names[y] for y in range(top + 1)]


def _first_gaps(present: dict[int, Any], num: int, count: int = 5) -> str:
    """The first ``count`` of 0..num-1 missing from ``present``, as text (``"1, 2, 3, 4, 5, ..."``); a bounded
    scan, whatever ``num`` is (a label of 10**10 must not build a list of 10**10 entries)."""
    gaps: list[int] = []
    for y in range(min(num, len(present) + count)):
        if y not in present:
            gaps.append(y)
            if len(gaps) == count:
                break
    more = len(gaps) == count and num - len(present) > count
    return ", ".join(map(str, gaps)) + (", ..." if more else "")


def _is_int_text(text: str) -> bool:
    """``text`` is an integer in ASCII digits (``"٣"`` and ``"²"`` pass ``str.isdigit`` but are not labels)."""
    digits = text.strip().removeprefix("-")
    return digits.isascii() and digits.isdigit()


def _parse_label(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: label {value!r} is not an integer.")
    if isinstance(value, int):
        label = value
    elif isinstance(value, str) and _is_int_text(value):
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
class RawSplits:
    """What a reader found: the three splits, class names, the split's SHA-256 and source, and warnings.

    ``standard`` is False for a split other than the published one (regenerated or user-made).
    """

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
        obj = json.loads(decode_text(data, path))
    except json.JSONDecodeError as exc:
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


def _read_split_json_dataset(info: DatasetInfo, dataset_dir: Path, image_root: Path, opts: dict[str, Any]) -> RawSplits:
    regen = opts.pop("regenerate_split", None)
    split_file = opts.pop("split_file", None)
    if regen is not None:
        if not info.regenerate:
            raise DataError(
                f"{info.key}: regenerate_split is supported only for "
                f"{', '.join(k for k in list_datasets() if dataset_info(k).regenerate)}; "
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
    raw = RawSplits(splits["train"], splits["val"], splits["test"], names, sha, path.name)
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


def _regenerate_from_folders(info: DatasetInfo, image_root: Path, seed: int) -> RawSplits:
    if not image_root.is_dir():
        raise DataError(f"{info.key}: image folder {image_root} not found; it is needed to regenerate the split.")
    ignored = set(info.regenerate.get("ignored", []))
    renames = info.regenerate.get("renames", {})
    categories = [c for c in _scan(image_root)[0] if c not in ignored]
    groups = [(renames.get(c, c), f"{c}/", _scan(image_root / c)[1]) for c in categories]
    train, val, test = _split_groups(groups, seed, str(image_root))
    raw = RawSplits(
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


def _read_fgvc(info: DatasetInfo, dataset_dir: Path, image_root: Path, opts: dict[str, Any]) -> RawSplits:
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
    return RawSplits(
        splits["train"], splits["val"], splits["test"], variants, sha, "images_variant_*.txt + variants.txt"
    )


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


def _read_imagenet(info: DatasetInfo, dataset_dir: Path, images: Path, opts: dict[str, Any]) -> RawSplits:
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
    raw = RawSplits(
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


def _read_imagenet_v2(info: DatasetInfo, dataset_dir: Path, image_root: Path, opts: dict[str, Any]) -> RawSplits:
    cn_path = dataset_dir / "classnames.txt"
    names = read_wnid_classnames(cn_path, info.key)
    wnids, classnames = list(names), list(names.values())
    raw = RawSplits([], [], [], classnames, "", "class folders 0..999 + classnames.txt", wnids=wnids)
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


def _read_imagenet_folders(info: DatasetInfo, dataset_dir: Path, image_root: Path, opts: dict[str, Any]) -> RawSplits:
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
    raw = RawSplits(
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


def _read_lt(info: DatasetInfo, dataset_dir: Path, image_root: Path, opts: dict[str, Any]) -> RawSplits:
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
    raw = RawSplits(
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


def _read_folder(info: DatasetInfo, folder: Path, image_root: Path, opts: dict[str, Any]) -> RawSplits:
    split_file = opts.pop("split_file", None)
    seed = int(opts.pop("split_seed", 1))
    if split_file is not None:
        splits, sha = read_split_json(Path(split_file).expanduser())
        names = _classnames_from_items(splits, str(split_file))
        return RawSplits(
            splits["train"], splits["val"], splits["test"], names, sha, Path(split_file).name, standard=False
        )
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
        return RawSplits(items["train"], items["val"], items["test"], names, sha, source, standard=False)
    groups = [g for g in classes_in(image_root, "") if g[2]]
    if not groups:
        raise DataError(
            f"folder: {image_root} has no class sub-folders with images ({', '.join(sorted(IMAGE_EXTENSIONS))})."
        )
    train, val, test = _split_groups(groups, seed, str(image_root))
    source = f"generated 50/20/30 per class, seed {seed}"
    return RawSplits(train, val, test, [g[0] for g in groups], listing_sha256(train, val, test), source, standard=False)


def _read_csv_file(path: Path) -> list[tuple[str, int, str | None, int]]:
    """Rows ``(path, label, classname or None, line number)`` of one CSV file."""
    try:
        text = read_text_file(path)
    except FileNotFoundError:
        raise DataError(f"csv: {path} not found.") from None
    rows: list[tuple[str, int, str | None, int]] = []
    for n, row in enumerate(csv.reader(text.splitlines()), 1):
        if not "".join(row).strip():
            continue
        where = f"{path}:{n}"
        if len(row) not in (2, 3):
            raise DataError(f"{where}: {len(row)} columns; rows are path,label[,classname].")
        if n == 1 and not _is_int_text(row[1]):
            continue  # a header row
        p = row[0].strip()
        p = p if os.path.isabs(p) else _rel(p)
        rows.append((p, _parse_label(row[1].strip(), where), row[2].strip() if len(row) == 3 else None, n))
    return rows


def _read_csv(info: DatasetInfo, location: Path, image_root: Path, opts: dict[str, Any]) -> RawSplits:
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
        for _, y, c, _ in rows[s]:
            if c is not None and names.setdefault(y, c) != c:
                raise DataError(f"csv: label {y} has two class names ({names[y]!r} and {c!r}) in {files[s]}.")
    labels = {y for s in SPLITS for _, y, _, _ in rows[s]}
    num = 1 + max(labels, default=-1)
    if num == 0:
        raise DataError(f"csv: {files['train']} lists no images.")
    cn_file = opts.pop("classnames_file", None)
    cn_path = Path(cn_file).expanduser() if cn_file else files["train"].parent / "classnames.txt"
    lines: list[str] = []
    if len(names) < num and cn_path.is_file():
        lines = [ln.strip() for ln in read_text_file(cn_path).splitlines() if ln.strip()]
        for y, name in enumerate(lines):
            names.setdefault(y, name)
    classes = max(len(labels), len(lines))  # labels 0..C-1: every class has rows, or a line in classnames.txt
    if num > classes:
        s, line = next((s, n) for s in SPLITS for _, y, _, n in rows[s] if y == num - 1)
        named = f"{len(labels)} distinct labels" + (f" and {cn_path} names {len(lines)} classes" if lines else "")
        raise DataError(
            f"{files[s]}:{line}: label {num - 1} is out of range: the CSV has {named}, so labels must run "
            f"0..{classes - 1} (label(s) {_first_gaps(dict.fromkeys(labels), num)} never appear). Relabel the rows, "
            f"or name every class in {cn_path} (line i = label i)."
        )
    gaps = [y for y in range(num) if y not in names]
    if gaps:
        raise DataError(
            f"csv: no class name for label(s) {gaps[:5]}; add a third column (path,label,classname) or a "
            f"classnames.txt with one name per line (line i = label i) at {cn_path}."
        )
    classnames = [names[y] for y in range(num)]
    if files["test"] is None and files["val"] is None:
        by_label: dict[int, list[str]] = {}
        for p, y, _, _ in rows["train"]:
            by_label.setdefault(y, []).append(p)
        groups = [(classnames[y], "", sorted(by_label.get(y, []))) for y in range(num)]
        train, val, test = _split_groups(groups, seed, str(files["train"]))
        source = f"{files['train'].name}, generated 50/20/30 per class, seed {seed}"
    else:
        train, val, test = ([Item(p, y, classnames[y]) for p, y, _, _ in rows[s]] for s in SPLITS)
        source = " + ".join(p.name for p in files.values() if p is not None)
    return RawSplits(train, val, test, classnames, listing_sha256(train, val, test), source, standard=False)


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


def read_raw(info: DatasetInfo, location: Path, image_root: Path, opts: dict[str, Any]) -> RawSplits:
    """Read the dataset at ``location`` with its kind's reader; the reader pops the ``opts`` it uses."""
    return _READERS[info.kind](info, location, image_root, opts)
