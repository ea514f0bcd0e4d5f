"""File helpers every layer uses: atomic writes, file hashes, the cache folder, reading fewclip safetensors files.

Torch-free at import (``safetensors`` loads torch only when a file is read), so the command line's ``--help`` and
the data layer stay light.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from .errors import FewclipError

if TYPE_CHECKING:
    import torch


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp)`` on a temporary file beside ``path``, flush it to disk, then rename it onto ``path``.

    A reader sees the old file or the complete new one, never a part; a crash or an exception leaves no temporary
    file behind (bar a power cut). The file gets the permissions the user's umask gives a new file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # the kernel applies the umask
        mode = os.fstat(fd).st_mode & 0o777
        os.close(fd)
        writer(tmp)
        if os.stat(tmp).st_mode & 0o777 != mode:  # a writer that re-creates the file (safetensors: 0600)
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def default_cache_dir() -> Path:
    """``$FEWCLIP_CACHE`` or ``~/.cache/fewclip``: features, converted checkpoints."""
    env = os.environ.get("FEWCLIP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fewclip"


def read_toml(path: str | os.PathLike, *, what: str, error: type[FewclipError]) -> dict[str, Any]:
    """The top-level table of a TOML file. A missing file or one that is not valid UTF-8 TOML raises ``error``
    naming the file (and the parser's message); ``what`` ("sweep", "configuration", ...) names the kind of file."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not a valid TOML file ({exc}).") from None


def read_safetensors(
    path: str | os.PathLike, *, expected_format: str, what: str, error: type[FewclipError]
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a fewclip safetensors file whose metadata ``format`` is ``expected_format``.

    Every problem (missing file, unreadable header, another format) raises ``error`` naming the file, what was
    found and what was expected; ``what`` ("bundle", "model", ...) names the kind of file in the messages.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what} file.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise error(f"{path}: not a readable {what} file (safetensors: {exc}).") from exc
    found = meta.get("format")
    if found != expected_format:
        raise error(f"{path}: metadata 'format' is {found!r}; expected {expected_format!r}. Is this a fewclip {what}?")
    return meta, tensors
