"""Image-feature extraction through a :class:`~fewclip.models.Backbone`, with the on-disk cache.

>>> store = FeatureStore()                                   # $FEWCLIP_CACHE or ~/.cache/fewclip
>>> test = extract(bb, root, test_paths, store=store, dataset="caltech101", split_hash=sha)
>>> support = extract_support(bb, root, support_paths, views=10, store=store, dataset="caltech101", split_hash=sha)
>>> support.features.shape, support.clean.shape              # [10, N, D], [N, D]

The clean view is the backbone's evaluation transform (val, test and the support images' clean view). Augmented
view ``v`` of image ``p`` (preset ``tip_cache`` by default: RandomResizedCrop(scale 0.5–1, bicubic) + flip) is
drawn from generators seeded by a hash of ``(seed, p, v)``: the same pixels whatever the batch composition,
worker count or shot count, which is what makes a cached view reusable. Keep the augmentation ``seed`` fixed
across few-shot seeds (default 0) so every episode shares the views of the images it has in common.

Images that cannot be read are collected over the whole pass, then reported together in a
:class:`BadImagesError`; with ``skip_bad_images=True`` they are left out instead and listed in
:attr:`Extraction.bad`, for the results file. Features of the readable images are cached either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import BadImagesError, ExtractionError
from ..models import Backbone
from ..progress import progress as progress_bar
from .store import FeatureGroup, FeatureStore

View = str | int  # "clean" or an augmentation index 0..V-1


@dataclass(frozen=True)
class BadImage:
    path: str
    error: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "error": self.error}


@dataclass
class Extraction:
    """The result of :func:`extract` / :func:`extract_support`.

    ``features`` is [N, D] (extract) or [V, N, D] (extract_support) with one row per *readable* image, in the
    order of ``paths``; ``kept`` gives their indices into ``paths`` (all of them unless images were skipped),
    so ``labels[kept]`` lines up with the rows.
    """

    features: torch.Tensor
    kept: list[int]
    bad: list[BadImage] = field(default_factory=list)
    clean: torch.Tensor | None = None  # extract_support: [N, D] under the evaluation transform
    encoded: int = 0  # (image, view) pairs run through the model in this call
    cached: int = 0  # (image, view) pairs read from the store


def view_seed(seed: int, path: str, view: int) -> int:
    """A 63-bit seed for augmented view ``view`` of image ``path``: independent of batching and workers."""
    digest = hashlib.sha256(f"fewclip-view|{int(seed)}|{path}|{int(view)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch, ``random`` and numpy for one transform call, restoring their states afterwards."""
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


