"""Results files: one JSON per cell (dataset, backbone, protocol, target, method, shots, seed), written atomically,
with the test predictions beside it."""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import __version__
from ..errors import ResultsError
from ..io import atomic_write, atomic_write_text, read_safetensors
from ..metrics import confusion_matrix
from ..models import WEIGHT_SUFFIXES, BackboneSpec

RESULT_FORMAT = "fewclip-result/1"
SUMMARY_FORMAT = "fewclip-summary/1"
PREDICTIONS_FORMAT = "fewclip-predictions/1"


def jsonable(value: Any) -> Any:
    """``value`` with tensors, tuples, paths and non-finite floats turned into plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def config_sha256(setup: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``setup`` (what decides a result; not paths, devices or timings)."""
    text = json.dumps(jsonable(setup), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def versions() -> dict[str, str | None]:
    """Versions of Python and of the libraries that decide features and fits."""
    out: dict[str, str | None] = {"fewclip": __version__, "python": sys.version.split()[0]}
    for dist in ("torch", "torchvision", "open_clip_torch", "transformers", "numpy", "safetensors", "pillow"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = None
    out["platform"] = platform.platform()
    return out


def backbone_slug(spec: BackboneSpec) -> str:
    """A folder name for the backbone of ``spec``: model and weights (tag, file or folder name), backend.

    ``RN50`` + ``openai`` → ``RN50-openai``; a weights file → ``ViT-B-16-<file stem>``; ``local-dir:DIR`` →
    ``local-dir-<DIR's name>``; ``--backend hf`` adds ``hf-``. Two backbones that share a slug (two files with
    the same name) are told apart by the setup fingerprint, which refuses to mix them.
    """
    model = spec.model
    if model.startswith(("local-dir:", "hf-hub:")):
        schema, ident = model.split(":", 1)
        model = f"{schema}-{Path(ident.rstrip('/')).name if schema == 'local-dir' else ident}"
    elif spec.backend == "hf":
        model = Path(model.rstrip("/")).name if Path(model).expanduser().is_dir() else model
    parts = [model]
    if spec.pretrained:
        weights = Path(spec.pretrained)
        parts.append(weights.stem if weights.suffix in WEIGHT_SUFFIXES else spec.pretrained)
    slug = "-".join(parts).replace("/", "-")  # the OpenAI names: ViT-B/16 -> ViT-B-16
    if spec.backend != "open_clip":
        slug = f"{spec.backend}-{slug}"
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", slug).strip("._") or "backbone"


def protocol_dir(out_dir: str | Path, dataset: str, backbone: str, protocol: str) -> Path:
    """``<out>/<dataset>/<backbone>/<protocol>``: one protocol's results, summary included."""
    return Path(out_dir) / dataset / backbone / protocol


def result_path(
    out_dir: str | Path,
    dataset: str,
    backbone: str,
    protocol: str,
    method: str,
    shots: int,
    seed: int,
    target: str | None = None,
) -> Path:
    """``<protocol dir>[/<target>]/<method>/shots_<K>-seed_<S>.json`` (see :func:`protocol_dir`); the target
    segment for transfer results."""
    folder = protocol_dir(out_dir, dataset, backbone, protocol)
    if target is not None:
        folder = folder / target
    return folder / method / f"shots_{shots}-seed_{seed}.json"


def episodes_dir(out_dir: str | Path, dataset: str, protocol: str) -> Path:
    """``<out>/<dataset>/episodes/<protocol>``: episode files, shared by every backbone."""
    return Path(out_dir) / dataset / "episodes" / protocol


def write_result(path: Path, result: Mapping[str, Any]) -> Path:
    """Write ``result`` atomically (a temporary file renamed onto ``path``)."""
    atomic_write_text(path, json.dumps(jsonable(result), indent=1, ensure_ascii=False) + "\n")
    return path


def predictions_path(result: Path) -> Path:
    """``shots_<K>-seed_<S>.predictions.safetensors`` beside the result JSON."""
    return result.with_name(result.stem + ".predictions.safetensors")


def write_predictions(
    result: Path, predictions: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str] | None = None
) -> Path:
    """Save the predicted and true class of every test row (int32, in test order) beside ``result``, atomically;
    ``classnames`` (the classes the two index) go into the file's metadata."""
    path = predictions_path(result)
    tensors = {"predictions": predictions.to(torch.int32).cpu(), "labels": labels.to(torch.int32).cpu()}
    metadata = {"format": PREDICTIONS_FORMAT}
    if classnames is not None:
        metadata["classnames"] = "\n".join(classnames)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def read_predictions(result: Path) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """(predictions, labels, class names they index, or None for files written before names were recorded) saved
    beside the result JSON ``result``."""
    path = predictions_path(Path(result))
    if not path.is_file():
        raise ResultsError(f"{path}: no saved predictions (the result predates them); re-run the result with --force.")
    meta, tensors = read_safetensors(path, expected_format=PREDICTIONS_FORMAT, what="predictions", error=ResultsError)
    if "predictions" not in tensors or "labels" not in tensors:
        raise ResultsError(f"{path}: holds no 'predictions' and 'labels' tensors; re-run the result with --force.")
    names = meta.get("classnames")
    return tensors["predictions"].long(), tensors["labels"].long(), None if names is None else names.split("\n")


def result_confusion(path: Path) -> tuple[torch.Tensor, list[str] | None]:
    """(row-normalised confusion matrix [C, C], class names or None) of the result JSON at ``path``, from its saved
    predictions. C and the names are those the predictions file records; a file without names (written before they
    were recorded) gives C from the result's per-class accuracies and no names."""
    path = Path(path)
    result = read_result(path)
    if result is None:
        raise ResultsError(f"{path}: not a fewclip result JSON (fewclip run writes <out>/<dataset>/<method>/*.json).")
    predictions, labels, names = read_predictions(path)
    if names is not None:
        num_classes = len(names)
    else:
        num_classes = len(result.get("per_class_accuracy") or []) or int(max(predictions.max(), labels.max())) + 1
    return confusion_matrix(predictions, labels, num_classes), names


def read_result(path: Path) -> dict[str, Any] | None:
    """The result at ``path`` (finished or failed); None when there is none or it is not a complete fewclip result
    (re-run it)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or obj.get("format") != RESULT_FORMAT:
        return None
    return obj


def setup_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The keys of two setups whose values differ, as ``key: old -> new`` lines."""
    old, new = jsonable(old), jsonable(new)
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
