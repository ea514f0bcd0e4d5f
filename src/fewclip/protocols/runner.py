"""The staged runner: one path from images on disk to result files, for every protocol.

>>> config = RunConfig(DataConfig("caltech101", data_root="/data"), BackboneSpec("RN50", "openai"),
...                    MethodsConfig(["tip-adapter", "ape"]), ProtocolConfig(shots=[1, 2, 4, 8, 16]))
>>> report = run(config, "results/")
>>> print(report.table())

Stages, with plain data between them (a sweep or a cluster engine can run each on its own):

1. :func:`plan` — load the dataset, the prompts and the protocol (with its targets), check every method once, and
   list the cells: (method, shots, seed, target), each with its setup fingerprint and result path.
2. :func:`partition` — a finished result of the same setup is kept (skipped); one of another setup is an error
   unless ``force``; a failed result is run again. :func:`run` holds the protocol folder's lock
   (:func:`~fewclip.protocols.results.results_lock`) from here to the summary, so two runs never both decide to run
   one cell.
3. :func:`draw_episodes` — draw and save the episode of every (shots, seed) still to run.
4. :func:`encode` — the GPU stage: encode every image the remaining cells need once (support views, validation
   and test images of the dataset and of every target) and the text classifiers, through the feature cache.
5. :func:`fit_and_score` — the CPU stage: fit one cell's method on its episode bundle (choices on validation only),
   evaluate the test set once, build the result record. A failure is recorded in the cell's result file with its
   error, and the run goes on.
6. :func:`~fewclip.protocols.results.publish_result` — one schema for every protocol; the result JSON names its
   predictions file and that file's SHA-256, and is published after it.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..data import DatasetSplits, Episode, Item, Prompts, episode_filename, load_dataset, load_prompts, save_episode
from ..errors import DataWarning, MethodError, ResultsError
from ..features.bundle import Bundle
from ..features.extract import content_hashes, extract
from ..features.pipeline import FeaturePool, encode_images_once, episode_bundle
from ..features.store import FeatureStore
from ..features.text import encode_text_classifier
from ..generation.types import INDEX_FOLDER, GeneratedSet, load_generated_set
from ..methods import ImageEpisode, Method, create, generated_for_episode, get_class, list_methods, list_presets
from ..methods.registry import preset_key
from ..models import Backbone
from ..progress import progress
from .config import PROTOCOLS, RunConfig
from .deploy import classifier_bytes
from .protocol import BaseToNew, LongTail, Protocol, Target, short_classes
from .results import (
    RESULT_FORMAT,
    SUMMARY_FORMAT,
    backbone_slug,
    check_output_folder,
    config_sha256,
    episodes_dir,
    jsonable,
    new_run_id,
    protocol_dir,
    publish_result,
    read_result,
    result_path,
    results_lock,
    setup_difference,
    versions,
    write_result,
    writing,
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
    episodes: dict[tuple[int, int], Episode] = field(default_factory=dict)  # (shots, seed) -> episode, drawn once
    #: {dataset root: {relative path: SHA-256 of the file's bytes, None if unreadable}} of every image the cells use
    hashes: dict[str, dict[str, str | None]] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)  # the backbone weights' identity (SHA-256s, or the tag)
    digests: dict[Any, Any] = field(default_factory=dict)  # digests of episodes, test sets, prompts; resolved params
    #: why ``config.methods.selection`` became "cv" without being asked for (None: it was given, or is "val")
    selection_auto: str | None = None
    generated: GeneratedSet | None = None  # the --generated set, when a method trains on it (FLIER)
    generated_methods: frozenset[str] = frozenset()  # the methods that train on it

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
    that preset (or dataset alias, ``flowers102``) for methods that ship presets, an unknown one an error listing the
    valid presets; methods without presets run their defaults (None)."""
    available = list_presets(method)
    if preset is None or not available:
        return None
    if preset == PAPER_PRESET:
        return dataset if dataset in available else None
    try:
        return preset_key(method, preset)
    except MethodError as exc:
        raise MethodError(
            f"--preset {preset!r}: {exc} Or use --preset {PAPER_PRESET} (each method's published "
            "configuration for the dataset where it has one)."
        ) from None


def method_overrides(overrides: Mapping[str, Mapping[str, Any]], method: str) -> dict[str, Any]:
    return {**overrides.get("*", {}), **overrides.get(method, {})}


def create_method(config: RunConfig, protocol: Protocol, name: str, preset: str | None, params: Mapping[str, Any]):
    """The unfitted estimator: the preset, then the protocol's defaults for this method, then the user's overrides."""
    return create(
        name, preset=preset, selection=config.methods.selection, **{**protocol.method_defaults(name), **params}
    )


