"""Sweeps: one grid of datasets × backbones × methods × shots × seeds, run by the staged runner, resumable.

>>> grid = load_sweep("grid.toml")                    # or SweepConfig.from_dict({...})
>>> report = sweep(grid, "results/", jobs=4)          # or ray="auto", or under torchrun for extraction
>>> print(report.last_lines())

A grid is one :class:`~fewclip.protocols.config.RunConfig` per (backbone, dataset) -- a *unit* -- sharing the
methods, the protocol and the extraction options. The result folder is exactly what ``fewclip run`` writes for
each unit (``<out>/<dataset>/<backbone>/<protocol>/...``, one result JSON per cell, a ``summary.json`` per
protocol folder), so ``fewclip report`` and ``fewclip results`` read a sweep like a set of runs.

Stages (each the runner's, over the whole grid):

1. plan every unit (its cells, fingerprints, image hashes), hold every unit's protocol folder lock, and split its
   cells into done (skipped: a finished result of the same setup) and to run;
2. extraction first, backbone by backbone: each backbone is loaded once and encodes, for every dataset, what the
   feature cache lacks. Under ``torchrun`` every rank first encodes its share of the images
   (:func:`encode_share`), then rank 0 goes on alone;
3. fitting: every cell to run, serially, over ``jobs`` local processes, or as Ray tasks. Workers get a
   :class:`~fewclip.protocols.config.RunConfig` and a list of cells (plain data), rebuild the plan, the backbone
   and the methods from them and read the features from the cache (:func:`run_cells`); they send back each
   cell's record and predictions (:class:`~fewclip.protocols.runner.CellOutcome`), never a model. The driver
   publishes every result with the runner's atomic writes, so only one process ever writes into ``out``;
4. a summary per unit, and one line of counts: passed, failed, skipped.

A failing cell is recorded in its result file and the sweep goes on; a unit that cannot be planned or extracted
(a dataset missing on disk, unreadable images) is reported with its error and the others go on.

**The feature cache is a shared folder.** Extraction workers write shards into it and fitting workers read from
it; nothing is shipped through the driver. The images have to be on storage every extraction worker reads anyway
(NFS, Lustre, a bucket mount), and a cache there is written by many processes safely: shards are content-keyed,
appended under unique names by atomic renames, and picked up by every reader (:mod:`fewclip.features.store`).
Shipping features back to the driver would send every encoded view over the network twice (ImageNet's 16-shot
support under 10 views is ~1 GB per backbone) and make the driver's disk the bottleneck. A fitting worker that
cannot see the cache still gives the right results (it encodes what it misses, on its own device); the driver
says so once, since that is slow.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..data import Episode
from ..errors import FewclipError, ResultsError
from ..features.pipeline import ExtractionOptions, encode_images_once
from ..features.store import FeatureStore
from ..io import read_toml
from ..methods import get_class
from ..models import BackboneSpec
from ..progress import progress
from .config import MethodsConfig, ProtocolConfig, RunConfig, merge_sections
from .results import backbone_slug, check_output_folder, new_run_id, results_lock
from .runner import (
    Cell,
    CellOutcome,
    Features,
    Plan,
    RunReport,
    common_record,
    console_log,
    draw_episodes,
    encode,
    error_record,
    fit_cell,
    has_classifier,
    known_hashes,
    partition,
    plan,
    publish_cell,
    summary_cells,
    write_summary,
)

Log = Callable[[str], None]
#: the keys of a sweep's TOML file (``[data]`` takes ``datasets`` besides the run's data keys)
SWEEP_KEYS = ("data", "backbone", "backbones", "methods", "protocol", "extraction", "cache_dir")
#: exit status when some cells (or units) failed; 0 when every cell passed or was skipped
EXIT_FAILED = 1
#: cells fitted and waiting to be published at most (then fitting waits for the writes)
MAX_QUEUED = 64


# --------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class SweepConfig:
    """A grid: one :class:`RunConfig` per (backbone, dataset), backbone-major (each backbone's units together)."""

    runs: tuple[RunConfig, ...]

    @property
    def methods(self) -> MethodsConfig:
        return self.runs[0].methods

    @property
    def protocol(self) -> ProtocolConfig:
        return self.runs[0].protocol

    @property
    def extraction(self) -> ExtractionOptions:
        return self.runs[0].extraction

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(r.data.dataset for r in self.runs))

    @property
    def backbones(self) -> list[BackboneSpec]:
        return list(dict.fromkeys(r.backbone for r in self.runs))

    def size(self) -> int:
        """Cells in the grid (a transfer unit has one per target besides: counted when planned)."""
        p = self.protocol
        per_unit = len(set(self.methods.names)) * len(set(p.shots)) * len(set(p.seeds))
        return per_unit * len(self.runs)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], where: str = "sweep configuration") -> SweepConfig:
        """Build from plain data: the sections of a run's TOML file, with ``[data] datasets = [...]`` (names, or
        tables with ``dataset`` and any data key: ``path``, ``data_root``, ``kind_options``, ...; the other keys of
        ``[data]`` are every dataset's defaults) and either ``[backbone]`` or ``[[backbones]]`` (one table per
        backbone)."""
        if not isinstance(obj, Mapping):
            raise ResultsError(f"{where}: expected a table of sections, got {type(obj).__name__}.")
        unknown = sorted(set(obj) - set(SWEEP_KEYS))
        if unknown:
            raise ResultsError(f"{where}: unknown section(s) {unknown}; valid: {', '.join(SWEEP_KEYS)}.")
        for name in ("data", "methods", "protocol", "extraction", "backbone"):
            if name in obj and not isinstance(obj[name], Mapping):
                raise ResultsError(f"{where}: [{name}] must be a table of keys, got {type(obj[name]).__name__}.")
        data = dict(obj.get("data", {}))
        entries = data.pop("datasets", None)
        if entries is None and "dataset" in data:
            entries = [data.pop("dataset")]
        elif entries is not None and "dataset" in data:
            raise ResultsError(f"{where}: [data] has both dataset and datasets; list every dataset in datasets.")
        if isinstance(entries, str | Mapping):
            entries = [entries]
        if not entries or not isinstance(entries, list):
            raise ResultsError(
                f'{where}: [data] datasets must list at least one dataset, e.g. datasets = ["caltech101", '
                f'"oxford_pets"] (or a table per dataset: {{ dataset = "folder", path = "/data/birds" }}).'
            )
        datasets = []
        for i, entry in enumerate(entries, 1):
            if isinstance(entry, str):
                entry = {"dataset": entry}
            if not isinstance(entry, Mapping) or not entry.get("dataset"):
                raise ResultsError(
                    f"{where}: [data] datasets entry {i} is {entry!r}; give a dataset name or a table with a "
                    "'dataset' key."
                )
            datasets.append({**data, **entry})
        if "backbone" in obj and "backbones" in obj:
            raise ResultsError(f"{where}: give [backbone] (one) or [[backbones]] (several), not both.")
        backbones = obj.get("backbones", [obj["backbone"]] if "backbone" in obj else [])
        if not isinstance(backbones, list) or not backbones or not all(isinstance(b, Mapping) for b in backbones):
            raise ResultsError(
                f'{where}: no backbone; add a [backbone] table (model = "RN50", pretrained = "openai") or one '
                "[[backbones]] table per backbone."
            )
        shared = {k: obj[k] for k in ("methods", "protocol", "extraction", "cache_dir") if k in obj}
        runs = []
        for b, backbone in enumerate(backbones, 1):
            for d, entry in enumerate(datasets, 1):
                label = f"{where} (dataset {d} {entry['dataset']!r}, backbone {b} {backbone.get('model')!r})"
                runs.append(RunConfig.from_dict({**shared, "data": entry, "backbone": backbone}, where=label))
        return cls(tuple(runs)).checked(where)

    def checked(self, where: str = "sweep configuration") -> SweepConfig:
        """Refuse two units that would write into one results folder (the same dataset twice, two custom datasets
        of one kind, two backbones with one folder name): their results would conflict."""
        from ..data.registry import dataset_info

        seen: dict[tuple[str, str], RunConfig] = {}
        for run in self.runs:
            try:
                name = dataset_info(run.data.dataset).key
            except FewclipError:
                name = run.data.dataset  # an unknown name fails when its unit is planned, with the valid names
            key = (name, backbone_slug(run.backbone))
            if key in seen:
                raise ResultsError(
                    f"{where}: two entries write to the results folder {'/'.join(key)} (dataset {name!r}, "
                    f"backbone {key[1]!r}): {_describe_run(seen[key])} and {_describe_run(run)}. Remove the "
                    "duplicate, or run the second one into another --out folder."
                )
            seen[key] = run
        return self


