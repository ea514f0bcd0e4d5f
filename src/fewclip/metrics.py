"""Metrics from logits: top-1 accuracy and per-class accuracy, in percent."""

from __future__ import annotations

import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent; arg-max ties go to the lowest class index."""
    if labels.numel() == 0:
        return float("nan")
    return 100.0 * float((logits.argmax(dim=1) == labels).double().mean())


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Accuracy of each class in percent (None for a class without evaluation rows)."""
    return per_class_from_hits(logits.argmax(dim=1) == labels, labels, num_classes)


def per_class_from_hits(correct: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Per-class accuracy in percent from a boolean hit per row (None for a class without rows)."""
    hits = torch.bincount(labels, weights=correct.double(), minlength=num_classes)
    totals = torch.bincount(labels, minlength=num_classes)
    return [100.0 * float(h) / int(t) if int(t) else None for h, t in zip(hits, totals)]


def mean_per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    values = [v for v in per_class_accuracy(logits, labels, num_classes) if v is not None]
    return sum(values) / len(values) if values else float("nan")


def macro_f1(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean over classes of F1 = 2·TP / (2·TP + FP + FN), in percent; classes with no rows and no predictions are
    left out (their F1 is undefined)."""
    pred = logits.argmax(dim=1)
    tp = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    predicted = torch.bincount(pred, minlength=num_classes).double()
    actual = torch.bincount(labels, minlength=num_classes).double()
    denom = predicted + actual  # 2·TP + FP + FN
    defined = denom > 0
    return 100.0 * float((2 * tp[defined] / denom[defined]).mean()) if bool(defined.any()) else float("nan")


def confusion_matrix(
    predictions: torch.Tensor, labels: torch.Tensor, num_classes: int, normalize: bool = True
) -> torch.Tensor:
    """[C, C] float64: entry (i, j) counts the rows of class i predicted as j; with ``normalize`` each row is divided
    by its class's row count (Dassl's ``cmat``), and a class without rows keeps a zero row."""
    flat = labels.long() * num_classes + predictions.long()
    counts = torch.bincount(flat, minlength=num_classes * num_classes).double().view(num_classes, num_classes)
    if normalize:
        counts = counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)
    return counts


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error in percent of class probabilities ``probs`` [M, C] (rows summing to 1) against
    ``labels`` [M]: Σ_b |B_b|/M · |acc(B_b) − conf(B_b)| over ``bins`` equal-width bins of the confidence (the top
    probability), bin b holding confidences in (b/bins, (b+1)/bins] (Guo et al. 2017). NaN without rows."""
    if labels.numel() == 0:
        return float("nan")
    conf, pred = probs.double().max(dim=1)
    hit = (pred == labels).double()
    index = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    gap = torch.bincount(index, weights=hit, minlength=bins) - torch.bincount(index, weights=conf, minlength=bins)
    # Σ_b |B_b|/M · |acc_b − conf_b| = Σ_b |Σ_{i∈B_b} (hit_i − conf_i)| / M
    return 100.0 * float(gap.abs().sum() / labels.numel()) if bool((count > 0).any()) else float("nan")