#: the dataset kinds whose splits a user makes (or fewclip generates from their labelled images)
USER_DATASETS = ("folder", "csv")


def default_selection(dataset: str, splits: DatasetSplits) -> tuple[str, str | None]:
    """(selection, why) when the run does not set one: "cv" for a folder or CSV dataset whose validation split is
    empty or was generated by fewclip from the labelled images (a folder of class sub-folders only): those images are
    the user's few labelled examples, so choosing on a split carved out of them is not an honest few-shot selection;
    otherwise "val"."""
    if dataset in USER_DATASETS and not splits.standard_split:
        if not splits.val:
            return "cv", f"{splits.name} has no validation split ({splits.split_source})"
        if "generated" in splits.split_source:
            return "cv", f"{splits.name} has no validation split of its own ({splits.split_source})"
    return "val", None


def cv_fallback(model: Method, data: Any) -> str | None:
    """Why ``model`` cannot cross-validate on ``data`` (no cv implementation, an image method, too few support images
    per class), or None; under an automatic "cv" such a method is fitted with selection "none" instead."""
    if not model.selects_on_validation:
        return None
    refusal = model.cv_refusal(data)
    if refusal is not None:
        return refusal
    shots = data.shots_per_class()
    if bool((shots > 0).any()) and int(shots[shots > 0].min()) < 2:
        # every fold would hold out some classes' only support image, so the folds would choose values for classes
        # without support (a cache or kernel term switched off), not for the K-shot model that is fitted afterwards
        return (
            f"{model.name}: a class has 1 support image, so every cross-validation fold would hold out its only one "
            "and choose for classes without support; the method keeps its initial values (selection 'none'). An "
            "explicit --selection cv still cross-validates."
        )
    return None


def check_methods(
    config: RunConfig, dataset: str, protocol: Protocol, auto_cv: bool = False
) -> dict[str, tuple[str | None, dict[str, Any]]]:
    """Create every method and check its hyperparameters once before any image is encoded, so a bad name, value or
    override fails fast (what depends on the data is checked when each cell is fitted). Under an automatic "cv"
    (``auto_cv``) a method without it is not refused: it falls back per cell (:func:`cv_fallback`)."""
    names = list(dict.fromkeys(config.methods.names))
    unknown = [k for k in config.methods.overrides if k != "*" and k not in names]
    if unknown:
        raise ResultsError(f"overrides for {unknown}, which are not among the methods run ({names}).")
    for method, values in config.methods.overrides.items():
        if "selection" in values:
            prefix = "" if method == "*" else f"{method}:"
            raise ResultsError(
                f"--set {prefix}selection={values['selection']}: selection is one value for the whole run; give it as "
                f"--selection {values['selection']} (or [methods] selection in a TOML file), not --set."
            )
    preset = config.methods.preset
    if preset is not None and preset != PAPER_PRESET and not any(list_presets(get_class(n).name) for n in names):
        with_presets = ", ".join(m for m in list_methods() if list_presets(m))
        raise ResultsError(
            f"--preset {preset!r}: none of the methods run ({', '.join(names)}) ships presets, so it would change "
            f"nothing; leave --preset out (methods with presets: {with_presets})."
        )
    plan = {}
    for name in names:
        get_class(name)
        protocol.check_method(name)
        chosen = method_preset(name, preset, dataset)
        params = method_overrides(config.methods.overrides, name)
        method = create_method(config, protocol, name, chosen, params)
        method.validate_params()
        cv = config.methods.selection == "cv" and not auto_cv
        if cv and method.selects_on_validation and not method.cross_validates:
            raise ResultsError(
                f"{name}: selection 'cv' is not implemented for this method; run it with --selection val or "
                "--selection none."
            )
        plan[name] = (chosen, params)
    return plan


def check_feature_dim(plan: Plan, dim: int) -> None:
    """The checks of every method that need only the feature dimension D (a channel count, attention heads), run as
    soon as the backbone is loaded, before any image is encoded."""
    for name, (preset, params) in plan.methods.items():
        create_method(plan.config, plan.protocol, name, preset, params).check_dim(dim)


