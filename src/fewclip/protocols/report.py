"""Summaries of results and the text tables they are printed as; ``fewclip report``'s reading, summaries, CSV and
tables (torch-free: a report reads JSON only)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ResultsError


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof 0, as CoOp's parse_test_res.py)."""
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b); 0 when both are 0."""
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


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


# --------------------------------------------------------------------------- fewclip report: reading results folders
#
# ``fewclip report`` reads every result JSON under one or more results folders (those ``fewclip run`` and ``fewclip
# sweep`` write), flattens each into one row (the CSV), and summarises the rows: mean ± population std over seeds per
# (backbone, protocol, dataset, method variant, shots), the average over datasets, base/new/HM and many/medium/few.
# Everything here is torch-free: a report reads JSON only.

#: the result format this reader understands (= :data:`fewclip.protocols.results.RESULT_FORMAT`; a test keeps the two
#: equal without importing torch here)
RESULT_FORMAT = "fewclip-result/1"
#: CoOp's 11 datasets, in the order papers list them; their average is "the 11-dataset average"
STANDARD_DATASETS = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft", "sun397",
    "dtd", "eurosat", "ucf101",
)  # fmt: skip
AVERAGE = "average"
BASE2NEW_PROTOCOLS = ("base2new", "base2new-imbalanced")
#: the per-result fields each protocol's tables average over seeds (the harmonic means are derived from the means)
PROTOCOL_KEYS: dict[str, tuple[str, ...]] = {
    "fewshot": ("test_accuracy",),
    "transfer": ("test_accuracy",),
    "base2new": ("base", "new", "base_all_classes", "new_all_classes"),
    "base2new-imbalanced": ("base", "new", "base_all_classes", "new_all_classes"),
    "longtail": ("test_accuracy", "many", "medium", "few"),
}
ACCURACY_COLUMNS = (
    "test_accuracy", "test_mean_per_class", "test_macro_f1", "val_accuracy", "base", "new", "harmonic_mean",
    "base_all_classes", "new_all_classes", "all_classes_harmonic_mean", "base_within_base", "many", "medium", "few",
)  # fmt: skip
#: the CSV's columns, in order (accuracy fields a protocol adds beyond these follow, sorted)
CSV_COLUMNS = (
    "dataset", "target", "protocol", "backbone", "model", "pretrained", "backend", "method", "preset", "overrides",
    "selection", "selection_used", "val_kind", "test_tuned", "selected_on", "shots", "seed", *ACCURACY_COLUMNS,
    "temperature", "calibration_source", "test_ece_before", "test_ece_after", "val_ece_before", "val_ece_after",
    "fit_seconds", "config_sha256", "setup", "setup_tag", "run_id", "created", "path",
)  # fmt: skip
_INT_COLUMNS = {"shots", "seed"}
_BOOL_COLUMNS = {"test_tuned"}
_STR_COLUMNS = {
    "dataset", "target", "protocol", "backbone", "model", "pretrained", "backend", "method", "preset", "overrides",
    "selection", "selection_used", "val_kind", "selected_on", "calibration_source", "config_sha256", "setup",
    "setup_tag", "run_id", "created", "path",
}  # fmt: skip
#: setup fields that are not part of what a row's setup compares: the cell itself (shots, seed, dataset, method, the
#: digest of the episode's images, which differs per shots and seed) and what the variant key already holds (preset,
#: overrides, selection)
_SETUP_CELL = ("shots", "seed", "dataset", "method", "preset", "overrides", "selection", "protocol", "images_sha256")
#: setup fields that differ from dataset to dataset by nature (compared only between results of one dataset)
_SETUP_PER_DATASET = ("split_sha256", "prompts_sha256", "params")
_REQUIRED = {
    "dataset": str,
    "protocol": str,
    "backbone": str,
    "method": str,
    "shots": int,
    "seed": int,
    "accuracy": dict,
}


@dataclass
class Collection:
    """What a results folder holds: one row per finished result (:func:`result_row`), the failed results (path,
    error), the files that are not results this version reads (path, reason), and results left out because another
    file holds the same cell (path kept out, path kept)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)


