"""APE, training-free (ICCV'23): prior refinement of the channels plus KL-weighted cache entries.

1. Channels: J = −w_sim·S + w_var·V over the text rows and cache keys (pool ``text+cache``); keep the Q best.
2. Text logits on all channels; the cache affinity on the Q refined (re-normalised) channels.
3. Entry weights r_k = exp(γ·d_k), d_k the KL divergence (log₂) of the one-hot label from softmax(F′_k W′ᵀ).
4. (β, α, γ) chosen on validation: the first maximiser with β outermost, then α, then γ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import MethodError
from ..features.bundle import Bundle
from .ape_refine import ape_criterion, kl_divergence_log2, select_channels
from .cache import CACHE_WEIGHT, CacheMethod, search_scale, search_step, support_cache
from .params import Integral, Interval, Optional, Real, param
from .registry import register
from .search import gamma_grid

#: Channels kept when neither ``channels`` nor a preset says: 70% of D (the published Q are 400-800 of 1024).
DEFAULT_CHANNEL_FRACTION = 0.7
#: ``channels`` and ``channels_reference_dim``
CHANNELS = Optional(Interval(Integral, 1, None, closed="left"))
#: ``w_sim`` and ``w_var``, the weights of the channel criterion
CRITERION_WEIGHT = Interval(Real, 0, None, closed="left")


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


class RefinedChannels(CacheMethod):
    """What APE and APE-T share about their channel count Q: a preset's Q is defined for its RN50 dimension
    (``channels_reference_dim``), while a ``channels`` the user gives is used verbatim; Q must fit the data's D."""

    channels: int | None
    channels_reference_dim: int | None

    @classmethod
    def merge_preset(cls, preset_values: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """A preset's values overridden by the user's; an explicit ``channels`` drops the preset's
        ``channels_reference_dim`` (it is used verbatim, not rescaled from the preset's RN50 dimension)."""
        merged = {**preset_values, **params}
        if "channels" in params and "channels_reference_dim" not in params:
            merged["channels_reference_dim"] = None
        return merged

    def check_dim(self, dim: int) -> None:
        resolve_channels(self.channels, self.channels_reference_dim, dim, self.name)

    def _channels(self, bundle: Bundle) -> int:
        """Q for the bundle's dimension (see :func:`resolve_channels`)."""
        return resolve_channels(self.channels, self.channels_reference_dim, bundle.dim, self.name)


@register("ape")
@dataclass(kw_only=True, repr=False, eq=False)
class APE(RefinedChannels):
    cross_validates = True

    channels: int | None = param(None, CHANNELS, doc="Q, refined channels kept (None: 70% of D)")
    channels_reference_dim: int | None = param(
        None, CHANNELS, doc="D for which ``channels`` is given (a preset's RN50 1024): Q keeps its fraction of D"
    )
    w_sim: float = param(0.5, CRITERION_WEIGHT, doc="weight of the inter-class similarity S")
    w_var: float = param(0.5, CRITERION_WEIGHT, doc="weight of the inter-class variance V")
    init_alpha: float = param(1.0, CACHE_WEIGHT, doc="α without search")
    init_beta: float = param(1.0, CACHE_WEIGHT, doc="β without search")
    init_gamma: float = param(0.1, CACHE_WEIGHT, doc="γ without search")
    search_scale: Sequence[float] = param((7.0, 7.0, 1.0), search_scale(3), doc="upper ends of the β, α, γ grids")
    search_step: Sequence[int] = param((200, 20, 20), search_step(3), doc="points of the β, α, γ grids")

    def _cv_values(self, index: tuple[int, ...]) -> dict[str, Any]:
        scale, step = self._grid()
        return {**super()._cv_values(index), "init_gamma": float(gamma_grid(scale[2], step[2])[index[2]])}

    def _fit(self, bundle: Bundle) -> dict[str, Any]:
        scale, step = self._grid()
        q = self._channels(bundle)
        text = bundle.text_weights
        keys, labels = support_cache(bundle)
        criterion = ape_criterion(text, keys, labels)
        self.channels_ = select_channels(text, criterion, q, float(self.w_sim), float(self.w_var))
        self.text_ = text.clone()
        self.cache_keys_ = F.normalize(keys[:, self.channels_], dim=-1)
        self.key_labels_ = labels
        self.kl_ = kl_divergence_log2(self.cache_keys_, F.normalize(text[:, self.channels_], dim=-1), labels)

        self.alpha_, self.beta_ = float(self.init_alpha) * self._alpha_scale(bundle), float(self.init_beta)
        self.gamma_ = float(self.init_gamma)
        if self.selection == "val":
            gammas = gamma_grid(scale[2], step[2])
            candidates = torch.exp(gammas[:, None] * self.kl_[None, :])
            _, _, l, _ = self._search(bundle, scale, step, candidates)
            self.gamma_ = float(gammas[l])
            self.search_["gamma_grid"] = [float(gammas[0]), float(gammas[-1]), int(gammas.numel())]
        self.entry_weights_ = torch.exp(self.gamma_ * self.kl_)
        return {
            "alpha": self.alpha_,
            "beta": self.beta_,
            "gamma": self.gamma_,
            "channels_used": q,
            "channels_requested": self.channels,
        }
