"""Candle's learnable head (:class:`CandleHead`): the token set, the fusion, the training logits, and the exact
per-image inference; and the initial parameters and prototypes.

Exact per-image evaluation without running a (1 + 2C)-token attention per image: the 2C prototype tokens are shared,
so for every head and prototype query p the prototype-only softmax statistics m_p = max_j σ_pj,
Z_p = Σ_j e^{σ_pj − m_p} and U_p = Σ_j e^{σ_pj − m_p}·v_j are computed once. In image b's set, p's attention output is
(U_p·e^{m_p−μ} + e^{σ_pb−μ}·v_b)/(Z_p·e^{m_p−μ} + e^{σ_pb−μ}) = (1 − β_pb)·U_p/Z_p + β_pb·v_b with μ = max(m_p, σ_pb)
and β_pb the weight of the image key (0 where the mask blocks p → b; :func:`~.attention.image_key_weight`). The
out-projection is linear, so p's fused row is ŷ_p = R_p + λ·Σ_h β_pb^h (G_b^h − F_p^h), where R_p (p's fused row
without the image) and F_p^h = W_o^h ū_p^h (head h's share of the out-projection of ū_p = U_p/Z_p) are shared and
G_b^h = W_o^h v_b^h. Only the cosines of ŷ_b with the ŷ_p are needed, and ⟨n(ŷ_b), ŷ_p⟩ and ‖ŷ_p‖² expand into inner
products of R, F and G, so no per-image copy of the 2C fused prototype rows is ever formed: per image a few [2C, H]
and one [2C, H, H] tensor instead of a (1 + 2C)-token attention. The inner products that involve the image are taken
in the heads' d-dimensional value spaces, ⟨u, F_p^h⟩ = ⟨(W_o^h)ᵀu, ū_p^h⟩, ⟨R_p, G^h⟩ = ⟨(W_o^h)ᵀR_p, v_b^h⟩ and
⟨G^h, F_p^k⟩ = ⟨v_b^h, (W_o^h)ᵀF_p^k⟩ (R and F carried back through W_o once per evaluation), about 2C·H²·d
multiply-adds per image. The image's own query attends to itself and the unmasked prototypes (an ordinary softmax
over 1 + 2C keys). Images are processed in chunks that bound memory. The result equals a loop over single-image token
sets (tested to 1e-5 in fp32 and to rounding in fp64).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ...errors import MethodError
from .attention import (
    IMAGE,
    PrototypeContext,
    attention_mask,
    blocked_edges,
    image_key_weight,
    multi_head_attention,
    token_kinds,
)

LOGIT_SCALE = 100.0  # s = exp(CLIP logit scale), fixed
LN_EPS = 1e-5  # nn.LayerNorm's default
VISUAL_INIT_STD = 0.05  # vir_init="visual": noise on the mean base prototype
VIR_INITS = ("text", "visual")
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
        """The prototype-only statistics, shared by every image (see the module docstring)."""
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
        """The scores of a chunk of images, each in its own token set (the algebra is in the module docstring)."""
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
