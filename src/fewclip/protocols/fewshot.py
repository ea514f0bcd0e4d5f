"""The few-shot protocol: K-shot episodes x seeds x methods on one dataset, one results file each.

>>> config = FewShotConfig(dataset="caltech101", data_root="/data", model="RN50", pretrained="openai",
...                        methods=["tip-adapter", "ape"], shots=[1, 2, 4, 8, 16], seeds=[1, 2, 3])
>>> report = run_fewshot(config, "results/")
>>> print(report.table())

Every image is encoded once for the whole sweep (and never again, with the feature cache): the support images of
all episodes under V augmented views plus the clean view, their validation images and the test set. Each
episode's bundle is then sliced from those features, each method is fitted on it (hyperparameters and epochs
chosen on the episode's validation images) and evaluated once on test. A result that already exists for the same
setup is skipped; a result for another setup is an error unless ``force``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..features.pipeline import ExtractionOptions
from .protocol import Protocol, make_protocol
from .results import (
    RESULT_FORMAT,
    SUMMARY_FORMAT,
    ResultsError,
    config_sha256,
    protocol_dir,
    read_result,
    result_path,
    setup_difference,
    versions,
    write_predictions,
    write_result,
)

PAPER_PRESET = "paper"


@dataclass
class FewShotConfig:
    """Everything a few-shot sweep needs. ``preset='paper'`` uses each method's published configuration for the
    dataset where it has one; ``overrides`` maps a method name (or ``"*"``, every method) to hyperparameters."""

    dataset: str
    model: str
    pretrained: str | None = None
    methods: Sequence[str] = ("zero-shot", "tip-adapter", "ape")
    shots: Sequence[int] = (1, 2, 4, 8, 16)
    seeds: Sequence[int] = (1, 2, 3)
    data_root: str | None = None
    path: str | None = None
    kind_options: Mapping[str, Any] = field(default_factory=dict)
    backend: str = "open_clip"
    precision: str = "fp32"
    device: str = "cpu"
    preprocess: str = "auto"
    prompts: str = "single"
    preset: str | None = None
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    selection: str = "val"
    sampler: str | None = None
    val_kind: str = "fewshot"
    extraction: ExtractionOptions = field(default_factory=ExtractionOptions)
    cache_dir: str | None = None
    trust_checkpoint: bool = False
    protocol: str = "fewshot"
    imbalance_ratio: float | None = None
    base_eval: str = "within_base"


@dataclass
class FewShotReport:
    """What a sweep did: every result (new and reused), and how many images it encoded."""

    dataset: str
    results: list[dict[str, Any]]
    written: list[Path]
    skipped: list[Path]
    encoded: int = 0
    cached: int = 0
    extraction_seconds: float = 0.0
    seeds_expected: int | None = None
    summary_path: Path | None = None
    protocol: Protocol = field(default_factory=Protocol)

    def summary(self) -> list[dict[str, Any]]:
        return self.protocol.summarize(self.results)

    def table(self) -> str:
        return self.protocol.format(self.summary(), self.seeds_expected)


def method_preset(method: str, preset: str | None, dataset: str) -> str | None:
    """The preset ``method`` runs with: ``paper`` -> the dataset's published one if the method has it; a name ->
    that preset for methods that ship presets; methods without presets run their defaults (None)."""
    from .. import methods

    available = methods.list_presets(method)
    if preset is None or not available:
        return None
    name = dataset if preset == PAPER_PRESET else preset
    return name if name in available else None


def method_overrides(overrides: Mapping[str, Mapping[str, Any]], method: str) -> dict[str, Any]:
    return {**overrides.get("*", {}), **overrides.get(method, {})}


def create_method(config: FewShotConfig, protocol: Protocol, name: str, preset: str | None, params: Mapping[str, Any]):
    """The unfitted estimator: the preset, then the protocol's defaults for this method, then the user's overrides."""
    from .. import methods

    return methods.create(
        name, preset=preset, selection=config.selection, **{**protocol.method_defaults(name), **params}
    )


def check_methods(
    config: FewShotConfig, dataset: str, protocol: Protocol
) -> dict[str, tuple[str | None, dict[str, Any]]]:
    """Create every method once before any image is encoded, so a bad name or override fails fast."""
    from .. import methods

    unknown = [k for k in config.overrides if k != "*" and k not in config.methods]
    if unknown:
        raise ResultsError(f"overrides for {unknown}, which are not among the methods run ({list(config.methods)}).")
    plan = {}
    for name in config.methods:
        methods.get_class(name)
        protocol.check_method(name)
        preset = method_preset(name, config.preset, dataset)
        params = method_overrides(config.overrides, name)
        create_method(config, protocol, name, preset, params)
        plan[name] = (preset, params)
    return plan


def result_setup(
    config: FewShotConfig, protocol: Protocol, splits, prompts, method: str, preset: str | None, params: dict, k, seed
):
    """The fields that decide a result (its fingerprint): not paths, devices, batch sizes or timings."""
    defaults = protocol.method_defaults(method)
    return {
        "protocol": protocol.name,
        **protocol.params(),
        "dataset": splits.name,
        "split_sha256": splits.split_sha256,
        "model": config.model,
        "pretrained": config.pretrained,
        "backend": config.backend,
        "precision": config.precision,
        "preprocess": config.preprocess,
        "prompts": prompts.name if prompts.sha256 is None else f"file:{prompts.sha256}",
        "sampler": config.sampler,
        "val_kind": config.val_kind,
        **config.extraction.recorded(),
        "method": method,
        "preset": preset,
        **({"protocol_defaults": defaults} if defaults else {}),
        "overrides": params,
        "selection": config.selection,
        "shots": k,
        "seed": seed,
    }


def load_config_backbone(config: FewShotConfig):
    """The :class:`~fewclip.models.Backbone` that ``config`` names."""
    from ..models import load_backbone

    return load_backbone(
        config.model,
        config.pretrained,
        backend=config.backend,
        precision=config.precision,
        device=config.device,
        preprocess=config.preprocess,
        cache_dir=config.cache_dir,
        trust_checkpoint=config.trust_checkpoint,
    )


def existing_result(path: Path, setup: Mapping[str, Any], force: bool) -> dict[str, Any] | None:
    """The finished result at ``path`` for this ``setup`` (None: run it); another setup's result is an error."""
    old = None if force else read_result(path)
    if old is not None and old.get("config_sha256") != config_sha256(setup):
        diff = "; ".join(setup_difference(old.get("setup", {}), setup)) or "unknown fields"
        raise ResultsError(
            f"{path} holds a result of another setup ({diff}). Pass --force to overwrite it, or write to another "
            "--out folder."
        )
    return old


