"""A tiny randomly initialised Stable Diffusion pipeline written to disk, for offline tests and CPU benchmarks.

:func:`save_tiny_stable_diffusion` builds the five parts of a ``StableDiffusionPipeline`` (UNet, VAE, CLIP text
encoder, a tokenizer over a byte-level vocabulary written beside it, a DDIM scheduler) from small configurations and
saves them with ``save_pretrained``, so a test loads them back by path through :func:`fewclip.generation.diffusion.
load_pipeline`, the loading path a real model takes, without any download. The VAE halves the resolution once, so
the latents are 4 x 16 x 16 for 32 px images (and 4 x 64 x 64 for 128 px).

:func:`sd2_base_configs` gives the configuration of Stable Diffusion 2.x base's UNet and VAE (written from the
published ``config.json`` files), for benchmarks that need a full-size model with random weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: the tiny parts' configurations (diffusers' own dummy components, spec flier.md §8.5)
TINY_UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "norm_num_groups": 32,
}
TINY_VAE = {
    "block_out_channels": [32, 64],
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
}
DDIM_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def byte_level_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary without merges: the two special tokens, the 256 byte-level symbols and each symbol with
    the end-of-word mark (514 entries). Every text tokenises (one token per byte), nothing is downloaded."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for symbol in alphabet:
            vocab[symbol + suffix] = len(vocab)
    return vocab


def save_tiny_stable_diffusion(folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build a random tiny Stable Diffusion pipeline and save it to ``folder`` (``model_index.json`` and one
    sub-folder per part); returns the folder. Needs ``diffusers`` (``pip install 'fewclip[generate]'``)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    words = folder / "vocabulary"
    words.mkdir(parents=True, exist_ok=True)
    vocab = byte_level_vocab()
    (words / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (words / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"), model_max_length=77)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(vocab),
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        max_position_embeddings=77,
        projection_dim=32,
    )
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**TINY_UNET),
        vae=AutoencoderKL(**TINY_VAE),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**DDIM_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    return folder


def sd2_base_configs() -> dict[str, dict[str, Any]]:
    """``{"unet": ..., "vae": ...}``: the UNet2DConditionModel and AutoencoderKL configurations of Stable Diffusion
    2.x base (865M-parameter UNet, linear-projection attention with 64-wide heads, OpenCLIP-H's 1024-d text
    embeddings; 512 px images, 4 x 64 x 64 latents)."""
    unet = {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 1024,
        "attention_head_dim": (5, 10, 20, 20),
        "use_linear_projection": True,
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 768,
        "scaling_factor": 0.18215,
    }
    return {"unet": unet, "vae": vae}
