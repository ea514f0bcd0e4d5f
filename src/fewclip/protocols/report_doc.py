"""``fewclip report``'s document: the tables (per dataset, the average over datasets, base/new/HM, many/medium/few,
transfer, published numbers side by side), rendered as Markdown and as one self-contained HTML page, the plots, the
CSV; :func:`write_report` writes them all."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.registry import dataset_info
from ..errors import FewclipError, OutputError, ResultsError
from ..io import atomic_write_text
from .published import Published, load_published, matches, published_backbone, published_notes
from .report import (
    AVERAGE,
    BASE2NEW_PROTOCOLS,
    STANDARD_DATASETS,
    Collection,
    Summary,
    average_label,
    average_summaries,
    collect_results,
    csv_text,
    is_eleven,
    summarize_rows,
)

PROTOCOL_ORDER = ("fewshot", "base2new", "base2new-imbalanced", "longtail", "transfer")
PROTOCOL_TEXT = {
    "fewshot": "all-class few-shot: top-1 test accuracy (%)",
    "base2new": "base-to-new (CoCoOp): fit on the base classes; base scored within the base columns, new within the "
    "new columns (%); HM = 2BN/(B + N) of the seed-averaged B and N (CoCoOp's convention, not the mean of per-seed "
    "HMs); -all: the same images scored over all classes",
    "base2new-imbalanced": "imbalanced base-to-new (Candle): as base-to-new, the base support long-tailed (%)",
    "longtail": "long-tailed (ImageNet-LT, Places-LT): top-1 overall and by training count: many (> 100), medium "
    "(20-100), few (< 20) (%); cap = shots per class (all: the whole list)",
    "transfer": "transfer: fitted on the source, scored on each target: top-1 (%)",
}
CONVENTIONS = (
    "Each cell is the mean ± population standard deviation (ddof 0, as CoOp's parse_test_res.py) over the seeds "
    "listed; 'seeds' is their number. 'ECE' is the test expected calibration error (%) after the temperature each "
    "method fitted on validation data (or 1 without it), the mean over seeds. 'selected on' is how the "
    "hyperparameters were chosen: val (fewshot) / val (full) on that validation split, cv by cross-validation on the "
    "support images, none for fixed values (the defaults, or 'preset P': a published setting used as it is, which "
    "its authors may have tuned on test data), test-tuned for a result that used test data; results that differ in "
    "it are never averaged together. The 11-dataset average is the mean over CoOp's 11 datasets of each dataset's "
    "seed mean, shown only when all 11 are present; otherwise the average over the datasets present is labelled "
    "with their number and names and never compared with a published 11-dataset average. Its ± is the std over "
    "seeds of the per-seed averages (blank when the datasets' seeds differ)."
)


# --------------------------------------------------------------------------- document blocks


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


@dataclass
class Plot:
    png: Path
    svg: Path
    caption: str


Block = tuple[str, Any]  # ("h1" | "h2" | "h3" | "p" | "list", text or items), ("table", Table), ("plots", [Plot])


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block], base: Path) -> str:
    """The blocks as GitHub-flavoured Markdown; plots as images linked relative to ``base`` (the report folder)."""
    out: list[str] = []
    for kind, payload in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {payload}\n")
        elif kind == "p":
            out.append(f"{payload}\n")
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in payload) + "\n")
        elif kind == "table":
            t: Table = payload
            lines = ["| " + " | ".join(_md_cell(h) for h in t.header) + " |", "|" + "---|" * len(t.header)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
            out.append("\n".join(lines) + "\n")
            out.extend(f"_{note}_\n" for note in t.notes)
        elif kind == "plots":
            for plot in payload:
                png, svg = plot.png.relative_to(base).as_posix(), plot.svg.relative_to(base).as_posix()
                out.append(f"![{plot.caption}]({png}) ([SVG]({svg}))\n")
    return "\n".join(out)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; white-space: nowrap; }
th { background: #f0f0f0; } tr:nth-child(even) td { background: #fafafa; }
p.note { font-size: 0.85em; color: #555; font-style: italic; margin: 0.2em 0; }
figure { display: inline-block; margin: 0.5em; } img { max-width: 100%; }
"""


