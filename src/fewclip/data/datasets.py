"""The public loader: :func:`load_dataset` reads a registered (or custom) dataset into :class:`DatasetSplits`.

The registry (:mod:`.registry`) says where a dataset lives and what its published counts are; the readers
(:mod:`.readers`) list its split; this module joins the two, checks that the images exist and reports count
differences as :class:`DataWarning`. Items open as ``splits.root / item.path``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import DataError, DataWarning
from ..io import atomic_write_text
from .readers import KIND_OPTIONS, entry_is_dir, read_raw, unreadable_entry
from .registry import DatasetInfo, dataset_info, resolve_folder
from .types import SPLITS, DatasetSplits


def find_missing(root: str | Path, paths: Iterable[str]) -> list[str]:
    """The ``paths`` (relative to ``root``, or absolute) that are not files; one directory scan per folder.

    A symbolic-link loop, or a folder that cannot be read, among them is a :class:`DataError` naming it."""
    root = os.fspath(root)
    by_dir: dict[str, list[str]] = {}
    for p in paths:
        by_dir.setdefault(os.path.dirname(p), []).append(p)
    missing: list[str] = []
    for d, ps in by_dir.items():
        folder = os.path.join(root, d)
        try:
            with os.scandir(folder) as it:
                present = {e.name for e in it if not entry_is_dir(e)}
        except (FileNotFoundError, NotADirectoryError):
            present = set()
        except DataError:
            raise
        except OSError as exc:  # a folder that is a link loop, or has no read permission
            raise unreadable_entry(folder, exc) from None
        missing.extend(p for p in ps if os.path.basename(p) not in present)
    return missing


def outside_root(root: str | Path, paths: Iterable[str]) -> list[str]:
    """The ``paths`` that leave ``root``: absolute paths not under it, and relative ones whose ``..`` climb out.

    The test is lexical (``a/../b.jpg`` stays inside; symbolic links are not resolved), so it costs a substring
    test per path on a million-image split."""
    base = os.path.abspath(root)
    out = []
    for p in paths:
        if not (p.startswith("/") or ".." in p or os.path.isabs(p)):
            continue
        full = os.path.normpath(os.path.join(base, p))
        if full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
            out.append(p)
    return out


def count_warnings(info: DatasetInfo, found: Mapping[str, int], standard_split: bool) -> list[str]:
    """Differences of the ``found`` class and image counts (keys ``classes``, ``train``, ``val``, ``test``) from
    the published ones (users keep subsets: warnings, not errors). ``standard_split``: the published split file
    was read, so a difference points at another copy of it."""
    out = []
    for what in ("classes", "train", "val", "test"):
        expected = info.counts.get(what)
        if expected is None or found[what] == expected:
            continue
        if what == "classes":
            cause = "a partial download, another version of the dataset, or a subset of the classes"
        elif info.kind == "split_json" and standard_split:
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
    allow_outside_root: bool = False,
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

    Every image path the split names must lie under the image root: a ``../`` that climbs out of it, or an
    absolute path elsewhere (a CSV row), is a :class:`DataError` naming the file and the path, unless
    ``allow_outside_root=True`` (CLI ``--allow-outside-root``). The test is on the paths as written; symbolic
    links inside the root are followed wherever they lead (a dataset folder linked from another disk is common,
    and the links are the user's own, unlike a downloaded split file). A link that loops is a :class:`DataError`.

    Labels are class indices: the C classes of a split are 0..C-1 without gaps, so a label >= C (for instance a
    stray 10000000000) is a :class:`DataError` naming the file, the row and the value.

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
            link = " (a symbolic link that loops or leads nowhere)" if location.is_symlink() else ""
            raise DataError(f"{info.key}: {location} does not exist{link}.")
        dataset_dir, alias = (location if location.is_dir() else location.parent), None
        image_root = Path(opts.pop("image_root", dataset_dir)).expanduser()
        if info.kind == "csv" and any(opts.get(s) for s in SPLITS) and "image_root" not in kind_options:
            image_root = Path(opts["train"]).expanduser().parent if opts.get("train") else dataset_dir
    else:
        dataset_dir, alias, image_root = resolve_folder(info.key, data_root, path)
        location = dataset_dir
    raw = read_raw(info, location, image_root, opts)
    if not allow_outside_root:
        for split in SPLITS:
            outside = outside_root(image_root, (i.path for i in getattr(raw, split)))
            if outside:
                raise DataError(
                    f"{info.key}: {len(outside)} {split} path(s) in {raw.split_source} leave the image root "
                    f"{image_root} (first: {outside[0]!r}). Fix the paths, or pass allow_outside_root=True "
                    "(CLI --allow-outside-root) if they are meant to point outside it."
                )
    standard_split = raw.standard and not info.custom
    found = {"classes": len(raw.classnames), **{s: len(getattr(raw, s)) for s in SPLITS}}
    all_warnings = (*raw.warnings, *count_warnings(info, found, standard_split))
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
        standard_split=standard_split,
        wnids=raw.wnids,
        imagenet_indices=raw.imagenet_indices,
        warnings=all_warnings,
    )
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