def check_shots(splits: DatasetSplits, protocol: Protocol, shots: list[int]) -> None:
    """Refuse a shot count no class has that many training images for (a "K-shot" row that is not); warn, once per
    shot count, about the classes that have fewer (their episodes take every image they have, as Dassl's sampler
    does; each result records them under ``episode.short_classes``). Long-tail shot counts are caps: not checked."""
    if protocol.name == "longtail" or not splits.train:
        return
    counts = Counter(i.label for i in splits.train)
    largest, smallest = max(counts.values()), min(counts[y] for y in range(len(splits.classnames)))
    too_many = [k for k in shots if k > largest]
    if too_many:
        raise ResultsError(
            f"--shots {' '.join(map(str, too_many))}: no class of {splits.name} has that many training images (the "
            f"largest has {largest}, the smallest {smallest}); give --shots at most {largest}."
        )
    for k in shots:
        short = short_classes(splits.train, splits.classnames, k) if k > smallest else {}
        if short:
            listed = ", ".join(f"{name} ({n})" for name, n in list(short.items())[:10])
            more = f" and {len(short) - 10} more" if len(short) > 10 else ""
            warnings.warn(
                f"{splits.name}: {len(short)} class(es) have fewer than {k} training images, so the {k}-shot episodes "
                f"use all they have: {listed}{more}. Each result records them (episode.short_classes).",
                DataWarning,
                stacklevel=2,
            )


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
        "weights": plan.weights,
        "prompts": prompts.name if prompts.sha256 is None else f"file:{prompts.sha256}",
        "prompts_sha256": plan.digests["prompts", cell.target],
        "images_sha256": images_digest(plan, cell),
        "sampler": config.data.sampler,
        "val_kind": config.data.val_kind,
        **config.extraction.recorded(),
        "method": cell.method,
        "preset": preset,
        **({"protocol_defaults": defaults} if defaults else {}),
        "overrides": params,
        "params": plan.digests["params", cell.method],
        "selection": config.methods.selection,
        "shots": cell.shots,
        "seed": cell.seed,
        **({"generated_sha256": plan.digests["generated"]} if cell.method in plan.generated_methods else {}),
    }


def images_digest(plan: Plan, cell: Cell) -> str:
    """SHA-256 over the sorted (role, path, content SHA-256) of every image ``cell`` reads: its episode's support
    and validation images and its target's test images. An image replaced in place changes it."""
    return _digest(f"{plan.digests['episode', cell.shots, cell.seed]}|{plan.digests['test', cell.target]}")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _listing_digest(table: Mapping[str, str | None], roles: Mapping[str, Any]) -> str:
    lines = [
        f"{role}\t{path}\t{table.get(path) or 'unreadable'}\n"
        for role, items in roles.items()
        for path in sorted({item.path for item in items})
    ]
    return _digest("".join(lines))


def hash_images(plan: Plan) -> None:
    """Fill ``plan.hashes``, ``plan.weights`` and ``plan.digests``: the content SHA-256 of every image the cells
    read (through the cache folder's file-hash memo, so unchanged files are only stat'ed; the extraction stage reuses
    these hashes) and of the weights, before any result is judged current."""
    memo = FeatureStore(plan.config.cache_dir).memo
    wanted: dict[Path, dict[str, None]] = {}
    for episode in plan.episodes.values():
        for item in (*episode.train, *episode.val):
            wanted.setdefault(plan.splits.root, {})[item.path] = None
    for target in plan.targets.values():
        for item in target.items:
            wanted.setdefault(target.splits.root, {})[item.path] = None
    for root, paths in wanted.items():
        desc = f"{Path(root).name}: hashing images"
        shown = plan.config.extraction.progress
        plan.hashes[str(root)] = content_hashes(root, list(paths), memo=memo, progress=shown, desc=desc)
    own = plan.hashes.get(str(plan.splits.root), {})
    for (k, seed), episode in plan.episodes.items():
        plan.digests["episode", k, seed] = _listing_digest(own, {"support": episode.train, "val": episode.val})
    for name, target in plan.targets.items():
        plan.digests["test", name] = _listing_digest(plan.hashes[str(target.splits.root)], {"test": target.items})
        sentences = plan.prompts.sentences(plan.splits.classnames)
        if target.prompts is not None:
            sentences = [*sentences, *target.prompts.sentences(target.splits.classnames)]
        plan.digests["prompts", name] = _digest(json.dumps(sentences, ensure_ascii=False))
    for name, (preset, params) in plan.methods.items():
        values = create_method(plan.config, plan.protocol, name, preset, params).get_params()
        plan.digests["params", name] = jsonable(values)
    if plan.generated is not None:
        plan.digests["generated"] = generated_digest(plan, memo)
    plan.weights = plan.config.backbone.weights_identity()


