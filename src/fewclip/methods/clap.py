"""CLAP (CVPR'24): class-adaptive linear probing, a linear probe held near zero-shot by a per-class penalty
(``jusiro/CLAP`` at ``dbdf409`` with Dassl; spec §2 of ``new_methods.md``). ``constraint="none"`` is ZS-LP.

Prototypes P [C, D] start at the raw text embeddings t_k = s_k·n(t_k) (s_k: the bundle's ``text_norms``) and are
trained on every cached augmented view of every support image (a pool of V·N rows, normalised; each view is a
sample of its own) with

    z_ik = s · n(x_i)ᵀ n(p_k)                                  (s = ``logit_scale``, CLIP's 100, frozen)
    L    = mean_B CE(z, y) + (1/C) Σ_k λ_k ‖p_k − t_k‖²         (the penalty on unnormalised vectors)
    λ_k  = mean over the views of class k of the zero-shot probability of class k (computed once, before training)

by SGD (lr 0.1, momentum 0.9, no weight decay), 300 epochs. An epoch (Dassl's) is n_b = max(1, ⌊N/256⌋) batches of
256 consecutive rows of the freshly shuffled pool (the whole pool when it has fewer rows), so it sees about N rows,
not V·N. The learning rate is stepped once per epoch: 1e-5 in epoch 0 (warm-up), then lr/2·(1 + cos(π(e − 1)/epochs))
in epoch e ≥ 1. The final prototypes are kept: CLAP selects nothing (``selects_on_validation = False``), so it needs
no validation split and ``selection`` only says whether the fitted model is scored on one. Gradients are in closed
form: ∇_{p_k} CE = (g_k − n(p_k)⟨n(p_k), g_k⟩)/‖p_k‖ with g = s·Rᵀ X_B, R = (softmax(z) − Y)/|B|; ∇ penalty
= (2/C)·λ_k (p_k − t_k).

Text norms (spec C1): the logits only see directions, but the penalty and the step live in raw space, so the run
depends on s_k. In normalised coordinates p_k = s_k·v_k it is exactly SGD on v_k at a per-class rate lr/s_k² with the
penalty λ_k s_k²‖v_k − n(t_k)‖². A bundle written before ``text_norms`` existed cannot tell s_k: CLAP then warns,
naming the bundle, and takes s_k = 1 (unit text rows as the raw prototypes: by the equivalence, the released run on
a model whose text embeddings have norm 1; with real norms s_k, the same as setting the rate to lr·s_k² and the
penalty to λ_k/s_k²). ``text_norm`` sets one norm for every class instead (overriding the bundle's). For a prompt
ensemble fewclip's text direction is that of the mean of *normalised* sentence embeddings, the released ImageNet one
that of the raw mean (spec C2): the direction differs slightly, the norm is the raw mean's.

Views: the released code trains on 20 ``dassl_train`` passes (RandomResizedCrop(0.08–1) + flip); it uses what the
bundle has (V views of its augmentation; extract with ``--views 20 --augmentation dassl_train`` for parity). The pool
is put in a canonical order (by label, then by a fixed projection of the features) before the seeded shuffle, so
the fit does not depend on the order the support rows arrive in.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DataWarning
from ..features.bundle import Bundle
from ..progress import progress
from .base import Method
from .params import Interval, Optional, Options, Real, param
from .registry import register
from .threads import threads_for
from .training import BATCH_SIZE, EPOCHS, EVAL_ROWS, LEARNING_RATE, SEED

CONSTRAINTS = ("l2", "none")
WARMUP_LR = 1e-5


# --------------------------------------------------------------------------- the maths, as pure functions


def clap_lr(epoch: int, epochs: int, lr: float, warmup_lr: float = WARMUP_LR) -> float:
    """The learning rate of (0-based) ``epoch``: ``warmup_lr`` in epoch 0, then Dassl's cosine lr/2·(1 + cos(π(e − 1)/
    epochs)), stepped once per epoch."""
    if epoch == 0:
        return warmup_lr
    return 0.5 * lr * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))


def batches_per_epoch(num_support: int, batch_size: int) -> int:
    """n_b = max(1, ⌊N/batch⌋): Dassl's loader over the N support images (drop_last once N ≥ batch)."""
    return max(1, num_support // batch_size)


def class_weights(
    features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, scale: float, rows: int = EVAL_ROWS
) -> torch.Tensor:
    """λ [C]: the mean over the rows of class k of softmax(scale · n(x) n(t)ᵀ)_k, the zero-shot probability of the true
    class (``features`` normalised [P, D], ``text`` [C, D] any norm; 0 for a class without rows)."""
    num_classes = text.shape[0]
    t = F.normalize(text, dim=-1)
    own = torch.cat(
        [
            torch.softmax(scale * features[i : i + rows] @ t.T, dim=1).gather(1, labels[i : i + rows, None])[:, 0]
            for i in range(0, features.shape[0], rows)
        ]
    )
    counts = torch.bincount(labels, minlength=num_classes).to(own.dtype)
    return own.new_zeros(num_classes).index_add_(0, labels, own) / counts.clamp(min=1)


def clap_logits(features: torch.Tensor, prototypes: torch.Tensor, scale: float) -> torch.Tensor:
    """z = scale · n(x) n(P)ᵀ."""
    return scale * F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).T


