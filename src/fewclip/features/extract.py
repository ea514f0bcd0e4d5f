"""Image-feature extraction through a :class:`~fewclip.models.Backbone`, with the on-disk cache.

>>> store = FeatureStore()                                   # $FEWCLIP_CACHE or ~/.cache/fewclip
>>> test = extract(bb, root, test_paths, store=store)
>>> support = extract_support(bb, root, support_paths, views=10, store=store)
>>> support.features.shape, support.clean.shape              # [10, N, D], [N, D]

The clean view is the backbone's evaluation transform (val, test and the support images' clean view). Augmented
view ``v`` of an image (preset ``tip_cache`` by default: RandomResizedCrop(scale 0.5–1, bicubic) + flip) is
drawn from generators seeded by a hash of ``(seed, SHA-256 of the image file, v)``: the same pixels whatever the
batch composition, worker count, shot count or the file's path, which is what makes a cached view reusable. Keep
the augmentation ``seed`` fixed across few-shot seeds (default 0) so every episode shares the views of the images
it has in common.

Images that cannot be read are collected over the whole pass, then reported together in a
:class:`BadImagesError`; with ``skip_bad_images=True`` they are left out instead and listed in
:attr:`Extraction.bad`, for the results file. Features of the readable images are cached either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import BadImagesError, ExtractionError
from ..hashing import HashMemo
from ..models import Backbone
from ..progress import progress as progress_bar
from .store import FLUSH_ROWS, FLUSH_SECONDS, FeatureGroup, FeatureStore

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


def view_seed(seed: int, key: str, view: int) -> int:
    """A 63-bit seed for augmented view ``view`` of the image ``key`` names (its content SHA-256 in extraction, so the
    same bytes get the same views wherever they live): independent of batching and workers."""
    digest = hashlib.sha256(f"fewclip-view|{int(seed)}|{key}|{int(view)}".encode()).digest()
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
    """Open ``path`` fully (so truncated files fail here, not later) and return an 8-bit RGB PIL image.

    - 8-bit modes go through PIL's ``convert("RGB")``, as open_clip's preprocessing does: L and LA repeat the
      grey level, 1-bit is 0 or 255, CMYK uses PIL's formula, an alpha channel is dropped (a transparent pixel
      keeps its colour; a palette image with transparency goes through RGBA first, same colours, no warning).
    - Wider samples are scaled to 8 bits, never clipped: 16-bit integers (modes ``I;16``, ``I;16B``, ``I;16L``,
      and ``I`` from PNG and PGM/PPM, which decode 16-bit grey so) as round(v / 257): 65535 -> 255,
      32768 -> 128 (127.5 rounds up), 0 -> 0; floats (mode ``F``) in [0, 1] as floor(255 v + 0.5): 1.0 -> 255,
      0.5 -> 128. 16-bit RGB PNGs arrive as 8-bit RGB already (PIL keeps the high byte).
    - Refused with a ``ValueError`` that names the file, the mode and the range (the caller lists the file as an
      unreadable image), because no scale is known: a float image with values outside [0, 1] or NaN, and a 32-bit
      integer image (``I`` from TIFF and other formats).
    - A multi-frame file (animated GIF, multi-page TIFF) gives its first frame.
    """
    with Image.open(path) as im:
        im.load()
        return _to_rgb(im, Path(path).name)


#: Formats whose mode ``I`` (32-bit integer) holds 16-bit samples: PIL decodes 16-bit grey PNG (older versions)
#: and 16-bit PGM/PPM (format "PPM") into it; the files cannot hold more than 16 bits.
_SIXTEEN_BIT_I_FORMATS = frozenset({"PNG", "PPM"})


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    """``im`` as 8-bit RGB (the rules of :func:`load_image`); ``name`` is the file named by a refusal."""
    mode = im.mode
    if mode.startswith("I;16") or (mode == "I" and im.format in _SIXTEEN_BIT_I_FORMATS):
        a = np.asarray(im).astype(np.int64)  # the array interface gives the byte order of I;16B / I;16L
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(
                f"{name}: a {mode} image with values in [{a.min()}, {a.max()}], outside 16 bits; save it as an "
                "8- or 16-bit image."
            )
        return Image.fromarray(((a + 128) // 257).astype(np.uint8)).convert("RGB")
    if mode == "I":
        a = np.asarray(im)
        span = f" with values in [{a.min()}, {a.max()}]" if a.size else ""
        raise ValueError(
            f"{name}: a 32-bit integer image (mode I, {im.format or 'unknown'} format){span}; its white level is "
            "unknown, so it cannot be scaled to 8 bits. Save it as an 8- or 16-bit image."
        )
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if a.size and not np.isfinite(a).all():
            raise ValueError(f"{name}: a floating-point image (mode F) with NaN or infinite values; fix the file.")
        if a.size and (a.min() < 0.0 or a.max() > 1.0):
            raise ValueError(
                f"{name}: a floating-point image (mode F) with values in [{a.min():g}, {a.max():g}]; fewclip reads "
                "float images as [0, 1] (0 black, 1 white) only. Save it as an 8-bit image, or scale it to [0, 1]."
            )
        return Image.fromarray(np.floor(a * 255.0 + 0.5).astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


class _ImageViews(torch.utils.data.Dataset):
    """Item i: image ``files[i]`` decoded once and put through each of its missing views (seeded by ``keys[i]``)."""

    def __init__(self, files: list[Path], keys: list[str], needs: list[list[View]], transforms: dict, seed: int):
        self.files, self.keys, self.needs, self.transforms, self.seed = files, keys, needs, transforms, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            image = load_image(self.files[i])
            tensors = []
            for view in self.needs[i]:
                if view == "clean":
                    tensors.append(self.transforms["clean"](image))
                else:
                    with seeded(view_seed(self.seed, self.keys[i], view)):
                        tensors.append(self.transforms["augment"](image))
            return i, torch.stack(tensors), None
        except Exception as exc:  # any decoding or transform failure marks the image bad
            return i, None, f"{type(exc).__name__}: {exc}"


def _collate(items):
    good = [(i, t) for i, t, err in items if err is None]
    bad = [(i, err) for i, t, err in items if err is not None]
    images = torch.cat([t for _, t in good]) if good else None
    return [i for i, _ in good], images, bad


def _group_spec(backbone: Backbone, view: View, seed: int, augmentation: str) -> dict[str, Any]:
    """A group of image features: rows keyed by the SHA-256 of the image file's bytes, so groups are shared by every
    dataset and split that holds the same images, and an image replaced in place gets a new key."""
    spec: dict[str, Any] = {"kind": "image", "key": "content-sha256", "backbone": backbone.cache_key()}
    if view == "clean":
        spec.update(view="clean", transform=backbone.preprocess_description)
    else:
        spec.update(view=int(view), seed=int(seed), augmentation=augmentation)
        spec["transform"] = backbone.augment_description(augmentation)
    return spec


def content_hashes(
    root: str | os.PathLike,
    paths: Sequence[str],
    *,
    memo: HashMemo | None = None,
    errors: dict[str, str] | None = None,
    progress: bool = True,
    desc: str = "hashing images",
) -> dict[str, str | None]:
    """{path: hex SHA-256 of ``root / path``} through ``memo`` (a fresh in-process memo if None); an unreadable
    file maps to None, with its message in ``errors[path]``. Files the memo does not know are read with a progress
    report (``desc``; a log line every 30 s off a terminal), as reading a large dataset cold takes minutes."""
    base = os.path.abspath(root)
    memo = memo if memo is not None else HashMemo(None)
    found: dict[str, str] = {}
    full = [os.path.join(base, p) for p in paths]
    digests = memo.sha256_many(
        full, errors=found, progress=lambda n: progress_bar(n, desc, "file", enabled=progress, leave=False)
    )
    if errors is not None and found:
        for p, f in zip(paths, full):
            if f in found:
                errors[p] = found[f]
    return dict(zip(paths, digests))


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
    hashes: Mapping[str, str | None] | None,
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

    # every image is addressed by the SHA-256 of its bytes (given by the caller, or through the store's memo)
    digest = {p: hashes[p] for p in unique if p in hashes} if hashes is not None else {}
    unreadable: dict[str, str] = {}
    rest = [p for p in unique if p not in digest]
    if rest:
        memo = store.memo if store is not None else None
        digest.update(content_hashes(root, rest, memo=memo, errors=unreadable, progress=progress))
    bad_by_path: dict[str, str] = {
        p: unreadable.get(p, "the file could not be read to hash it") for p in unique if digest[p] is None
    }
    keys = list(dict.fromkeys(digest[p] for p in unique if digest[p] is not None))  # one entry per distinct content
    first_path = {}
    for p in unique:
        if digest[p] is not None:
            first_path.setdefault(digest[p], p)

    groups: dict[View, FeatureGroup] = {}
    table: dict[View, torch.Tensor] = {}  # [len(keys), D] per view: rows read from the store, then the encoded ones
    have: dict[View, list[bool]] = {}
    for v in views:
        if store is not None:
            groups[v] = store.group(_group_spec(backbone, v, seed, augmentation))
            table[v], have[v] = groups[v].read(keys)
        else:
            have[v] = [False] * len(keys)
    needs_all = [[v for v in views if not have[v][j]] for j in range(len(keys))]
    todo = [j for j, need in enumerate(needs_all) if need]
    cached = sum(sum(have[v]) for v in views)
    bad_keys: dict[str, str] = {}
    encoded = 0
    if todo:
        transforms: dict[str, Callable] = {"clean": backbone.preprocess}
        if any(v != "clean" for v in views):
            transforms["augment"] = backbone.augment(augmentation)
        dataset_obj = _ImageViews(
            [root / first_path[keys[j]] for j in todo],
            [keys[j] for j in todo],
            [needs_all[j] for j in todo],
            transforms,
            seed,
        )
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
            last_flush = time.monotonic()
            bar = stack.enter_context(progress_bar(len(todo), desc or "encoding images", "img", enabled=progress))
            for local_idx, images, bad_items in loader:
                for i, err in bad_items:
                    bad_keys[keys[todo[i]]] = err
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
                            view_rows, positions = per_view.setdefault(v, ([], []))
                            view_rows.append(row)
                            positions.append(j)
                            row += 1
                    for v, (view_rows, positions) in per_view.items():
                        block = feats.index_select(0, torch.tensor(view_rows, dtype=torch.long)).float()
                        if v not in table or table[v].shape[1] != block.shape[1]:  # nothing read: shape it now
                            table[v] = torch.zeros(len(keys), block.shape[1])
                        table[v].index_copy_(0, torch.tensor(positions, dtype=torch.long), block)
                        if v in writers:
                            writers[v].add([keys[j] for j in positions], block)
                # the views of one pass share one budget: at most ``flush_rows`` rows or a minute of work unsaved
                if writers and (
                    sum(w.pending for w in writers.values()) >= flush_rows
                    or time.monotonic() - last_flush >= FLUSH_SECONDS
                ):
                    for w in writers.values():
                        w.flush()
                    last_flush = time.monotonic()
                bar.update(len(local_idx) + len(bad_items))

    for p in unique:
        if digest[p] is not None and digest[p] in bad_keys:
            bad_by_path[p] = bad_keys[digest[p]]
    bad = [BadImage(p, bad_by_path[p]) for p in unique if p in bad_by_path]
    if bad and not skip_bad_images:
        raise BadImagesError(bad, root)
    kept = [i for i, p in enumerate(paths) if p not in bad_by_path]
    position = {k: j for j, k in enumerate(keys)}
    index = torch.tensor([position[digest[paths[i]]] for i in kept], dtype=torch.long)
    out: dict[View, torch.Tensor] = {}
    for v in views:
        if not kept:
            out[v] = torch.empty(0, groups[v].dim if v in groups and groups[v].dim else backbone.embed_dim)
            continue
        out[v] = table[v].index_select(0, index)
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
    hashes: Mapping[str, str | None] | None = None,
    progress: bool = True,
    desc: str | None = None,
    flush_rows: int = FLUSH_ROWS,
) -> Extraction:
    """Raw features [N, D] of the images ``root / p`` for ``p`` in ``paths`` under one view.

    ``view`` is ``"clean"`` (the evaluation transform) or an augmentation index (preset ``augmentation``,
    seeded by ``(seed, image content, view)``). With a ``store``, cached rows are read and only missing images are
    encoded (``Extraction.encoded`` counts them). Rows are keyed by the SHA-256 of each file's bytes: ``hashes``
    ({path: sha256}, e.g. from :func:`content_hashes`) gives them, else they are computed through the store's
    file-hash memo. Shards are written every ``flush_rows`` rows (all views together) and at least once a minute.
    ``num_workers=None`` picks 0 for small jobs, else up to 16.
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
        hashes=hashes,
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
    hashes: Mapping[str, str | None] | None = None,
    progress: bool = True,
    desc: str | None = None,
    flush_rows: int = FLUSH_ROWS,
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
        hashes=hashes,
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