def to_html(blocks: Sequence[Block], title: str) -> str:
    """The blocks as one self-contained HTML page: inline style, tables, and the plots embedded as base64 PNG, so it
    opens offline and nothing refers to another file or address."""
    e = html.escape
    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>",
           f"<style>{STYLE}</style></head><body>"]  # fmt: skip
    for kind, payload in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{e(payload)}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(payload)}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in payload) + "</ul>")
        elif kind == "table":
            t: Table = payload
            head = "".join(f"<th>{e(h)}</th>" for h in t.header)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in t.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            out.extend(f'<p class="note">{e(note)}</p>' for note in t.notes)
        elif kind == "plots":
            for plot in payload:
                data = base64.b64encode(plot.png.read_bytes()).decode("ascii")
                out.append(
                    f'<figure><img alt="{e(plot.caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{e(plot.caption)}</figcaption></figure>"
                )
    out.append("</body></html>\n")
    return "\n".join(out)


# --------------------------------------------------------------------------- table cells


def fmt_mean_std(mean: float | None, std: float | None) -> str:
    """``71.23 ± 0.45``; the mean alone when there is no std; ``–`` when there is no value."""
    if mean is None:
        return "–"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def fmt_value(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def fmt_delta(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def dataset_name(key: str) -> str:
    """The display name of a registered dataset (``Caltech101``), else the key."""
    try:
        return dataset_info(key).display
    except FewclipError:
        return key


#: the order methods are listed in (others follow, alphabetically): baselines, training-free, trained, image methods
METHOD_ORDER = (
    "zero-shot", "linear-probe", "tip-adapter", "tip-adapter-f", "ape", "ape-t", "gda", "clip-adapter", "lp++",
    "clap", "proker", "candle", "clip-ft", "clip-lora", "flier",
)  # fmt: skip


def method_order(methods: Iterable[str]) -> list[str]:
    """The methods present, in :data:`METHOD_ORDER`, then the others alphabetically."""
    present = set(methods)
    known = [m for m in METHOD_ORDER if m in present]
    return known + sorted(present - set(known))


def _dataset_order(key: str) -> tuple[int, str]:
    return (STANDARD_DATASETS.index(key), key) if key in STANDARD_DATASETS else (len(STANDARD_DATASETS), key)


def row_label(s: Summary) -> str:
    if s.dataset == AVERAGE:
        return average_label(s)
    name = dataset_name(s.dataset)
    return f"{name} → {dataset_name(s.target)}" if s.target else name


def _sorted(summaries: Iterable[Summary], methods: Sequence[str]) -> list[Summary]:
    def key(s: Summary) -> tuple:
        place = (1, (0, "")) if s.dataset == AVERAGE else (0, _dataset_order(s.dataset))
        return (place, s.target or "", methods.index(s.variant[0]), s.name, s.selected_on, s.shots)

    return sorted(summaries, key=key)


def _shots_text(s: Summary) -> str:
    return "all" if s.protocol == "longtail" and s.shots == 0 else str(s.shots)


def results_table(summaries: Sequence[Summary], protocol: str) -> Table:
    """One row per (dataset, method variant, shots): the protocol's fields (mean ± std), seeds, ECE."""
    lead = ["dataset", "method", "selected on", "cap" if protocol == "longtail" else "shots"]
    if protocol in BASE2NEW_PROTOCOLS:
        fields = ["base", "new", "HM", "base-all", "new-all", "HM-all"]
    elif protocol == "longtail":
        fields = ["overall", "many", "medium", "few"]
    else:
        fields = ["top-1"]
    rows = []
    for s in summaries:
        m, sd = s.means, s.stds
        if protocol in BASE2NEW_PROTOCOLS:
            cells = [
                fmt_mean_std(m.get("base"), sd.get("base")),
                fmt_mean_std(m.get("new"), sd.get("new")),
                fmt_value(s.hm()),
                fmt_mean_std(m.get("base_all_classes"), sd.get("base_all_classes")),
                fmt_mean_std(m.get("new_all_classes"), sd.get("new_all_classes")),
                fmt_value(s.hm("base_all_classes", "new_all_classes")),
            ]
        elif protocol == "longtail":
            cells = [fmt_mean_std(m.get(k), sd.get(k)) for k in ("test_accuracy", "many", "medium", "few")]
        else:
            cells = [fmt_mean_std(m.get("test_accuracy"), sd.get("test_accuracy"))]
        rows.append([row_label(s), s.name, s.selected_on, _shots_text(s), *cells, str(s.n), fmt_value(s.ece)])
    return Table([*lead, *fields, "seeds", "ECE"], rows)


def overview_table(averages: Sequence[Summary]) -> Table:
    """The average over datasets, one row per method variant and one column per shot count (top-1 or HM)."""
    shots = sorted({s.shots for s in averages})
    base2new = any(s.protocol in BASE2NEW_PROTOCOLS for s in averages)
    cell = {(s.variant, s.shots): s for s in averages}
    rows = []
    for variant in dict.fromkeys(s.variant for s in averages):
        line = [next(s.name for s in averages if s.variant == variant), variant[3]]
        for k in shots:
            s = cell.get((variant, k))
            if s is None:
                line.append("–")
            elif base2new:
                line.append(fmt_value(s.hm()))
            else:
                line.append(fmt_mean_std(s.means.get("test_accuracy"), s.stds.get("test_accuracy")))
        rows.append(line)
    what = "HM" if base2new else "top-1"
    return Table(["method", "selected on", *(f"{k}-shot {what}" for k in shots)], rows)


# --------------------------------------------------------------------------- published numbers side by side

_FIELD_TEXT = {"test_accuracy": "top-1", "base": "base", "new": "new", "harmonic_mean": "HM"}


def _ours(s: Summary, key: str) -> float | None:
    return s.hm() if key == "harmonic_mean" else s.means.get(key)


def _published_text(p: Published) -> str:
    return p.text + (" (unconfirmed)" if p.status == "unconfirmed" else "")


def comparison_tables(
    summaries: Sequence[Summary], backbone: str | None, published: Sequence[Published], protocol: str
) -> tuple[Table | None, Table | None, list[str]]:
    """(ours beside every matching published number with the difference, the published numbers of methods not run
    here on the datasets present, the sources the two tables cite as [n]: the source, how the publication selected
    its hyperparameters, the spec section). Only a dataset's own row or the 11-dataset average is compared (a partial
    average is not the published average); a number that does not depend on shots (zero-shot) is compared once, at
    the smallest shot count."""
    if backbone is None:
        return None, None, []
    cited: dict[tuple[str, str, str], int] = {}

    def cite(p: Published) -> str:
        key = (p.source, p.published_selection, p.spec)
        cited.setdefault(key, len(cited) + 1)
        return f"[{cited[key]}]"

    smallest: dict[tuple, int] = {}
    for s in summaries:
        group = (s.dataset, s.target, s.variant)
        smallest[group] = min(smallest.get(group, s.shots), s.shots)
    rows = []
    for s in summaries:
        if s.target is not None or (s.dataset == AVERAGE and not is_eleven(s)):
            continue
        for p in matches(published, s.method, backbone, protocol, s.dataset, s.shots):
            if p.shots is None and s.shots != smallest[s.dataset, s.target, s.variant]:
                continue
            ours = _ours(s, p.key)
            ours_text = fmt_value(ours) if p.key == "harmonic_mean" else fmt_mean_std(ours, s.stds.get(p.key))
            rows.append([
                row_label(s), s.name, s.selected_on, str(s.shots), _FIELD_TEXT.get(p.key, p.key),
                f"{ours_text} ({s.n} seed{'s' if s.n != 1 else ''})", _published_text(p),
                fmt_delta(None if ours is None else ours - p.value), cite(p),
            ])  # fmt: skip
    ran = {s.method for s in summaries}
    datasets = {s.dataset for s in summaries if s.dataset != AVERAGE}
    if any(is_eleven(s) for s in summaries):
        datasets.add(AVERAGE)
    refs: dict[tuple, list[Published]] = {}
    for p in published:
        if p.backbone == backbone and p.protocol == protocol and p.dataset in datasets and p.method not in ran:
            refs.setdefault((p.method, p.dataset, p.source, p.key), []).append(p)
    ref_rows = [
        [
            "Average (11 datasets)" if dataset == AVERAGE else dataset_name(dataset), ps[0].display,
            _FIELD_TEXT.get(key, key),
            ", ".join(f"{'any' if p.shots is None else p.shots}: {_published_text(p)}" for p in ps), cite(ps[0]),
        ]
        for (method, dataset, source, key), ps in sorted(refs.items(), key=lambda kv: (_dataset_order(kv[0][1]), kv[0]))
    ]  # fmt: skip
    head = ["dataset", "method", "selected on", "shots", "field", "ours", "published", "Δ (ours − published)", "source"]
    table = Table(head, rows) if rows else None
    ref_table = (
        Table(["dataset", "method", "field", "published (shots: value)", "source"], ref_rows) if ref_rows else None
    )
    sources = [
        f"[{n}] {source}. Published selection: {selection}. (fewclip spec: {spec})"
        for (source, selection, spec), n in cited.items()
    ]
    return table, ref_table, sources


# --------------------------------------------------------------------------- plots


def _series(summaries: Sequence[Summary], backbone: str | None, published: Sequence[Published], protocol: str):
    from .plots import Series

    groups: dict[tuple, list[Summary]] = {}
    for s in summaries:
        groups.setdefault(s.variant, []).append(s)
    out = []
    for _, members in groups.items():
        members = sorted(members, key=lambda s: s.shots)
        mean, low, high = [], [], []
        for s in members:
            m = s.means.get("test_accuracy")
            per_seed = list(s.values.get("test_accuracy", {}).values()) or [m]
            mean.append(m)
            low.append(min(per_seed))
            high.append(max(per_seed))
        points = []
        if backbone is not None and (members[0].dataset != AVERAGE or is_eleven(members[0])):
            for s in members:
                found = [p for p in matches(published, s.method, backbone, protocol, s.dataset, s.shots)
                         if p.key == "test_accuracy"]  # fmt: skip
                if found:
                    points.append((s.shots, found[0].value))
        out.append(Series(members[0].name, [s.shots for s in members], mean, low, high, points))
    return out


def plot_blocks(summaries: Sequence[Summary], folder: Path, backbone: str, published_name: str | None,
                published: Sequence[Published]) -> list[Plot]:  # fmt: skip
    """Accuracy-vs-shots plots (PNG and SVG) of a few-shot section: one per dataset and one for the average."""
    from .plots import SPREAD, plot_accuracy_vs_shots

    by_dataset: dict[str, list[Summary]] = {}
    for s in summaries:
        if s.target is None and s.means.get("test_accuracy") is not None:
            by_dataset.setdefault(s.dataset, []).append(s)
    plots = []
    for dataset in sorted(by_dataset, key=lambda d: (d == AVERAGE, _dataset_order(d))):
        members = by_dataset[dataset]
        label = average_label(members[0]) if dataset == AVERAGE else dataset_name(dataset)
        title = f"{label} · {backbone}"
        if len(title) > 90:
            title = title[:87] + "..."
        stem = folder / ("average" if dataset == AVERAGE else dataset)
        series = _series(members, published_name, published, "fewshot")
        png, svg = plot_accuracy_vs_shots(series, title, stem)
        plots.append(Plot(png, svg, f"{label}, {backbone}: top-1 vs shots, mean over seeds, shaded {SPREAD}"))
    return plots


# --------------------------------------------------------------------------- the whole report


@dataclass
class ReportFiles:
    """What :func:`write_report` wrote, and what it read."""

    csv: Path
    markdown: Path
    html: Path | None
    plots: list[Path]
    collection: Collection
    sections: int


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; a failed write is one :class:`OutputError` naming the file."""
    try:
        return atomic_write_text(path, text)
    except OSError as exc:
        raise OutputError(
            f"{path}: could not write ({exc.strerror or exc}); make the folder writable or pass another --out."
        ) from exc


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "_"


def published_blocks(
    summaries: Sequence[Summary],
    backbone: str,
    pub_name: str | None,
    protocol: str,
    numbers: Sequence[Published],
    hidden: Sequence[Published],
) -> list[Block]:
    """The 'published numbers side by side' part of one section: the comparison (``summaries`` in table order), the
    published numbers of methods not run, their sources, the notes of the methods' published files."""
    blocks: list[Block] = [("h3", "Published numbers side by side")]
    if pub_name is None:
        text = (
            f"{backbone} is not an OpenAI CLIP model the published tables use (open_clip with --pretrained openai, "
            f"or a transformers openai/clip-vit-* id), so nothing is compared. If it is one, pass --published-as "
            f"{backbone}=RN50 (or ViT-B/16, ...)."
        )
        return [*blocks, ("p", text)]
    table, refs, sources = comparison_tables(summaries, pub_name, numbers, protocol)
    text = (
        f"Compared as CLIP {pub_name}. Δ = ours − published. The published numbers were mostly produced under other "
        "protocols (one seed, the full validation split, ImageNet tuned on test: see each source's selection below), "
        "so expect honest numbers somewhat below them."
    )
    blocks.append(("p", text))
    if table is not None:
        blocks.append(("table", table))
    else:
        blocks.append(("p", f"No published number for these methods, datasets and shots with {pub_name}."))
    if refs is not None:
        blocks += [("p", "Published numbers of methods not in these results (for reference):"), ("table", refs)]
    if sources:
        blocks += [("p", "Sources ('≈': read off a figure):"), ("list", sources)]
    notes = published_notes()
    methods = method_order(s.method for s in summaries)
    listed = [f"{m}: {notes[m]}" for m in methods if notes.get(m)]
    n_hidden = sum(p.backbone == pub_name and p.protocol == protocol for p in hidden)
    if n_hidden:
        listed.append(
            f"{n_hidden} unconfirmed published number(s) for {pub_name} left out (--include-unconfirmed shows them, "
            "marked)."
        )
    if listed:
        blocks += [("p", "About the published numbers of these methods:"), ("list", listed)]
    return blocks


def build_blocks(
    collection: Collection,
    out: Path,
    *,
    published: bool = True,
    include_unconfirmed: bool = False,
    published_as: Mapping[str, str] | None = None,
    plots: bool = True,
) -> tuple[list[Block], list[Path], int]:
    """The report's blocks (and the plots, written under ``out``/plots), the plot files, the number of sections."""
    rows = collection.rows
    summaries = summarize_rows(rows)
    averages = average_summaries(summaries)
    numbers = load_published(include_unconfirmed) if published else []
    hidden = [] if include_unconfirmed or not published else [
        p for p in load_published(True) if p.status == "unconfirmed"
    ]  # fmt: skip
    methods = method_order(r["method"] for r in rows)
    blocks: list[Block] = [("h1", "fewclip report")]
    blocks.append((
        "p",
        f"Read {', '.join(collection.folders)}: {len(rows)} result(s), {len(collection.failed)} failed, "
        f"{len(collection.skipped)} file(s) skipped as not results, "
        f"{len(collection.duplicates)} duplicate(s) left out.",
    ))  # fmt: skip
    blocks.append(("p", CONVENTIONS))
    files: list[Path] = []
    sections = 0
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    protocols = sorted({r["protocol"] for r in rows}, key=lambda p: (PROTOCOL_ORDER + (p,)).index(p))
    for backbone in backbones:
        first = next(r for r in rows if r["backbone"] == backbone)
        pub_name = published_backbone(first.get("model"), first.get("pretrained"), published_as, backbone)
        for protocol in protocols:
            mine = [s for s in summaries if s.backbone == backbone and s.protocol == protocol]
            if not mine:
                continue
            sections += 1
            avg = _sorted([s for s in averages if s.backbone == backbone and s.protocol == protocol], methods)
            blocks.append(("h2", f"{backbone} · {protocol}"))
            blocks.append(("p", PROTOCOL_TEXT.get(protocol, f"{protocol}: the result's accuracy fields (%)")))
            if avg:
                blocks.append(("h3", "Average over datasets"))
                overview = overview_table(avg)
                overview.notes.append(average_label(avg[0]) + ".")
                blocks.append(("table", overview))
            blocks.append(("h3", "Per dataset" if protocol != "transfer" else "Per source and target"))
            blocks.append(("table", results_table(_sorted(mine, methods) + avg, protocol)))
            if published and (protocol == "fewshot" or protocol == "base2new"):
                blocks += published_blocks(avg + _sorted(mine, methods), backbone, pub_name, protocol, numbers, hidden)
            if plots and protocol == "fewshot":
                folder = out / "plots" / _safe(backbone) / protocol
                made = plot_blocks(_sorted(mine, methods) + avg, folder, backbone, pub_name, numbers)
                if made:
                    blocks.append(("h3", "Accuracy vs shots"))
                    blocks.append(("plots", made))
                    files += [p for plot in made for p in (plot.png, plot.svg)]
    if collection.failed:
        blocks.append(("h2", "Failed results"))
        blocks.append(("list", [f"{path}: {error}" for path, error in collection.failed]))
    if collection.skipped:
        blocks.append(("h2", "Files skipped (not results this fewclip reads)"))
        blocks.append(("list", [f"{path}: {reason}" for path, reason in collection.skipped]))
    if collection.duplicates:
        blocks.append(("h2", "Duplicate results left out"))
        blocks.append(
            ("list", [f"{path}: the same cell as {kept}, which is used" for path, kept in collection.duplicates])
        )
    return blocks, files, sections


def write_report(
    folders: Sequence[str | Path],
    out: str | Path,
    *,
    html_page: bool = False,
    published: bool = True,
    include_unconfirmed: bool = False,
    backbones: Sequence[str] | None = None,
    published_as: Mapping[str, str] | None = None,
    plots: bool = True,
) -> ReportFiles:
    """Read the results under ``folders`` and write into ``out``: ``results.csv`` (every result), ``report.md`` (the
    tables), ``plots/<backbone>/fewshot/<dataset>.png|.svg`` and ``average.png|.svg`` (unless ``plots`` is False),
    and with ``html_page`` ``report.html`` (self-contained). Raises :class:`ResultsError` when the folders hold no
    result at all; corrupt or foreign JSON files are listed in the report, not raised."""
    out = Path(out)
    if plots:
        from .plots import require_matplotlib

        require_matplotlib()  # before any reading: the fix is an install
    collection = collect_results(folders, backbones)
    if not collection.rows and not collection.failed:
        skipped = f"; {len(collection.skipped)} JSON file(s) there are not results" if collection.skipped else ""
        raise ResultsError(
            f"no fewclip results under {', '.join(collection.folders)}{skipped} (fewclip run --out DIR writes "
            "them as DIR/<dataset>/<backbone>/<protocol>/<method>/shots_K-seed_S.json)."
        )
    try:
        blocks, files, sections = build_blocks(
            collection, out, published=published, include_unconfirmed=include_unconfirmed, published_as=published_as,
            plots=plots,
        )  # fmt: skip
    except OSError as exc:  # a plot file that could not be written
        raise OutputError(
            f"{exc.filename or out}: could not write ({exc.strerror or exc}); make the folder writable or pass another "
            "--out."
        ) from exc
    csv_path, md_path = out / "results.csv", out / "report.md"
    write_text(csv_path, csv_text(collection.rows))
    write_text(md_path, to_markdown(blocks, out))
    html_path = None
    if html_page:
        html_path = write_text(out / "report.html", to_html(blocks, "fewclip report"))
    return ReportFiles(csv_path, md_path, html_path, files, collection, sections)
