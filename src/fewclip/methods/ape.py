"""APE, training-free (ICCV'23): prior refinement of the channels plus KL-weighted cache entries.

1. Channels: J = −w_sim·S + w_var·V over the text rows and cache keys (pool ``text+cache``); keep the Q best.
2. Text logits on all channels; the cache affinity on the Q refined (re-normalised) channels.
3. Entry weights r_k = exp(γ·d_k), d_k the KL divergence (log₂) of the one-hot label from softmax(F′_k W′ᵀ).
4. (β, α, γ) chosen on validation: the first maximiser with β outermost, then α, then γ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..features.bundle import Bundle
from .base import MethodError, l2n
from .cache import CacheMethod, check_grid, support_cache
from .registry import register
from .search import ape_criterion, gamma_grid, kl_divergence_log2, select_channels

#: Channels kept when neither ``channels`` nor a preset says: 70% of D (the published Q are 400-800 of 1024).
DEFAULT_CHANNEL_FRACTION = 0.7


def resolve_channels(channels: int | None, reference_dim: int | None, dim: int, name: str = "ape") -> int:
    """Q for features of dimension ``dim``. A preset's Q (defined for ``reference_dim``) keeps its fraction of
    D; an explicit Q is used verbatim and must lie in [1, D]."""
    if channels is None:
        return max(1, round(DEFAULT_CHANNEL_FRACTION * dim))
    if reference_dim:
        return min(dim, max(1, round(int(channels) * dim / int(reference_dim))))
    if not 1 <= int(channels) <= dim:
        raise MethodError(f"{name}: channels={channels} must satisfy 1 <= channels <= D = {dim}.")
    return int(channels)


@register("ape")
class APE(CacheMethod):
    def __init__(
        self,
        *,
        channels: int | None = None,
        channels_reference_dim: int | None = None,
        w_sim: float = 0.5,
        w_var: float = 0.5,
        init_alpha: float = 1.0,
        init_beta: float = 1.0,
        init_gamma: float = 0.1,
        search_scale: Sequence[float] = (7.0, 7.0, 1.0),
        search_step: Sequence[int] = (200, 20, 20),
        selection: str = "val",
        preset: str | None = None,
    ):
        self.channels = channels
        self.channels_reference_dim = channels_reference_dim
        self.w_sim = w_sim
        self.w_var = w_var
        self.init_alpha = init_alpha
        self.init_beta = init_beta
        self.init_gamma = init_gamma
        self.search_scale = search_scale
        self.search_step = search_step
        self.selection = selection
        self.preset = preset

    def _fit(self, bundle: Bundle) -> None:
        scale, step = check_grid(self.name, self.search_scale, self.search_step, 3)
        q = resolve_channels(self.channels, self.channels_reference_dim, bundle.dim, self.name)
        text = bundle.text_weights
        keys, labels = support_cache(bundle)
        criterion = ape_criterion(text, keys, labels)
        self.channels_ = select_channels(text, criterion, q, float(self.w_sim), float(self.w_var))
        self.text_ = text.clone()
        self.cache_keys_ = l2n(keys[:, self.channels_])
        self.key_labels_ = labels
        self.kl_ = kl_divergence_log2(self.cache_keys_, l2n(text[:, self.channels_]), labels)

        self.alpha_, self.beta_ = float(self.init_alpha), float(self.init_beta)
        self.gamma_ = float(self.init_gamma)
        if self.selection == "val":
            gammas = gamma_grid(scale[2], step[2])
            candidates = torch.exp(gammas[:, None] * self.kl_[None, :])
            _, _, l, _ = self._search(bundle, scale, step, candidates)
            self.gamma_ = float(gammas[l])
            self.search_["gamma_grid"] = [float(gammas[0]), float(gammas[-1]), int(gammas.numel())]
        self.entry_weights_ = torch.exp(self.gamma_ * self.kl_)
        self._finish(
            bundle,
            {
                "alpha": self.alpha_,
                "beta": self.beta_,
                "gamma": self.gamma_,
                "channels_used": q,
                "channels_requested": self.channels,
            },
        )
