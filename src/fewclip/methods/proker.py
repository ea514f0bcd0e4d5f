"""ProKeR (CVPR'25): proximal kernel ridge regression on the residual over the zero-shot classifier (training-free).

Every augmented view of every support image is a point (S [N_S, D], N_S = V·N, unit rows; labels one-hot Y):

    Z_S = S Tᵀ                                  zero-shot cosines (no ×100: the residual is on the same scale)
    K   = exp(−β(1 − S Sᵀ))                     [N_S, N_S]
    A   = (K/λ + I)⁻¹ (Y − Z_S)  =  λ(K + λI)⁻¹ (Y − Z_S)
    Z(x) = n(x) Tᵀ + exp(−β(1 − n(x) Sᵀ)) A     logits: cosines plus the kernel correction

λ is the released code's: an *inverse* regulariser. λ → 0 gives A → 0, the zero-shot classifier; λ → ∞ gives
A → Y − Z_S, Tip-Adapter's unnormalised kernel sum of the residuals. With the regulariser ρ = 1/λ the same model
reads A = (ρK + I)⁻¹ R, and strong regularisation (ρ → ∞) is zero-shot. ``fewclip`` keeps the released λ so that the
published grids and values mean the same here.

Selection (β, λ) on the validation split: the released grid search, β outer and λ inner, ties to the first point.
Per β one eigendecomposition K = QΣQᵀ (float64 up to :data:`FLOAT64_MAX_POINTS` points), after which every λ is
A(λ) = Q diag(λ/(σ + λ)) Qᵀ R and the validation logits of a whole chunk of λ are one batched product
Z₀ + (k(X, S) Q) diag(λ/(σ + λ)) (Qᵀ R): the λ axis costs matrix products, not solves. An eigendecomposition costs
as much as 12-25 Cholesky solves of the same size on a CPU (more as N_S grows), so for a short λ axis (the released
grids have 5, 10, 20 or 100 points) ``solver="auto"`` solves per point instead, as released (:func:`eigen_pays`);
both give the same counts. The final A is one Cholesky solve of the well-conditioned K/λ + I (eigenvalues ≥ 1), as with
``selection="none"``.

Memory is O(N_S²): the fit refuses, with its estimate, data whose kernel would not fit in memory, and names the
fallbacks: ``support="images"`` (one point per image: its clean view, or the mean of its views) and
``support="class-means"`` (one point per class); ``support="auto"`` takes the first that fits. The choice is
recorded (``selected_["support_used"]``).

Deviations from the released code (``ybendou/ProKeR`` as vendored at ``f2ecb3d``), see the spec §3.5:

- There is no test-tuned mode. The released ImageNet path (``--hp-selection tip-adapter`` and ``coop``) searches the
  grid on ImageNet's *test* set; here selection is on the bundle's validation split (for ImageNet that split must come
  from the train images, disjoint from the support) or by cross-validation on the support, never on test.
- ``selection="none"`` with ``init_beta``/``init_lambda`` unset uses the released per-shot "ImageNet transfer" values
  (``hyperparameters.json``): the authors tuned them on ImageNet's test set; they are "tuned elsewhere" for the other
  datasets, recorded as ``init_from``.
- Float64 algebra up to 20,000 points (the released code solves in float32), and the eigen form for long λ axes.
- Classes without support (base-to-new) are not a case of the released code: their one-hot target is 0 at every
  support point, so near the support their logit is pulled to 0 and far from it they keep their zero-shot cosine;
  the base class's calibrated stacking applies (``calibrate``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import MethodError
from ..features.bundle import Bundle
from ..progress import progress
from .base import Method
from .cache import search_step
from .params import Interval, Optional, Options, Real, SequenceOf, param
from .registry import register
from .search import first_argmax, memory_limit, refuse_search_memory

#: how the support becomes kernel points: every view (released), one per image, one per class, or the first that fits
SUPPORTS = ("views", "images", "class-means", "auto")
PRECISIONS = ("auto", "float64", "float32")
SOLVERS = ("auto", "eigen", "cholesky")
#: ``solver="auto"`` takes the eigen form from max(16, 0.3·√N_S) λ per β on: one eigendecomposition costs 12, 19 and
#: 25 Cholesky solves of the same size at N_S = 1,600, 3,200 and 8,000 (one CPU thread), and the search per β breaks
#: even at about 10, 18 and 25 λ (``python benchmarks/bench_fit.py --proker --threads 1``)
EIGEN_MIN_LAMBDAS = 16
EIGEN_LAMBDAS_PER_ROOT_POINT = 0.3


def eigen_pays(lambdas: int, points: int) -> bool:
    """Whether one eigendecomposition per β costs less than ``lambdas`` Cholesky solves of ``points`` points (the
    ratio grows about as √N_S on a CPU: see :data:`EIGEN_MIN_LAMBDAS`)."""
    return lambdas >= max(EIGEN_MIN_LAMBDAS, round(EIGEN_LAMBDAS_PER_ROOT_POINT * points**0.5))


#: ``precision="auto"`` works in float64 up to this many points, float32 above (spec §3.5 P3)
FLOAT64_MAX_POINTS = 20_000
#: the released per-shot (β, λ) of ``configs/RN50/configs_proker/hyperparameters.json`` ("pre-computed hps and averaged
#: per seed", ``--hp-selection imagenet``): tuned by the authors on ImageNet's test set (RN50)
TRANSFER = {1: (3.0, 0.05), 2: (2.6, 0.05), 4: (1.5, 0.05), 8: (1.66, 0.07), 16: (1.7, 0.1)}
#: elements of one chunk of the λ axis (its [L, N_S, C] scaled targets and [L, M, C] logits), and of one block of
#: prediction rows × points
CHUNK_ELEMENTS = 1 << 24
POSITIVE = Interval(Real, 0, None, closed="neither")


# --------------------------------------------------------------------------- pure functions


def kernel(a: torch.Tensor, b: torch.Tensor, beta: float) -> torch.Tensor:
    """k(a, b) = exp(−β(1 − a bᵀ)) [Na, Nb] for unit rows a [Na, D], b [Nb, D] (= exp(−(β/2)‖a − b‖²))."""
    return (a @ b.T).sub_(1.0).mul_(beta).exp_()  # in place: one [Na, Nb] buffer at the peak, not three


def residual_targets(points: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """R = Y − S Tᵀ [N_S, C]: the one-hot labels minus the zero-shot cosines of the support points."""
    return F.one_hot(labels, text.shape[0]).to(points.dtype) - points @ text.T.to(points.dtype)


def proker_coefficients(gram: torch.Tensor, residual: torch.Tensor, lam: float) -> torch.Tensor:
    """A = (K/λ + I)⁻¹ R [N_S, C] by one Cholesky solve (K/λ + I has every eigenvalue ≥ 1); a general solve if the
    factorisation fails in low precision."""
    system = gram / lam
    system.diagonal().add_(1.0)
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        return torch.linalg.solve(system, residual).contiguous()
    return torch.cholesky_solve(residual, chol).contiguous()


def eigen_filters(eigenvalues: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """λ/(σ + λ) [L, N_S] for the kernel's eigenvalues σ [N_S] (clamped at 0: K is positive semi-definite, rounding
    can make the smallest slightly negative) and λ [L]: A(λ) = Q diag(filter) Qᵀ R."""
    sigma = eigenvalues.clamp(min=0)
    lam = lambdas.to(sigma.dtype)[:, None]
    return lam / (sigma[None, :] + lam)


def grid_logits(
    base: torch.Tensor, projected: torch.Tensor, rotated: torch.Tensor, filters: torch.Tensor
) -> torch.Tensor:
    """Logits [L, M, C] of every λ at once: Z₀ + P diag(f_λ) B, with base Z₀ [M, C], P = k(X, S) Q [M, N_S],
    B = Qᵀ R [N_S, C] and the filters f [L, N_S] (:func:`eigen_filters`): one batched product."""
    return base[None] + projected[None] @ (filters[:, :, None] * rotated[None])


def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[L] correct rows of logits [L, M, C] (arg-max, ties to the lowest class)."""
    return (logits.argmax(dim=-1) == labels[None]).sum(dim=1)