def _describe_run(run: RunConfig) -> str:
    where = run.data.path or run.data.data_root or ""
    return f"{run.data.dataset}{f' at {where}' if where else ''} with {run.backbone.model}"


def load_sweep(path: str | os.PathLike | None, overrides: Mapping[str, Any] | None = None) -> SweepConfig:
    """Read a sweep's TOML file (``None``: none, ``overrides`` alone) with ``overrides`` (sections of plain data,
    e.g. from command-line options) laid over it, tables merged key by key."""
    obj: dict[str, Any] = {}
    where = "the command line"
    if path is not None:
        where = str(Path(path))
        obj = read_toml(path, what="sweep", error=ResultsError)
    return SweepConfig.from_dict(merge_sections(obj, overrides or {}), where=where)


# --------------------------------------------------------------------------- what a sweep did


@dataclass
class Unit:
    """One (backbone, dataset) of the grid, as the sweep goes: its plan, cells to run, finished results."""

    config: RunConfig
    plan: Plan | None = None
    todo: list[Cell] = field(default_factory=list)
    done: dict[Cell, dict[str, Any]] = field(default_factory=dict)
    results: dict[Cell, dict[str, Any]] = field(default_factory=dict)
    report: RunReport | None = None
    features: Features | None = None  # kept by a serial sweep between extraction and fitting
    error: str | None = None  # the unit could not be planned or extracted
    encoded: int = 0
    cached: int = 0

    @property
    def name(self) -> str:
        if self.plan is not None:
            return f"{self.plan.splits.name}/{self.plan.backbone}"
        return f"{self.config.data.dataset}/{backbone_slug(self.config.backbone)}"

    def cell_count(self) -> int:
        if self.plan is not None:
            return len(self.plan.cells)
        p = self.config.protocol
        return len(set(self.config.methods.names)) * len(set(p.shots)) * len(set(p.seeds))


