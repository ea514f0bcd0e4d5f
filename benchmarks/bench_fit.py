"""Fit + search seconds, peak memory and a cost model per method on synthetic bundles of published shapes.

    python benchmarks/bench_fit.py                       # 100 classes x 16 shots, D=1024, 10 views, 1,600 val
    python benchmarks/bench_fit.py --hard                # the same shape, data on which most rows change arg-max
    python benchmarks/bench_fit.py --imagenet            # 1,000 classes, 4,000 val, APE's ImageNet grid
    python benchmarks/bench_fit.py --methods ape --classes 200
    python benchmarks/bench_fit.py --methods lp++ clap --dim 512 --threads 1   # LP++ and CLAP at their defaults
    python benchmarks/bench_fit.py --proker --threads 1  # ProKeR's grid: one factorisation per β vs one per point
    python benchmarks/bench_fit.py --proker --imagenet   # ImageNet shape: the memory refusal, then the fallback

ProKeR (``--proker``, D 512 and 1024 unless ``--dims``) is timed by its parts on the support points the shape gives:
building the kernel, one Cholesky solve of K/λ + I (what the released code does per grid point), one
eigendecomposition (what ``solver="eigen"`` does per β), and the λ axis of the eigen form (one batched product per
chunk of λ); then the search itself over ``--proker-betas`` β values of the λ axis of 10 and of 100 points, with each
solver, per β and per grid point, and the whole published grids (20 × 10 and 20 × 100) extrapolated from them. A
shape whose V·N kernel does not fit in memory prints the method's refusal and runs its ``support="auto"`` fallback.

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
        "proker": {"search_step": [20, 10]},
    },
    "imagenet": {
        "ape": {"preset": "imagenet"},
        "tip-adapter": {"preset": "imagenet"},
        "tip-adapter-f": {"preset": "imagenet"},
        "ape-t": {"preset": "imagenet"},
        "proker": {"preset": "imagenet"},
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


def synthetic_bundle(args: argparse.Namespace):
    """The benchmark's synthetic bundle for ``args`` (val and test sizes rounded up to whole rows per class)."""
    from fewclip.features.synthetic import make_synthetic_bundle

    return make_synthetic_bundle(
        classes=args.classes,
        shots=args.shots,
        dim=args.dim,
        views=args.views,
        val_per_class=-(-args.val // args.classes),
        test_per_class=-(-args.test // args.classes),
        seed=1,
        **DATA["hard" if args.hard else "default"],
    )


def worker(args: argparse.Namespace) -> None:
    from fewclip import methods
    from fewclip.features import synthetic  # noqa: F401  (imported before gen_s starts)
    from fewclip.methods import cache as cache_module
    from fewclip.methods import gda as gda_module

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bundle = synthetic_bundle(args)
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


def _timed(function, *args, repeat: int = 1):
    """(result, CPU seconds, wall seconds) of the fastest of ``repeat`` calls."""
    best = None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        out = function(*args)
        spent = (time.process_time() - cpu, time.perf_counter() - wall)
        best = spent if best is None or spent[0] < best[0] else best
    return out, best[0], best[1]


def proker_worker(args: argparse.Namespace) -> None:
    """One shape and D: the refusal (if any), the parts, the search per β and per point with each solver."""
    import torch.nn.functional as F

    from fewclip import methods
    from fewclip.errors import MethodError
    from fewclip.methods import proker

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = synthetic_bundle(args)
    out: dict = {"dim": args.dim, "refusal": None}
    params = dict(GRIDS[args.grid]["proker"])
    preset = params.pop("preset", None)
    support = args.proker_support
    try:  # the check fit runs first (the memory estimate), without fitting
        methods.create("proker", preset=preset, support=support, **params)._check(bundle.without_test())
    except MethodError as exc:
        out["refusal"] = str(exc)
        support = "auto"
    model = methods.create("proker", preset=preset, support=support, **params)
    support = model._resolve_support(bundle)
    points, labels, _ = model._points(bundle, support)
    dtype = model._dtype(points.shape[0])
    work = points.to(dtype)
    residual = proker.residual_targets(work, labels, bundle.text_weights)
    x = F.normalize(bundle.val_features, dim=-1)
    base, cosines = (x @ bundle.text_weights.T).to(dtype), x.to(dtype) @ work.T
    out.update(support=support, points=int(points.shape[0]), dtype=str(dtype).removeprefix("torch."))
    out["memory_gib"] = model._memory(bundle, points.shape[0]) / 2**30
    gram, out["kernel_s"], _ = _timed(proker.kernel, work, work, 2.0)
    _, out["solve_s"], _ = _timed(proker.proker_coefficients, gram, residual, 0.1, repeat=2)
    (sigma, q), out["eigh_s"], _ = _timed(torch.linalg.eigh, gram)
    projected, rotated = proker.kernel(x.to(dtype), work, 2.0) @ q, q.T @ residual
    lambdas = torch.linspace(0.001, 1.0, 100, dtype=torch.float64)
    filters = proker.eigen_filters(sigma, lambdas[:10])
    _, product_s, _ = _timed(proker.grid_logits, base, projected, rotated, filters, repeat=2)
    out["per_lambda_s"] = product_s / 10
    del gram, q, projected
    betas = torch.linspace(0.5, 3.0, args.proker_betas, dtype=torch.float64)
    for solver in ("eigen", "cholesky"):
        for steps in (10, 100):
            if solver == "cholesky" and steps == 100 and out["solve_s"] * 100 * args.proker_betas > args.proker_budget:
                continue  # extrapolated from the 10-point axis below
            grid = torch.linspace(0.001, 1.0, steps, dtype=torch.float64)
            _, cpu, wall = _timed(
                proker.grid_counts, work, residual, cosines, base, bundle.val_labels, betas, grid, proker.count_correct,
                None, solver,
            )  # fmt: skip
            out[f"{solver}_{steps}"] = {"cpu": cpu, "wall": wall, "per_beta": cpu / betas.numel()}
    if args.proker_fit:
        fitted = methods.create("proker", preset=preset, support=support, **params)
        _, out["fit_cpu"], out["fit_s"] = _timed(fitted.fit, bundle)
        out["search"] = fitted.search_
        out["val_acc"], out["test_acc"] = fitted.val_accuracy_, fitted.score(bundle.test_features, bundle.test_labels)
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def proker_main(args: argparse.Namespace, rates: dict[str, float]) -> None:
    print(
        f"ProKeR: {args.classes} classes x {args.shots} shots x {args.views} views, {args.val} val rows, grid "
        f"'{args.grid}'; {args.proker_betas} β timed per axis; {args.threads or torch.get_num_threads()} threads"
    )
    header = (
        f"{'D':>5s} {'support':>11s} {'N_S':>7s} {'dtype':>7s} {'GiB':>6s} {'solve s':>8s} {'eigh s':>8s} "
        f"{'eigh/solve':>10s} {'λ ms':>7s} {'eig/β 10λ':>9s} {'chol/β 10λ':>10s} {'eig/β 100λ':>10s} "
        f"{'chol/β 100λ':>11s} {'20x10 eig':>9s} {'20x10 chol':>10s} {'20x100 eig':>10s} {'20x100 chol':>11s} "
        f"{'peak MB':>7s}"
    )
    rows = []
    for dim in args.dims:
        cmd = [sys.executable, __file__, "--proker-worker", "--classes", str(args.classes), "--shots", str(args.shots)]
        cmd += ["--dim", str(dim), "--views", str(args.views), "--val", str(args.val), "--test", str(args.test)]
        cmd += ["--grid", args.grid, "--proker-betas", str(args.proker_betas), "--proker-support", args.proker_support]
        cmd += ["--proker-budget", str(args.proker_budget)] + (["--hard"] if args.hard else [])
        cmd += ["--proker-fit"] if args.proker_fit else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"D={dim} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if r["refusal"]:
            print(
                f"D={dim}, support='{args.proker_support}' refused:\n  {r['refusal']}\n"
                f"  -> support='auto' runs '{r['support']}'"
            )
        e10, c10, e100 = (r[k]["per_beta"] for k in ("eigen_10", "cholesky_10", "eigen_100"))
        c100 = r["cholesky_100"]["per_beta"] if "cholesky_100" in r else 10 * c10
        rows.append(
            f"{dim:5d} {r['support']:>11s} {r['points']:7d} {r['dtype']:>7s} {r['memory_gib']:6.2f} "
            f"{r['solve_s']:8.3f} {r['eigh_s']:8.3f} {r['eigh_s'] / r['solve_s']:10.1f} "
            f"{1e3 * r['per_lambda_s']:7.2f} {e10:9.2f} {c10:10.2f} {e100:10.2f} {c100:11.2f} "
            f"{20 * e10:9.1f} {20 * c10:10.1f} {20 * e100:10.1f} {20 * c100:11.1f} {r['peak_mb']:7.0f}"
        )
        s = r.get("search")
        if s:
            rows.append(
                f"      fit with the {args.grid} grid: solver '{s['solver']}', {s['evaluations']} points, "
                f"{s['factorisations']} factorisations, {r['fit_cpu']:.2f} CPU s ({r['fit_s']:.2f} wall s), peak "
                f"{r['peak_mb']:.0f} MB; val {r['val_acc']:.1f} %, test {r['test_acc']:.1f} %"
            )
    print(header)
    print("-" * len(header))
    print("\n".join(rows))
    print(
        "CPU seconds. solve: one Cholesky solve of K/λ + I with C right-hand sides (the released code's cost per grid "
        "point); eigh: one eigendecomposition of K (solver='eigen''s cost per β); λ ms: one λ of the eigen form's "
        "batched product; eig/β, chol/β: the measured search per β over a λ axis of 10 or 100 points (chol/β 100λ is "
        "10 × the 10-point one when running it would exceed --proker-budget); 20xL: the published grids' search, "
        "20 × per β."
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
    p.add_argument("--proker", action="store_true", help="ProKeR's grid search: its parts, per β and per grid point")
    p.add_argument("--dims", type=int, nargs="+", default=[512, 1024], help="--proker: the feature dimensions")
    p.add_argument("--proker-support", default="views", help="--proker: the support policy tried first")
    p.add_argument("--proker-fit", action="store_true", help="--proker: also time a whole fit with the grid")
    p.add_argument("--proker-betas", type=int, default=1, help="--proker: β values timed per λ axis")
    p.add_argument("--proker-budget", type=float, default=120.0, help="--proker: CPU s above which the 100-point "
                   "Cholesky axis is extrapolated from the 10-point one instead of run")  # fmt: skip
    p.add_argument("--method", help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--proker-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.imagenet:
        args.classes, args.val, args.test, args.grid = 1000, 4000, 10000, "imagenet"
        if args.methods == p.get_default("methods"):
            args.methods = ["zero-shot", "tip-adapter", "ape", "gda", "tip-adapter-f", "ape-t", "lp++", "clap"]
    if args.method:
        worker(args)
        return
    if args.proker_worker:
        proker_worker(args)
        return

    rates = measured_rates()
    if args.proker:
        proker_main(args, rates)
        return
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
