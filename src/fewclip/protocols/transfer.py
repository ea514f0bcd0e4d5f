"""Transfer: fit on a source dataset's K-shot episode (ImageNet in the papers), score on other datasets.

- **Domain shift** (ImageNet-V2 / -Sketch / -A / -R, whose classes are ImageNet classes): the method fitted on all
  1000 source classes scores the target test set; V2 and Sketch are 1000-way, A and R 200-way by default (the
  logits restricted to their 200 ImageNet columns, as CoOp rebuilds the 200-name classifier) or 1000-way with
  ``variant_eval="1000way"``. The choice is recorded. ``variant_scoring="new_classes"`` treats the variants like
  any other target instead (their classes appended as separate new copies), which is Candle's published setting.
- **Cross-dataset** (any other target): as published for Candle, the target's class names are appended to the
  source classes as classes without support (text rows from the target's own prompts), one model is fitted per
  target, and the target test set is scored within the target columns. Methods that need support for every class
  are refused for these targets.

An ordinary :class:`~fewclip.protocols.protocol.Protocol` run by the same runner: its targets are the other
datasets, and each (target, method, shots, seed) gets one result of the common schema under
``<out>/<source>/<backbone>/transfer/<target>/<method>/shots_<K>-seed_<S>.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..data import TEMPLATE_SETS, DatasetSplits, load_prompts, resolve_name
from ..errors import ResultsError
from ..methods import get_class
from ..metrics import per_class_from_hits
from .protocol import DatasetLoader, Protocol, Target
from .report import mean_std, text_table

VARIANT_EVALS = ("200way", "1000way")
VARIANT_SCORINGS = ("source_columns", "new_classes")


def transfer_kind(source: DatasetSplits, target: DatasetSplits, variant_scoring: str = "source_columns") -> str:
    """``domain`` when every target class is a source class (ImageNet variants on ImageNet) and they are scored
    through the source columns, else ``cross-dataset``."""
    if variant_scoring == "new_classes":
        return "cross-dataset"
    if source.name == "imagenet" and target.imagenet_indices is not None and target.name != source.name:
        return "domain"
    return "cross-dataset"


def domain_predictions(
    logits: torch.Tensor, labels: torch.Tensor, columns: Sequence[int], variant_eval: str
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(predictions, labels, in_source_space) of a variant's test rows (``labels`` local to the variant) from
    source-space ``logits``. ``200way`` (V2 and Sketch have all 1000 columns): arg-max within the variant's source
    ``columns``, both in the variant's local classes. ``1000way``: arg-max over all source columns, both in the source
    classes, since the prediction may be a class the variant does not have. A row is right when the two agree."""
    columns_t = torch.as_tensor(list(columns), dtype=torch.long)
    if variant_eval == "200way":
        return logits[:, columns_t].argmax(1), labels, False
    return logits.argmax(1), columns_t[labels], True


