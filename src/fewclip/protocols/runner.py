"""The staged runner: one path from images on disk to result files, for every protocol.

>>> config = RunConfig(DataConfig("caltech101", data_root="/data"), BackboneSpec("RN50", "openai"),
...                    MethodsConfig(["tip-adapter", "ape"]), ProtocolConfig(shots=[1, 2, 4, 8, 16]))
>>> report = run(config, "results/")
>>> print(report.table())

Stages, with plain data between them (a sweep or a cluster engine can run each on its own):

1. :func:`plan` — load the dataset, the prompts and the protocol (with its targets), check every method once, and
   list the cells: (method, shots, seed, target), each with its setup fingerprint and result path.
2. :func:`partition` — a finished result of the same setup is kept (skipped); one of another setup is an error
   unless ``force``; a failed result is run again.
3. :func:`draw_episodes` — draw and save the episode of every (shots, seed) still to run.
4. :func:`encode` — the GPU stage: encode every image the remaining cells need once (support views, validation
   and test images of the dataset and of every target) and the text classifiers, through the feature cache.
5. :func:`fit_and_score` — the CPU stage: fit one cell's method on its episode bundle (choices on validation only),
   evaluate the test set once, build the result record. A failure is recorded in the cell's result file with its
   error, and the run goes on.
6. :func:`~fewclip.protocols.results.write_result` — one schema for every protocol.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..data import DatasetSplits, Episode, Item, Prompts, episode_filename, load_dataset, load_prompts, save_episode
from ..errors import ResultsError
from ..features.bundle import Bundle
from ..features.extract import extract
from ..features.pipeline import FeaturePool, encode_images_once, episode_bundle
from ..features.store import FeatureStore
from ..features.text import encode_text_classifier
from ..methods import ImageEpisode, Method, create, get_class, list_presets
from ..models import Backbone
from ..progress import progress
from .config import PROTOCOLS, RunConfig
from .protocol import BaseToNew, LongTail, Protocol, Target
from .results import (
    RESULT_FORMAT,
    SUMMARY_FORMAT,
    backbone_slug,
    config_sha256,
    episodes_dir,
    predictions_path,
    protocol_dir,
    read_result,
    result_path,
    setup_difference,
    versions,
    write_predictions,
    write_result,
)
from .transfer import Transfer

PAPER_PRESET = "paper"
Log = Callable[[str], None]


def console_log(message: str) -> None:
    tqdm.write(message)


# --------------------------------------------------------------------------- stage 1: plan


@dataclass(frozen=True)
class Cell:
    """One result to produce: a method fitted on the (shots, seed) episode, scored on ``target`` (None: the
    dataset's own test split)."""

    method: str
    shots: int
    seed: int
    target: str | None = None


@dataclass
class Plan:
    """What :func:`plan` decides before any image is encoded."""

    config: RunConfig
    out_dir: Path
    splits: DatasetSplits
    prompts: Prompts
    protocol: Protocol
    targets: dict[str | None, Target]
    methods: dict[str, tuple[str | None, dict[str, Any]]]  # name -> (preset, the user's overrides)
    backbone: str  # the backbone's folder name in the results tree
    shots: list[int]
    seeds: list[int]
    cells: list[Cell] = field(default_factory=list)
    setups: dict[Cell, dict[str, Any]] = field(default_factory=dict)
    paths: dict[Cell, Path] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return protocol_dir(self.out_dir, self.splits.name, self.backbone, self.protocol.name)


def make_protocol(config: RunConfig) -> Protocol:
    """The protocol ``config.protocol`` names, with its options."""
    p = config.protocol
    if p.name == "fewshot":
        return Protocol()
    if p.name == "longtail":
        return LongTail()
    if p.name == "base2new":
        return BaseToNew(base_eval=p.base_eval)
    if p.name == "base2new-imbalanced":
        if p.imbalance_ratio is None:
            raise ResultsError("base2new-imbalanced needs an imbalance ratio (--imbalance-ratio, e.g. 0.02).")
        return BaseToNew(p.imbalance_ratio, p.base_eval)
    if p.name == "transfer":
        return Transfer(p.targets, p.variant_eval, p.variant_scoring, prompts=config.data.prompts)
    raise ResultsError(f"unknown protocol {p.name!r}; valid: {', '.join(PROTOCOLS)}.")


def method_preset(method: str, preset: str | None, dataset: str) -> str | None:
    """The preset ``method`` runs with: ``paper`` -> the dataset's published one if the method has it; a name ->
    that preset for methods that ship presets; methods without presets run their defaults (None)."""
    available = list_presets(method)
    if preset is None or not available:
        return None
    name = dataset if preset == PAPER_PRESET else preset
    return name if name in available else None


def method_overrides(overrides: Mapping[str, Mapping[str, Any]], method: str) -> dict[str, Any]:
    return {**overrides.get("*", {}), **overrides.get(method, {})}


def create_method(config: RunConfig, protocol: Protocol, name: str, preset: str | None, params: Mapping[str, Any]):
    """The unfitted estimator: the preset, then the protocol's defaults for this method, then the user's overrides."""
    return create(
        name, preset=preset, selection=config.methods.selection, **{**protocol.method_defaults(name), **params}
    )


def check_methods(config: RunConfig, dataset: str, protocol: Protocol) -> dict[str, tuple[str | None, dict[str, Any]]]:
    """Create every method and check its hyperparameters once before any image is encoded, so a bad name, value or
    override fails fast (what depends on the data is checked when each cell is fitted)."""
    names = list(dict.fromkeys(config.methods.names))
    unknown = [k for k in config.methods.overrides if k != "*" and k not in names]
    if unknown:
        raise ResultsError(f"overrides for {unknown}, which are not among the methods run ({names}).")
    plan = {}
    for name in names:
        get_class(name)
        protocol.check_method(name)
        preset = method_preset(name, config.methods.preset, dataset)
        params = method_overrides(config.methods.overrides, name)
        create_method(config, protocol, name, preset, params).validate_params()
        plan[name] = (preset, params)
    return plan


def cell_setup(plan: Plan, cell: Cell) -> dict[str, Any]:
    """The fields that decide a result (its fingerprint): not paths, devices, batch sizes or timings."""
    config, protocol = plan.config, plan.protocol
    preset, params = plan.methods[cell.method]
    defaults = protocol.method_defaults(cell.method)
    spec = config.backbone
    prompts = plan.prompts
    return {
        "protocol": protocol.name,
        **protocol.params(),
        **protocol.target_params(plan.targets[cell.target]),
        "dataset": plan.splits.name,
        "split_sha256": plan.splits.split_sha256,
        "model": spec.model,
        "pretrained": spec.pretrained,
        "backend": spec.backend,
        "precision": spec.precision,
        "preprocess": spec.preprocess,
        "prompts": prompts.name if prompts.sha256 is None else f"file:{prompts.sha256}",
        "sampler": config.data.sampler,
        "val_kind": config.data.val_kind,
        **config.extraction.recorded(),
        "method": cell.method,
        "preset": preset,
        **({"protocol_defaults": defaults} if defaults else {}),
        "overrides": params,
        "selection": config.methods.selection,
        "shots": cell.shots,
        "seed": cell.seed,
    }


def plan(config: RunConfig, out_dir: str | Path) -> Plan:
    """Stage 1: load what the run is about and list its cells (nothing is encoded or fitted)."""
    data = config.data
    shots = list(dict.fromkeys(_integers("shots", config.protocol.shots)))
    seeds = list(dict.fromkeys(_integers("seeds", config.protocol.seeds)))
    if any(k < (0 if config.protocol.name == "longtail" else 1) for k in shots):
        raise ResultsError(f"shots must be positive (0 = the whole training list, longtail only), got {shots}.")
    if not config.methods.names or not shots or not seeds:
        raise ResultsError("a run needs at least one method, one shot count and one seed.")
    splits = load_dataset(data.dataset, data.data_root, path=data.path, **dict(data.kind_options))
    prompts = load_prompts(data.prompts, splits.name)
    protocol = make_protocol(config)
    protocol.prepare(splits, lambda name: load_dataset(name, data.data_root))
    targets = {t.name: t for t in protocol.targets(splits)}
    result = Plan(
        config=config,
        out_dir=Path(out_dir),
        splits=splits,
        prompts=prompts,
        protocol=protocol,
        targets=targets,
        methods=check_methods(config, splits.name, protocol),
        backbone=backbone_slug(config.backbone),
        shots=shots,
        seeds=seeds,
    )
    for k in shots:
        for seed in seeds:
            for target in targets:
                for method in result.methods:
                    cell = Cell(method, k, seed, target)
                    result.cells.append(cell)
                    result.setups[cell] = cell_setup(result, cell)
                    result.paths[cell] = result_path(
                        out_dir, splits.name, result.backbone, protocol.name, method, k, seed, target
                    )
    return result


def _integers(what: str, values) -> list[int]:
    if isinstance(values, str | bytes) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ResultsError(f"{what} must be a list of integers, got {values!r}.")
    return [int(v) for v in values]


# --------------------------------------------------------------------------- stage 2: skip or conflict


def existing_result(path: Path, setup: Mapping[str, Any], force: bool) -> dict[str, Any] | None:
    """The finished result at ``path`` for this ``setup`` (None: run it); another setup's result is an error, a
    failed one is run again."""
    old = None if force else read_result(path)
    if old is None or old.get("status") == "failed":
        return None
    if old.get("config_sha256") != config_sha256(setup):
        diff = "; ".join(setup_difference(old.get("setup", {}), setup)) or "unknown fields"
        raise ResultsError(
            f"{path} holds a result of another setup ({diff}). Pass --force to overwrite it, or write to another "
            "--out folder."
        )
    return old


def partition(plan: Plan, force: bool = False) -> tuple[list[Cell], dict[Cell, dict[str, Any]]]:
    """Stage 2: (cells to run, finished results of the others)."""
    todo, done = [], {}
    for cell in plan.cells:
        old = existing_result(plan.paths[cell], plan.setups[cell], force)
        if old is None:
            todo.append(cell)
        else:
            done[cell] = old
    return todo, done


# --------------------------------------------------------------------------- stage 3: episodes


def draw_episodes(plan: Plan, cells: list[Cell]) -> dict[tuple[int, int], tuple[Episode, Path]]:
    """Stage 3: draw and save the episode of every (shots, seed) among ``cells``."""
    data = plan.config.data
    folder = episodes_dir(plan.out_dir, plan.splits.name, plan.protocol.name)
    out = {}
    for k, seed in dict.fromkeys((c.shots, c.seed) for c in cells):
        episode = plan.protocol.episode(plan.splits, k, seed, sampler=data.sampler, val_kind=data.val_kind)
        out[k, seed] = episode, save_episode(episode, folder / episode_filename(episode))
    return out


# --------------------------------------------------------------------------- stage 4: extract


@dataclass
class Features:
    """What :func:`encode` encoded: the dataset's pool and text classifier, and each target's."""

    pool: FeaturePool
    text: torch.Tensor
    text_info: dict[str, Any]
    target_pools: dict[str, FeaturePool]
    target_text: dict[str, torch.Tensor]
    backbone: Backbone
    store: FeatureStore
    seconds: float

    @property
    def encoded(self) -> int:
        return self.pool.encoded + sum(p.encoded for p in self.target_pools.values())

    @property
    def cached(self) -> int:
        return self.pool.cached + sum(p.cached for p in self.target_pools.values())

    def test_pool(self, target: Target) -> FeaturePool:
        return self.pool if target.name is None else self.target_pools[target.name]


def encode(plan: Plan, episodes: Mapping[tuple[int, int], tuple[Episode, Path]], store: FeatureStore) -> Features:
    """Stage 4 (the GPU stage): every image and prompt the episodes and targets need, encoded once."""
    options = plan.config.extraction
    t0 = time.perf_counter()
    backbone = plan.config.backbone.load()
    own_test = [item for t in plan.targets.values() if t.name is None for item in t.items]
    pool = encode_images_once(
        backbone, plan.splits, [e for e, _ in episodes.values()], test=own_test, store=store, options=options
    )
    text, text_info = encode_text_classifier(backbone, plan.splits.classnames, plan.prompts, store=store)
    target_pools, target_text = {}, {}
    for target in plan.targets.values():
        if target.name is None:
            continue
        target_pools[target.name] = encode_images_once(
            backbone, target.splits, [], test=target.items, store=store, options=options
        )
        if target.prompts is not None:
            target_text[target.name], _ = encode_text_classifier(
                backbone, target.splits.classnames, target.prompts, store=store
            )
    return Features(pool, text, text_info, target_pools, target_text, backbone, store, time.perf_counter() - t0)


# --------------------------------------------------------------------------- stage 5: fit and score


def common_record(plan: Plan, features: Features) -> dict[str, Any]:
    """The fields every result of this run shares."""
    prompts, splits = plan.prompts, plan.splits
    return {
        "format": RESULT_FORMAT,
        "protocol": plan.protocol.name,
        "versions": versions(),
        "backbone": plan.backbone,
        "model": features.backbone.identity,
        "prompts": {
            "name": prompts.name,
            "kind": prompts.kind,
            "sha256": prompts.sha256,
            "templates": list(prompts.templates),
            **features.text_info,
        },
        "split": {
            "sha256": splits.split_sha256,
            "source": splits.split_source,
            "standard": splits.standard_split,
            "counts": splits.counts(),
            "warnings": list(splits.warnings),
        },
        "extraction": {**plan.config.extraction.recorded(), "seconds_shared": features.seconds},
        "test_tuned": False,
    }


def fit_and_predict(model: Method, bundle: Bundle) -> tuple[torch.Tensor, dict[str, float]]:
    """Fit ``model`` on ``bundle`` (it sees no test data), then predict the test rows once: (logits, seconds)."""
    t0 = time.perf_counter()
    model.fit(bundle)
    t1 = time.perf_counter()
    logits = model.predict_logits(bundle.test_features)
    return logits, {"fit": t1 - t0, "predict": time.perf_counter() - t1}


@dataclass(frozen=True)
class CellData:
    """What one (episode, target) gives every method fitted and scored on it."""

    bundle: Bundle  # the episode's support and validation features, the target's test rows, the cell's classes
    dropped: Mapping[str, int]  # images left out as unreadable, per split
    episode: Episode  # the episode, its class names those of the bundle
    test: list[Item]  # the target's test items, labels in the bundle's classes
    episode_file: Path


def fit_and_score(
    plan: Plan,
    cell: Cell,
    data: CellData,
    features: Features,
    common: Mapping[str, Any],
    fitted: dict[Any, tuple[Method, float]],
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, list[str]]:
    """Stage 5 for one cell: (result record, predicted, true classes, class names they index).

    A feature method is fitted on the cell's bundle and predicts its test features. An image method is fitted on
    the episode's images (:class:`~fewclip.methods.image.ImageEpisode`); the test images are then encoded with its
    fine-tuned encoder, through the feature cache, and scored by its head. ``fitted`` keeps the models a protocol
    scores on several targets (ImageNet variants), so each is fitted once.
    """
    protocol, target = plan.protocol, plan.targets[cell.target]
    preset, params = plan.methods[cell.method]
    images = get_class(cell.method).inputs == "images"
    key = (cell.method, cell.shots, cell.seed, protocol.fit_key(target))
    if key in fitted:
        model, fit_seconds = fitted[key]
    else:
        model = create_method(plan.config, protocol, cell.method, preset, params)
        t0 = time.perf_counter()
        model.fit(image_episode(plan, data, features) if images else data.bundle)
        fit_seconds = time.perf_counter() - t0
        fitted[key] = model, fit_seconds
    t0 = time.perf_counter()
    encoder: dict[str, Any] | None = None
    if images:
        test_features, labels, encoder = encode_test_images(plan, model, target, data.test, features)
    else:
        test_features, labels = data.bundle.test_features, data.bundle.test_labels
    logits = model.predict_logits(test_features)
    seconds = {"fit": fit_seconds, "predict": time.perf_counter() - t0}
    bundle = data.bundle
    scores, extra = protocol.evaluate(logits, labels, bundle.num_classes, target)
    predicted, truth, names = protocol.prediction_record(logits, labels, bundle.classnames, target)
    setup = plan.setups[cell]
    result = {
        **common,
        "status": "ok",
        "protocol_params": {**protocol.params(), **protocol.target_params(target)},
        "config_sha256": config_sha256(setup),
        "setup": setup,
        "dataset": plan.splits.name,
        "target": cell.target,
        "method": cell.method,
        "shots": cell.shots,
        "seed": cell.seed,
        "preset": preset,
        "overrides": params,
        "selection": plan.config.methods.selection,
        "episode": {
            "file": _relative(data.episode_file, plan.out_dir),
            "sampler": data.episode.sampler,
            "val_kind": data.episode.val_kind,
            "support": bundle.support_labels.numel(),
            "val": 0 if bundle.val_labels is None else bundle.val_labels.numel(),
            "test": labels.numel(),
            "dropped_bad_images": dict(data.dropped),
        },
        "hyperparameters": model.hyperparameters(),
        "selected": getattr(model, "selected_", {}),
        "best_epoch": getattr(model, "best_epoch_", None),
        "history": getattr(model, "history_", None),
        "accuracy": {**scores, "val_accuracy": model.val_accuracy_},
        **extra,
        **({"image_encoder": encoder} if encoder is not None else {}),
        "seconds": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return result, predicted, truth, list(names)


def image_episode(plan: Plan, data: CellData, features: Features) -> ImageEpisode:
    """What an image method is fitted on, for one cell: the episode's images, the backbone (already loaded in this
    process), the cell's text rows, the images the extraction stage found unreadable left out."""
    return ImageEpisode(
        splits=plan.splits,
        episode=data.episode,
        backbone=plan.config.backbone,
        text_weights=data.bundle.text_weights,
        loaded=features.backbone,
        exclude=frozenset(features.pool.bad_paths()),
        options=plan.config.extraction,
    )


def encode_test_images(
    plan: Plan, model: Method, target: Target, items: list[Item], features: Features
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(features, labels, record) of ``items`` (labels in the cell's classes) encoded by an image method's
    fine-tuned encoder, through the feature cache (its key records the fine-tuned weights' hash)."""
    encoder = model.image_encoder()
    options = plan.config.extraction
    out = extract(
        encoder,
        target.splits.root,
        [i.path for i in items],
        store=features.store,
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        skip_bad_images=options.skip_bad_images,
        dataset=target.splits.name,
        split_hash=target.splits.split_sha256,
        progress=options.progress,
        desc=f"{target.splits.name}: test images through the fine-tuned encoder",
    )
    labels = torch.tensor([items[i].label for i in out.kept], dtype=torch.long)
    record = {**encoder.identity["finetuned"], "test_encoded": out.encoded, "test_cached": out.cached}
    record["skipped_images"] = [*getattr(model, "skipped_images_", []), *(b.path for b in out.bad)]
    return out.features, labels, record


def failure_record(plan: Plan, cell: Cell, exc: BaseException) -> dict[str, Any]:
    """The result file of a cell whose fit or scoring raised: the error, and what is needed to re-run it."""
    setup = plan.setups[cell]
    return {
        "format": RESULT_FORMAT,
        "status": "failed",
        "protocol": plan.protocol.name,
        "config_sha256": config_sha256(setup),
        "setup": setup,
        "dataset": plan.splits.name,
        "backbone": plan.backbone,
        "target": cell.target,
        "method": cell.method,
        "shots": cell.shots,
        "seed": cell.seed,
        "error": {
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": traceback.format_exception(exc),
        },
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- the whole run


@dataclass
class RunReport:
    """What a run did: every finished result (new and reused), the failures, and how many images it encoded."""

    plan: Plan
    results: list[dict[str, Any]]
    written: list[Path]
    skipped: list[Path]
    failed: list[tuple[Path, str]]
    encoded: int = 0
    cached: int = 0
    extraction_seconds: float = 0.0
    summary_path: Path | None = None

    @property
    def dataset(self) -> str:
        return self.plan.splits.name

    @property
    def protocol(self) -> Protocol:
        return self.plan.protocol

    @property
    def seeds_expected(self) -> int:
        return len(self.plan.seeds)

    def summary(self) -> list[dict[str, Any]]:
        return self.protocol.summarize(self.results)

    def table(self) -> str:
        return self.protocol.format(self.summary(), self.seeds_expected)


def run(config: RunConfig, out_dir: str | Path, *, force: bool = False, log: Log | None = None) -> RunReport:
    """Run every stage for ``config``; one result file per cell under ``out_dir`` (see
    :func:`~fewclip.protocols.results.result_path`), a summary per protocol folder."""
    log = log or console_log
    the_plan = plan(config, out_dir)
    todo, done = partition(the_plan, force)
    report = RunReport(the_plan, [], [], [the_plan.paths[c] for c in done], [])
    if done:
        log(f"{len(done)} result(s) already in {out_dir} for this setup: skipped (--force re-runs them).")
    results: dict[Cell, dict[str, Any]] = dict(done)
    if todo:
        episodes = draw_episodes(the_plan, todo)
        store = FeatureStore(config.cache_dir)
        features = encode(the_plan, episodes, store)
        report.encoded, report.cached, report.extraction_seconds = features.encoded, features.cached, features.seconds
        log(
            f"{the_plan.splits.name}: {features.encoded} image view(s) encoded, {features.cached} read from the cache "
            f"({features.seconds:.1f} s)."
        )
        common = common_record(the_plan, features)
        results.update(_fit_all(the_plan, todo, episodes, features, common, report, log))
    report.results = [results[c] for c in the_plan.cells if c in results and results[c].get("status", "ok") == "ok"]
    summary_path = the_plan.folder / "summary.json"
    summary = {
        "format": SUMMARY_FORMAT,
        "dataset": the_plan.splits.name,
        "backbone": the_plan.backbone,
        "protocol": the_plan.protocol.name,
        "summary": report.summary(),
        "failed": [str(p) for p, _ in report.failed],
    }
    write_result(summary_path, summary)
    report.summary_path = summary_path
    return report


def _fit_all(
    plan: Plan,
    todo: list[Cell],
    episodes: Mapping[tuple[int, int], tuple[Episode, Path]],
    features: Features,
    common: Mapping[str, Any],
    report: RunReport,
    log: Log,
) -> dict[Cell, dict[str, Any]]:
    """Stage 5 and 6 over ``todo``: every cell fitted, scored and written; a failing cell is recorded and skipped."""
    out: dict[Cell, dict[str, Any]] = {}
    by_episode: dict[tuple[int, int], list[Cell]] = {}
    for cell in todo:
        by_episode.setdefault((cell.shots, cell.seed), []).append(cell)
    bar = progress(len(todo), f"{plan.splits.name}: fitting", "fit", enabled=plan.config.extraction.progress)
    with bar:
        for (k, seed), cells in by_episode.items():
            fitted: dict[Any, tuple[Method, float]] = {}
            cell_data: dict[str | None, CellData] = {}
            for cell in cells:
                path = plan.paths[cell]
                target = plan.targets[cell.target]
                try:
                    if cell.target not in cell_data:
                        cell_data[cell.target] = _cell_data(plan, features, episodes[k, seed], target)
                    record = dict(common)
                    pool = features.test_pool(target)
                    record["bad_images"] = [b.as_dict() for b in features.pool.bad] + (
                        [] if pool is features.pool else [b.as_dict() for b in pool.bad]
                    )
                    result, predicted, truth, names = fit_and_score(
                        plan, cell, cell_data[cell.target], features, record, fitted
                    )
                    saved = write_predictions(path, predicted, truth, names)
                    result["predictions_file"] = saved.name
                except Exception as exc:  # one failing cell is recorded, the run goes on
                    predictions_path(path).unlink(missing_ok=True)  # an earlier success's, no longer this result's
                    write_result(path, failure_record(plan, cell, exc))
                    report.failed.append((path, f"{type(exc).__name__}: {exc}"))
                    log(f"{_describe(cell)}: FAILED ({type(exc).__name__}: {exc}); recorded in {path}")
                    bar.update(1)
                    continue
                write_result(path, result)
                out[cell] = result
                report.written.append(path)
                val = result["accuracy"]["val_accuracy"]
                shown = "  ".join(
                    f"{key} {value:.2f}" for key, value in result["accuracy"].items()
                    if key != "val_accuracy" and "all_classes" not in key and isinstance(value, float)
                )  # fmt: skip
                val_text = "n/a" if val is None else f"{val:.2f}"
                log(f"{_describe(cell)}: {shown}  val {val_text}  ({result['seconds']['fit']:.2f} s)")
                bar.update(1)
    return out


def _cell_data(plan: Plan, features: Features, episode: tuple[Episode, Path], target: Target) -> CellData:
    """The episode's bundle with ``target``'s test rows and the classes the protocol scores them among."""
    spec = plan.config.backbone
    text, classnames, offset = plan.protocol.cell_classes(
        target, features.text, episode[0].classnames, features.target_text.get(target.name)
    )
    items = [Item(i.path, i.label + offset, i.classname) for i in target.items] if offset else list(target.items)
    named = replace(episode[0], classnames=classnames)
    bundle, dropped = episode_bundle(
        features.pool,
        named,
        items,
        text,
        metadata={"backbone": spec.model, "pretrained": spec.pretrained},
        test_pool=features.test_pool(target),
    )
    return CellData(bundle, dropped, named, items, episode[1])


def _describe(cell: Cell) -> str:
    where = f" -> {cell.target}" if cell.target else ""
    return f"{cell.shots}-shot seed {cell.seed} {cell.method}{where}"
