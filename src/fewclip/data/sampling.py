"""Few-shot episodes: the ``dassl`` and ``portable`` samplers, episode files, CoOp pickle import, base/new
classes and the exponential imbalance profile (datasets_and_protocols.md §7, §9; candle.md §5.2).

- ``dassl`` reproduces CoOp/Dassl's draw: ``random.seed(seed)`` (as Dassl's ``set_random_seed``), then
  ``generate_fewshot_dataset(train, K)`` and ``generate_fewshot_dataset(val, min(K, 4))`` from the same Python
  ``random`` stream; classes in order of first appearance in the split list, ``random.sample`` per class. It uses
  its own ``random.Random(seed)``, which yields the same stream without touching the global one.
- ``portable``: per class (ascending labels) the items sorted by path, permuted by
  ``numpy.random.default_rng([seed, label])``; the support is the first K (nested across K).

An :class:`Episode` holds the support (``train``) and few-shot validation (``val``) items with the split's
SHA-256, K, seed and sampler; it is saved as JSON with relative paths.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import DataError
from ..io import atomic_write_text
from .registry import dataset_info
from .types import SPLITS, DatasetSplits, Item

SAMPLERS = ("dassl", "portable")
VAL_KINDS = ("fewshot", "full")
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


def default_sampler(name: str) -> str:
    """``dassl`` for the registered datasets, ``portable`` for ``folder`` and ``csv`` data."""
    return "portable" if dataset_info(name).custom else "dassl"


# --------------------------------------------------------------------------- samplers (pure)


def group_by_label(items: Sequence[Item]) -> dict[int, list[Item]]:
    """Items per label; dict order = order of first appearance (Dassl's ``split_dataset_by_label``)."""
    groups: dict[int, list[Item]] = {}
    for it in items:
        groups.setdefault(it.label, []).append(it)
    return groups


def dassl_fewshot(items: Sequence[Item], k: int, rng: random.Random, *, repeat: bool = False) -> list[Item]:
    """Dassl's ``generate_fewshot_dataset(items, num_shots=k, repeat)`` drawing from ``rng``.

    Per label in order of first appearance: ``rng.sample(group, k)`` when the group has at least k items,
    else ``rng.choices(group, k=k)`` (repeat) or the whole group (no draw). Class-grouped output.
    """
    out: list[Item] = []
    for group in group_by_label(items).values():
        if len(group) >= k:
            out += rng.sample(group, k)
        elif repeat:
            out += rng.choices(group, k=k)
        else:
            out += group
    return out


def _portable_perm(group: list[Item], key: list[int]) -> tuple[list[Item], np.random.Generator]:
    ordered = sorted(group, key=lambda i: i.path)
    rng = np.random.default_rng(key)
    return [ordered[j] for j in rng.permutation(len(ordered))], rng


def portable_fewshot(items: Sequence[Item], k: int, seed: int, *, repeat: bool = False) -> list[Item]:
    """Portable support: per label (ascending), sorted by path, permuted by ``default_rng([seed, label])``,
    first k (all if fewer; ``repeat`` tops up with draws with replacement from the same generator)."""
    groups = group_by_label(items)
    out: list[Item] = []
    for label in sorted(groups):
        perm, rng = _portable_perm(groups[label], [seed, label])
        out += perm[:k]
        if repeat and len(perm) < k:
            out += [perm[j] for j in rng.integers(0, len(perm), size=k - len(perm))]
    return out


def sample_episode(
    splits: DatasetSplits,
    k: int,
    seed: int,
    *,
    sampler: str | None = None,
    val_kind: str = "fewshot",
    repeat: bool = False,
) -> Episode:
    """Draw a K-shot episode from ``splits`` (all classes; subsample afterwards, as CoOp does).

    ``sampler``: ``dassl`` (default for registered datasets) or ``portable`` (default for custom data).
    ``val_kind``: ``fewshot`` = min(K, 4) per class from the val split, or, without one (ImageNet), from the
    class's train items outside the support; ``full`` = the whole val split.
    """
    sampler = sampler or default_sampler(splits.name)
    if sampler not in SAMPLERS:
        raise DataError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}.")
    if val_kind not in VAL_KINDS:
        raise DataError(f"unknown val_kind {val_kind!r}; valid: {', '.join(VAL_KINDS)}.")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DataError(f"shots must be a positive integer, got {k!r}.")
    if not splits.train:
        raise DataError(f"{splits.name} is test-only (no train split); it cannot be sampled.")
    if val_kind == "full" and not splits.val:
        raise DataError(
            f"{splits.name} has no validation split, so val_kind='full' is unavailable; use val_kind='fewshot' "
            "(min(K, 4) per class from train, disjoint from the support)."
        )
    kv = min(k, 4)
    if sampler == "dassl":
        rng = random.Random(seed)  # the stream of random.seed(seed), as Dassl's set_random_seed
        train = dassl_fewshot(splits.train, k, rng, repeat=repeat)
        if val_kind == "full":
            val = list(splits.val)
        elif splits.val:
            val = dassl_fewshot(splits.val, kv, rng, repeat=repeat)
        else:
            chosen = {id(i) for i in train}
            val = []
            for group in group_by_label(splits.train).values():
                rest = [i for i in group if id(i) not in chosen]
                val += rng.sample(rest, kv) if len(rest) >= kv else rest
    else:
        train = portable_fewshot(splits.train, k, seed, repeat=repeat)
        if val_kind == "full":
            val = list(splits.val)
        elif splits.val:
            groups = group_by_label(splits.val)
            val = [i for y in sorted(groups) for i in _portable_perm(groups[y], [seed, y, 1])[0][:kv]]
        else:
            groups = group_by_label(splits.train)
            val = []
            for y in sorted(groups):
                after = _portable_perm(groups[y], [seed, y])[0][k:]
                val += after[max(0, len(after) - kv) :]
    return Episode(
        dataset=splits.name,
        train=train,
        val=val,
        classnames=list(splits.classnames),
        k=k,
        seed=seed,
        sampler=sampler,
        split_sha256=splits.split_sha256,
        val_kind=val_kind,
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


# --------------------------------------------------------------------------- imbalance (Candle)


def imbalance_counts(n_max: int, num_classes: int, ratio: float) -> list[int]:
    """n_i = max(floor(n_max * ratio^(i / (C - 1))), 1) for the class of rank i (C = 1: [n_max])."""
    if not 0 < ratio <= 1:
        raise DataError(f"imbalance ratio must be in (0, 1], got {ratio!r} (Candle uses 0.02; 1.0 = balanced).")
    if num_classes == 1:
        return [n_max]
    return [int(max(n_max * (ratio ** (i / (num_classes - 1.0))), 1)) for i in range(num_classes)]


def make_imbalanced(items: Sequence[Item], ratio: float, seed: int) -> list[Item]:
    """Candle's exponential profile on ``items``: classes ranked by count (descending, ties by first
    appearance) keep :func:`imbalance_counts` items each, chosen without replacement by
    ``numpy.random.RandomState(seed)`` (classes in ascending label order). Item order is preserved.
    """
    if ratio == 1.0:
        imbalance_counts(1, 1, ratio)
        return list(items)
    groups = group_by_label(items)
    ranked = sorted(groups, key=lambda y: -len(groups[y]))  # stable: ties keep first appearance
    keep = dict(zip(ranked, imbalance_counts(len(groups[ranked[0]]), len(ranked), ratio)))
    labels = np.fromiter((i.label for i in items), dtype=np.int64, count=len(items))
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    rs = np.random.RandomState(seed)
    selected = np.zeros(len(items), dtype=bool)
    for idx in np.split(order, bounds):
        idx = idx.copy()
        rs.shuffle(idx)
        selected[idx[: keep[int(labels[idx[0]])]]] = True
    return [it for it, s in zip(items, selected) if s]


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


# --------------------------------------------------------------------------- CoOp pickle import


class _Datum:
    """Stand-in for Dassl's ``Datum`` (attributes ``_impath``, ``_label``, ``_classname``)."""

    def field(self, name: str) -> Any:
        d = self.__dict__
        return d.get(f"_{name}", d.get(name))


class _CoOpUnpickler(pickle.Unpickler):
    _ALLOWED = {("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor"), ("builtins", "object")}

    def find_class(self, module: str, name: str) -> Any:
        if name == "Datum":
            return _Datum
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a CoOp few-shot pickle holds only Datum)")


