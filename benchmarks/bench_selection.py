"""Selection without a validation split: test accuracy under selection=val (few-shot val, min(K, 4) per class),
cv (stratified k-fold over the support images, k = min(K, 4)) and none, on synthetic bundles, shots 1-16.

    PYTHONPATH=src python benchmarks/bench_selection.py [--seeds 3] [--methods gda candle ...] [--shots 1 16]

Every method that selects something: the cache methods and GDA (grids), the linear probe (C), and the trained
adapters (epoch; CLIP-Adapter's ratio; Tip-Adapter-F's and APE-T's α, β after training), these with fewer epochs
than published so that the table takes minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import time

from fewclip import methods
from fewclip.errors import MethodError
from fewclip.features.synthetic import make_synthetic_bundle

#: coarse grids, so the table takes a couple of minutes on two CPU cores
SETTINGS = {
    "tip-adapter": {"search_step": [40, 10]},
    "ape": {"search_step": [40, 10, 5]},
    "gda": {},
    "linear-probe": {"max_iter": 100},
    "clip-adapter": {"epochs": 20},
    "tip-adapter-f": {"search_step": [40, 10], "epochs": 20},
    "ape-t": {"search_step": [40, 10], "epochs": 20},
    "candle": {"epochs": 20},
}
SHOTS = (1, 2, 4, 8, 16)
SELECTIONS = ("val", "cv", "none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--shots", nargs="+", type=int, default=list(SHOTS))
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"{'method':14s} {'shots':>5s} " + " ".join(f"{s:>7s}" for s in SELECTIONS) + "   cv−val")
    for name in args.methods:
        params = SETTINGS[name]
        for k in args.shots:
            accs = {}
            for sel in SELECTIONS:
                scores = []
                for seed in range(args.seeds):
                    bundle = make_synthetic_bundle(classes=20, shots=k, dim=128, views=10, seed=seed)
                    try:
                        model = methods.create(name, selection=sel, **params).fit(bundle)
                    except MethodError:
                        break
                    scores.append(model.score(bundle.test_features, bundle.test_labels))
                accs[sel] = sum(scores) / len(scores) if scores and len(scores) == args.seeds else None
            cells = " ".join(f"{a:7.2f}" if a is not None else f"{'—':>7s}" for a in accs.values())
            gap = f"{accs['cv'] - accs['val']:+7.2f}" if accs["cv"] is not None else f"{'—':>7s}"
            print(f"{name:14s} {k:5d} {cells}  {gap}", flush=True)
    print(
        f"(20 classes, D = 128, 10 views, val 4/class, test 30/class; mean of {args.seeds} seeds; "
        f"{time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
