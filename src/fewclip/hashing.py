"""Content hashes of files, remembered so that a warm run only stats them.

>>> memo = HashMemo(cache_root / MEMO_NAME)             # an SQLite file shared by every process using the cache
>>> memo.sha256_many([root / "a.jpg", root / "b.jpg"])  # hex SHA-256 of each file's bytes
>>> memo.sha256(weights_file)

A file is hashed once; its hash is remembered under its absolute path with its size, mtime_ns, ctime_ns and inode.
The next lookup stats the file and reuses the hash only when all four are unchanged, so an image or a weights file
replaced in place (another size, or a new mtime or ctime, which any write sets) is hashed again. The memo is an
optimisation only: if its file cannot be opened or written (read-only folder, a file system without locks), a
warning says so and files are hashed without it; a corrupt memo file is set aside and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from stat import S_ISREG
from typing import Any

from .errors import FewclipError

logger = logging.getLogger("fewclip.hashing")

#: the memo's file name under the cache folder
MEMO_NAME = "file-hashes.sqlite3"
_CHUNK = 50_000  # paths per SELECT
_COMMIT_EVERY = 512  # new hashes per transaction: a killed run keeps what it hashed


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (no memo)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _absolute(path: str | os.PathLike) -> str:
    """``os.path.abspath`` without its cost for paths that are absolute and normal already (the common case)."""
    text = os.fspath(path)
    if os.sep == "/" and text.startswith("/") and "/." not in text and "//" not in text and not text.endswith("/"):
        return text
    return os.path.abspath(text)


class HashMemo:
    """(absolute path, size, mtime_ns, ctime_ns, inode) → SHA-256, kept in the SQLite file ``path``.

    ``path=None`` keeps the memo in this process only. ``hashed`` counts the files whose bytes were read.
    Safe for concurrent processes (SQLite's locking, a 60 s busy timeout, short write transactions).
    """

    def __init__(self, path: str | os.PathLike | None, *, threads: int | None = None):
        self.path = None if path is None else Path(path).expanduser()
        self.threads = threads or min(8, os.cpu_count() or 1)
        self.hashed = 0
        self._conn: sqlite3.Connection | None = None
        self._local: dict[str, tuple[tuple[int, int, int, int], str]] = {}
        self._disabled = self.path is None
        self._read_only = False

    # ----------------------------------------------------------------- the SQLite file
    def _connect(self) -> sqlite3.Connection | None:
        if self._disabled:
            return None
        if self._conn is not None:
            return self._conn
        assert self.path is not None
        for attempt in (0, 1):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                if not self.path.exists():  # created here so the user's umask applies (SQLite would use 0644)
                    os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o666))
                conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                    "ctime_ns INTEGER, inode INTEGER, sha256 TEXT) WITHOUT ROWID"
                )
                self._conn = conn
                return conn
            except sqlite3.DatabaseError as exc:
                if attempt == 0 and ("not a database" in str(exc) or "malformed" in str(exc)):
                    self._set_aside(exc)
                    continue
                return self._give_up(exc)
            except OSError as exc:
                return self._give_up(exc)
        return None  # pragma: no cover

    def _set_aside(self, exc: BaseException) -> None:
        assert self.path is not None
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.time_ns():x}")
        logger.warning("file-hash memo %s is unreadable (%s); moved it to %s and starting a new one", self.path, exc,
                       aside)  # fmt: skip
        try:
            os.replace(self.path, aside)
        except OSError:
            pass

    def _give_up(self, exc: BaseException) -> None:
        logger.warning(
            "file-hash memo %s cannot be used (%s); files are hashed without it (fix the folder's permissions, or "
            "use a --cache-dir on a local disk)",
            self.path,
            exc,
        )
        self._disabled = True
        self._conn = None
        return None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __getstate__(self):  # a copy sent to another process opens its own connection
        state = dict(self.__dict__)
        state["_conn"] = None
        return state

    # ----------------------------------------------------------------- lookups
    def _remembered(self, keys: list[str]) -> dict[str, tuple[tuple[int, int, int, int], str]]:
        out = {k: self._local[k] for k in keys if k in self._local}
        rest = [k for k in keys if k not in out]
        conn = self._connect()
        if conn is None or not rest:
            return out
        try:
            for s in range(0, len(rest), _CHUNK):
                for path, size, mtime, ctime, inode, digest in self._select(conn, rest[s : s + _CHUNK]):
                    out[path] = ((size, mtime, ctime, inode), digest)
        except sqlite3.Error as exc:
            self._give_up(exc)
        return out

    @staticmethod
    def _select(conn: sqlite3.Connection, paths: list[str]) -> list[tuple]:
        columns = "SELECT path, size, mtime_ns, ctime_ns, inode, sha256 FROM files WHERE path IN "
        try:  # one query: the paths travel as one JSON array
            return conn.execute(columns + "(SELECT value FROM json_each(?))", (json.dumps(paths),)).fetchall()
        except sqlite3.OperationalError as exc:  # an SQLite without JSON functions
            if "json_each" not in str(exc):
                raise
        rows = []
        for s in range(0, len(paths), 500):  # below SQLite's oldest limit on parameters, 999
            chunk = paths[s : s + 500]
            rows += conn.execute(columns + f"({','.join('?' * len(chunk))})", chunk).fetchall()
        return rows

    def _remember(self, rows: list[tuple[str, tuple[int, int, int, int], str]]) -> None:
        for path, sig, digest in rows:
            self._local[path] = (sig, digest)
        conn = self._connect()
        if conn is None or self._read_only or not rows:
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)", [(p, *sig, d) for p, sig, d in rows]
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if "readonly" in str(exc) or "read-only" in str(exc):
                logger.warning("file-hash memo %s is read-only here (%s); new hashes are not remembered", self.path,
                               exc)  # fmt: skip
                self._read_only = True
            else:
                self._give_up(exc)

    def sha256(self, path: str | os.PathLike) -> str:
        """Hex SHA-256 of the file ``path``; an unreadable file raises :class:`FewclipError` naming it."""
        errors: dict[str, str] = {}
        digest = self.sha256_many([path], errors=errors)[0]
        if digest is None:
            raise FewclipError(f"{path}: cannot be read to hash it ({errors[str(path)]}).")
        return digest

    def sha256_many(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        errors: dict[str, str] | None = None,
        progress: Callable[[int], AbstractContextManager[Any]] | None = None,
    ) -> list[str | None]:
        """Hex SHA-256 of each file, in order; None for a file that cannot be read, with its message in
        ``errors[str(path)]``. Remembered files are only stat'ed; the others are read in a few threads.
        ``progress(n)``, when given, opens a progress reporter (``update(1)`` per file) for the n files to read."""
        keys = [_absolute(p) for p in paths]
        sigs: list[tuple[int, int, int, int] | None] = []
        problems: dict[int, str] = {}
        for i, key in enumerate(keys):
            try:
                st = os.stat(key)
            except OSError as exc:
                problems[i] = f"{type(exc).__name__}: {exc.strerror or exc}"
                sigs.append(None)
                continue
            if not S_ISREG(st.st_mode):
                problems[i] = "not a regular file"
                sigs.append(None)
                continue
            sigs.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        known = self._remembered(list(dict.fromkeys(k for k, s in zip(keys, sigs) if s is not None)))
        out: list[str | None] = [None] * len(keys)
        todo: dict[str, list[int]] = {}
        for i, (key, sig) in enumerate(zip(keys, sigs)):
            if sig is None:
                continue
            hit = known.get(key)
            if hit is not None and hit[0] == sig:
                out[i] = hit[1]
            else:
                todo.setdefault(key, []).append(i)
        if todo:
            with progress(len(todo)) if progress is not None else contextlib.nullcontext() as bar:
                self._hash(todo, keys, sigs, out, problems, bar)
        if errors is not None:
            for i, message in problems.items():
                errors[str(paths[i])] = message
        return out

    def _hash(self, todo, keys, sigs, out, problems, bar=None) -> None:
        def one(key: str) -> tuple[str, str | None, str | None]:
            try:
                return key, sha256_file(key), None
            except OSError as exc:
                return key, None, f"{type(exc).__name__}: {exc.strerror or exc}"

        pending: list[tuple[str, tuple[int, int, int, int], str]] = []
        names = list(todo)
        with ThreadPoolExecutor(max_workers=self.threads) if len(names) > 8 else _Inline() as pool:
            for key, digest, problem in pool.map(one, names):
                self.hashed += 1
                if bar is not None:
                    bar.update(1)
                for i in todo[key]:
                    if digest is None:
                        problems[i] = problem or "unreadable"
                    else:
                        out[i] = digest
                if digest is None:
                    continue
                sig = sigs[todo[key][0]]
                try:  # remembered only if the file did not change while it was read
                    if _signature(os.stat(key)) == sig:
                        pending.append((key, sig, digest))
                except OSError:
                    pass
                if len(pending) >= _COMMIT_EVERY:
                    self._remember(pending)
                    pending = []
        self._remember(pending)


class _Inline:
    """A stand-in for a thread pool: ``map`` in this thread (for a handful of files)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def map(self, fn, items):
        return map(fn, items)