def console_log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message)


def run_fewshot(
    config: FewShotConfig,
    out_dir: str | Path,
    *,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> FewShotReport:
    """Run the sweep of ``config`` under its protocol and write one result file per (method, shots, seed):
    ``<out>/<dataset>/<method>/shots_<K>-seed_<S>.json`` (``<out>/<dataset>/<protocol>/...`` for the others)."""
    from tqdm import tqdm

    from ..data import episode_filename, load_dataset, load_prompts, save_episode
    from ..features.pipeline import encode_images_once, episode_bundle
    from ..features.store import FeatureStore
    from ..features.text import encode_text_classifier

    log = log or console_log
    out_dir = Path(out_dir)
    shots = list(dict.fromkeys(int(k) for k in config.shots))
    if any(k < (0 if config.protocol == "longtail" else 1) for k in shots):
        raise ResultsError(f"shots must be positive (0 = the whole training list, longtail only), got {shots}.")
    seeds = list(dict.fromkeys(int(s) for s in config.seeds))
    if not config.methods or not shots or not seeds:
        raise ResultsError("a few-shot run needs at least one method, one shot count and one seed.")
    splits = load_dataset(config.dataset, config.data_root, path=config.path, **dict(config.kind_options))
    prompts = load_prompts(config.prompts, splits.name)
    protocol = make_protocol(config.protocol, config.imbalance_ratio, config.base_eval)
    protocol.prepare(splits)
    plan = check_methods(config, splits.name, protocol)
    folder = protocol_dir(out_dir, splits.name, protocol.name)

    # Which results exist already (same setup: skip), which are missing, which conflict.
    todo: dict[tuple[int, int], list[str]] = {}
    results: dict[tuple[str, int, int], dict[str, Any]] = {}
    setups: dict[tuple[str, int, int], dict[str, Any]] = {}
    skipped: list[Path] = []
    for k in shots:
        for seed in seeds:
            for name, (preset, params) in plan.items():
                setup = result_setup(config, protocol, splits, prompts, name, preset, params, k, seed)
                setups[name, k, seed] = setup
                path = result_path(out_dir, splits.name, name, k, seed, protocol.name)
                old = existing_result(path, setup, force)
                if old is not None:
                    results[name, k, seed] = old
                    skipped.append(path)
                else:
                    todo.setdefault((k, seed), []).append(name)
    report = FewShotReport(splits.name, [], [], skipped, seeds_expected=len(seeds), protocol=protocol)
    if skipped:
        log(f"{len(skipped)} result(s) already in {out_dir} for this setup: skipped (--force re-runs them).")

    if todo:
        episodes = {}
        episode_files = {}
        for k, seed in todo:
            episode = protocol.episode(splits, k, seed, sampler=config.sampler, val_kind=config.val_kind)
            file = save_episode(episode, folder / "episodes" / episode_filename(episode))
            episodes[k, seed], episode_files[k, seed] = episode, file
        backbone = load_config_backbone(config)
        store = FeatureStore(config.cache_dir)
        t0 = time.perf_counter()
        test = protocol.test_items(splits)
        pool = encode_images_once(
            backbone, splits, list(episodes.values()), test=test, store=store, options=config.extraction
        )
        text_weights, text_info = encode_text_classifier(backbone, splits.classnames, prompts, store=store)
        report.extraction_seconds = time.perf_counter() - t0
        report.encoded, report.cached = pool.encoded, pool.cached
        log(
            f"{splits.name}: {pool.encoded} image view(s) encoded, {pool.cached} read from the cache "
            f"({report.extraction_seconds:.1f} s)."
        )
        common = {
            "format": RESULT_FORMAT,
            "protocol": protocol.name,
            "protocol_params": protocol.params(),
            "versions": versions(),
            "model": backbone.identity,
            "prompts": {
                "name": prompts.name,
                "kind": prompts.kind,
                "sha256": prompts.sha256,
                "templates": list(prompts.templates),
                **text_info,
            },
            "split": {
                "sha256": splits.split_sha256,
                "source": splits.split_source,
                "standard": splits.standard_split,
                "counts": splits.counts(),
                "warnings": list(splits.warnings),
            },
            "extraction": {**config.extraction.recorded(), "seconds_shared": report.extraction_seconds},
            "bad_images": [b.as_dict() for b in pool.bad],
            "test_tuned": False,
        }
        total = sum(len(v) for v in todo.values())
        bar = tqdm(
            total=total,
            desc=f"{splits.name}: fitting",
            unit="fit",
            disable=None if config.extraction.progress else True,
        )
        with bar:
            for (k, seed), names in todo.items():
                episode = episodes[k, seed]
                bundle, dropped = episode_bundle(
                    pool,
                    episode,
                    test,
                    text_weights,
                    metadata={"backbone": config.model, "pretrained": config.pretrained},
                )
                for name in names:
                    preset, params = plan[name]
                    model = create_method(config, protocol, name, preset, params)
                    t1 = time.perf_counter()
                    model.fit(bundle)
                    t2 = time.perf_counter()
                    logits = model.predict_logits(bundle.test_features)
                    t3 = time.perf_counter()
                    labels = bundle.test_labels
                    scores, extra = protocol.evaluate(logits, labels, bundle.num_classes)
                    setup = setups[name, k, seed]
                    result = {
                        **common,
                        "config_sha256": config_sha256(setup),
                        "setup": setup,
                        "dataset": splits.name,
                        "method": name,
                        "shots": k,
                        "seed": seed,
                        "preset": preset,
                        "overrides": params,
                        "selection": config.selection,
                        "episode": {
                            "file": str(episode_files[k, seed].relative_to(out_dir)),
                            "sampler": episode.sampler,
                            "val_kind": episode.val_kind,
                            "support": bundle.support_labels.numel(),
                            "val": 0 if bundle.val_labels is None else bundle.val_labels.numel(),
                            "test": labels.numel(),
                            "dropped_bad_images": dropped,
                        },
                        "hyperparameters": model.hyperparameters(),
                        "selected": getattr(model, "selected_", {}),
                        "best_epoch": getattr(model, "best_epoch_", None),
                        "history": getattr(model, "history_", None),
                        "accuracy": {**scores, "val_accuracy": model.val_accuracy_},
                        **extra,
                        "seconds": {"fit": t2 - t1, "predict": t3 - t2},
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    }
                    path = result_path(out_dir, splits.name, name, k, seed, protocol.name)
                    saved = write_predictions(path, protocol.predictions(logits, labels), labels, bundle.classnames)
                    result["predictions_file"] = saved.name
                    write_result(path, result)
                    results[name, k, seed] = result
                    report.written.append(path)
                    val = "n/a" if model.val_accuracy_ is None else f"{model.val_accuracy_:.2f}"
                    shown = "  ".join(f"{key} {value:.2f}" for key, value in scores.items() if "all_classes" not in key)
                    log(f"{k}-shot seed {seed} {name}: {shown}  val {val}  ({t2 - t1:.2f} s)")
                    bar.update(1)

    report.results = [results[name, k, seed] for name in plan for k in shots for seed in seeds]
    summary_path = folder / "summary.json"
    summary = {"format": SUMMARY_FORMAT, "dataset": splits.name, "protocol": protocol.name, "summary": report.summary()}
    write_result(summary_path, summary)
    report.summary_path = summary_path
    return report
