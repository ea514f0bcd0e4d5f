"""Candle's attention: the kinds of tokens in a token set, the masks between them, and multi-head self-attention over
one unbatched sequence (as ``nn.MultiheadAttention`` computes it, with a seeded dropout generator).

A token set is [images; visual prototypes P; text prototypes T] (rows of kinds IMAGE, VISUAL, TEXT). A mask blocks
edges (True = blocked) between visual tokens (images and visual prototypes), between text tokens, or between the two
modalities; a token always sees itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import MethodError

MASKS = ("none", "in_visual", "in_text", "between_visual_text")
#: token kinds in a token set
IMAGE, VISUAL, TEXT = 0, 1, 2


def token_kinds(images: int, classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Kinds of the rows of [images; P; T]: IMAGE × B, VISUAL × C, TEXT × C."""
    counts = torch.tensor([images, classes, classes])
    return torch.repeat_interleave(torch.tensor([IMAGE, VISUAL, TEXT]), counts).to(device)


def blocked_edges(query_kinds: torch.Tensor, key_kinds: torch.Tensor, mask: str) -> torch.Tensor:
    """[Q, K] bool, True where ``mask`` blocks query → key by kind alone (self edges are the caller's business).

    ``in_visual``: visual (image or visual prototype) → visual; ``in_text``: text → text; ``between_visual_text``:
    visual ↔ text both ways; ``none``: nothing.
    """
    qv = (query_kinds != TEXT)[:, None]
    kv = (key_kinds != TEXT)[None, :]
    if mask == "none":
        return torch.zeros(qv.shape[0], kv.shape[1], dtype=torch.bool, device=query_kinds.device)
    if mask == "in_visual":
        return qv & kv
    if mask == "in_text":
        return ~qv & ~kv
    if mask == "between_visual_text":
        return qv != kv
    raise MethodError(f"candle: mask={mask!r} is not valid; choose one of {list(MASKS)}.")


def attention_mask(kinds: torch.Tensor, mask: str) -> torch.Tensor | None:
    """The boolean attention mask of a token set (True = blocked); every token keeps its edge to itself. None for
    ``mask="none"``."""
    if mask == "none":
        return None
    own = torch.eye(kinds.numel(), dtype=torch.bool, device=kinds.device)
    return blocked_edges(kinds, kinds, mask) & ~own


def multi_head_attention(
    x: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor,
    heads: int,
    blocked: torch.Tensor | None = None,
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention over one unbatched sequence x [L, D], as ``nn.MultiheadAttention(D, heads)(x, x, x)`` computes
    it (in-projection rows ordered q, k, v; head h uses columns h·d … (h+1)·d − 1). Dropout with probability
    ``dropout`` acts on the attention weights; its mask is drawn from ``generator`` (CPU). Returns the output [L, D]
    and the per-head softmax weights [H, L, L] (before dropout)."""
    length, dim = x.shape
    d = dim // heads
    q, k, v = F.linear(x, in_proj_weight, in_proj_bias).view(length, 3, heads, d).permute(1, 2, 0, 3)
    scores = (q * (1.0 / math.sqrt(d))) @ k.transpose(1, 2)  # scale the [H, L, d] queries, not the [H, L, L] scores
    if blocked is not None:
        scores = scores.masked_fill(blocked, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if dropout > 0.0:
        keep = torch.rand(weights.shape, generator=generator).ge_(dropout)  # 1.0 kept, 0.0 dropped, in place
        # dropout's 1/(1 − p) rescaling is applied to the [H, L, d] output rather than the [H, L, L] weights
        out = ((weights * keep.to(weights.device, weights.dtype)) @ v) * (1.0 / (1.0 - dropout))
    else:
        out = weights @ v
    out = out.transpose(0, 1).reshape(length, dim)
    return F.linear(out, out_proj_weight, out_proj_bias), weights


def image_key_weight(sigma_pb: torch.Tensor, m: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """β = e^{σ_pb − μ} / (Z_p·e^{m_p − μ} + e^{σ_pb − μ}), μ = max(m_p, σ_pb): the weight prototype query p gives the
    one image key when its prototype-only softmax has maximum m_p and normaliser Z_p (see :mod:`.head`)."""
    mu = torch.maximum(m, sigma_pb)
    own = torch.exp(sigma_pb - mu)
    return own / (z * torch.exp(m - mu) + own)


@dataclass
class PrototypeContext:
    """What every per-image token set shares (the exact per-image inference of :mod:`.head`), for 2C prototype
    tokens [P W_I; T W_T] and H heads of width d (W_o^h [D, d]: head h's columns of the out-projection):

    - ``q, k, v`` [H, 2C, d]: the heads' queries, keys and values of the layer-normalised prototype tokens;
    - ``m, z`` [H, 2C]: the prototype-only softmax statistics m_p, Z_p; ``mean_value`` ū_p^h = U_p^h/Z_p^h [H, 2C, d];
    - ``residual`` R [2C, D]: the fused prototype rows of a set without images, X̄_p + λ·(Σ_h F_p^h + b_o), where
      F_p^h = W_o^h ū_p^h; ``residual_sq`` ‖R_p‖² [2C]; ``residual_head`` ⟨R_p, F_p^h⟩ [2C, H]; ``head_gram``
      ⟨F_p^h, F_p^k⟩ [2C, H, H];
    - ``residual_back`` (W_o^h)ᵀ R_p [H, d, 2C] and ``head_back`` (W_o^h)ᵀ F_p^k [H, d, 2C·H]: R and F carried back
      into each head's d-dimensional value space, so that their inner products with an image's G^h = W_o^h v^h cost
      d rather than D per pair;
    - ``sees_image`` / ``seen_by_image`` [2C] bool: whether the mask lets prototype p attend to the image / the image
      attend to p.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    m: torch.Tensor
    z: torch.Tensor
    mean_value: torch.Tensor
    residual: torch.Tensor
    residual_sq: torch.Tensor
    residual_head: torch.Tensor
    head_gram: torch.Tensor
    residual_back: torch.Tensor
    head_back: torch.Tensor
    sees_image: torch.Tensor
    seen_by_image: torch.Tensor
