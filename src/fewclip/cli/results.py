"""``fewclip results confusion``: the confusion matrix of a saved result, from the predictions saved beside it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parsers(subparsers: Any) -> None:
    """Register ``fewclip results ...`` on the sub-parsers object of the main parser."""
    results = subparsers.add_parser("results", help="inspect saved results")
    rsub = results.add_subparsers(dest="results_command", required=True)
    conf = rsub.add_parser(
        "confusion",
        help="the row-normalised confusion matrix of one result: its largest confusions, or the matrix as a file",
    )
    conf.add_argument(
        "result", help="a result JSON written by fewclip run (it names its .predictions.safetensors beside it)"
    )
    conf.add_argument("--top", type=int, default=10, metavar="N", help="print the N largest confusions (default 10)")
    conf.add_argument("--out", metavar="FILE", help="write the [C, C] matrix (float32) and class names as safetensors")
    conf.set_defaults(func=cmd_confusion)


def cmd_confusion(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from ..io import atomic_write
    from ..protocols.results import result_confusion, writing

    matrix, names = result_confusion(Path(args.result))
    classes = matrix.shape[0]
    label = names if names is not None else [str(c) for c in range(classes)]
    scored = matrix.sum(dim=1) > 0
    diagonal = matrix.diagonal()[scored]
    print(f"{args.result}: {classes} classes, mean per-class accuracy {100 * float(diagonal.mean()):.2f}%")
    off = matrix.clone()
    off.fill_diagonal_(0.0)
    values, flat = off.flatten().topk(min(max(args.top, 0), off.numel()))
    for value, index in zip(values.tolist(), flat.tolist()):
        if value <= 0:
            break
        true, predicted = divmod(index, classes)
        print(f"  {100 * value:6.2f}%  {label[true]} -> {label[predicted]}")
    if args.out:
        out = Path(args.out)
        meta = {"format": "fewclip-confusion/1", "rows": "true class", "columns": "predicted class"}
        meta["classnames"] = "\n".join(label)
        with writing(out):  # a full disk or an unwritable folder: one line naming the file, no partial file
            atomic_write(out, lambda tmp: save_file({"confusion": matrix.to(torch.float32)}, str(tmp), metadata=meta))
        print(f"wrote {out}")
    return 0
