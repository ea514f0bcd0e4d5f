"""The image path: clip-ft's training step, and one `fewclip run` cell of an image method end to end.

    python benchmarks/bench_image_methods.py                  # CPU: tiny random ViT, 32 px
    python benchmarks/bench_image_methods.py --device cuda    # GPU: random ViT-B/16 at 224 px, fp32, bf16, fp16

1. step: images per second of clip-ft's training step (forward, backward and AdamW through the shared epoch loop,
   :func:`fewclip.methods.training.fit_epochs`, with its autocast and loss scaling) on batches already in memory,
   for the scopes ``all`` and ``last``, and the peak CUDA memory.
2. run: the staged runner (:func:`fewclip.protocols.runner.run`) on a generated folder dataset of C classes with K
   support, 4 validation and T test images per class, methods zero-shot and clip-ft: the seconds of the shared
   extraction, of clip-ft's fit (E epochs, validation every epoch) and of its test images through the fine-tuned
   encoder; then the same run with ``force``: the refit reproduces the weights, so the test features come from the
   cache.

The model is randomly initialised (saved to a temporary file and loaded back through ``load_backbone``), so the
accuracies are meaningless; nothing here is asserted.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fewclip.data.generate import make_folder_dataset  # noqa: E402
from fewclip.features.pipeline import ExtractionOptions  # noqa: E402
from fewclip.methods.training import adamw, fit_epochs  # noqa: E402
from fewclip.models import BackboneSpec, TrainableBackbone  # noqa: E402
from fewclip.models.tiny import save_tiny_openclip  # noqa: E402
from fewclip.protocols.config import DataConfig, MethodsConfig, ProtocolConfig, RunConfig  # noqa: E402
from fewclip.protocols.runner import run  # noqa: E402


def save_model(folder: Path, arch: str) -> tuple[str, str | None, int]:
    """(model, pretrained, image size) of a randomly initialised model saved under ``folder``."""
    if arch == "tiny":
        tiny = save_tiny_openclip(folder / "tiny", "vit", name="bench-image-tiny", seed=0, embed_dim=64, width=64)
        return f"local-dir:{tiny.folder}", None, tiny.model_cfg["vision_cfg"]["image_size"]
    import open_clip
    from safetensors.torch import save_file

    from fewclip.models import OPENAI_MODELS

    name = OPENAI_MODELS.get(arch, arch.replace("/", "-"))
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    weights = folder / f"{name}-random.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
    size = model.visual.image_size
    return arch, str(weights), size[0] if isinstance(size, tuple | list) else int(size)


def step_throughput(spec: BackboneSpec, scope: str, batch: int, size: int, steps: int) -> tuple[float, float | None]:
    """(images/s, peak CUDA MB) of clip-ft's step on random in-memory batches."""
    model = TrainableBackbone.from_spec(spec, scope)
    device = model.device
    classes = 100
    text = F.normalize(torch.randn(classes, model.backbone.embed_dim, device=device), dim=-1)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(classes, (batch,), device=device)
    params = dict(model.named_parameters())
    optimizer = adamw(list(params.values()), lr=1e-5, weight_decay=0.1)

    def loss(_):
        logits = 100.0 * F.normalize(model.image_features(images), dim=-1) @ text.T
        return F.cross_entropy(logits, labels)

    def train(n: int) -> None:
        fit_epochs(params, optimizer, 1, lambda e: range(n), loss, name="bench", lr=1e-5,
                   mixed_precision=model.autocast_dtype)  # fmt: skip

    train(2)  # warm-up: kernels, allocator, AdamW state
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    train(steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return batch * steps / seconds, peak


def runner_cell(spec: BackboneSpec, work: Path, size: int, classes: int, shots: int, test: int, epochs: int) -> None:
    names = [f"class{i:02d}" for i in range(classes)]
    folder = make_folder_dataset(work / f"images{size}", names, {"train": shots, "val": 4, "test": test}, size=size)
    config = RunConfig(
        DataConfig("folder", path=str(folder)),
        spec,
        MethodsConfig(["zero-shot", "clip-ft"], overrides={"clip-ft": {"epochs": epochs, "batch_size": 32}}),
        ProtocolConfig(shots=[shots], seeds=[1]),
        ExtractionOptions(views=1, progress=False, batch_size=128),
        cache_dir=str(work / "cache"),
    )
    for force in (False, True):
        t0 = time.perf_counter()
        report = run(config, work / f"out-{spec.precision}", force=force, log=lambda m: None)
        wall = time.perf_counter() - t0
        r = next(r for r in report.results if r["method"] == "clip-ft")
        enc = r["image_encoder"]
        again = " --force" if force else "        "
        print(
            f"  run{again}: wall {wall:7.1f} s  extraction {report.extraction_seconds:6.1f} s"
            f"  clip-ft fit {r['seconds']['fit']:7.1f} s ({epochs} epochs, {len(r['history'])} validations)  "
            f"test {r['seconds']['predict']:5.1f} s ({enc['test_encoded']} encoded, {enc['test_cached']} cached)"
            f"  val {r['accuracy']['val_accuracy']:.1f}  test {r['accuracy']['test_accuracy']:.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", help="open_clip/OpenAI architecture (default: ViT-B/16 on cuda, tiny on cpu)")
    parser.add_argument("--precisions", nargs="+", help="default: fp32 on cpu; fp32 bf16 fp16 on cuda")
    parser.add_argument("--batch", type=int, help="images per training step (default 64 on cuda, 16 on cpu)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--classes", type=int, help="run: classes (default 20 on cuda, 4 on cpu)")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--test", type=int, default=10, help="run: test images per class")
    parser.add_argument("--epochs", type=int, default=5, help="run: clip-ft epochs")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    arch = args.arch or ("ViT-B/16" if cuda else "tiny")
    precisions = args.precisions or (["fp32", "bf16", "fp16"] if cuda else ["fp32"])
    batch = args.batch or (64 if cuda else 16)
    classes = args.classes or (20 if cuda else 4)
    gpu = torch.cuda.get_device_name(args.device) if cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"clip-ft on a random {arch}; torch {torch.__version__}; {gpu}")
    with tempfile.TemporaryDirectory(prefix="fewclip-bench-image-") as tmp:
        work = Path(tmp)
        model, pretrained, size = save_model(work, arch)
        for precision in precisions:
            spec = BackboneSpec(model, pretrained, precision=precision, device=args.device)
            print(f"{precision}:")
            for scope in ("all", "last"):
                rate, peak = step_throughput(spec, scope, batch, size, args.steps)
                memory = "" if peak is None else f", peak {peak:,.0f} MB"
                print(f"  step (scope {scope:4s}, batch {batch}): {rate:8.1f} images/s{memory}")
            runner_cell(spec, work, size, classes, args.shots, args.test, args.epochs)
    print(json.dumps({"note": "random weights: accuracies are meaningless"}))


if __name__ == "__main__":
    main()
