"""``fewclip demo``: the whole pipeline offline, in seconds.

Default: generated images in a ``folder`` dataset -> a tiny open_clip ViT, given a few seconds of contrastive
training on other generated images of half the classes (so zero-shot is above chance), saved to disk and loaded
back by path -> cached features -> every method over shots and seeds -> results files and a table. With
``--bundle``: every method on a synthetic CLIP-like feature bundle (realistic accuracies, no images).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `fewclip --help` imports no torch
    import torch
from .common import CLIError, fit_and_evaluate, fmt, format_table

HYPERPARAMETER_COLUMNS = ["method", "hyperparameters chosen", "val acc", "test acc", "seconds"]
# Coarser search grids than the published ones (200 x 20 [x 20]) keep the demo within seconds on two cores.
DEMO_GRIDS = {
    "tip-adapter": {"search_step": [40, 10]},
    "tip-adapter-f": {"search_step": [40, 10]},
    "ape": {"search_step": [40, 10, 10]},
    "ape-t": {"search_step": [40, 10]},
    "clip-ft": {"scope": "last", "epochs": 3, "lr": 1e-3},  # the tiny model learns within a few epochs
    "clip-lora": {"iterations": 12, "lr": 5e-3},  # 500 x K published; kept short so the demo stays within seconds
    "candle": {"epochs": 10},  # 50 published; the demo's 8-way task settles within 10
    "clip-adapter": {"epochs": 20},  # 50 published
    # one kernel point per image (ProKeR's support="views" costs O((V·N)³) per grid point: 5 CPU s more here)
    "proker": {"search_step": [10, 5], "support": "images"},
    # the demo has no Stable Diffusion set: FLIER's real-images-only variant (the released "nosd" scripts), short
    "flier": {
        "use_generated": False,
        "blocks": 1,
        "epochs": 3,
        "warmup_epochs": 0,
        "lr": 1e-3,
        "ema_decay": 0.5,
        "augmentation": "dassl_train",
    },
}
#: the bundle demo runs every method with its defaults, except those whose defaults take minutes on its 3,200 support
#: vectors
BUNDLE_DEMO_PARAMS = {"proker": DEMO_GRIDS["proker"]}
PRETRAIN_PER_CLASS = 32
PRETRAIN_STEPS = 30
PRETRAIN_LR = 1e-3  # generated pretraining images per class, apart from the dataset's own images
DEMO_CLASSES = ("amber", "azure", "cobalt", "coral", "crimson", "jade", "lilac", "olive", "saffron", "teal")


def _hyperparameter_rows(results: list[dict]) -> list[dict[str, str]]:
    rows = []
    for r in results:
        selected = {k: v for k, v in (r.get("selected") or {}).items() if v is not None}
        if selected.get("calibration") == "none":  # every class has support here: no seen/unseen offset to show
            selected.pop("calibration")
            selected.pop("calibration_offset", None)
        if r.get("best_epoch") is not None:
            selected["epoch"] = r["best_epoch"]
        val = r["accuracy"]["val_accuracy"]
        rows.append(
            {
                "method": r["method"],
                "hyperparameters chosen": ", ".join(f"{k}={fmt(v)}" for k, v in selected.items()) or "-",
                "val acc": "n/a" if val is None else f"{val:.2f}",
                "test acc": f"{r['accuracy']['test_accuracy']:.2f}",
                "seconds": f"{r['seconds']['fit'] + r['seconds']['predict']:.2f}",
            }
        )
    return rows


def folder_template() -> str:
    """The prompt of a ``folder`` dataset (the kind the demo writes), which zero-shot uses."""
    from ..data import DatasetSplits

    return {f.name: f.default for f in dataclasses.fields(DatasetSplits)}["template"]


def pretrainer(
    classnames: Sequence[str], template: str, seed: int, steps: int = PRETRAIN_STEPS
) -> Callable[[torch.nn.Module], None]:
    """A few seconds of contrastive training of the tiny model on freshly generated images and their captions.

    The images come from the dataset's generator with another seed (none of them is a train, val or test image) and
    show the first half of the classes only; the captions are the dataset's prompt for every class name. Zero-shot
    then knows half of the classes, as CLIP knows some concepts better than others, and the support images have
    something to add."""
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    from ..data.generate import class_image
    from ..models.tiny import contrastive_pretrain

    def pretrain(model: torch.nn.Module) -> None:
        size = model.visual.image_size
        size = size[0] if isinstance(size, tuple) else size
        rng = np.random.default_rng(seed + 10_000)
        seen = (len(classnames) + 1) // 2  # pretraining images of the first half of the classes only
        labels = torch.arange(seen).repeat_interleave(PRETRAIN_PER_CLASS)
        pixels = [
            np.asarray(Image.fromarray(class_image(int(k), len(classnames), rng)).resize((size, size), Image.BICUBIC))
            for k in labels
        ]
        images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
        std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
        captions = open_clip.tokenize([template.format(name) for name in classnames])
        contrastive_pretrain(model, (images - mean) / std, labels, captions, steps=steps, lr=PRETRAIN_LR, seed=seed)

    return pretrain


def run_image_demo(args: argparse.Namespace) -> int:
    from .. import methods
    from ..data.generate import make_folder_dataset
    from ..features.pipeline import ExtractionOptions
    from ..models import BackboneSpec
    from ..models.tiny import save_tiny_openclip
    from ..protocols.config import DataConfig, MethodsConfig, ProtocolConfig, RunConfig
    from ..protocols.runner import run

    classes = args.classes or 8
    if not 2 <= classes <= len(DEMO_CLASSES):
        raise CLIError(f"--classes must be between 2 and {len(DEMO_CLASSES)} for the image demo, got {classes}.")
    with tempfile.TemporaryDirectory(prefix="fewclip-demo-") as tmp:
        work = Path(args.out) if args.out else Path(tmp)
        t0 = time.perf_counter()
        images = make_folder_dataset(
            work / "images", DEMO_CLASSES[:classes], {"train": 16, "val": 8, "test": 25}, seed=args.seed
        )
        names = DEMO_CLASSES[:classes]
        tiny = save_tiny_openclip(
            work / "model", "vit", name="fewclip-demo-vit", seed=args.seed, embed_dim=64, width=64, layers=2,
            pretrain=pretrainer(names, folder_template(), args.seed),
        )  # fmt: skip
        print(
            f"fewclip demo: {classes} classes of generated images in {images} (train/val/test folders), "
            f"a tiny open_clip ViT (a few seconds of contrastive training on generated images of half the classes) "
            f"saved to {tiny.folder} and loaded back by path."
        )
        config = RunConfig(
            data=DataConfig("folder", path=str(images)),
            backbone=BackboneSpec(f"local-dir:{tiny.folder}"),
            methods=MethodsConfig(methods.list_methods(), overrides=DEMO_GRIDS),
            protocol=ProtocolConfig(shots=args.shots, seeds=args.seeds),
            extraction=ExtractionOptions(views=args.views, progress=False),
            cache_dir=str(work / "cache"),
        )
        report = run(config, work / "results", log=lambda message: None)
        print(
            f"{report.encoded} image views encoded once ({report.extraction_seconds:.1f} s), then "
            f"{len(report.written)} fits; results in {work / 'results'}/ (a temporary folder unless --out)."
        )
        print(f"\ntop-1 test accuracy (%), mean ± std over seeds {args.seeds}")
        print(report.table())
        k, seed = max(args.shots), args.seeds[0]
        detail = [r for r in report.results if r["shots"] == k and r["seed"] == seed]
        print(f"\n{k}-shot, seed {seed}")
        print(format_table(_hyperparameter_rows(detail), HYPERPARAMETER_COLUMNS))
        print(
            "All choices were made on the validation images (on coarser grids than the published ones, for speed); "
            "test was evaluated once per method. The tiny model was trained for a few seconds on generated images of "
            f"the first {(classes + 1) // 2} classes only, so zero-shot knows those and guesses the others "
            "(about half right); the methods add what the support images show. "
            "`fewclip demo --bundle` runs the methods on realistic CLIP-like features."
        )
        print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


def run_bundle_demo(args: argparse.Namespace) -> int:
    from .. import methods
    from ..features import bundle as bundle_io
    from ..features.synthetic import make_synthetic_bundle

    shots = max(args.shots)
    bundle = make_synthetic_bundle(
        classes=args.classes or 20, shots=shots, dim=args.dim, views=args.views, val_per_class=4, test_per_class=50,
        seed=args.seed,
    )  # fmt: skip
    print(
        f"fewclip demo: synthetic CLIP-like bundle, {bundle.num_classes} classes x {shots} shots, "
        f"D={bundle.dim}, {bundle.views} views, "
        f"{bundle.val_labels.numel()} val / {bundle.test_labels.numel()} test rows"
    )
    if args.out:
        path = bundle_io.save(bundle, Path(args.out) / "demo_bundle.safetensors")
        print(f"bundle written to {path} (try: fewclip fit {path} --method ape)")
    results = []
    for name in [m for m in methods.list_methods() if methods.get_class(m).inputs == "features"]:
        model, res = fit_and_evaluate(bundle, name, None, BUNDLE_DEMO_PARAMS.get(name, {}), "val")
        results.append(
            {
                "method": name,
                "selected": model.selected_,
                "best_epoch": getattr(model, "best_epoch_", None),
                "accuracy": {"val_accuracy": res["val_accuracy"], "test_accuracy": res["test_accuracy"]},
                "seconds": {"fit": res["fit_seconds"], "predict": res["predict_seconds"]},
            }
        )
    print(format_table(_hyperparameter_rows(results), HYPERPARAMETER_COLUMNS))
    print("All choices were made on the validation split; test was evaluated once per method.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_bundle_demo(args) if args.bundle else run_image_demo(args)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", help="generated images -> tiny CLIP -> every method over shots and seeds (offline, seconds)"
    )
    demo.add_argument("--bundle", action="store_true", help="run on a synthetic CLIP-like feature bundle instead")
    demo.add_argument("--classes", type=int, default=None, help="classes (default: 8 images, 20 bundle)")
    demo.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    demo.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    demo.add_argument("--views", type=int, default=10)
    demo.add_argument("--dim", type=int, default=128, help="--bundle: feature dimension")
    demo.add_argument("--seed", type=int, default=1, help="seed of the generated data and model")
    demo.add_argument("--out", help="folder to keep the demo's files in (default: a temporary folder)")
    demo.set_defaults(func=cmd_demo)