class Transfer(Protocol):
    """Fit on the source episode, score on every dataset of ``targets`` (see the module docstring)."""

    name = "transfer"

    def __init__(
        self,
        targets: Sequence[str],
        variant_eval: str = "200way",
        variant_scoring: str = "source_columns",
        prompts: str = "single",
    ) -> None:
        if variant_scoring not in VARIANT_SCORINGS:
            raise ResultsError(f"variant_scoring {variant_scoring!r} is unknown; valid: {', '.join(VARIANT_SCORINGS)}.")
        if variant_eval not in VARIANT_EVALS:
            raise ResultsError(f"variant_eval {variant_eval!r} is unknown; valid: {', '.join(VARIANT_EVALS)}.")
        if not targets:
            raise ResultsError("transfer needs at least one target dataset (--targets).")
        self.target_names = list(dict.fromkeys(resolve_name(t) for t in targets))
        self.variant_eval = variant_eval
        self.variant_scoring = variant_scoring
        # a template set resolves per target; a prompts file belongs to the source, so targets get their template
        self.target_prompts = prompts if prompts in TEMPLATE_SETS else "single"
        self.source: DatasetSplits | None = None
        self.kinds: dict[str, str] = {}
        self._targets: list[Target] = []

    def prepare(self, splits: DatasetSplits, load: DatasetLoader) -> None:
        self.source = splits
        self._targets = []
        for name in self.target_names:
            if name == splits.name:
                raise ResultsError(f"the target {name} is the source dataset; use --protocol fewshot for it.")
            target = load(name)
            kind = transfer_kind(splits, target, self.variant_scoring)
            self.kinds[name] = kind
            prompts = load_prompts(self.target_prompts, name) if kind == "cross-dataset" else None
            self._targets.append(Target(name, target, target.test, prompts))

    def targets(self, splits: DatasetSplits) -> list[Target]:
        return list(self._targets)

    def target_params(self, target: Target) -> dict[str, Any]:
        kind = self.kinds[target.name]
        out: dict[str, Any] = {"target": target.name, "transfer": kind}
        if kind == "domain":
            out["variant_eval"] = self.variant_eval
        out["target_split_sha256"] = target.splits.split_sha256
        return out

    def check_method(self, method: str) -> None:
        if get_class(method).needs_support_for_every_class:
            crossing = [t for t, kind in self.kinds.items() if kind == "cross-dataset"]
            if crossing:
                raise ResultsError(
                    f"{method} needs support images for every class, so it cannot score {crossing[0]}'s classes, "
                    "which join the source classes without support (cross-dataset transfer)."
                )

    def fit_key(self, target: Target) -> str | None:
        return None if self.kinds[target.name] == "domain" else target.name

    def cell_classes(
        self, target: Target, text: torch.Tensor, classnames: Sequence[str], target_text: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[str], int]:
        if self.kinds[target.name] == "domain":
            return text, list(classnames), 0
        # the target's classes join the source's, without support; its labels follow the source's
        return torch.cat([text, target_text]), [*classnames, *target.splits.classnames], len(classnames)

    def _scored(self, logits: torch.Tensor, labels: torch.Tensor, target: Target):
        """(predicted, truth, classnames, local labels) under the target's scoring."""
        kind = self.kinds[target.name]
        source = self.source
        if kind == "domain":
            predicted, truth, in_source = domain_predictions(
                logits, labels, target.splits.imagenet_indices, self.variant_eval
            )
            return predicted, truth, source.classnames if in_source else target.splits.classnames, labels
        local = labels - source.num_classes  # the target's classes follow the source's
        return logits[:, source.num_classes :].argmax(1), local, target.splits.classnames, local

    def prediction_record(self, logits, labels, classnames, target):
        predicted, truth, names, _ = self._scored(logits, labels, target)
        return predicted, truth, names

    def evaluate(
        self, logits: torch.Tensor, labels: torch.Tensor, num_classes: int, target: Target | None = None
    ) -> tuple[dict, dict]:
        predicted, truth, _, local = self._scored(logits, labels, target)
        hits = predicted == truth
        per_class = per_class_from_hits(hits, local, target.splits.num_classes)
        present = [v for v in per_class if v is not None]
        scores = {
            "test_accuracy": 100.0 * float(hits.double().mean()) if hits.numel() else float("nan"),
            "test_mean_per_class": sum(present) / len(present) if present else float("nan"),
        }
        kind = self.kinds[target.name]
        extra = {
            "target": target.name,
            "transfer": kind,
            "variant_eval": self.variant_eval if kind == "domain" else None,
            "per_class_accuracy": per_class,
        }
        return scores, extra

    def summarize(self, results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return transfer_rows(results)

    def format(self, rows: Sequence[Mapping[str, Any]], seeds_expected: int | None) -> str:
        return transfer_table(rows)

    def describe(self) -> str:
        return "top-1 test accuracy per target (%)"


def transfer_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, shots): per target, mean ± population std over seeds."""
    cells: dict[tuple[str, int], dict[str, list[float]]] = {}
    for r in results:
        cells.setdefault((r["method"], r["shots"]), {}).setdefault(r["target"], []).append(
            r["accuracy"]["test_accuracy"]
        )
    rows = []
    for (method, k), per_target in cells.items():
        row: dict[str, Any] = {"method": method, "shots": k, "targets": {}}
        for t, values in per_target.items():
            mean, std = mean_std(values)
            row["targets"][t] = {"mean": mean, "std": std, "n": len(values)}
        rows.append(row)
    return rows


def transfer_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Method × shots rows, one column per target."""
    targets = list(dict.fromkeys(t for r in rows for t in r["targets"]))
    body = []
    for r in rows:
        line = [r["method"], str(r["shots"])]
        for t in targets:
            cell = r["targets"].get(t)
            line.append("-" if cell is None else f"{cell['mean']:.2f} ± {cell['std']:.2f}")
        body.append(line)
    return text_table(["method", "shots", *targets], body)