def clap_gradient(
    features: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    anchors: torch.Tensor,
    lam: torch.Tensor,
    scale: float,
) -> tuple[float, float, torch.Tensor]:
    """(mean CE, penalty, ∇_P L [C, D]) of L = mean CE(scale · x n(P)ᵀ, y) + (1/C) Σ_k λ_k ‖p_k − t_k‖² for normalised
    ``features`` [B, D], raw ``prototypes`` P and ``anchors`` T [C, D]."""
    num_classes = prototypes.shape[0]
    norms = prototypes.norm(dim=1, keepdim=True)
    unit = prototypes / norms
    log_p = torch.log_softmax(scale * features @ unit.T, dim=1)
    ce = float(-log_p.gather(1, labels[:, None]).mean())
    residual = log_p.exp()
    residual[torch.arange(labels.shape[0], device=labels.device), labels] -= 1.0
    g = scale * (residual.T @ features) / labels.shape[0]  # ∂CE/∂n(p_k)
    grad = (g - unit * (unit * g).sum(1, keepdim=True)) / norms
    diff = prototypes - anchors
    penalty = float((lam * (diff * diff).sum(1)).sum()) / num_classes
    return ce, penalty, grad.add_(diff * lam[:, None], alpha=2.0 / num_classes)


def canonical_order(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A permutation of the N support images that does not depend on the order they arrive in: by label, then by a
    fixed random projection of their (first-view) features [N, D]."""
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(features.shape[1], generator=g, dtype=torch.float64)
    key = features.double() @ direction
    by_key = torch.argsort(key, stable=True)
    return by_key[torch.argsort(labels[by_key], stable=True)]


@dataclass
class ClapRun:
    prototypes: torch.Tensor  # [C, D] raw, final
    lam: torch.Tensor  # [C]
    steps: int
    history: list[dict[str, Any]]


def train_clap(
    pool: torch.Tensor,
    labels: torch.Tensor,
    anchors: torch.Tensor,
    *,
    num_support: int,
    epochs: int = 300,
    lr: float = 0.1,
    momentum: float = 0.9,
    batch_size: int = 256,
    scale: float = 100.0,
    constraint: str = "l2",
    warmup_lr: float = WARMUP_LR,
    seed: int = 0,
    on_epoch=None,
) -> ClapRun:
    """Train CLAP's prototypes from ``anchors`` (the raw text embeddings [C, D]) on the normalised ``pool`` [P, D] of
    support views with ``labels`` [P]; ``num_support`` (N images) sets the batches per epoch."""
    lam = class_weights(pool, labels, anchors, scale) if constraint == "l2" else anchors.new_zeros(anchors.shape[0])
    prototypes, velocity = anchors.clone(), torch.zeros_like(anchors)
    g = torch.Generator().manual_seed(int(seed))
    n_b = batches_per_epoch(num_support, batch_size)
    history, steps = [], 0
    for epoch in range(epochs):
        rate = clap_lr(epoch, epochs, lr, warmup_lr)
        order = torch.randperm(pool.shape[0], generator=g).to(pool.device)
        ce_sum = penalty = 0.0
        for j in range(n_b):
            rows = order[j * batch_size : (j + 1) * batch_size]
            ce, penalty, grad = clap_gradient(pool[rows], labels[rows], prototypes, anchors, lam, scale)
            velocity.mul_(momentum).add_(grad)  # PyTorch SGD: v ← μ·v + g, p ← p − lr·v
            prototypes.sub_(rate * velocity)
            ce_sum += ce
            steps += 1
        history.append({"epoch": epoch + 1, "lr": rate, "loss": ce_sum / n_b, "penalty": penalty})
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return ClapRun(prototypes, lam, steps, history)


# --------------------------------------------------------------------------- the estimator


@register("clap")
@dataclass(kw_only=True, repr=False, eq=False)
class CLAP(Method):
    selects_on_validation = False
    needs_support_for_every_class = True

    epochs: int = param(300, EPOCHS, doc="epochs (Dassl's: max(1, ⌊N/batch_size⌋) steps each)")
    lr: float = param(0.1, LEARNING_RATE, doc="peak SGD learning rate (cosine schedule over the epochs)")
    momentum: float = param(0.9, Interval(Real, 0, 1, closed="left"), doc="SGD momentum")
    batch_size: int = param(256, BATCH_SIZE, doc="rows per step; an epoch is max(1, ⌊N/batch_size⌋) steps")
    warmup_lr: float = param(WARMUP_LR, LEARNING_RATE, doc="learning rate of the first (warm-up) epoch")
    constraint: str = param(
        "l2", Options(CONSTRAINTS), doc="'l2': the class-adaptive penalty (CLAP); 'none': no penalty (ZS-LP)"
    )
    logit_scale: float = param(
        100.0, Interval(Real, 0, None, closed="neither"), doc="the frozen CLIP logit scale s (OpenAI CLIP: 100)"
    )
    text_norm: float | None = param(
        None,
        Optional(Interval(Real, 0, None, closed="neither")),
        doc="raw text norm s_k used for every class; None: the bundle's text_norms (1.0, with a warning, when the "
        "bundle has none)",
    )
    seed: int = param(0, SEED, doc="seed of the per-epoch shuffle of the pool of views")

    def _norms(self, bundle: Bundle) -> tuple[torch.Tensor, str]:
        if self.text_norm is not None:
            return torch.full((bundle.num_classes,), float(self.text_norm)), f"text_norm={self.text_norm}"
        if bundle.text_norms is not None:
            return bundle.text_norms.float().cpu(), "bundle text_norms"
        meta = bundle.metadata
        name = ", ".join(f"{k}={meta[k]}" for k in ("dataset", "backbone", "shots", "seed") if k in meta)
        warnings.warn(
            f"clap: the bundle ({name or 'no metadata'}) has no text_norms (it predates them); taking every raw "
            "text norm as 1.0, i.e. running CLAP in normalised text space (the released run with text norms s_k "
            "corresponds to lr·s_k² and λ_k/s_k² here). Re-extract the bundle with this fewclip to store the norms, "
            "or set text_norm.",
            DataWarning,
            stacklevel=4,
        )
        return torch.ones(bundle.num_classes), "1.0 (bundle has no text_norms)"

    def _fit(self, bundle: Bundle) -> dict[str, Any]:
        norms, source = self._norms(bundle)
        views, n, dim = bundle.support_features.shape
        device = bundle.support_features.device
        order = canonical_order(bundle.support_features[0].cpu(), bundle.support_labels.cpu()).to(device)
        pool = F.normalize(bundle.support_features[:, order].float(), dim=-1).reshape(views * n, dim)
        labels = bundle.support_labels[order].repeat(views)
        anchors = bundle.text_weights.float() * norms.to(device)[:, None]
        step_macs = 2 * min(int(self.batch_size), views * n) * dim * bundle.num_classes
        with progress(int(self.epochs), f"{self.name} training", "epoch", leave=False) as bar, threads_for(step_macs):
            run = train_clap(
                pool,
                labels,
                anchors,
                num_support=n,
                epochs=int(self.epochs),
                lr=float(self.lr),
                momentum=float(self.momentum),
                batch_size=int(self.batch_size),
                scale=float(self.logit_scale),
                constraint=self.constraint,
                warmup_lr=float(self.warmup_lr),
                seed=int(self.seed),
                on_epoch=lambda e: bar.update(1),
            )
        self.prototypes_ = run.prototypes
        self.lambda_ = run.lam
        self.text_norm_source_ = source
        self.steps_ = run.steps
        self.history_ = run.history
        self.pool_ = {"views": views, "rows": views * n, "batches_per_epoch": batches_per_epoch(n, self.batch_size)}
        return {"text_norms": source}

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        return clap_logits(features, self.prototypes_, float(self.logit_scale))
