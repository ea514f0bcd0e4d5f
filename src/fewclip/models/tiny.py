"""Tiny randomly initialised CLIP models written to disk, for offline tests.

They are saved the way real checkpoints are (open_clip state dicts, ``local-dir:`` folders, an OpenAI-style
TorchScript archive, a transformers ``save_pretrained`` folder) and loaded back through
:func:`fewclip.models.load_backbone`, so tests exercise the real loading path without any download.

The tiny models keep CLIP's real tokenizer (open_clip's bundled BPE, 49 408 tokens; no download), so the
transformers copy of a tiny open_clip ViT tokenises and encodes exactly like the original, which is what lets a
test check that the two backends agree.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

VOCAB_SIZE = 49408


def tiny_openclip_config(
    arch: str = "vit", *, image_size: int = 32, embed_dim: int = 16, width: int = 32, layers: int = 1
) -> dict[str, Any]:
    """An open_clip ``model_cfg`` for a tiny ViT (``arch='vit'``) or ModifiedResNet (``arch='resnet'``)."""
    text_cfg = {"context_length": 77, "vocab_size": VOCAB_SIZE, "width": width, "heads": 2, "layers": layers}
    if arch == "vit":
        vision_cfg = {"image_size": image_size, "layers": layers, "width": width, "patch_size": 8, "head_width": 16}
    elif arch == "resnet":
        if image_size % 32:
            raise ValueError(f"a ResNet CLIP needs image_size divisible by 32, got {image_size}.")
        vision_cfg = {"image_size": image_size, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None}
    else:
        raise ValueError(f"arch {arch!r} is unknown; use 'vit' or 'resnet'.")
    return {"embed_dim": embed_dim, "quick_gelu": True, "vision_cfg": vision_cfg, "text_cfg": text_cfg}


@dataclass(frozen=True)
class TinyOpenClip:
    """Files of one saved tiny open_clip model."""

    folder: Path  # a local-dir: folder (open_clip_config.json + open_clip_model.safetensors)
    config_name: str  # registered with open_clip.add_model_config, usable with a bare weights file
    weights: Path  # the safetensors state dict
    model_cfg: dict[str, Any]


def save_tiny_openclip(
    folder: str | os.PathLike,
    arch: str = "vit",
    *,
    name: str | None = None,
    seed: int = 0,
    pretrain: Callable[[torch.nn.Module], None] | None = None,
    **cfg_kwargs,
) -> TinyOpenClip:
    """Build a random tiny open_clip model, save it to ``folder`` and register its config under ``name``.

    ``pretrain(model)``, when given, trains the model in place before it is saved (the demo's few seconds of
    contrastive training, :func:`contrastive_pretrain`)."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = name or f"fewclip-tiny-{arch}"
    model_cfg = tiny_openclip_config(arch, **cfg_kwargs)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    if pretrain is not None:
        pretrain(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    weights = folder / "open_clip_model.safetensors"
    save_file(state, str(weights))
    size = model_cfg["vision_cfg"]["image_size"]
    preprocess_cfg = {
        "size": size,
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=1)
    )
    config_file = folder / "configs" / f"{name}.json"
    config_file.parent.mkdir(exist_ok=True)
    config_file.write_text(json.dumps(model_cfg, indent=1))
    open_clip.add_model_config(config_file)
    return TinyOpenClip(folder=folder, config_name=name, weights=weights, model_cfg=model_cfg)


def save_random_openclip(name: str, folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """A full-size open_clip architecture ``name``, randomly initialised (seeded) and saved as
    ``folder/<arch>-random.safetensors``; returns that path. Paper names resolve as :func:`load_backbone` does
    (``ViT-B/16`` -> ``ViT-B-16-quickgelu``). For benchmarks: the real shapes and cost, no download."""
    import open_clip

    from .names import OPENAI_MODELS

    arch = OPENAI_MODELS.get(name, name.replace("/", "-"))
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    weights = Path(folder) / f"{arch}-random.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
    return weights


def save_openai_torchscript(tiny: TinyOpenClip, path: str | os.PathLike) -> Path:
    """Write ``tiny``'s weights as a TorchScript archive shaped like OpenAI's ``.pt`` files.

    The archive's state dict has OpenAI-format keys plus the ``input_resolution``, ``context_length`` and
    ``vocab_size`` entries OpenAI's archives carry.
    """
    import open_clip

    model = open_clip.CLIP(**tiny.model_cfg)
    model.load_state_dict(load_file(str(tiny.weights)))

    class _Archive(torch.nn.Module):
        def __init__(self, clip: torch.nn.Module):
            super().__init__()
            for child_name, child in clip.named_children():
                self.add_module(child_name, child)
            for param_name, param in clip.named_parameters(recurse=False):
                self.register_parameter(param_name, param)
            self.register_buffer("input_resolution", torch.tensor(tiny.model_cfg["vision_cfg"]["image_size"]))
            self.register_buffer("context_length", torch.tensor(77))
            self.register_buffer("vocab_size", torch.tensor(VOCAB_SIZE))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.logit_scale

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_Archive(model).eval(), torch.zeros(1), check_trace=False)
        path = Path(path)
        traced.save(str(path))
    return path