def selected_on(record: Mapping[str, Any]) -> str:
    """How a result's hyperparameters (epoch, ratios) were chosen, for a table column: ``test-tuned`` (the result used
    test data: ``test_tuned`` or ``selection_used == "test"``), ``val (fewshot)`` / ``val (full)`` (on the validation
    split of that kind), ``cv`` (cross-validation over the support images), ``none`` (fixed values: the method's
    defaults, or nothing to choose) or ``none, preset P`` (the published values of preset P, as they are: a published
    setting, which its authors may have tuned on test; see the method's preset file; ``per-dataset`` when each dataset
    ran its own, ``--preset paper``)."""
    used = record.get("selection_used") or record.get("selection")  # results before selection_used: what was asked
    if record.get("test_tuned") or used == "test":
        return "test-tuned"
    if used == "val":
        kind = record.get("val_kind")
        return f"val ({kind})" if kind else "val"
    if used == "none" and record.get("preset"):
        return f"none, preset {preset_label(record)}"
    return str(used) if used else "unknown"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def result_row(record: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The CSV row of one finished result JSON ``record`` read from ``path``: its cell, how it was selected, every
    accuracy field, the calibration (temperature, ECE before and after, %) and where it came from."""
    setup = record.get("setup") if isinstance(record.get("setup"), Mapping) else {}
    episode = record.get("episode") if isinstance(record.get("episode"), Mapping) else {}
    accuracy = record["accuracy"]
    calibration = record.get("calibration") if isinstance(record.get("calibration"), Mapping) else {}
    seconds = record.get("seconds") if isinstance(record.get("seconds"), Mapping) else {}
    row: dict[str, Any] = {
        "dataset": record["dataset"],
        "target": record.get("target") or None,
        "protocol": record["protocol"],
        "backbone": record["backbone"],
        "model": setup.get("model"),
        "pretrained": setup.get("pretrained"),
        "backend": setup.get("backend"),
        "method": record["method"],
        "preset": record.get("preset") or None,
        "overrides": json.dumps(record.get("overrides") or {}, sort_keys=True),
        "selection": record.get("selection"),
        "selection_used": record.get("selection_used"),
        "val_kind": setup.get("val_kind") or episode.get("val_kind"),
        "test_tuned": bool(record.get("test_tuned")),
        "shots": int(record["shots"]),
        "seed": int(record["seed"]),
    }
    row["selected_on"] = selected_on(row)
    for key in ACCURACY_COLUMNS:
        row[key] = _number(accuracy.get(key))
    for key, value in accuracy.items():  # fields of protocols added later
        if key not in row and _number(value) is not None:
            row[key] = _number(value)
    row.update(
        temperature=_number(calibration.get("temperature")),
        calibration_source=calibration.get("source"),
        test_ece_before=_number(calibration.get("test_ece_before")),
        test_ece_after=_number(calibration.get("test_ece_after")),
        val_ece_before=_number(calibration.get("val_ece_before")),
        val_ece_after=_number(calibration.get("val_ece_after")),
        fit_seconds=_number(seconds.get("fit")),
        config_sha256=record.get("config_sha256"),
        setup=json.dumps(
            {k: v for k, v in setup.items() if k not in _SETUP_CELL}, sort_keys=True, separators=(",", ":")
        ),
        setup_tag=None,
        run_id=record.get("run_id"),
        created=record.get("created"),
        path=path,
    )
    return row


def classify_json(obj: Any) -> tuple[str, str]:
    """(kind, reason) of a parsed JSON file: ``result``, ``failed``, ``other`` (another fewclip file: a summary, an
    episode), or ``foreign`` with the reason it is not a result this version reads."""
    if not isinstance(obj, dict):
        return "foreign", f"not a fewclip result (a JSON {type(obj).__name__}, not an object)"
    fmt = obj.get("format")
    if fmt == RESULT_FORMAT:
        if obj.get("status") == "failed":
            return "failed", ""
        missing = [key for key, kind in _REQUIRED.items() if not isinstance(obj.get(key), kind)]
        if missing:
            return "foreign", f"a {RESULT_FORMAT} file without valid {', '.join(missing)} (incomplete; re-run it)"
        return "result", ""
    if isinstance(fmt, str) and fmt.startswith("fewclip-result/"):
        return "foreign", f"result format {fmt!r}; this fewclip reads {RESULT_FORMAT!r} (use the fewclip that wrote it)"
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    if any(isinstance(f, str) and f.startswith("fewclip-") for f in (fmt, meta.get("format"))):
        return "other", ""
    return "foreign", f'not a fewclip result (no "format": "{RESULT_FORMAT}")'


def _cell_key(row: Mapping[str, Any]) -> tuple:
    return (
        row["backbone"],
        row["protocol"],
        row["dataset"],
        row["target"],
        *variant_key(row),
        row["shots"],
        row["seed"],
    )


def collect_results(folders: Sequence[str | Path], backbones: Sequence[str] | None = None) -> Collection:
    """Read every ``*.json`` under ``folders`` (recursively, in sorted order). Finished results become rows; failed
    results, corrupt or foreign JSON files are listed by path with the reason, never raised; a second file holding
    the same cell (same backbone, protocol, dataset, target, variant, shots and seed, e.g. two folders with the same
    run) is left out and listed. ``backbones`` keeps only results of those backbone folder names."""
    out = Collection(folders=[str(f) for f in folders])
    seen: dict[tuple, str] = {}
    available: set[str] = set()
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise ResultsError(
                f"{folder}: no such results folder (give the --out folder of fewclip run or fewclip sweep)."
            )
        for path in sorted(folder.rglob("*.json")):
            name = str(path)
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                out.skipped.append((name, f"not readable as JSON ({type(exc).__name__}: {exc})"))
                continue
            kind, reason = classify_json(obj)
            if kind == "other":
                continue
            if kind == "foreign":
                out.skipped.append((name, reason))
                continue
            available.add(str(obj.get("backbone")))
            if backbones is not None and obj.get("backbone") not in backbones:
                continue
            if kind == "failed":
                error = obj.get("error") if isinstance(obj.get("error"), Mapping) else {}
                out.failed.append((name, f"{error.get('type', 'error')}: {error.get('message', '(no message)')}"))
                continue
            out.rows.append(result_row(obj, name))
    label_setups(out.rows)
    kept = []
    for row in out.rows:
        key = _cell_key(row)
        if key in seen:
            out.duplicates.append((row["path"], seen[key]))
            continue
        seen[key] = row["path"]
        kept.append(row)
    out.rows = kept
    missing = [b for b in backbones or [] if b not in available]
    if missing:
        there = ", ".join(sorted(available)) or "none"
        raise ResultsError(
            f"--backbone {' '.join(missing)}: no results of that backbone in {', '.join(out.folders)} "
            f"(backbones there: {there})."
        )
    return out


def _setup_value(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    if len(text) <= 24:
        return text.strip('"')
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _differing(setups: Sequence[Mapping[str, Any]], fields: Iterable[str] | None = None) -> list[str]:
    keys = sorted({k for s in setups for k in s} if fields is None else fields)
    return [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in setups}) > 1]


def label_setups(rows: Sequence[dict[str, Any]]) -> None:
    """Set each row's ``setup_tag``: empty when every result of its method (same backbone and protocol) has the
    same setup (views, augmentation, precision, prompts, sampler, validation kind, model, ...; not shots, seed or
    dataset), else the fields that differ with this row's values (``views=2``), so that results of different setups
    are never averaged together and their rows say how they differ. Setup fields that differ between datasets by
    nature (the split, images, class prompts, resolved hyperparameters) are compared only within one dataset."""
    general: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        setup = json.loads(row.get("setup") or "{}")
        row["_setup"] = setup
        general.setdefault((row["backbone"], row["protocol"], row["method"]), []).append(row)
    for members in general.values():
        setups = [{k: v for k, v in r["_setup"].items() if k not in _SETUP_PER_DATASET} for r in members]
        fields = _differing(setups)
        per_dataset: dict[tuple, list[dict[str, Any]]] = {}
        for r in members:
            per_dataset.setdefault((r["dataset"], r["target"]), []).append(r)
        for group in per_dataset.values():
            local = _differing([r["_setup"] for r in group], _SETUP_PER_DATASET)
            for r in group:
                tags = [f"{k}={_setup_value(r['_setup'].get(k))}" for k in [*fields, *local]]
                r["setup_tag"] = ", ".join(tags) or None
    for row in rows:
        del row["_setup"]


# --------------------------------------------------------------------------- the CSV of every result


def csv_columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """:data:`CSV_COLUMNS`, then any further accuracy fields the rows hold (sorted)."""
    extra = sorted({key for row in rows for key in row} - set(CSV_COLUMNS))
    return [*CSV_COLUMNS, *extra]


def _csv_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV (a header line, one line per result); floats written exactly (``repr``), None as empty."""
    columns = csv_columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_text(row.get(c)) for c in columns])
    return buffer.getvalue()


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a CSV written by :func:`csv_text`, typed back (ints, floats, booleans, None for empty)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        typed: dict[str, Any] = {}
        for key, text in row.items():
            if text == "":
                typed[key] = None
            elif key in _INT_COLUMNS:
                typed[key] = int(text)
            elif key in _BOOL_COLUMNS:
                typed[key] = text == "true"
            elif key in _STR_COLUMNS:
                typed[key] = text
            else:
                typed[key] = float(text)
        out.append(typed)
    return out


