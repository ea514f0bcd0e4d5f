"""Pure functions for the cache methods and their vectorised hyperparameter search.

Shapes use rows (the published code stores keys as columns): image features f [M, D], text rows W [C, D],
cache keys F [N, D] with labels y [N]. Logits of every cache method have the form

    Z(α, β, γ) = Z₀ + α · G(β, γ),   G(β, γ)[m, c] = Σ_{k : y_k = c} exp(−β(1 − A[m, k])) · r_γ[k]

with Z₀ = 100 · f Wᵀ. The search computes Z₀ and A once, exp(−β(1−A)) once per β, the class-wise sums of every γ
in one batched product per β, and the whole α axis of each (β, γ) from one interval per row
(:func:`count_correct_along_alpha`): a cost of O(B·M·(N·Γ + C·Γ)), that of the dense computation of G, whatever the
data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..errors import MethodError
from .calibration import apply_offset

# --------------------------------------------------------------------------- grids


def tip_grid(scale: float, steps: int) -> torch.Tensor:
    """Tip-Adapter's grid for α and β: 0.1 + i·(scale − 0.1)/steps, i = 0 … steps − 1 (scale excluded)."""
    i = torch.arange(int(steps), dtype=torch.float64)
    return (0.1 + i * (float(scale) - 0.1) / int(steps)).float()


def gamma_grid(scale: float, steps: int) -> torch.Tensor:
    """APE's γ grid: l·scale/steps, l = 0 … steps − 1 (starts at 0, scale excluded)."""
    l = torch.arange(int(steps), dtype=torch.float64)
    return (l * float(scale) / int(steps)).float()


def first_argmax(counts: torch.Tensor) -> tuple[int, ...]:
    """Index of the first maximum of ``counts`` in row-major order (the nested-loop, strict-">" choice)."""
    flat = counts.reshape(-1)
    best = flat.max()
    pos = int((flat == best).nonzero()[0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(pos), counts.shape))


# --------------------------------------------------------------------------- class-wise sums