@dataclass
class SweepReport:
    """Counts over the grid: cells passed (fitted now), failed, skipped (finished before); units that failed."""

    units: list[Unit]
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    encoded: int = 0
    cached: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (result file or unit, error)
    rank: int = 0  # under torchrun: this process's rank (only rank 0 fits)

    @property
    def total(self) -> int:
        return sum(u.cell_count() for u in self.units)

    @property
    def unit_errors(self) -> list[Unit]:
        return [u for u in self.units if u.error is not None]

    @property
    def exit_status(self) -> int:
        """Rank 0's alone under torchrun: it knows every failure (the ranks agree on them); another rank ending
        first with an error would make torchrun stop rank 0 before it reports."""
        if self.rank:
            return 0
        return EXIT_FAILED if self.failed or self.unit_errors else 0

    def last_lines(self) -> str:
        if self.rank:
            return f"sweep rank {self.rank}: encoded {self.encoded} image view(s) of its share; rank 0 fits."
        lines = [f"  {where}: {error}" for where, error in self.failures]
        head = [f"{len(self.failures)} failure(s):"] if lines else []
        summary = (
            f"sweep: {self.total} cell(s): {self.passed} passed, {self.failed} failed, {self.skipped} skipped "
            f"(finished before); {self.encoded} image view(s) encoded, {self.cached} from the cache."
        )
        return "\n".join([*head, *lines, summary])


# --------------------------------------------------------------------------- workers


_CONTEXTS: dict[str, tuple[Plan, dict, Features, dict[str, Any], list[int]]] = {}
_BACKBONES: dict[BackboneSpec, Any] = {}
_KEEP_CONTEXTS = 2  # units a worker keeps (features in memory) at once


def _config_key(config: RunConfig, out_dir: str | Path) -> str:
    return json.dumps([config.to_dict(), str(out_dir)], sort_keys=True, default=str)


def _backbone(spec: BackboneSpec):
    if spec not in _BACKBONES:
        _BACKBONES.clear()  # one backbone at a time: a worker moves from one backbone's units to the next
        _BACKBONES[spec] = spec.load()
    return _BACKBONES[spec]


