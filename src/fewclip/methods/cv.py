"""Selection without a validation split: stratified k-fold cross-validation over the support images.

The folds hold out support *images* (all their views), never single views: a fold's training support keeps the views
of the other images, and its validation split is the held-out images' clean features (``support_clean_features``;
the mean of their views where a bundle has none). Each class's images are shuffled with a seeded generator and dealt
round-robin to the k folds, starting at a per-class offset (the class's rank in a seeded permutation of the classes),
so every fold holds ⌊K_c/k⌋ or ⌈K_c/k⌉ images of a class with K_c images, and classes with fewer images than folds
are spread over the folds.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..features.bundle import Bundle

#: k = min(K, CV_MAX_FOLDS), K the smallest shot count among the classes with support (at least 2 folds)
CV_MAX_FOLDS = 4
#: the seed of the folds for a method without a ``seed`` hyperparameter
CV_SEED = 0


def cv_fold_count(shots_per_class: torch.Tensor, max_folds: int = CV_MAX_FOLDS) -> int:
    """k = min(K, ``max_folds``), at least 2; K the smallest shot count among the classes with support."""
    with_support = shots_per_class[shots_per_class > 0]
    smallest = int(with_support.min()) if with_support.numel() else 0
    return max(2, min(smallest, int(max_folds)))


def cv_fold_ids(labels: torch.Tensor, num_classes: int, folds: int, seed: int) -> torch.Tensor:
    """[N] int64: the fold (0..folds−1) of each support image, stratified per class, deterministic for ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    offsets = torch.randperm(num_classes, generator=generator)
    out = torch.empty(labels.numel(), dtype=torch.int64)
    for c in range(num_classes):
        rows = (labels.cpu() == c).nonzero().flatten()
        if rows.numel() == 0:
            continue
        shuffled = rows[torch.randperm(rows.numel(), generator=generator)]
        out[shuffled] = (int(offsets[c]) + torch.arange(rows.numel())) % folds
    return out


def fold_bundle(bundle: Bundle, held_out: torch.Tensor) -> Bundle:
    """The bundle of one fold: support = the images not ``held_out`` ([N] bool), val = the held-out images' clean
    features (their views never reach the fold's support), no test split."""
    keep = ~held_out
    clean = bundle.support_clean_features
    if clean is None:
        clean = bundle.support_features.mean(dim=0)
    return replace(
        bundle,
        support_features=bundle.support_features[:, keep],
        support_labels=bundle.support_labels[keep],
        support_clean_features=None if bundle.support_clean_features is None else clean[keep],
        val_features=clean[held_out],
        val_labels=bundle.support_labels[held_out],
        test_features=None,
        test_labels=None,
    )