def generated_digest(plan: Plan, memo: Any) -> str:
    """SHA-256 of the generated set a method trains on: its index and latent shards (bytes) and every image's
    content hash (through the file-hash memo), so a regenerated or replaced sample changes the results' setup."""
    folder = Path(str(plan.config.data.generated)).expanduser()
    hidden = folder / INDEX_FOLDER
    files = sorted(p for p in hidden.iterdir() if p.is_file() and not p.name.startswith("."))
    parts = [f"{p.name}\t{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in files]
    paths = sorted(str(Path(i).relative_to(folder)) for i in plan.generated.images)  # type: ignore[union-attr]
    shown = plan.config.extraction.progress
    hashes = content_hashes(folder, paths, memo=memo, progress=shown, desc=f"{folder.name}: hashing generated images")
    parts += [f"{p}\t{hashes.get(p) or 'unreadable'}" for p in paths]
    return _digest("\n".join(parts))


def load_generated(plan: Plan) -> None:
    """Load ``--generated`` once when a method trains on it, and check before any image is encoded that every
    episode's classes with support have generated samples (an error names the missing classes)."""
    config = plan.config
    wanting = []
    for name, (preset, params) in plan.methods.items():
        method = create_method(config, plan.protocol, name, preset, params)
        if getattr(method, "wants_generated", lambda: False)():
            wanting.append(name)
    if not wanting:
        if config.data.generated:
            warnings.warn(
                f"--generated {config.data.generated}: none of the methods run ({', '.join(plan.methods)}) trains on "
                "generated images, so the set is not read (flier does).",
                DataWarning,
                stacklevel=2,
            )
        return
    if not config.data.generated:
        raise ResultsError(
            f"{', '.join(wanting)} trains on generated images: pass --generated DIR (a set made by fewclip generate; "
            f"[data] generated in a TOML file), or --set {wanting[0]}:use_generated=false to train on the real images "
            "only."
        )
    plan.generated = load_generated_set(config.data.generated)
    plan.generated_methods = frozenset(wanting)
    for episode in plan.episodes.values():
        generated_for_episode(plan.generated, episode)


def known_hashes(plan: Plan, root: str | Path) -> dict[str, str]:
    """The content hashes :func:`hash_images` found under ``root`` (unreadable files left out: extraction reports
    them with their error)."""
    return {p: h for p, h in plan.hashes.get(str(root), {}).items() if h is not None}


def plan(config: RunConfig, out_dir: str | Path) -> Plan:
    """Stage 1: load what the run is about and list its cells (nothing is encoded or fitted)."""
    data = config.data
    shots = list(dict.fromkeys(_integers("shots", config.protocol.shots)))
    seeds = list(dict.fromkeys(_integers("seeds", config.protocol.seeds)))
    if any(k < (0 if config.protocol.name == "longtail" else 1) for k in shots):
        raise ResultsError(
            f"--shots {' '.join(map(str, shots))}: shot counts must be positive (0 = the whole training list, "
            "longtail only); e.g. --shots 1 2 4 8 16."
        )
    if any(s < 0 for s in seeds):
        raise ResultsError(f"--seeds {' '.join(map(str, seeds))}: seeds must be integers ≥ 0; e.g. --seeds 1 2 3.")
    if not config.methods.names or not shots or not seeds:
        raise ResultsError("a run needs at least one method, one shot count and one seed.")
    splits = load_dataset(data.dataset, data.data_root, path=data.path, **dict(data.kind_options))
    auto = None
    if config.methods.selection is None:
        selection, auto = default_selection(data.dataset, splits)
        config = replace(config, methods=replace(config.methods, selection=selection))
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
        methods=check_methods(config, splits.name, protocol, auto_cv=auto is not None),
        backbone=backbone_slug(config.backbone),
        shots=shots,
        seeds=seeds,
        selection_auto=auto,
    )
    check_shots(splits, protocol, shots)
    for k in shots:
        for seed in seeds:
            result.episodes[k, seed] = protocol.episode(splits, k, seed, sampler=data.sampler, val_kind=data.val_kind)
    load_generated(result)
    hash_images(result)
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


def existing_result(
    path: Path, setup: Mapping[str, Any], force: bool, save_models: bool = False
) -> dict[str, Any] | None:
    """The finished result at ``path`` for this ``setup`` (None: run it); another setup's result is an error, a
    failed one is run again, and so is one without its classifier file when ``save_models`` asks for one."""
    old = None if force else read_result(path)
    if old is None or old.get("status") == "failed":
        return None
    if save_models and not has_classifier(path, old):
        return None
    if old.get("config_sha256") != config_sha256(setup):
        diff = "; ".join(setup_difference(old.get("setup", {}), setup)) or "unknown fields"
        raise ResultsError(
            f"{path} holds a result of another setup ({diff}). Pass --force to overwrite it, or write to another "
            "--out folder."
        )
    return old


