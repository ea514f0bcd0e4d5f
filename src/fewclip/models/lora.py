"""Low-rank adapters (LoRA) on the attention projections of a loaded CLIP model, as CLIP-LoRA places them.

For a target projection p ∈ {q, k, v} of width E (frozen weight W_p [E, E], bias b_p) LoRA adds a rank-r branch::

    h_p(x) = W_p x + b_p + s · B_p A_p · drop(x),   A_p [r, E] ~ U(−1/√E, 1/√E),  B_p [E, r] = 0,  s = α/√r

(rsLoRA scaling; dropout on the branch's input only, in train mode only). In eval mode the branch is computed
explicitly, never merged in place (no rounding drift across train/eval toggles); :func:`merged_weights` returns the
merged weights W_p + s·B_pA_p for a copy that needs no LoRA code at all.

open_clip packs q, k and v into one ``nn.MultiheadAttention.in_proj_weight`` [3E, E] (rows [0:E] q, [E:2E] k,
[2E:3E] v), and ``nn.MultiheadAttention`` never calls its projections' ``forward``, so hooking or wrapping them has
no effect: :class:`LoRAAttention` replaces the whole module with one that runs the packed projection, adds each
target's branch to its rows, and calls scaled-dot-product attention with the caller's mask (same call signature,
returns ``(out, None)``). peft's ``MultiheadAttention`` LoRA is not equivalent (one pair on the packed weight, always
on ``out_proj`` too, no dropout on the branch input). transformers' ``CLIPModel`` has separate ``q_proj``/``k_proj``/
``v_proj`` Linears: :class:`LoRALinear` wraps each one.

>>> adapters = add_lora(model, "open_clip", towers=("image", "text"), position="all", rank=2, alpha=1.0,
...                     dropout=0.25, generator=torch.Generator().manual_seed(1))
>>> params = lora_parameters(model)            # the only parameters that train
>>> state = merged_weights(model)              # {"visual.transformer.resblocks.0.attn.in_proj_weight": ...}
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackboneError
from .backbone import Backbone
from .trainable import _copy_model

TARGETS = ("q", "k", "v")
TOWERS = ("image", "text")
#: which blocks each position adapts, as [start, stop) fractions of the tower's depth d (rounded down): with d = 12
#: they are CLIP-LoRA's ranges (bottom 0–3, mid 4–7, up 8–11, half-up 6–11, half-bottom 0–5); top3 is the last three
POSITIONS: dict[str, tuple[float, float]] = {
    "all": (0.0, 1.0),
    "bottom": (0.0, 1 / 3),
    "mid": (1 / 3, 2 / 3),
    "up": (2 / 3, 1.0),
    "half-up": (0.5, 1.0),
    "half-bottom": (0.0, 0.5),
    "top3": (-3.0, 1.0),
}


# --------------------------------------------------------------------------- pure functions


def lora_scale(alpha: float, rank: int) -> float:
    """rsLoRA's scale s = α/√r (CLIP-LoRA; not classic LoRA's α/r)."""
    return float(alpha) / math.sqrt(int(rank))


def block_indices(position: str, depth: int) -> list[int]:
    """The block indices ``position`` (a key of :data:`POSITIONS`) adapts in a tower of ``depth`` blocks."""
    if position not in POSITIONS:
        raise BackboneError(f"LoRA position {position!r} is unknown; choose one of {list(POSITIONS)}.")
    start, stop = POSITIONS[position]
    if start < 0:  # the last -start blocks
        return list(range(max(0, depth + int(start)), depth))
    return list(range(int(math.floor(start * depth + 1e-9)), int(math.floor(stop * depth + 1e-9))))


def init_lora_pair(
    rank: int, features_in: int, features_out: int, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """(A [r, E_in], B [E_out, r]): A uniform in ±1/√E_in (``kaiming_uniform_(a=√5)``), B zero, float32."""
    bound = 1.0 / math.sqrt(features_in)
    a = (torch.rand(rank, features_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return a.float(), torch.zeros(features_out, rank)


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight update s·B·A [E_out, E_in] of one pair (A [r, E_in], B [E_out, r])."""
    return scale * (b.float() @ a.float())


