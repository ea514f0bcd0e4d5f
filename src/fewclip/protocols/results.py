"""Results files: one JSON per (dataset, method, shots, seed), written atomically, and their summaries."""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import __version__
from ..errors import ResultsError
from ..io import atomic_write, atomic_write_text, read_safetensors
from ..metrics import confusion_matrix

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


def protocol_dir(out_dir: str | Path, dataset: str, protocol: str = "fewshot") -> Path:
    """``<out>/<dataset>`` for the few-shot protocol, ``<out>/<dataset>/<protocol>`` for the others."""
    base = Path(out_dir) / dataset
    return base if protocol == "fewshot" else base / protocol


def result_path(
    out_dir: str | Path, dataset: str, method: str, shots: int, seed: int, protocol: str = "fewshot"
) -> Path:
    """``<protocol dir>/<method>/shots_<K>-seed_<S>.json`` (see :func:`protocol_dir`)."""
    return protocol_dir(out_dir, dataset, protocol) / method / f"shots_{shots}-seed_{seed}.json"


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


def read_predictions(result: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, labels) saved beside the result JSON ``result``."""
    predictions, labels, _ = _read_predictions_file(predictions_path(result))
    return predictions, labels


def _read_predictions_file(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
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
    predictions, labels, names = _read_predictions_file(predictions_path(path))
    if names is not None:
        num_classes = len(names)
    else:
        num_classes = len(result.get("per_class_accuracy") or []) or int(max(predictions.max(), labels.max())) + 1
    return confusion_matrix(predictions, labels, num_classes), names


def read_result(path: Path) -> dict[str, Any] | None:
    """The result at ``path``; None when there is none or it is not a complete fewclip result (re-run it)."""
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


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof 0, as CoOp's parse_test_res.py)."""
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def summarize(results: Iterable[Mapping[str, Any]], key: str = "test_accuracy") -> list[dict[str, Any]]:
    """Mean ± std over seeds of ``accuracy[key]`` per (method, shots), in first-seen method order."""
    groups: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in results:
        groups.setdefault((r["method"], int(r["shots"])), []).append((int(r["seed"]), float(r["accuracy"][key])))
    rows = []
    for (method, shots), pairs in groups.items():
        pairs.sort()
        mean, std = mean_std([v for _, v in pairs])
        rows.append(
            {
                "method": method,
                "shots": shots,
                "mean": mean,
                "std": std,
                "seeds": [s for s, _ in pairs],
                "n": len(pairs),
            }
        )
    return rows


def format_summary(rows: Sequence[Mapping[str, Any]], seeds_expected: int | None = None) -> str:
    """A method × shots table of ``mean ± std`` (the number of seeds in brackets when fewer than expected)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    shots = sorted({int(r["shots"]) for r in rows})
    cell = {(r["method"], int(r["shots"])): r for r in rows}
    header = ["method", *(f"{k}-shot" for k in shots)]
    body = []
    for m in methods:
        line = [m]
        for k in shots:
            r = cell.get((m, k))
            if r is None:
                line.append("-")
                continue
            text = f"{r['mean']:.2f} ± {r['std']:.2f}"
            if seeds_expected is not None and r["n"] < seeds_expected:
                text += f" ({r['n']} seed{'s' if r['n'] != 1 else ''})"
            line.append(text)
        body.append(line)
    return text_table(header, body)


def text_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, with a dashed rule under the header."""
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    fmt = lambda row: "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in body)])