def has_classifier(path: Path, result: Mapping[str, Any]) -> bool:
    """Whether the result at ``path`` names a classifier file (``--save-models``) that is there."""
    name = result.get("classifier_file")
    return isinstance(name, str) and bool(name) and path.with_name(name).is_file()


def partition(
    plan: Plan, force: bool = False, save_models: bool = False
) -> tuple[list[Cell], dict[Cell, dict[str, Any]]]:
    """Stage 2: (cells to run, finished results of the others); with ``save_models``, a finished result without its
    classifier file is run again (its file is what was asked for)."""
    todo, done = [], {}
    for cell in plan.cells:
        old = existing_result(plan.paths[cell], plan.setups[cell], force, save_models)
        if old is None:
            todo.append(cell)
        else:
            done[cell] = old
    return todo, done


# --------------------------------------------------------------------------- stage 3: episodes


def draw_episodes(plan: Plan, cells: list[Cell], *, save: bool = True) -> dict[tuple[int, int], tuple[Episode, Path]]:
    """Stage 3: draw and save the episode of every (shots, seed) among ``cells``; ``save=False`` gives the paths
    without writing (a sweep's worker, whose driver saved them)."""
    data = plan.config.data
    folder = episodes_dir(plan.out_dir, plan.splits.name, plan.protocol.name)
    out = {}
    for k, seed in dict.fromkeys((c.shots, c.seed) for c in cells):
        episode = plan.episodes.get((k, seed)) or plan.protocol.episode(
            plan.splits, k, seed, sampler=data.sampler, val_kind=data.val_kind
        )
        path = folder / episode_filename(episode)
        if not save:
            out[k, seed] = episode, path
            continue
        with writing(path):
            out[k, seed] = episode, save_episode(episode, path)
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
    #: the raw text norms [C] of ``text`` and of each target's text (the bundles' optional ``text_norms``)
    text_norms: torch.Tensor | None = None
    target_text_norms: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def encoded(self) -> int:
        return self.pool.encoded + sum(p.encoded for p in self.target_pools.values())

    @property
    def cached(self) -> int:
        return self.pool.cached + sum(p.cached for p in self.target_pools.values())

    def test_pool(self, target: Target) -> FeaturePool:
        return self.pool if target.name is None else self.target_pools[target.name]


def encode(
    plan: Plan,
    episodes: Mapping[tuple[int, int], tuple[Episode, Path]],
    store: FeatureStore,
    backbone: Backbone | None = None,
) -> Features:
    """Stage 4 (the GPU stage): every image and prompt the episodes and targets need, encoded once. ``backbone``:
    the one ``plan.config.backbone`` names, already loaded (a sweep loads each backbone once for every dataset)."""
    options = plan.config.extraction
    t0 = time.perf_counter()
    backbone = plan.config.backbone.load() if backbone is None else backbone
    check_feature_dim(plan, backbone.embed_dim)
    own_test = [item for t in plan.targets.values() if t.name is None for item in t.items]
    pool = encode_images_once(
        backbone,
        plan.splits,
        [e for e, _ in episodes.values()],
        test=own_test,
        store=store,
        options=options,
        hashes=known_hashes(plan, plan.splits.root),
    )
    text, text_norms, text_info = encode_text_classifier(
        backbone, plan.splits.classnames, plan.prompts, store=store, return_norms=True
    )
    target_pools, target_text, target_norms = {}, {}, {}
    for target in plan.targets.values():
        if target.name is None:
            continue
        target_pools[target.name] = encode_images_once(
            backbone,
            target.splits,
            [],
            test=target.items,
            store=store,
            options=options,
            hashes=known_hashes(plan, target.splits.root),
        )
        if target.prompts is not None:
            target_text[target.name], target_norms[target.name], _ = encode_text_classifier(
                backbone, target.splits.classnames, target.prompts, store=store, return_norms=True
            )
    seconds = time.perf_counter() - t0
    return Features(
        pool, text, text_info, target_pools, target_text, backbone, store, seconds, text_norms, target_norms
    )


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
    fitted: dict[Any, tuple[Method, float, str | None]],
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
        model, fit_seconds, fallback = fitted[key]
    else:
        model = create_method(plan.config, protocol, cell.method, preset, params)
        fit_data = image_episode(plan, data, features, cell.method) if images else data.bundle
        fallback = cv_fallback(model, fit_data) if plan.selection_auto is not None else None
        if fallback is not None:  # an automatic "cv" this method cannot run: what it does without validation
            model.selection = "none"
        t0 = time.perf_counter()
        model.fit(fit_data)
        fit_seconds = time.perf_counter() - t0
        fitted[key] = model, fit_seconds, fallback
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
        "selection_used": getattr(model, "selection_used_", None),  # what ran: "none" for a method with no choice
        **({"selection_auto": plan.selection_auto} if plan.selection_auto is not None else {}),
        **({"selection_fallback": fallback} if fallback is not None else {}),
        "episode": {
            "file": _relative(data.episode_file, plan.out_dir),
            "sampler": data.episode.sampler,
            "val_kind": data.episode.val_kind,
            "support": bundle.support_labels.numel(),
            "val": 0 if bundle.val_labels is None else bundle.val_labels.numel(),
            "test": labels.numel(),
            "dropped_bad_images": dict(data.dropped),
            "short_classes": data.episode.extra.get("short_classes", {}),
        },
        "hyperparameters": model.hyperparameters(),
        "selected": getattr(model, "selected_", {}),
        "best_epoch": getattr(model, "best_epoch_", None),
        "history": getattr(model, "history_", None),
        "accuracy": {**scores, "val_accuracy": model.val_accuracy_},
        "calibration": model.calibration_report(logits, labels),
        **extra,
        **({"image_encoder": encoder} if encoder is not None else {}),
        "seconds": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return result, predicted, truth, list(names)


