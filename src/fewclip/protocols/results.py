"""Results files: one JSON per cell (dataset, backbone, protocol, target, method, shots, seed), written atomically,
with the test predictions beside it; the lock that keeps two runs out of one results folder.

A result JSON is the manifest of its cell: it names its predictions file and that file's SHA-256
(:func:`publish_result`), so a reader never pairs a result with the predictions of another run.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import math
import os
import platform
import re
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from .. import __version__
from ..errors import OutputError, ResultsError, ResultsLockedError
from ..io import atomic_write, atomic_write_text, file_sha256, read_safetensors
from ..metrics import confusion_matrix
from ..models import WEIGHT_SUFFIXES, BackboneSpec

try:  # POSIX; where there is none (Windows), runs do not lock their folder (the README says so)
    import fcntl
except ImportError:  # pragma: no cover - not on Linux or macOS
    fcntl = None  # type: ignore[assignment]

RESULT_FORMAT = "fewclip-result/1"
SUMMARY_FORMAT = "fewclip-summary/1"
PREDICTIONS_FORMAT = "fewclip-predictions/1"
#: the lock file of a protocol folder (see :func:`results_lock`)
LOCK_NAME = ".fewclip-run.lock"


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
    """Write ``result`` (or a summary) atomically (a temporary file renamed onto ``path``); a failed write raises
    :class:`~fewclip.errors.OutputError` naming ``path`` and leaves the earlier file as it was."""
    with writing(path):
        atomic_write_text(path, json.dumps(jsonable(result), indent=1, ensure_ascii=False) + "\n")
    return path


def new_run_id() -> str:
    """A run's identifier: its start time and 8 random hex digits (``20250102T030405-1a2b3c4d``)."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def predictions_path(result: Path, run_id: str | None = None) -> Path:
    """``shots_<K>-seed_<S>.<run id>.predictions.safetensors`` beside the result JSON; without ``run_id`` the name
    results written before the manifest scheme used (``shots_<K>-seed_<S>.predictions.safetensors``)."""
    middle = f".{run_id}" if run_id else ""
    return result.with_name(f"{result.stem}{middle}.predictions.safetensors")


def write_predictions(
    path: Path, predictions: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str] | None = None
) -> str:
    """Save the predicted and true class of every test row (int32, in test order) to ``path`` atomically and return
    the file's SHA-256; ``classnames`` (the classes the two index) go into the file's metadata. The file belongs to
    a result only once :func:`publish_result` names it."""
    tensors = {"predictions": predictions.to(torch.int32).cpu(), "labels": labels.to(torch.int32).cpu()}
    metadata = {"format": PREDICTIONS_FORMAT}
    if classnames is not None:
        metadata["classnames"] = "\n".join(classnames)
    data = safetensors_bytes(tensors, metadata=metadata)
    with writing(path):
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return hashlib.sha256(data).hexdigest()


Predictions = tuple[torch.Tensor, torch.Tensor, Sequence[str] | None]


def classifier_path(result: Path, run_id: str) -> Path:
    """``shots_<K>-seed_<S>.<run id>.classifier.safetensors`` beside the result JSON (``fewclip run --save-models``)."""
    return result.with_name(f"{result.stem}.{run_id}.classifier.safetensors")


def publish_result(
    path: Path,
    result: Mapping[str, Any],
    predictions: Predictions | None = None,
    *,
    run_id: str | None = None,
    classifier: bytes | None = None,
) -> dict[str, Any]:
    """Publish one cell's result and its predictions together; returns the record written.

    The predictions (predicted, true classes, class names) go to a file of their own,
    ``shots_<K>-seed_<S>.<run id>.predictions.safetensors``; then the result JSON, which records that file's name
    and SHA-256, is renamed onto ``path`` (the moment of publication); then the predictions files of earlier results
    of the cell, which no JSON names any more, are removed. A crash before the rename leaves the earlier result and
    its predictions as they were (an exception also removes the new file; a kill leaves it, unnamed, for the next
    publication to remove); after it, the new pair. A result without predictions (a failed cell) leaves no earlier
    predictions behind. ``classifier`` (the bytes of a deployable classifier file) is published the same way, as
    ``shots_<K>-seed_<S>.<run id>.classifier.safetensors``, named with its SHA-256 in ``classifier_file`` and
    ``classifier_sha256``.
    """
    run_id = run_id or new_run_id()
    record = {**result, "run_id": run_id}
    new = None
    if predictions is not None:
        new = predictions_path(path, run_id)
        record["predictions_file"] = new.name
        record["predictions_sha256"] = write_predictions(new, *predictions)
    new_clf = None
    try:
        if classifier is not None:
            new_clf = classifier_path(path, run_id)
            with writing(new_clf):
                atomic_write(new_clf, lambda tmp: tmp.write_bytes(classifier))
            record["classifier_file"] = new_clf.name
            record["classifier_sha256"] = hashlib.sha256(classifier).hexdigest()
        write_result(path, record)
    except BaseException:
        for written in (new, new_clf):
            if written is not None:
                written.unlink(missing_ok=True)
        raise
    stem = glob.escape(path.stem)
    stales = [
        *path.parent.glob(f"{stem}.*predictions.safetensors"),
        *path.parent.glob(f"{stem}.*.classifier.safetensors"),
    ]
    for stale in stales:
        if stale not in (new, new_clf):
            try:
                stale.unlink(missing_ok=True)
            except OSError:  # no JSON names it: an orphan, harmless, removed by the next publication
                pass
    return record


