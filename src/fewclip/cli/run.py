"""``fewclip run`` (few-shot results from image folders) and ``fewclip extract`` (one episode's feature bundle)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .cache import add_cache_dir_argument
from .common import CLIError, parse_set
from .datasets import add_data_arguments, add_episode_arguments, add_prompt_argument, kind_options_from_args

#: exit status of a run in which some cells failed (each recorded in its result file); 2 is a usage error
EXIT_FAILED_CELLS = 1
PROTOCOL_CHOICES = ("fewshot", "base2new", "base2new-imbalanced", "longtail", "transfer")


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=required, help="e.g. RN50, ViT-B-16, local-dir:DIR, hf-hub:ORG/NAME")
    g.add_argument("--pretrained", help="weights tag (openai, laion2b_s34b_b88k, ...) or a local checkpoint file")
    g.add_argument("--backend", choices=["open_clip", "hf"], default=None if not required else "open_clip")
    g.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None if not required else "fp32")
    g.add_argument("--device", default=None if not required else "cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    g.add_argument(
        "--preprocess",
        default=None if not required else "auto",
        help="evaluation transform preset (auto, clip, lift, model_default; default auto)",
    )
    g.add_argument(
        "--trust-checkpoint",
        action="store_true",
        default=None,
        help="allow pickled checkpoints (they can run code when loaded)",
    )


def add_extraction_arguments(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """The extraction options; without ``defaults`` an option not given stays None (a TOML file or the
    configuration's defaults decide)."""
    d = (lambda value: value) if defaults else (lambda value: None)
    g = parser.add_argument_group("extraction")
    g.add_argument("--views", type=int, default=d(10), help="augmented views per support image (default 10)")
    g.add_argument(
        "--augmentation", default=d("tip_cache"), help="augmentation preset of the views (default tip_cache)"
    )
    g.add_argument(
        "--augment-seed", type=int, default=d(0), help="seed of the views; keep it fixed across few-shot seeds (0)"
    )
    g.add_argument("--batch-size", type=int, default=d(128), help="images per forward pass (default 128)")
    g.add_argument("--workers", type=int, help="DataLoader workers (default: 0 for small jobs, else up to 16)")
    g.add_argument(
        "--skip-bad-images", action="store_true", default=None, help="leave unreadable images out and record them"
    )
    g.add_argument("--no-progress", action="store_true", default=None, help="no progress bars")
    add_cache_dir_argument(parser)


def parse_method_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """``KEY=VALUE`` (every method) or ``METHOD:KEY=VALUE`` pairs -> {method or "*": {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, value = item.partition("=")
        method, colon, key = target.rpartition(":")
        if not colon:
            method, key = "*", target
        out.setdefault(method, {}).update(parse_set([f"{key}{sep}{value}"]))
    return out


# --------------------------------------------------------------------------- configuration


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def sections_from_args(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The run configuration's sections from the options the user gave (an option not given is left out, so a
    TOML file's value or the configuration's default applies)."""
    get = lambda name: getattr(args, name, None)  # noqa: E731
    kind_options = kind_options_from_args(args)
    sections = {
        "data": _given(
            dataset=get("name"), data_root=get("data_root"), path=get("path"), kind_options=kind_options or None,
            prompts=get("prompts"), sampler=get("sampler"), val_kind=get("val_kind"), generated=get("generated"),
        ),
        "backbone": _given(
            model=get("model"), pretrained=get("pretrained"), backend=get("backend"), precision=get("precision"),
            device=get("device"), preprocess=get("preprocess"), trust_checkpoint=get("trust_checkpoint"),
        ),
        "extraction": _given(
            views=get("views"), augmentation=get("augmentation"), augment_seed=get("augment_seed"),
            batch_size=get("batch_size"), num_workers=get("workers"), skip_bad_images=get("skip_bad_images"),
            progress=False if get("no_progress") else None,
        ),
        "methods": _given(
            names=list(dict.fromkeys(get("method"))) if get("method") else None, preset=get("preset"),
            overrides=parse_method_sets(get("set")) if get("set") else None, selection=get("selection"),
        ),
        "protocol": _given(
            name=get("protocol"), shots=get("shots"), seeds=get("seeds"), imbalance_ratio=get("imbalance_ratio"),
            base_eval=get("base_eval").replace("-", "_") if get("base_eval") else None, targets=get("targets"),
            variant_eval=get("variant_eval"),
            variant_scoring=get("variant_scoring").replace("-", "_") if get("variant_scoring") else None,
        ),
    }  # fmt: skip
    if get("cache_dir") is not None:
        sections["cache_dir"] = get("cache_dir")
    return {k: v for k, v in sections.items() if v}


def config_from_args(args: argparse.Namespace, parts: tuple[str, ...] | None = None):
    """The :class:`~fewclip.protocols.config.RunConfig` of the options, on top of ``--config FILE`` if given;
    ``parts`` keeps only those sections of the options (``extract`` has no methods or protocol)."""
    from ..protocols.config import RunConfig, load_config

    sections = sections_from_args(args)
    if parts is not None:
        sections = {k: v for k, v in sections.items() if k in parts}
    if getattr(args, "config", None):
        return load_config(args.config, sections)
    required = {"--dataset": "name", "--model": "model", "--method": "method"}
    missing = [option for option, attr in required.items() if hasattr(args, attr) and not getattr(args, attr)]
    if missing:
        raise CLIError(f"{', '.join(missing)} required (or give them in a TOML file with --config FILE).")
    config = RunConfig.from_dict(sections, where="the command line")
    return config


# --------------------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    from ..protocols.runner import run

    config = config_from_args(args)
    if config.protocol.name == "transfer" and not config.protocol.targets:
        raise CLIError("--protocol transfer needs --targets (e.g. imagenet_v2 imagenet_sketch caltech101).")
    try:
        report = run(config, args.out, force=args.force, wait=args.wait, save_models=args.save_models)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished results and encoded features are kept; run the same command again to continue.",
            file=sys.stderr,
        )
        return 130
    seeds = list(dict.fromkeys(config.protocol.seeds))
    print(
        f"\n{report.dataset}, {report.protocol.name}, {report.plan.backbone}: {report.protocol.describe()}, "
        f"mean ± std over seeds {seeds}"
    )
    print(report.table())
    print(
        f"{len(report.written)} result(s) written, {len(report.skipped)} reused, {len(report.failed)} failed; "
        f"{report.encoded} image view(s) encoded, {report.cached} from the cache. "
        f"Results: {report.summary_path.parent}/"
    )
    if report.failed:
        print(f"\n{len(report.failed)} cell(s) failed (each recorded in its result file):", file=sys.stderr)
        for path, error in report.failed:
            print(f"  {path}: {error}", file=sys.stderr)
        return EXIT_FAILED_CELLS
    return 0


