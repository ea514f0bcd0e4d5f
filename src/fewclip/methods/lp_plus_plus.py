"""LP++ (CVPR'24, "LinearProbe_P2"): a text-initialised linear probe with blended class weights and closed-form
step sizes (``FereshteShakeri/FewShot-CLIP-Strong-Baseline`` at ``f81054f``; spec §1 of ``new_methods.md``).

With F [N, D] the normalised support features, y [N] their labels and T [C, D] the unit text rows:

    z_ik  = w_kᵀ x_i + b_k + α_k · t_kᵀ x_i                     (Z = X Wᵀ + b + (X Tᵀ) ⊙ α, no temperature)
    W₀    = per-class *sums* of the support features,  b₀ = 0,  α₀ = 250 · mean_k mean_{i: y_i=k} f_iᵀ t_k  (all k)
    lr_W  = 4N / λ_max(FᵀF),   lr_α = N / (4 · max_k Σ_i (f_iᵀ t_k)²)

Training is full-batch gradient descent on the mean cross-entropy for ``epochs`` epochs: W and b by SGD with
momentum 0.9 at lr_W every epoch, α by plain gradient steps at lr_α every ``alpha_every`` (10) epochs. Gradients
are computed in closed form (no autograd): with R = (softmax(Z) − Y)/N, ∇W = Rᵀ F, ∇b = Σ_i R_i, ∇α = Σ_i R_i ⊙ F T.

Deviations from the released code, each behind a labelled option that reproduces it:

- ``alpha_grad``: the released code never clears α's gradient, so the α step at epoch 10m uses the sum of *all*
  α gradients since epoch 1 (``"accumulate"``, spec D1). The default ``"step"`` clears it every epoch (the step at
  epoch 10m uses that epoch's gradient, what ``zero_grad`` over every parameter would do); ``"since_update"`` clears
  it after each α step (the sum of the gradients since the previous one: the spec's "zeroed per update" column).
- ``precision``: the released classifier, α, features and SGD are float16 (spec D4); ``"fp16"`` keeps every
  parameter, feature and matrix product in float16 (softmax in float32, then rounded), default ``"fp32"``. On a CPU
  float16 products are slow (not vectorised): the option is for parity runs on a GPU.
- ``bias_init``: released ``nn.Linear`` default U(−1/√D, 1/√D) (``"torch_default"``, drawn from ``seed``); default
  ``"zeros"`` (deterministic, and the paper's formula has no bias at all; spec D3).
- The released ``preset="released"`` sets all three.

Training view (spec §1.1, D7): the released code trains on **one** random augmented view of each support image
(RandomResizedCrop(0.5–1) + flip: fewclip's ``tip_cache`` augmentation). ``train_view="first"`` (default) takes view 0
of the bundle's ``support_features``, which is one independent random augmentation of each image; ``"random"`` draws
one of the V views per image from ``seed``; ``"clean"`` uses ``support_clean_features`` (a documented variant). The
other views are not used.

Selection: the epoch (1 … ``epochs``), on the validation split after every epoch, ties to the *later* epoch as
released; ``selection="none"`` keeps the last epoch; ``selection="cv"`` sums the per-epoch validation counts over
folds of the support images (``_cv_counts_`` is stored last epoch first, so the base class's first-maximum rule is the
released later-epoch tie rule) and then trains that many epochs on all of them. The validation set of the released
code is K images per class; fewclip uses the bundle's validation split and records its size (``val_rows``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import MethodError
from ..features.bundle import Bundle
from ..progress import progress
from .base import Method
from .params import Integral, Interval, Options, Real, param
from .registry import register
from .threads import threads_for
from .training import EPOCHS, EVAL_ROWS, SEED

ALPHA_GRAD_MODES = ("step", "since_update", "accumulate")
PRECISIONS = ("fp32", "fp16")
BIAS_INITS = ("zeros", "torch_default")
TRAIN_VIEWS = ("first", "random", "clean")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


# --------------------------------------------------------------------------- the maths, as pure functions


def class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, D]: w_k = Σ_{i: y_i = k} f_i (LP++'s initial W: sums, not means; spec D2)."""
    return features.new_zeros(num_classes, features.shape[1]).index_add_(0, labels, features)


