"""Summaries of results and the text tables they are printed as (torch-free)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


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
