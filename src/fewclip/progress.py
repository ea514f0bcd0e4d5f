"""Progress of long steps: a tqdm bar on a terminal, log lines elsewhere (batch jobs, nohup, SLURM).

    with progress(len(todo), "encoding images", "img") as bar:
        for batch in loader:
            ...
            bar.update(len(batch))

On a terminal this is tqdm. When stderr is not a terminal, a line such as

    fewclip: encoding images 1200/5000 img (24%), 40.0 img/s, elapsed 0:30, ETA 1:35

goes to stderr at most every ``FEWCLIP_PROGRESS_SECONDS`` seconds (default 30; 0 writes a line at every update),
and one last line when the step ends if any was written, so steps shorter than the interval stay silent.
``enabled=False`` shows nothing either way.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Self, TextIO

from tqdm.auto import tqdm

from .errors import ProgressError

ENV_SECONDS = "FEWCLIP_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0


def log_interval(environ: Mapping[str, str] = os.environ) -> float:
    """Seconds between two log lines: ``FEWCLIP_PROGRESS_SECONDS`` when set, else 30."""
    raw = environ.get(ENV_SECONDS, "").strip()
    if not raw:
        return DEFAULT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ProgressError(
            f"{ENV_SECONDS}={raw!r} is not a number of seconds >= 0; set it to e.g. 30 (a progress line every "
            "30 s when stderr is not a terminal), or 0 for a line at every update, or unset it."
        )
    return value


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"`` (whole seconds, rounded down)."""
    s = int(max(seconds, 0.0))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_line(
    desc: str, n: int, total: int | None, unit: str, elapsed: float, postfix: Mapping[str, Any] | None = None
) -> str:
    """One progress line: count of total (percent), rate, elapsed time, ETA and the postfix values."""
    count = f"{n}/{total} {unit} ({100.0 * n / total:.0f}%)" if total else f"{n} {unit}"
    parts = [f"fewclip: {desc} {count}"]
    rate = n / elapsed if elapsed > 0 else 0.0
    if rate >= 1:
        parts.append(f"{rate:.1f} {unit}/s")
    elif rate > 0:
        parts.append(f"{1 / rate:.1f} s/{unit}")
    parts.append(f"elapsed {format_duration(elapsed)}")
    if total and rate > 0 and n < total:
        parts.append(f"ETA {format_duration((total - n) / rate)}")
    if postfix:
        parts.append(" ".join(f"{k}={v}" for k, v in postfix.items()))
    return ", ".join(parts)


class LogProgress:
    """tqdm's ``update``/``set_postfix``/``close`` interface, writing :func:`format_line` lines every ``interval`` s."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        stream: TextIO,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream, self.interval, self.clock = stream, interval, clock
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self._start = self._last = clock()
        self._written_at: int | None = None  # n at the last line written; None before the first
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self._last >= self.interval:
            self._write(now)

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        if not self._closed and self._written_at is not None and self._written_at != self.n:
            self._write(self.clock())
        self._closed = True

    def _write(self, now: float) -> None:
        self._last = now
        self._written_at = self.n
        line = format_line(self.desc, self.n, self.total, self.unit, now - self._start, self.postfix)
        print(line, file=self.stream, flush=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (ValueError, OSError):  # a closed stream
        return False


def progress(
    total: int | None,
    desc: str,
    unit: str = "it",
    *,
    enabled: bool = True,
    leave: bool = True,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tqdm | LogProgress:
    """A progress reporter for a step of ``total`` units: tqdm on a terminal, :class:`LogProgress` elsewhere.

    Use it as a context manager; call ``update(n)`` and optionally ``set_postfix(...)``. ``stream`` defaults to
    the current ``sys.stderr``; ``clock`` is for tests.
    """
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return tqdm(total=total, disable=True)
    if _is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=stream)
    return LogProgress(total, desc, unit, stream=stream, interval=log_interval(), clock=clock)
