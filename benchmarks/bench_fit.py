"""Fit + search seconds and peak memory per method on synthetic bundles of published shapes.

    python benchmarks/bench_fit.py                       # 100 classes x 16 shots, D=1024, 10 views, 1,600 val
    python benchmarks/bench_fit.py --imagenet            # 1,000 classes, 4,000 val, APE's ImageNet grid
    python benchmarks/bench_fit.py --methods ape --classes 200

Each (shape, method) runs in a fresh subprocess, so "peak MB" is that process's maximum resident set size
(bundle generation included; the bundle's own size is printed for reference). Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

# The published grids: APE default 200x20x20, APE ImageNet 200x20x5, Tip-Adapter 200x20, GDA 7 values.
# Tip-Adapter-F and APE-T train their published 20 epochs, then search the 200x20 (alpha, beta) grid.
GRIDS = {
    "published": {
        "ape": {"search_step": [200, 20, 20]},
        "tip-adapter": {"search_step": [200, 20]},
        "tip-adapter-f": {"search_step": [200, 20], "epochs": 20},
        "ape-t": {"search_step": [200, 20], "epochs": 20},
    },
    "imagenet": {
        "ape": {"preset": "imagenet"},
        "tip-adapter": {"preset": "imagenet"},
        "tip-adapter-f": {"preset": "imagenet"},
        "ape-t": {"preset": "imagenet"},
    },
}
DEFAULT_METHODS = ["zero-shot", "tip-adapter", "ape", "gda", "linear-probe", "tip-adapter-f", "ape-t", "clip-adapter"]


def worker(args: argparse.Namespace) -> None:
    from fewclip import methods
    from fewclip.features.synthetic import make_synthetic_bundle

    t0 = time.perf_counter()
    # val and test sizes are rounded up to whole rows per class
    bundle = make_synthetic_bundle(
        classes=args.classes,
        shots=args.shots,
        dim=args.dim,
        views=args.views,
        val_per_class=-(-args.val // args.classes),
        test_per_class=-(-args.test // args.classes),
        seed=1,
        within=args.within,
        text_noise=args.text_noise,
    )
    gen_s = time.perf_counter() - t0

    params = dict(GRIDS[args.grid].get(args.method, {}))
    preset = params.pop("preset", None)
    model = methods.create(args.method, preset=preset, **params)
    t1 = time.perf_counter()
    model.fit(bundle)
    fit_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    acc = model.score(bundle.test_features, bundle.test_labels)
    pred_s = time.perf_counter() - t2
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    search = getattr(model, "search_", {})
    print(
        json.dumps(
            {
                "method": args.method,
                "fit_s": fit_s,
                "predict_s": pred_s,
                "gen_s": gen_s,
                "peak_mb": peak_mb,
                "evaluations": search.get("evaluations"),
                "epochs": len(getattr(model, "history_", [])) or None,
                "test_acc": acc,
                "val_acc": model.val_accuracy_,
                "bundle_mb": sum(t.numel() * 4 for t in (bundle.support_features, bundle.val_features)) / 2**20,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--val", type=int, default=1600)
    p.add_argument("--test", type=int, default=3000)
    p.add_argument("--within", type=float, default=3.5, help="within-class noise (difficulty; see synthetic.py)")
    p.add_argument("--text-noise", type=float, default=1.5, help="text noise (zero-shot difficulty)")
    p.add_argument("--grid", choices=sorted(GRIDS), default="published")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--imagenet", action="store_true", help="1,000 classes, 4,000 val rows, the APE ImageNet grid")
    p.add_argument("--method", help=argparse.SUPPRESS)  # worker mode
    args = p.parse_args()
    if args.imagenet:
        args.classes, args.val, args.test, args.grid = 1000, 4000, 10000, "imagenet"
        if args.methods == p.get_default("methods"):
            args.methods = ["zero-shot", "tip-adapter", "ape", "gda", "tip-adapter-f", "ape-t"]
    if args.method:
        worker(args)
        return

    print(
        f"shape: {args.classes} classes x {args.shots} shots, D={args.dim}, V={args.views}, "
        f"{args.val} val, {args.test} test rows; grid '{args.grid}'; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    header = f"{'method':14s} {'evaluations':>11s} {'epochs':>6s} {'fit+search s':>12s} {'predict s':>9s}"
    header += f" {'peak MB':>8s} {'val %':>6s} {'test %':>6s}"
    print(header)
    print("-" * len(header))
    for method in args.methods:
        cmd = [sys.executable, __file__, "--method", method, "--classes", str(args.classes), "--shots", str(args.shots)]
        cmd += ["--dim", str(args.dim), "--views", str(args.views), "--val", str(args.val), "--test", str(args.test)]
        cmd += ["--grid", args.grid, "--within", str(args.within), "--text-noise", str(args.text_noise)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{method:14s} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        val = "n/a" if r["val_acc"] is None else f"{r['val_acc']:.1f}"
        print(
            f"{method:14s} {r['evaluations'] or '-':>11} {r['epochs'] or '-':>6} {r['fit_s']:12.2f} "
            f"{r['predict_s']:9.2f} {r['peak_mb']:8.0f} {val:>6s} {r['test_acc']:6.1f}"
        )
    print("peak MB: maximum resident set of the worker process, bundle included.")


if __name__ == "__main__":
    main()
