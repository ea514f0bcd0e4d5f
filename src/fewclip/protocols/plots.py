"""Accuracy-vs-shots plots for ``fewclip report`` (matplotlib, imported only when a plot is drawn).

Figures are drawn with matplotlib's object-oriented API (``matplotlib.figure.Figure``, rendered by the Agg and SVG
backends), so no window opens, no global backend is switched, and no display is needed. matplotlib is the optional
extra ``fewclip[report]``; without it, :func:`require_matplotlib` says how to install it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ResultsError
from ..io import atomic_write

#: figure size (inches) and resolution of the PNG: 768 × 480 pixels
FIGSIZE = (6.4, 4.0)
DPI = 120
#: what the shaded band around each line is (said in the plot's caption and the report)
SPREAD = "min–max over seeds"


@dataclass
class Series:
    """One line: ``label``'s mean accuracy at each of ``shots``; ``low``/``high`` the band (min and max over seeds,
    equal to the mean for one seed); ``published`` (shots, value) points drawn as hollow markers of the same colour."""

    label: str
    shots: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]
    published: list[tuple[int, float]] = field(default_factory=list)


def require_matplotlib() -> Any:
    """The ``matplotlib`` module; a :class:`ResultsError` naming the extra to install when it is missing."""
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as exc:
        raise ResultsError(
            "the report's plots need matplotlib, which is not installed: pip install 'fewclip[report]' "
            "(or pass --no-plots for the tables and the CSV only)."
        ) from exc
    return matplotlib


def plot_accuracy_vs_shots(
    series: Sequence[Series], title: str, stem: Path, ylabel: str = "top-1 accuracy (%)"
) -> list[Path]:
    """Draw ``series`` (one line per method, the seed spread shaded) and write ``stem``.png and ``stem``.svg
    atomically; returns the two paths. Shot counts are spaced on a log2 axis (1, 2, 4, 8, 16) when all are positive."""
    require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot()
    shots = sorted({k for s in series for k in s.shots})
    for index, s in enumerate(series):
        color = f"C{index % 10}"
        order = sorted(range(len(s.shots)), key=lambda i: s.shots[i])
        xs = [s.shots[i] for i in order]
        ax.plot(xs, [s.mean[i] for i in order], marker="o", markersize=4, color=color, label=s.label)
        ax.fill_between(xs, [s.low[i] for i in order], [s.high[i] for i in order], color=color, alpha=0.18, lw=0)
        if s.published:
            ks, values = zip(*sorted(s.published))
            ax.plot(ks, values, linestyle="none", marker="o", markersize=7, mfc="none", color=color)
    if shots and all(k > 0 for k in shots):
        ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.minorticks_off()
    ax.set_xlabel("shots per class")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    published = any(s.published for s in series)
    caption = f"shaded: {SPREAD}" + ("; hollow circles: published" if published else "")
    ax.text(0.99, 0.01, caption, transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="0.35")
    if series:
        ax.legend(fontsize=7, loc="best", framealpha=0.8)
    fig.tight_layout()
    out = []
    for fmt, metadata in (("png", {"Software": None}), ("svg", {"Date": None})):
        path = stem.with_suffix(f".{fmt}")
        atomic_write(path, lambda tmp, fmt=fmt, metadata=metadata: fig.savefig(tmp, format=fmt, metadata=metadata))
        out.append(path)
    return out