# --------------------------------------------------------------------------- summaries over seeds and datasets


def preset_label(row: Mapping[str, Any]) -> str | None:
    """The preset of a row for grouping across datasets: ``per-dataset`` when it is the dataset's own (``--preset
    paper`` gives each dataset its published preset), else its name."""
    preset = row.get("preset")
    if preset and preset == row.get("dataset"):
        return "per-dataset"
    return preset


def variant_key(row: Mapping[str, Any]) -> tuple[str, str | None, str, str, str]:
    """What makes results of one method comparable across seeds and datasets: (method, preset label, overrides,
    selected on, setup tag). Results that differ in any of these are never averaged together (test-tuned ones
    included); the setup tag (:func:`label_setups`) names the setup fields in which this method's results differ."""
    return (
        row["method"],
        preset_label(row),
        row.get("overrides") or "{}",
        row["selected_on"],
        row.get("setup_tag") or "",
    )


def variant_name(key: Sequence[Any]) -> str:
    """``method``, ``method [preset]``, ``method [preset] {"k": v}``, then ``<views=2>`` when this method's results
    have different setups: the method column of the tables."""
    method, preset, overrides, _, tag = key
    name = method + (f" [{preset}]" if preset else "")
    name += f" {overrides}" if overrides and overrides != "{}" else ""
    return name + (f" <{tag}>" if tag else "")


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class Summary:
    """One table row: a method variant on one dataset (or the average) at one shot count, over seeds.

    ``values[key]`` maps seed → value (for the average: seed → the mean over datasets of that seed, only when every
    dataset has the same seeds); ``means[key]`` / ``stds[key]`` are the mean and population std over seeds (std None
    for an average whose datasets have different seeds). ``ece`` is the test ECE after temperature scaling (%), mean
    over seeds (for the average: mean over datasets)."""

    backbone: str
    protocol: str
    dataset: str
    target: str | None
    variant: tuple[str, str | None, str, str, str]
    shots: int
    seeds: list[int]
    means: dict[str, float]
    stds: dict[str, float | None]
    values: dict[str, dict[int, float]]
    ece: float | None = None
    ece_before: float | None = None
    datasets: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.variant[0]

    @property
    def name(self) -> str:
        return variant_name(self.variant)

    @property
    def selected_on(self) -> str:
        return self.variant[3]

    @property
    def n(self) -> int:
        return len(self.seeds)

    def hm(self, base: str = "base", new: str = "new") -> float | None:
        """The harmonic mean of the mean ``base`` and mean ``new`` (CoCoOp's: not the mean of per-seed HMs)."""
        if base not in self.means or new not in self.means:
            return None
        return harmonic_mean(self.means[base], self.means[new])