def lambda_max_gram(features: torch.Tensor) -> float:
    """λ_max(FᵀF) = σ_max(F)², in float64 from the smaller of FᵀF [D, D] and FFᵀ [N, N]."""
    x = features.double()
    gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    return float(torch.linalg.eigvalsh(gram)[-1])


def step_sizes(features: torch.Tensor, text: torch.Tensor) -> tuple[float, float]:
    """(lr_W, lr_α) = (4N / λ_max(FᵀF), N / (4·max_k Σ_i (f_iᵀ t_k)²)) for F [N, D] and T [C, D], in float64."""
    n = features.shape[0]
    cos = features.double() @ text.double().T  # [N, C]
    return 4.0 * n / lambda_max_gram(features), n / (4.0 * float((cos * cos).sum(0).max()))


def alpha_init(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, scale: float = 250.0) -> float:
    """α₀ = scale · (1/C) Σ_k α̃_k with α̃_k = mean_{i: y_i=k} f_iᵀ t_k, the mean zero-shot cosine of class k on its own
    support (every class needs support)."""
    own = (features.double() * text.double()[labels]).sum(1)  # f_iᵀ t_{y_i}
    num_classes = text.shape[0]
    counts = torch.bincount(labels, minlength=num_classes).double()
    per_class = own.new_zeros(num_classes).index_add_(0, labels, own) / counts
    return scale * float(per_class.mean())


def lpp_logits(
    features: torch.Tensor, zero_shot: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """Z = X Wᵀ + b + (X Tᵀ) ⊙ α, with ``zero_shot`` = X Tᵀ [M, C] precomputed."""
    return torch.addmm(bias, features, weight.T) + zero_shot * alpha


def lpp_gradients(
    features: torch.Tensor,
    zero_shot: torch.Tensor,
    onehot: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    alpha: torch.Tensor,
) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean CE, ∇W [C, D], ∇b [C], ∇α [C]) of the support's cross-entropy, in closed form. The softmax runs in float32
    (float64 for float64 inputs) and R = (P − Y)/N is rounded back to the parameters' dtype."""
    logits = lpp_logits(features, zero_shot, weight, bias, alpha)
    wide = logits.double() if logits.dtype == torch.float64 else logits.float()
    log_p = torch.log_softmax(wide, dim=1)
    loss = float(-(log_p * onehot).sum(1).mean())
    residual = (log_p.exp() - onehot).div_(features.shape[0]).to(features.dtype)
    return loss, residual.T @ features, residual.sum(0), (residual * zero_shot).sum(0)


@dataclass
class LppState:
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    alpha: torch.Tensor  # [C]

    def clone(self) -> LppState:
        return LppState(self.weight.clone(), self.bias.clone(), self.alpha.clone())


@dataclass
class LppRun:
    """What :func:`train_lpp` returns: the state at the chosen epoch, the per-epoch record and the step sizes."""

    state: LppState
    epoch: int  # 1-based; 0 when no epoch ran
    losses: list[float]  # mean CE before each epoch's step
    val_correct: list[int] | None  # correct validation rows after each epoch
    lr_w: float
    lr_alpha: float
    alpha0: float


