"""``fewclip sweep``: a grid of datasets × backbones × methods × shots × seeds, resumable, on this machine (``--jobs``),
on a Ray cluster (``--ray``) or with its extraction spread over GPUs (``torchrun``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import CLIError
from .datasets import add_prompt_argument
from .run import PROTOCOL_CHOICES, add_extraction_arguments, parse_method_sets

EXAMPLE = """\
example grid (grid.toml; options given on the command line override it):

  [data]
  data_root = "/data"
  datasets = ["caltech101", "oxford_pets", { dataset = "folder", path = "/data/birds" }]

  [[backbones]]
  model = "RN50"
  pretrained = "openai"
  device = "cuda"

  [[backbones]]
  model = "ViT-B-16"
  pretrained = "openai"
  device = "cuda"

  [methods]
  names = ["zero-shot", "tip-adapter", "ape", "gda"]
  preset = "paper"

  [protocol]
  shots = [1, 2, 4, 8, 16]
  seeds = [1, 2, 3]

  fewclip sweep --config grid.toml --out results --jobs 4
  fewclip sweep --config grid.toml --out results --ray auto
  torchrun --nproc_per_node 4 -m fewclip sweep --config grid.toml --out results
"""


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def sweep_sections(args: argparse.Namespace) -> dict[str, Any]:
    """The grid's sections from the options the user gave (an option not given is left to the TOML file or the
    defaults). ``--model`` (one or more) replaces the file's backbones; the other model options apply to each."""
    get = lambda name: getattr(args, name, None)  # noqa: E731
    if get("path") and get("dataset") and len(get("dataset")) > 1:
        raise CLIError("--path names one dataset's folder; with several datasets give each its path in a TOML file.")
    data = _given(data_root=get("data_root"), path=get("path"), prompts=get("prompts"), sampler=get("sampler"),
                  val_kind=get("val_kind"))  # fmt: skip
    if get("dataset"):
        data["datasets"] = list(dict.fromkeys(get("dataset")))
    model_options = _given(
        backend=get("backend"), precision=get("precision"), device=get("device"), preprocess=get("preprocess"),
        trust_checkpoint=get("trust_checkpoint"),
    )  # fmt: skip
    sections: dict[str, Any] = {}
    if get("model"):
        models, tags = get("model"), get("pretrained") or [None]
        if len(tags) not in (1, len(models)):
            raise CLIError(
                f"--pretrained: give one weights tag for every --model, or one per model ({len(models)}), not "
                f"{len(tags)}."
            )
        tags = tags * len(models) if len(tags) == 1 else tags
        sections["backbones"] = [_given(model=m, pretrained=t, **model_options) for m, t in zip(models, tags)]
    elif get("pretrained"):
        raise CLIError("--pretrained needs --model (or give both in the TOML file's [[backbones]] tables).")
    elif model_options:
        sections["_backbone_options"] = model_options
    sections["data"] = data
    sections["methods"] = _given(
        names=list(dict.fromkeys(get("method"))) if get("method") else None, preset=get("preset"),
        overrides=parse_method_sets(get("set")) if get("set") else None, selection=get("selection"),
    )  # fmt: skip
    sections["protocol"] = _given(
        name=get("protocol"), shots=get("shots"), seeds=get("seeds"), imbalance_ratio=get("imbalance_ratio"),
        base_eval=get("base_eval").replace("-", "_") if get("base_eval") else None, targets=get("targets"),
        variant_eval=get("variant_eval"),
        variant_scoring=get("variant_scoring").replace("-", "_") if get("variant_scoring") else None,
    )  # fmt: skip
    sections["extraction"] = _given(
        views=get("views"), augmentation=get("augmentation"), augment_seed=get("augment_seed"),
        batch_size=get("batch_size"), num_workers=get("workers"), skip_bad_images=get("skip_bad_images"),
        progress=False if get("no_progress") else None,
    )  # fmt: skip
    if get("cache_dir") is not None:
        sections["cache_dir"] = get("cache_dir")
    return {k: v for k, v in sections.items() if v}


