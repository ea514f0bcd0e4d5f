"""Pure functions for the cache methods and their vectorised hyperparameter search.

Shapes use the row convention of ``tip_adapter_ape.md``: image features f [M, D], text rows W [C, D],
cache keys F [N, D] with labels y [N]. Logits of every cache method have the form

    Z(α, β, γ) = Z₀ + α · G(β, γ),   G(β, γ)[m, c] = Σ_{k : y_k = c} exp(−β(1 − A[m, k])) · r_γ[k]

with Z₀ = 100 · f Wᵀ. The search computes Z₀ and A once, exp(−β(1−A)) once per β, the class-wise sum once per
(β, γ), and scans every α at once (:func:`count_correct_along_alpha`).
"""

from __future__ import annotations

from collections.abc import Sequence

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


# --------------------------------------------------------------------------- APE prior refinement


def ape_criterion(
    text: torch.Tensor, keys: torch.Tensor | None = None, key_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Inter-class similarity S [D] of APE (§4.2), closed form, float64.

    Pools: class i holds its text row and, when ``keys`` are given, its cache keys (pool ``text+cache``);
    without keys the pool is the text row alone (pool ``text``). With pool sums s_i and T = Σ_i s_i,

        S = (T ⊙ T − Σ_i s_i ⊙ s_i) / ((Σ_i M_i)² − Σ_i M_i²)

    which equals the mean signed product over all pairs of vectors from different classes.
    """
    text = text.double()
    sums = text.clone()
    sizes = torch.ones(text.shape[0], dtype=torch.float64)
    if keys is not None:
        sums.index_add_(0, key_labels, keys.double())
        sizes += torch.bincount(key_labels, minlength=text.shape[0]).double()
    total = sums.sum(0)
    denom = sizes.sum() ** 2 - (sizes**2).sum()
    return (total * total - (sums * sums).sum(0)) / denom


def ape_pairwise_criterion(pools: Sequence[torch.Tensor]) -> torch.Tensor:
    """The definition of S as a double sum over pairs of classes (slow; for tests and documentation)."""
    dim = pools[0].shape[1]
    num = torch.zeros(dim, dtype=torch.float64)
    den = 0.0
    for i, pi in enumerate(pools):
        for j, pj in enumerate(pools):
            if i == j:
                continue
            num += torch.einsum("md,nd->d", pi.double(), pj.double())
            den += pi.shape[0] * pj.shape[0]
    return num / den


def interclass_variance(text: torch.Tensor) -> torch.Tensor:
    """V [D]: unbiased variance of each channel over the C text rows."""
    return text.double().var(dim=0, unbiased=True)


def select_channels(
    text: torch.Tensor, criterion: torch.Tensor, channels: int, w_sim: float, w_var: float
) -> torch.Tensor:
    """Indices of the ``channels`` largest J = −w_sim·S + w_var·V; equal J keeps the lower channel first."""
    score = -w_sim * criterion + w_var * interclass_variance(text)
    order = torch.sort(score, descending=True, stable=True).indices
    return order[:channels]


def kl_divergence_log2(keys_sel: torch.Tensor, text_sel: torch.Tensor, key_labels: torch.Tensor) -> torch.Tensor:
    """d_k = Σ_c L_kc·log₂((L_kc + 1e−6)/(P_kc + 1e−6)) with P_k = softmax(F′_k W′ᵀ), for one-hot L (§5.4)."""
    probs = torch.softmax(keys_sel.double() @ text_sel.double().T, dim=1)
    p_true = probs.gather(1, key_labels[:, None]).squeeze(1)
    return torch.log2((1 + 1e-6) / (p_true + 1e-6)).float()


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
        if self.padded:
            order = torch.sort(labels, stable=True).indices
            starts = torch.cumsum(counts, 0) - counts
            sorted_labels = labels[order]
            slot = torch.arange(labels.numel()) - starts[sorted_labels]
            index = torch.zeros(num_classes, self.kmax, dtype=torch.long)
            mask = torch.zeros(num_classes, self.kmax, dtype=torch.bool)
            index[sorted_labels, slot] = order
            mask[sorted_labels, slot] = True
            self.index, self.mask = index, mask

    def arrange(self, columns: torch.Tensor) -> torch.Tensor:
        """[..., N] → [..., C, K_max] (padded) or unchanged."""
        if not self.padded:
            return columns
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


def _argmax_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred = logits.argmax(dim=-1)
    return pred == labels, pred


def count_correct_along_alpha(
    z0: torch.Tensor, g: torch.Tensor, labels: torch.Tensor, alphas: torch.Tensor, row_chunk: int = 2048
) -> torch.Tensor:
    """counts[b, j] = #{m : argmax_c(z0[m] + alphas[j]·g[b, m]) = labels[m]}, int64, for g [B, M, C].

    The logits are computed exactly as a nested loop would (z0 + α·g in float32, arg-max with ties to the
    lowest class), but most rows are settled from the two ends of the (ascending) α grid: every logit is
    linear in α, so the set of α at which row m is classified correctly is an interval. A row correct at both
    ends is correct at every α in between; a row beaten by the same class at both ends is wrong throughout.
    Only the remaining rows are evaluated at every grid point.
    """
    num_b, num_m, _ = g.shape
    num_a = alphas.numel()
    counts = torch.zeros(num_b, num_a, dtype=torch.long)
    ascending = num_a <= 2 or bool((alphas[1:] > alphas[:-1]).all())
    for start in range(0, num_m, row_chunk):
        zc = z0[start : start + row_chunk]
        gc = g[:, start : start + row_chunk]
        yc = labels[start : start + row_chunk]
        if not ascending or num_a <= 2:
            for j in range(num_a):
                counts[:, j] += _argmax_correct(zc + alphas[j] * gc, yc)[0].sum(1)
            continue
        ok_lo, win_lo = _argmax_correct(zc + alphas[0] * gc, yc)
        ok_hi, win_hi = _argmax_correct(zc + alphas[-1] * gc, yc)
        counts += (ok_lo & ok_hi).sum(1, keepdim=True)
        open_rows = ~(ok_lo & ok_hi) & ~(~ok_lo & ~ok_hi & (win_lo == win_hi))
        b_idx, m_idx = open_rows.nonzero(as_tuple=True)
        if b_idx.numel() == 0:
            continue
        z_open, g_open, y_open = zc[m_idx], gc[b_idx, m_idx], yc[m_idx]
        for j in range(num_a):
            ok = _argmax_correct(z_open + alphas[j] * g_open, y_open)[0]
            counts[:, j] += torch.bincount(b_idx[ok], minlength=num_b)
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
) -> torch.Tensor:
    """counts[i, j, l] of correct predictions at (β_i, α_j, weights_l) for Z₀ + α·G(β, weights).

    ``affinity`` [M, N] is f·Fᵀ (or the refined A′), ``entry_weights`` [Γ, N] the per-entry value weights
    (APE: exp(γ_l·d); Tip-Adapter: ones [1, N]). Evaluation rows are processed in chunks, so memory is
    bounded whatever M is; ``progress`` (a tqdm bar) advances once per (chunk, β).
    """
    weights = layout.arrange_weights(entry_weights)
    counts = torch.zeros(betas.numel(), alphas.numel(), entry_weights.shape[0], dtype=torch.long)
    step = search_row_chunk(affinity.shape[1])
    for start in range(0, affinity.shape[0], step):
        arranged = layout.arrange(affinity[start : start + step])
        z_rows, y_rows = z0[start : start + step], labels[start : start + step]
        for i, beta in enumerate(betas.tolist()):
            grouped = layout.class_sum(phi(arranged, beta), weights)  # [Γ, rows, C]
            counts[i] += count_correct_along_alpha(z_rows, grouped, y_rows, alphas).T
            if progress is not None:
                progress.update(1)
    return counts