def protocol_keys(protocol: str) -> tuple[str, ...]:
    """The fields averaged over seeds for ``protocol`` (``test_accuracy`` for one this report does not know)."""
    return PROTOCOL_KEYS.get(protocol, ("test_accuracy",))


def summarize_rows(rows: Sequence[Mapping[str, Any]]) -> list[Summary]:
    """Mean ± population std over seeds per (backbone, protocol, dataset, target, variant, shots), in first-seen
    order; a field missing (None) in a seed's result leaves that seed out of that field's mean."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        key = (row["backbone"], row["protocol"], row["dataset"], row["target"], variant_key(row), row["shots"])
        groups.setdefault(key, []).append(row)
    out = []
    for (backbone, protocol, dataset, target, variant, shots), members in groups.items():
        members = sorted(members, key=lambda r: r["seed"])
        values: dict[str, dict[int, float]] = {}
        means: dict[str, float] = {}
        stds: dict[str, float | None] = {}
        for key in protocol_keys(protocol):
            per_seed = {r["seed"]: r[key] for r in members if r.get(key) is not None}
            if not per_seed:
                continue
            values[key] = per_seed
            means[key], stds[key] = mean_std(list(per_seed.values()))
        eces = [r["test_ece_after"] for r in members if r.get("test_ece_after") is not None]
        before = [r["test_ece_before"] for r in members if r.get("test_ece_before") is not None]
        out.append(
            Summary(
                backbone, protocol, dataset, target, variant, shots, [r["seed"] for r in members], means, stds, values,
                _mean(eces), _mean(before), [dataset],
            )
        )  # fmt: skip
    return out


def average_summaries(summaries: Sequence[Summary]) -> list[Summary]:
    """The average over datasets per (backbone, protocol, variant, shots), for the few-shot and base-to-new protocols.

    When all 11 standard datasets (:data:`STANDARD_DATASETS`) are present, the average is over exactly those 11 (the
    11-dataset average papers report; other datasets are left out of it). Otherwise it is over the datasets present,
    two at least, and ``datasets`` names them so the table can say so. The mean is the mean of the datasets' seed
    means; its std is the population std over seeds of the per-seed averages, when every dataset has the same seeds
    (else None). For base-to-new, base and new are averaged and the HM is taken of those averages (CoCoOp's 11-dataset
    row, ``datasets_and_protocols.md`` §9)."""
    groups: dict[tuple, list[Summary]] = {}
    for s in summaries:
        if s.target is None and (s.protocol == "fewshot" or s.protocol in BASE2NEW_PROTOCOLS):
            groups.setdefault((s.backbone, s.protocol, s.variant, s.shots), []).append(s)
    out = []
    for (backbone, protocol, variant, shots), members in groups.items():
        by_dataset = {s.dataset: s for s in members}
        if set(STANDARD_DATASETS) <= set(by_dataset):
            used = [by_dataset[d] for d in STANDARD_DATASETS]
        elif len(by_dataset) >= 2:
            used = list(by_dataset.values())
        else:
            continue
        aligned = all(s.seeds == used[0].seeds for s in used)
        values: dict[str, dict[int, float]] = {}
        means: dict[str, float] = {}
        stds: dict[str, float | None] = {}
        for key in protocol_keys(protocol):
            if not all(key in s.means for s in used):
                continue
            means[key] = sum(s.means[key] for s in used) / len(used)
            stds[key] = None
            if aligned and all(set(s.values[key]) == set(used[0].seeds) for s in used):
                values[key] = {seed: sum(s.values[key][seed] for s in used) / len(used) for seed in used[0].seeds}
                stds[key] = mean_std(list(values[key].values()))[1]
        eces = [s.ece for s in used if s.ece is not None]
        before = [s.ece_before for s in used if s.ece_before is not None]
        seeds = used[0].seeds if aligned else sorted({seed for s in used for seed in s.seeds})
        out.append(
            Summary(
                backbone, protocol, AVERAGE, None, variant, shots, list(seeds), means, stds, values,
                _mean(eces) if len(eces) == len(used) else None,
                _mean(before) if len(before) == len(used) else None,
                [s.dataset for s in used],
            )
        )  # fmt: skip
    return out


def is_eleven(summary: Summary) -> bool:
    """True for the average over exactly the 11 standard datasets."""
    return summary.dataset == AVERAGE and tuple(summary.datasets) == STANDARD_DATASETS


def average_label(summary: Summary) -> str:
    """``Average (11 datasets)`` or ``Average of N datasets (not the 11): a, b``."""
    if is_eleven(summary):
        return "Average (11 datasets)"
    return f"Average of {len(summary.datasets)} datasets (not the 11): {', '.join(summary.datasets)}"
