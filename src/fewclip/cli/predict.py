"""``fewclip predict MODEL INPUT...``: label new images with a classifier file (``fewclip run --save-models``)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import CLIError


def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
    top = row["top_k"]
    return {
        "path": row["path"],
        "class": row["class"] if row["class"] is not None else "",
        "probability": "" if row["probability"] is None else f"{row['probability']:.6g}",
        "top_k": ";".join(f"{name}:{p:.6g}" for name, p in top),
        "error": row["error"] or "",
    }


def write_rows(rows: list[dict[str, Any]], out: str | None) -> None:
    """Rows as CSV (``out`` ending .csv) or JSON lines (.jsonl, .json, or stdout when ``out`` is None)."""
    if out is None:
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    from ..io import atomic_write

    path = Path(out)
    suffix = path.suffix.lower()
    if suffix == ".csv":

        def writer(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, fieldnames=["path", "class", "probability", "top_k", "error"])
                w.writeheader()
                w.writerows(_csv_row(r) for r in rows)

    elif suffix in (".jsonl", ".json"):

        def writer(tmp: Path) -> None:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    else:
        raise CLIError(f"--out {out}: write .csv or .jsonl (JSON lines), got {suffix or 'no suffix'!r}.")
    atomic_write(path, writer)


def cmd_predict(args: argparse.Namespace) -> int:
    from ..protocols.deploy import image_paths, load_classifier

    if args.out is not None and Path(args.out).suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise CLIError(f"--out {args.out}: write .csv or .jsonl (JSON lines).")
    if args.top_k < 1:
        raise CLIError(f"--top-k must be ≥ 1, got {args.top_k}.")
    clf = load_classifier(args.model, pretrained=args.pretrained)
    paths = image_paths(args.inputs)
    if not paths:
        raise CLIError(f"no images in {', '.join(args.inputs)} (image suffixes: .jpg, .png, ...).")
    rows = clf.predict_images(
        paths, top_k=args.top_k, batch_size=args.batch_size, device=args.device, progress=not args.no_progress
    )
    write_rows(rows, args.out)
    bad = [r for r in rows if r["error"]]
    if bad:
        where = args.out if args.out else "stdout"
        listed = "\n".join(f"  {r['path']}: {r['error']}" for r in bad)
        print(
            f"fewclip predict: {len(bad)} of {len(rows)} image(s) unreadable; their rows in {where} have 'error' set:\n"
            f"{listed}",
            file=sys.stderr,
        )
        return 1
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="label new images with a classifier file (written by fewclip run --save-models)"
    )
    p.add_argument("model", help="a .classifier.safetensors file")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or .txt lists of paths")
    p.add_argument("--out", help="preds.csv or preds.jsonl (default: JSON lines on stdout)")
    p.add_argument("--top-k", type=int, default=5, help="classes listed per image (default 5)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument(
        "--pretrained",
        metavar="PATH",
        help="where the backbone's weights file (or local-dir: folder) is now, if it moved; its SHA-256 must still be "
        "the one stored in the classifier",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)