def _ray_gpu_ids() -> list | None:
    """The GPUs Ray gave this task (``[]``: none), or None outside a Ray task."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().get_task_id() is None:
        return None
    return list(ray.get_gpu_ids())


def task_device(spec: BackboneSpec) -> BackboneSpec:
    """``spec`` on the device this task actually has: a CUDA device only where a GPU is there for it (in a Ray task:
    one Ray assigned, which it exposes as ``cuda``, whatever ``cuda:N`` the driver named); else the CPU, so that a
    fitting task with no GPU reserved neither fails nor takes GPU memory it was not given."""
    if not str(spec.device).startswith("cuda"):
        return spec
    import torch

    gpus = _ray_gpu_ids()
    if not torch.cuda.is_available() or gpus == []:
        return replace(spec, device="cpu")
    return replace(spec, device="cuda") if gpus else spec


def worker_context(config: RunConfig, out_dir: str | Path) -> tuple[Plan, dict, Features, dict[str, Any], list[int]]:
    """(plan, episodes, features, common record, [image views encoded not yet reported]) of a unit, rebuilt in this
    process from its config and the feature cache, and kept for the unit's next cells (the last
    :data:`_KEEP_CONTEXTS` units)."""
    key = _config_key(config, out_dir)
    if key not in _CONTEXTS:
        with warnings.catch_warnings():  # the driver showed the dataset's warnings once
            warnings.simplefilter("ignore")
            the_plan = plan(config, out_dir)
        episodes = draw_episodes(the_plan, the_plan.cells, save=False)
        features = encode(the_plan, episodes, FeatureStore(config.cache_dir), _backbone(task_device(config.backbone)))
        while len(_CONTEXTS) >= _KEEP_CONTEXTS:
            _CONTEXTS.pop(next(iter(_CONTEXTS)))
        _CONTEXTS[key] = (the_plan, episodes, features, common_record(the_plan, features), [features.encoded])
    return _CONTEXTS[key]


def run_cells(
    config: RunConfig, out_dir: str, cells: Sequence[Cell], save_models: bool = False
) -> tuple[list[CellOutcome], int]:
    """A sweep's unit of work, in any process: fit and score ``cells`` (one method, shots and seed; several targets
    for transfer) of the unit ``config`` names; (outcomes, image views this process had to encode because the
    cache lacked them). Nothing is written: the driver publishes the outcomes."""
    the_plan, episodes, features, common, unreported = worker_context(config, out_dir)
    fitted: dict = {}
    cell_data: dict = {}
    outcomes = [fit_cell(the_plan, c, episodes, features, common, fitted, cell_data, save_models) for c in cells]
    encoded, unreported[0] = unreported[0], 0  # a cold cache is reported once per unit
    return outcomes, encoded


def extract_unit(config: RunConfig, out_dir: str) -> tuple[int, int, float]:
    """A sweep's extraction task, in any process: encode what the cache lacks for the unit ``config`` names; (image
    views encoded, read from the cache, seconds). The unit stays loaded in this process for the fitting tasks that
    land here."""
    _, _, features, _, _ = worker_context(config, out_dir)
    return features.encoded, features.cached, features.seconds


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def task_groups(cells: Iterable[Cell]) -> list[list[Cell]]:
    """The cells one task fits: those of one (method, shots, seed), which share one fitted model (transfer scores it
    on several targets)."""
    groups: dict[tuple[str, int, int], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.method, c.shots, c.seed), []).append(c)
    return list(groups.values())


# --------------------------------------------------------------------------- torchrun


@dataclass(frozen=True)
class Distributed:
    """This process's place under ``torchrun``: rank, world size, local rank (its GPU on the node)."""

    rank: int
    world: int
    local_rank: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Distributed | None:
        try:
            world = int(environ.get("WORLD_SIZE", "1"))
        except ValueError:
            return None
        if world <= 1:
            return None
        return cls(int(environ.get("RANK", "0")), world, int(environ.get("LOCAL_RANK", environ.get("RANK", "0"))))

    def device(self, spec: BackboneSpec) -> BackboneSpec:
        """``spec`` on this rank's GPU when it names CUDA (``cuda`` -> ``cuda:<local rank>``)."""
        if str(spec.device).startswith("cuda"):
            return replace(spec, device=f"cuda:{self.local_rank}")
        return spec


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _all_ranks_ok(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (an all-reduce of one flag, which gloo carries on CPU)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _init_distributed() -> None:
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():  # gloo carries the barriers alone (no tensors), on CPU or GPU nodes alike
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))


def _finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def shard_of(sha256: str, world: int) -> int:
    """The rank that encodes the image whose content hash is ``sha256``: the same image (in any dataset, any
    split) always goes to one rank, whatever the cache holds."""
    return int(sha256[:12], 16) % world


def encode_share(plan: Plan, episodes: Mapping[Any, tuple[Episode, Path]], store: FeatureStore, backbone, rank: int,
                 world: int) -> int:  # fmt: skip
    """This rank's share of a unit's extraction: the images whose content hash :func:`shard_of` gives ``rank``,
    every view the run needs, encoded through the cache (each rank writes its own shards; the store's names are
    unique and its readers pick up every shard). Unreadable images are left to rank 0's full pass, which reports
    them. Returns the image views encoded."""
    options = replace(plan.config.extraction, skip_bad_images=True)

    def mine(root: Path, items) -> list:
        table = plan.hashes.get(str(root), {})
        return [i for i in items if table.get(i.path) is not None and shard_of(table[i.path], world) == rank]

    root = plan.splits.root
    shares = [replace(e, train=mine(root, e.train), val=mine(root, e.val)) for e, _ in episodes.values()]
    own_test = mine(root, [i for t in plan.targets.values() if t.name is None for i in t.items])
    known = known_hashes(plan, root)
    encoded = encode_images_once(backbone, plan.splits, shares, test=own_test, store=store, options=options,
                                 hashes=known).encoded  # fmt: skip
    for target in plan.targets.values():
        if target.name is not None:
            items = mine(target.splits.root, target.items)
            pool = encode_images_once(backbone, target.splits, [], test=items, store=store, options=options,
                                      hashes=known_hashes(plan, target.splits.root))  # fmt: skip
            encoded += pool.encoded
    return encoded


# --------------------------------------------------------------------------- the sweep