def grid_from_args(args: argparse.Namespace):
    """The :class:`~fewclip.protocols.sweep.SweepConfig` of ``--config`` (if given) with the options over it."""
    from ..io import read_toml
    from ..protocols.config import merge_sections
    from ..protocols.sweep import SweepConfig

    sections = sweep_sections(args)
    backbone_options = sections.pop("_backbone_options", None)
    base: dict[str, Any] = {}
    where = "the command line"
    if args.config:
        where = args.config
        base = read_toml(args.config, what="sweep", error=CLIError)
        if "backbones" in sections:  # --model replaces the file's backbones
            base = {k: v for k, v in base.items() if k not in ("backbone", "backbones")}
        if "datasets" in sections.get("data", {}) and isinstance(base.get("data"), dict):
            base["data"] = {k: v for k, v in base["data"].items() if k != "dataset"}
    merged = merge_sections(base, sections)
    if backbone_options:  # --device and friends without --model: every backbone of the file
        if isinstance(merged.get("backbones"), list):
            merged["backbones"] = [{**b, **backbone_options} for b in merged["backbones"]]
        else:
            merged["backbone"] = {**merged.get("backbone", {}), **backbone_options}
    if not args.config:
        missing = [o for o, key in (("--dataset", "data"), ("--model", "backbones"), ("--method", "methods"))
                   if not sections.get(key) or (key == "data" and "datasets" not in sections["data"])]  # fmt: skip
        if missing:
            raise CLIError(f"{', '.join(missing)} required (or give them in a TOML file with --config FILE).")
    return SweepConfig.from_dict(merged, where=where)


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..protocols.sweep import Distributed, sweep

    if args.jobs < 1:
        raise CLIError(f"--jobs {args.jobs}: give a number of processes ≥ 1.")
    if args.ray is not None and args.jobs > 1 and args.ray != "local":
        raise CLIError("--jobs sets the CPUs of --ray local only; a Ray cluster schedules its own workers.")
    if args.ray is not None and Distributed.from_env() is not None:
        raise CLIError("--ray and torchrun do not mix: run the sweep under one of them.")
    grid = grid_from_args(args)
    ray = args.ray
    if ray is not None and not args.dry_run:
        from ..protocols.sweep import ray_connect

        ray_connect(ray, num_cpus=args.jobs if ray == "local" and args.jobs > 1 else None)
    try:
        report = sweep(
            grid,
            args.out,
            jobs=1 if ray is not None else args.jobs,
            ray=ray,
            force=args.force,
            wait=args.wait,
            dry_run=args.dry_run,
            save_models=args.save_models,
        )
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished results and encoded features are kept; run the same command again to continue "
            "(finished cells are skipped).",
            file=sys.stderr,
        )
        return 130
    if args.dry_run:
        return 0
    print(report.last_lines(), file=sys.stderr if report.exit_status else sys.stdout)
    return report.exit_status


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="a grid of datasets x backbones x methods x shots x seeds: resumable, local processes, Ray or torchrun",
        description="Runs every cell of a grid into one results folder (the layout fewclip run writes). Each image is "
        "encoded once per backbone for the whole grid, then the cells are fitted. Finished cells are skipped; a "
        "failing cell is recorded in its result file and the sweep goes on; the exit status is 1 when any failed.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="a TOML grid; options given here override it")
    g = p.add_argument_group("grid")
    g.add_argument("--dataset", nargs="+", metavar="NAME", help="datasets (keys or aliases; see fewclip datasets list)")
    g.add_argument("--data-root", help="folder holding one folder per dataset")
    g.add_argument("--path", help="the dataset's own folder (one dataset only; several: a table each in the TOML)")
    add_prompt_argument(p, default=None)
    g.add_argument("--model", nargs="+", help="one or more backbones (RN50 ViT-B-16 local-dir:DIR ...)")
    g.add_argument("--pretrained", nargs="+", help="weights tag or file: one for every --model, or one per model")
    g.add_argument("--backend", choices=["open_clip", "hf"])
    g.add_argument("--precision", choices=["fp32", "fp16", "bf16"])
    g.add_argument("--device", help="cpu, cuda (under torchrun: each rank's own GPU), mps")
    g.add_argument("--preprocess", help="evaluation transform preset (auto, clip, lift, model_default)")
    g.add_argument("--trust-checkpoint", action="store_true", default=None, help="allow pickled checkpoints")
    g.add_argument("--method", nargs="+", help="methods (see: fewclip methods list)")
    g.add_argument("--preset", help="'paper' (each method's published configuration per dataset) or a preset name")
    g.add_argument("--set", action="append", metavar="[METHOD:]KEY=VALUE", help="override a hyperparameter")
    g.add_argument("--selection", choices=["val", "cv", "none"])
    g.add_argument("--protocol", choices=list(PROTOCOL_CHOICES))
    g.add_argument("--shots", type=int, nargs="+", help="shot counts (default 1 2 4 8 16)")
    g.add_argument("--seeds", type=int, nargs="+", help="seeds (default 1 2 3)")
    g.add_argument("--targets", nargs="+", help="transfer: target datasets")
    g.add_argument("--variant-eval", choices=["200way", "1000way"])
    g.add_argument("--variant-scoring", choices=["source-columns", "new-classes"])
    g.add_argument("--imbalance-ratio", type=float, help="base2new-imbalanced: the ratio r")
    g.add_argument("--base-eval", choices=["within-base", "all-classes"])
    g.add_argument("--sampler", choices=["dassl", "portable"])
    g.add_argument("--val-kind", choices=["fewshot", "full"])
    add_extraction_arguments(p, defaults=False)
    r = p.add_argument_group("running")
    r.add_argument("--out", default="results", help="results folder (default: results)")
    r.add_argument("--jobs", type=int, default=1, help="local processes fitting cells (default 1; with --ray local: "
                   "its CPUs)")  # fmt: skip
    r.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run on Ray (pip install 'fewclip[ray]'): auto (a running cluster), local (start one here), or an "
        "address (ray://head:10001); the feature cache (--cache-dir) must be a folder every node sees",
    )
    r.add_argument("--dry-run", action="store_true", help="print the cells, what is cached and what would be encoded")
    r.add_argument("--force", action="store_true", help="re-run cells that have results already")
    r.add_argument("--wait", action="store_true", help="wait for another run writing into the same folders")
    r.add_argument(
        "--save-models", action="store_true", help="a classifier file beside each method's result (for fewclip predict)"
    )
    p.set_defaults(func=cmd_sweep)
