"""What differs between protocols: which episode a method is fitted on, which test sets it is scored on (its
targets), how scores are computed and how results are summarised. The staged runner
(:mod:`fewclip.protocols.runner`) does the rest, the same way for every protocol."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..data import (
    DatasetSplits,
    Episode,
    Item,
    Prompts,
    base_new_labels,
    make_imbalanced,
    sample_episode,
)
from ..errors import DataError, ResultsError
from ..methods import get_class, list_methods
from ..metrics import accuracy, macro_f1, mean_per_class_accuracy, per_class_accuracy, per_class_from_hits
from .report import format_summary, harmonic_mean, summarize, text_table

#: loads another dataset by name (a transfer target) with the run's data root
DatasetLoader = Callable[[str], DatasetSplits]


@dataclass(frozen=True)
class Target:
    """A test set fitted methods are scored on: the run dataset's own test split (``name`` None) or, under transfer,
    another dataset's. ``prompts`` is set when the target's classes join the source's as classes without support
    (cross-dataset transfer): their text rows are encoded with those prompts."""

    name: str | None
    splits: DatasetSplits
    items: Sequence[Item]
    prompts: Prompts | None = None


def short_classes(train: Sequence[Item], classnames: Sequence[str], k: int) -> dict[str, int]:
    """The classes with fewer than ``k`` of the ``train`` items, and how many they have (class name → count)."""
    counts = [0] * len(classnames)
    for item in train:
        counts[item.label] += 1
    return {name: n for name, n in zip(classnames, counts) if n < k}


class Protocol:
    """The all-class few-shot protocol: K shots per class, every class scored over all columns."""

    name = "fewshot"

    def params(self) -> dict[str, Any]:
        """Protocol settings that decide a result (part of its fingerprint)."""
        return {}

    def target_params(self, target: Target) -> dict[str, Any]:
        """Settings of one target that decide its results (part of their fingerprint)."""
        return {}

    def check_method(self, method: str) -> None:
        """Raise :class:`ResultsError` if ``method`` cannot run under this protocol."""

    def method_defaults(self, method: str) -> dict[str, Any]:
        """Hyperparameters this protocol gives ``method`` in place of its own defaults (a preset and the user's
        overrides still win); recorded in the result's setup as ``protocol_defaults``."""
        return {}

    def prepare(self, splits: DatasetSplits, load: DatasetLoader) -> None:
        """Look at the loaded dataset once, before any episode is drawn (``load`` reads other datasets)."""

    def episode(self, splits: DatasetSplits, k: int, seed: int, *, sampler: str | None, val_kind: str) -> Episode:
        """The K-shot episode; a class with fewer than K training images gives all it has, and is recorded in
        ``extra["short_classes"]`` (class name → support images)."""
        episode = sample_episode(splits, k, seed, sampler=sampler, val_kind=val_kind)
        short = short_classes(episode.train, episode.classnames, k)
        return replace(episode, extra={**episode.extra, "short_classes": short}) if short else episode

    def test_items(self, splits: DatasetSplits) -> Sequence[Item]:
        return splits.test

    def targets(self, splits: DatasetSplits) -> list[Target]:
        """The test sets every fitted method is scored on (here: the dataset's own test split)."""
        return [Target(None, splits, self.test_items(splits))]

    def fit_key(self, target: Target) -> str | None:
        """Targets with the same key are scored by one fitted model (None: the model fitted on the source episode)."""
        return None

    def cell_classes(
        self, target: Target, text: torch.Tensor, classnames: Sequence[str], target_text: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[str], int]:
        """(text rows, class names, offset added to the target's labels) of the bundle a method is fitted on and
        scored with for ``target``: the dataset's own classes here."""
        return text, list(classnames), 0

    def predictions(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The class each test row is predicted as, under this protocol's headline scoring (the arg-max over all
        columns here); saved with every result, so a confusion matrix can be made from it."""
        return logits.argmax(dim=1)

    def prediction_record(
        self, logits: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str], target: Target
    ) -> tuple[torch.Tensor, torch.Tensor, Sequence[str]]:
        """(predicted, true, class names they index) of every test row, as saved beside the result."""
        return self.predictions(logits, labels), labels, classnames

    def evaluate(
        self, logits: torch.Tensor, labels: torch.Tensor, num_classes: int, target: Target | None = None
    ) -> tuple[dict, dict]:
        """(accuracy fields, extra fields) of one result."""
        scores = {
            "test_accuracy": accuracy(logits, labels),
            "test_mean_per_class": mean_per_class_accuracy(logits, labels, num_classes),
            "test_macro_f1": macro_f1(logits, labels, num_classes),
        }
        return scores, {"per_class_accuracy": per_class_accuracy(logits, labels, num_classes)}

    def summarize(self, results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return summarize(results)

    def format(self, rows: Sequence[Mapping[str, Any]], seeds_expected: int | None) -> str:
        return format_summary(rows, seeds_expected)

    def describe(self) -> str:
        return "top-1 test accuracy (%)"


def base_new_scores(logits: torch.Tensor, labels: torch.Tensor, num_base: int) -> dict[str, float]:
    """Scores of one base-to-new test set; ``logits`` ``[N, C]``, labels < ``num_base`` are base.

    - ``base``, ``new``, ``harmonic_mean``: CoCoOp's setting. A base row is right when the arg-max over the base
      columns ``[0, num_base)`` is its label, a new row when the arg-max over the new columns ``[num_base, C)`` is;
      the HM of the two.
    - ``base_all_classes``, ``new_all_classes``, ``all_classes_harmonic_mean``: the generalised setting. A row is
      right when the arg-max over all C columns (base and new) is its label, scored separately over the base rows
      and the new rows, and the HM of the two. Calling a base image a new class (or a new image a base class)
      counts against it here, so the gap to the within-group scores is the cost of the bias between the groups.
      ``base_all_classes`` is also Candle's released base scoring.

    A group without rows scores NaN (and so does any HM with it)."""
    base = labels < num_base
    within_base = logits[base, :num_base].argmax(1)
    within_new = logits[~base, num_base:].argmax(1) + num_base
    all_columns = logits.argmax(1)

    def pct(hits: torch.Tensor) -> float:
        return 100.0 * float(hits.double().mean()) if hits.numel() else float("nan")

    b = pct(within_base == labels[base])
    n = pct(within_new == labels[~base])
    b_all = pct(all_columns[base] == labels[base])
    n_all = pct(all_columns[~base] == labels[~base])
    return {
        "base": b,
        "new": n,
        "harmonic_mean": harmonic_mean(b, n),
        "base_all_classes": b_all,
        "new_all_classes": n_all,
        "all_classes_harmonic_mean": harmonic_mean(b_all, n_all),
    }


BASE_EVALS = ("within_base", "all_classes")
#: the accuracy fields a base-to-new summary averages over seeds (the HMs are taken of the averages)
BASE_NEW_KEYS = ("base", "new", "base_all_classes", "new_all_classes")


class BaseToNew(Protocol):
    """CoCoOp's base-to-new protocol: fit on the base classes' support (the first ceil(C/2) labels), with every
    class's text row in the bundle; score base test rows within the base columns and new test rows within the new
    columns; HM from the seed-averaged base and new accuracies. Every result also has the generalised setting: base
    and new test rows scored over all columns, and their HM (:func:`base_new_scores`). With ``imbalance_ratio``
    (Candle), the base classes' support (K = the shot cap) follows the exponential profile."""

    def __init__(self, imbalance_ratio: float | None = None, base_eval: str = "within_base"):
        if imbalance_ratio is not None and not 0 < imbalance_ratio <= 1:
            raise ResultsError(f"imbalance ratio must be in (0, 1], got {imbalance_ratio!r} (Candle: 0.02).")
        if base_eval not in BASE_EVALS:
            raise ResultsError(f"base_eval {base_eval!r} is unknown; valid: {', '.join(BASE_EVALS)}.")
        self.imbalance_ratio = imbalance_ratio
        self.base_eval = base_eval
        self.name = "base2new" if imbalance_ratio is None else "base2new-imbalanced"

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.imbalance_ratio is None else {"imbalance_ratio": self.imbalance_ratio}
        if self.base_eval != "within_base":
            out["base_eval"] = self.base_eval
        return out

    def check_method(self, method: str) -> None:
        if get_class(method).needs_support_for_every_class:
            able = [m for m in list_methods() if not get_class(m).needs_support_for_every_class]
            raise ResultsError(
                f"{method} needs support images for every class, so it cannot score new classes under {self.name}; "
                f"methods that handle classes without support: {', '.join(able)}."
            )

    def episode(self, splits: DatasetSplits, k: int, seed: int, *, sampler: str | None, val_kind: str) -> Episode:
        episode = super().episode(splits, k, seed, sampler=sampler, val_kind=val_kind)
        base, new = base_new_labels([i.label for i in episode.train])
        if not new:
            raise ResultsError(f"{splits.name}: {len(base)} class(es) in the episode; base-to-new needs at least 2.")
        limit = len(base)
        train = [i for i in episode.train if i.label < limit]
        if self.imbalance_ratio is not None:
            train = make_imbalanced(train, self.imbalance_ratio, seed)
        val = [i for i in episode.val if i.label < limit]
        extra = {**episode.extra, "base_classes": base, "new_classes": new}
        short = {name: n for name, n in extra.pop("short_classes", {}).items() if name in episode.classnames[:limit]}
        if short:
            extra["short_classes"] = short
        return replace(episode, train=train, val=val, subsample="base-support", extra=extra,
                       imbalance_ratio=self.imbalance_ratio)  # fmt: skip

    def predictions(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Base rows: the arg-max within the base columns (over all columns under ``base_eval="all_classes"``); new
        rows: the arg-max within the new columns."""
        num_base = -(-logits.shape[1] // 2)
        base = labels < num_base
        out = logits.argmax(dim=1)
        if self.base_eval == "within_base":
            out[base] = logits[base, :num_base].argmax(dim=1)
        out[~base] = logits[~base, num_base:].argmax(dim=1) + num_base
        return out

    def evaluate(
        self, logits: torch.Tensor, labels: torch.Tensor, num_classes: int, target: Target | None = None
    ) -> tuple[dict, dict]:
        num_base = -(-num_classes // 2)
        scores = base_new_scores(logits, labels, num_base)
        if self.base_eval == "all_classes":  # the released Candle scoring as the headline (labelled)
            scores["base_within_base"] = scores["base"]
            scores["base"] = scores["base_all_classes"]
            scores["harmonic_mean"] = harmonic_mean(scores["base"], scores["new"])
        hits = self.predictions(logits, labels) == labels  # per class under the scoring of base and new
        extra = {
            "per_class_accuracy": per_class_from_hits(hits, labels, num_classes),
            "base_classes": list(range(num_base)),
            "new_classes": list(range(num_base, num_classes)),
            "base_eval": self.base_eval,
        }
        return scores, extra

    def summarize(self, results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Per (method, shots): mean ± std over seeds of base, new and their all-class counterparts; each HM is
        taken of the seed-averaged pair (CoCoOp's way), not averaged over seeds."""
        parts = {key: {(r["method"], r["shots"]): r for r in summarize(results, key)} for key in BASE_NEW_KEYS}
        rows = []
        for (method, shots), first in parts["base"].items():
            row: dict[str, Any] = {"method": method, "shots": shots}
            for key in BASE_NEW_KEYS:
                row[key], row[f"{key}_std"] = parts[key][method, shots]["mean"], parts[key][method, shots]["std"]
            row["harmonic_mean"] = harmonic_mean(row["base"], row["new"])
            row["all_classes_harmonic_mean"] = harmonic_mean(row["base_all_classes"], row["new_all_classes"])
            row["seeds"], row["n"] = first["seeds"], first["n"]
            rows.append(row)
        return rows

    def format(self, rows: Sequence[Mapping[str, Any]], seeds_expected: int | None) -> str:
        """base, new, HM, then the same over all classes (``-all``), one row per method and shots."""
        header = ["method", "shots", "base", "new", "HM", "base-all", "new-all", "HM-all"]
        body = [
            [
                r["method"],
                str(r["shots"]),
                f"{r['base']:.2f} ± {r['base_std']:.2f}",
                f"{r['new']:.2f} ± {r['new_std']:.2f}",
                f"{r['harmonic_mean']:.2f}",
                f"{r['base_all_classes']:.2f} ± {r['base_all_classes_std']:.2f}",
                f"{r['new_all_classes']:.2f} ± {r['new_all_classes_std']:.2f}",
                f"{r['all_classes_harmonic_mean']:.2f}"
                + ("" if seeds_expected in (None, r["n"]) else f" ({r['n']} seeds)"),
            ]
            for r in rows
        ]
        return text_table(header, body)

    def describe(self) -> str:
        base = "within base classes" if self.base_eval == "within_base" else "all-class argmax, as released"
        return (
            f"base ({base}), new (within new classes), HM of the seed means; -all: the same images scored over all "
            "classes, base and new (the generalised setting) (%)"
        )


MANY_SHOT, FEW_SHOT = 100, 20  # many: > 100 training images; few: < 20; medium: 20 ... 100 (OLTR's shot_acc)
LONGTAIL_DATASETS = ("imagenet_lt", "places_lt")


def shot_groups(train_counts: Sequence[int]) -> dict[str, list[int]]:
    """Classes by training count: many (> 100), medium (20 ... 100), few (< 20)."""
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(train_counts):
        groups["many" if n > MANY_SHOT else "few" if n < FEW_SHOT else "medium"].append(c)
    return groups


def group_accuracies(per_class: Sequence[float | None], groups: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Mean of the per-class accuracies within each group (classes without test rows left out; NaN if empty)."""
    out = {}
    for name, classes in groups.items():
        values = [per_class[c] for c in classes if per_class[c] is not None]
        out[name] = sum(values) / len(values) if values else float("nan")
    return out


#: Candle on a long-tailed training list (a fewclip extension: ``shijxcs/Candle`` has no long-tailed setting). The
#: released step is kept (128 images + 2C prototype rows, lr 3e-4, SGD, the Dassl warm-up
#: epoch and per-epoch cosine, selection on validation); only the number of steps is bounded. The released epoch
#: (every image once, 905 steps on ImageNet-LT) times 50 epochs is 45,250 steps of a 2,128-token attention, about
#: 12 hours on two CPU cores; this budget, 10 epochs of 40 steps (51,200 image draws, 0.44 of ImageNet-LT's 115,846
#: images, drawn instance-balanced so the long tail and the CLA prior keep their meaning), trains in minutes.
#: ``--set candle:epochs=50 --set candle:iterations_per_epoch=null`` runs the released regime.
LONGTAIL_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"candle": {"epochs": 10, "iterations_per_epoch": 40}}


class LongTail(Protocol):
    """ImageNet-LT / Places-LT: fit on the long-tailed training list (``shots`` caps each class; 0 = the whole
    list, so Tip-Adapter can run with a class-balanced cache), choose on the LT validation list, and report overall
    top-1, mean per-class and many / medium / few accuracies, groups from the training list actually loaded."""

    name = "longtail"

    def __init__(self) -> None:
        self.train_counts: list[int] | None = None

    def method_defaults(self, method: str) -> dict[str, Any]:
        return dict(LONGTAIL_METHOD_DEFAULTS.get(method, {}))

    def prepare(self, splits: DatasetSplits, load: DatasetLoader) -> None:
        if not splits.train or not splits.val:
            raise DataError(
                f"{splits.name}: the long-tail protocol needs train and val lists (ImageNet-LT, Places-LT)."
            )
        counts = [0] * splits.num_classes
        for item in splits.train:
            counts[item.label] += 1
        self.train_counts = counts

    def episode(self, splits: DatasetSplits, k: int, seed: int, *, sampler: str | None, val_kind: str) -> Episode:
        if k == 0:
            return Episode(
                dataset=splits.name, train=list(splits.train), val=list(splits.val), classnames=list(splits.classnames),
                k=0, seed=seed, sampler="all", split_sha256=splits.split_sha256, val_kind="full",
            )  # fmt: skip
        episode = sample_episode(splits, k, seed, sampler=sampler, val_kind="full")
        return replace(episode, extra={**episode.extra, "cap": k})

    def evaluate(
        self, logits: torch.Tensor, labels: torch.Tensor, num_classes: int, target: Target | None = None
    ) -> tuple[dict, dict]:
        scores, extra = super().evaluate(logits, labels, num_classes)
        groups = shot_groups(self.train_counts or [0] * num_classes)
        scores.update(group_accuracies(extra["per_class_accuracy"], groups))
        extra["shot_groups"] = {name: len(classes) for name, classes in groups.items()}
        return scores, extra

    def summarize(self, results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        keys = ("test_accuracy", "many", "medium", "few")
        parts = {key: {(r["method"], r["shots"]): r for r in summarize(results, key)} for key in keys}
        rows = []
        for (method, shots), first in parts["test_accuracy"].items():
            row: dict[str, Any] = {"method": method, "shots": shots, "seeds": first["seeds"], "n": first["n"]}
            for key in keys:
                row[key], row[f"{key}_std"] = parts[key][method, shots]["mean"], parts[key][method, shots]["std"]
            rows.append(row)
        return rows

    def format(self, rows: Sequence[Mapping[str, Any]], seeds_expected: int | None) -> str:
        header = ["method", "cap", "overall", "many", "medium", "few"]
        body = [
            [r["method"], "all" if r["shots"] == 0 else str(r["shots"])]
            + [f"{r[key]:.2f} ± {r[key + '_std']:.2f}" for key in ("test_accuracy", "many", "medium", "few")]
            for r in rows
        ]
        return text_table(header, body)

    def describe(self) -> str:
        return "top-1 overall and by training count: many (> 100), medium (20-100), few (< 20) (%)"