def sweep(
    config: SweepConfig,
    out_dir: str | Path,
    *,
    jobs: int = 1,
    ray: str | None = None,
    force: bool = False,
    wait: bool = False,
    dry_run: bool = False,
    save_models: bool = False,
    log: Log | None = None,
    out: Callable[[str], None] = print,
) -> SweepReport:
    """Run the grid into ``out_dir`` (see the module docstring); ``jobs`` local processes fit cells, or Ray tasks
    when ``ray`` names a cluster (``auto``, ``local``, ``ray://host:10001``). ``dry_run`` prints the cells, what
    the cache holds and what would be encoded through ``out``, and runs nothing."""
    log = log or console_log
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ResultsError(f"--jobs {jobs!r}: give a number of processes ≥ 1.")
    check_output_folder(out_dir)
    for name in config.methods.names:
        get_class(name)  # an unknown method name is a usage error, not one failure per unit
    if ray is not None and not dry_run:
        ray_connect(ray)  # a no-op when this process joined a cluster already
    dist = Distributed.from_env() if not dry_run else None
    if dist is not None:
        config = SweepConfig(tuple(replace(r, backbone=dist.device(r.backbone)) for r in config.runs))
        _init_distributed()
    t0 = time.perf_counter()
    units = [Unit(run) for run in config.runs]
    report = SweepReport(units, rank=dist.rank if dist else 0)
    for unit in units:
        try:
            unit.plan = plan(unit.config, out_dir)
        except FewclipError as exc:
            unit.error = f"{type(exc).__name__}: {exc}"
            log(f"{unit.name}: cannot be planned ({unit.error}); its cells are counted as failed.")
    if dry_run:
        for unit in units:
            if unit.plan is not None:
                unit.todo, unit.done = _partition_or_error(unit, force, log, save_models)
        print_dry_run(report, out)
        return report
    leader = dist is None or dist.rank == 0
    with contextlib.ExitStack() as locks:
        for unit in units:
            if unit.plan is None:
                continue
            if leader:
                locks.enter_context(results_lock(unit.plan.folder, wait=wait, log=log))
            unit.todo, unit.done = _partition_or_error(unit, force, log, save_models)
            unit.report = RunReport(unit.plan, [], [], [unit.plan.paths[c] for c in unit.done], [])
            unit.results = dict(unit.done)
            report.skipped += len(unit.done)
        if dist is not None:  # every rank decided the same cells before any result is written
            _barrier()
        t1 = time.perf_counter()
        _extract_all(report, out_dir, ray=ray, keep=jobs == 1 and ray is None and leader, dist=dist, log=log)
        report.seconds["extraction"] = time.perf_counter() - t1
        if not leader:  # wait for rank 0's fits: a rank that ends first (with a failure) would make torchrun stop it
            _barrier()
            _finish_distributed()
            return report
        t2 = time.perf_counter()
        run_id = new_run_id()
        _fit_all_units(report, out_dir, jobs=jobs, ray=ray, run_id=run_id, save_models=save_models, log=log)
        report.seconds["fitting"] = time.perf_counter() - t2
        for unit in units:
            if unit.plan is not None and unit.report is not None and unit.error is None:
                mine = summary_cells(unit.plan, unit.results)
                unit.report.results = [unit.results[c] for c in mine]
                write_summary(unit.plan, unit.report, {c: unit.results[c] for c in mine}, run_id, lambda m: None)
    for unit in units:
        if unit.error is not None:  # its cells that did not run: all but those finished before
            report.failures.append((unit.name, unit.error))
            report.failed += unit.cell_count() - len(unit.done)
    report.seconds["total"] = time.perf_counter() - t0
    if dist is not None:
        _barrier()  # the other ranks wait here for the fits
        _finish_distributed()
    return report


def _partition_or_error(
    unit: Unit, force: bool, log: Log, save_models: bool = False
) -> tuple[list[Cell], dict[Cell, dict[str, Any]]]:
    try:
        return partition(unit.plan, force, save_models)
    except ResultsError as exc:  # a result of another setup in the way: this unit stops, the others go on
        unit.error = str(exc)
        log(f"{unit.name}: {exc}")
        return [], {}


def _extract_all(
    report: SweepReport, out_dir: str | Path, *, ray: str | None, keep: bool, dist: Distributed | None, log: Log
) -> None:
    """Stage 2 over the grid: each backbone loaded once, every dataset's missing image views encoded."""
    units = [u for u in report.units if u.todo and u.error is None]
    if ray is not None and dist is None:
        _extract_with_ray(report, units, out_dir, ray, log)
        return
    by_backbone: dict[BackboneSpec, list[Unit]] = {}
    for unit in units:
        by_backbone.setdefault(unit.config.backbone, []).append(unit)
    for spec, group in by_backbone.items():
        error = None
        try:
            backbone = spec.load()
        except FewclipError as exc:
            error = f"the backbone {spec.model} cannot be loaded: {type(exc).__name__}: {exc}"
        if dist is not None and not _all_ranks_ok(error is None):  # torchrun: every rank skips it, none waits
            error = error or f"the backbone {spec.model} cannot be loaded on another rank (its log says why)"
        if error is not None:
            for unit in group:
                unit.error = error
            log(f"{spec.model}: {error}; its {len(group)} dataset(s) are skipped.")
            continue
        if dist is not None:  # torchrun: every rank its share of every dataset, then rank 0 alone
            try:
                for unit in group:
                    episodes = draw_episodes(unit.plan, unit.todo, save=False)
                    store = FeatureStore(unit.config.cache_dir)
                    try:
                        share = encode_share(unit.plan, episodes, store, backbone, dist.rank, dist.world)
                    except FewclipError as exc:
                        share = 0
                        log(f"{unit.name}: rank {dist.rank} could not encode its share ({exc}); rank 0 will.")
                    unit.encoded += share
                    report.encoded += share
            finally:
                _barrier()  # every rank reaches it, whatever its share did
            if dist.rank != 0:
                continue
        for unit in group:
            try:
                episodes = draw_episodes(unit.plan, unit.todo)
                features = encode(unit.plan, episodes, FeatureStore(unit.config.cache_dir), backbone)
            except FewclipError as exc:
                unit.error = f"{type(exc).__name__}: {exc}"
                log(f"{unit.name}: extraction failed ({unit.error}); its cells are counted as failed.")
                continue
            unit.encoded += features.encoded
            unit.cached = features.cached
            report.encoded += features.encoded
            report.cached += features.cached
            unit.report.encoded, unit.report.cached = unit.encoded, unit.cached
            log(f"{unit.name}: {features.encoded} image view(s) encoded, {features.cached} from the cache.")
            if keep:
                unit.features = features
        del backbone


