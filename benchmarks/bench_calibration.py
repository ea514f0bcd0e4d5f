"""All-class accuracy with classes without support, without and with calibrated stacking (issue 18).

Synthetic bundles of 40 classes of which 20 have ``shots`` support images and 20 none (validation and test rows
for all 40). Every method scores each test image over all 40 classes; the table prints the accuracy with
``calibrate="none"`` (the released behaviour) and with the default ``calibrate="auto"`` (an offset subtracted from
the seen classes' logits, chosen on validation with the method's own selection), next to zero-shot. Accuracies
are means over ``--seeds`` bundles.

    python benchmarks/bench_calibration.py [--shots 1 2 4 8 16] [--seeds 3] [--methods tip-adapter ape gda candle]
"""

from __future__ import annotations

import argparse
import statistics

from fewclip.features.synthetic import make_synthetic_bundle
from fewclip.methods import create

CLASSES, WITH_SUPPORT = 40, 20
#: grids a little coarser than the methods' defaults, so that the whole table runs in minutes on 2 CPU cores
SETTINGS = {
    "tip-adapter": {"search_step": [50, 20]},
    "ape": {"search_step": [50, 20, 10]},
    "gda": {},
    "candle": {"epochs": 20},
    "clip-adapter": {"epochs": 20},
}


def bundle(shots: int, seed: int):
    counts = [shots] * WITH_SUPPORT + [0] * (CLASSES - WITH_SUPPORT)
    return make_synthetic_bundle(
        classes=CLASSES, shots=counts, dim=128, views=4, val_per_class=4, test_per_class=30, seed=seed
    )


def accuracy(name: str, data, calibrate: str) -> tuple[float, float]:
    model = create(name, calibrate=calibrate, **SETTINGS.get(name, {})).fit(data)
    return model.score(data.test_features, data.test_labels), model.calibration_offset_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(SETTINGS))
    args = parser.parse_args()
    print(f"{CLASSES} classes, {WITH_SUPPORT} with support; all-class test accuracy (%), mean of {args.seeds} seeds")
    print(f"{'shots':>5} {'method':<13} {'zero-shot':>9} {'none':>7} {'calibrated':>10} {'mean δ':>8}")
    for shots in args.shots:
        bundles = [bundle(shots, seed) for seed in range(args.seeds)]
        zero = statistics.mean(create("zero-shot").fit(b).score(b.test_features, b.test_labels) for b in bundles)
        for name in args.methods:
            plain = statistics.mean(accuracy(name, b, "none")[0] for b in bundles)
            runs = [accuracy(name, b, "auto") for b in bundles]
            calibrated = statistics.mean(r[0] for r in runs)
            offset = statistics.mean(r[1] for r in runs)
            print(f"{shots:>5} {name:<13} {zero:>9.1f} {plain:>7.1f} {calibrated:>10.1f} {offset:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
