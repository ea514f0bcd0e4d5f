"""APE's prior refinement (Zhu et al., ICCV'23; code ``yangyangyang127/APE`` 70460de): which feature channels to
keep, and how much to trust each cache entry.

Shapes use rows: text rows W [C, D], cache keys F [N, D] with labels y [N].

- Inter-class similarity S [D] (:func:`ape_criterion`) and inter-class variance V [D] (:func:`interclass_variance`)
  score each channel; the Q channels with the largest J = −w_sim·S + w_var·V are kept (:func:`select_channels`).
- Entry k of the cache gets the weight exp(γ·d_k), d_k the KL divergence (log₂) of its one-hot label from its
  zero-shot prediction on the kept channels (:func:`kl_divergence_log2`).
"""

from __future__ import annotations

import torch


def ape_criterion(
    text: torch.Tensor, keys: torch.Tensor | None = None, key_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Inter-class similarity S [D] of APE, closed form, float64.

    Pools: class i holds its text row and, when ``keys`` are given, its cache keys (pool ``text+cache``);
    without keys the pool is the text row alone (pool ``text``). With pool sums s_i and T = Σ_i s_i,

        S = (T ⊙ T − Σ_i s_i ⊙ s_i) / ((Σ_i M_i)² − Σ_i M_i²)

    which equals the mean signed product over all pairs of vectors from different classes (the released code's
    double loop over pairs of classes, with its 2023-08-21 fix that leaves out same-class pairs).
    """
    text = text.double()
    sums = text.clone()
    sizes = torch.ones(text.shape[0], dtype=torch.float64, device=text.device)
    if keys is not None:
        sums.index_add_(0, key_labels, keys.double())
        sizes += torch.bincount(key_labels, minlength=text.shape[0]).double()
    total = sums.sum(0)
    denom = sizes.sum() ** 2 - (sizes**2).sum()
    return (total * total - (sums * sums).sum(0)) / denom


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
    """d_k = Σ_c L_kc·log₂((L_kc + 1e−6)/(P_kc + 1e−6)) with P_k = softmax(F′_k W′ᵀ), for one-hot L (the released
    code's KL term with its 1e-6 smoothing)."""
    probs = torch.softmax(keys_sel.double() @ text_sel.double().T, dim=1)
    p_true = probs.gather(1, key_labels[:, None]).squeeze(1)
    return torch.log2((1 + 1e-6) / (p_true + 1e-6)).float()