def image_episode(plan: Plan, data: CellData, features: Features, method: str | None = None) -> ImageEpisode:
    """What an image method is fitted on, for one cell: the episode's images, the backbone (already loaded in this
    process), the cell's text rows, the images the extraction stage found unreadable left out, and, for a method
    that trains on them, the generated samples of the episode's classes with support."""
    generated = None
    if plan.generated is not None and method in plan.generated_methods:
        generated = generated_for_episode(plan.generated, data.episode)
    return ImageEpisode(
        splits=plan.splits,
        episode=data.episode,
        backbone=plan.config.backbone,
        text_weights=data.bundle.text_weights,
        loaded=features.backbone,
        exclude=frozenset(features.pool.bad_paths()),
        options=plan.config.extraction,
        generated=generated,
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
        hashes=known_hashes(plan, target.splits.root),
        progress=options.progress,
        desc=f"{target.splits.name}: test images through the fine-tuned encoder",
    )
    labels = torch.tensor([items[i].label for i in out.kept], dtype=torch.long)
    record = {**encoder.identity["finetuned"], "test_encoded": out.encoded, "test_cached": out.cached}
    record["skipped_images"] = [*getattr(model, "skipped_images_", []), *(b.path for b in out.bad)]
    return out.features, labels, record


def error_record(exc: BaseException) -> dict[str, Any]:
    """The ``error`` field of a failed result: type, message and traceback lines (plain data, for any process)."""
    return {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exception(exc)}


def failure_record(plan: Plan, cell: Cell, exc: BaseException | Mapping[str, Any]) -> dict[str, Any]:
    """The result file of a cell whose fit or scoring raised (the exception, or its :func:`error_record` from
    another process): the error, and what is needed to re-run it."""
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
        "error": dict(exc) if isinstance(exc, Mapping) else error_record(exc),
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


def run(
    config: RunConfig,
    out_dir: str | Path,
    *,
    force: bool = False,
    wait: bool = False,
    log: Log | None = None,
    save_models: bool = False,
) -> RunReport:
    """Run every stage for ``config``; one result file per cell under ``out_dir`` (see
    :func:`~fewclip.protocols.results.result_path`), a summary per protocol folder.

    A results folder that cannot be written is refused before the dataset is read. From the skip-or-run decision to
    the summary the run holds its protocol folder's lock: another run writing there makes this raise
    :class:`~fewclip.errors.ResultsLockedError` naming it, or, with ``wait``, wait for it (and then reuse what it
    finished). ``save_models`` publishes a deployable classifier file beside each method's result
    (:mod:`~fewclip.protocols.deploy`).
    """
    log = log or console_log
    check_output_folder(out_dir)
    the_plan = plan(config, out_dir)
    with results_lock(the_plan.folder, wait=wait, log=log):
        run_id = new_run_id()
        todo, done = partition(the_plan, force, save_models)
        report = RunReport(the_plan, [], [], [the_plan.paths[c] for c in done], [])
        if done:
            log(f"{len(done)} result(s) already in {out_dir} for this setup: skipped (--force re-runs them).")
        results: dict[Cell, dict[str, Any]] = dict(done)
        if todo:
            episodes = draw_episodes(the_plan, todo)
            store = FeatureStore(config.cache_dir)
            features = encode(the_plan, episodes, store)
            report.encoded, report.cached = features.encoded, features.cached
            report.extraction_seconds = features.seconds
            log(
                f"{the_plan.splits.name}: {features.encoded} image view(s) encoded, {features.cached} read from the "
                f"cache ({features.seconds:.1f} s)."
            )
            common = common_record(the_plan, features)
            results.update(_fit_all(the_plan, todo, episodes, features, common, report, log, run_id, save_models))
        mine = summary_cells(the_plan, results)
        report.results = [results[c] for c in mine]
        report.summary_path = write_summary(the_plan, report, {c: results[c] for c in mine}, run_id, log)
    return report


