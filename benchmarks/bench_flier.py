"""FLIER's training cost: step time, epoch time and peak memory of ``FLIER.fit`` itself, and the image loader's rate.

    python benchmarks/bench_flier.py --tiny                       # CPU: tiny random ViT (32 px), 4×8×8 latents
    python benchmarks/bench_flier.py --device cuda                # GPU: random ViT-B/16 at 224 px, 4×64×64 latents

1. fit: :meth:`fewclip.methods.flier.FLIER.fit` on a synthetic episode of C classes × K real support images, K
   generated images per class with random latents, and 4 validation images per class (defaults: 100 × 16, so an
   epoch is 1,600 real + 1,600 generated images, the issue's target case). The images are random tensors already on
   the device (the method's image reader is replaced by one that serves them), so the figures are the training
   itself: forward and backward through the CLIP branch and the latent encoder, AdamW with LLRD, the EMA update,
   the raw and EMA validation passes. Every optimiser step is timed (the step hook synchronises the device), giving
   the median step time of real and of generated batches, the measured wall time of epoch 2 (its steps plus the
   validation after epoch 1), the extrapolation steps × step time, and the peak CUDA memory.
2. loader: images/s of one process decoding 512-px PNGs (Stable Diffusion's size) and applying FLIER's timm
   augmentation (RandAugment, random erasing) at 224 px: how many loader workers (``--workers``) an epoch needs so
   that reading images does not dominate.

Random weights: accuracies are meaningless; nothing here is asserted. Target on an H200: a 16-shot epoch on 100
classes (1,600 real + 1,600 generated images) in under 30 s.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fewclip.methods.flier as flier_module  # noqa: E402
from fewclip.data import DatasetSplits, Episode, Item  # noqa: E402
from fewclip.generation import GeneratedSet  # noqa: E402
from fewclip.methods import ImageEpisode, create  # noqa: E402
from fewclip.models import BackboneSpec  # noqa: E402
from fewclip.models.tiny import save_random_openclip, save_tiny_openclip  # noqa: E402

TARGET_SECONDS = 30.0


def save_model(folder: Path, tiny: bool, arch: str) -> tuple[str, str | None]:
    if tiny:
        saved = save_tiny_openclip(folder / "tiny", "vit", name="bench-flier-tiny", seed=0, embed_dim=64, width=64)
        return f"local-dir:{saved.folder}", None
    return arch, str(save_random_openclip(arch, folder))


def synthetic_episode(spec: BackboneSpec, classes: int, shots: int, val: int, latent: list[int]) -> ImageEpisode:
    """An image episode whose items name no real file (the reader is replaced), with a generated set of K images
    per class and random latents."""
    names = [f"class{c:03d}" for c in range(classes)]
    train = [Item(f"train/{c}/{i}.png", c, names[c]) for c in range(classes) for i in range(shots)]
    val_items = [Item(f"val/{c}/{i}.png", c, names[c]) for c in range(classes) for i in range(val)]
    splits = DatasetSplits(name="bench", root=Path("/nonexistent"), classnames=names, train=train, val=val_items,
                           test=[], split_sha256="")  # fmt: skip
    episode = Episode(dataset="bench", train=train, val=val_items, classnames=names, k=shots, seed=1,
                      sampler="portable", split_sha256="")  # fmt: skip
    labels = torch.arange(classes).repeat_interleave(shots)
    generated = GeneratedSet(
        classnames=tuple(names),
        images=tuple(Path(f"/generated/{names[y]}/{i}.png") for i, y in enumerate(labels.tolist())),
        labels=labels,
        latents=torch.randn(labels.numel(), *latent),
        prompts=tuple("" for _ in range(labels.numel())),
    )
    backbone = spec.load()
    text = F.normalize(torch.randn(classes, backbone.embed_dim), dim=-1)
    return ImageEpisode(splits, episode, spec, text, loaded=backbone, generated=generated)


def in_memory_reader(size: int, device: torch.device, batch: int):
    """A stand-in for :func:`fewclip.methods.image.image_batches`: the items' labels, in order, with random images
    [B, 3, size, size] already on ``device``."""
    pool = torch.randn(batch, 3, size, size, device=device)

    def image_batches(root, items, transform, options, batch_size, *, seed=None, draw=0, order=None, unreadable=None):
        items = list(items) if order is None else [items[i] for i in order]
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            if len(chunk) > pool.shape[0]:
                extra = torch.randn(len(chunk), 3, size, size, device=device)
                yield extra, torch.tensor([i.label for i in chunk])
            else:
                yield pool[: len(chunk)], torch.tensor([i.label for i in chunk])

    return image_batches


def bench_fit(spec: BackboneSpec, args: argparse.Namespace, latent: list[int]) -> None:
    device = torch.device(spec.device)
    data = synthetic_episode(spec, args.classes, args.shots, args.val, latent)
    size = data.loaded.image_size
    stamps: list[float] = []
    original_step = flier_module._StepHook.step

    def timed_step(self) -> None:
        original_step(self)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    saved_reader = flier_module.image_batches
    flier_module.image_batches = in_memory_reader(size, device, args.batch)
    flier_module._StepHook.step = timed_step
    model = create("flier", epochs=2, warmup_epochs=1, batch_size=args.batch, blocks=args.blocks)
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        model.fit(data)
        wall = time.perf_counter() - t0
    finally:
        flier_module.image_batches = saved_reader
        flier_module._StepHook.step = original_step
    real_steps = -(-len(data.train) // args.batch)
    gen_steps = -(-model.generated_used_ // args.batch)
    steps = real_steps + gen_steps
    deltas = [b - a for a, b in zip(stamps, stamps[1:])]
    # epoch 2's steps (the first step of each epoch also carries the previous validation or the epoch set-up)
    second = deltas[steps - 1 : 2 * steps - 1]
    real = statistics.median(second[1:real_steps]) if real_steps > 1 else second[0]
    gen = statistics.median(second[real_steps + 1 :]) if gen_steps > 1 else second[real_steps]
    epoch_wall = stamps[2 * steps - 1] - stamps[steps - 1]
    extrapolated = real_steps * real + gen_steps * gen
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    per_epoch_images = len(data.train) + model.generated_used_
    print(
        f"  {spec.precision}: {args.classes} classes × {args.shots} shots, batch {args.batch}, latents {latent}: "
        f"{steps} steps/epoch ({real_steps} real + {gen_steps} generated)"
    )
    print(f"    step: real {real * 1e3:8.1f} ms, generated {gen * 1e3:8.1f} ms ({args.batch / gen:7.1f} images/s)")
    print(
        f"    epoch ({per_epoch_images} images): extrapolated {extrapolated:7.2f} s from step times; measured "
        f"{epoch_wall:7.2f} s (epoch 2 with the raw + EMA validation of {len(data.val)} images after epoch 1)"
        + ("" if peak is None else f"; peak {peak:5.1f} GiB")
    )
    print(f"    fit of 2 epochs: {wall:7.1f} s (model set-up and the final validation included)")
    if device.type == "cuda":
        verdict = "meets" if epoch_wall < TARGET_SECONDS else "misses"
        print(f"    target < {TARGET_SECONDS:.0f} s per 16-shot 100-class epoch: {verdict} (compute only, see loader)")


def bench_loader(count: int, out_size: int) -> None:
    """Images/s of one process: decode a 512-px PNG and apply FLIER's timm augmentation at ``out_size``."""
    from PIL import Image

    from fewclip.features.extract import load_image
    from fewclip.models.preprocess import ImageSpec, augment_transform

    transform, _ = augment_transform("flier_timm", ImageSpec(out_size, out_size))
    with tempfile.TemporaryDirectory(prefix="fewclip-bench-flier-png-") as tmp:
        paths = []
        g = torch.Generator().manual_seed(0)
        for i in range(count):
            noise = (torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()
            path = Path(tmp) / f"{i}.png"
            Image.fromarray(noise).resize((512, 512), Image.BICUBIC).save(path)  # smooth-ish, SD-sized
            paths.append(path)
        t0 = time.perf_counter()
        for path in paths:
            transform(load_image(path))
        rate = count / (time.perf_counter() - t0)
    need = 3200 / TARGET_SECONDS
    print(
        f"  loader: {rate:6.1f} images/s per process (512-px PNG → flier_timm at {out_size} px); an epoch of 3,200 "
        f"images in {TARGET_SECONDS:.0f} s needs ≥ {need:.0f} images/s: --workers {max(1, -(-int(need) // int(rate)))}"
        " or more"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny random ViT and 4×8×8 latents (CPU)")
    parser.add_argument("--arch", default="ViT-B/16", help="full-size architecture (random weights)")
    parser.add_argument("--precisions", nargs="+", help="default: bf16 fp16 fp32 on cuda, fp32 on cpu")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--val", type=int, default=4, help="validation images per class")
    parser.add_argument("--batch", type=int, default=64, help="images per step (released: 32 × 2 GPUs)")
    parser.add_argument("--blocks", type=int, default=0, help="blocks fine-tuned (0: all)")
    parser.add_argument("--latent", type=int, nargs=3, help="latent shape (default 4 64 64; 4 8 8 with --tiny)")
    parser.add_argument(
        "--loader-images", type=int, default=40, help="PNGs decoded by the loader measurement (0: skip)"
    )
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    precisions = args.precisions or (["bf16", "fp16", "fp32"] if cuda else ["fp32"])
    latent = args.latent or ([4, 8, 8] if args.tiny else [4, 64, 64])
    where = torch.cuda.get_device_name(args.device) if cuda else f"{torch.get_num_threads()} CPU threads"
    name = "tiny ViT" if args.tiny else args.arch
    print(f"FLIER fit on a random {name}; torch {torch.__version__}; {where}")
    with tempfile.TemporaryDirectory(prefix="fewclip-bench-flier-") as tmp:
        model, pretrained = save_model(Path(tmp), args.tiny, args.arch)
        for precision in precisions:
            bench_fit(BackboneSpec(model, pretrained, precision=precision, device=args.device), args, latent)
    if args.loader_images:
        bench_loader(args.loader_images, 224)


if __name__ == "__main__":
    main()