def packed_delta(
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], width: int, scale: float, targets: Sequence[str] = TARGETS
) -> torch.Tensor:
    """The update of a packed in-projection [3E, E]: s·B_pA_p in the rows of each target p of ``pairs`` (rows
    [0:E] q, [E:2E] k, [2E:3E] v), zero in the rows of a projection without a pair."""
    device = next((a.device for a, _ in pairs.values()), torch.device("cpu"))
    rows = []
    for p in targets:
        rows.append(lora_delta(*pairs[p], scale) if p in pairs else torch.zeros(width, width, device=device))
    return torch.cat(rows, dim=0)


def merge_packed(
    weight: torch.Tensor, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float
) -> torch.Tensor:
    """``weight`` [3E, E] (a packed q/k/v in-projection) plus :func:`packed_delta`, float32."""
    width = weight.shape[1]
    if weight.shape[0] != 3 * width:
        raise BackboneError(f"a packed q/k/v projection has 3E × E rows, got shape {list(weight.shape)}.")
    return weight.float() + packed_delta(pairs, width, scale).to(weight.device)


def additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    batch: int,
    heads: int,
    queries: int,
    keys: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """``nn.MultiheadAttention``'s masks as one additive float mask for SDPA, broadcastable to [N, h, L, S]:
    a boolean mask is True where attention is *not* allowed (−inf), a float one is added as it is; ``attn_mask``
    [L, S] or [N·h, L, S], ``key_padding_mask`` [N, S]."""

    def as_float(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    out = None
    if attn_mask is not None:
        out = as_float(attn_mask)
        out = out.view(batch, heads, queries, keys) if out.dim() == 3 else out.view(1, 1, queries, keys)
    if key_padding_mask is not None:
        pad = as_float(key_padding_mask).view(batch, 1, 1, keys)
        out = pad if out is None else out + pad
    return out


# --------------------------------------------------------------------------- modules


class _Branch(nn.Module):
    """One LoRA pair (A [r, E_in], B [E_out, r]) and its input dropout. ``generator`` (set by :func:`seed_dropout`)
    draws the dropout masks, so they do not depend on (or disturb) torch's global random state."""

    def __init__(self, rank: int, features_in: int, features_out: int, dropout: float, generator: torch.Generator):
        super().__init__()
        a, b = init_lora_pair(rank, features_in, features_out, generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(b)
        self.dropout = float(dropout)
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        if self.training and self.dropout > 0:
            if self.dropout >= 1:
                return torch.zeros(*x.shape[:-1], self.lora_B.shape[0], dtype=x.dtype, device=x.device)
            keep = 1.0 - self.dropout
            mask = torch.empty(x.shape, device=x.device, dtype=torch.float32).bernoulli_(keep, generator=self.generator)
            x = x * mask.to(x.dtype) / keep
        return scale * F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))


