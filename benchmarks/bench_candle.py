"""Candle training speed on synthetic bundles of the issue's shapes (figures printed, never asserted).

    python benchmarks/bench_candle.py                        # both shapes on this machine's default device
    python benchmarks/bench_candle.py --shape base2new100    # 100 classes, 50 base x 16 shots, D=512, 10 views
    python benchmarks/bench_candle.py --shape imagenet-lt --iterations 20 --device cuda

``base2new100`` fits Candle with its defaults (50 epochs, batch 128, selection on 200 base validation rows) and
reports the wall time of ``fit``. ``imagenet-lt`` (1,000 classes, ImageNet-LT's 115,846 support rows with the
exponential profile 1,280 -> 5, D=512, one view) times ``--iterations`` training steps of the released regime
(B = 128 images + 2,000 prototype tokens per step) and projects one epoch (floor(115,846 / 128) = 905 steps) and
the default 50 epochs; ``--full`` runs the whole fit instead.
"""

from __future__ import annotations

import argparse
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


def lt_counts(classes: int = 1000, n_max: int = 1280, n_min: int = 5) -> torch.Tensor:
    ratio = n_min / n_max
    return torch.tensor([max(int(n_max * ratio ** (i / (classes - 1))), n_min) for i in range(classes)])


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["base2new100", "imagenet-lt", "both"], default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=10, help="imagenet-lt: steps timed")
    parser.add_argument("--full", action="store_true", help="imagenet-lt: run the whole 50-epoch fit")
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
            raise SystemExit("--full is not wired to a synthetic 115k-row bundle here; time steps instead.")
        per_step, steps = time_steps(args.device, args.iterations)
        epochs = Candle().epochs
        print(
            f"imagenet-lt: 1,000 classes, 115,846 rows, D=512, batch 128 + 2,000 prototype tokens: "
            f"{per_step:.3f} s/step -> {per_step * steps / 60:.1f} min/epoch ({steps} steps), "
            f"{per_step * steps * epochs / 3600:.2f} h for {epochs} epochs; "
            f"{math.floor(600 / per_step)} steps fit in 10 min"
        )


if __name__ == "__main__":
    main()