# --------------------------------------------------------------------------- extract


def cmd_extract(args: argparse.Namespace) -> int:
    from ..data import load_prompts, subsample_splits
    from ..features import bundle as bundle_io
    from ..features.pipeline import encode_images_once, episode_bundle
    from ..features.store import FeatureStore
    from ..features.text import encode_text_classifier
    from .datasets import episode_from_args, load_from_args

    config = config_from_args(args, parts=("data", "backbone", "extraction", "cache_dir"))
    splits = load_from_args(args)
    prompts = load_prompts(config.data.prompts, splits.name)
    episode = episode_from_args(args, splits)
    test = subsample_splits(splits, args.subsample).test
    backbone = config.backbone.load()
    store = FeatureStore(config.cache_dir)
    options = config.extraction
    pool = encode_images_once(backbone, splits, [episode], test=test, store=store, options=options)
    text_weights, text_norms, _ = encode_text_classifier(
        backbone, episode.classnames, prompts, store=store, return_norms=True
    )
    metadata = {
        "backbone": args.model,
        "pretrained": args.pretrained,
        "prompts": prompts.name if prompts.sha256 is None else f"{prompts.name} (sha256 {prompts.sha256})",
        "augmentation": options.augmentation,
        "augment_seed": options.augment_seed,
        "backbone_identity": json.dumps(backbone.cache_key(), sort_keys=True),
    }
    if episode.subsample != "all":
        metadata["subsample"] = episode.subsample
    if pool.bad:
        metadata["bad_images"] = json.dumps([b.as_dict() for b in pool.bad])
    bundle, dropped = episode_bundle(pool, episode, test, text_weights, metadata=metadata, text_norms=text_norms)
    path = bundle_io.save(bundle, args.out)
    print(f"wrote {path}: {json.dumps(bundle.summary())}")
    print(f"{pool.encoded} image view(s) encoded, {pool.cached} from the cache")
    if any(dropped.values()):
        print(f"left out as unreadable: {dropped}")
    return 0


