"""Fit + search seconds, peak memory and a cost model per method on synthetic bundles of published shapes.

    python benchmarks/bench_fit.py                       # 100 classes x 16 shots, D=1024, 10 views, 1,600 val
    python benchmarks/bench_fit.py --hard                # the same shape, data on which most rows change arg-max
    python benchmarks/bench_fit.py --imagenet            # 1,000 classes, 4,000 val, APE's ImageNet grid
    python benchmarks/bench_fit.py --methods ape --classes 200
    python benchmarks/bench_fit.py --methods lp++ clap --dim 512 --threads 1   # LP++ and CLAP at their defaults

Each (shape, method) runs in a fresh subprocess, so "peak MB" is that process's maximum resident set size
(bundle generation included; the bundle's own size is printed for reference). "CPU s" is the process's CPU time
over the fit (all threads), "wall s" its wall time; "search" is the part spent in the hyperparameter search.

The cost model counts the work of a dense evaluation of the grid, done the cheapest way the maths allows:
multiply-adds (the affinity, the class-wise sums of every (β, γ) and one multiply-add per logit per grid point,
z + α·g) and exponentials (one per affinity entry per β); GDA's are its float64 covariance, Cholesky factor and
inverse. At one core's measured float32/float64 matmul and exp rates (timed at start, one thread) that work takes
"limit CPU s"; "% limit" is limit CPU s / fit CPU s (100 % = the fit costs no more CPU than the dense computation
at peak matmul speed; above 100 % is possible because the α axis is not evaluated densely). LP++'s and CLAP's are
the matrix products their training cannot avoid: per LP++ epoch the support logits and the W gradient (2·N·D·C) and
the validation logits (Mv·D·C); per CLAP step the logits and the prototype gradient of one batch (2·B·D·C), for
epochs·max(1, ⌊N/B⌋) steps, plus the zero-shot probabilities of the V·N views for λ. CPU seconds, not wall
seconds, are compared because they are what other work on a shared machine does not inflate much.
Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace

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
DEFAULT_METHODS = [
    "zero-shot",
    "tip-adapter",
    "ape",
    "gda",
    "linear-probe",
    "tip-adapter-f",
    "ape-t",
    "clip-adapter",
    "lp++",
    "clap",
]
# Generator settings. "hard": image-text cosines pushed down by a wider modality gap (gap 8 instead of 1.5), so the
# zero-shot margins are small next to the cache term and 40-60 % of the validation rows change their arg-max along
# the α grid at β ≥ 3 (about 10 % on the default data).
DATA = {
    "default": {"within": 3.5, "text_noise": 1.5, "shared": 1.0, "gap": 1.5},
    "hard": {"within": 3.5, "text_noise": 1.5, "shared": 1.0, "gap": 8.0},
}
CACHE_METHODS = {"ape", "tip-adapter", "tip-adapter-f", "ape-t"}


def measured_rates() -> dict[str, float]:
    """Multiply-adds per second of a large float32 and float64 matmul, and float32 exps per second, on one core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = {}
    for name, dtype, n in (("mac32", torch.float32, 2048), ("mac64", torch.float64, 1536)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        rates[name] = 3 * n**3 / (time.perf_counter() - t)
    x = torch.rand(1 << 24)
    out = torch.empty_like(x)
    torch.exp(x, out=out)
    t = time.perf_counter()
    for _ in range(3):
        torch.exp(x, out=out)
    rates["exp"] = 3 * x.numel() / (time.perf_counter() - t)
    torch.set_num_threads(threads)
    return rates


def cost_model(method: str, model, bundle) -> dict[str, float] | None:
    """Multiply-adds (float32, float64) and exps of a dense evaluation of the method's grid on ``bundle``."""
    m, c, d = bundle.val_features.shape[0], bundle.num_classes, bundle.dim
    if method in CACHE_METHODS:
        steps = [int(s) for s in model.search_step]
        b, a = steps[0], steps[1]
        g = steps[2] if len(steps) > 2 else 1
        n = bundle.num_support
        q = len(model.channels_) if getattr(model, "channels_", None) is not None else d
        macs = m * c * d + m * n * q + b * m * n * g + b * g * a * m * c
        return {"mac32": macs, "mac64": 0, "exp": b * m * n}
    if method == "gda":
        n = bundle.views * bundle.num_support
        a = len(model.alpha_grid)
        mac64 = n * d * d + d**3 / 3 + 2 * d**3 / 3 + c * d * d  # scatter, Cholesky, its inverse, P·μ
        return {"mac32": 2 * m * c * d + a * m * c, "mac64": mac64, "exp": 0}
    if method == "lp++":
        n, epochs = bundle.num_support, len(model.history_)
        small = min(n, d)
        # per epoch: support logits + W gradient + validation logits; once: the zero-shot cosines, the Gram matrix
        # and its eigenvalues (float64)
        mac32 = epochs * (2 * n * d * c + m * d * c) + (n + m) * d * c
        return {"mac32": mac32, "mac64": small * small * max(n, d) + 4 * small**3 / 3, "exp": epochs * n * c}
    if method == "clap":
        rows, steps, b = bundle.views * bundle.num_support, model.steps_, model.batch_size
        b = min(b, rows)
        mac32 = steps * 2 * b * d * c + rows * d * c  # per step: logits + gradient; once: λ's zero-shot logits
        return {"mac32": mac32, "mac64": 0, "exp": steps * b * c + rows * c}
    return None


def worker(args: argparse.Namespace) -> None:
    from fewclip import methods
    from fewclip.features.synthetic import make_synthetic_bundle
    from fewclip.methods import cache as cache_module
    from fewclip.methods import gda as gda_module

    if args.threads:
        torch.set_num_threads(args.threads)
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
        **DATA["hard" if args.hard else "default"],
    )
    if args.method == "clap":  # synthetic bundles have no raw text norms; the timing does not depend on them
        bundle = replace(bundle, text_norms=torch.ones(bundle.num_classes))
    gen_s = time.perf_counter() - t0

    # time the search inside the fit: the cache methods' grid search and GDA's α scan
    spent = {"wall": 0.0, "cpu": 0.0}

    def timed(function):
        def run(*a, **k):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return function(*a, **k)
            finally:
                spent["wall"] += time.perf_counter() - wall
                spent["cpu"] += time.process_time() - cpu

        return run

    cache_module.CacheMethod._search = timed(cache_module.CacheMethod._search)
    gda_module.count_correct_along_alpha = timed(gda_module.count_correct_along_alpha)

    params = dict(GRIDS[args.grid].get(args.method, {}))
    preset = params.pop("preset", None)
    if args.epochs is not None and "epochs" in methods.get_class(args.method).param_names():
        params["epochs"] = args.epochs
    model = methods.create(args.method, preset=preset, **params)
    t1, c1 = time.perf_counter(), time.process_time()
    model.fit(bundle)
    fit_s, fit_cpu = time.perf_counter() - t1, time.process_time() - c1
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
                "fit_cpu": fit_cpu,
                "search_s": spent["wall"],
                "search_cpu": spent["cpu"],
                "predict_s": pred_s,
                "gen_s": gen_s,
                "peak_mb": peak_mb,
                "evaluations": search.get("evaluations"),
                "epochs": len(getattr(model, "history_", [])) or None,
                "test_acc": acc,
                "val_acc": model.val_accuracy_,
                "cost": cost_model(args.method, model, bundle),
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
    p.add_argument("--hard", action="store_true", help="data on which most rows change arg-max along α (see DATA)")
    p.add_argument("--grid", choices=sorted(GRIDS), default="published")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--imagenet", action="store_true", help="1,000 classes, 4,000 val rows, the APE ImageNet grid")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads of the workers (default: torch's); 1 gives CPU seconds "
        "that other load on a shared machine inflates least",
    )
    p.add_argument(
        "--epochs",
        type=int,
        help="train the methods that have epochs for this many (a shorter timing run: LP++'s and CLAP's cost per "
        "epoch is constant, so their full run costs default/this times as much)",
    )
    p.add_argument("--method", help=argparse.SUPPRESS)  # worker mode
    args = p.parse_args()
    if args.imagenet:
        args.classes, args.val, args.test, args.grid = 1000, 4000, 10000, "imagenet"
        if args.methods == p.get_default("methods"):
            args.methods = ["zero-shot", "tip-adapter", "ape", "gda", "tip-adapter-f", "ape-t", "lp++", "clap"]
    if args.method:
        worker(args)
        return

    rates = measured_rates()
    print(
        f"shape: {args.classes} classes x {args.shots} shots, D={args.dim}, V={args.views}, "
        f"{args.val} val, {args.test} test rows; grid '{args.grid}'; data '{'hard' if args.hard else 'default'}'; "
        f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads"
    )
    print(
        f"measured on one core: float32 matmul {rates['mac32'] / 1e9:.1f} G multiply-adds/s, float64 "
        f"{rates['mac64'] / 1e9:.1f} G/s, exp {rates['exp'] / 1e9:.2f} G/s"
    )
    header = (
        f"{'method':14s} {'evals':>6s} {'ep':>3s} {'fit CPU s':>9s} {'fit wall s':>10s} {'search CPU s':>12s}"
        f" {'search wall s':>13s} {'G MAC':>7s} {'G exp':>6s} {'limit CPU s':>11s} {'% limit':>7s} {'peak MB':>7s}"
        f" {'val %':>5s} {'test %':>6s}"
    )
    print(header)
    print("-" * len(header))
    for method in args.methods:
        cmd = [sys.executable, __file__, "--method", method, "--classes", str(args.classes), "--shots", str(args.shots)]
        cmd += ["--dim", str(args.dim), "--views", str(args.views), "--val", str(args.val), "--test", str(args.test)]
        cmd += ["--grid", args.grid] + (["--hard"] if args.hard else [])
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--epochs", str(args.epochs)] if args.epochs is not None else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{method:14s} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        val = "n/a" if r["val_acc"] is None else f"{r['val_acc']:.1f}"
        cost = r.get("cost")
        if cost:
            limit = cost["mac32"] / rates["mac32"] + cost["mac64"] / rates["mac64"] + cost["exp"] / rates["exp"]
            model_cols = (
                f"{(cost['mac32'] + cost['mac64']) / 1e9:7.1f} {cost['exp'] / 1e9:6.2f} {limit:11.2f} "
                f"{100 * limit / r['fit_cpu']:6.0f}%"
            )
        else:
            model_cols = f"{'-':>7s} {'-':>6s} {'-':>11s} {'-':>7s}"
        searched = r["search_s"] > 0
        search_cpu = f"{r['search_cpu']:.2f}" if searched else "-"
        search_wall = f"{r['search_s']:.2f}" if searched else "-"
        print(
            f"{method:14s} {r['evaluations'] or '-':>6} {r['epochs'] or '-':>3} {r['fit_cpu']:9.2f} {r['fit_s']:10.2f} "
            f"{search_cpu:>12s} {search_wall:>13s} "
            f"{model_cols} {r['peak_mb']:7.0f} {val:>5s} {r['test_acc']:6.1f}"
        )
    print("CPU s: process CPU time (all threads); peak MB: maximum resident set of the worker, bundle included.")
    print("limit CPU s: the cost model's work at one core's measured rates; % limit: limit CPU s / fit CPU s.")


if __name__ == "__main__":
    main()