def read_predictions(result: Path) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """(predictions, labels, class names they index, or None for files written before names were recorded) of the
    result JSON ``result``: the file it names, checked against the SHA-256 it records."""
    result = Path(result)
    record = read_result(result)
    if record is None:
        raise ResultsError(f"{result}: not a fewclip result JSON (fewclip run writes <out>/<dataset>/<method>/*.json).")
    if record.get("status") == "failed":
        raise ResultsError(f"{result}: a failed result has no predictions (its error is recorded in it); run it again.")
    name, sha256 = record.get("predictions_file"), record.get("predictions_sha256")
    if sha256 is None:  # written before results named their predictions' hash: the fixed name beside it
        path = predictions_path(result)
    elif not isinstance(name, str) or Path(name).name != name or not name.endswith(".predictions.safetensors"):
        raise ResultsError(f"{result}: 'predictions_file' is {name!r}, not a file name beside it; re-run with --force.")
    else:
        path = result.with_name(name)
    if not path.is_file():
        raise ResultsError(f"{result}: its predictions {path} are missing; re-run the result with --force.")
    if sha256 is not None and file_sha256(path) != sha256:
        raise ResultsError(
            f"{path} is not the predictions file {result} was written with (its SHA-256 differs from the "
            f"{str(sha256)[:12]}... the result records); re-run the result with --force."
        )
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


# --------------------------------------------------------------------------- the results folder


_FIXES = {
    errno.ENOSPC: "free space on that file system, or write to another --out folder",
    errno.EDQUOT: "free space within your disk quota, or write to another --out folder",
    errno.EROFS: "the file system is read-only: write to another --out folder",
}


def output_error(path: Path, exc: OSError) -> OutputError:
    """The one-line error of a write to ``path`` that raised ``exc``: the path, the reason, the fix."""
    fix = _FIXES.get(exc.errno, "make the folder writable, or write to another --out folder")
    reason = exc.strerror or str(exc)
    return OutputError(
        f"{path}: could not write ({reason}); {fix}. Results published before this one are kept, nothing was "
        "half-written; run the same command again to continue."
    )


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into :class:`~fewclip.errors.OutputError` naming it."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise output_error(Path(path), exc) from exc


def check_output_folder(out_dir: str | Path) -> Path:
    """Refuse, before any work, a results folder that cannot be written: a file in its place (or in place of a
    folder above it), or a folder where a file cannot be created (probed with a temporary file, removed at once).
    Creates nothing; returns ``out_dir`` as a path."""
    out = Path(out_dir)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == out else f"cannot be created: {existing} is a file"
        raise OutputError(f"the results folder (--out) {out} {where}; pass a folder (it is created if missing).")
    probe = existing / f".fewclip-probe-{uuid.uuid4().hex[:12]}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"the results folder (--out) {out}: cannot create a file in {existing} ({exc.strerror or exc}); make it "
            "writable or choose another --out folder."
        ) from exc
    return out


def _holder_text(path: Path) -> str:
    """``pid 123 on host, started 2025-...`` from the lock file at ``path`` (its holder writes it)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that has just started or did not record itself"


@contextmanager
def results_lock(folder: Path, *, wait: bool = False, log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the results folder ``folder`` (a protocol folder) for one run: an exclusive ``flock`` on its
    :data:`LOCK_NAME` file, whose text names the holder (pid, host, start time, command).

    Another run that holds it makes this raise :class:`~fewclip.errors.ResultsLockedError` naming the folder and the
    holder, or, with ``wait``, block until it is released. The lock is released when the block exits, by an
    exception too, and by the kernel when the process dies, so a killed run never leaves the folder locked (the file
    stays; it is not the lock). Where the platform has no ``fcntl`` the folder is not locked.
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    with writing(path):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    held = False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_text(path)
                if not wait:
                    raise ResultsLockedError(
                        f"{folder} is in use by another fewclip run ({holder}); wait for it to finish, pass --wait "
                        "to start when it does, or write to another --out folder."
                    ) from None
                if log is not None:
                    log(f"{folder} is in use by another fewclip run ({holder}); waiting for it to finish (--wait).")
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:  # ENOLCK: a network file system without locks
                raise OutputError(
                    f"{path}: cannot lock the results folder ({exc.strerror or exc}); use a local --out folder."
                ) from exc
        held = True
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv,
        }
        with writing(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        yield path
    finally:
        if held:
            try:
                os.ftruncate(fd, 0)  # the holder's text goes with the lock
            except OSError:
                pass
        os.close(fd)


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