def _fit_all_units(
    report: SweepReport, out_dir: str | Path, *, jobs: int, ray: str | None, run_id: str, save_models: bool, log: Log
) -> None:
    """Stage 3 over the grid, with one progress display: cells done / total, the current cell, time left."""
    units = [u for u in report.units if u.todo and u.error is None]
    total = sum(len(u.todo) for u in units)
    shown = report.units[0].config.extraction.progress if report.units else True
    bar = progress(total, "sweep: fitting", "cell", enabled=shown)
    warned: list[bool] = [False]

    def write(unit: Unit, outcomes: Sequence[CellOutcome]) -> None:  # on the publishing thread
        for outcome in outcomes:
            result = publish_cell(unit.plan, outcome, unit.report, lambda m: log(f"{unit.name}: {m}"), run_id)
            if result is None:
                report.failed += 1
                report.failures.append((str(unit.plan.paths[outcome.cell]), unit.report.failed[-1][1]))
            else:
                report.passed += 1
                unit.results[outcome.cell] = result
            bar.update(1)
        cell = outcomes[-1].cell if outcomes else None
        if cell is not None:
            bar.set_postfix(
                current=f"{unit.plan.splits.name} {cell.method} {cell.shots}-shot seed {cell.seed}",
                failed=report.failed,
            )

    def publish(unit: Unit, outcomes: Sequence[CellOutcome], encoded: int = 0) -> None:
        """Queue the outcomes for the publishing thread, so the next fit runs while this one's files are written
        (the writes wait on fsync, not on the CPU); a write that failed ends the sweep here."""
        if encoded and not warned[0]:
            warned[0] = True
            log(
                f"{unit.name}: a fitting worker encoded {encoded} image view(s) itself: it does not see the feature "
                "cache the extraction wrote (give every node the same --cache-dir on shared storage)."
            )
        queue.append(publisher.submit(write, unit, outcomes))
        while queue and (len(queue) > MAX_QUEUED or queue[0].done()):
            queue.popleft().result()

    def lost(unit: Unit, cells: Sequence[Cell], exc: BaseException) -> None:
        error = error_record(exc)  # the worker itself failed (its context could not be rebuilt, it died)
        publish(unit, [CellOutcome(c, error=error) for c in cells])

    queue: deque[Future] = deque()
    # one thread publishes, in order: results are written by this process only, one at a time, as in a run
    with bar, ThreadPoolExecutor(1, thread_name_prefix="fewclip-publish") as publisher:
        _fit_stage(units, out_dir, jobs, ray, save_models, publish, lost, log)
        while queue:
            queue.popleft().result()


def _fit_stage(
    units: list[Unit], out_dir, jobs: int, ray: str | None, save_models: bool, publish, lost, log: Log = print
) -> None:
    """The fitting itself: Ray tasks, one process, or ``jobs`` spawned processes; outcomes go to ``publish``."""
    if ray is not None:
        _fit_with_ray(units, out_dir, ray, save_models, publish, lost)
    elif jobs == 1:
        for unit in units:
            episodes = draw_episodes(unit.plan, unit.todo, save=False)
            features = unit.features
            if features is None:  # not kept: read back from the cache
                features = encode(unit.plan, episodes, FeatureStore(unit.config.cache_dir))
            common = common_record(unit.plan, features)
            for cells in task_groups(unit.todo):
                fitted: dict = {}
                cell_data: dict = {}
                outcomes = [
                    fit_cell(unit.plan, c, episodes, features, common, fitted, cell_data, save_models) for c in cells
                ]
                publish(unit, outcomes)
            unit.features = None
    else:
        _fit_with_processes(units, out_dir, jobs, save_models, publish, lost, log)


