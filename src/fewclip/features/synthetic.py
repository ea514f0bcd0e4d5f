"""Synthetic CLIP-like feature bundles for the demo, the tests and the benchmarks.

The generative model mimics what matters in CLIP features for few-shot adaptation:

- each class c has a visual centre m_c (unit vector); classes are correlated through a shared component;
- image embeddings are ``scale · (m_c + within·ε + gap_img)``: raw, not unit length, with a modality gap
  (image-text cosines around 0.2-0.3, as in CLIP, so zero-shot logits 100·cos have CLIP's spread);
- the text row of class c is ``n(m_c + text_noise·ξ_c + gap_txt)``: aligned with the visual centre only up to
  text noise, so zero-shot is imperfect and labelled images help;
- every support image has V views: its own embedding plus view noise (the augmentations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .bundle import Bundle, make_bundle


def make_synthetic_bundle(
    classes: int = 20,
    shots: int | list[int] = 16,
    dim: int = 128,
    views: int = 10,
    val_per_class: int = 4,
    test_per_class: int = 30,
    *,
    seed: int = 0,
    within: float = 1.5,
    text_noise: float = 1.2,
    view_noise: float = 0.3,
    shared: float = 1.0,
    gap: float = 1.5,
    scale: float = 8.0,
    with_clean: bool = True,
    shuffle_support: bool = True,
) -> Bundle:
    """A :class:`Bundle` with ``shots`` support images per class (an int, or one count per class).

    ``within``, ``text_noise`` and ``view_noise`` are in units of the per-dimension spread of the unit class
    centres (they are divided by sqrt(dim)), so the difficulty does not change with ``dim``.
    """
    g = torch.Generator().manual_seed(seed)
    counts = [shots] * classes if isinstance(shots, int) else list(shots)
    if len(counts) != classes:
        raise ValueError(f"shots lists {len(counts)} counts; expected one per class ({classes}).")
    s = dim**-0.5

    common = F.normalize(torch.randn(dim, generator=g), dim=-1)
    centres = F.normalize(shared * common + F.normalize(torch.randn(classes, dim, generator=g), dim=-1), dim=-1)
    gap_img = gap * F.normalize(torch.randn(dim, generator=g), dim=-1)
    gap_txt = gap * F.normalize(torch.randn(dim, generator=g), dim=-1)
    text = F.normalize(centres + text_noise * s * torch.randn(classes, dim, generator=g) + gap_txt, dim=-1)

    def images(labels: torch.Tensor) -> torch.Tensor:
        eps = within * s * torch.randn(len(labels), dim, generator=g)
        return centres[labels] + eps + gap_img

    support_labels = torch.repeat_interleave(torch.arange(classes), torch.tensor(counts, dtype=torch.long))
    if shuffle_support:
        support_labels = support_labels[torch.randperm(len(support_labels), generator=g)]
    base = images(support_labels)
    view_eps = view_noise * s * torch.randn(views, len(support_labels), dim, generator=g)
    support = scale * (base[None] + view_eps)
    clean = scale * base

    def split(per_class: int):
        labels = torch.arange(classes).repeat_interleave(per_class)
        return scale * images(labels), labels

    test_f, test_l = split(test_per_class)
    val_f, val_l = split(val_per_class) if val_per_class > 0 else (None, None)
    return make_bundle(
        support_features=support,
        support_labels=support_labels,
        text_weights=text,
        test_features=test_f,
        test_labels=test_l,
        val_features=val_f,
        val_labels=val_l,
        support_clean_features=clean if with_clean else None,
        classnames=[f"class_{i:03d}" for i in range(classes)],
        metadata={
            "dataset": "synthetic",
            "backbone": "synthetic",
            "shots": shots if isinstance(shots, int) else "mixed",
            "seed": seed,
            "views": views,
        },
    )
