"""What the command modules share: the usage error, ``KEY=VALUE`` parsing, value and table formatting, and fitting
one method on a bundle.

The command modules import the library inside their handlers, not at module top: building the parser (and
``fewclip --help``) then never imports torch, which costs over a second.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from ..errors import CLIError

EXIT_USAGE = 2

__all__ = ["EXIT_USAGE", "CLIError", "fit_and_evaluate", "fmt", "format_table", "parse_set"]


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; VALUE is read as JSON (numbers, lists, true/false/null), else kept as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--set expects KEY=VALUE, got {item!r} (example: --set search_scale=[7,7,1]).")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def fmt(value: Any) -> str:
    """A hyperparameter value for a table cell: floats to 4 significant digits, lists compact."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(fmt(v) for v in value) + "]"
    return str(value)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """``rows`` (dicts) as a text table with the given ``columns``."""
    from ..protocols.results import text_table

    return text_table(columns, [[str(r.get(c, "")) for c in columns] for r in rows])


def fit_and_evaluate(
    bundle, method: str, preset: str | None, overrides: dict[str, Any], selection: str
) -> tuple[Any, dict]:
    """Fit one method on a bundle and evaluate test once; returns (model, the result dict of ``fit --json``)."""
    from .. import methods

    model = methods.create(method, preset=preset, selection=selection, **overrides)
    t0 = time.perf_counter()
    model.fit(bundle)
    t1 = time.perf_counter()
    test_accuracy = model.score(bundle.test_features, bundle.test_labels)
    t2 = time.perf_counter()
    result = {
        "method": method,
        "test_accuracy": test_accuracy,
        "val_accuracy": model.val_accuracy_,
        "hyperparameters": model.hyperparameters(),
        "fit_seconds": t1 - t0,
        "predict_seconds": t2 - t1,
        "bundle": bundle.summary(),
        "selection": selection,
        "preset": preset,
        "overrides": overrides,
        "test_tuned": False,
    }
    return model, result