def summary_cells(plan: Plan, results: Mapping[Cell, Mapping[str, Any]]) -> list[Cell]:
    """The cells of ``plan`` (in its order) with a finished result that records this run's setup of the cell."""
    return [
        c
        for c in plan.cells
        if c in results
        and results[c].get("status", "ok") == "ok"
        and results[c].get("config_sha256") == config_sha256(plan.setups[c])
    ]


def write_summary(plan: Plan, report: RunReport, mine: Mapping[Cell, Mapping[str, Any]], run_id: str, log: Log) -> Path:
    """Write ``summary.json`` of the protocol folder (under the run's lock) from ``report.results``, the results of
    this run's setup (:func:`summary_cells`), each listed with its file and fingerprint in ``mine``. Other result
    files in the folder (other methods, shots, seeds or setups) are not mixed in; the log says how many there are."""
    path = plan.folder / "summary.json"
    own = {plan.paths[c] for c in plan.cells}
    others = sorted(p for p in plan.folder.rglob("shots_*-seed_*.json") if p not in own)
    if others:
        log(
            f"{path}: the {len(mine)} result(s) of this run's setup; {len(others)} other result file(s) in "
            f"{plan.folder} (other methods, shots, seeds or setups) are not in it."
        )
    summary = {
        "format": SUMMARY_FORMAT,
        "dataset": plan.splits.name,
        "backbone": plan.backbone,
        "protocol": plan.protocol.name,
        "run_id": run_id,
        "summary": report.summary(),
        "results": [
            {"file": _relative(plan.paths[c], plan.folder), "config_sha256": rec["config_sha256"]}
            for c, rec in mine.items()
        ],
        "failed": [str(p) for p, _ in report.failed],
    }
    write_result(path, summary)
    return path


def _fit_all(
    plan: Plan,
    todo: list[Cell],
    episodes: Mapping[tuple[int, int], tuple[Episode, Path]],
    features: Features,
    common: Mapping[str, Any],
    report: RunReport,
    log: Log,
    run_id: str | None = None,
    save_models: bool = False,
) -> dict[Cell, dict[str, Any]]:
    """Stage 5 and 6 over ``todo``: every cell fitted, scored and published with its predictions; a failing cell is
    recorded and skipped. A write that fails (a full disk) ends the run with
    :class:`~fewclip.errors.OutputError`: it is no cell's fault, and what was published before it stands."""
    out: dict[Cell, dict[str, Any]] = {}
    by_episode: dict[tuple[int, int], list[Cell]] = {}
    for cell in todo:
        by_episode.setdefault((cell.shots, cell.seed), []).append(cell)
    bar = progress(len(todo), f"{plan.splits.name}: fitting", "fit", enabled=plan.config.extraction.progress)
    with bar:
        for cells in by_episode.values():
            fitted: dict[Any, tuple[Method, float, str | None]] = {}
            cell_data: dict[Any, CellData] = {}
            for cell in cells:
                outcome = fit_cell(plan, cell, episodes, features, common, fitted, cell_data, save_models)
                result = publish_cell(plan, outcome, report, log, run_id)
                if result is not None:
                    out[cell] = result
                bar.update(1)
    return out


@dataclass
class CellOutcome:
    """What fitting one cell gives, as plain data another process can send back: the result record with its
    predictions (and classifier file bytes), or the error (:func:`error_record`)."""

    cell: Cell
    result: dict[str, Any] | None = None
    predictions: tuple[torch.Tensor, torch.Tensor, list[str]] | None = None
    classifier: bytes | None = None
    error: dict[str, Any] | None = None


