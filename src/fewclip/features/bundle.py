"""The feature bundle: fewclip's public interchange format (version 1).

A bundle is one ``.safetensors`` file holding everything a feature-level method needs:

======================== ================ ==========================================================
tensor                   dtype, shape     meaning
======================== ================ ==========================================================
support_features         float32 [V,N,D]  raw (unnormalised) embeddings of N support images, V views
support_labels           int64 [N]        labels in [0, C); any order, any count per class
text_weights             float32 [C,D]    zero-shot classifier, one L2-normalised row per class
val_features             float32 [Mv,D]   optional, together with val_labels
val_labels               int64 [Mv]
test_features            float32 [Mt,D]
test_labels              int64 [Mt]
support_clean_features   float32 [N,D]    optional: the support images under the test transform
text_norms               float32 [C]      optional: ‖raw class text embedding‖ (see below), each > 0
======================== ================ ==========================================================

``text_norms`` (added after the first release of the format, which stays ``fewclip-bundle/1``: a bundle without it
loads as before) is the L2 norm of each class's raw text embedding before normalisation, the mean over the class's
prompts of the unnormalised sentence embeddings (``‖(1/J) Σ_j e_j‖``). ``text_weights`` keeps only directions; a
method whose maths lives in raw text space (CLAP) needs the norms too. Extraction writes it; a reader older than
this field refuses a bundle that has it (unknown tensor), so drop it (:func:`dataclasses.replace`) for such readers.

Metadata (string to string): ``format`` = ``fewclip-bundle/1``, ``classnames`` = JSON list of C names and,
where known, ``dataset``, ``backbone``, ``pretrained``, ``shots``, ``seed``, ``views``, ``split_sha256``.

This module is the one place that validates shapes, dtypes and values; code downstream trusts a
:class:`Bundle`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import BundleError
from ..io import atomic_write, read_safetensors

FORMAT = "fewclip-bundle/1"

REQUIRED_TENSORS = ("support_features", "support_labels", "text_weights", "test_features", "test_labels")
OPTIONAL_TENSORS = ("val_features", "val_labels", "support_clean_features", "text_norms")
ALL_TENSORS = REQUIRED_TENSORS + OPTIONAL_TENSORS
KNOWN_METADATA = ("dataset", "backbone", "pretrained", "shots", "seed", "views", "split_sha256")


@dataclass(frozen=True)
class Bundle:
    """Validated features of one few-shot episode. Construct through :func:`make_bundle` or :func:`load`."""

    support_features: torch.Tensor  # [V, N, D] raw
    support_labels: torch.Tensor  # [N] int64
    text_weights: torch.Tensor  # [C, D] unit rows
    test_features: torch.Tensor | None  # [Mt, D]; None only in the copy handed to ``fit``
    test_labels: torch.Tensor | None  # [Mt]
    val_features: torch.Tensor | None = None  # [Mv, D]
    val_labels: torch.Tensor | None = None  # [Mv]
    support_clean_features: torch.Tensor | None = None  # [N, D]
    text_norms: torch.Tensor | None = None  # [C] norms of the raw class text embeddings
    classnames: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)

    # ----------------------------------------------------------------- derived properties
    @property
    def num_classes(self) -> int:
        return int(self.text_weights.shape[0])

    @property
    def dim(self) -> int:
        return int(self.text_weights.shape[1])

    @property
    def views(self) -> int:
        return int(self.support_features.shape[0])

    @property
    def num_support(self) -> int:
        return int(self.support_labels.shape[0])

    @property
    def has_val(self) -> bool:
        """True when the bundle has validation rows: an empty validation split counts as none (selection refuses it,
        or a method that falls back without validation records that it did)."""
        return self.val_features is not None and self.val_features.shape[0] > 0

    @property
    def has_test(self) -> bool:
        return self.test_features is not None

    def shots_per_class(self) -> torch.Tensor:
        """[C] int64: number of support images of each class (0 for a class without support)."""
        return torch.bincount(self.support_labels, minlength=self.num_classes)

    def shots(self) -> int | list[int]:
        """K when every class has K support images, else the per-class counts."""
        counts = self.shots_per_class()
        if bool((counts == counts[0]).all()):
            return int(counts[0])
        return [int(c) for c in counts]

    def summary(self) -> dict:
        return {"classes": self.num_classes, "shots": self.shots(), "dim": self.dim, "views": self.views}

    def without_test(self) -> Bundle:
        """The copy that ``fit`` sees: test features and labels removed, so selection cannot read them."""
        return replace(self, test_features=None, test_labels=None)

    def to(self, device: str | torch.device) -> Bundle:
        moved = {name: getattr(self, name) for name in ALL_TENSORS}
        moved = {k: (v.to(device) if v is not None else None) for k, v in moved.items()}
        return replace(self, **moved)


# --------------------------------------------------------------------------- validation


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}"


def _check_finite(name: str, t: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise BundleError(
            f"{where}: tensor '{name}' ({_describe(t)}) holds {bad} NaN or infinite value(s); "
            "re-extract the features or drop the affected rows."
        )


def _as_float(name: str, t: torch.Tensor, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise BundleError(f"{where}: '{name}' must be a torch.Tensor, got {type(t).__name__}.")
    if not t.is_floating_point():
        raise BundleError(f"{where}: tensor '{name}' ({_describe(t)}) must be floating point (float32 expected).")
    t = t.float()
    _check_finite(name, t, where)
    return t


def _as_labels(name: str, t: torch.Tensor, num_classes: int, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise BundleError(f"{where}: '{name}' must be a torch.Tensor, got {type(t).__name__}.")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise BundleError(f"{where}: tensor '{name}' ({_describe(t)}) must hold integer labels (int64 expected).")
    if t.dim() != 1:
        raise BundleError(f"{where}: tensor '{name}' has shape {list(t.shape)}; expected 1-D [n] labels.")
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        bad = t[(t < 0) | (t >= num_classes)]
        raise BundleError(
            f"{where}: tensor '{name}' holds label {int(bad[0])} outside [0, {num_classes}) "
            f"({bad.numel()} such label(s)); text_weights has {num_classes} rows, one per class."
        )
    return t


def _check_rows(name: str, t: torch.Tensor, dim: int, where: str) -> None:
    if t.dim() != 2 or t.shape[1] != dim:
        raise BundleError(
            f"{where}: tensor '{name}' has shape {list(t.shape)}; expected [rows, {dim}] (D from text_weights)."
        )


def make_bundle(
    *,
    support_features: torch.Tensor,
    support_labels: torch.Tensor,
    text_weights: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    val_features: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    support_clean_features: torch.Tensor | None = None,
    text_norms: torch.Tensor | None = None,
    classnames: list[str] | tuple[str, ...] | None = None,
    metadata: Mapping[str, object] | None = None,
    where: str = "bundle",
    normalize_text: bool = False,
) -> Bundle:
    """Validate tensors and build a :class:`Bundle`. ``where`` (a file name) prefixes every error.

    ``support_features`` may be given as [N, D]; it is then taken as V = 1.
    ``normalize_text`` re-normalises text rows instead of rejecting rows that are not unit length.
    """
    text_weights = _as_float("text_weights", text_weights, where)
    if text_weights.dim() != 2 or text_weights.shape[0] < 1 or text_weights.shape[1] < 1:
        raise BundleError(f"{where}: tensor 'text_weights' has shape {list(text_weights.shape)}; expected [C, D].")
    num_classes, dim = text_weights.shape
    norms = text_weights.norm(dim=1)
    if normalize_text:
        if bool((norms == 0).any()):
            raise BundleError(
                f"{where}: tensor 'text_weights' has an all-zero row (class {int((norms == 0).nonzero()[0])})."
            )
        text_weights = text_weights / norms[:, None]
    elif not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
        worst = int((norms - 1).abs().argmax())
        raise BundleError(
            f"{where}: tensor 'text_weights' row {worst} has norm {float(norms[worst]):.4f}; every row must be "
            "L2-normalised (divide each row by its norm)."
        )

    support_features = _as_float("support_features", support_features, where)
    if support_features.dim() == 2:
        support_features = support_features[None]
    if support_features.dim() != 3 or support_features.shape[2] != dim:
        raise BundleError(
            f"{where}: tensor 'support_features' has shape {list(support_features.shape)}; "
            f"expected [V, N, {dim}] (views, images, D from text_weights)."
        )
    if support_features.shape[0] < 1 or support_features.shape[1] < 1:
        raise BundleError(f"{where}: tensor 'support_features' has shape {list(support_features.shape)}; it is empty.")
    support_labels = _as_labels("support_labels", support_labels, num_classes, where)
    if support_labels.shape[0] != support_features.shape[1]:
        raise BundleError(
            f"{where}: 'support_labels' has {support_labels.shape[0]} rows but 'support_features' "
            f"{list(support_features.shape)} has N = {support_features.shape[1]}."
        )

    def pair(prefix: str, feats, labels, required: bool):
        fname, lname = f"{prefix}_features", f"{prefix}_labels"
        if feats is None and labels is None:
            if required:
                raise BundleError(f"{where}: the required tensors '{fname}' and '{lname}' are missing.")
            return None, None
        if feats is None or labels is None:
            present, missing = (fname, lname) if feats is not None else (lname, fname)
            raise BundleError(f"{where}: '{present}' is present but '{missing}' is missing; give both or neither.")
        feats = _as_float(fname, feats, where)
        _check_rows(fname, feats, dim, where)
        labels = _as_labels(lname, labels, num_classes, where)
        if labels.shape[0] != feats.shape[0]:
            raise BundleError(f"{where}: '{lname}' has {labels.shape[0]} rows but '{fname}' has {feats.shape[0]}.")
        return feats, labels

    test_features, test_labels = pair("test", test_features, test_labels, True)
    if test_labels.shape[0] == 0:
        raise BundleError(
            f"{where}: the test split is empty ('test_features' has shape {list(test_features.shape)}); a bundle "
            "needs at least one test row to be scored. Extract the test images again (are they all unreadable?)."
        )
    val_features, val_labels = pair("val", val_features, val_labels, False)

    if support_clean_features is not None:
        support_clean_features = _as_float("support_clean_features", support_clean_features, where)
        _check_rows("support_clean_features", support_clean_features, dim, where)
        if support_clean_features.shape[0] != support_labels.shape[0]:
            raise BundleError(
                f"{where}: 'support_clean_features' has {support_clean_features.shape[0]} rows; expected N = "
                f"{support_labels.shape[0]} (one per support image)."
            )

    if text_norms is not None:
        text_norms = _as_float("text_norms", text_norms, where)
        if text_norms.shape != (num_classes,):
            raise BundleError(
                f"{where}: tensor 'text_norms' has shape {list(text_norms.shape)}; expected [{num_classes}] (one norm "
                "per class, C from text_weights)."
            )
        if bool((text_norms <= 0).any()):
            bad = int((text_norms <= 0).nonzero()[0])
            raise BundleError(
                f"{where}: tensor 'text_norms' holds {float(text_norms[bad])} for class {bad}; every norm must be > 0 "
                "(the norm of the raw text embedding). Re-extract the text, or drop the tensor."
            )

    if classnames is None:
        classnames = [f"class_{i}" for i in range(num_classes)]
    classnames = tuple(str(c) for c in classnames)
    if len(classnames) != num_classes:
        raise BundleError(
            f"{where}: metadata 'classnames' lists {len(classnames)} names but 'text_weights' has {num_classes} rows."
        )
    meta = {str(k): str(v) for k, v in (metadata or {}).items() if v is not None}
    meta.pop("format", None)
    meta.pop("classnames", None)
    return Bundle(
        support_features=support_features.contiguous(),
        support_labels=support_labels.contiguous(),
        text_weights=text_weights.contiguous(),
        test_features=test_features.contiguous(),
        test_labels=test_labels.contiguous(),
        val_features=None if val_features is None else val_features.contiguous(),
        val_labels=None if val_labels is None else val_labels.contiguous(),
        support_clean_features=None if support_clean_features is None else support_clean_features.contiguous(),
        text_norms=None if text_norms is None else text_norms.contiguous(),
        classnames=classnames,
        metadata=meta,
    )


# --------------------------------------------------------------------------- file I/O


def save(bundle: Bundle, path: str | os.PathLike) -> Path:
    """Write ``bundle`` atomically (temporary file in the same folder, then rename)."""
    if not bundle.has_test:
        raise BundleError("cannot save a bundle without test features (this copy was stripped for fitting).")
    path = Path(path)
    tensors = {
        name: getattr(bundle, name).detach().cpu().contiguous()
        for name in ALL_TENSORS
        if getattr(bundle, name) is not None
    }
    meta = dict(bundle.metadata)
    meta["format"] = FORMAT
    meta["classnames"] = json.dumps(list(bundle.classnames))
    meta.setdefault("views", str(bundle.views))
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Bundle:
    """Read and validate a bundle file. Every problem is a :class:`BundleError` naming the file."""
    where = str(path)
    meta, tensors = read_safetensors(path, expected_format=FORMAT, what="bundle", error=BundleError)
    names = set(tensors)
    unknown = names - set(ALL_TENSORS)
    if unknown:
        raise BundleError(
            f"{where}: unknown tensor(s) {sorted(unknown)}; a version-1 bundle holds only {list(ALL_TENSORS)}."
        )
    for name in REQUIRED_TENSORS:
        if name not in names:
            raise BundleError(f"{where}: the required tensor '{name}' is missing.")
    try:
        classnames = json.loads(meta.get("classnames", "null"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{where}: metadata 'classnames' is not valid JSON ({exc}).") from exc
    if classnames is not None and (not isinstance(classnames, list) or not all(isinstance(c, str) for c in classnames)):
        raise BundleError(f"{where}: metadata 'classnames' must be a JSON list of strings.")
    bundle = make_bundle(
        **{name: tensors.get(name) for name in ALL_TENSORS},
        classnames=classnames,
        metadata=meta,
        where=where,
    )
    return bundle.to(device) if str(device) != "cpu" else bundle


def info(bundle: Bundle) -> dict:
    """A JSON-able description: shapes, classes, shots per class, metadata."""
    counts = bundle.shots_per_class()
    shapes = {name: list(getattr(bundle, name).shape) for name in ALL_TENSORS if getattr(bundle, name) is not None}
    return {
        "format": FORMAT,
        "tensors": shapes,
        "classes": bundle.num_classes,
        "dim": bundle.dim,
        "views": bundle.views,
        "support": bundle.num_support,
        "shots": bundle.shots(),
        "shots_min": int(counts.min()),
        "shots_max": int(counts.max()),
        "classes_without_support": [int(i) for i in (counts == 0).nonzero().flatten()],
        "val": int(bundle.val_labels.shape[0]) if bundle.val_labels is not None else None,
        "test": int(bundle.test_labels.shape[0]) if bundle.has_test else None,
        "classnames": list(bundle.classnames),
        "metadata": dict(bundle.metadata),
    }