# --------------------------------------------------------------------------- parser


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run",
        help="few-shot results from a dataset on disk: extract what the cache lacks, fit, evaluate",
        description="Options not given take their value from --config (a TOML file with [data], [backbone], "
        "[extraction], [methods] and [protocol] tables), else the defaults shown.",
    )
    run.add_argument("--config", metavar="FILE", help="a TOML run configuration; options given here override it")
    add_data_arguments(run, as_option=True, required=False)
    add_model_arguments(run, required=False)
    add_prompt_argument(run, default=None)
    run.add_argument("--method", nargs="+", help="one or more methods (see: fewclip methods list)")
    run.add_argument(
        "--protocol",
        choices=list(PROTOCOL_CHOICES),
        help="fewshot (all classes, default); base2new: fit on the first ceil(C/2) classes, score base and new, HM; "
        "base2new-imbalanced: Candle's exponential profile on the base support (--shots is the cap); "
        "longtail: ImageNet-LT / Places-LT, --shots caps each class (0 = the whole list), many/medium/few; "
        "transfer: fit on --dataset, score the --targets",
    )
    run.add_argument("--targets", nargs="+", help="transfer: target datasets (ImageNet variants or other datasets)")
    run.add_argument(
        "--variant-eval",
        choices=["200way", "1000way"],
        help="transfer: ImageNet-A/-R scored within their 200 ImageNet columns (default) or over all 1000",
    )
    run.add_argument(
        "--variant-scoring",
        choices=["source-columns", "new-classes"],
        help="transfer: score ImageNet variants through the source's columns (default) or append their classes as "
        "new classes, as Candle's published cross-dataset setting does",
    )
    run.add_argument("--imbalance-ratio", type=float, help="base2new-imbalanced: the ratio r (Candle: 0.02)")
    run.add_argument(
        "--base-eval",
        choices=["within-base", "all-classes"],
        help="base-to-new: score base rows within the base columns (CoCoOp, default) or over all columns as Candle's "
        "released code does (both are always recorded; this picks the headline and HM)",
    )
    run.add_argument("--shots", type=int, nargs="+", help="shot counts (default 1 2 4 8 16)")
    run.add_argument("--seeds", type=int, nargs="+", help="seeds (default 1 2 3)")
    run.add_argument(
        "--preset",
        help="'paper': each method's published configuration for this dataset where it has one; or a preset name",
    )
    run.add_argument(
        "--set",
        action="append",
        metavar="[METHOD:]KEY=VALUE",
        help="override a hyperparameter of every method, or of METHOD only",
    )
    run.add_argument(
        "--selection",
        choices=["val", "cv", "none"],
        help="val (default), cv (k-fold cross-validation over the support images; no validation split needed) or none",
    )
    run.add_argument("--sampler", choices=["dassl", "portable"], help="default: dassl for registered datasets")
    run.add_argument("--val-kind", choices=["fewshot", "full"], help="fewshot (default) or full")
    run.add_argument(
        "--generated",
        metavar="DIR",
        help="a generated set (fewclip generate: images and their latents) for methods that train on one (flier); "
        "restricted to each episode's classes with support",
    )
    add_extraction_arguments(run, defaults=False)
    run.add_argument("--out", default="results", help="results folder (default: results)")
    run.add_argument("--force", action="store_true", help="re-run results that exist already")
    run.add_argument(
        "--wait",
        action="store_true",
        help="if another run is writing into the same results folder, wait for it to finish (then reuse what it "
        "finished) instead of stopping with its pid, host and start time",
    )
    run.add_argument(
        "--save-models",
        action="store_true",
        help="beside each method's result, write a classifier file (<result>.<run id>.classifier.safetensors) "
        "that fewclip predict labels new images with; results skipped as done get none (--force re-runs them)",
    )
    run.set_defaults(func=cmd_run)

    ext = subparsers.add_parser("extract", help="write the feature bundle of one (dataset, K, seed) episode")
    add_data_arguments(ext, as_option=True)
    add_model_arguments(ext)
    add_prompt_argument(ext)
    add_episode_arguments(ext)
    add_extraction_arguments(ext)
    ext.add_argument("--out", required=True, help="the bundle file to write (.safetensors)")
    ext.set_defaults(func=cmd_extract)
