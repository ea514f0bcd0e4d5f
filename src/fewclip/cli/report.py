"""``fewclip report``: tables, plots, a CSV and (``--html``) one self-contained page from results folders."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import CLIError


def parse_published_as(items: list[str] | None) -> dict[str, str]:
    """``SLUG=NAME`` pairs (``RN50-mycopy=RN50``) → {backbone folder name: published backbone name}."""
    out = {}
    for item in items or []:
        slug, sep, name = item.partition("=")
        if not sep or not slug or not name:
            raise CLIError(f"--published-as expects BACKBONE=NAME, got {item!r} (example: --published-as RN50-x=RN50).")
        out[slug] = name
    if out:
        from ..protocols.published import load_published

        known = sorted({p.backbone for p in load_published(include_unconfirmed=True)})
        unknown = [name for name in out.values() if name not in known]
        if unknown:
            raise CLIError(f"--published-as: no published numbers for {', '.join(unknown)}; valid: {', '.join(known)}.")
    return out


def cmd_report(args: argparse.Namespace) -> int:
    from ..protocols.report_doc import write_report

    out = Path(args.out) if args.out else Path(args.results[0]) / "report"
    files = write_report(
        args.results,
        out,
        html_page=args.html,
        published=args.published,
        include_unconfirmed=args.include_unconfirmed,
        backbones=args.backbone,
        published_as=parse_published_as(args.published_as),
        plots=not args.no_plots,
    )
    c = files.collection
    print(
        f"{len(c.rows)} result(s) in {files.sections} table section(s); {len(c.failed)} failed, "
        f"{len(c.skipped)} file(s) skipped, {len(c.duplicates)} duplicate(s) left out."
    )
    print(f"wrote {files.csv}")
    print(f"wrote {files.markdown}")
    if files.html is not None:
        print(f"wrote {files.html}")
    if files.plots:
        print(f"wrote {len(files.plots)} plot file(s) under {out / 'plots'}")
    for path, reason in c.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    for path, error in c.failed:
        print(f"failed result {path}: {error}", file=sys.stderr)
    for path, kept in c.duplicates:
        print(f"duplicate {path}: the same cell as {kept} (used)", file=sys.stderr)
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``fewclip report`` on the sub-parsers object of the main parser."""
    p = subparsers.add_parser(
        "report",
        help="tables (Markdown), plots, a CSV and an HTML page from results folders, beside published numbers",
        description="Read every result JSON under RESULTS (folders written by fewclip run or fewclip sweep) and write "
        "results.csv (one row per result), report.md (mean ± population std over seeds per dataset, method and shots, "
        "the 11-dataset average, base/new/HM, many/medium/few, ECE, published numbers side by side with the "
        "difference) and accuracy-vs-shots plots. Corrupt or foreign JSON files are listed, not fatal.",
    )
    p.add_argument("results", nargs="+", metavar="RESULTS", help="results folder(s) (the --out of fewclip run)")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default: RESULTS/report)")
    p.add_argument(
        "--html", action="store_true", help="also write report.html: one page, plots inline, viewable offline"
    )
    p.add_argument(
        "--published",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare with the published numbers fewclip ships (each with its source); default on",
    )
    p.add_argument(
        "--include-unconfirmed",
        action="store_true",
        help="also compare with published numbers the specs mark unconfirmed (recollections, rough plot read-offs)",
    )
    p.add_argument("--backbone", nargs="+", metavar="NAME", help="only these backbones (their results folder names)")
    p.add_argument(
        "--published-as",
        action="append",
        metavar="BACKBONE=NAME",
        help="compare BACKBONE (a results folder name) with the published numbers of NAME (RN50, ViT-B/16, ...), "
        "e.g. for OpenAI weights loaded from a local file",
    )
    p.add_argument("--no-plots", action="store_true", help="tables and CSV only (no matplotlib needed)")
    p.set_defaults(func=cmd_report)
