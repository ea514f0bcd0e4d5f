"""Linear-probe fit: CPU seconds, selected C and accuracy on synthetic bundles of the published shape.

    python benchmarks/bench_linear_probe.py                 # default and hard regimes, 100 classes x 16 shots
    python benchmarks/bench_linear_probe.py --regimes hard  # one regime
    PYTHONPATH=/path/to/other/src python benchmarks/bench_linear_probe.py   # measure another checkout

The bundle is bench_fit.py's (seed 1, D=1024, 10 views, 1,600 val and 3,000 test rows). "CPU s" is the process
CPU time of the fit (all threads). On a busy machine, threads that wait for each other spin and inflate it several
times; ``--threads 1`` measures the work itself. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# within-class noise and text noise (see features/synthetic.py); "hard": a wider class spread, worse text.
REGIMES = {"default": {"within": 3.5, "text_noise": 1.5}, "hard": {"within": 6.0, "text_noise": 2.5}}


def run(regime: str, classes: int, shots: int, dim: int, val: int, test: int) -> dict:
    from fewclip import methods
    from fewclip.features.synthetic import make_synthetic_bundle

    bundle = make_synthetic_bundle(
        classes=classes,
        shots=shots,
        dim=dim,
        views=10,
        val_per_class=-(-val // classes),
        test_per_class=-(-test // classes),
        seed=1,
        **REGIMES[regime],
    )
    model = methods.create("linear-probe")
    c0, w0 = time.process_time(), time.perf_counter()
    model.fit(bundle)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {
        "regime": regime,
        "cpu_s": cpu,
        "wall_s": wall,
        "C": model.selected_.get("C"),
        "search": {k: v for k, v in getattr(model, "search_", {}).items() if isinstance(v, (int, float))},
        "val_acc": model.val_accuracy_,
        "test_acc": model.score(bundle.test_features, bundle.test_labels),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--regimes", nargs="+", choices=sorted(REGIMES), default=["default", "hard"])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--val", type=int, default=1600)
    p.add_argument("--test", type=int, default=3000)
    p.add_argument("--threads", type=int, help="torch threads (1 keeps CPU seconds honest on a busy machine)")
    p.add_argument("--json", action="store_true", help="one JSON line per regime instead of the table")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.json:
        print(
            f"{args.classes} classes x {args.shots} shots, D={args.dim}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"
        )
        print(f"{'regime':8s} {'CPU s':>8s} {'wall s':>8s} {'C':>10s} {'val %':>6s} {'test %':>6s}")
    for regime in args.regimes:
        r = run(regime, args.classes, args.shots, args.dim, args.val, args.test)
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            c = "-" if r["C"] is None else f"{r['C']:.4g}"
            print(
                f"{regime:8s} {r['cpu_s']:8.1f} {r['wall_s']:8.1f} {c:>10s} {r['val_acc']:6.2f} {r['test_acc']:6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