_PKL_NAME = re.compile(r"shot_(\d+)-seed_(\d+)\.pkl$")


def import_coop_pickle(
    pkl_path: str | Path, splits: DatasetSplits, *, k: int | None = None, seed: int | None = None
) -> Episode:
    """Convert CoOp's ``split_fewshot/shot_{K}-seed_{S}.pkl`` into an :class:`Episode` for ``splits``.

    The pickle is read through a restricted unpickler (no Dassl needed, nothing else is constructed). Absolute
    paths are rewritten relative to the image root by matching them against the split; every item must be in
    the split with the same label and name, and every class must have min(K, n) (or K) support images and, when
    the dataset has a val split, min(K, 4)-ish val images (incomplete bundles are rejected).
    """
    pkl_path = Path(pkl_path)
    m = _PKL_NAME.search(pkl_path.name)
    if (k is None or seed is None) and not m:
        raise DataError(f"{pkl_path}: name is not shot_K-seed_S.pkl; pass k= and seed= (CLI --shots, --seed).")
    k = int(m.group(1)) if k is None else k
    seed = int(m.group(2)) if seed is None else seed
    try:
        with open(pkl_path, "rb") as fh:
            data = _CoOpUnpickler(fh).load()
    except FileNotFoundError:
        raise DataError(f"{pkl_path}: no such file.") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DataError(f"{pkl_path}: not a CoOp few-shot pickle ({exc}).") from None
    if not isinstance(data, dict) or "train" not in data:
        raise DataError(f"{pkl_path}: expected a dict with 'train' (and 'val') lists of Datum.")
    if splits.val and "val" not in data:
        raise DataError(f"{pkl_path}: has no 'val' list, but {splits.name} has a val split (incomplete bundle).")
    known = {i.path: i for i in (*splits.train, *splits.val)}
    strip: int | None = None

    def relative(impath: str) -> str:
        nonlocal strip
        parts = impath.replace("\\", "/").split("/")
        if strip is not None and "/".join(parts[strip:]) in known:
            return "/".join(parts[strip:])
        for s in range(len(parts)):
            if "/".join(parts[s:]) in known:
                strip = s
                return "/".join(parts[s:])
        raise DataError(
            f"{pkl_path}: {impath} matches no image of {splits.name}'s split ({splits.split_source}); the pickle "
            "comes from another dataset or split file."
        )

    out: dict[str, list[Item]] = {}
    for part in ("train", "val"):
        rows = data.get(part, [])
        if not isinstance(rows, list) or not all(isinstance(d, _Datum) for d in rows):
            raise DataError(f"{pkl_path}: '{part}' must be a list of Datum objects.")
        items = []
        for d in rows:
            impath, label, name = d.field("impath"), d.field("label"), d.field("classname")
            if not isinstance(impath, str):
                raise DataError(f"{pkl_path}: a Datum in '{part}' has no image path.")
            rel = relative(impath)
            ref = known[rel]
            if int(label) != ref.label or name != ref.classname:
                raise DataError(
                    f"{pkl_path}: {rel} has label {label} ({name!r}); the split says {ref.label} ({ref.classname!r})."
                )
            items.append(ref)
        out[part] = items
    _check_counts(out["train"], splits.train, k, pkl_path, "train")
    if splits.val:
        _check_counts(out["val"], splits.val, min(k, 4), pkl_path, "val")
    return Episode(
        dataset=splits.name,
        train=out["train"],
        val=out["val"],
        classnames=list(splits.classnames),
        k=k,
        seed=seed,
        sampler="dassl",
        split_sha256=splits.split_sha256,
        val_kind="fewshot" if out["val"] else "none",
        source=f"coop-pickle:{pkl_path.name}",
    )


def _check_counts(items: list[Item], full: list[Item], k: int, where: Path, part: str) -> None:
    have = {y: len(g) for y, g in group_by_label(items).items()}
    for y, group in group_by_label(full).items():
        n = have.get(y, 0)
        if n not in (k, min(k, len(group))):
            name = group[0].classname
            raise DataError(
                f"{where}: incomplete bundle: class {y} ({name!r}) has {n} {part} image(s), expected "
                f"{min(k, len(group))} (K={k}); re-run CoOp's sampling or sample with fewclip."
            )


__all__ = [
    "EPISODE_FORMAT",
    "SAMPLERS",
    "SPLITS",
    "SUBSAMPLES",
    "VAL_KINDS",
    "Episode",
    "base_new_labels",
    "dassl_fewshot",
    "default_sampler",
    "episode_filename",
    "group_by_label",
    "import_coop_pickle",
    "imbalance_counts",
    "load_episode",
    "make_imbalanced",
    "portable_fewshot",
    "sample_episode",
    "save_episode",
    "subsample_classes",
    "subsample_splits",
    "verify_episode",
]