def load_image(path: Path):
    """Open ``path`` fully (so truncated files fail here, not later) and return an RGB PIL image."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


class _ImageViews(torch.utils.data.Dataset):
    """Item i: image ``todo[i]`` decoded once and put through each of its missing views."""

    def __init__(self, root: Path, paths: list[str], needs: list[list[View]], transforms: dict, seed: int):
        self.root, self.paths, self.needs, self.transforms, self.seed = root, paths, needs, transforms, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            image = load_image(self.root / path)
            tensors = []
            for view in self.needs[i]:
                if view == "clean":
                    tensors.append(self.transforms["clean"](image))
                else:
                    with seeded(view_seed(self.seed, path, view)):
                        tensors.append(self.transforms["augment"](image))
            return i, torch.stack(tensors), None
        except Exception as exc:  # any decoding or transform failure marks the image bad
            return i, None, f"{type(exc).__name__}: {exc}"


def _collate(items):
    good = [(i, t) for i, t, err in items if err is None]
    bad = [(i, err) for i, t, err in items if err is not None]
    images = torch.cat([t for _, t in good]) if good else None
    return [i for i, _ in good], images, bad


def _group_spec(backbone: Backbone, view: View, seed: int, augmentation: str, dataset: str, split: str | None):
    spec: dict[str, Any] = {
        "kind": "image",
        "backbone": backbone.cache_key(),
        "dataset": dataset,
        "split": split,
    }
    if view == "clean":
        spec.update(view="clean", transform=backbone.preprocess_description)
    else:
        spec.update(view=int(view), seed=int(seed), augmentation=augmentation)
        spec["transform"] = backbone.augment_description(augmentation)
    return spec


def _auto_workers(n_images: int, batch_size: int) -> int:
    """0 for jobs of under two loader batches; else one worker per core but one, up to 16 (one worker decodes and
    resizes about 300 images/s, so a GPU needs many)."""
    if n_images < 2 * batch_size:
        return 0
    return max(0, min(16, (os.cpu_count() or 1) - 1))


def _extract_views(
    backbone: Backbone,
    root: str | os.PathLike,
    paths: Sequence[str],
    views: list[View],
    *,
    seed: int,
    store: FeatureStore | None,
    batch_size: int,
    num_workers: int | None,
    skip_bad_images: bool,
    augmentation: str,
    dataset: str | None,
    split_hash: str | None,
    progress: bool,
    desc: str | None,
    flush_rows: int,
) -> tuple[dict[View, torch.Tensor], list[int], list[BadImage], int, int]:
    root = Path(root)
    if batch_size < 1:
        raise ExtractionError(f"batch_size must be an integer ≥ 1, got {batch_size!r}.")
    for v in views:
        if v != "clean" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ExtractionError(f"view {v!r} is invalid; use 'clean' or an augmentation index ≥ 0.")
    paths = [str(p) for p in paths]
    unique = list(dict.fromkeys(paths))
    namespace = dataset or f"root:{root.resolve()}"

    groups: dict[View, FeatureGroup] = {}
    present: dict[View, list[bool]] = {}
    for v in views:
        if store is not None:
            groups[v] = store.group(_group_spec(backbone, v, seed, augmentation, namespace, split_hash))
            present[v] = groups[v].has(unique)
        else:
            present[v] = [False] * len(unique)
    needs_all = [[v for v in views if not present[v][j]] for j in range(len(unique))]
    todo = [j for j, need in enumerate(needs_all) if need]
    cached = sum(len(views) - len(needs_all[j]) for j in range(len(unique)))

    fresh: dict[View, dict[int, torch.Tensor]] = {v: {} for v in views}
    bad: list[BadImage] = []
    encoded = 0
    if todo:
        transforms: dict[str, Callable] = {"clean": backbone.preprocess}
        if any(v != "clean" for v in views):
            transforms["augment"] = backbone.augment(augmentation)
        dataset_obj = _ImageViews(root, [unique[j] for j in todo], [needs_all[j] for j in todo], transforms, seed)
        per_image = max(len(needs_all[j]) for j in todo)
        loader_batch = max(1, batch_size // per_image)
        workers = _auto_workers(len(todo), loader_batch) if num_workers is None else num_workers
        loader = torch.utils.data.DataLoader(
            dataset_obj,
            batch_size=loader_batch,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=backbone.device.type == "cuda",
            persistent_workers=False,
        )
        with contextlib.ExitStack() as stack:
            writers = {v: stack.enter_context(g.writer(flush_rows=flush_rows)) for v, g in groups.items()}
            bar = stack.enter_context(progress_bar(len(todo), desc or "encoding images", "img", enabled=progress))
            for local_idx, images, bad_items in loader:
                for i, err in bad_items:
                    bad.append(BadImage(unique[todo[i]], err))
                if local_idx:
                    feats = torch.cat(
                        [backbone.encode_images(images[s : s + batch_size]) for s in range(0, len(images), batch_size)]
                    )
                    encoded += feats.shape[0]
                    row = 0
                    per_view: dict[View, tuple[list[str], list[torch.Tensor]]] = {}
                    for i in local_idx:
                        j = todo[i]
                        for v in needs_all[j]:
                            fresh[v][j] = feats[row]
                            keys, rows = per_view.setdefault(v, ([], []))
                            keys.append(unique[j])
                            rows.append(feats[row])
                            row += 1
                    for v, (keys, rows) in per_view.items():
                        if v in writers:
                            writers[v].add(keys, torch.stack(rows))
                bar.update(len(local_idx) + len(bad_items))

    position = {p: j for j, p in enumerate(unique)}
    bad.sort(key=lambda b: position[b.path])
    if bad and not skip_bad_images:
        raise BadImagesError(bad, root)
    bad_paths = {b.path for b in bad}
    kept = [i for i, p in enumerate(paths) if p not in bad_paths]
    out: dict[View, torch.Tensor] = {}
    for v in views:
        rows_needed = [position[paths[i]] for i in kept]
        from_store = sorted({j for j in rows_needed if j not in fresh[v]})
        loaded = dict(zip(from_store, groups[v].get([unique[j] for j in from_store]))) if from_store else {}
        dim = next(iter(fresh[v].values())).shape[0] if fresh[v] else None
        if not rows_needed:
            out[v] = torch.empty(0, dim or backbone.embed_dim)
            continue
        out[v] = torch.stack([fresh[v][j] if j in fresh[v] else loaded[j] for j in rows_needed]).float()
    return out, kept, bad, encoded, cached


def extract(
    backbone: Backbone,
    root: str | os.PathLike,
    paths: Sequence[str],
    *,
    view: View = "clean",
    seed: int = 0,
    store: FeatureStore | None = None,
    batch_size: int = 128,
    num_workers: int | None = None,
    skip_bad_images: bool = False,
    augmentation: str = "tip_cache",
    dataset: str | None = None,
    split_hash: str | None = None,
    progress: bool = True,
    desc: str | None = None,
    flush_rows: int = 4096,
) -> Extraction:
    """Raw features [N, D] of the images ``root / p`` for ``p`` in ``paths`` under one view.

    ``view`` is ``"clean"`` (the evaluation transform) or an augmentation index (preset ``augmentation``,
    seeded by ``(seed, path, view)``). With a ``store``, cached rows are read and only missing images are
    encoded (``Extraction.encoded`` counts them); ``dataset`` and ``split_hash`` scope the cache keys (without
    a dataset name the resolved ``root`` is used). ``num_workers=None`` picks 0 for small jobs, else up to 16.
    """
    feats, kept, bad, encoded, cached = _extract_views(
        backbone,
        root,
        paths,
        [view],
        seed=seed,
        store=store,
        batch_size=batch_size,
        num_workers=num_workers,
        skip_bad_images=skip_bad_images,
        augmentation=augmentation,
        dataset=dataset,
        split_hash=split_hash,
        progress=progress,
        desc=desc,
        flush_rows=flush_rows,
    )
    return Extraction(features=feats[view], kept=kept, bad=bad, encoded=encoded, cached=cached)


def extract_support(
    backbone: Backbone,
    root: str | os.PathLike,
    paths: Sequence[str],
    *,
    views: int = 10,
    include_clean: bool = True,
    seed: int = 0,
    store: FeatureStore | None = None,
    batch_size: int = 128,
    num_workers: int | None = None,
    skip_bad_images: bool = False,
    augmentation: str = "tip_cache",
    dataset: str | None = None,
    split_hash: str | None = None,
    progress: bool = True,
    desc: str | None = None,
    flush_rows: int = 4096,
) -> Extraction:
    """Support features [V, N, D] under ``views`` augmented views, plus ``clean`` [N, D] (the evaluation
    transform) when ``include_clean``. Each image is decoded once for all its missing views."""
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ExtractionError(f"views must be an integer ≥ 1, got {views!r}.")
    view_list: list[View] = list(range(views)) + (["clean"] if include_clean else [])
    feats, kept, bad, encoded, cached = _extract_views(
        backbone,
        root,
        paths,
        view_list,
        seed=seed,
        store=store,
        batch_size=batch_size,
        num_workers=num_workers,
        skip_bad_images=skip_bad_images,
        augmentation=augmentation,
        dataset=dataset,
        split_hash=split_hash,
        progress=progress,
        desc=desc or "encoding support views",
        flush_rows=flush_rows,
    )
    return Extraction(
        features=torch.stack([feats[v] for v in range(views)]),
        kept=kept,
        bad=bad,
        clean=feats["clean"] if include_clean else None,
        encoded=encoded,
        cached=cached,
    )