class ClassLayout:
    """Groups the columns of an affinity matrix by class so that Σ_{k: y_k = c} becomes a dense reduction.

    With roughly balanced classes the N columns are gathered into a padded [C, K_max] grid (padding has
    weight 0) and the class sum is a batched matrix product. When padding would more than double the work
    (long-tailed support sets) the sum is an ``index_add`` over the original columns instead.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int):
        self.labels = labels
        self.num_classes = num_classes
        counts = torch.bincount(labels, minlength=num_classes)
        self.kmax = max(int(counts.max()), 1)
        self.padded = num_classes * self.kmax <= 2 * labels.numel()
        self.contiguous = False
        if self.padded:
            order = torch.sort(labels, stable=True).indices
            starts = torch.cumsum(counts, 0) - counts
            sorted_labels = labels[order]
            slot = torch.arange(labels.numel(), device=labels.device) - starts[sorted_labels]
            index = torch.zeros(num_classes, self.kmax, dtype=torch.long, device=labels.device)
            mask = torch.zeros(num_classes, self.kmax, dtype=torch.bool, device=labels.device)
            index[sorted_labels, slot] = order
            mask[sorted_labels, slot] = True
            self.index, self.mask = index, mask
            # labels already grouped and every class K_max entries: arranging is a reshape, not a gather
            self.contiguous = bool(mask.all()) and bool(
                (order == torch.arange(labels.numel(), device=labels.device)).all()
            )

    def arrange(self, columns: torch.Tensor) -> torch.Tensor:
        """[..., N] → [..., C, K_max] (padded) or unchanged."""
        if not self.padded:
            return columns
        if self.contiguous:
            return columns.unflatten(-1, (self.num_classes, self.kmax))
        return columns[..., self.index]

    def arrange_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Per-entry weights [G, N] → [G, C, K_max] with zeros on padding (or unchanged)."""
        if not self.padded:
            return weights
        return weights[:, self.index] * self.mask

    def class_sum(self, phi: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """G[g, m, c] = Σ_{k: y_k = c} phi[m, k]·weights[g, k], from arranged ``phi`` and ``weights``."""
        if self.padded:
            # [M, C, K] × [G, C, K] → [G, M, C]: a batched product over classes.
            return torch.einsum("mck,gck->gmc", phi, weights)
        out = phi.new_zeros(weights.shape[0], phi.shape[0], self.num_classes)
        for g in range(weights.shape[0]):
            out[g].index_add_(1, self.labels, phi * weights[g])
        return out


def phi(affinity: torch.Tensor, beta: float) -> torch.Tensor:
    """φ_β(A) = exp(−β(1 − A))."""
    return torch.exp(-beta * (1.0 - affinity))


# --------------------------------------------------------------------------- α scan

#: Half-width of the band around each crossing of two logits inside which a grid point is evaluated exactly,
#: relative to the magnitude of the row's logits: the reference logits fl(z + fl(α·g)) and the bounds computed here
#: each carry a few units of 2⁻²⁴ of it; 32 units leave a wide margin and still flag almost no grid point.
BAND = 32 * 2.0**-24
#: Added to the band so that it is never zero (and stands in for a margin of exactly zero).
_FLOOR = 1e-30


def correct_mask(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """argmax(logits, -1) == labels with ties to the lowest class index (torch.argmax's rule), for logits [..., C]
    and labels that broadcast to logits.shape[:-1]."""
    return logits.argmax(dim=-1) == labels


class AlphaScanRows(NamedTuple):
    """What the α scan needs of Z₀ [M, C] and the labels, computed once for many g (:func:`alpha_scan_rows`).

    For the margins a − α·h of row m against class c, a = z_y − z_c shrunk ("sure") or grown ("maybe") by the
    row's band: ``upper`` 1/a where a > 0 (else 0), ``lower`` 1/|a| where a < 0 (else 0), ``cap`` 0 where a < 0
    (else +inf); class-first [C, M, 1], with a = +inf for the label's own column (no constraint).
    """

    z0: torch.Tensor
    labels: torch.Tensor
    sure: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    maybe: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def alpha_scan_rows(z0: torch.Tensor, labels: torch.Tensor) -> AlphaScanRows:
    """:class:`AlphaScanRows` of z0 [M, C] and labels [M]."""
    own = z0.gather(1, labels[:, None])
    band = (own.abs() + z0.abs().amax(dim=1, keepdim=True)) * BAND + _FLOOR  # [M, 1]
    diff = own - z0

    def split(a: torch.Tensor, zero: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = a.masked_fill(a == 0, zero).scatter_(1, labels[:, None], float("inf"))  # never exactly 0
        positive = a > 0
        upper = torch.where(positive, a.reciprocal(), 0.0)
        lower = torch.where(positive, 0.0, -a.reciprocal())
        cap = torch.where(positive, float("inf"), 0.0)
        return tuple(t.T.contiguous()[:, :, None] for t in (upper, lower, cap))

    # a zero margin is moved to the side that keeps "sure" an under- and "maybe" an over-approximation
    return AlphaScanRows(z0, labels, split(diff - band, -_FLOOR), split(diff + band, _FLOOR))


def alpha_intervals(rows: AlphaScanRows, g: torch.Tensor, nonnegative: bool) -> tuple[torch.Tensor, ...]:
    """For g class-first [C, M, B]: per (m, b) the open interval (lo, hi) of α ≥ 0 on which row m is surely
    classified correctly and the closed interval [lo′, hi′] outside which it is surely wrong, four [M, B] tensors.

    Row m (label y) is correct at α when z_y + α·g_y beats z_c + α·g_c for every other class c: margins
    a_c − α·h_c (a_c = z_y − z_c, h_c = g_c − g_y), one linear constraint per class, so the set of α is an
    interval: α < a_c/h_c for a_c > 0 < h_c, α > a_c/h_c for a_c < 0 and h_c < 0, and no α for a_c < 0 ≤ h_c.
    Shrinking every margin by the row's band e + α·f (BAND times the magnitudes of z and g) gives the α at which no
    rounding of the logits can change a comparison ("sure"); growing them, the α outside which no rounding can
    make the row correct ("maybe"). With reciprocals of a precomputed, each is two products and two reductions
    over the classes: O(C·M·B) whatever the data. NaN (from non-finite g) leaves "sure" empty and "maybe" whole.
    """
    own = g.gather(0, rows.labels[None, :, None].expand(1, *g.shape[1:]))  # [1, M, B]
    magnitude = g.amax(dim=0, keepdim=True) if nonnegative else g.abs().amax(dim=0, keepdim=True)
    band = (own.abs() + magnitude) * BAND + _FLOOR
    bounds = []
    for (upper, lower, cap), shift, closed in ((rows.sure, own - band, False), (rows.maybe, own + band, True)):
        h = g - shift  # g_c − g_y ± f
        steepest = (h * upper).amax(dim=0)  # max h/a over a > 0: α < 1/that
        flattest = torch.addcmul(cap, h, lower, value=-1.0).amin(dim=0)  # min −h/|a| over a < 0: α > 1/that
        hi = torch.where(steepest > 0, steepest.reciprocal(), float("inf"))
        lo = torch.where(flattest > 0, flattest.reciprocal(), float("inf"))  # ≤ 0: no α
        lo = lo.masked_fill_(flattest == float("inf"), float("-inf"))  # no lower bound
        # NaN compares false above: both bounds are +inf; "maybe" then has no lower bound, "sure" no upper
        if closed:
            lo.masked_fill_(flattest.isnan(), float("-inf"))
        else:
            hi.masked_fill_(steepest.isnan(), float("-inf"))
        bounds += [lo, hi]
    return tuple(bounds)


def count_correct_along_alpha(
    z0: torch.Tensor,
    g: torch.Tensor,
    labels: torch.Tensor,
    alphas: torch.Tensor,
    budget: int = 1 << 19,
    nonnegative: bool | None = None,
    rows: AlphaScanRows | None = None,
) -> torch.Tensor:
    """counts[b, j] = #{m : argmax_c(z0[m] + alphas[j]·g[b, m]) = labels[m]}, int64, for g [B, M, C].

    Exactly the counts of a nested loop over the grid (logits z0 + α·g in float32, arg-max with ties to the lowest
    class), at a cost of O(B·M·C) plus O(B·M·log A), not O(B·M·C·A): each row's correct α form an interval
    (:func:`alpha_intervals`), counted on the grid with a difference array; the rare grid points within rounding
    of an interval's end are evaluated as the nested loop does. Negative α are scanned as −α on −g (the same float
    products); the grid may be in any order. Work goes in chunks of about ``budget`` elements of g (small enough
    to stay in cache). ``nonnegative`` states that g ≥ 0 (None: checked); ``rows`` is :func:`alpha_scan_rows` of
    (z0, labels), when the caller reuses it over many g. g [B, M, C] is fastest as a view of a class-first
    [C, M, B] tensor (as :func:`cache_search` makes it).
    """
    num_b, num_m, num_c = g.shape
    counts = torch.zeros(num_b, alphas.numel(), dtype=torch.long)
    rows = alpha_scan_rows(z0, labels) if rows is None else rows
    negative = alphas < 0
    if bool(negative.any()):
        counts[:, negative] = count_correct_along_alpha(z0, -g, labels, -alphas[negative], budget, False, rows)
        keep = ~negative
        counts[:, keep] = count_correct_along_alpha(z0, g, labels, alphas[keep], budget, nonnegative, rows)
        return counts
    if nonnegative is None:
        nonnegative = bool((g >= 0).all())
    grid, order = torch.sort(alphas.to(g.dtype), stable=True)
    by_class = g.permute(2, 1, 0)  # [C, M, B]
    if not by_class.is_contiguous():
        by_class = by_class.contiguous()
    bounds = [torch.empty(num_m, num_b) for _ in range(4)]
    step = max(1, budget // max(1, num_b * num_c))
    for start in range(0, num_m, step):
        part = slice(start, start + step)
        chunk = AlphaScanRows(
            rows.z0, rows.labels[part], *(tuple(t[:, part] for t in side) for side in (rows.sure, rows.maybe))
        )
        for out, bound in zip(bounds, alpha_intervals(chunk, by_class[:, part], nonnegative)):
            out[part] = bound
    counts[:, order] = _count_on_grid(z0, g, labels, grid, *(b.T for b in bounds))
    return counts


def _count_on_grid(
    z0: torch.Tensor,
    g: torch.Tensor,
    labels: torch.Tensor,
    grid: torch.Tensor,
    sure_lo: torch.Tensor,
    sure_hi: torch.Tensor,
    maybe_lo: torch.Tensor,
    maybe_hi: torch.Tensor,
) -> torch.Tensor:
    """counts[b, j] over the ascending ``grid`` [A] from each row's intervals [B, M] (see :func:`alpha_intervals`):
    the grid points inside (sure_lo, sure_hi) count as correct; those inside [maybe_lo, maybe_hi] but not surely
    correct are evaluated exactly."""
    num_b, num_a = g.shape[0], grid.numel()
    first = torch.searchsorted(grid, sure_lo.contiguous(), right=True)  # α > lo
    stop = torch.searchsorted(grid, sure_hi.contiguous())  # α < hi
    maybe_first = torch.searchsorted(grid, maybe_lo.contiguous())  # α ≥ lo′
    maybe_stop = torch.searchsorted(grid, maybe_hi.contiguous(), right=True)  # α ≤ hi′
    empty = stop <= first
    first = torch.where(empty, maybe_first, first)
    stop = torch.where(empty, first, stop)
    maybe_first = torch.minimum(maybe_first, first)
    maybe_stop = torch.maximum(maybe_stop, stop)
    # the surely correct points [first, stop) of each row: +1 at first, −1 at stop, summed along the grid
    offset = torch.arange(num_b)[:, None] * (num_a + 1)
    size = num_b * (num_a + 1)
    delta = torch.bincount((offset + first).view(-1), minlength=size) - torch.bincount(
        (offset + stop).view(-1), minlength=size
    )
    counts = delta.view(num_b, num_a + 1).cumsum(1)[:, :num_a].contiguous()
    # the undecided points [maybe_first, first) and [stop, maybe_stop), evaluated as the reference does
    for lo, hi in ((maybe_first, first), (stop, maybe_stop)):
        length = (hi - lo).view(-1)
        cells = length.nonzero().squeeze(1)
        if cells.numel() == 0:
            continue
        repeats = length[cells]
        cell = cells.repeat_interleave(repeats)  # flat (b, m) of every undecided point
        within = torch.arange(cell.numel()) - (repeats.cumsum(0) - repeats).repeat_interleave(repeats)
        point = lo.view(-1)[cell] + within
        b, m = cell // g.shape[1], cell % g.shape[1]
        flat = counts.view(-1)
        step = max(1, (1 << 20) // g.shape[2])
        for s in range(0, cell.numel(), step):
            bs, ms, ps = b[s : s + step], m[s : s + step], point[s : s + step]
            logits = z0[ms] + grid[ps, None] * g[bs, ms]
            hit = correct_mask(logits, labels[ms])
            flat += torch.bincount((bs * num_a + ps)[hit], minlength=flat.numel())
    return counts


def search_row_chunk(num_entries: int, budget: int = 1 << 24) -> int:
    """Evaluation rows per chunk so that one [rows, N] float32 slab stays near ``budget`` elements (64 MB)."""
    return max(1, budget // max(num_entries, 1))


def cache_search(
    z0: torch.Tensor,
    affinity: torch.Tensor,
    layout: ClassLayout,
    entry_weights: torch.Tensor,
    labels: torch.Tensor,
    betas: torch.Tensor,
    alphas: torch.Tensor,
    progress=None,
    offsets: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """counts[i, j, l] of correct predictions at (β_i, α_j, weights_l) for Z₀ + α·G(β, weights).

    With ``offsets`` [T] and ``seen`` [C] (bool), counts[i, j, l, t] for Z₀ − δ_t·seen + α·G (calibrated stacking,
    :mod:`~fewclip.methods.calibration`): G is computed once per (chunk, β) and the α axis scanned for every δ.

    ``affinity`` [M, N] is f·Fᵀ (or the refined A′), ``entry_weights`` [Γ, N] the per-entry value weights
    (APE: exp(γ_l·d); Tip-Adapter: ones [1, N]). Per chunk of evaluation rows and per β: one exponential of the
    arranged affinity and one batched product against the weights of every candidate at once (G for every γ),
    then the α axis of every γ by intervals (:func:`count_correct_along_alpha`). The cost is that of the dense
    computation of G, whatever the data. Evaluation rows are processed in chunks, so memory is bounded whatever M
    is; ``progress`` (a tqdm bar) advances once per (chunk, β).
    """
    weights = layout.arrange_weights(entry_weights)
    nonnegative = bool((entry_weights >= 0).all())  # then every cache term G ≥ 0, since φ > 0
    if layout.padded:
        by_class = weights.permute(1, 2, 0).contiguous()  # [C, K, Γ]
    shifts = torch.zeros(1) if offsets is None else offsets.float()
    mask = torch.zeros(z0.shape[1]) if seen is None else seen.to(z0.dtype)
    counts = torch.zeros(betas.numel(), alphas.numel(), entry_weights.shape[0], shifts.numel(), dtype=torch.long)
    step = search_row_chunk(affinity.shape[1])
    for start in range(0, affinity.shape[0], step):
        # φ_β(A) = exp(β·(A − 1)) (bit-identical to exp(−β(1 − A))): A − 1 once per chunk, then one multiply
        # and one exp per β into a reused buffer (fresh large temporaries cost more than the arithmetic)
        shifted = layout.arrange(affinity[start : start + step]) - 1.0
        if layout.padded:
            shifted = shifted.transpose(0, 1).contiguous()  # [C, rows, K]: G is one batched product per class
            grouped = shifted.new_empty(layout.num_classes, shifted.shape[1], weights.shape[0])
        buffer = torch.empty_like(shifted)
        y_rows = labels[start : start + step]
        z_shifted = [apply_offset(z0[start : start + step], mask.bool(), float(d)) for d in shifts.tolist()]
        scan_rows = [alpha_scan_rows(z, y_rows) for z in z_shifted]
        for i, beta in enumerate(betas.tolist()):
            torch.mul(shifted, beta, out=buffer)
            buffer.exp_()
            if layout.padded:
                g = torch.bmm(buffer, by_class, out=grouped).permute(2, 1, 0)  # [Γ, rows, C] view of [C, rows, Γ]
            else:
                g = layout.class_sum(buffer, weights)
            for t, (z_rows, rows) in enumerate(zip(z_shifted, scan_rows)):
                counts[i, :, :, t] += count_correct_along_alpha(
                    z_rows, g, y_rows, alphas, nonnegative=nonnegative, rows=rows
                ).T
            if progress is not None:
                progress.update(1)
    return counts if offsets is not None else counts[..., 0]


# --------------------------------------------------------------------------- memory


def search_memory(
    steps: list[int] | tuple[int, ...], val_rows: int = 1, entries: int = 1, classes: int = 1, offsets: int = 1
) -> int:
    """Bytes that :func:`cache_search` holds at its peak for grids of ``steps`` points (β, α[, γ]) on ``val_rows``
    validation rows, ``entries`` cache keys and ``classes`` classes (the defaults give the part that depends on the
    grids alone, a lower bound). With B, A, Γ points (Γ = 1 without a third grid), rows m of one chunk
    (:func:`search_row_chunk`), N entries, C classes and T calibration ``offsets`` (1 without calibration):

    - the counts grid, int64 [B, A, Γ, T];
    - per chunk: the shifted affinity and its exp, float32 [m, N] each; G, float32 [C, m, Γ]; per offset the shifted
      logits, float32 [m, C], and the rows' interval constants (:func:`alpha_scan_rows`), six float32 [C, m];
    - per β (:func:`count_correct_along_alpha`): the counts, the difference array and its sum, int64 [Γ, A + 1]
      each; the interval ends, four float32 [m, Γ], and their grid positions, four int64 [m, Γ]; the temporaries of
      :func:`alpha_intervals`, three float32 [C, m′, Γ] on its sub-chunks of m′ rows (about 2¹⁹ elements); the logits
      of the grid points evaluated exactly, float32 [≤ m·A·Γ, C], in chunks of about 2²⁰ elements.
    """
    num_b, num_a = int(steps[0]), int(steps[1])
    num_g = int(steps[2]) if len(steps) > 2 else 1
    rows = min(val_rows, search_row_chunk(entries))
    counts = 8 * num_b * num_a * num_g * offsets
    chunk = 4 * (2 * rows * entries + num_g * rows * classes + 7 * offsets * rows * classes)
    scan = 3 * 8 * num_g * (num_a + 1) + (4 * 4 + 4 * 8) * rows * num_g
    part = min(rows, max(1, (1 << 19) // (num_g * classes)))
    intervals = 3 * 4 * classes * part * num_g
    exact = 4 * min(rows * num_a * num_g, max(1, (1 << 20) // classes)) * classes
    return counts + chunk + scan + intervals + exact


def memory_limit() -> int:
    """The machine's physical memory in bytes (the search runs on the CPU); 16 GiB when it cannot be read."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 16 << 30


def refuse_search_memory(name: str, step: Sequence[int], default: Sequence[int], need: int, limit: int) -> None:
    """Refuse (:class:`~fewclip.errors.MethodError`) a ``search_step`` of method ``name`` whose search would allocate
    ``need`` bytes, more than ``limit`` (:func:`memory_limit`); the message gives both sizes and the ``default``
    step as the fix."""
    if need > limit:
        raise MethodError(
            f"{name}: search_step={list(step)} is a grid of {math.prod(int(s) for s in step):,} points whose "
            f"search would allocate about {human_bytes(need)}, more than this machine's {human_bytes(limit)} of "
            f"memory; use a coarser step (fewer points per grid, e.g. the default search_step={list(default)})."
        )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover
