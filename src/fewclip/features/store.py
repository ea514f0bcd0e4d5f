"""The on-disk feature cache: raw embeddings stored per image (or per prompt), content-addressed by what made them.

Layout under the cache folder (``$FEWCLIP_CACHE`` or ``~/.cache/fewclip``)::

    features/<group id>/group.json               the group's spec (backbone, transform, view)
    features/<group id>/<shard>.safetensors      tensor "features" [n, D] + metadata "keys" (JSON list of n keys)
    features/<group id>/quarantine/              shards found truncated or unreadable, set aside (safe to delete)
    file-hashes.sqlite3                          (absolute path, size, mtime, ctime, inode) -> SHA-256 of the file
    checkpoints/<sha256>.safetensors             converted OpenAI TorchScript archives

A *group* is every feature computed the same way: one backbone identity (model, weights hash, precision,
preprocessing) and one view (the clean test transform, or augmentation preset + seed + view index). Its id is a
hash of that spec. Inside a group an image's feature is addressed by the SHA-256 of the image file's bytes (a
prompt's by its text). So the 1/2/4/8-shot subsets and other seeds reuse what a 16-shot run encoded, different
methods never encode an image twice, two datasets that hold the same image share its features, and two datasets
whose files share names but not pixels never do; an image replaced in place is encoded again. The hashes are
remembered in ``file-hashes.sqlite3`` (:mod:`fewclip.hashing`), so a warm run stats each image, not reads it.

Every shard is written to a temporary file and renamed into place, so a shard is either complete or absent; an
interrupted extraction keeps the shards already written (a pass writes one every 1,024 rows and at least once a
minute) and resumes with the missing keys. Shards are appended, never rewritten, which keeps writes cheap for
~100k images; the index is rebuilt from shard headers (a few KB each) when a group is opened. A shard whose header
does not match its file (a truncated copy, a disk error) is moved into ``quarantine/`` with a warning naming it, and
its rows are encoded again. Files and folders get the permissions the user's umask gives, so a group can share a
cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import FeatureStoreError
from ..hashing import MEMO_NAME, HashMemo
from ..io import atomic_write, default_cache_dir

logger = logging.getLogger("fewclip.features")

FORMAT = "fewclip-features/1"
QUARANTINE = "quarantine"  # a group's sub-folder holding shards found unreadable or truncated
#: a writer flushes at least this often, so an interrupted pass loses at most ~1,024 rows or a minute of work
FLUSH_ROWS = 1024
FLUSH_SECONDS = 60.0
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def group_id(spec: dict[str, Any]) -> str:
    """The folder name of a group: the first 24 hex digits of the SHA-256 of its canonical JSON spec."""
    return hashlib.sha256(canonical_json(spec).encode("utf-8")).hexdigest()[:24]


_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}


def read_shard_header(path: Path) -> tuple[list[str], list[int]]:
    """(keys, shape of 'features') from a shard's safetensors header, without reading the tensor.

    Also checks the file against its header: a shard cut short (its data ends before the header's offsets say) or
    padded raises :class:`FeatureStoreError` like a garbled header does.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise FeatureStoreError(f"{path}: truncated safetensors header.")
        n = int.from_bytes(raw, "little")
        if n <= 0 or n > 100_000_000 or 8 + n > size:
            raise FeatureStoreError(f"{path}: implausible safetensors header length {n} for a {size}-byte file.")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise FeatureStoreError(f"{path}: garbled safetensors header ({exc}).") from exc
    if not isinstance(header, dict):
        raise FeatureStoreError(f"{path}: garbled safetensors header.")
    meta = header.get("__metadata__") or {}
    entry = header.get("features")
    if meta.get("format") != FORMAT or not isinstance(entry, dict):
        raise FeatureStoreError(f"{path}: not a {FORMAT} shard.")
    try:
        keys = json.loads(meta["keys"])
        shape = [int(d) for d in entry["shape"]]
        begin, end = (int(o) for o in entry["data_offsets"])
        itemsize = _ITEMSIZE[entry["dtype"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise FeatureStoreError(f"{path}: incomplete shard header ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(keys, list) or len(shape) != 2 or shape[0] != len(keys):
        raise FeatureStoreError(f"{path}: {len(keys)} keys but features of shape {shape}.")
    if end - begin != shape[0] * shape[1] * itemsize or 8 + n + end != size:
        raise FeatureStoreError(
            f"{path}: the file has {size} bytes but its header describes {8 + n + end} (features {shape}); the "
            "shard is truncated or corrupt."
        )
    return keys, shape


class FeatureGroup:
    """The features of one group (see the module docstring), addressed by key."""

    def __init__(self, store: FeatureStore, spec: dict[str, Any]):
        self.store = store
        self.spec = spec
        self.id = group_id(spec)
        self.path = store.features_dir / self.id
        self._index: dict[str, tuple[str, int]] = {}
        self._seen: set[str] = set()
        self._dim: int | None = None

    # ----------------------------------------------------------------- index
    def refresh(self) -> None:
        """Read the headers of shards written since the last call (by this or another process).

        A shard whose header is unreadable or does not match the file's size is set aside (see :meth:`quarantine`)
        with a warning naming it, so its rows count as missing and are encoded again; it is never read as data.
        """
        if not self.path.is_dir():
            return
        names = sorted(
            e.name for e in os.scandir(self.path) if e.name.endswith(".safetensors") and not e.name.startswith(".")
        )
        for name in names:
            if name in self._seen:
                continue
            self._seen.add(name)
            try:
                keys, shape = read_shard_header(self.path / name)
            except FileNotFoundError:  # set aside by another process meanwhile
                continue
            except (OSError, FeatureStoreError) as exc:
                self.quarantine(name, exc)
                continue
            if self._dim is None:
                self._dim = shape[1]
            elif shape[1] != self._dim:
                raise FeatureStoreError(
                    f"{self.path / name}: features have D = {shape[1]} but other shards of this group have "
                    f"D = {self._dim}; delete the folder {self.path} to rebuild it."
                )
            for row, key in enumerate(keys):
                self._index.setdefault(key, (name, row))

    def quarantine(self, name: str, reason: BaseException | str) -> Path | None:
        """Move shard ``name`` into the group's ``quarantine/`` folder and forget its rows (they will be encoded
        again). Returns where it went (None if it was already gone)."""
        source = self.path / name
        dest = self.path / QUARANTINE / name
        try:
            dest.parent.mkdir(exist_ok=True)
            os.replace(source, dest)
        except FileNotFoundError:
            dest = None
        except OSError as exc:  # cannot move it: it is still never read again by this process
            logger.warning("could not move the bad cache shard %s aside (%s)", source, exc)
            dest = None
        logger.warning(
            "cache shard %s is unreadable or truncated (%s); %s, its rows will be encoded again",
            source,
            reason,
            f"moved to {dest}" if dest else "ignored",
        )
        self._seen.add(name)
        self._index = {k: v for k, v in self._index.items() if v[0] != name}
        return dest

    def keys(self) -> set[str]:
        self.refresh()
        return set(self._index)

    def __len__(self) -> int:
        self.refresh()
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def has(self, keys: Sequence[str]) -> list[bool]:
        """Membership of each key (after picking up new shards)."""
        self.refresh()
        return [k in self._index for k in keys]

    @property
    def dim(self) -> int | None:
        self.refresh()
        return self._dim

    # ----------------------------------------------------------------- read / write
    def get(self, keys: Sequence[str]) -> torch.Tensor:
        """[len(keys), D] float32 features; every key must be present (a :class:`KeyError` names the missing)."""
        out, found = self.read(keys)
        missing = [k for k, ok in zip(keys, found) if not ok]
        if missing:
            raise KeyError(f"{len(missing)} key(s) not in cache group {self.id}, e.g. {missing[:3]}")
        return out

    def read(self, keys: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        """([len(keys), D] float32 features, found): the rows of ``keys`` the group holds; rows not found are zero.

        A shard that fails to read is set aside (:meth:`quarantine`) and its keys reported as not found, so the
        caller encodes them again.
        """
        self.refresh()
        if not keys:
            return torch.empty(0, self._dim or 0), []
        out = torch.zeros(len(keys), self._dim or 0)
        found = [False] * len(keys)
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for i, k in enumerate(keys):
            where = self._index.get(k)
            if where is not None:
                by_shard.setdefault(where[0], []).append((i, where[1]))
        for shard, pairs in by_shard.items():
            try:
                with safe_open(str(self.path / shard), framework="pt", device="cpu") as f:
                    data = f.get_tensor("features")
            except Exception as exc:  # safetensors raises its own error types for corrupt files
                if (self.path / shard).exists():
                    self.quarantine(shard, exc)
                else:  # set aside by another process
                    self._index = {k: v for k, v in self._index.items() if v[0] != shard}
                continue
            dest = torch.tensor([p[0] for p in pairs], dtype=torch.long)
            rows = torch.tensor([p[1] for p in pairs], dtype=torch.long)
            out.index_copy_(0, dest, data.index_select(0, rows).float())  # (``out[dest] = …`` is ~100x slower)
            for i, _ in pairs:
                found[i] = True
        return out, found

    def put(self, keys: Sequence[str], features: torch.Tensor) -> Path | None:
        """Write one shard holding ``features`` [n, D] under ``keys`` (atomically). Returns its path."""
        keys = [str(k) for k in keys]
        if features.dim() != 2 or features.shape[0] != len(keys):
            raise FeatureStoreError(
                f"put: features of shape {list(features.shape)} do not match {len(keys)} keys (expected [n, D])."
            )
        if not keys:
            return None
        if self._dim is not None and features.shape[1] != self._dim:
            raise FeatureStoreError(
                f"put: features have D = {features.shape[1]} but cache group {self.id} holds D = {self._dim}."
            )
        self._write_spec()
        tensor = features.detach().to("cpu", self.store.storage_dtype).contiguous()
        name = f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}.safetensors"
        meta = {"format": FORMAT, "keys": json.dumps(keys, ensure_ascii=False), "group": self.id}
        path = self.path / name
        self._write(path, lambda tmp: save_file({"features": tensor}, str(tmp), metadata=meta))
        self._seen.add(name)
        self._dim = int(tensor.shape[1])
        for row, key in enumerate(keys):
            self._index.setdefault(key, (name, row))
        return path

    def writer(self, flush_rows: int = FLUSH_ROWS, flush_seconds: float = FLUSH_SECONDS) -> GroupWriter:
        """A buffered writer: rows are written as shards of up to ``flush_rows`` rows (and at least every
        ``flush_seconds``), and whatever is buffered is written when the ``with`` block exits, also on error."""
        return GroupWriter(self, flush_rows, flush_seconds)

    def _write_spec(self) -> None:
        spec_file = self.path / "group.json"
        if not spec_file.is_file():
            text = json.dumps({"format": FORMAT, "id": self.id, "spec": self.spec}, indent=1, ensure_ascii=False)
            self._write(spec_file, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def _write(self, path: Path, writer) -> None:
        """:func:`~fewclip.io.atomic_write`, a failure (full disk, no permission, read-only file system) one
        :class:`FeatureStoreError` naming the file and the fix; nothing half-written stays."""
        try:
            atomic_write(path, writer)
        except OSError as exc:
            raise FeatureStoreError(
                f"{path}: cannot write to the feature cache ({exc.strerror or exc}); free space on that disk, make "
                f"{self.store.root} writable, or pass another --cache-dir. The features written so far are kept."
            ) from exc


class GroupWriter:
    """Buffers rows for one group and writes them as shards; see :meth:`FeatureGroup.writer`."""

    def __init__(self, group: FeatureGroup, flush_rows: int, flush_seconds: float):
        self.group = group
        self.flush_rows = max(1, int(flush_rows))
        self.flush_seconds = flush_seconds
        self._keys: list[str] = []
        self._rows: list[torch.Tensor] = []
        self._last = time.monotonic()
        self.written = 0

    @property
    def pending(self) -> int:
        """Rows buffered and not yet written."""
        return len(self._keys)

    def add(self, keys: Iterable[str], features: torch.Tensor) -> None:
        keys = list(keys)
        if features.shape[0] != len(keys):
            raise FeatureStoreError(f"add: {len(keys)} keys for {features.shape[0]} rows.")
        self._keys.extend(keys)
        self._rows.append(features.detach().cpu())
        if len(self._keys) >= self.flush_rows or time.monotonic() - self._last >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._keys:
            self.group.put(self._keys, torch.cat(self._rows))
            self.written += len(self._keys)
        self._keys, self._rows = [], []
        self._last = time.monotonic()

    def __enter__(self) -> GroupWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()


class FeatureStore:
    """A cache folder of feature groups. ``storage_dtype='float16'`` halves the disk use (reads give float32)."""

    def __init__(self, root: str | os.PathLike | None = None, *, storage_dtype: str = "float32"):
        if storage_dtype not in STORAGE_DTYPES:
            raise FeatureStoreError(
                f"storage_dtype {storage_dtype!r} is unknown; choose one of {list(STORAGE_DTYPES)}."
            )
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        if self.root.exists() and not self.root.is_dir():
            raise FeatureStoreError(f"cache dir {self.root} exists and is not a folder; pass another --cache-dir.")
        self.storage_dtype = STORAGE_DTYPES[storage_dtype]
        self.features_dir = self.root / "features"
        self._groups: dict[str, FeatureGroup] = {}
        self._memo: HashMemo | None = None

    @property
    def memo(self) -> HashMemo:
        """The file-hash memo of this cache folder (``file-hashes.sqlite3``): image and weights files → SHA-256."""
        if self._memo is None:
            self._memo = HashMemo(self.root / MEMO_NAME)
        return self._memo

    def group(self, spec: dict[str, Any]) -> FeatureGroup:
        gid = group_id(spec)
        if gid not in self._groups:
            self._groups[gid] = FeatureGroup(self, spec)
        return self._groups[gid]

    def info(self) -> dict[str, Any]:
        """Sizes and counts: per group (kind, model, view, dataset, rows, shards, bytes) and totals."""
        groups = []
        stale_tmp = 0
        if self.features_dir.is_dir():
            for entry in sorted(os.scandir(self.features_dir), key=lambda e: e.name):
                if not entry.is_dir():
                    continue
                folder = Path(entry.path)
                spec: dict[str, Any] = {}
                try:
                    spec = json.loads((folder / "group.json").read_text(encoding="utf-8")).get("spec", {})
                except (OSError, ValueError):
                    pass
                rows = shards = size = bad = 0
                quarantined = folder / QUARANTINE
                set_aside = len(os.listdir(quarantined)) if quarantined.is_dir() else 0
                for f in os.scandir(folder):
                    if not f.is_file():
                        continue
                    if f.name.endswith(".tmp"):
                        stale_tmp += f.stat().st_size
                        continue
                    size += f.stat().st_size
                    if f.name.endswith(".safetensors"):
                        shards += 1
                        try:
                            rows += len(read_shard_header(Path(f.path))[0])
                        except (OSError, FeatureStoreError):
                            bad += 1
                backbone = spec.get("backbone", {}) or {}
                groups.append(
                    {
                        "id": entry.name,
                        "kind": spec.get("kind"),
                        "model": backbone.get("model"),
                        "weights": _short_weights(backbone.get("weights")),
                        "precision": backbone.get("precision"),
                        "view": spec.get("view"),
                        "rows": rows,
                        "shards": shards,
                        "unreadable_shards": bad,
                        "quarantined_shards": set_aside,
                        "bytes": size,
                    }
                )
        checkpoints = self.root / "checkpoints"
        ckpt_files = [f for f in checkpoints.iterdir() if f.is_file()] if checkpoints.is_dir() else []
        ckpt_bytes = sum(f.stat().st_size for f in ckpt_files)
        feature_bytes = sum(g["bytes"] for g in groups)
        return {
            "root": str(self.root),
            "groups": groups,
            "feature_rows": sum(g["rows"] for g in groups),
            "feature_bytes": feature_bytes,
            "checkpoints": len(ckpt_files),
            "checkpoint_bytes": ckpt_bytes,
            "stale_temp_bytes": stale_tmp,
            "total_bytes": feature_bytes + ckpt_bytes + stale_tmp,
        }


def _short_weights(weights: Any) -> str | None:
    if not isinstance(weights, dict):
        return None if weights is None else str(weights)
    if weights.get("tag"):
        return f"tag:{weights['tag']}"
    if weights.get("sha256"):
        return f"sha256:{weights['sha256'][:12]}"
    for key in ("hf_id", "hf_hub", "folder", "file"):
        if weights.get(key):
            return str(weights[key])
    return None
