"""Calibrated stacking: an offset δ subtracted from the logits of the classes with support ("seen").

A method fitted on a bundle where some classes have no support images scores those classes from text (or from
what it synthesises) and the others from text *and* support, so the seen classes' logits are biased upwards and
images of unseen classes are predicted as seen ones. Calibrated stacking (Chao et al., ECCV'16) predicts

    argmax_c  z_c − δ·[c is seen]

with δ chosen on the validation split. These are the pure functions of that choice:

- :func:`top_gaps`: per row, the best seen logit minus the best unseen one, the shift at which the row's winner
  changes group;
- :func:`offset_grid`: candidate offsets, quantiles of those gaps (so the grid follows the logits' scale, 1 or
  100), with 0 first and then by increasing |δ| (negative before positive at equal |δ|);
- :func:`count_correct_per_offset`: correct rows for every δ of the grid at once (one batched arg-max);
- :func:`first_best`: the first maximiser in grid order, i.e. the smallest shift reaching the best count (δ = 0
  whenever calibration does not help).

Test data never enters: the gaps and the counts are computed on validation logits and labels only.
"""

from __future__ import annotations

import torch

#: quantiles of the validation gaps used as candidate offsets (plus δ = 0)
OFFSET_POINTS = 41
#: the coarser offset axis of a joint search whose every offset repeats an α scan (the cache methods): each offset
#: costs one more scan of the whole (β, α, γ) grid, so 41 points made APE's search about 27 times slower; the
#: chosen model's offset is then refined on the full grid (:func:`refine_offset`)
JOINT_OFFSET_POINTS = 8


def apply_offset(logits: torch.Tensor, seen: torch.Tensor, offset: float) -> torch.Tensor:
    """logits [M, C] with ``offset`` subtracted from the columns where ``seen`` [C] (bool) is True; the input itself
    (same tensor, bit for bit) when the offset is 0."""
    if offset == 0.0:
        return logits
    return logits - offset * seen.to(logits.dtype)


def top_gaps(logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """[M] = max over seen classes − max over unseen classes of logits [..., M, C] (flattened over leading dims);
    empty when one group is empty."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    if not bool(seen.any()) or bool(seen.all()):
        return flat.new_zeros(0)
    return flat[:, seen].amax(dim=1) - flat[:, ~seen].amax(dim=1)


def gaps_along_alpha(
    z0: torch.Tensor, g: torch.Tensor, alphas: torch.Tensor, seen: torch.Tensor, budget: int = 1 << 24
) -> torch.Tensor:
    """:func:`top_gaps` of z0 + α·g [M, C] for every α in ``alphas`` (flattened, [A·M]), in chunks of α of about
    ``budget`` elements, so memory stays bounded at any class count (an [A, M, C] tensor at ImageNet's shape would
    take gigabytes)."""
    step = max(1, budget // max(1, z0.numel()))
    chunks = [alphas[s : s + step] for s in range(0, alphas.numel(), step)]
    parts = [top_gaps(z0[None] + a[:, None, None] * g[None], seen) for a in chunks]
    return torch.cat(parts) if parts else z0.new_zeros(0)


def offset_grid(gaps: torch.Tensor, points: int = OFFSET_POINTS) -> torch.Tensor:
    """Candidate offsets [T]: 0, then the ``points`` quantiles (q = 0, 1/(points − 1), …, 1) of ``gaps``, deduplicated
    and ordered by |δ| (ties: negative first). Shifting by a gap moves that row's winner to the other group, so
    the quantiles cover every shift that can change a prediction, at the logits' own scale."""
    gaps = gaps.reshape(-1).double()
    gaps = gaps[torch.isfinite(gaps)]
    values = torch.zeros(1, dtype=torch.float64)
    if gaps.numel():
        q = torch.linspace(0.0, 1.0, int(points), dtype=torch.float64)
        values = torch.cat([values, torch.quantile(gaps, q)])
    values = torch.unique(values.float())  # sorted ascending, 0 included
    order = sorted(range(values.numel()), key=lambda i: (abs(float(values[i])), float(values[i])))
    return values[order]


def count_correct_per_offset(
    logits: torch.Tensor, labels: torch.Tensor, seen: torch.Tensor, offsets: torch.Tensor, budget: int = 1 << 24
) -> torch.Tensor:
    """counts[t] = #{m : argmax_c(logits[m, c] − offsets[t]·seen[c]) = labels[m]} (int64 [T]), the arg-max with ties
    to the lowest class index: exactly what a loop over the offsets computes, as [T, rows, C] batches of about
    ``budget`` elements."""
    logits = logits.float()
    offsets = offsets.to(logits.dtype)
    counts = torch.zeros(offsets.numel(), dtype=torch.long)
    mask = seen.to(logits.dtype)
    step = max(1, budget // max(1, offsets.numel() * logits.shape[1]))
    for start in range(0, logits.shape[0], step):
        part = logits[start : start + step]
        shifted = part[None] - offsets[:, None, None] * mask  # [T, rows, C]
        counts += (shifted.argmax(dim=-1) == labels[start : start + step]).sum(dim=1)
    return counts


def refine_offset(
    logits: torch.Tensor, labels: torch.Tensor, seen: torch.Tensor, start: float, points: int = OFFSET_POINTS
) -> tuple[float, int, int]:
    """(δ, correct rows at δ, candidates) for the validation logits [M, C] of a model chosen with offset ``start`` on
    a coarse grid: the best of :func:`offset_grid`'s ``points`` quantiles and ``start`` itself (so the count never
    falls below the coarse choice's), first best in order of |δ|."""
    fine = offset_grid(top_gaps(logits, seen), points)
    values = torch.unique(torch.cat([fine, torch.tensor([float(start)], dtype=fine.dtype)]))
    order = sorted(range(values.numel()), key=lambda i: (abs(float(values[i])), float(values[i])))
    grid = values[order]
    counts = count_correct_per_offset(logits, labels, seen, grid)
    t = first_best(counts)
    return float(grid[t]), int(counts[t]), int(grid.numel())


def first_best(counts: torch.Tensor) -> int:
    """Index of the first maximum of ``counts`` [T] (grid order: the smallest |δ| among the best)."""
    return int((counts == counts.max()).nonzero()[0])


def best_offset(
    logits: torch.Tensor, labels: torch.Tensor, seen: torch.Tensor, points: int = OFFSET_POINTS
) -> tuple[float, int, torch.Tensor]:
    """(δ, correct rows at δ, the grid) for validation logits [M, C] and labels [M]."""
    grid = offset_grid(top_gaps(logits, seen), points)
    counts = count_correct_per_offset(logits, labels, seen, grid)
    t = first_best(counts)
    return float(grid[t]), int(counts[t]), grid