def grid_counts(
    points: torch.Tensor,
    residual: torch.Tensor,
    val_cosines: torch.Tensor,
    val_base: torch.Tensor,
    val_labels: torch.Tensor,
    betas: torch.Tensor,
    lambdas: torch.Tensor,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = count_correct,
    bar: Any = None,
    solver: str = "eigen",
) -> torch.Tensor:
    """counts[i, j] [B, L]: validation rows right at (β_i, λ_j), for support ``points`` [N_S, D] and their
    ``residual`` [N_S, C] (working precision), the validation rows' cosines to the points [M, N_S] and zero-shot
    logits ``val_base`` [M, C].

    ``solver="eigen"``: per β the kernel, one eigendecomposition, B = QᵀR and P = k(X, S)Q; then every λ from a
    batched product (:func:`grid_logits`), in chunks of the λ axis of about :data:`CHUNK_ELEMENTS` elements.
    ``solver="cholesky"``: per (β, λ) one Cholesky solve (:func:`proker_coefficients`), as the released code does
    (cheaper than an eigendecomposition for a λ axis of a few points). ``score`` maps logits [L, M, C] and labels to
    [L] counts (the calibrated count while calibrating). ``bar`` advances once per β."""
    shifted = (points @ points.T).sub_(1.0)  # S Sᵀ − 1: the kernel of every β is exp(β·shifted)
    val_shifted = val_cosines - 1.0
    counts = torch.zeros(betas.numel(), lambdas.numel(), dtype=torch.long)
    rows, n, c = val_base.shape[0], points.shape[0], residual.shape[1]
    chunk = max(1, CHUNK_ELEMENTS // max(1, n * c + rows * c))
    for i, beta in enumerate(betas.tolist()):
        gram = torch.mul(shifted, beta).exp_()
        val_kernel = torch.mul(val_shifted, beta).exp_()
        if solver == "cholesky":
            for j, lam in enumerate(lambdas.tolist()):
                logits = val_base + val_kernel @ proker_coefficients(gram, residual, lam)
                counts[i, j] = score(logits[None], val_labels)[0]
        else:
            sigma, q = torch.linalg.eigh(gram)
            del gram
            rotated, projected = q.T @ residual, val_kernel @ q
            del q
            for start in range(0, lambdas.numel(), chunk):
                part = lambdas[start : start + chunk]
                logits = grid_logits(val_base, projected, rotated, eigen_filters(sigma, part))
                counts[i, start : start + part.numel()] = score(logits, val_labels)
        if bar is not None:
            bar.update(1)
    return counts


#: the share of the machine's (or GPU's) memory a ProKeR fit plans to use at its peak
MEMORY_FRACTION = 0.8


def kernel_memory(points: int, val_rows: int, classes: int, itemsize: int, lambdas: int = 0) -> int:
    """Bytes a fit holds at its peak for ``points`` kernel points (N_S) of ``itemsize`` bytes, C ``classes``.

    With a search over ``lambdas`` > 0 values of λ on ``val_rows`` rows (M): the cosines S Sᵀ, the kernel, its
    eigenvectors and the eigensolver's workspace (LAPACK's divide-and-conquer takes about 2·N_S² more), five
    [N_S, N_S]; the validation cosines, kernel and P, three [M, N_S]; Qᵀ R and R, two [N_S, C]; one chunk of the λ
    axis, its scaled targets [L, N_S, C] and two [L, M, C] logits. Without a search: the kernel, K/λ + I and its
    Cholesky factor, three [N_S, N_S], plus one more for the factorisation's workspace and the allocator (4.1–4.3·N_S²
    measured before the kernel was computed in place), and two [N_S, C]."""
    if lambdas <= 0:
        return itemsize * (4 * points * points + 2 * points * classes)
    chunk = min(lambdas, max(1, CHUNK_ELEMENTS // max(1, points * classes + val_rows * classes)))
    total = 5 * points * points + 3 * val_rows * points + 2 * points * classes
    return itemsize * (total + chunk * (points * classes + 2 * val_rows * classes))


def gib(n: float) -> str:
    """Bytes in GiB with three significant digits."""
    return f"{n / 2**30:.3g} GiB"


# --------------------------------------------------------------------------- the method


@register("proker")
@dataclass(kw_only=True, repr=False, eq=False)
class ProKeR(Method):
    """Hyperparameters use the released code's names: β the kernel's sharpness, λ the inverse regulariser.

    The default grid is the released configs' most common one, β ∈ linspace(0.5, 3, 20) and λ ∈ linspace(0.001, 1,
    10) (Caltech101, FGVC, Food101, UCF101); presets carry every dataset's grid."""

    cross_validates = True

    search_beta: Sequence[float] = param(
        (0.5, 3.0), SequenceOf(POSITIVE, length=2), doc="first and last β of the grid (torch.linspace, as released)"
    )
    search_lambda: Sequence[float] = param(
        (0.001, 1.0), SequenceOf(POSITIVE, length=2), doc="first and last λ of the grid (torch.linspace, as released)"
    )
    search_step: Sequence[int] = param((20, 10), search_step(2), doc="points of the β and λ grids")
    init_beta: float | None = param(
        None,
        Optional(POSITIVE),
        doc="β without search; None: the released per-shot ImageNet-transfer value (tuned on ImageNet test by the "
        "authors)",
    )
    init_lambda: float | None = param(
        None, Optional(POSITIVE), doc="λ without search; None: the released per-shot ImageNet-transfer value"
    )
    support: str = param(
        "views",
        Options(SUPPORTS),
        doc="kernel points: 'views' every augmented view (released; V·N points), 'images' one per image (its clean "
        "view, else the mean of its views), 'class-means' one per class, 'auto' the first of these that fits in memory",
    )
    precision: str = param(
        "auto",
        Options(PRECISIONS),
        doc=f"working precision of the kernel algebra; 'auto': float64 up to {FLOAT64_MAX_POINTS:,} points, float32 "
        "above",
    )

    solver: str = param(
        "auto",
        Options(SOLVERS),
        doc="how the grid is searched: 'eigen' one eigendecomposition per β, then every λ is a matrix product; "
        "'cholesky' one Cholesky solve per (β, λ), as released; 'auto' eigen from "
        f"max({EIGEN_MIN_LAMBDAS}, {EIGEN_LAMBDAS_PER_ROOT_POINT}·√points) λ values on (the two give the same counts)",
    )

    # ------------------------------------------------------------------ checks
    def _check_params(self) -> None:
        if self.selection in ("val", "cv"):
            nb, nl = (int(v) for v in self.search_step)
            need = 8 * (nb * nl + nb + nl)  # the counts grid and the grids, before any data
            default = type(self).default_params()["search_step"]
            refuse_search_memory(self.name, self.search_step, default, need, memory_limit())
        for key in ("search_beta", "search_lambda"):
            lo, hi = (float(v) for v in getattr(self, key))
            if lo > hi:
                raise MethodError(
                    f"{self.name}: {key}={list(getattr(self, key))} must be [first, last] with first ≤ last."
                )

    def _grids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The β and λ grids, float64."""
        (b0, b1), (l0, l1) = self.search_beta, self.search_lambda
        nb, nl = (int(s) for s in self.search_step)
        return (
            torch.linspace(float(b0), float(b1), nb, dtype=torch.float64),
            torch.linspace(float(l0), float(l1), nl, dtype=torch.float64),
        )

    def _point_counts(self, bundle: Bundle) -> dict[str, int]:
        """Kernel points of each concrete support policy on ``bundle``."""
        return {
            "views": bundle.views * bundle.num_support,
            "images": bundle.num_support,
            "class-means": int((bundle.shots_per_class() > 0).sum()),
        }

    def _dtype(self, points: int) -> torch.dtype:
        if self.precision == "auto":
            return torch.float64 if points <= FLOAT64_MAX_POINTS else torch.float32
        return torch.float64 if self.precision == "float64" else torch.float32

    def _memory(self, bundle: Bundle, points: int, dtype: torch.dtype | None = None) -> int:
        """Peak bytes of a fit with ``points`` kernel points (:func:`kernel_memory`), in ``dtype`` (default: the
        working precision)."""
        search = (self.selection == "val" and bundle.has_val) or self.selection == "cv"
        if not search:
            rows = 0
        else:  # cv: the folds search on held-out support images, fewer than all of them
            rows = int(bundle.val_labels.numel()) if self.selection == "val" else int(bundle.num_support)
        lambdas = int(self.search_step[1]) if search else 0
        itemsize = (dtype or self._dtype(points)).itemsize
        grid = 8 * int(self.search_step[0]) * lambdas  # the counts, int64 [B, L]
        return kernel_memory(points, rows, bundle.num_classes, itemsize, lambdas) + grid

    def _memory_limit(self, bundle: Bundle) -> int:
        """The bytes a fit may plan for: :data:`MEMORY_FRACTION` of the device's memory (the process, the bundle and
        the allocator's slack hold the rest)."""
        device = bundle.support_features.device
        if device.type == "cuda":
            return int(MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory)
        return int(MEMORY_FRACTION * memory_limit())

    def _resolve_support(self, bundle: Bundle) -> str:
        """The support policy that runs: ``support``, or under 'auto' the first that fits. Refuses, with the estimate
        and the fallbacks' estimates, a kernel that would not fit in memory."""
        sizes, limit = self._point_counts(bundle), self._memory_limit(bundle)
        if self.support != "auto":
            chosen = self.support
        else:
            chosen = next((k for k in ("views", "images") if self._memory(bundle, sizes[k]) <= limit), "class-means")
        need = self._memory(bundle, sizes[chosen])
        if need <= limit:
            return chosen
        points = sizes[chosen]
        what = {
            "views": f"V·N = {bundle.views} views × {bundle.num_support:,} images = {points:,} support points",
            "images": f"N = {points:,} support images",
            "class-means": f"{points:,} class means",
        }[chosen]
        dtype = str(self._dtype(points)).removeprefix("torch.")
        fixes = [
            f"support='{k}' ({how}: {sizes[k]:,} points, about {gib(self._memory(bundle, sizes[k]))})"
            for k, how in (("images", "one point per image, as with V = 1"), ("class-means", "one point per class"))
            if sizes[k] < points and self._memory(bundle, sizes[k]) <= limit
        ]
        if dtype == "float64" and self._memory(bundle, points, torch.float32) <= limit:
            fixes.append(f"precision='float32' (about {gib(self._memory(bundle, points, torch.float32))})")
        if fixes:
            fix = "; use " + " or ".join(fixes)
            if self.support != "auto":
                fix += " (support='auto' takes the first of views, images, class-means that fits)"
        else:
            fix = "; no fallback fits either: use fewer classes or shots, or a machine with more memory"
        raise MethodError(
            f"{self.name}: the kernel of {what} needs about {gib(need)} ({dtype} [{points:,} × {points:,}] matrices, "
            f"{points**2:,} entries each), more than this machine's {gib(limit)}{fix}."
        )

    def _check(self, bundle: Bundle) -> None:
        self._resolve_support(bundle)

    # ------------------------------------------------------------------ fitting
    def _points(self, bundle: Bundle, support: str) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Unit kernel points [N_S, D] (float32), their labels and where they came from."""
        views, n, dim = bundle.support_features.shape
        labels = bundle.support_labels
        if support == "views":
            return F.normalize(bundle.support_features.reshape(views * n, dim), dim=-1), labels.repeat(views), "views"
        if support == "images":
            if bundle.support_clean_features is not None:
                return F.normalize(bundle.support_clean_features, dim=-1), labels, "clean view"
            return F.normalize(bundle.support_features.mean(dim=0), dim=-1), labels, "mean of the views"
        unit = F.normalize(bundle.support_features, dim=-1).reshape(views * n, dim)
        sums = torch.zeros(bundle.num_classes, dim, device=unit.device).index_add_(0, labels.repeat(views), unit)
        seen = (bundle.shots_per_class() > 0).nonzero().flatten().to(unit.device)
        return F.normalize(sums[seen], dim=-1), seen, "mean of the class's unit views"

    def _initial_values(self, bundle: Bundle) -> tuple[float, float, str]:
        """(β, λ) without search and where they came from."""
        if self.init_beta is not None and self.init_lambda is not None:
            return float(self.init_beta), float(self.init_lambda), "init_beta, init_lambda"
        shots = bundle.shots_per_class()
        mean = float(shots[shots > 0].double().mean()) if bool((shots > 0).any()) else 1.0
        k = max([key for key in TRANSFER if key <= mean] or [1])
        beta, lam = TRANSFER[k]
        beta = float(self.init_beta) if self.init_beta is not None else beta
        lam = float(self.init_lambda) if self.init_lambda is not None else lam
        return beta, lam, f"imagenet-transfer {k}-shot (released; tuned on ImageNet test by the authors)"

    def _fit_cv(self, data: Bundle) -> dict[str, Any]:
        """Cross-validation on the point set the final fit uses: ``support='auto'`` is resolved once on all the
        support (each fold holds fewer images and could otherwise pick a denser set, tuning β and λ for another
        kernel), then fixed for the folds and the final fit; the constructor value is restored afterwards."""
        chosen, asked = self._resolve_support(data), self.support
        self.support = chosen
        try:
            return super()._fit_cv(data)
        finally:
            self.support = asked

    def _fit(self, bundle: Bundle) -> dict[str, Any]:
        support = self._resolve_support(bundle)
        points, labels, source = self._points(bundle, support)
        dtype = self._dtype(points.shape[0])
        self.text_ = bundle.text_weights.clone()
        self.points_ = points
        work = points.to(dtype)
        residual = residual_targets(work, labels, self.text_)
        beta, lam, init_from = self._initial_values(bundle)
        if self.selection == "val" and bundle.has_val:
            beta, lam = self._search(bundle, work, residual)
            init_from = None
        self.beta_, self.lambda_ = beta, lam
        self.coefficients_ = proker_coefficients(kernel(work, work, beta), residual, lam)
        return {
            "beta": beta,
            "lambda": lam,
            "support_used": support,
            "support_source": source,
            "points": int(points.shape[0]),
            "precision": str(dtype).removeprefix("torch."),
            "init_from": init_from,
        }

    def _search(self, bundle: Bundle, work: torch.Tensor, residual: torch.Tensor) -> tuple[float, float]:
        """(β, λ) of the first maximum of the validation counts over the grid (β outer, λ inner); records
        ``search_`` and, when not calibrating, ``_cv_counts_``."""
        betas, lambdas = self._grids()
        x = F.normalize(bundle.val_features.to(work.device), dim=-1)
        base = (x @ self.text_.T).to(work.dtype)
        cosines = x.to(work.dtype) @ work.T
        labels = bundle.val_labels.to(work.device)
        calibrating = getattr(self, "_calibrating_", False)

        def calibrated(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            rows = y.numel()
            return torch.tensor([round(self._selection_accuracy(z.float(), y) * rows / 100) for z in logits])

        solver = self.solver
        if solver == "auto":
            solver = "eigen" if eigen_pays(lambdas.numel(), work.shape[0]) else "cholesky"
        score = calibrated if calibrating else count_correct
        with progress(betas.numel(), f"{self.name} search", "β", leave=False) as bar:
            counts = grid_counts(work, residual, cosines, base, labels, betas, lambdas, score, bar, solver)
        i, j = first_argmax(counts)
        if not calibrating:
            self._cv_counts_ = counts  # [β, λ]: what selection="cv" sums over its folds
        self.search_ = {
            "evaluations": int(counts.numel()),
            "solver": solver,
            "factorisations": int(betas.numel()) if solver == "eigen" else int(counts.numel()),
            "val_rows": int(labels.numel()),
            "best_correct": int(counts[i, j]),
            "beta_grid": [float(betas[0]), float(betas[-1]), int(betas.numel())],
            "lambda_grid": [float(lambdas[0]), float(lambdas[-1]), int(lambdas.numel())],
        }
        return float(betas[i]), float(lambdas[j])

    def _cv_values(self, index: tuple[int, ...]) -> dict[str, Any]:
        betas, lambdas = self._grids()
        return {"init_beta": float(betas[index[0]]), "init_lambda": float(lambdas[index[1]])}

    # ------------------------------------------------------------------ prediction
    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(features, dim=-1)
        coefficients = self.coefficients_
        points = self.points_.to(coefficients.dtype)
        step = max(1, CHUNK_ELEMENTS // max(1, points.shape[0]))
        parts = []
        for start in range(0, x.shape[0], step):
            rows = x[start : start + step]
            correction = kernel(rows.to(coefficients.dtype), points, self.beta_) @ coefficients
            parts.append((rows @ self.text_.T).to(coefficients.dtype) + correction)
        return torch.cat(parts).float() if parts else x.new_zeros(0, self.text_.shape[0])
