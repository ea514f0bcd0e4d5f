"""Zero-shot text classifiers: prompt templates and class descriptions → one unit-norm row per class.

Each prompt is encoded and L2-normalised, the prompts of a class are averaged, and the mean is re-normalised
(CLIP's prompt ensembling; CuPL descriptions are pooled the same way, together with the templates).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..features.store import FeatureStore
    from .backbones import Backbone

logger = logging.getLogger("fewclip.models")


class TextClassifierError(ValueError):
    """Templates or descriptions that cannot make a classifier; the message names the value and the fix."""


def build_prompts(
    classnames: Sequence[str],
    templates: Sequence[str],
    descriptions: Mapping[str, Sequence[str]] | None = None,
) -> list[list[str]]:
    """Per class, the templates filled with the class name (``{}`` is replaced) followed by its descriptions."""
    classnames = [str(c) for c in classnames]
    if not classnames:
        raise TextClassifierError("classnames is empty; a classifier needs at least one class.")
    for t in templates:
        if "{}" not in t:
            raise TextClassifierError(
                f"template {t!r} has no '{{}}' placeholder for the class name; write e.g. 'a photo of a {{}}.'"
            )
    descriptions = dict(descriptions or {})
    if descriptions:
        found = [c for c in classnames if c in descriptions]
        if not found:
            raise TextClassifierError(
                f"none of the {len(classnames)} class names (e.g. {classnames[0]!r}) is a key of the descriptions "
                f"(keys e.g. {list(descriptions)[:3]}); the keys must be spelled like the class names."
            )
    prompts = []
    for c in classnames:
        row = [t.replace("{}", c) for t in templates]
        row += [str(s) for s in descriptions.get(c, [])]
        prompts.append(row)
    empty = [c for c, row in zip(classnames, prompts) if not row]
    if empty:
        raise TextClassifierError(
            f"{len(empty)} class(es) have no prompt (no templates given and no descriptions), e.g. {empty[:5]}; "
            "add templates or descriptions for them."
        )
    return prompts


def text_classifier(
    backbone: Backbone,
    classnames: Sequence[str],
    templates: Sequence[str],
    descriptions: Mapping[str, Sequence[str]] | None = None,
    *,
    batch_size: int = 256,
    store: FeatureStore | None = None,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """[C, D] float32 classifier with unit rows: normalise per prompt, average per class, re-normalise.

    Prompts are encoded ``batch_size`` at a time; with a ``store`` each prompt embedding is cached per backbone,
    so template sets and description files share what they have in common. Prompts longer than the context
    length are truncated by the tokenizer and counted. With ``return_info`` the result is
    ``(weights, {"prompts", "truncated", "encoded", "classes_with_descriptions"})``.
    """
    prompts = build_prompts(classnames, templates, descriptions)
    weights, info = encode_prompts(backbone, prompts, batch_size=batch_size, store=store)
    if not return_info:
        return weights
    info["classes_with_descriptions"] = sum(1 for c in classnames if c in (descriptions or {}))
    return weights, info


def encode_prompts(
    backbone: Backbone,
    prompts: Sequence[Sequence[str]],
    *,
    batch_size: int = 256,
    store: FeatureStore | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """[C, D] classifier from one list of sentences per class (normalise per prompt, average, re-normalise).

    Returns ``(weights, {"prompts", "unique_prompts", "truncated", "encoded"})``; see :func:`text_classifier`.
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
    emb = emb / norms
    weights = torch.zeros(len(prompts), emb.shape[1]).index_add_(0, owner, emb)
    weights = weights / torch.bincount(owner, minlength=len(prompts))[:, None]
    weights = weights / weights.norm(dim=-1, keepdim=True)

    truncated = backbone.count_truncated(unique)
    if truncated:
        logger.warning(
            "%d of %d prompts exceed the %d-token context and were truncated",
            truncated,
            len(unique),
            backbone.context_length,
        )
    return weights, {"prompts": len(flat), "unique_prompts": len(unique), "truncated": truncated, "encoded": len(todo)}