class LoRAAttention(nn.Module):
    """An ``nn.MultiheadAttention`` (``base``, frozen, shared storage) with a LoRA branch on each of ``targets``.

    Same call signature and layout (``batch_first`` honoured) as the module it replaces; returns ``(out, None)``
    (attention weights are never materialised). With every B = 0 it computes what ``base`` computes."""

    def __init__(
        self,
        base: nn.MultiheadAttention,
        *,
        rank: int,
        alpha: float,
        dropout: float,
        generator: torch.Generator,
        targets: Sequence[str] = TARGETS,
    ):
        super().__init__()
        if not getattr(base, "_qkv_same_embed_dim", True) or base.in_proj_weight is None:
            raise BackboneError("LoRA needs an nn.MultiheadAttention with a packed in_proj_weight (kdim = vdim = E).")
        if getattr(base, "bias_k", None) is not None or getattr(base, "add_zero_attn", False):
            raise BackboneError(
                "LoRA: this nn.MultiheadAttention has add_bias_kv or add_zero_attn, which the LoRA attention does not "
                "compute (CLIP's towers set neither); use a model without them."
            )
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown:
            raise BackboneError(f"LoRA targets {unknown} are unknown; choose among {list(TARGETS)}.")
        self.base = base
        self.scale = lora_scale(alpha, rank)
        width = base.embed_dim
        device = base.in_proj_weight.device
        self.lora = nn.ModuleDict(
            {p: _Branch(rank, width, width, dropout, generator).to(device) for p in TARGETS if p in targets}
        )

    @property
    def batch_first(self) -> bool:
        return self.base.batch_first

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {p: (branch.lora_A, branch.lora_B) for p, branch in self.lora.items()}

    def merged_in_proj(self) -> torch.Tensor:
        """in_proj_weight + s·[B_qA_q; B_kA_k; B_vA_v] (float32, detached)."""
        with torch.no_grad():
            return merge_packed(self.base.in_proj_weight, self.pairs(), self.scale)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        base = self.base
        if not base.batch_first:  # [L, N, E] -> [N, L, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        width, heads = base.embed_dim, base.num_heads
        weight, bias = base.in_proj_weight, base.in_proj_bias
        dtype = torch.get_autocast_dtype(query.device.type) if torch.is_autocast_enabled(query.device.type) else None
        x_dtype = dtype or query.dtype
        if query is key and key is value:
            packed = F.linear(query, weight, bias)
            q, k, v = packed.split(width, dim=-1)
        else:
            w, b = weight.split(width), (bias.split(width) if bias is not None else (None, None, None))
            q, k, v = F.linear(query, w[0], b[0]), F.linear(key, w[1], b[1]), F.linear(value, w[2], b[2])
        inputs = {"q": query, "k": key, "v": value}
        adapted = {"q": q, "k": k, "v": v}
        for p, branch in self.lora.items():
            adapted[p] = adapted[p] + branch(inputs[p].to(x_dtype), self.scale)
        q, k, v = adapted["q"], adapted["k"], adapted["v"]
        batch, queries, keys = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(batch, -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        mask = additive_mask(attn_mask, key_padding_mask, batch, heads, queries, keys, q.dtype)
        dropout = base.dropout if self.training else 0.0
        causal = is_causal and mask is None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = out.transpose(1, 2).reshape(batch, queries, width)
        out = F.linear(out, base.out_proj.weight, base.out_proj.bias)
        if not base.batch_first:
            out = out.transpose(0, 1)
        return out, None


class LoRALinear(nn.Module):
    """An ``nn.Linear`` (``base``, frozen) plus one LoRA branch: transformers' separate q/k/v projections."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = lora_scale(alpha, rank)
        self.lora = _Branch(rank, base.in_features, base.out_features, dropout, generator).to(base.weight.device)

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"w": (self.lora.lora_A, self.lora.lora_B)}

    def merged_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return self.base.weight.float() + lora_delta(self.lora.lora_A, self.lora.lora_B, self.scale).to(
                self.base.weight.device
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out + self.lora(x, self.scale).to(out.dtype)


# --------------------------------------------------------------------------- placing them in a model


def _attention_sites(model: nn.Module, backend: str, tower: str) -> list[tuple[str, nn.Module, str]]:
    """(module path, parent, attribute) of each block's attention in ``tower`` of ``model``, in block order
    (open_clip: the blocks' ``attn`` MHAs; transformers: the ``self_attn`` modules)."""
    if backend == "open_clip":
        if tower == "image":
            visual = model.visual
            transformer = getattr(visual, "transformer", None)
            if transformer is None or not hasattr(transformer, "resblocks"):
                raise BackboneError(
                    f"LoRA on the image tower needs a ViT with open_clip's own transformer blocks; this model's image "
                    f"tower is {type(visual).__name__} (CLIP-LoRA defines no positions for ResNets; timm towers are "
                    "not supported). Use towers='text' (encoders='text') to adapt the text tower only."
                )
            prefix, blocks = "visual.transformer.resblocks", transformer.resblocks
        else:
            text = getattr(model, "text", None)
            if text is not None and hasattr(text, "transformer"):  # CustomTextCLIP
                prefix, blocks = "text.transformer.resblocks", text.transformer.resblocks
            elif hasattr(model, "transformer"):
                prefix, blocks = "transformer.resblocks", model.transformer.resblocks
            else:
                raise BackboneError(f"LoRA: no text transformer found in {type(model).__name__}.")
        sites = []
        for i, block in enumerate(blocks):
            if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention | LoRAAttention):
                raise BackboneError(
                    f"LoRA: block {prefix}.{i} has no nn.MultiheadAttention 'attn' ({type(block).__name__})."
                )
            sites.append((f"{prefix}.{i}.attn", block, "attn"))
        return sites
    if backend == "hf":
        sub = getattr(model, "vision_model" if tower == "image" else "text_model", None)
        if sub is None or not hasattr(getattr(sub, "encoder", None), "layers"):
            raise BackboneError(
                f"LoRA on transformers models needs a CLIPModel (vision_model/text_model encoder layers with "
                f"q_proj/k_proj/v_proj); got {type(model).__name__}."
            )
        prefix = "vision_model.encoder.layers" if tower == "image" else "text_model.encoder.layers"
        return [(f"{prefix}.{i}.self_attn", layer, "self_attn") for i, layer in enumerate(sub.encoder.layers)]
    raise BackboneError(f"LoRA: backend {backend!r} is not supported (open_clip, hf).")


def add_lora(
    model: nn.Module,
    backend: str,
    *,
    towers: Sequence[str] = TOWERS,
    position: str = "all",
    rank: int = 2,
    alpha: float = 1.0,
    dropout: float = 0.25,
    generator: torch.Generator,
    targets: Sequence[str] = TARGETS,
) -> dict[str, nn.Module]:
    """Put LoRA branches on ``targets`` of the attention of the ``position`` blocks of each of ``towers``, in
    place; freeze every other parameter. Returns {module path: adapter} (open_clip: :class:`LoRAAttention` at
    ``….attn``; transformers: :class:`LoRALinear` at ``….self_attn.{q,k,v}_proj``). A's are drawn from
    ``generator`` in tower, block and target order."""
    for p in model.parameters():
        p.requires_grad_(False)
    adapters: dict[str, nn.Module] = {}
    for tower in towers:
        if tower not in TOWERS:
            raise BackboneError(f"LoRA tower {tower!r} is unknown; choose among {list(TOWERS)}.")
        sites = _attention_sites(model, backend, tower)
        chosen = block_indices(position, len(sites))
        if not chosen:
            raise BackboneError(
                f"LoRA position {position!r} selects no block of the {tower} tower ({len(sites)} block(s)); use 'all'."
            )
        for i in chosen:
            path, parent, attr = sites[i]
            module = getattr(parent, attr)
            kw = {"rank": rank, "alpha": alpha, "dropout": dropout, "generator": generator}
            if backend == "open_clip":
                adapter = LoRAAttention(module, targets=targets, **kw)
                setattr(parent, attr, adapter)
                adapters[path] = adapter
            else:
                for p in TARGETS:
                    if p in targets:
                        wrapped = LoRALinear(getattr(module, f"{p}_proj"), **kw)
                        setattr(module, f"{p}_proj", wrapped)
                        adapters[f"{path}.{p}_proj"] = wrapped
    return adapters


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of every LoRA A and B in ``model`` (the only parameters that train)."""
    return {n: p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}


def adapters_of(model: nn.Module) -> Iterator[tuple[str, LoRAAttention | LoRALinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRAAttention | LoRALinear))


def merged_weights(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """{base parameter name: merged float32 CPU weight} of every adapter whose module path starts with ``prefix``:
    ``<path>.in_proj_weight`` (open_clip) or ``<path>.weight`` (transformers' q/k/v Linears), named as in the
    unadapted model's state dict, so they load into a plain copy of it."""
    out = {}
    for path, module in adapters_of(model):
        if not path.startswith(prefix):
            continue
        if isinstance(module, LoRAAttention):
            out[f"{path}.in_proj_weight"] = module.merged_in_proj().cpu()
        else:
            out[f"{path}.weight"] = module.merged_weight().cpu()
    return out


def seed_dropout(model: nn.Module, generator: torch.Generator | None) -> None:
    """Draw every LoRA dropout mask of ``model`` from ``generator`` (on the model's device)."""
    for module in model.modules():
        if isinstance(module, _Branch):
            module.generator = generator


def set_lora_training(model: nn.Module, mode: bool) -> None:
    """Train mode (dropout on the LoRA inputs) for the adapters only; everything else in ``model`` stays in eval."""
    model.eval()
    for _, module in adapters_of(model):
        module.train(mode)


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached float32 CPU copies of every LoRA A and B."""
    return {n: p.detach().float().cpu().clone() for n, p in lora_parameters(model).items()}


# --------------------------------------------------------------------------- forward passes of a copy


def pooled_positions(model: nn.Module, text: torch.Tensor) -> torch.Tensor | None:
    """[T] the token position open_clip's ``CLIP.encode_text`` pools each prompt of ``text`` [T, 77] at (argmax or
    eos pooling), or None when it pools otherwise (or the model is not a plain open_clip ``CLIP``)."""
    pool = getattr(model, "text_pool_type", None)
    if pool == "argmax":
        return text.argmax(dim=-1)
    if pool == "eos" and getattr(model, "text_eos_id", None) is not None:
        return (text == model.text_eos_id).int().argmax(dim=-1)
    return None


def encode_text_trimmed(model: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """open_clip ``CLIP.encode_text`` on ``text`` [T, 77] token ids, run on the first L positions only, L one past
    the last pooled position: with the causal mask no position attends to a later one, so the pooled outputs are
    those of the full 77-token pass (the prompt "a photo of a {}." needs about 10 of the 77: CLIP-LoRA's text
    tower, run on every class at every step, costs that much less). Falls back to ``encode_text`` when the model
    pools otherwise or has no causal mask."""
    positions = pooled_positions(model, text)
    mask = getattr(model, "attn_mask", None)
    if positions is None or mask is None or not hasattr(model, "token_embedding"):
        return model.encode_text(text)
    length = int(positions.max()) + 1
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(text[:, :length]).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), positions]
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def merged_backbone(base: Backbone, state: Mapping[str, torch.Tensor], finetuned: dict[str, Any]) -> Backbone:
    """An inference :class:`Backbone`: ``base`` with the image-tower weights of ``state`` (e.g. :func:`merged_weights`,
    named as in ``base.model``'s state dict) copied in at ``base``'s precision; no LoRA module in it. ``base`` is left
    as it was (the copy owns its image tower and shares the rest). Its identity (and ``cache_key()``) adds
    ``finetuned`` (and, if ``base`` was itself fine-tuned, that record under ``from``)."""
    model = _copy_model(base.model, base.image_tower)
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    shapes = [f"{n} {list(state[n].shape)} (model: {list(params[n].shape)})" for n in state if n in params
              and tuple(state[n].shape) != tuple(params[n].shape)]  # fmt: skip
    if unknown or shapes:
        problems = "; ".join(p for p in (f"unknown weights {unknown[:4]}" if unknown else "", ", ".join(shapes)) if p)
        raise BackboneError(f"fine-tuned weights do not fit model {base.identity.get('model')!r}: {problems}.")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    model.eval().requires_grad_(False)
    identity = copy.deepcopy(base.identity)
    record = dict(finetuned)
    if base.identity.get("finetuned") is not None:
        record["from"] = base.identity["finetuned"]
    identity["finetuned"] = record
    return dataclasses.replace(base, model=model, identity=identity)


def training_copy(base: Backbone) -> nn.Module:
    """A copy of ``base.model`` to put LoRA into: float32 everywhere (a float32 backbone's parameters are shared,
    frozen, not copied; an fp16/bf16 one gets its own float32 copy, the master weights CLIP-LoRA's fix L5 asks for).
    ``base`` keeps its modules and keeps encoding with the pre-trained weights."""
    if base.dtype == torch.float32:
        model = _copy_model(base.model, ())
    else:
        model = copy.deepcopy(base.model).float()
    return model.eval().requires_grad_(False)
