"""CLIP-LoRA's training step: seconds per iteration and peak memory, and the extrapolated length of a run.

    python benchmarks/bench_lora.py --device cpu --tiny                 # tiny random ViT, 32 px: seconds
    python benchmarks/bench_lora.py --device cpu --steps 3              # full-size random ViT-B/16 on the CPU
    python benchmarks/bench_lora.py --device cuda                       # ViT-B/16, ImageNet shape, fp16 and bf16
    python benchmarks/bench_lora.py --device cpu --tiny --fit           # + one fit of the method on generated images

1. step: one CLIP-LoRA iteration exactly as the method runs it (LoRA on q/k/v of every block of both towers, rank
   2; the text tower on all C prompts with gradients, trimmed to the prompts' length; a batch of B augmented-size
   images; 100·cos logits, cross-entropy, backward, fused AdamW, cosine step) through the shared loop
   (:func:`fewclip.methods.training.fit_epochs`, with its autocast and loss scaling), on in-memory batches; for
   each autocast dtype (CUDA: fp16 with GradScaler, bf16; CPU: fp32). Also the same step with the full 77-token
   text pass, to show what trimming saves. Peak CUDA memory per dtype.
2. extrapolation: a K-shot run is 500·K iterations; with t the step time, the training part of a run is
   500·K·t (ImageNet 16-shot: 8,000·t; the target on an H200 is under 10 minutes, i.e. t < 75 ms). The validation
   passes under selection='val' (10 of them) and the test encoding come on top; they are forward passes only.
3. ``--fit``: ``CLIPLoRA.fit`` on a generated folder dataset (C classes, K shots, 4 validation images per class),
   the real image loading and augmentation included: seconds per iteration end to end.

The models are randomly initialised (:func:`fewclip.models.tiny.save_random_openclip`); nothing is asserted, and
accuracies would be meaningless.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fewclip.methods.clip_lora import AMP  # noqa: E402
from fewclip.methods.training import adamw, fit_epochs  # noqa: E402
from fewclip.models import BackboneSpec  # noqa: E402
from fewclip.models.lora import (  # noqa: E402
    add_lora,
    encode_text_trimmed,
    lora_parameters,
    seed_dropout,
    set_lora_training,
    training_copy,
)
from fewclip.models.tiny import save_random_openclip, save_tiny_openclip  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(
    spec: BackboneSpec, classes: int, batch: int, steps: int, amp: str, trim: bool, warmup: int = 2
) -> tuple[float, float | None, int]:
    """(seconds per iteration, peak CUDA MiB, trainable parameters) of CLIP-LoRA's step."""
    backbone = spec.load()
    device = backbone.device
    model = training_copy(backbone)
    add_lora(model, backbone.backend, generator=torch.Generator().manual_seed(1))
    seed_dropout(model, torch.Generator(device).manual_seed(2))
    set_lora_training(model, True)
    params = lora_parameters(model)
    prompts = [f"a photo of a class number {i}." for i in range(classes)]
    tokens = backbone.tokenizer(prompts).to(device)
    size = backbone.image_size
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(classes, (batch,), device=device)
    optimizer = adamw(list(params.values()), lr=2e-4, weight_decay=1e-2)
    total = warmup + steps
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=1e-6)
    dtype = AMP[amp] if device.type == "cuda" else None

    def loss(_):
        text = encode_text_trimmed(model, tokens) if trim else model.encode_text(tokens)
        text = F.normalize(text.float(), dim=-1)
        logits = 100.0 * F.normalize(model.encode_image(images).float(), dim=-1) @ text.T
        return F.cross_entropy(logits.float(), labels)

    def train(n: int) -> None:
        fit_epochs(params, optimizer, 1, lambda e: range(n), loss, name="bench", lr=2e-4, scheduler=schedule,
                   mixed_precision=dtype)  # fmt: skip

    train(warmup)  # warm-up: kernels, allocator, AdamW state
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    train(steps)
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return seconds, peak, sum(p.numel() for p in params.values())