# --------------------------------------------------------------------------- transformers


def write_clip_tokenizer(folder: str | os.PathLike) -> Path:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` (from open_clip's bundled BPE) plus a saved CLIPTokenizer."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))  # positional: 4.x and 5.x
    tokenizer.save_pretrained(str(folder))
    return folder


def openclip_to_hf_state_dict(state: dict[str, torch.Tensor], vision_layers: int, text_layers: int) -> dict:
    """Map an open_clip (= OpenAI-format) ViT CLIP state dict onto transformers' ``CLIPModel`` keys."""
    out: dict[str, torch.Tensor] = {}

    def block(src: str, dst: str) -> None:
        q, k, v = state[f"{src}.attn.in_proj_weight"].chunk(3)
        qb, kb, vb = state[f"{src}.attn.in_proj_bias"].chunk(3)
        for proj, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
            out[f"{dst}.self_attn.{proj}_proj.weight"] = w
            out[f"{dst}.self_attn.{proj}_proj.bias"] = b
        pairs = {
            "attn.out_proj": "self_attn.out_proj",
            "ln_1": "layer_norm1",
            "ln_2": "layer_norm2",
            "mlp.c_fc": "mlp.fc1",
            "mlp.c_proj": "mlp.fc2",
        }
        for a, b in pairs.items():
            out[f"{dst}.{b}.weight"] = state[f"{src}.{a}.weight"]
            out[f"{dst}.{b}.bias"] = state[f"{src}.{a}.bias"]

    for i in range(vision_layers):
        block(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}")
    for i in range(text_layers):
        block(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}")
    out["vision_model.embeddings.class_embedding"] = state["visual.class_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
    out["vision_model.embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
    for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        out[f"vision_model.{b}.weight"] = state[f"visual.{a}.weight"]
        out[f"vision_model.{b}.bias"] = state[f"visual.{a}.bias"]
    out["visual_projection.weight"] = state["visual.proj"].t()
    out["text_model.embeddings.token_embedding.weight"] = state["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = state["positional_embedding"]
    out["text_model.final_layer_norm.weight"] = state["ln_final.weight"]
    out["text_model.final_layer_norm.bias"] = state["ln_final.bias"]
    out["text_projection.weight"] = state["text_projection"].t()
    out["logit_scale"] = state["logit_scale"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def save_tiny_hf_clip(folder: str | os.PathLike, tiny: TinyOpenClip) -> Path:
    """Save the transformers ``CLIPModel`` holding the same weights as the tiny open_clip ViT ``tiny``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    cfg = tiny.model_cfg
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if not isinstance(vision["layers"], int):
        raise ValueError("transformers has no ResNet CLIP; convert a tiny ViT.")
    config = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=text["vocab_size"],
            hidden_size=text["width"],
            intermediate_size=4 * text["width"],
            num_hidden_layers=text["layers"],
            num_attention_heads=text["heads"],
            max_position_embeddings=text["context_length"],
            hidden_act="quick_gelu",
        ).to_dict(),
        vision_config=CLIPVisionConfig(
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            hidden_size=vision["width"],
            intermediate_size=4 * vision["width"],
            num_hidden_layers=vision["layers"],
            num_attention_heads=vision["width"] // vision["head_width"],
            hidden_act="quick_gelu",
        ).to_dict(),
        projection_dim=cfg["embed_dim"],
    )
    model = CLIPModel(config)
    state = openclip_to_hf_state_dict(load_file(str(tiny.weights)), vision["layers"], text["layers"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(
            f"open_clip → transformers mapping is incomplete: missing {missing}, unexpected {unexpected}"
        )
    folder = Path(folder)
    model.save_pretrained(str(folder))
    write_clip_tokenizer(folder)
    size = vision["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        str(folder)
    )
    return folder


def contrastive_pretrain(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    captions: torch.Tensor,
    *,
    steps: int = 150,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    """A few seconds of CLIP-style training: each image against the captions of every class (image → text CE).

    images [M, 3, S, S] (preprocessed), labels [M], captions [K, 77] (token ids, one caption per class). The
    logit scale is trained with the rest, as in CLIP. Deterministic for a seed (on the CPU); returns the losses.
    """
    g = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        img = torch.nn.functional.normalize(model.encode_image(images[idx]), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(captions), dim=-1)
        loss = torch.nn.functional.cross_entropy(model.logit_scale.exp() * img @ txt.T, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