def _run_group(marks: str, index: int, config: RunConfig, out_dir: str, cells: Sequence[Cell], save_models: bool):
    """:func:`run_cells` in a ``--jobs`` worker, with a mark file ``marks/index`` while it runs: the marks left when
    the pool breaks name the groups its dead worker may have been fitting."""
    mark = Path(marks, str(index))
    mark.touch()
    try:
        return run_cells(config, out_dir, cells, save_models)
    finally:
        mark.unlink(missing_ok=True)


def _fit_with_processes(units, out_dir, jobs: int, save_models: bool, publish, lost, log: Log = print) -> None:
    """Fit the groups in ``jobs`` spawned processes. When a worker dies (the pool breaks: killed for memory, a crash
    in native code), the pool is rebuilt for the groups not finished, and each group that was running when it broke
    is run once more alone: only one that breaks its own pool too is recorded failed, with the error."""
    todo = [(unit, cells) for unit in units for cells in task_groups(unit.todo)]
    while todo:
        todo, suspects, error = _fit_in_pool(todo, out_dir, jobs, save_models, publish, lost)
        if not suspects:
            continue
        log(
            f"sweep: a fitting worker died ({error}); {len(suspects)} group(s) it may have been fitting are run again "
            f"alone, {len(todo)} other(s) in a new pool."
        )
        for group in suspects:
            rest, suspect, error = _fit_in_pool([group], out_dir, 1, save_models, publish, lost)
            for unit, cells in rest + suspect:  # it broke its own pool too: its cells fail, with the error
                cause = ResultsError(
                    f"the process fitting it died twice, once alone (a crash in native code, or killed for memory): "
                    f"{type(error).__name__}: {error}"
                )
                lost(unit, cells, cause)


def _fit_in_pool(groups, out_dir, jobs: int, save_models: bool, publish, lost) -> tuple[list, list, Exception | None]:
    """Run ``groups`` in one pool of ``jobs`` processes; (groups not finished and not suspect, groups running when
    the pool broke, the error that broke it); ([], [], None) when it did not break."""
    import multiprocessing
    import tempfile
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")  # torch's thread pools do not survive fork
    unfinished: dict[int, tuple[Unit, list[Cell]]] = {}
    broken: Exception | None = None
    with tempfile.TemporaryDirectory(prefix="fewclip-jobs-") as marks:
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
            pending: dict[Future, int] = {}
            for index, (unit, cells) in enumerate(groups):
                job = pool.submit(_run_group, marks, index, unit.config, str(out_dir), cells, save_models)
                pending[job] = index
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = pending.pop(future)
                    unit, cells = groups[index]
                    try:
                        outcomes, encoded = future.result()
                    except BrokenProcessPool as exc:
                        broken = exc
                        unfinished[index] = (unit, cells)
                        continue
                    except Exception as exc:  # noqa: BLE001 - a worker's failure is its cells' failure
                        lost(unit, cells, exc)
                        continue
                    publish(unit, outcomes, encoded)
        running = {int(p.name) for p in Path(marks).iterdir()} & set(unfinished)
    if broken is None:
        return [], [], None
    running = running or set(unfinished)  # it broke outside any group (starting a worker): every one is a suspect
    rest = [g for i, g in unfinished.items() if i not in running]
    return rest, [unfinished[i] for i in sorted(running)], broken


# --------------------------------------------------------------------------- Ray


def ray_module():
    """The ``ray`` package, or an error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ResultsError(
            "--ray needs Ray, an optional dependency: pip install 'fewclip[ray]' (on the driver and every node)."
        ) from None
    return ray


def ray_connect(address: str, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at ``address`` (``auto``: a running one; ``local``: start one here with ``num_cpus``
    CPUs and no dashboard; else ``ray://host:10001`` or ``host:6379``), once per process. Workers inherit this
    process's environment variables (``PYTHONPATH``, ``FEWCLIP_CACHE``)."""
    ray = ray_module()
    if ray.is_initialized():
        return
    # a local cluster's workers inherit this environment; a remote one's get the cache folder and offline flags (the
    # nodes' own PYTHONPATH and install of fewclip stand)
    names = ("FEWCLIP_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: os.environ[k] for k in names if k in os.environ}
    runtime_env = {"env_vars": env} if env and address != "local" else None
    try:
        if address == "local":
            ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)
        else:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ResultsError(
            f"--ray {address}: cannot connect ({exc}); start the cluster (ray start --head) or give its address, "
            "or use --ray local."
        ) from exc


def _gpu(spec: BackboneSpec) -> int:
    return 1 if str(spec.device).startswith("cuda") else 0


