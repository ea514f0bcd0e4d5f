"""Pure functions for the cache methods and their vectorised hyperparameter search.

Shapes use rows (the published code stores keys as columns): image features f [M, D], text rows W [C, D],
cache keys F [N, D] with labels y [N]. Logits of every cache method have the form

    Z(α, β, γ) = Z₀ + α · G(β, γ),   G(β, γ)[m, c] = Σ_{k : y_k = c} exp(−β(1 − A[m, k])) · r_γ[k]

with Z₀ = 100 · f Wᵀ. The search computes Z₀ and A once, exp(−β(1−A)) once per β, the class-wise sum once per
(β, γ), and scans every α at once (:func:`count_correct_along_alpha`).
"""

from __future__ import annotations

import os

import torch

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


def correct_mask(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """argmax(logits, -1) == labels with ties to the lowest class index, for logits [..., C] and labels that
    broadcast to logits.shape[:-1]."""
    own, other = _own_and_best_other(logits.clone(), labels)
    return _resolve(logits, labels, own, other)


def _own_and_best_other(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The label's logit and the best other logit; ``logits`` is overwritten (label column set to −inf).

    ``amax`` is an order of magnitude faster than ``argmax`` on CPU, which is why the arg-max is avoided.
    """
    index = labels.expand(*logits.shape[:-1]).unsqueeze(-1)
    own = logits.gather(-1, index).squeeze(-1)
    logits.scatter_(-1, index, float("-inf"))
    return own, logits.amax(dim=-1)


def _resolve(logits_or_fn, labels: torch.Tensor, own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """own > other is correct, own < other wrong; an exact tie is settled by the arg-max (lowest index wins).
    ``logits_or_fn`` gives the unmodified logits (or a function computing them, called only on a tie)."""
    ok = own > other
    tied = own == other
    if bool(tied.any()):
        logits = logits_or_fn() if callable(logits_or_fn) else logits_or_fn
        ok[tied] = logits[tied].argmax(dim=-1) == labels.expand(*own.shape)[tied]
    return ok


def _count_rows(z, g, y, cols, alpha_rows, valid, target, counts_flat, budget: int = 1 << 22) -> None:
    """For each row r and each of its α (alpha_rows [R, O], ``valid`` [R, O]), add 1 to
    counts_flat[target[r, o]] when the row is correct at that α.

    Rows are evaluated on ``cols`` (per-row class indices in ascending order, label included, which keeps
    the lowest-index tie rule) or on every class (``cols`` None).
    """
    if cols is not None:
        z, g = z.gather(1, cols), g.gather(1, cols)
        pos = (cols == y[:, None]).int().argmax(1)
    else:
        pos = y
    step = max(1, budget // max(1, alpha_rows.shape[1] * z.shape[1]))
    for s in range(0, z.shape[0], step):
        zs, gs, al = z[s : s + step, None, :], g[s : s + step, None, :], alpha_rows[s : s + step, :, None]
        logits = torch.addcmul(zs, al, gs)  # [rows, O, k] = z + α·g
        ps = pos[s : s + step, None]
        own, other = _own_and_best_other(logits, ps)
        ok = _resolve(lambda zs=zs, al=al, gs=gs: torch.addcmul(zs, al, gs), ps, own, other)
        hits = target[s : s + step][ok & valid[s : s + step]]
        counts_flat += torch.bincount(hits, minlength=counts_flat.numel())


def count_correct_along_alpha(
    z0: torch.Tensor,
    g: torch.Tensor,
    labels: torch.Tensor,
    alphas: torch.Tensor,
    segment: int = 5,
    candidate_tiers: tuple[int, ...] = (8, 32),
    budget: int = 1 << 23,
    nonnegative: bool | None = None,
    workspace: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """counts[b, j] = #{m : argmax_c(z0[m] + alphas[j]·g[b, m]) = labels[m]}, int64, for g [B, M, C].

    The logits are those of a nested loop (z0 + α·g in float32, arg-max with ties to the lowest class), but
    little is computed at every α. Every logit is linear in α, so on an ascending grid, between two evaluated
    grid points ("anchors", every ``segment`` points):

    1. the set of α at which a row is classified correctly is an interval: a row correct at both anchors is
       correct at every α in between, and a row in which some class beats the label at both anchors is
       wrong throughout. Only the remaining ("open") rows need the points between;
    2. another class c can win somewhere in the segment only if the larger of its two anchor logits reaches
       L = max over the other classes of the smaller anchor logit (the class attaining L stays at or above
       L). When g ≥ 0 (every cache term) the logits grow with α, the smaller anchor is the left one and the
       larger the right one, which saves two passes. Open rows are evaluated on the label and those few
       candidates, gathered in ascending class order so that ties still go to the lowest class index (tiers
       of at most 8, then 32 columns, else every class).

    Every segment is handled in the same tensor operations; memory is bounded by ``budget`` elements.
    ``nonnegative`` states that g ≥ 0 (None: checked); ``workspace`` keeps the anchor-logit buffer between
    calls (fresh large buffers cost page faults on every call).
    """
    num_b, num_m, num_c = g.shape
    a = alphas.tolist()
    num_a = len(a)
    counts = torch.zeros(num_b, num_a, dtype=torch.long)
    if any(x >= y for x, y in zip(a, a[1:])):  # not ascending: plain evaluation at every α
        for j, alpha in enumerate(a):
            counts[:, j] = correct_mask(torch.add(z0, g, alpha=alpha), labels).sum(1)
        return counts
    anchors = torch.tensor(sorted({*range(0, num_a - 1, segment), num_a - 1}))
    widest = int((anchors[1:] - anchors[:-1]).max()) if anchors.numel() > 1 else 1  # one α: no segment at all
    inner = anchors[:-1, None] + 1 + torch.arange(widest - 1)  # [S, O]
    valid = inner < anchors[1:, None]
    inner = torch.minimum(inner, anchors[1:, None])
    anchor_alpha = alphas[anchors].to(g.dtype)[:, None, None, None]
    anchor_list = [a[p] for p in anchors.tolist()]
    g_rows = g.reshape(-1, num_c)  # [B·M, C], one copy at most
    step = max(1, budget // (anchors.numel() * num_b * num_c))
    flat = counts.view(-1)
    for start in range(0, num_m, step):
        zc, gc, yc = z0[start : start + step], g[:, start : start + step], labels[start : start + step]
        monotone = bool((gc >= 0).all()) if nonnegative is None else nonnegative
        logits = _buffer(workspace, (len(anchor_list), *gc.shape), gc.dtype)  # [P, B, m, C]
        for p, alpha in enumerate(anchor_list):  # scalar-α adds are far faster than one broadcast addcmul
            torch.add(zc, gc, alpha=alpha, out=logits[p])
        own, best_other = _own_and_best_other(logits, yc)  # label column of ``logits`` now −inf
        ok = _resolve(lambda zc=zc, gc=gc: torch.addcmul(zc, anchor_alpha, gc), yc, own, best_other)
        counts[:, anchors] += ok.sum(2).T
        if inner.shape[1] == 0:
            continue
        sure = ok[:-1] & ok[1:]  # [S, B, m]
        per_segment = sure.sum(2).T  # [B, S]
        counts.index_add_(1, inner[valid], per_segment[:, valid.nonzero()[:, 0]])
        if monotone:  # g ≥ 0: every logit grows with α, so a segment's smallest logits are at its left anchor
            floor = best_other[:-1]  # L over the other classes, [S, B, m]
            open_rows = ~sure & (own[1:] >= floor)
        else:
            floor = torch.minimum(logits[:-1], logits[1:]).amax(dim=-1)
            open_rows = ~sure & (torch.maximum(own[:-1], own[1:]) >= floor)
        open_flat = open_rows.view(-1).nonzero().squeeze(1)  # index into [S, B, m]
        if open_flat.numel() == 0:
            continue
        rows_m = zc.shape[0]
        s_idx, b_idx, m_idx = open_flat // (num_b * rows_m), open_flat // rows_m % num_b, open_flat % rows_m
        per_anchor = logits.view(-1, num_c)  # row (s, b, m) of [P, B, m] is row open_flat; anchor s + 1 follows
        reach = per_anchor.index_select(0, open_flat + num_b * rows_m)  # largest logits: right anchor
        if not monotone:
            reach = torch.maximum(per_anchor.index_select(0, open_flat), reach)
        candidate = reach >= floor.view(-1).index_select(0, open_flat).unsqueeze(1)
        # tier of each open row (0: ≤ 8 candidates, 1: ≤ 32, last: every class); rows sorted by tier so that
        # every per-row tensor is gathered once and each tier is a contiguous slice
        tiers = [t for t in candidate_tiers if t + 1 < num_c]
        tier_of = torch.bucketize(candidate.sum(1), torch.tensor(tiers, dtype=torch.long))
        order = torch.argsort(tier_of, stable=True)
        bounds = torch.bincount(tier_of, minlength=len(tiers) + 1).cumsum(0).tolist()
        reach, candidate = reach.index_select(0, order), candidate.index_select(0, order)
        b_idx, m_idx, s_idx = b_idx.index_select(0, order), m_idx.index_select(0, order), s_idx.index_select(0, order)
        z_open = zc.index_select(0, m_idx)
        g_open = g_rows.index_select(0, b_idx * num_m + start + m_idx)
        y_open = yc.index_select(0, m_idx)
        inner_rows = inner.index_select(0, s_idx)
        alpha_rows, valid_rows = alphas.to(g.dtype)[inner_rows], valid.index_select(0, s_idx)
        target = b_idx[:, None] * num_a + inner_rows
        lo = 0
        for t, hi in enumerate(bounds):
            if hi > lo:
                cols = None
                if t < len(tiers):
                    masked = torch.where(candidate[lo:hi], reach[lo:hi], float("-inf"))
                    cols = torch.cat([masked.topk(tiers[t], dim=1).indices, y_open[lo:hi, None]], dim=1)
                    cols = cols.sort(dim=1).values
                _count_rows(
                    z_open[lo:hi],
                    g_open[lo:hi],
                    y_open[lo:hi],
                    cols,
                    alpha_rows[lo:hi],
                    valid_rows[lo:hi],
                    target[lo:hi],
                    flat,
                )
            lo = hi
    return counts


def _buffer(workspace: dict[str, torch.Tensor] | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor of ``shape``, carved from ``workspace`` (grown when too small) if one is given."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype)
    size = 1
    for n in shape:
        size *= n
    held = workspace.get("logits")
    if held is None or held.numel() < size or held.dtype != dtype:
        held = workspace["logits"] = torch.empty(size, dtype=dtype)
    return held[:size].view(shape)


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
) -> torch.Tensor:
    """counts[i, j, l] of correct predictions at (β_i, α_j, weights_l) for Z₀ + α·G(β, weights).

    ``affinity`` [M, N] is f·Fᵀ (or the refined A′), ``entry_weights`` [Γ, N] the per-entry value weights
    (APE: exp(γ_l·d); Tip-Adapter: ones [1, N]). Evaluation rows are processed in chunks, so memory is
    bounded whatever M is; ``progress`` (a tqdm bar) advances once per (chunk, β).
    """
    weights = layout.arrange_weights(entry_weights)
    nonnegative = bool((entry_weights >= 0).all())  # then every cache term G ≥ 0, since φ > 0
    workspace: dict[str, torch.Tensor] = {}
    counts = torch.zeros(betas.numel(), alphas.numel(), entry_weights.shape[0], dtype=torch.long)
    step = search_row_chunk(affinity.shape[1])
    for start in range(0, affinity.shape[0], step):
        # φ_β(A) = exp(β·(A − 1)) (bit-identical to exp(−β(1 − A))): A − 1 once per chunk, then one multiply
        # and one exp per β into a reused buffer (fresh 64 MB temporaries cost more than the arithmetic)
        shifted = layout.arrange(affinity[start : start + step]) - 1.0
        buffer = torch.empty_like(shifted)
        z_rows, y_rows = z0[start : start + step], labels[start : start + step]
        for i, beta in enumerate(betas.tolist()):
            torch.mul(shifted, beta, out=buffer)
            grouped = layout.class_sum(buffer.exp_(), weights)  # [Γ, rows, C]
            counts[i] += count_correct_along_alpha(
                z_rows, grouped, y_rows, alphas, nonnegative=nonnegative, workspace=workspace
            ).T
            if progress is not None:
                progress.update(1)
    return counts


# --------------------------------------------------------------------------- memory


def search_memory(
    steps: list[int] | tuple[int, ...], val_rows: int = 1, entries: int = 1, classes: int = 1, segment: int = 5
) -> int:
    """Bytes that :func:`cache_search` holds at its peak for grids of ``steps`` points (β, α[, γ]) on ``val_rows``
    validation rows, ``entries`` cache keys and ``classes`` classes (the defaults give the part that depends on the
    grids alone, a lower bound):

    - the counts grid, int64 [β, α, Γ] (Γ = the third grid's points, else 1);
    - per chunk of evaluation rows (``search_row_chunk``): the shifted affinity and its exp, float32 [rows, N] each,
      and the class sums float32 [Γ, rows, C];
    - in :func:`count_correct_along_alpha`: the anchor logits float32 [P, Γ, m, C] with P anchors (every
      ``segment``-th α and the last) and at least one row m, and its counts int64 [Γ, α].
    """
    num_b, num_a = int(steps[0]), int(steps[1])
    num_g = int(steps[2]) if len(steps) > 2 else 1
    rows = min(val_rows, search_row_chunk(entries))
    anchors = len(range(0, max(num_a - 1, 0), segment)) + 1
    anchor_rows = min(rows, max(1, (1 << 23) // (anchors * num_g * classes)))
    counts = 8 * num_b * num_a * num_g + 8 * num_g * num_a
    chunk = 4 * (2 * rows * entries + num_g * rows * classes + num_g * entries)
    return counts + chunk + 4 * anchors * num_g * anchor_rows * classes


def memory_limit() -> int:
    """The machine's physical memory in bytes (the search runs on the CPU); 16 GiB when it cannot be read."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 16 << 30


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover
