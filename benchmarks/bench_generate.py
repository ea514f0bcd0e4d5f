"""Generation throughput: Stable Diffusion images (with their latents) per second, for FLIER's generated sets.

    python benchmarks/bench_generate.py                   # CPU: the tiny test pipeline, 32 px, saved and loaded back
    python benchmarks/bench_generate.py --device cuda     # GPU: SD 2.x base-sized random UNet, VAE and text encoder,
                                                          # bf16, 512 px, DDIM 50 steps, guidance 9 (FLIER's settings)
    python benchmarks/bench_generate.py --device cuda --compile --batch-sizes 16,32,48
    python benchmarks/bench_generate.py --full --resolution 64 --steps 2 --batch-sizes 1 --reps 1 --images 4
                                                          # the full-size code path, checked on a CPU

1. flops: the UNet's and the VAE decoder's floating-point operations for one image (counted on the meta device with
   ``torch.utils.flop_counter``), and the bound they put on images/s at a given peak (``--peak-tflops``; 989 = an
   H100/H200's dense bf16 peak): each image costs steps x 2 (classifier-free guidance) UNet evaluations.
2. sample: images/s of :meth:`fewclip.generation.diffusion.Sampler.sample` (one pipeline call: sampling to the final
   latent, then the VAE decode) per batch size, after a warm-up call; the peak CUDA memory.
3. generate: images/s of :func:`fewclip.generation.store.generate` end to end (sampling, PNG encoding, atomic
   writes of images and latent shards, the generated set written), then the same call again, all from the store.

The weights are random (the images are noise); nothing is asserted. ``--tiny`` forces the tiny pipeline on any
device; the full-size pipeline is built in memory on the device (no weights file is written).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from fewclip.generation.diffusion import Sampler, load_sampler  # noqa: E402
from fewclip.generation.settings import GenerationSettings  # noqa: E402
from fewclip.generation.store import generate  # noqa: E402
from fewclip.generation.tiny import (  # noqa: E402
    DDIM_CONFIG,
    TINY_UNET,
    TINY_VAE,
    byte_level_vocab,
    save_tiny_stable_diffusion,
    sd2_base_configs,
)

SD2_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                projection_dim=512, hidden_act="gelu", max_position_embeddings=77)  # fmt: skip


def count_flops(unet_cfg: dict, vae_cfg: dict, resolution: int, text_dim: int) -> tuple[float, float]:
    """(UNet FLOPs per image per evaluation, VAE decoder FLOPs per image) at ``resolution``, counted on meta."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
    down = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    side = resolution // down
    x = torch.zeros(1, 4, side, side, device="meta")
    with FlopCounterMode(display=False) as unet_count:
        unet(x, torch.tensor([10], device="meta"), encoder_hidden_states=torch.zeros(1, 77, text_dim, device="meta"))
    with FlopCounterMode(display=False) as vae_count:
        vae.decode(x)
    return float(unet_count.get_total_flops()), float(vae_count.get_total_flops())


def build_full_pipeline(device: str, dtype: torch.dtype):
    """A StableDiffusionPipeline of SD 2.x base's sizes with random weights, built on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = sd2_base_configs()
    folder = Path(tempfile.mkdtemp(prefix="bench-generate-vocab-"))
    (folder / "vocab.json").write_text(json.dumps(byte_level_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text = CLIPTextModel(
            CLIPTextConfig(vocab_size=49408, bos_token_id=0, eos_token_id=1, pad_token_id=1, **SD2_TEXT)
        )
    pipe = StableDiffusionPipeline(
        unet=unet.to(dtype),
        vae=vae.to(dtype),
        text_encoder=text.to(dtype),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**DDIM_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if device.startswith("cuda"):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny pipeline (default on CPU)")
    parser.add_argument("--full", action="store_true", help="the SD 2.x base-sized pipeline (default on CUDA)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--resolution", type=int, help="default: 512 (full size), 32 (tiny)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=9.0)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default: 8,16,32 on CUDA; 8 on CPU)")
    parser.add_argument("--reps", type=int, default=2, help="timed calls per batch size")
    parser.add_argument("--images", type=int, default=None, help="images of the end-to-end generate run (2 batches)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak for the FLOP bound (H100/H200 bf16)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    cuda = args.device.startswith("cuda")
    tiny = args.tiny or not (cuda or args.full)
    precision = args.precision or ("bf16" if cuda else "fp32")
    resolution = args.resolution or (32 if tiny else 512)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("8,16,32" if cuda else "8")).split(",")]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    tmp = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    settings = GenerationSettings(
        model=str(tmp / "tiny-sd"),
        scheduler=args.scheduler,
        steps=args.steps,
        guidance_scale=args.guidance,
        resolution=resolution,
        images_per_prompt=1,
        batch_size=batch_sizes[-1],
        precision=precision,
        device=args.device,
    ).validate()
    out: dict = {"device": args.device, "pipeline": "tiny" if tiny else "sd2-base-sized (random)",
                 "precision": precision, "resolution": resolution, "steps": args.steps, "guidance": args.guidance,
                 "scheduler": args.scheduler, "compile": args.compile}  # fmt: skip

    # 1. FLOPs and the bound they put on throughput
    full = sd2_base_configs()
    unet_cfg, vae_cfg = (TINY_UNET, TINY_VAE) if tiny else (full["unet"], full["vae"])
    unet_flops, vae_flops = count_flops(unet_cfg, vae_cfg, resolution, unet_cfg["cross_attention_dim"])
    cfg_factor = 2 if args.guidance > 1 else 1
    per_image = unet_flops * args.steps * cfg_factor + vae_flops
    out["unet_gflops_per_eval"] = unet_flops / 1e9
    out["vae_decode_gflops"] = vae_flops / 1e9
    out["tflops_per_image"] = per_image / 1e12
    out["bound_images_per_s_at_peak"] = args.peak_tflops * 1e12 / per_image
    print(f"UNet {unet_flops / 1e9:.1f} GFLOP per image-evaluation, VAE decode {vae_flops / 1e9:.1f} GFLOP; "
          f"{per_image / 1e12:.3f} TFLOP per image ({args.steps} steps x {cfg_factor}); at {args.peak_tflops:.0f} "
          f"TFLOP/s at most {out['bound_images_per_s_at_peak']:.1f} images/s")  # fmt: skip

    # 2. the sampler per batch size
    t0 = time.perf_counter()
    if tiny:
        save_tiny_stable_diffusion(tmp / "tiny-sd")
        sampler = load_sampler(settings, compile_unet=args.compile)
    else:
        from fewclip.generation.diffusion import DTYPES

        pipe = build_full_pipeline(args.device, getattr(torch, DTYPES[precision]))
        if args.compile:
            pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs", fullgraph=True)
        sampler = Sampler(pipe, settings, "random-sd2-base-sized", args.device)
    out["build_seconds"] = time.perf_counter() - t0
    prompts = [f"a photo of a thing number {i}, a type of object" for i in range(max(batch_sizes) * 4)]
    rows = []
    for b in batch_sizes:
        sampler.settings = replace(settings, steps=min(2, args.steps))  # warm-up: kernels, autotuning, compilation
        sampler.sample(prompts[:b], list(range(b)))
        sampler.settings = settings
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        synchronize(args.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        for r in range(args.reps):
            sampler.sample(prompts[r * b : (r + 1) * b], list(range(r * b, (r + 1) * b)))
        synchronize(args.device)
        seconds = (time.perf_counter() - start) / args.reps
        cpu_per_image = (time.process_time() - cpu_start) / args.reps / b
        row = {"batch": b, "seconds_per_call": seconds, "images_per_s": b / seconds, "cpu_s_per_image": cpu_per_image,
               "unet_evals_per_s": b * cfg_factor * args.steps / seconds,
               "achieved_tflops": b * per_image / seconds / 1e12}  # fmt: skip
        if cuda:
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        mem = f", peak {row['peak_memory_gib']:.1f} GiB" if cuda else ""
        print(f"sample  batch {b:3d}: {row['images_per_s']:7.2f} images/s ({seconds:.2f} s per call, "
              f"{row['achieved_tflops']:.2f} TFLOP/s, {cpu_per_image:.3f} CPU s per image{mem})",
              flush=True)  # fmt: skip
    out["sample"] = rows

    # 3. generate() end to end through the store, then the same call served from the store
    best = max(rows, key=lambda r: r["images_per_s"])["batch"]
    n = args.images or 2 * best
    settings = replace(settings, batch_size=best)
    sampler.settings = settings
    classes = {f"class {c}": [f"a photo of a thing of class {c}, view {i}" for i in range(n // 4)] for c in range(4)}
    start = time.perf_counter()
    report = generate(classes, tmp / "out", settings, cache_dir=tmp / "cache", sampler=sampler, show_progress=False)
    first = time.perf_counter() - start
    start = time.perf_counter()
    again = generate(classes, tmp / "out", settings, cache_dir=tmp / "cache", sampler=sampler, show_progress=False)
    second = time.perf_counter() - start
    out["generate"] = {"images": report.samples, "batch": best, "seconds": first,
                       "images_per_s": report.samples / first, "rerun_seconds": second,
                       "rerun_generated": again.generated}  # fmt: skip
    print(f"generate {report.samples} images (batch {best}): {first:.2f} s, {report.samples / first:.2f} images/s "
          f"end to end; rerun from the store {second:.2f} s, {again.generated} generated")  # fmt: skip
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
