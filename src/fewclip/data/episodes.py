"""Few-shot episodes: the :class:`Episode` type, its JSON file, its check against a split, and base/new classes.

An :class:`Episode` holds the support (``train``) and few-shot validation (``val``) items with the split's
SHA-256, K, seed and sampler; it is saved as JSON with relative paths. Base-to-new generalisation (CoCoOp, Zhou et
al., CVPR 2022; ``KaiyangZhou/CoOp``) splits the sorted labels at ceil(C / 2): the first half is *base*, the rest
*new*, each relabelled from 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import DataError
from ..io import atomic_write_text
from .types import DatasetSplits, Item

SUBSAMPLES = ("all", "base", "new")
EPISODE_FORMAT = "fewclip-episode/1"


@dataclass(frozen=True)
class Episode:
    """A few-shot draw: support items (``train``) and validation items (``val``), labels in ``classnames``.

    ``val_kind``: ``fewshot`` (min(K, 4) per class), ``full`` (the whole val split) or ``none``.
    ``class_indices``: after a base/new subsample, the original label of each kept class (new label = position).
    """

    dataset: str
    train: list[Item]
    val: list[Item]
    classnames: list[str]
    k: int
    seed: int
    sampler: str
    split_sha256: str
    val_kind: str = "fewshot"
    subsample: str = "all"
    class_indices: list[int] | None = None
    imbalance_ratio: float | None = None
    source: str = "fewclip"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def shots_per_class(self) -> list[int]:
        counts = [0] * self.num_classes
        for it in self.train:
            counts[it.label] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        meta = {
            "format": EPISODE_FORMAT,
            "dataset": self.dataset,
            "seed": self.seed,
            "k": self.k,
            "sampler": self.sampler,
            "split_sha256": self.split_sha256,
            "val_kind": self.val_kind,
            "subsample": self.subsample,
            "class_indices": self.class_indices,
            "imbalance_ratio": self.imbalance_ratio,
            "classnames": self.classnames,
            "source": self.source,
            "fewclip_version": __version__,
            **self.extra,
        }
        rows = {s: [[i.path, i.label, i.classname] for i in getattr(self, s)] for s in ("train", "val")}
        return {**rows, "meta": meta}

    def subsample_classes(self, subsample: str) -> Episode:
        """The base or new half of this all-class episode (labels renumbered 0..|S|-1)."""
        if self.subsample != "all":
            raise DataError(f"episode is already subsampled ({self.subsample!r}); subsample an all-class episode.")
        (train, val), selected = subsample_classes(self.train, self.val, subsample=subsample)
        if subsample == "all":
            return self
        names = [self.classnames[y] for y in selected]
        return replace(self, train=train, val=val, classnames=names, subsample=subsample, class_indices=selected)


# --------------------------------------------------------------------------- episode files


def episode_filename(episode: Episode) -> str:
    """``<dataset>_<split sha[:12]>_k<K>_s<seed>_<sampler>[_<subsample>].json`` (the episode's key)."""
    tail = "" if episode.subsample == "all" else f"_{episode.subsample}"
    if episode.imbalance_ratio is not None:
        tail += f"_imb{episode.imbalance_ratio:g}"
    return f"{episode.dataset}_{episode.split_sha256[:12]}_k{episode.k}_s{episode.seed}_{episode.sampler}{tail}.json"


def save_episode(episode: Episode, path: str | Path) -> Path:
    """Write the episode JSON atomically (relative paths, split SHA-256, K, seed, sampler)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(episode.to_json(), ensure_ascii=False))
    return path


def _rows(obj: Any, where: str) -> list[Item]:
    if not isinstance(obj, list):
        raise DataError(f"{where} must be a list of [path, label, classname] rows.")
    out = []
    for n, row in enumerate(obj):
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and isinstance(row[2], str)):
            raise DataError(f"{where}[{n}] is {row!r}; expected [relative_path, label, classname].")
        if isinstance(row[1], bool) or not isinstance(row[1], int) or row[1] < 0:
            raise DataError(f"{where}[{n}]: label {row[1]!r} is not a non-negative integer.")
        out.append(Item(row[0], row[1], row[2]))
    return out


def load_episode(path: str | Path, splits: DatasetSplits | None = None) -> Episode:
    """Read an episode file. With ``splits``, check that it was drawn from the same split (SHA-256) and that
    every item is in the split with the same label and class name."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such episode file.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid episode JSON ({exc}).") from None
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != EPISODE_FORMAT:
        raise DataError(f"{path}: not a fewclip episode file (meta.format must be {EPISODE_FORMAT!r}).")
    missing = [k for k in ("dataset", "k", "seed", "sampler", "split_sha256", "classnames") if k not in meta]
    if missing:
        raise DataError(f"{path}: meta lacks {missing}.")
    known = {"format", "dataset", "seed", "k", "sampler", "split_sha256", "val_kind", "subsample"}
    known |= {"class_indices", "imbalance_ratio", "classnames", "source", "fewclip_version"}
    episode = Episode(
        dataset=meta["dataset"],
        train=_rows(obj.get("train"), f"{path}: train"),
        val=_rows(obj.get("val", []), f"{path}: val"),
        classnames=list(meta["classnames"]),
        k=int(meta["k"]),
        seed=int(meta["seed"]),
        sampler=meta["sampler"],
        split_sha256=meta["split_sha256"],
        val_kind=meta.get("val_kind", "fewshot"),
        subsample=meta.get("subsample", "all"),
        class_indices=meta.get("class_indices"),
        imbalance_ratio=meta.get("imbalance_ratio"),
        source=meta.get("source", "fewclip"),
        extra={k: v for k, v in meta.items() if k not in known},
    )
    bad = [i for i in (*episode.train, *episode.val) if i.label >= episode.num_classes]
    if bad:
        raise DataError(f"{path}: label {bad[0].label} outside the {episode.num_classes} classes in meta.classnames.")
    if splits is not None:
        verify_episode(episode, splits, str(path))
    return episode


