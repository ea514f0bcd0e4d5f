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

One result per (target, method, shots, seed): ``<out>/<source>/transfer/<target>/<method>/shots_<K>-seed_<S>.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..metrics import per_class_from_hits
from .fewshot import (
    FewShotConfig,
    check_methods,
    console_log,
    create_method,
    existing_result,
    load_config_backbone,
    result_setup,
)
from .protocol import Protocol
from .results import (
    RESULT_FORMAT,
    ResultsError,
    config_sha256,
    mean_std,
    text_table,
    versions,
    write_predictions,
    write_result,
)

VARIANT_EVALS = ("200way", "1000way")


class Transfer(Protocol):
    name = "transfer"

    def __init__(self, target: str, kind: str, variant_eval: str = "200way"):
        self.target, self.kind, self.variant_eval = target, kind, variant_eval

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target, "transfer": self.kind}
        if self.kind == "domain":
            out["variant_eval"] = self.variant_eval
        return out

    def check_method(self, method: str) -> None:
        from .. import methods

        if self.kind == "cross-dataset" and methods.get_class(method).needs_support_for_every_class:
            raise ResultsError(
                f"{method} needs support images for every class, so it cannot score {self.target}'s classes, which "
                "join the source classes without support (cross-dataset transfer)."
            )


VARIANT_SCORINGS = ("source_columns", "new_classes")


def transfer_kind(source, target, variant_scoring: str = "source_columns") -> str:
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


