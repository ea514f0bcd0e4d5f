"""Zero-shot text classifiers: the sentences of each class (from :class:`fewclip.data.Prompts`) → one unit row.

Each sentence is encoded and L2-normalised, a class's sentences are averaged and the mean is re-normalised (CLIP's
prompt ensembling; CuPL descriptions are pooled the same way). With ``return_norms=True`` the functions also return
each class's raw text norm ‖(1/J) Σ_j e_j‖, the norm of the mean of its *unnormalised* sentence embeddings (a bundle's
optional ``text_norms``, which CLAP needs; for one sentence per class, its embedding's norm). With a feature store,
every sentence embedding is cached per backbone, so template sets and description files share what they have in
common.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..data import Prompts
from ..errors import TextClassifierError
from ..models import Backbone
from .store import FeatureStore

logger = logging.getLogger("fewclip.features")


def encode_prompts(
    backbone: Backbone,
    prompts: Sequence[Sequence[str]],
    *,
    batch_size: int = 256,
    store: FeatureStore | None = None,
    return_norms: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]] | tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """[C, D] classifier from one list of sentences per class (normalise per sentence, average, re-normalise).

    Sentences are encoded ``batch_size`` at a time; those longer than the context length are truncated by the
    tokenizer and counted. Returns ``(weights, {"prompts", "unique_prompts", "truncated", "encoded"})``, or
    ``(weights, norms [C], info)`` with ``return_norms`` (norms: see the module docstring).
    """
    if batch_size < 1:
        raise TextClassifierError(f"batch_size must be ≥ 1, got {batch_size}.")
    prompts = [list(row) for row in prompts]
    empty = [c for c, row in enumerate(prompts) if not row]
    if not prompts or empty:
        raise TextClassifierError(f"every class needs at least one prompt; class(es) {empty[:5]} have none.")
    flat = [p for row in prompts for p in row]
    owner = torch.tensor([c for c, row in enumerate(prompts) for _ in row])
    unique = list(dict.fromkeys(flat))

    cached: dict[str, torch.Tensor] = {}
    group = None
    if store is not None:
        group = store.group({"kind": "text", "backbone": backbone.cache_key()})
        present = [p for p, ok in zip(unique, group.has(unique)) if ok]
        if present:
            cached = dict(zip(present, group.get(present)))
    todo = [p for p in unique if p not in cached]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        feats = backbone.encode_text(chunk)
        if group is not None:
            group.put(chunk, feats)
        cached.update(zip(chunk, feats))

    emb = torch.stack([cached[p] for p in flat]).float()
    norms = emb.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        bad = flat[int((norms.squeeze(1) == 0).nonzero()[0])]
        raise TextClassifierError(f"prompt {bad!r} encodes to an all-zero vector; check the backbone weights.")
    counts = torch.bincount(owner, minlength=len(prompts))[:, None]
    raw_norms = (torch.zeros(len(prompts), emb.shape[1]).index_add_(0, owner, emb) / counts).norm(dim=-1)
    emb = emb / norms
    weights = torch.zeros(len(prompts), emb.shape[1]).index_add_(0, owner, emb)
    weights = weights / counts
    weights = weights / weights.norm(dim=-1, keepdim=True)

    truncated = backbone.count_truncated(unique)
    if truncated:
        logger.warning(
            "%d of %d prompts exceed the %d-token context and were truncated",
            truncated,
            len(unique),
            backbone.context_length,
        )
    info = {"prompts": len(flat), "unique_prompts": len(unique), "truncated": truncated, "encoded": len(todo)}
    return (weights, raw_norms, info) if return_norms else (weights, info)


def encode_text_classifier(
    backbone: Backbone,
    classnames: Sequence[str],
    prompts: Prompts,
    *,
    batch_size: int = 256,
    store: FeatureStore | None = None,
    return_norms: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]] | tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """[C, D] zero-shot weights for ``classnames`` under ``prompts`` (templates or descriptions), plus the report of
    :func:`encode_prompts` (and the raw text norms [C] before it with ``return_norms``)."""
    return encode_prompts(
        backbone, prompts.sentences(classnames), batch_size=batch_size, store=store, return_norms=return_norms
    )
