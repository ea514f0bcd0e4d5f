"""Few-shot samplers (``dassl`` and ``portable``) and Candle's exponential imbalance profile.

- ``dassl`` reproduces CoOp/Dassl's draw (``KaiyangZhou/CoOp``, ``KaiyangZhou/Dassl.pytorch``):
  ``random.seed(seed)`` (as Dassl's ``set_random_seed``), then ``generate_fewshot_dataset(train, K)`` and
  ``generate_fewshot_dataset(val, min(K, 4))`` from the same Python ``random`` stream; classes in order of first
  appearance in the split list, ``random.sample`` per class. It uses its own ``random.Random(seed)``, which yields
  the same stream without touching the global one.
- ``portable``: per class (ascending labels) the items sorted by path, permuted by
  ``numpy.random.default_rng([seed, label])``; the support is the first K (nested across K).
- :func:`make_imbalanced`: the long-tailed few-shot setting of Candle (Shi et al., KDD'24; ``shijxcs/Candle``),
  class sizes decaying exponentially from the largest class to ``ratio`` times it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from ..errors import DataError
from .episodes import Episode
from .registry import dataset_info
from .types import DatasetSplits, Item

SAMPLERS = ("dassl", "portable")
VAL_KINDS = ("fewshot", "full")


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
