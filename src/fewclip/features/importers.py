"""Import the cache folders written by the upstream APE and Tip-Adapter code bases into a feature bundle.

Both code bases write ``caches/<dataset>/`` (APE distributes them pre-extracted), saved with ``torch.save``
from CUDA tensors:

=================================== ============== =========================================================
file                                shape, dtype   meaning
=================================== ============== =========================================================
``keys_<K>shots.pt``                [D, N_s] fp16  transposed cache keys: L2-normalised, view-averaged
                                                   support features, grouped by class
``values_<K>shots.pt``              [N_s, C] fp16  one-hot labels of the keys
``val_f.pt``, ``test_f.pt``         [M, D] fp16    L2-normalised features
``val_l.pt``, ``test_l.pt``         [M] int64      labels; ImageNet caches hold only ``val_*``, which ARE
                                                   the test set (the bundle then has no val split)
``text_weights_cupl_t.pt`` (APE)    [D, C]         template + CuPL zero-shot classifier, columns = classes
``criterion_<bb>_<K>shot.pt`` (APE) [D]            stale cached criterion; never imported
``best_F_<K>shots.pt`` (Tip)        tuned keys     ignored
=================================== ============== =========================================================

Only the averaged keys exist in such a cache, so the bundle has one view (V = 1) and records
``averaged_keys_only = true``; its provenance cannot be verified and is recorded as such.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import BundleError
from .bundle import Bundle, make_bundle

KINDS = ("ape", "tip-adapter")
APE_TEXT_FILE = "text_weights_cupl_t.pt"
IMAGENET_VAL_SOURCE = "none (upstream val_* files are the test set)"


def _load(path: Path) -> torch.Tensor:
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise BundleError(f"{path}: cannot be read with torch.load(weights_only=True) ({exc}).") from exc
    if not isinstance(t, torch.Tensor):
        raise BundleError(f"{path}: holds a {type(t).__name__}, expected a tensor.")
    return t.detach().cpu()


def _shape_error(path: Path, t: torch.Tensor, expected: str) -> BundleError:
    dtype = str(t.dtype).replace("torch.", "")
    return BundleError(f"{path}: has shape {list(t.shape)} ({dtype}); expected {expected}.")


def _features(directory: Path, prefix: str, dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``<prefix>_f.pt`` [M, D] and ``<prefix>_l.pt`` [M], or None when neither file exists."""
    fpath, lpath = directory / f"{prefix}_f.pt", directory / f"{prefix}_l.pt"
    if not fpath.is_file() and not lpath.is_file():
        return None
    for p in (fpath, lpath):
        if not p.is_file():
            raise BundleError(f"{directory}: missing file '{p.name}' (its partner '{prefix}_*' file exists).")
    feats, labels = _load(fpath), _load(lpath)
    if feats.dim() != 2 or feats.shape[1] != dim or not feats.is_floating_point():
        raise _shape_error(fpath, feats, f"floating point [M, {dim}] (D from the keys)")
    if labels.dim() != 1 or labels.is_floating_point() or labels.shape[0] != feats.shape[0]:
        raise _shape_error(lpath, labels, f"integer [{feats.shape[0]}] (one label per row of {fpath.name})")
    return feats.float(), labels.long()


def import_upstream_cache(
    kind: str,
    directory: str | os.PathLike,
    shots: int,
    text_weights: str | os.PathLike | None = None,
    classnames: str | os.PathLike | None = None,
    backbone: str | None = None,
    dataset: str | None = None,
    seed: int | None = None,
) -> Bundle:
    """Build a V = 1 :class:`Bundle` from an upstream APE / Tip-Adapter ``caches/<dataset>/`` folder."""
    if kind not in KINDS:
        raise BundleError(f"unknown upstream cache kind {kind!r}; valid kinds: {', '.join(KINDS)}.")
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"{directory}: no such cache directory.")

    def need(name: str) -> Path:
        path = directory / name
        if not path.is_file():
            have = sorted(p.name for p in directory.glob("keys_*shots.pt"))
            raise BundleError(
                f"{directory}: missing file '{name}'. keys files present (available --shots): "
                f"{', '.join(have) if have else 'none'}."
            )
        return path

    kpath, vpath = need(f"keys_{shots}shots.pt"), need(f"values_{shots}shots.pt")
    keys, values = _load(kpath), _load(vpath)
    if keys.dim() != 2 or not keys.is_floating_point():
        raise _shape_error(kpath, keys, "floating point [D, N_s] (transposed keys)")
    dim, n = keys.shape
    if values.dim() != 2 or values.shape[0] != n:
        raise _shape_error(vpath, values, f"[{n}, C] (N_s = {n} from {kpath.name})")
    num_classes = int(values.shape[1])
    values = values.float()
    one_hot = ((values == 0) | (values == 1)).all(dim=1) & (values.sum(dim=1) == 1)
    if not bool(one_hot.all()):
        row = int((~one_hot).nonzero()[0])
        raise BundleError(f"{vpath}: row {row} is not one-hot ({values[row].tolist()}); expected a single 1.")
    labels = values.argmax(dim=1)
    order = torch.argsort(labels, stable=True)
    support, labels = keys.float().T[order], labels[order]

    if text_weights is not None:
        tpath = Path(text_weights)
        if not tpath.is_file():
            raise BundleError(f"{tpath}: no such text weights file.")
    elif kind == "ape" and (directory / APE_TEXT_FILE).is_file():
        tpath = directory / APE_TEXT_FILE
    else:
        raise BundleError(
            f"{directory}: no text weights (the folder has no {APE_TEXT_FILE}; Tip-Adapter caches never do). "
            "Pass text_weights (--text-weights FILE): the zero-shot classifier saved with torch.save as "
            f"(D, C) = ({dim}, {num_classes}) or (C, D)."
        )
    text = _load(tpath)
    if text.dim() == 2 and tuple(text.shape) == (dim, num_classes):  # upstream layout; wins when D == C
        text = text.T
    elif text.dim() != 2 or tuple(text.shape) != (num_classes, dim):
        raise _shape_error(
            tpath,
            text,
            f"(D, C) = ({dim}, {num_classes}) or (C, D) = ({num_classes}, {dim}) "
            f"(D from {kpath.name}, C from {vpath.name})",
        )

    test = _features(directory, "test", dim)
    val = _features(directory, "val", dim)
    meta: dict[str, object] = {
        "provenance": f"imported from {kind} cache {directory}, unverified provenance",
        "imported_from": kind,
        "shots": str(shots),
        "views": "1",
        "averaged_keys_only": "true",
        "backbone": backbone if backbone is not None else "unknown",
        "dataset": dataset,
        "seed": seed,
        "text_weights_source": str(tpath),
    }
    if test is None:
        if val is None:
            need("test_f.pt")  # raises; names the file (ImageNet caches would have val_f.pt instead)
        test, val = val, None
        meta["val_source"] = IMAGENET_VAL_SOURCE

    names = None
    if classnames is not None:
        cpath = Path(classnames)
        if not cpath.is_file():
            raise BundleError(f"{cpath}: no such classnames file.")
        names = [line.strip() for line in cpath.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(names) != num_classes:
            raise BundleError(
                f"{cpath}: lists {len(names)} class names; expected C = {num_classes} (columns of {vpath.name})."
            )

    return make_bundle(
        support_features=support[None],
        support_labels=labels,
        text_weights=text.float(),
        test_features=test[0],
        test_labels=test[1],
        val_features=None if val is None else val[0],
        val_labels=None if val is None else val[1],
        classnames=names,
        metadata=meta,
        where=str(directory),
        normalize_text=True,
    )