def fit_cell(
    plan: Plan,
    cell: Cell,
    episodes: Mapping[tuple[int, int], tuple[Episode, Path]],
    features: Features,
    common: Mapping[str, Any],
    fitted: dict[Any, tuple[Method, float, str | None]],
    cell_data: dict[Any, CellData],
    save_models: bool = False,
) -> CellOutcome:
    """Stage 5 for one cell, as a unit any process holding the plan and features can run: fit, score and build the
    record, nothing written. An exception of the fit or scoring becomes the outcome's error. ``fitted`` and
    ``cell_data`` carry the models and episode bundles shared by the cells of one (shots, seed)."""
    target = plan.targets[cell.target]
    key = (cell.shots, cell.seed, cell.target)
    try:
        if key not in cell_data:
            cell_data[key] = _cell_data(plan, features, episodes[cell.shots, cell.seed], target)
        record = dict(common)
        pool = features.test_pool(target)
        record["bad_images"] = [b.as_dict() for b in features.pool.bad] + (
            [] if pool is features.pool else [b.as_dict() for b in pool.bad]
        )
        result, predicted, truth, names = fit_and_score(plan, cell, cell_data[key], features, record, fitted)
        classifier = None
        if save_models:
            classifier = cell_classifier(plan, cell, cell_data[key], features, fitted)
    except Exception as exc:  # one failing cell is recorded, the run goes on
        return CellOutcome(cell, error=error_record(exc))
    return CellOutcome(cell, result, (predicted, truth, names), classifier)


def publish_cell(
    plan: Plan, outcome: CellOutcome, report: RunReport, log: Log, run_id: str | None = None
) -> dict[str, Any] | None:
    """Stage 6 for one cell: publish its result and predictions (or its failure record, which replaces an earlier
    success and its predictions), account for it in ``report`` and log a line. Returns the published result (None
    for a failure)."""
    cell = outcome.cell
    path = plan.paths[cell]
    if outcome.error is not None:
        publish_result(path, failure_record(plan, cell, outcome.error), run_id=run_id)
        error = f"{outcome.error['type']}: {outcome.error['message']}"
        report.failed.append((path, error))
        log(f"{_describe(cell)}: FAILED ({error}); recorded in {path}")
        return None
    result = publish_result(path, outcome.result, outcome.predictions, run_id=run_id, classifier=outcome.classifier)
    report.written.append(path)
    val = result["accuracy"]["val_accuracy"]
    # base-to-new: the all-class HM stands for the generalised setting; its two parts are in the file
    shown = "  ".join(
        f"{key} {value:.2f}" for key, value in result["accuracy"].items()
        if key != "val_accuracy" and not key.endswith("_all_classes") and isinstance(value, float)
    )  # fmt: skip
    val_text = "n/a" if val is None else f"{val:.2f}"
    log(f"{_describe(cell)}: {shown}  val {val_text}  ({result['seconds']['fit']:.2f} s)")
    return result


def cell_classifier(
    plan: Plan, cell: Cell, data: CellData, features: Features, fitted: Mapping[Any, tuple[Method, float, str | None]]
) -> bytes:
    """The deployable classifier file of the cell's fitted method: its model (an image method's with its fine-tuned
    parameters), the cell's classes and text classifier, the prompts, and the backbone with its weights' identity."""
    key = (cell.method, cell.shots, cell.seed, plan.protocol.fit_key(plan.targets[cell.target]))
    model = fitted[key][0]
    prompts = plan.prompts
    identity = features.backbone.identity
    return classifier_bytes(
        model,
        backbone_spec=plan.config.backbone,
        classnames=list(data.bundle.classnames),
        prompts_record={
            "name": prompts.name,
            "kind": prompts.kind,
            "sha256": prompts.sha256,
            "templates": list(prompts.templates),
        },
        text_weights=data.bundle.text_weights,
        weights_identity=identity.get("weights") or {},
        preprocess=identity.get("preprocess_description"),
    )


def _cell_data(plan: Plan, features: Features, episode: tuple[Episode, Path], target: Target) -> CellData:
    """The episode's bundle with ``target``'s test rows and the classes the protocol scores them among."""
    spec = plan.config.backbone
    text, classnames, offset = plan.protocol.cell_classes(
        target, features.text, episode[0].classnames, features.target_text.get(target.name)
    )
    norms = None
    if features.text_norms is not None:  # the same rows as the text: cell_classes slices or joins them alike
        target_norms = features.target_text_norms.get(target.name)
        norms = plan.protocol.cell_classes(
            target,
            features.text_norms[:, None],
            episode[0].classnames,
            None if target_norms is None else target_norms[:, None],
        )[0][:, 0]
    items = [Item(i.path, i.label + offset, i.classname) for i in target.items] if offset else list(target.items)
    named = replace(episode[0], classnames=classnames)
    bundle, dropped = episode_bundle(
        features.pool,
        named,
        items,
        text,
        metadata={"backbone": spec.model, "pretrained": spec.pretrained},
        test_pool=features.test_pool(target),
        text_norms=norms,
    )
    return CellData(bundle, dropped, named, items, episode[1])


def _describe(cell: Cell) -> str:
    where = f" -> {cell.target}" if cell.target else ""
    return f"{cell.shots}-shot seed {cell.seed} {cell.method}{where}"