def verify_episode(episode: Episode, splits: DatasetSplits, where: str = "episode") -> None:
    """Raise :class:`DataError` unless ``episode`` was drawn from ``splits`` (hash, paths, labels, names)."""
    if episode.split_sha256 != splits.split_sha256:
        raise DataError(
            f"{where}: drawn from the split with SHA-256 {episode.split_sha256[:12]}…, but {splits.name}'s split "
            f"({splits.split_source}) has {splits.split_sha256[:12]}…; load the same split file or re-sample."
        )
    index = {i.path: i for i in (*splits.train, *splits.val)}
    original = episode.class_indices if episode.class_indices is not None else None
    for it in (*episode.train, *episode.val):
        ref = index.get(it.path)
        if ref is None:
            raise DataError(f"{where}: {it.path} is not in {splits.name}'s train or val split.")
        label = original[it.label] if original is not None else it.label
        if ref.label != label or ref.classname != it.classname:
            raise DataError(
                f"{where}: {it.path} has label {label} ({it.classname!r}) but the split says {ref.label} "
                f"({ref.classname!r})."
            )


# --------------------------------------------------------------------------- base / new


def base_new_labels(labels: Sequence[int]) -> tuple[list[int], list[int]]:
    """(base, new): the sorted distinct labels split at ceil(n / 2)."""
    ordered = sorted(set(labels))
    m = math.ceil(len(ordered) / 2)
    return ordered[:m], ordered[m:]


def subsample_classes(*splits: Sequence[Item], subsample: str = "all") -> tuple[list[list[Item]], list[int]]:
    """Dassl's ``subsample_classes``: base = first ceil(n/2) sorted labels of ``splits[0]``, new = the rest.

    Returns every split filtered to the selected labels and relabelled 0..|S|-1 (original order kept), and
    the selected original labels.
    """
    if subsample not in SUBSAMPLES:
        raise DataError(f"unknown subsample {subsample!r}; valid: {', '.join(SUBSAMPLES)}.")
    if not splits:
        raise DataError("subsample_classes needs at least one split (the few-shot train set first).")
    if subsample == "all":
        labels = sorted({i.label for i in splits[0]})
        return [list(s) for s in splits], labels
    base, new = base_new_labels([i.label for i in splits[0]])
    selected = base if subsample == "base" else new
    relabel = {y: j for j, y in enumerate(selected)}
    out = [[Item(i.path, relabel[i.label], i.classname) for i in s if i.label in relabel] for s in splits]
    return out, selected


def subsample_splits(splits: DatasetSplits, subsample: str) -> DatasetSplits:
    """``splits`` restricted to its base or new classes (decided on ``splits.train``), relabelled."""
    (train, val, test), selected = subsample_classes(splits.train, splits.val, splits.test, subsample=subsample)
    if subsample == "all":
        return splits
    return replace(
        splits,
        train=train,
        val=val,
        test=test,
        classnames=[splits.classnames[y] for y in selected],
        wnids=[splits.wnids[y] for y in selected] if splits.wnids else None,
        imagenet_indices=[splits.imagenet_indices[y] for y in selected] if splits.imagenet_indices else None,
    )
