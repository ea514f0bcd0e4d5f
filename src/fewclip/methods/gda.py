"""GDA (ICLR'24): Gaussian discriminant analysis on the support views, ensembled with zero-shot.

μ_c   = mean of the L2-normalised views of class c
P     = D · ((N − 1)Σ̂ + tr(Σ̂)·I)⁻¹            (shared covariance, KS shrinkage; Cholesky in float64)
w_c   = P μ_c,   b_c = log(1/C) − ½ μ_cᵀ P μ_c
Z     = 100 · n(x) Wᵀ + α · (n(x) w_cᵀ + b_c)_c,   α ∈ {1e-4, …, 100} chosen on validation (first maximum)

Classes without support ("new" classes, base-to-new) get a synthesised mean from their text row t_j, as GDA's
base-to-new code does: μ_j = (Σ of the k = 64 support views most similar to t_j + 16·t_j) / (k + 16). They share
the precision estimated on the classes with support; the released code (``mrflogs/ICLR24``) instead averages
per-class KS precisions of the synthesised classes, with a divisor we could not confirm: a deviation recorded here.

``selection="cv"``: the scale of the GDA logits depends on the support count (P grows as the number of vectors
shrinks, and a precision estimated from fewer vectors is inflated further, as the inverse of a Wishart matrix is), so
an α chosen on folds holding (k − 1)/k of the support does not carry to the full support. α is therefore chosen in a
count-invariant parameterisation: α·Δ², with Δ² = the mean over the classes with support of (μ_c − μ̄)ᵀ P (μ_c − μ̄)
(:func:`gda_spread`, the squared Mahalanobis spread of the class means, which scales with P). Each fold scores the
grid point α_j at α_j·Δ²_full/Δ²_fold, so that its GDA term weighs what α_j weighs on all support; the summed counts
pick α_j, and the final fit uses α_j itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import MethodError
from ..features.bundle import Bundle
from .base import Method
from .calibration import apply_offset, gaps_along_alpha, offset_grid
from .params import Integral, Interval, Real, SequenceOf, param
from .registry import register
from .search import count_correct_along_alpha, first_argmax

ALPHA_GRID = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
#: the weight α of the GDA logits in the ensemble
ALPHA = Interval(Real, 0, None, closed="left")


def symmetric_gram(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """xᵀx [D, D] for x [N, D], computing only the blocks on and above the diagonal (of ``blocks`` × ``blocks``) and
    mirroring the rest: (blocks + 1)/(2·blocks) of the multiply-adds of one product (5/8 for 4 blocks)."""
    dim = x.shape[1]
    edges = [i * dim // blocks for i in range(blocks + 1)]
    out = x.new_empty(dim, dim)
    for lo, hi in zip(edges, edges[1:]):
        if hi == lo:
            continue
        row = x[:, lo:hi].T @ x[:, lo:]  # [hi − lo, D − lo]: the block row from the diagonal on
        out[lo:hi, lo:] = row
        out[hi:, lo:hi] = row[:, hi - lo :].T
    return out


def gda_precision(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means [C, D] (zero rows for classes without features) and the KS-regularised shared precision
    P [D, D] (float64)."""
    x = features.double()
    n, dim = x.shape
    counts = torch.bincount(labels, minlength=num_classes).double()
    sums = torch.zeros(num_classes, dim, dtype=torch.float64).index_add_(0, labels, x)
    means = sums / counts.clamp(min=1)[:, None]
    centred = x - means[labels]
    scatter = symmetric_gram(centred)  # (N − 1)·Σ̂
    trace_cov = torch.trace(scatter) / (n - 1)  # tr(Σ̂)
    system = scatter + trace_cov * torch.eye(dim, dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        raise MethodError(
            "gda: the regularised covariance is not positive definite (are all support features identical?)."
        )
    precision = dim * torch.cholesky_inverse(chol)
    return means, precision


def synthesised_means(
    features: torch.Tensor, text: torch.Tensor, neighbours: int = 64, text_weight: float = 16.0
) -> torch.Tensor:
    """[J, D] means for classes known only by their text rows ``text`` [J, D]: the ``neighbours`` rows of
    ``features`` [N, D] with the highest cosine to t_j, plus ``text_weight`` copies of t_j, averaged."""
    x, t = features.double(), text.double()
    k = min(int(neighbours), x.shape[0])
    nearest = (t @ x.T).topk(k, dim=1).indices  # [J, k]
    return (x[nearest].sum(1) + text_weight * t) / (k + text_weight)


def gda_spread(means: torch.Tensor, precision: torch.Tensor, present: torch.Tensor) -> float:
    """Δ² = mean over the classes with support (``present`` [C] bool) of (μ_c − μ̄)ᵀ P (μ_c − μ̄), μ̄ their mean: the
    scale of the GDA logits (it grows with P); 0.0 with fewer than two such classes."""
    m = means[present].double()
    if m.shape[0] < 2:
        return 0.0
    centred = m - m.mean(dim=0)
    return float(((centred @ precision.double()) * centred).sum(1).mean())


def gda_classifier(means: torch.Tensor, precision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w_c = P μ_c [C, D] and b_c = log(1/C) − ½ μ_cᵀ P μ_c [C] with uniform priors."""
    weights = means @ precision
    bias = -torch.log(torch.tensor(float(means.shape[0]), dtype=torch.float64)) - 0.5 * (weights * means).sum(1)
    return weights, bias


@register("gda")
@dataclass(kw_only=True, repr=False, eq=False)
class GDA(Method):
    cross_validates = True

    alpha_grid: Sequence[float] = param(
        ALPHA_GRID, SequenceOf(ALPHA, min_length=1), doc="α candidates, searched in order (first maximum wins)"
    )
    init_alpha: float = param(1.0, ALPHA, doc="α without search")
    new_class_neighbours: int = param(
        64, Interval(Integral, 1, None, closed="left"), doc="support views averaged into a new class's mean"
    )
    new_class_text_weight: float = param(
        16.0, Interval(Real, 0, None, closed="left"), doc="copies of the text row added to a new class's mean"
    )

    def _check(self, bundle: Bundle) -> None:
        vectors = bundle.views * bundle.num_support
        with_support = int((bundle.shots_per_class() > 0).sum())
        if vectors <= with_support:
            raise MethodError(
                f"gda: {vectors} support vectors for {with_support} classes; need more than one per class."
            )

    #: set on a cv fold's probe: Δ² of all support, to which the fold rescales its α grid (see the module)
    _cv_target_spread = None

    @staticmethod
    def _support(bundle: Bundle) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised support views [V·N, D], their labels, class means, precision)."""
        views, n, dim = bundle.support_features.shape
        x = F.normalize(bundle.support_features.reshape(views * n, dim), dim=-1)
        y = bundle.support_labels.repeat(views)
        return x, y, *gda_precision(x, y, bundle.num_classes)

    def _fit(self, bundle: Bundle) -> dict[str, Any]:
        x, _, means, precision = self._support(bundle)
        new = torch.bincount(bundle.support_labels, minlength=bundle.num_classes) == 0
        self.spread_ = gda_spread(means, precision, ~new)
        # a cv fold: α_j scored at α_j·Δ²_full/Δ²_fold (fixed α too, for the out-of-fold logits of the temperature)
        rescale = 1.0
        if self._cv_target_spread is not None and self.spread_ > 0.0:
            rescale = self._cv_target_spread / self.spread_
        self.new_classes_ = new.nonzero().flatten().tolist()
        if self.new_classes_:
            means[new] = synthesised_means(
                x, bundle.text_weights[new], self.new_class_neighbours, self.new_class_text_weight
            )
        weights, bias = gda_classifier(means, precision)
        self.text_ = bundle.text_weights.clone()
        self.weights_, self.bias_ = weights.float(), bias.float()
        self.alpha_ = float(self.init_alpha) * rescale
        if self.selection == "val":
            grid = torch.tensor([float(a) * rescale for a in self.alpha_grid])
            f = F.normalize(bundle.val_features, dim=-1)
            z0, g = 100.0 * f @ self.text_.T, self._gda_logits(f)
            if self._calibrating_:  # α and the offset δ together: the α axis scanned for every δ (δ innermost)
                offsets = offset_grid(gaps_along_alpha(z0, g, grid, self.seen_classes_))
                shifted = [apply_offset(z0, self.seen_classes_, float(d)) for d in offsets.tolist()]
                counts = torch.stack(
                    [count_correct_along_alpha(z, g[None], bundle.val_labels, grid)[0] for z in shifted]
                )
                j, t = first_argmax(counts.T.contiguous())
                self.calibration_offset_ = float(offsets[t])
                evaluations, counts = int(counts.numel()), counts[t][None]
            else:
                counts = count_correct_along_alpha(z0, g[None], bundle.val_labels, grid)
                self._cv_counts_ = counts[0]  # [A]: what selection="cv" sums over its folds
                evaluations, (_, j) = int(counts.numel()), first_argmax(counts)
            self.alpha_ = float(grid[j])
            self.search_ = {"evaluations": evaluations, "best_correct": int(counts[0, j])}
        return {"alpha": self.alpha_}

    def _cv_values(self, index: tuple[int, ...]) -> dict[str, Any]:
        return {"init_alpha": float(self.alpha_grid[index[0]])}

    def _fit_cv(self, data: Bundle) -> dict[str, Any]:
        """Cross-validation with each fold's α rescaled to all support's Δ² (see the module)."""
        _, _, means, precision = self._support(data)
        self._cv_target_spread = gda_spread(means, precision, data.shots_per_class() > 0)
        try:
            return super()._fit_cv(data)
        finally:
            self._cv_target_spread = None

    def _cv_probe(self) -> Method:
        probe = super()._cv_probe()
        probe._cv_target_spread = self._cv_target_spread
        return probe

    def _cv_fixed(self, values: dict[str, Any]) -> Method:
        probe = super()._cv_fixed(values)
        probe._cv_target_spread = self._cv_target_spread
        return probe

    def _gda_logits(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.weights_.T + self.bias_

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features, dim=-1)
        return 100.0 * f @ self.text_.T + self.alpha_ * self._gda_logits(f)