def _extract_with_ray(report: SweepReport, units: list[Unit], out_dir, address: str, log: Log) -> None:
    ray = ray_module()
    task = ray.remote(extract_unit)
    for unit in units:
        draw_episodes(unit.plan, unit.todo)  # the driver writes the episode files, as in a serial run
    refs = {task.options(num_cpus=1, num_gpus=_gpu(u.config.backbone)).remote(u.config, str(out_dir)): u for u in units}
    for ref, unit in refs.items():
        try:
            encoded, cached, seconds = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a Ray task raises its error wrapped: the unit stops
            cause = getattr(exc, "cause", None) or exc
            unit.error = f"{type(cause).__name__}: {cause}"
            log(f"{unit.name}: extraction failed ({unit.error}); its cells are counted as failed.")
            continue
        unit.encoded, unit.cached = encoded, cached
        report.encoded += encoded
        report.cached += cached
        unit.report.encoded, unit.report.cached = encoded, cached
        log(f"{unit.name}: {encoded} image view(s) encoded, {cached} from the cache ({seconds:.1f} s, on Ray).")


def _fit_with_ray(units: list[Unit], out_dir, address: str, save_models: bool, publish, lost) -> None:
    ray = ray_module()
    task = ray.remote(run_cells)
    pending = {}
    for unit in units:
        for cells in task_groups(unit.todo):
            images = get_class(cells[0].method).inputs == "images"
            options = {"num_cpus": 1, "num_gpus": _gpu(unit.config.backbone) if images else 0}
            pending[task.options(**options).remote(unit.config, str(out_dir), cells, save_models)] = (unit, cells)
    while pending:
        finished, _ = ray.wait(list(pending), num_returns=1)
        for ref in finished:
            unit, cells = pending.pop(ref)
            try:
                outcomes, encoded = ray.get(ref)
            except Exception as exc:  # noqa: BLE001
                lost(unit, cells, getattr(exc, "cause", None) or exc)
                continue
            publish(unit, outcomes, encoded)


# --------------------------------------------------------------------------- dry run


def cache_status(unit: Unit, backbone) -> tuple[int, int]:
    """(image views the cache holds, image views to encode) for the cells ``unit`` still has to run."""
    from ..features.extract import _group_spec

    the_plan = unit.plan
    options = the_plan.config.extraction
    store = FeatureStore(the_plan.config.cache_dir)
    episodes = draw_episodes(the_plan, unit.todo, save=False)
    root = the_plan.splits.root
    own = the_plan.hashes.get(str(root), {})
    support = {own.get(i.path) for e, _ in episodes.values() for i in e.train} - {None}
    evaluation = {own.get(i.path) for e, _ in episodes.values() for i in e.val}
    for target in the_plan.targets.values():
        table = the_plan.hashes.get(str(target.splits.root), {})
        evaluation |= {table.get(i.path) for i in target.items}
    evaluation -= {None}
    have = need = 0
    views: list[tuple[Any, set]] = [(v, support) for v in range(options.views)]
    views.append(("clean", support | evaluation))
    for view, keys in views:
        group = store.group(_group_spec(backbone, view, options.augment_seed, options.augmentation))
        found = sum(group.has(sorted(keys)))
        have += found
        need += len(keys) - found
    return have, need


def print_dry_run(report: SweepReport, out: Callable[[str], None]) -> None:
    """The cells of every unit (done, to run, failed before), what the cache holds and what would be encoded."""
    from .results import read_result

    backbones: dict[BackboneSpec, Any] = {}
    total_have = total_need = 0
    for unit in report.units:
        if unit.plan is None:
            out(f"{unit.name}: cannot be planned: {unit.error}")
            continue
        the_plan = unit.plan
        out(f"{unit.name} ({the_plan.protocol.name}): {len(the_plan.cells)} cell(s), {len(unit.done)} done, "
            f"{len(unit.todo)} to run")  # fmt: skip
        if unit.error is not None:
            out(f"  {unit.error}")
        for cell in the_plan.cells:
            if cell in unit.done:
                state = "done"
            elif (old := read_result(the_plan.paths[cell])) is not None and old.get("status") == "failed":
                state = "failed before: run again"
            elif old is not None and cell in unit.todo and not has_classifier(the_plan.paths[cell], old):
                state = "done, no classifier file: run again (--save-models)"
            else:
                state = "to run" if cell in unit.todo else "blocked"
            target = f" -> {cell.target}" if cell.target else ""
            out(f"  {cell.method:<16} {cell.shots:>3}-shot seed {cell.seed}{target}: {state}")
        if not unit.todo:
            continue
        spec = replace(unit.config.backbone, device="cpu")
        try:
            if spec not in backbones:
                backbones.clear()
                backbones[spec] = spec.load()
            have, need = cache_status(unit, backbones[spec])
        except FewclipError as exc:
            out(f"  feature cache: unknown, the backbone cannot be loaded here ({exc})")
            continue
        total_have += have
        total_need += need
        out(f"  feature cache: {have} image view(s) cached, {need} to encode")
    cells = sum(len(u.todo) for u in report.units)
    out(
        f"dry run: {cells} cell(s) to run of {report.total}; {total_have} image view(s) cached, {total_need} to "
        "encode (image methods also encode their test images through their fine-tuned encoder). Nothing was run."
    )
