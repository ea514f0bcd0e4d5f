"""What the command modules share: the usage error, ``KEY=VALUE`` parsing, value and table formatting, and fitting
one method on a bundle.

The command modules import the library inside their handlers, not at module top: building the parser (and
``fewclip --help``) then never imports torch, which costs over a second.
"""

from __future__ import annotations

import json
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
    from ..protocols.report import text_table

    return text_table(columns, [[str(r.get(c, "")) for c in columns] for r in rows])


def fit_and_evaluate(
    bundle, method: str, preset: str | None, overrides: dict[str, Any], selection: str
) -> tuple[Any, dict]:
    """Fit one method on a bundle and evaluate test once; returns (model, the result dict of ``fit --json``)."""
    from .. import methods
    from ..metrics import accuracy
    from ..protocols.runner import fit_and_predict

    model = methods.create(method, preset=preset, selection=selection, **overrides)
    logits, seconds = fit_and_predict(model, bundle)
    result = {
        "method": method,
        "test_accuracy": accuracy(logits, bundle.test_labels),
        "val_accuracy": model.val_accuracy_,
        "hyperparameters": model.hyperparameters(),
        "fit_seconds": seconds["fit"],
        "predict_seconds": seconds["predict"],
        "bundle": bundle.summary(),
        "selection": selection,
        "preset": preset,
        "overrides": overrides,
        "test_tuned": False,
    }
    return model, result
