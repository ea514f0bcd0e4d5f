"""Candle (Shi et al., KDD'24, arXiv 2406.12638): joint cross-modal attention over images and class prototypes.

The model (spec ``candle.md`` §3; every formula from the released code ``shijxcs/Candle`` d285eb3):

- Text prototypes T [C, D], one per class, frozen. Visual prototypes P [C, D]: for a class with support images, the
  mean of its clean support features (frozen); for a class without support (a *new* class, wherever its label is),
  a learnable virtual prototype v_c initialised from a **copy** of t_c (``vir_init="text"``) or from the mean base
  prototype plus N(0, 0.05²) noise (``vir_init="visual"``).
- Token set X = [x_1 W_I; …; x_B W_I; P W_I; T W_T] (W_I, W_T full D×D, identity init, rows times W from the right),
  X̄ = LayerNorm(X), Y = X̄ + λ·MHA(X̄, X̄, X̄): one unbatched sequence, 8 heads, attention dropout 0.1 in training,
  PyTorch's default MHA initialisation, λ learnable from 0.1. ``mask`` blocks edges (True = blocked) between visual
  tokens (images and visual prototypes), between text tokens, or between the two modalities; a token always sees
  itself.
- Logits (s = 100): z⁰ = s·n(q W_I)·n(T W_T)ᵀ, z^{vt} = s·n(ŷ(q))·n(ŷ(T))ᵀ, z^{vv} = s·α·n(ŷ(q))·n(ŷ(P))ᵀ. In training
  the query rows are the B images and the C prototypes (targets [y; 0…C−1]); each matrix is (B + C)×C and gets the
  compensating logit-adjusted loss CE(z + τ·log π) with π_c ∝ n_c + 1 (``prior_virtual_count``); the three losses
  are summed. Prediction = z^{vt} + z^{vv} over all C columns (the protocol restricts columns).
- Trainable parameters: 6D² + 6D + 1 + C_n·D (W_I, W_T, MHA in/out projections with biases, LayerNorm affine, λ,
  virtual prototypes).

Training (spec §4): SGD (momentum 0.9, weight decay 5e-4 on every parameter), lr 3e-4, batch 128, 50 epochs,
⌊N/B⌋ iterations per epoch (at least one; the remainder of the shuffled support set is dropped, as Dassl does;
``iterations_per_epoch`` sets another number, drawn from fresh shuffles of the support set, which the long-tail
protocol uses to bound a 115k-image training set, see :mod:`fewclip.protocols.protocol`), one
constant warm-up epoch at 1e-5 then a cosine over the epochs stepped once per epoch (Dassl's
``ConstantWarmupScheduler`` around ``CosineAnnealingLR(T_max=epochs)``: lr(e) = lr₀·(1 + cos(π(e − 1)/E))/2 for the
0-based epoch e ≥ 1). Every epoch draws one of the bundle's V cached augmented views per support image (raw, not
normalised), so CLIP never runs during training. Weights and compute are float32. With ``selection="val"`` and
validation data the epoch with the best validation accuracy (per-image inference, no dropout) is kept, ties to the
earliest; otherwise the last epoch (the released behaviour). Deterministic on CPU for a given ``seed``; support rows
are put in a canonical order first, so the row order of the bundle does not matter.

Fixed defects, each with an option reproducing the released behaviour (spec §7):

- C1: v_c is a copy of t_c and the text prototypes stay frozen. ``tie_virtual_text=True`` sets t_c := sg(v_c) for
  the new classes before every forward, as the released aliasing does (only with ``vir_init="text"``).
- C3: ``inference_context="per_image"`` (default) scores every test image in its own token set {x W_I} ∪ P W_I ∪
  T W_T, so a prediction depends on nothing but that image. ``"transductive"`` evaluates consecutive chunks of
  ``test_batch_size`` (100) rows in the given order, one token set per chunk, as released.
- C2: float32 weights and compute. ``precision="fp16"`` trains fp16 weights with plain SGD and no float32 master copy
  (losses in float32) and evaluates in fp16, as released: updates below half the fp16 spacing round away.

Exact per-image evaluation (spec §6) without running a (1 + 2C)-token attention per image: the 2C prototype tokens
are shared, so for every head and prototype query p the prototype-only softmax statistics m_p = max_j σ_pj,
Z_p = Σ_j e^{σ_pj − m_p} and U_p = Σ_j e^{σ_pj − m_p}·v_j are computed once. In image b's set, p's attention output is
(U_p·e^{m_p−μ} + e^{σ_pb−μ}·v_b)/(Z_p·e^{m_p−μ} + e^{σ_pb−μ}) = (1 − β_pb)·U_p/Z_p + β_pb·v_b with μ = max(m_p, σ_pb)
and β_pb the weight of the image key (0 where the mask blocks p → b). The out-projection is linear, so p's fused
row is ŷ_p = R_p + λ·Σ_h β_pb^h (G_b^h − F_p^h), where R_p (p's fused row without the image) and F_p^h (head h's
share of the out-projection of U_p/Z_p) are shared and G_b^h = W_o^h v_b^h. Only the cosines of ŷ_b with the ŷ_p are
needed, and ⟨n(ŷ_b), ŷ_p⟩ and ‖ŷ_p‖² expand into inner products of R, F and G, so no per-image copy of the 2C fused
prototype rows is ever formed: per image a few [2C, H] and one [2C, H, H] tensor instead of a (1 + 2C)-token
attention. The inner products that involve the image are taken in the heads' d-dimensional value spaces (R and F
carried back through W_o once per evaluation), about 2C·H²·d multiply-adds per image. The image's own query attends
to itself and the unmasked prototypes (an ordinary softmax over 1 + 2C keys). Images are processed in chunks that
bound memory. The result equals a loop over single-image token sets (tested to 1e-5 in fp32 and to rounding in fp64).

Deviations forced by the data (recorded, not options):

- The bundle stores L2-normalised text rows (raw text embeddings are not available), so T holds unit rows; image
  features and the base prototypes are raw. LayerNorm acts per token and z⁰ uses cosines, so the scale of a token
  changes the forward pass only through LayerNorm's eps; it does change training dynamics of the virtual prototypes
  (a parameter that is itself a token: its gradient scales as 1/‖v‖, so a unit-norm ``text`` initialisation moves
  faster relative to its size than a raw CLIP text embedding would). ``vir_init="visual"`` uses raw magnitudes, as
  specified.
- Base prototypes are the mean of ``support_clean_features`` (the test transform); a bundle without them falls back
  to the mean over all cached views of the class (``prototype_source_`` records which).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import MethodError
from ..features.bundle import Bundle
from ..metrics import accuracy
from .base import Method
from .params import Boolean, Integral, Interval, Optional, Options, Real, param
from .registry import register
from .training import BATCH_SIZE, EPOCHS, LEARNING_RATE, SEED, WEIGHT_DECAY, TrainResult, canonical_order, fit_epochs

LOGIT_SCALE = 100.0  # s = exp(CLIP logit scale), fixed
LN_EPS = 1e-5  # nn.LayerNorm's default
VISUAL_INIT_STD = 0.05  # vir_init="visual": noise on the mean base prototype
MASKS = ("none", "in_visual", "in_text", "between_visual_text")
VIR_INITS = ("text", "visual")
INFERENCE_CONTEXTS = ("per_image", "transductive")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
#: token kinds in a token set
IMAGE, VISUAL, TEXT = 0, 1, 2
#: fitted attribute of each learnable parameter
FITTED_PARAMETERS = {
    "w_image": "w_image_",
    "w_text": "w_text_",
    "ln_weight": "ln_weight_",
    "ln_bias": "ln_bias_",
    "in_proj_weight": "in_proj_weight_",
    "in_proj_bias": "in_proj_bias_",
    "out_proj_weight": "out_proj_weight_",
    "out_proj_bias": "out_proj_bias_",
    "ratio": "ratio_",
    "virtual": "virtual_prototypes_",
}
#: floats per [rows, 2C, H, H] tensor in per-image evaluation (bounds memory; results do not depend on it)
PER_IMAGE_BUDGET = 1 << 23
#: the hyperparameters read at prediction time (checked there too)
INFERENCE_PARAMS = ("inference_context", "test_batch_size")
FINITE = Interval(Real, None, None, closed="neither")
POSITIVE = Interval(Real, 0, None, closed="neither")
FRACTION = Interval(Real, 0, 1, closed="left")


# --------------------------------------------------------------------------- the loss and the schedule


def cla_prior(counts: torch.Tensor, virtual_count: float = 1.0) -> torch.Tensor:
    """π_c = (n_c + k) / Σ_j (n_j + k) for the per-class training counts n (any numeric dtype); ``counts`` is not
    modified (the released loss adds 1 in place, defect C9)."""
    shifted = counts.to(torch.float64) + float(virtual_count)
    return (shifted / shifted.sum()).float()


def cla_loss(
    logits: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor, tau: float = 1.0, virtual_count: float = 1.0
) -> torch.Tensor:
    """Compensating logit-adjusted loss: mean over rows of −log softmax(z + τ·log π)_y, π from :func:`cla_prior`."""
    log_prior = torch.log(cla_prior(counts, virtual_count)).to(logits.device, logits.dtype)
    return F.cross_entropy(logits + float(tau) * log_prior, targets)


def candle_lr(epoch: int, epochs: int, lr: float, warmup_lr: float) -> float:
    """Learning rate of the 0-based ``epoch``: ``warmup_lr`` for epoch 0, then lr·(1 + cos(π(e − 1)/E))/2 (Dassl's
    constant warm-up of one epoch wrapping ``CosineAnnealingLR(T_max=E)``, stepped once per epoch)."""
    if epoch == 0:
        return float(warmup_lr)
    return float(lr) * (1.0 + math.cos(math.pi * (epoch - 1) / epochs)) / 2.0


def epoch_order(num: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """The first ``count`` support rows of one epoch: fresh random permutations of range(num), concatenated as far
    as needed. With count ≤ num this is one permutation, truncated (Dassl's shuffled epoch with ``drop_last``)."""
    parts = [torch.randperm(num, generator=generator) for _ in range(max(1, -(-count // num)))]
    return torch.cat(parts)[:count]


# --------------------------------------------------------------------------- attention


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
    one image key when its prototype-only softmax has maximum m_p and normaliser Z_p (spec §6)."""
    mu = torch.maximum(m, sigma_pb)
    own = torch.exp(sigma_pb - mu)
    return own / (z * torch.exp(m - mu) + own)


@dataclass
class PrototypeContext:
    """What every per-image token set shares (spec §6), for 2C prototype tokens [P W_I; T W_T] and H heads of
    width d (W_o^h [D, d]: head h's columns of the out-projection):

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


# --------------------------------------------------------------------------- the model


def initial_parameters(
    dim: int, virtual: torch.Tensor, ratio_init: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The initial learnable tensors: identity projections, LayerNorm (1, 0), ``nn.MultiheadAttention``'s default
    initialisation (Xavier-uniform in-projection, zero biases, out-projection U(±1/√D)) drawn from ``generator``,
    λ = ``ratio_init`` and the given virtual prototypes (copied)."""
    in_bound = math.sqrt(6.0 / (dim + 3 * dim))  # xavier_uniform_ on [3D, D]
    out_bound = 1.0 / math.sqrt(dim)  # kaiming_uniform_(a=√5) of the Linear out-projection
    return {
        "w_image": torch.eye(dim),
        "w_text": torch.eye(dim),
        "ln_weight": torch.ones(dim),
        "ln_bias": torch.zeros(dim),
        "in_proj_weight": (torch.rand(3 * dim, dim, generator=generator) * 2 - 1) * in_bound,
        "in_proj_bias": torch.zeros(3 * dim),
        "out_proj_weight": (torch.rand(dim, dim, generator=generator) * 2 - 1) * out_bound,
        "out_proj_bias": torch.zeros(dim),
        "ratio": torch.tensor(float(ratio_init)),
        "virtual": virtual.detach().clone().float(),
    }


def initial_prototypes(
    features: torch.Tensor,
    labels: torch.Tensor,
    counts: torch.Tensor,
    text: torch.Tensor,
    vir_init: str,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base prototypes [C, D], new classes [C_n], initial virtual prototypes [C_n, D]).

    Base prototype c = mean of the rows of ``features`` [N, D] labelled c (zero rows for the new classes, the
    classes with ``counts`` 0). Virtual prototypes: a copy of the new classes' text rows (``text``), or the mean of
    the base prototypes plus N(0, 0.05²) noise per class (``visual``).
    """
    num_classes, dim = text.shape
    sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels, features.double())
    base = counts > 0
    prototypes = (sums / counts.clamp_min(1).to(sums)[:, None]).float()
    prototypes[~base] = 0.0
    new = (~base).nonzero().flatten()
    if vir_init == "text":
        virtual = text[new].detach().clone().float()
    elif vir_init == "visual":
        noise = torch.randn(new.numel(), dim, generator=generator).to(features.device)
        virtual = prototypes[base].mean(0, keepdim=True) + VISUAL_INIT_STD * noise
    else:
        raise MethodError(f"candle: vir_init={vir_init!r} is not valid; choose one of {list(VIR_INITS)}.")
    return prototypes, new, virtual


class CandleHead(torch.nn.Module):
    """The learnable head: parameters (names of :data:`FITTED_PARAMETERS`, all of the dtype of ``w_image``) plus the
    frozen base prototypes, text prototypes and new-class indices. ``mask``, ``scale`` (α) and ``tie_virtual_text``
    as in :class:`Candle`."""

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        base_prototypes: torch.Tensor,
        text_prototypes: torch.Tensor,
        new_classes: torch.Tensor,
        *,
        heads: int = 8,
        mask: str = "none",
        scale: float = 1.0,
        tie_virtual_text: bool = False,
    ):
        super().__init__()
        dtype = params["w_image"].dtype  # float32, or float16 for a model trained with precision="fp16"
        for name in FITTED_PARAMETERS:
            self.register_parameter(name, torch.nn.Parameter(params[name].detach().clone().to(dtype)))
        self.register_buffer("base_prototypes", base_prototypes.detach().clone().to(dtype))
        self.register_buffer("text_prototypes", text_prototypes.detach().clone().to(dtype))
        self.register_buffer("new_classes", new_classes.detach().clone().long())
        self.heads = int(heads)
        self.mask = mask
        self.scale = float(scale)
        self.tie_virtual_text = bool(tie_virtual_text)

    @property
    def num_classes(self) -> int:
        return int(self.text_prototypes.shape[0])

    def prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, T) [C, D] each: P holds the virtual prototypes in the new classes' rows (differentiable); T is the
        frozen text, with t_c := sg(v_c) for the new classes under ``tie_virtual_text``."""
        visual = self.base_prototypes.index_copy(0, self.new_classes, self.virtual)
        text = self.text_prototypes
        if self.tie_virtual_text:
            text = text.index_copy(0, self.new_classes, self.virtual.detach())
        return visual, text

    def token_set(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(X, kinds): X = [images·W_I; P·W_I; T·W_T] [B + 2C, D] and the kind of every row."""
        visual, text = self.prototypes()
        tokens = torch.cat([torch.cat([images, visual]) @ self.w_image, text @ self.w_text])
        return tokens, token_kinds(images.shape[0], self.num_classes, images.device)

    def layer_norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.ln_weight, self.ln_bias, LN_EPS)

    def fuse(
        self,
        tokens: torch.Tensor,
        kinds: torch.Tensor,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Y, attention weights [H, L, L]) with Y = X̄ + λ·MHA(X̄), X̄ = LayerNorm(X), over one token set."""
        normed = self.layer_norm(tokens)
        attended, weights = multi_head_attention(
            normed,
            self.in_proj_weight,
            self.in_proj_bias,
            self.out_proj_weight,
            self.out_proj_bias,
            self.heads,
            attention_mask(kinds, self.mask),
            dropout,
            generator,
        )
        return normed + self.ratio * attended, weights

    def train_logits(
        self, images: torch.Tensor, dropout: float = 0.0, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z⁰, z^{vt}, z^{vv}), each [B + C, C]: rows are the B images then the C visual/virtual prototypes (targets
        [y; 0 … C − 1]), over the joint token set of the batch."""
        b, c = images.shape[0], self.num_classes
        tokens, kinds = self.token_set(images)
        fused, _ = self.fuse(tokens, kinds, dropout, generator)
        queries, text = F.normalize(tokens[: b + c], dim=-1), F.normalize(tokens[b + c :], dim=-1)
        z0 = LOGIT_SCALE * queries @ text.T
        rows = F.normalize(fused[: b + c], dim=-1)
        zvt = LOGIT_SCALE * rows @ F.normalize(fused[b + c :], dim=-1).T
        zvv = LOGIT_SCALE * self.scale * rows @ F.normalize(fused[b : b + c], dim=-1).T
        return z0, zvt, zvv

    def joint_scores(self, images: torch.Tensor) -> torch.Tensor:
        """z^{vt} + z^{vv} [B, C] of the image rows of one token set holding all of ``images`` (no dropout): the
        released (transductive) evaluation of one test batch."""
        _, zvt, zvv = self.train_logits(images)
        return zvt[: images.shape[0]] + zvv[: images.shape[0]]

    # ----------------------------------------------------------------- exact per-image evaluation
    def prototype_context(self) -> PrototypeContext:
        """The prototype-only statistics of spec §6, shared by every image."""
        visual, text = self.prototypes()
        tokens = torch.cat([visual @ self.w_image, text @ self.w_text])
        count, dim = tokens.shape
        h, d = self.heads, dim // self.heads
        normed = self.layer_norm(tokens)
        q, k, v = F.linear(normed, self.in_proj_weight, self.in_proj_bias).view(count, 3, h, d).permute(1, 2, 0, 3)
        sigma = (q @ k.transpose(1, 2)) / math.sqrt(d)  # [H, 2C, 2C]
        kinds = token_kinds(0, self.num_classes, tokens.device)
        blocked = attention_mask(kinds, self.mask)
        if blocked is not None:
            sigma = sigma.masked_fill(blocked, float("-inf"))
        m = sigma.amax(dim=-1)  # finite: a prototype always sees itself
        e = torch.exp(sigma - m[..., None])
        z = e.sum(dim=-1)
        mean_value = (e @ v) / z[..., None]  # [H, 2C, d]
        w_out = self.out_proj_weight.view(dim, h, d).permute(1, 0, 2)  # W_o^h [H, D, d]
        head_out = (mean_value @ w_out.transpose(1, 2)).transpose(0, 1)  # F_p^h [2C, H, D]
        residual = normed + self.ratio * (head_out.sum(dim=1) + self.out_proj_bias)
        # (W_o^h)ᵀ F_p^k = (W_o^h)ᵀ W_o^k ū_p^k through the [H, H, d, d] blocks of W_oᵀW_o: [H(h), d, 2C·H(k)]
        blocks = torch.einsum("hDe,kDf->hkef", w_out, w_out)
        head_back = torch.einsum("hkef,kpf->hepk", blocks, mean_value).reshape(h, d, count * h)
        image_kind = torch.tensor([IMAGE], device=tokens.device)
        return PrototypeContext(
            q=q,
            k=k,
            v=v,
            m=m,
            z=z,
            mean_value=mean_value,
            residual=residual,
            residual_sq=(residual * residual).sum(dim=-1),
            residual_head=torch.einsum("pd,phd->ph", residual, head_out),
            head_gram=head_out @ head_out.transpose(1, 2),
            residual_back=w_out.transpose(1, 2) @ residual.T,  # [H, d, 2C]
            head_back=head_back,
            sees_image=~blocked_edges(kinds, image_kind, self.mask)[:, 0],
            seen_by_image=~blocked_edges(image_kind, kinds, self.mask)[0],
        )

    def per_image_scores(self, images: torch.Tensor, context: PrototypeContext | None = None) -> torch.Tensor:
        """z^{vt} + z^{vv} [M, C], every image scored in its own token set {x W_I} ∪ P W_I ∪ T W_T (exact, vectorised,
        processed in chunks that bound memory)."""
        ctx = self.prototype_context() if context is None else context
        rows = max(1, PER_IMAGE_BUDGET // max(1, ctx.head_gram.numel()))
        parts = [self._per_image_chunk(ctx, images[i : i + rows]) for i in range(0, images.shape[0], rows)]
        return torch.cat(parts) if parts else images.new_zeros(0, self.num_classes)

    def _per_image_chunk(self, ctx: PrototypeContext, images: torch.Tensor) -> torch.Tensor:
        """The scores of a chunk of images, each in its own token set.

        Prototype p's fused row in image b's set is ŷ_p = R_p + λ·Σ_h β_p^h (G^h − F_p^h), where β_p^h is the weight
        p gives the image key (:func:`image_key_weight`) and G^h = W_o^h v_b^h, F_p^h = W_o^h ū_p^h are head h's
        shares of the out-projection. Only ⟨n(ŷ_b), ŷ_p⟩ and ‖ŷ_p‖ are needed, and both expand into inner products of
        R, G and F. Those that involve the image are taken in the heads' d-dimensional value spaces:
        ⟨u, F_p^h⟩ = ⟨(W_o^h)ᵀu, ū_p^h⟩, ⟨R_p, G^h⟩ = ⟨(W_o^h)ᵀR_p, v_b^h⟩ and ⟨G^h, F_p^k⟩ = ⟨v_b^h, (W_o^h)ᵀF_p^k⟩, so
        an image costs about 2C·H²·d multiply-adds and no [M, 2C, D] tensor is formed.
        """
        count, dim = images.shape
        h, d = self.heads, dim // self.heads
        c, lam = self.num_classes, self.ratio
        normed = self.layer_norm(images @ self.w_image)
        q, k, v = F.linear(normed, self.in_proj_weight, self.in_proj_bias).view(count, 3, h, d).unbind(1)
        # the image query over itself and the prototypes it may see: the image's fused row ŷ_b
        own = (q * k).sum(dim=-1, keepdim=True) / math.sqrt(d)  # [M, H, 1]
        sigma_bp = torch.einsum("mhe,hpe->mhp", q, ctx.k) / math.sqrt(d)
        sigma_bp = sigma_bp.masked_fill(~ctx.seen_by_image, float("-inf"))
        weights = torch.softmax(torch.cat([own, sigma_bp], dim=-1), dim=-1)
        attended = weights[..., :1] * v + torch.einsum("mhp,hpe->mhe", weights[..., 1:], ctx.v)
        image_row = normed + lam * F.linear(attended.reshape(count, dim), self.out_proj_weight, self.out_proj_bias)
        unit = F.normalize(image_row, dim=-1)  # [M, D]
        # every prototype query p, given the one extra key and value of this image
        sigma_pb = torch.einsum("hpe,mhe->mph", ctx.q, k) / math.sqrt(d)  # [M, 2C, H]
        beta = image_key_weight(sigma_pb, ctx.m.T, ctx.z.T) * ctx.sees_image[:, None].to(sigma_pb.dtype)
        w_out = self.out_proj_weight.view(dim, h, d)
        g = torch.einsum("mhe,dhe->mhd", v, w_out)  # G^h [M, H, D]
        heads_v = v.transpose(0, 1)  # v_b^h [H, M, d]
        # numerator ⟨n(ŷ_b), ŷ_p⟩
        unit_back = (unit @ self.out_proj_weight).view(count, h, d).transpose(0, 1)  # (W_o^h)ᵀu [H, M, d]
        unit_g = (unit_back * heads_v).sum(dim=-1).T[:, None, :]  # ⟨u, G^h⟩ [M, 1, H]
        unit_f = (unit_back @ ctx.mean_value.transpose(1, 2)).permute(1, 2, 0)  # ⟨u, F_p^h⟩ [M, 2C, H]
        numerator = unit @ ctx.residual.T + lam * (beta * (unit_g - unit_f)).sum(dim=-1)
        # squared norm ‖ŷ_p‖²
        residual_g = (heads_v @ ctx.residual_back).permute(1, 2, 0)  # ⟨R_p, G^h⟩ [M, 2C, H]
        cross = (heads_v @ ctx.head_back).view(h, count, 2 * c, h)  # ⟨G^h, F_p^k⟩ [H(h), M, 2C, H(k)]
        gram_g = g @ g.transpose(1, 2)  # ⟨G^h, G^k⟩ [M, H, H]
        # [M, 2C, H]; Σ_h β^h·quadratic_h = Σ_{h,k} β^h β^k ⟨G^h − F_p^h, G^k − F_p^k⟩ (cross terms as 2⟨G^h, F_p^k⟩)
        quadratic = torch.bmm(beta, gram_g) - 2.0 * torch.einsum("hmpk,mpk->mph", cross, beta)
        quadratic = quadratic + torch.einsum("phk,mpk->mph", ctx.head_gram, beta)
        squared = (
            ctx.residual_sq
            + 2.0 * lam * (beta * (residual_g - ctx.residual_head)).sum(dim=-1)
            + lam * lam * (quadratic * beta).sum(dim=-1)
        )
        cos = numerator / squared.clamp_min(1e-24).sqrt()  # [M, 2C]
        return LOGIT_SCALE * cos[:, c:] + LOGIT_SCALE * self.scale * cos[:, :c]

    def transductive_scores(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The released evaluation: consecutive chunks of ``batch_size`` rows, each chunk one token set."""
        parts = [self.joint_scores(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
        return torch.cat(parts) if parts else images.new_zeros(0, self.num_classes)


# --------------------------------------------------------------------------- the estimator


@register("candle")
@dataclass(kw_only=True, repr=False, eq=False)
class Candle(Method):
    """Candle with the released defaults of the run example (ViT-B/16, batch 128, lr 3e-4, 50 epochs, α = 1).

    ``inference_context`` and ``test_batch_size`` are read at prediction time, so a fitted model can be evaluated
    both ways.

    Fitted attributes: the learned tensors ``w_image_``, ``w_text_`` [D, D], ``ln_weight_``, ``ln_bias_`` [D],
    ``in_proj_weight_`` [3D, D], ``in_proj_bias_`` [3D], ``out_proj_weight_`` [D, D], ``out_proj_bias_`` [D],
    ``ratio_`` (λ, 0-d), ``virtual_prototypes_`` [C_n, D]; the frozen ``base_prototypes_`` [C, D] (zero rows for new
    classes), ``text_prototypes_`` [C, D] (as used: tied rows under ``tie_virtual_text``), ``new_classes_`` [C_n];
    ``class_counts_`` n_c and ``prior_`` π [C]; ``prototype_source_``; ``trained_parameters_``,
    ``iterations_per_epoch_``, ``history_`` (epoch, lr, loss, val_accuracy), ``best_epoch_``, and the base class's
    ``selection_used_`` (``"val"``, or ``"none"`` when the last epoch was kept), ``selected_`` and ``val_accuracy_``.
    """

    #: with ``selection="val"`` and no validation split the last epoch is kept (the released behaviour)
    falls_back_without_validation = True

    scale: float = param(1.0, POSITIVE, doc="α, the weight of the visual-prototype logits z^{vv}")
    mask: str = param("none", Options(MASKS), doc="which attention edges are blocked")
    vir_init: str = param("text", Options(VIR_INITS), doc="initial virtual prototypes: the text rows or visual noise")
    tau: float = param(1.0, FINITE, doc="τ of the logit adjustment")
    prior_virtual_count: float = param(
        1.0, Interval(Real, 0, None, closed="left"), doc="k in the prior π_c ∝ n_c + k (the released +1)"
    )
    inference_context: str = param(
        "per_image",
        Options(INFERENCE_CONTEXTS),
        doc="each test image in its own token set, or chunks of test_batch_size as released",
        hint="('transductive' reproduces the released batched evaluation.)",
    )
    test_batch_size: int = param(
        100, Interval(Integral, 1, None, closed="left"), doc="rows per token set under inference_context='transductive'"
    )
    tie_virtual_text: bool = param(False, Boolean(), doc="reproduce the released aliasing t_c := sg(v_c) (defect C1)")
    precision: str = param(
        "fp32",
        Options(tuple(PRECISIONS)),
        doc="weights and compute; 'fp16' as released (defect C2)",
        hint="('fp16' reproduces the released fp16 weights.)",
    )
    heads: int = param(8, Interval(Integral, 1, None, closed="left"), doc="attention heads (must divide D)")
    dropout: float = param(0.1, FRACTION, doc="dropout on the attention weights, in training")
    ratio_init: float = param(0.1, FINITE, doc="initial λ, the weight of the attention residual")
    lr: float = param(3e-4, LEARNING_RATE, doc="SGD learning rate after the warm-up epoch")
    epochs: int = param(50, EPOCHS, doc="training epochs (the first is the warm-up)")
    batch_size: int = param(128, BATCH_SIZE, doc="support images per step")
    iterations_per_epoch: int | None = param(
        None,
        Optional(Interval(Integral, 1, None, closed="left")),
        doc="steps per epoch; None: ⌊N/B⌋, every support image once per epoch as released",
        hint="(None: ⌊N/B⌋, the released epoch: every support image once.)",
    )
    momentum: float = param(0.9, FRACTION, doc="SGD momentum")
    weight_decay: float = param(5e-4, WEIGHT_DECAY, doc="SGD weight decay (every parameter)")
    warmup_lr: float = param(1e-5, POSITIVE, doc="learning rate of the warm-up epoch")
    seed: int = param(1, SEED, doc="seed of the initialisation, view draws, batches and dropout")

    # ----------------------------------------------------------------- checks that need the data
    def _check(self, bundle: Bundle) -> None:
        dim = bundle.dim
        if dim % self.heads:
            divisors = [k for k in range(1, min(dim, 16) + 1) if dim % k == 0]
            raise MethodError(
                f"candle: D = {dim} is not divisible by heads = {self.heads}; set heads to a divisor of D "
                f"(e.g. {divisors})."
            )
        if self.tie_virtual_text and self.vir_init != "text":
            raise MethodError(
                "candle: tie_virtual_text=True reproduces the released aliasing of the virtual prototypes with the "
                f"new classes' text rows, which only exists with vir_init='text' (got vir_init={self.vir_init!r})."
            )
        counts = bundle.shots_per_class()
        if int(counts.sum()) == 0:
            raise MethodError(
                "candle: no class has support images; Candle needs labelled images of at least one (base) class "
                "to build visual prototypes. Use zero-shot for a bundle without support."
            )
        prior_counts = counts.double() + float(self.prior_virtual_count)
        if bool((prior_counts <= 0).any()):
            empty = [bundle.classnames[i] for i in (prior_counts <= 0).nonzero().flatten()[:5].tolist()]
            raise MethodError(
                f"candle: prior_virtual_count=0 gives the classes without support (e.g. {empty}) a zero prior and an "
                "infinite loss; use prior_virtual_count > 0 (the released value is 1)."
            )

    # ----------------------------------------------------------------- fitting
    def _fit(self, bundle: Bundle) -> dict[str, Any]:
        device = bundle.support_features.device
        counts = bundle.shots_per_class()
        order = canonical_order(bundle.support_features, bundle.support_labels)
        support = bundle.support_features[:, order].float()
        labels = bundle.support_labels[order]
        if bundle.support_clean_features is not None:
            proto_rows, source = bundle.support_clean_features[order].float(), "support_clean_features"
        else:
            proto_rows, source = support.mean(dim=0), "support_features_mean_over_views"
        text = bundle.text_weights.float()
        generator = torch.Generator().manual_seed(int(self.seed))
        base_prototypes, new_classes, virtual = initial_prototypes(
            proto_rows, labels, counts, text, self.vir_init, generator
        )
        init = initial_parameters(bundle.dim, virtual, float(self.ratio_init), generator)
        dtype = PRECISIONS[self.precision]
        head = CandleHead(
            init, base_prototypes, text, new_classes,
            heads=self.heads, mask=self.mask, scale=float(self.scale), tie_virtual_text=self.tie_virtual_text,
        ).to(device, dtype)  # fmt: skip
        support = support.to(dtype)

        evaluate = None
        if self.selection == "val" and bundle.has_val:
            val = bundle.val_features.to(device, dtype)
            val_labels = bundle.val_labels.to(device)

            def evaluate() -> float:
                return accuracy(head.per_image_scores(val), val_labels)

        result = self._train(head, support, labels, counts, generator, evaluate)
        with torch.no_grad():
            for name, parameter in head.named_parameters():
                parameter.copy_(result.state[name])
            _, used_text = head.prototypes()
        for name, attr in FITTED_PARAMETERS.items():
            setattr(self, attr, getattr(head, name).detach().clone())
        self.base_prototypes_ = head.base_prototypes.clone()
        self.text_prototypes_ = used_text.detach().clone()
        self.new_classes_ = new_classes.clone()
        self.class_counts_ = counts.clone()
        self.prior_ = cla_prior(counts, float(self.prior_virtual_count))
        self.prototype_source_ = source
        self.iterations_per_epoch_ = self._iterations(labels.numel())
        self.trained_parameters_ = int(sum(p.numel() for p in head.parameters()))
        self.best_epoch_ = result.best_epoch
        self.history_ = result.history
        return {"epoch": self.best_epoch_}

    def _iterations(self, num: int) -> int:
        """Steps per epoch: ``iterations_per_epoch``, or ⌊N/B⌋ (at least 1) for N support images."""
        if self.iterations_per_epoch is not None:
            return int(self.iterations_per_epoch)
        return max(1, num // int(self.batch_size))

    def _train(
        self,
        head: CandleHead,
        support: torch.Tensor,
        labels: torch.Tensor,
        counts: torch.Tensor,
        generator: torch.Generator,
        evaluate: Callable[[], float] | None,
    ) -> TrainResult:
        """SGD over the epochs through :func:`~fewclip.methods.training.fit_epochs`: the learning rate set per epoch
        (:func:`candle_lr`), one view per support image and a fresh shuffle per epoch, the three CLA losses summed."""
        device = support.device
        epochs = int(self.epochs)
        num_views, num = support.shape[:2]
        batch = min(int(self.batch_size), num)
        iters = self._iterations(num)
        optimizer = torch.optim.SGD(
            head.parameters(), lr=float(self.warmup_lr), momentum=float(self.momentum),
            weight_decay=float(self.weight_decay),
        )  # fmt: skip
        tau, virtual_count = float(self.tau), float(self.prior_virtual_count)
        prototype_targets = torch.arange(head.num_classes, device=device)
        dropout = float(self.dropout)

        def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
            views = torch.randint(num_views, (num,), generator=generator).to(device)  # one view per image
            order = epoch_order(num, iters * batch, generator).to(device)
            for it in range(iters):
                idx = order[it * batch : (it + 1) * batch]
                yield support[views[idx], idx], torch.cat([labels[idx], prototype_targets])

        def loss(step: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            images, targets = step
            logits = head.train_logits(images, dropout, generator)
            return sum(cla_loss(z.float(), targets, counts, tau, virtual_count) for z in logits)

        return fit_epochs(
            dict(head.named_parameters()),
            optimizer,
            epochs,
            batches,
            loss,
            name=self.name,
            lr=self.lr,
            evaluate=evaluate,
            epoch_lr=lambda epoch: candle_lr(epoch - 1, epochs, float(self.lr), float(self.warmup_lr)),
            steps_per_epoch=iters,
        )

    # ----------------------------------------------------------------- prediction
    def head(self) -> CandleHead:
        """The fitted head (a fresh module around the fitted tensors)."""
        self._check_fitted()
        params = {name: getattr(self, attr) for name, attr in FITTED_PARAMETERS.items()}
        return CandleHead(
            params, self.base_prototypes_, self.text_prototypes_, self.new_classes_,
            heads=self.heads, mask=self.mask, scale=float(self.scale), tie_virtual_text=self.tie_virtual_text,
        )  # fmt: skip

    def predict_logits(self, features: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        """[M, C] = z^{vt} + z^{vv}. Per image by default; under ``inference_context="transductive"`` the rows are
        scored in consecutive chunks of ``test_batch_size`` (the outer ``batch_size`` is rounded to a multiple)."""
        self._validate_params(INFERENCE_PARAMS)
        if self.inference_context == "transductive":
            step = int(self.test_batch_size)
            batch_size = max(step, (int(batch_size) // step) * step)
        return super().predict_logits(features, batch_size)

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        head = self.head().to(features.device)
        features = features.to(head.w_image.dtype)
        if self.inference_context == "transductive":
            return head.transductive_scores(features, int(self.test_batch_size)).float()
        return head.per_image_scores(features).float()