def fit_run(spec: BackboneSpec, work: Path, classes: int, shots: int, iterations: int, workers: int) -> None:
    from fewclip import data
    from fewclip.data.generate import make_folder_dataset
    from fewclip.features.pipeline import ExtractionOptions
    from fewclip.methods import ImageEpisode, create

    backbone = spec.load()
    names = [f"class{i:03d}" for i in range(classes)]
    size = max(backbone.image_size, 32)
    folder = make_folder_dataset(work / "images", names, {"train": shots, "val": 4, "test": 1}, size=size, seed=0)
    splits = data.load_dataset("folder", path=folder, warn=False)
    text = F.normalize(backbone.encode_text([f"a photo of a {c}." for c in splits.classnames]), dim=-1)
    episode = ImageEpisode(splits, data.sample_episode(splits, shots, 1), spec, text, loaded=backbone,
                           options=ExtractionOptions(num_workers=workers, progress=False))  # fmt: skip
    for selection in ("none", "val"):
        t0 = time.perf_counter()
        model = create("clip-lora", iterations=iterations, selection=selection).fit(episode)
        wall = time.perf_counter() - t0
        per = wall / iterations * 1e3
        print(f"  fit ({selection:4s}): {iterations} iterations in {wall:7.2f} s = {per:8.1f} ms per iteration with "
              f"image loading ({workers} workers){'' if selection == 'none' else ', 10 validations'}; "
              f"skipped AMP steps {model.skipped_steps_}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny random ViT (32 px) instead of --arch")
    parser.add_argument("--arch", default="ViT-B/16")
    parser.add_argument("--classes", type=int, help="prompts through the text tower per step (default 1000 on "
                        "cuda: ImageNet; 100 on cpu; 10 with --tiny)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, help="timed steps after the warm-up (default 20 cuda, 3 cpu)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--amp", nargs="+", default=None, help="autocast dtypes on cuda (default fp16 bf16)")
    parser.add_argument("--no-full-text", action="store_true", help="skip the untrimmed 77-token comparison")
    parser.add_argument("--fit", action="store_true", help="also fit the method on generated images")
    parser.add_argument("--shots", type=int, default=2, help="--fit: shots per class")
    parser.add_argument("--iterations", type=int, default=20, help="--fit: iterations")
    parser.add_argument("--workers", type=int, default=0, help="--fit: image loader workers")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    classes = args.classes or (10 if args.tiny else 1000 if cuda else 100)
    steps = args.steps or (20 if cuda else 3)
    amps = (args.amp or ["fp16", "bf16"]) if cuda else ["none"]
    where = torch.cuda.get_device_name(args.device) if cuda else f"{torch.get_num_threads()} CPU threads"
    arch = "tiny ViT" if args.tiny else args.arch
    print(f"CLIP-LoRA step on a random {arch}: C = {classes} prompts, batch {args.batch}; torch {torch.__version__}; "
          f"{where}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fewclip-bench-lora-") as tmp:
        work = Path(tmp)
        if args.tiny:
            tiny = save_tiny_openclip(work / "tiny", "vit", name="bench-lora-tiny", seed=0, embed_dim=64, width=64,
                                      layers=2)  # fmt: skip
            spec = BackboneSpec(f"local-dir:{tiny.folder}", device=args.device)
        else:
            spec = BackboneSpec(args.arch, str(save_random_openclip(args.arch, work)), device=args.device)
        for amp in amps:
            seconds, peak, count = step_time(spec, classes, args.batch, steps, amp, True, args.warmup)
            memory = "" if peak is None else f", peak {peak:,.0f} MiB"
            label = amp if cuda else "fp32"
            print(f"  {label}: {seconds * 1e3:9.1f} ms per iteration{memory} ({count:,} LoRA parameters)")
            if not args.no_full_text:
                full, peak_full, _ = step_time(spec, classes, args.batch, steps, amp, False, args.warmup)
                memory = "" if peak_full is None else f", peak {peak_full:,.0f} MiB"
                print(f"  {label}: {full * 1e3:9.1f} ms per iteration with the full 77-token text pass{memory}")
            for shots in (1, 16):
                iters = 500 * shots
                print(f"    {shots:2d}-shot run: 500 × {shots} = {iters:,} iterations × {seconds * 1e3:.1f} ms = "
                      f"{iters * seconds / 60:,.1f} min of training (C = {classes})")  # fmt: skip
        if args.fit:
            fit_run(spec, work, classes, args.shots, args.iterations, args.workers)


if __name__ == "__main__":
    main()