def train_lpp(
    features: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
    *,
    epochs: int = 300,
    momentum: float = 0.9,
    alpha_every: int = 10,
    alpha_scale: float = 250.0,
    lr_w_scale: float = 1.0,
    alpha_grad: str = "step",
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    evaluate: Callable[[LppState], int] | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> LppRun:
    """Train LP++ on normalised support ``features`` [N, D] (labels [N]) with unit text rows ``text`` [C, D].

    ``bias`` is the initial bias (zeros when None). ``evaluate(state) -> correct`` is called after every epoch; the
    returned state is that of the last epoch with the most correct rows (ties: the later epoch), or of the last
    epoch without ``evaluate``. Everything runs in ``dtype`` (step sizes and α₀ are computed in float64 from the
    features rounded to it)."""
    if alpha_grad not in ALPHA_GRAD_MODES:
        raise ValueError(f"alpha_grad={alpha_grad!r}; choose one of {ALPHA_GRAD_MODES}")
    num_classes = text.shape[0]
    x, t = features.to(dtype), text.to(dtype)
    lr_w, lr_alpha = step_sizes(x, t)
    lr_w *= lr_w_scale
    alpha0 = alpha_init(x, labels, t, alpha_scale)
    zero_shot = x @ t.T  # [N, C], fixed
    onehot = F.one_hot(labels, num_classes).to(torch.float64 if dtype == torch.float64 else torch.float32)
    state = LppState(
        class_sums(x, labels, num_classes),
        x.new_zeros(num_classes) if bias is None else bias.to(x.device, dtype).clone(),
        x.new_full((num_classes,), alpha0),
    )
    velocity_w, velocity_b = torch.zeros_like(state.weight), torch.zeros_like(state.bias)
    alpha_grad_sum = torch.zeros_like(state.alpha)
    best, best_epoch, best_correct = state.clone(), 0, -1
    losses: list[float] = []
    val_correct: list[int] | None = [] if evaluate is not None else None
    for epoch in range(1, epochs + 1):
        loss, g_w, g_b, g_alpha = lpp_gradients(x, zero_shot, onehot, state.weight, state.bias, state.alpha)
        losses.append(loss)
        velocity_w.mul_(momentum).add_(g_w)  # PyTorch SGD momentum: v ← μ·v + g (first step: v = g), W ← W − lr·v
        velocity_b.mul_(momentum).add_(g_b)
        state.weight.sub_(lr_w * velocity_w)
        state.bias.sub_(lr_w * velocity_b)
        alpha_grad_sum = g_alpha if alpha_grad == "step" else alpha_grad_sum + g_alpha
        if epoch % alpha_every == 0:
            state.alpha.sub_(lr_alpha * alpha_grad_sum)
            if alpha_grad == "since_update":
                alpha_grad_sum = torch.zeros_like(state.alpha)
        if evaluate is not None:
            correct = int(evaluate(state))
            val_correct.append(correct)
            if correct >= best_correct:  # ties: the later epoch (released)
                best, best_epoch, best_correct = state.clone(), epoch, correct
        if on_epoch is not None:
            on_epoch(epoch)
    if evaluate is None:
        best, best_epoch = state, epochs
    return LppRun(best, best_epoch, losses, val_correct, lr_w, lr_alpha, alpha0)


def count_correct(
    features: torch.Tensor, zero_shot: torch.Tensor, labels: torch.Tensor, state: LppState, rows: int = EVAL_ROWS
) -> int:
    """Rows of ``features`` [M, D] (their ``zero_shot`` = X Tᵀ [M, C]) whose LP++ arg-max is their label."""
    correct = 0
    for i in range(0, features.shape[0], rows):
        z = lpp_logits(features[i : i + rows], zero_shot[i : i + rows], state.weight, state.bias, state.alpha)
        correct += int((z.argmax(1) == labels[i : i + rows]).sum())
    return correct


# --------------------------------------------------------------------------- the estimator


@register("lp++")
@dataclass(kw_only=True, repr=False, eq=False)
class LPPlusPlus(Method):
    needs_support_for_every_class = True
    cross_validates = True

    epochs: int = param(300, EPOCHS, doc="full-batch gradient steps (the epoch is chosen among 1 … epochs)")
    momentum: float = param(0.9, Interval(Real, 0, 1, closed="left"), doc="SGD momentum of W and b")
    alpha_every: int = param(
        10, Interval(Integral, 1, None, closed="left"), doc="α takes a gradient step every this many epochs"
    )
    alpha_init_scale: float = param(
        250.0,
        Interval(Real, 0, None, closed="left"),
        doc="α₀ = this × the mean over classes of the mean own-class zero-shot cosine of the support",
    )
    lr_w_scale: float = param(
        1.0, Interval(Real, 0, None, closed="neither"), doc="multiplier η₀ of the closed-form lr_W = 4N/λ_max(FᵀF)"
    )
    alpha_grad: str = param(
        "step",
        Options(ALPHA_GRAD_MODES),
        doc="the gradient of α's step: 'step' (that epoch's gradient), 'since_update' (summed since the previous α "
        "step), 'accumulate' (summed over every epoch so far: the released code, which never clears it)",
    )
    precision: str = param(
        "fp32", Options(PRECISIONS), doc="'fp32', or 'fp16' (parameters, features and SGD in float16, as released)"
    )
    bias_init: str = param(
        "zeros",
        Options(BIAS_INITS),
        doc="'zeros', or 'torch_default' (U(−1/√D, 1/√D) from seed, nn.Linear's init, as released)",
    )
    train_view: str = param(
        "first",
        Options(TRAIN_VIEWS),
        doc="the one feature per support image it trains on: 'first' (view 0: one random augmentation per image, as "
        "released), 'random' (one of the V views per image, drawn from seed), 'clean' (support_clean_features)",
    )
    seed: int = param(0, SEED, doc="seed of the 'random' view draw and of the 'torch_default' bias")

    def _check(self, bundle: Bundle) -> None:
        if self.train_view == "clean" and bundle.support_clean_features is None:
            raise MethodError(
                "lp++: train_view='clean' needs support_clean_features, which this bundle lacks; use "
                "train_view='first' (one augmented view per image, as released) or re-extract the bundle."
            )

    def _train_features(self, bundle: Bundle) -> torch.Tensor:
        if self.train_view == "clean":
            raw = bundle.support_clean_features
        elif self.train_view == "random":
            g = torch.Generator().manual_seed(int(self.seed))
            pick = torch.randint(bundle.views, (bundle.num_support,), generator=g).to(bundle.support_features.device)
            raw = bundle.support_features[pick, torch.arange(bundle.num_support, device=pick.device)]
        else:
            raw = bundle.support_features[0]
        return F.normalize(raw.float(), dim=-1)

    def _initial_bias(self, num_classes: int, dim: int) -> torch.Tensor | None:
        if self.bias_init == "zeros":
            return None
        g = torch.Generator().manual_seed(int(self.seed))
        bound = 1.0 / math.sqrt(dim)
        return (torch.rand(num_classes, generator=g, dtype=torch.float64) * 2 - 1) * bound

    def _fit(self, bundle: Bundle) -> dict[str, Any]:
        dtype = DTYPES[self.precision]
        x = self._train_features(bundle)
        text = bundle.text_weights.float()
        evaluate = None
        if self.selection == "val":
            xv = F.normalize(bundle.val_features.float(), dim=-1).to(dtype)
            zv = xv @ text.to(dtype).T
            yv = bundle.val_labels

            def evaluate(state: LppState) -> int:
                return count_correct(xv, zv, yv, state)

        step_macs = 2 * bundle.num_support * bundle.dim * bundle.num_classes
        with progress(int(self.epochs), f"{self.name} training", "epoch", leave=False) as bar, threads_for(step_macs):
            run = train_lpp(
                x,
                bundle.support_labels,
                text,
                epochs=int(self.epochs),
                momentum=float(self.momentum),
                alpha_every=int(self.alpha_every),
                alpha_scale=float(self.alpha_init_scale),
                lr_w_scale=float(self.lr_w_scale),
                alpha_grad=self.alpha_grad,
                bias=self._initial_bias(bundle.num_classes, bundle.dim),
                dtype=dtype,
                evaluate=evaluate,
                on_epoch=lambda e: bar.update(1),
            )
        self.weight_ = run.state.weight.float()
        self.bias_ = run.state.bias.float()
        self.alpha_ = run.state.alpha.float()
        self.text_ = text.clone()
        self.best_epoch_ = run.epoch
        self.step_sizes_ = {"lr_w": run.lr_w, "lr_alpha": run.lr_alpha, "alpha0": run.alpha0}
        self.train_features_ = {
            "first": "support view 0",
            "random": f"one random view per image (seed {self.seed})",
        }.get(self.train_view, "support_clean_features")
        self.history_ = [
            {"epoch": e + 1, "loss": loss, **({"val_correct": run.val_correct[e]} if run.val_correct else {})}
            for e, loss in enumerate(run.losses)
        ]
        if run.val_correct is not None:
            # last epoch first, so the base class's first-maximum rule keeps the later epoch on ties (as released)
            self._cv_counts_ = torch.tensor(run.val_correct[::-1], dtype=torch.float64)
            self.search_ = {
                "evaluations": len(run.val_correct),
                "best_correct": max(run.val_correct),
                "val_rows": int(bundle.val_labels.numel()),
            }
        return {"epoch": run.epoch}

    def _cv_values(self, index: tuple[int, ...]) -> dict[str, Any]:
        return {"epochs": int(self.epochs) - index[0]}

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(features, dim=-1)
        return lpp_logits(x, x @ self.text_.T, self.weight_, self.bias_, self.alpha_)
