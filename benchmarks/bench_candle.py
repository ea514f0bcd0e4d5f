"""Candle training speed on synthetic bundles of the issue's shapes (figures printed, never asserted).

    python benchmarks/bench_candle.py                        # both shapes on this machine's default device
    python benchmarks/bench_candle.py --shape base2new100    # 100 classes, 50 base x 16 shots, D=512, 10 views
    python benchmarks/bench_candle.py --shape imagenet-lt --iterations 20 --device cuda
    python benchmarks/bench_candle.py --shape imagenet-lt --full   # the whole long-tail fit, selection included

``base2new100`` fits Candle with its defaults (50 epochs, batch 128, selection on 200 base validation rows) and
reports the wall time of ``fit``. ``imagenet-lt`` (1,000 classes, an ImageNet-LT-like profile of 115,627 support rows
from 1,280 down to 5 images, 386 / 478 / 136 many / medium / few classes, D=512, one view) times ``--iterations``
steps of the released step (B = 128 images + 2,000 prototype tokens) and projects the released regime (905 steps an
epoch, 50 epochs) and the long-tail protocol's budget; ``--full`` runs the whole fit with the long-tail protocol's
Candle settings (``LONGTAIL_METHOD_DEFAULTS``), validation selection on 20 images per class included, and scores
10 test images per class by many / medium / few.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from fewclip.features.bundle import make_bundle
from fewclip.features.synthetic import make_synthetic_bundle
from fewclip.methods import create
from fewclip.methods.candle import Candle, CandleHead, cla_loss, initial_parameters, initial_prototypes


def base2new_bundle(device: str):
    full = make_synthetic_bundle(classes=100, shots=16, dim=512, views=10, val_per_class=4, test_per_class=10, seed=1)
    keep, val_keep = full.support_labels < 50, full.val_labels < 50
    return make_bundle(
        support_features=full.support_features[:, keep], support_labels=full.support_labels[keep],
        text_weights=full.text_weights, test_features=full.test_features, test_labels=full.test_labels,
        val_features=full.val_features[val_keep], val_labels=full.val_labels[val_keep],
        support_clean_features=full.support_clean_features[keep], classnames=list(full.classnames),
    ).to(device)  # fmt: skip


IMAGENET_LT_TRAIN = 115_846


def lt_counts() -> torch.Tensor:
    """1,000 per-class counts shaped like ImageNet-LT's: log-linear between the ranks 0, 25, 385, 864 and 999 at
    1,280, 350, 101, 20 and 5 images (115,627 in all; 386 classes above 100 images, 136 below 20)."""
    ranks = torch.arange(1000, dtype=torch.float64)
    knots = torch.tensor([0.0, 25.0, 385.0, 864.0, 999.0], dtype=torch.float64)
    logs = torch.tensor([1280.0, 350.0, 101.0, 20.0, 5.0], dtype=torch.float64).log()
    seg = (torch.searchsorted(knots, ranks, right=True) - 1).clamp(max=len(knots) - 2)
    t = (ranks - knots[seg]) / (knots[seg + 1] - knots[seg])
    return (logs[seg] + t * (logs[seg + 1] - logs[seg])).exp().floor().long().clamp_min(5)


def time_steps(device: str, iterations: int, dim: int = 512, batch: int = 128) -> tuple[float, int]:
    """Seconds per training step at the ImageNet-LT shape, and the steps in one epoch."""
    counts = lt_counts()  # the prior's counts; the number of steps is ImageNet-LT's own
    classes, total = counts.numel(), IMAGENET_LT_TRAIN
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)
    labels = torch.arange(classes).repeat_interleave(2)
    rows = torch.randn(labels.numel(), dim, generator=g) * 10
    base, new, virtual = initial_prototypes(rows, labels, counts, text, "text", g)
    head = CandleHead(
        initial_parameters(dim, virtual, 0.1, g), base, text, new, heads=8, mask="none", scale=1.0,
        tie_virtual_text=False,
    ).to(device)  # fmt: skip
    optimizer = torch.optim.SGD(head.parameters(), lr=3e-4, momentum=0.9, weight_decay=5e-4)
    targets = torch.cat([torch.randint(classes, (batch,), generator=g), torch.arange(classes)]).to(device)
    images = (torch.randn(batch, dim, generator=g) * 10).to(device)
    counts = counts.to(device)
    seconds = []
    for step in range(iterations + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = sum(cla_loss(z, targets, counts, 1.0, 1.0) for z in head.train_logits(images, 0.1, g))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step:  # the first step warms up
            seconds.append(time.perf_counter() - t0)
    return sum(seconds) / len(seconds), total // batch


def full_longtail(device: str, overrides: dict) -> None:
    """The whole long-tail fit on a synthetic ImageNet-LT-shaped bundle, as ``fewclip run --protocol longtail``
    configures Candle (``overrides`` on top). The classes overlap more than the synthetic default (within-class
    spread 2.5): zero-shot is about 27% and a 10-shot nearest class mean about 80%, so training has room to show."""
    from fewclip.metrics import per_class_from_hits
    from fewclip.protocols.protocol import LONGTAIL_METHOD_DEFAULTS, group_accuracies, shot_groups

    counts = lt_counts()
    t0 = time.perf_counter()
    bundle = make_synthetic_bundle(
        classes=1000, shots=counts.tolist(), dim=512, views=1, val_per_class=20, test_per_class=10, seed=1,
        within=2.5,
    ).to(device)  # fmt: skip
    print(f"bundle: {int(counts.sum()):,} support rows, 20,000 val, 10,000 test ({time.perf_counter() - t0:.0f} s)")
    zero_shot = create("zero-shot", selection="none").fit(bundle).score(bundle.test_features, bundle.test_labels)
    print(f"zero-shot test {zero_shot:.2f}%")
    settings = {**LONGTAIL_METHOD_DEFAULTS["candle"], **overrides}
    model = create("candle", **settings)
    t0 = time.perf_counter()
    model.fit(bundle)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = model.predict_logits(bundle.test_features)
    predict = time.perf_counter() - t0
    labels = bundle.test_labels.cpu()
    hits = logits.argmax(1).cpu() == labels
    per_class = per_class_from_hits(hits, labels, 1000)
    groups = group_accuracies(per_class, shot_groups(counts.tolist()))
    steps = model.epochs * model.iterations_per_epoch_
    print(
        f"imagenet-lt fit with {settings}: {steps} steps, {seconds:.0f} s ({seconds / 60:.1f} min; "
        f"{seconds / steps:.2f} s/step incl. {model.epochs} validation passes); best epoch {model.best_epoch_}, "
        f"val {model.val_accuracy_:.2f}%; predict 10,000 test rows {predict:.1f} s"
    )
    print("val by epoch: " + ", ".join(f"{h['val_accuracy']:.1f}" for h in model.history_))
    print(
        f"test: overall {100 * float(hits.double().mean()):.2f}%, "
        + ", ".join(f"{name} {value:.2f}%" for name, value in groups.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["base2new100", "imagenet-lt", "both"], default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=10, help="imagenet-lt: steps timed")
    parser.add_argument("--full", action="store_true", help="imagenet-lt: run the whole long-tail protocol fit")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="--full: a Candle setting (JSON value)"
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")
    if args.shape in ("base2new100", "both"):
        bundle = base2new_bundle(args.device)
        t0 = time.perf_counter()
        model = create("candle").fit(bundle)
        seconds = time.perf_counter() - t0
        print(
            f"base2new100: 50 base classes x 16 shots (800 rows, 10 views), D=512, {model.epochs} epochs x "
            f"{model.iterations_per_epoch_} steps, {model.trained_parameters_:,} parameters: fit {seconds:.1f} s "
            f"(val {model.val_accuracy_:.1f}%, best epoch {model.best_epoch_})"
        )
    if args.shape in ("imagenet-lt", "both"):
        if args.full:
            full_longtail(args.device, {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)})
            return
        per_step, steps = time_steps(args.device, args.iterations)
        from fewclip.protocols.protocol import LONGTAIL_METHOD_DEFAULTS

        epochs = Candle().epochs
        lt = LONGTAIL_METHOD_DEFAULTS["candle"]
        budget = lt["epochs"] * lt["iterations_per_epoch"]
        print(
            f"imagenet-lt: 1,000 classes, 115,846 rows, D=512, batch 128 + 2,000 prototype tokens: "
            f"{per_step:.3f} s/step -> released: {per_step * steps / 60:.1f} min/epoch ({steps} steps), "
            f"{per_step * steps * epochs / 3600:.2f} h for {epochs} epochs; long-tail protocol budget "
            f"({budget} steps): {per_step * budget / 60:.1f} min of training steps; "
            f"{math.floor(600 / per_step)} steps fit in 10 min"
        )


if __name__ == "__main__":
    main()
