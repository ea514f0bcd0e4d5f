"""From a dataset on disk to feature bundles: encode every image an experiment needs once, then slice.

>>> pool = encode_images_once(backbone, splits, episodes, store=FeatureStore())
>>> bundle = episode_bundle(pool, episode, splits.test, text, metadata={...})

:func:`encode_images_once` takes the union of the support images of all episodes (every shot count and seed) and
of their validation images plus the test set, encodes what the cache lacks in two passes (support under V
augmented views and the clean view; val and test under the clean view), and returns a :class:`FeaturePool`
indexed by image path. :func:`episode_bundle` then builds the bundle of one episode by indexing, without touching
the model or the disk again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import DatasetSplits, Episode, Item
from ..errors import ExtractionError
from ..models import Backbone
from .bundle import Bundle, make_bundle
from .extract import BadImage, extract, extract_support
from .store import FeatureStore


@dataclass(frozen=True)
class ExtractionOptions:
    """How images become features. Everything here except ``batch_size``, ``num_workers`` and ``progress``
    changes the features and is recorded in results."""

    views: int = 10
    augmentation: str = "tip_cache"
    augment_seed: int = 0  # constant across few-shot seeds, so episodes share the views of common images
    batch_size: int = 128
    num_workers: int | None = None
    skip_bad_images: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        def integer(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        checks = {
            "views": (integer(self.views) and self.views >= 1, "an integer ≥ 1 (--views)"),
            "augmentation": (isinstance(self.augmentation, str), "a preset name (--augmentation)"),
            "augment_seed": (integer(self.augment_seed) and self.augment_seed >= 0, "an integer ≥ 0 (--augment-seed)"),
            "batch_size": (integer(self.batch_size) and self.batch_size >= 1, "an integer ≥ 1 (--batch-size)"),
            "num_workers": (
                self.num_workers is None or (integer(self.num_workers) and self.num_workers >= 0),
                "None (automatic) or an integer ≥ 0 (--workers)",
            ),
            "skip_bad_images": (isinstance(self.skip_bad_images, bool), "true or false (--skip-bad-images)"),
            "progress": (isinstance(self.progress, bool), "true or false (--no-progress)"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ExtractionError(f"extraction: {name}={getattr(self, name)!r} is not valid; expected {expected}.")

    def recorded(self) -> dict[str, Any]:
        return {
            "views": self.views,
            "augmentation": self.augmentation,
            "augment_seed": self.augment_seed,
            "skip_bad_images": self.skip_bad_images,
        }


@dataclass
class FeaturePool:
    """Raw features of a dataset's images, by relative path.

    ``support`` [V, Ns, D] and ``support_clean`` [Ns, D] for the support candidates (rows in ``support_index``),
    ``evaluation`` [Ne, D] for val and test images (rows in ``eval_index``). Unreadable images skipped with
    ``skip_bad_images`` are absent from the indices and listed in ``bad``.
    """

    support: torch.Tensor
    support_clean: torch.Tensor
    support_index: dict[str, int]
    evaluation: torch.Tensor
    eval_index: dict[str, int]
    bad: list[BadImage] = field(default_factory=list)
    encoded: int = 0  # (image, view) pairs run through the model
    cached: int = 0  # (image, view) pairs read from the store

    @property
    def views(self) -> int:
        return int(self.support.shape[0])

    def bad_paths(self) -> set[str]:
        return {b.path for b in self.bad}


def _unique_paths(groups: Iterable[Iterable[Item]]) -> list[str]:
    return list(dict.fromkeys(item.path for items in groups for item in items))


def encode_images_once(
    backbone: Backbone,
    splits: DatasetSplits,
    episodes: Sequence[Episode],
    *,
    test: Sequence[Item] | None = None,
    store: FeatureStore | None = None,
    options: ExtractionOptions = ExtractionOptions(),
    hashes: Mapping[str, str | None] | None = None,
) -> FeaturePool:
    """Encode the support, validation and test images of ``episodes`` (test: ``splits.test`` by default).

    Support images get ``options.views`` augmented views plus the clean view; val and test images the clean view
    only. With a ``store``, only what it lacks is encoded (``FeaturePool.encoded`` counts it). ``hashes`` ({path
    relative to ``splits.root``: SHA-256 of the file}) saves hashing what the caller already hashed.
    """
    support_paths = _unique_paths(e.train for e in episodes)
    eval_paths = _unique_paths([*(e.val for e in episodes), splits.test if test is None else test])
    common = {
        "store": store,
        "seed": options.augment_seed,
        "batch_size": options.batch_size,
        "num_workers": options.num_workers,
        "skip_bad_images": options.skip_bad_images,
        "augmentation": options.augmentation,
        "hashes": hashes,
        "progress": options.progress,
    }
    support = extract_support(
        backbone,
        splits.root,
        support_paths,
        views=options.views,
        include_clean=True,
        desc=f"{splits.name}: support images x {options.views} views + clean",
        **common,
    )
    evaluation = extract(backbone, splits.root, eval_paths, view="clean", desc=f"{splits.name}: val + test", **common)
    return FeaturePool(
        support=support.features,
        support_clean=support.clean,
        support_index={support_paths[i]: row for row, i in enumerate(support.kept)},
        evaluation=evaluation.features,
        eval_index={eval_paths[i]: row for row, i in enumerate(evaluation.kept)},
        bad=[*support.bad, *evaluation.bad],
        encoded=support.encoded + evaluation.encoded,
        cached=support.cached + evaluation.cached,
    )


def index_rows(index: Mapping[str, int], items: Sequence[Item]) -> tuple[list[int], list[int]]:
    """(rows, labels) of the ``items`` present in ``index`` (images skipped as bad are left out)."""
    rows, labels = [], []
    for item in items:
        row = index.get(item.path)
        if row is not None:
            rows.append(row)
            labels.append(item.label)
    return rows, labels


def episode_bundle(
    pool: FeaturePool,
    episode: Episode,
    test: Sequence[Item],
    text_weights: torch.Tensor,
    *,
    metadata: Mapping[str, object] | None = None,
    test_pool: FeaturePool | None = None,
    text_norms: torch.Tensor | None = None,
) -> tuple[Bundle, dict[str, int]]:
    """The bundle of one episode, sliced from ``pool``; returns it with the count of images left out as bad.

    ``test`` labels must be in the episode's label space (``splits.test`` for an all-class episode); their features
    come from ``test_pool`` when the test images belong to another dataset (transfer), else from ``pool``.
    ``text_norms`` [C] (the raw text norms, optional) is stored in the bundle with ``text_weights``.
    """
    s_rows, s_labels = index_rows(pool.support_index, episode.train)
    v_rows, v_labels = index_rows(pool.eval_index, episode.val)
    test_pool = pool if test_pool is None else test_pool
    t_rows, t_labels = index_rows(test_pool.eval_index, test)
    dropped = {
        "support": len(episode.train) - len(s_rows),
        "val": len(episode.val) - len(v_rows),
        "test": len(test) - len(t_rows),
    }
    s_index = torch.tensor(s_rows, dtype=torch.long)
    meta = {
        "dataset": episode.dataset,
        "shots": episode.k,
        "seed": episode.seed,
        "views": pool.views,
        "split_sha256": episode.split_sha256,
        "sampler": episode.sampler,
        "val_kind": episode.val_kind,
        **(metadata or {}),
    }
    has_val = bool(v_rows)
    bundle = make_bundle(
        support_features=pool.support[:, s_index],
        support_labels=torch.tensor(s_labels, dtype=torch.long),
        text_weights=text_weights,
        test_features=test_pool.evaluation[torch.tensor(t_rows, dtype=torch.long)],
        test_labels=torch.tensor(t_labels, dtype=torch.long),
        val_features=pool.evaluation[torch.tensor(v_rows, dtype=torch.long)] if has_val else None,
        val_labels=torch.tensor(v_labels, dtype=torch.long) if has_val else None,
        support_clean_features=pool.support_clean[s_index],
        text_norms=text_norms,
        classnames=list(episode.classnames),
        metadata=meta,
        where=f"{episode.dataset} k={episode.k} seed={episode.seed}",
    )
    return bundle, dropped