def run_transfer(
    config: FewShotConfig,
    targets: Sequence[str],
    out_dir: str | Path,
    *,
    variant_eval: str = "200way",
    variant_scoring: str = "source_columns",
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fit each method on the source episodes of ``config`` and score every target; returns
    ``{"results": [...], "written": [...], "skipped": [...], "table": str}``."""
    from ..data import TEMPLATE_SETS, load_dataset, load_prompts, resolve_name
    from ..features.bundle import make_bundle
    from ..features.pipeline import encode_images_once, episode_bundle, index_rows
    from ..features.store import FeatureStore
    from ..features.text import encode_text_classifier

    if variant_scoring not in VARIANT_SCORINGS:
        raise ResultsError(f"variant_scoring {variant_scoring!r} is unknown; valid: {', '.join(VARIANT_SCORINGS)}.")
    if variant_eval not in VARIANT_EVALS:
        raise ResultsError(f"variant_eval {variant_eval!r} is unknown; valid: {', '.join(VARIANT_EVALS)}.")
    if not targets:
        raise ResultsError("transfer needs at least one target dataset (--targets).")
    log = log or console_log
    out_dir = Path(out_dir)
    shots = list(dict.fromkeys(int(k) for k in config.shots))
    seeds = list(dict.fromkeys(int(s) for s in config.seeds))
    source = load_dataset(config.dataset, config.data_root, path=config.path, **dict(config.kind_options))
    target_splits = {}
    for t in dict.fromkeys(resolve_name(t) for t in targets):
        if t == source.name:
            raise ResultsError(f"the target {t} is the source dataset; use --protocol fewshot for it.")
        target_splits[t] = load_dataset(t, config.data_root)
    protocols = {
        t: Transfer(t, transfer_kind(source, s, variant_scoring), variant_eval) for t, s in target_splits.items()
    }
    plans = {t: check_methods(config, source.name, p) for t, p in protocols.items()}
    prompts = load_prompts(config.prompts, source.name)

    todo: dict[tuple[int, int], list[tuple[str, str]]] = {}
    results: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    setups, skipped, written = {}, [], []
    for k in shots:
        for seed in seeds:
            for t, plan in plans.items():
                for name, (preset, params) in plan.items():
                    setup = result_setup(config, protocols[t], source, prompts, name, preset, params, k, seed)
                    setup["target_split_sha256"] = target_splits[t].split_sha256
                    setups[t, name, k, seed] = setup
                    path = out_dir / source.name / "transfer" / t / name / f"shots_{k}-seed_{seed}.json"
                    old = existing_result(path, setup, force)
                    if old is not None:
                        results[t, name, k, seed] = old
                        skipped.append(path)
                    else:
                        todo.setdefault((k, seed), []).append((t, name))

    if todo:
        backbone = load_config_backbone(config)
        store = FeatureStore(config.cache_dir)
        episodes = {
            key: Protocol().episode(source, key[0], key[1], sampler=config.sampler, val_kind=config.val_kind)
            for key in todo
        }
        pool = encode_images_once(backbone, source, list(episodes.values()), test=[], store=store,
                                  options=config.extraction)  # fmt: skip
        text, _ = encode_text_classifier(backbone, source.classnames, prompts, store=store)
        target_pools, target_text = {}, {}
        for t, s in target_splits.items():
            target_pools[t] = encode_images_once(backbone, s, [], test=s.test, store=store, options=config.extraction)
            if protocols[t].kind == "cross-dataset":
                # a template set resolves per dataset; a prompts file belongs to the source, so targets get theirs
                target_prompts = load_prompts(config.prompts if config.prompts in TEMPLATE_SETS else "single", t)
                target_text[t], _ = encode_text_classifier(backbone, s.classnames, target_prompts, store=store)
        common = {"format": RESULT_FORMAT, "protocol": "transfer", "versions": versions(), "model": backbone.identity}
        for (k, seed), pairs in todo.items():
            base, _ = episode_bundle(pool, episodes[k, seed], [], text, metadata={"backbone": config.model})
            fitted: dict[str, Any] = {}
            for t, name in pairs:
                s, protocol, tpool = target_splits[t], protocols[t], target_pools[t]
                rows, labels = index_rows(tpool.eval_index, s.test)
                local = torch.tensor(labels, dtype=torch.long)
                features = tpool.evaluation[torch.tensor(rows, dtype=torch.long)]
                preset, params = plans[t][name]
                if protocol.kind == "domain":
                    bundle = base
                    model = fitted.get(name)
                else:
                    bundle = make_bundle(
                        support_features=base.support_features, support_labels=base.support_labels,
                        text_weights=torch.cat([text, target_text[t]]), test_features=features,
                        test_labels=local + source.num_classes, val_features=base.val_features,
                        val_labels=base.val_labels, support_clean_features=base.support_clean_features,
                        classnames=[*source.classnames, *s.classnames], metadata=dict(base.metadata),
                    )  # fmt: skip
                    model = None
                t1 = time.perf_counter()
                if model is None:
                    model = create_method(config, protocols[t], name, preset, params)
                    model.fit(bundle)
                    if protocol.kind == "domain":
                        fitted[name] = model
                logits = model.predict_logits(features)
                t2 = time.perf_counter()
                names = s.classnames
                if protocol.kind == "domain":
                    predicted, truth, in_source = domain_predictions(logits, local, s.imagenet_indices, variant_eval)
                    names = source.classnames if in_source else names
                else:
                    predicted, truth = logits[:, source.num_classes :].argmax(1), local  # within the target's columns
                hits = predicted == truth
                per_class = per_class_from_hits(hits, local, s.num_classes)
                present = [v for v in per_class if v is not None]
                scored = {
                    "test_accuracy": 100.0 * float(hits.double().mean()) if hits.numel() else float("nan"),
                    "test_mean_per_class": sum(present) / len(present) if present else float("nan"),
                }
                setup = setups[t, name, k, seed]
                result = {
                    **common,
                    "config_sha256": config_sha256(setup),
                    "setup": setup,
                    "dataset": source.name,
                    "target": t,
                    "transfer": protocol.kind,
                    "variant_eval": variant_eval if protocol.kind == "domain" else None,
                    "method": name,
                    "shots": k,
                    "seed": seed,
                    "hyperparameters": model.hyperparameters(),
                    "selected": getattr(model, "selected_", {}),
                    "accuracy": {**scored, "val_accuracy": model.val_accuracy_},
                    "per_class_accuracy": per_class,
                    "bad_images": [b.as_dict() for b in tpool.bad],
                    "seconds": {"fit_and_predict": t2 - t1},
                }
                path = out_dir / source.name / "transfer" / t / name / f"shots_{k}-seed_{seed}.json"
                result["predictions_file"] = write_predictions(path, predicted, truth, names).name
                written.append(write_result(path, result))
                results[t, name, k, seed] = result
                log(f"{k}-shot seed {seed} {name} -> {t}: {scored['test_accuracy']:.2f}")

    ordered = [results[key] for key in sorted(results, key=lambda x: (x[1], x[2], x[0], x[3]))]
    return {"results": ordered, "written": written, "skipped": skipped, "table": transfer_table(ordered)}


def transfer_table(results: Sequence[dict[str, Any]]) -> str:
    """Method x shots rows, one column per target: mean ± population std over seeds."""
    cells: dict[tuple[str, int], dict[str, list[float]]] = {}
    targets = list(dict.fromkeys(r["target"] for r in results))
    for r in results:
        cells.setdefault((r["method"], r["shots"]), {}).setdefault(r["target"], []).append(
            r["accuracy"]["test_accuracy"]
        )
    body = []
    for (method, k), per_target in cells.items():
        row = [method, str(k)]
        for t in targets:
            values = per_target.get(t)
            row.append("-" if not values else "{:.2f} ± {:.2f}".format(*mean_std(values)))
        body.append(row)
    return text_table(["method", "shots", *targets], body)
