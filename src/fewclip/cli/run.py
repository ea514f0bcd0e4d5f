"""``fewclip run`` (few-shot results from image folders) and ``fewclip extract`` (one episode's feature bundle)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .cache import add_cache_dir_argument
from .common import CLIError, parse_set
from .datasets import add_data_arguments, add_episode_arguments, add_prompt_argument, kind_options_from_args


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True, help="e.g. RN50, ViT-B-16, local-dir:DIR, hf-hub:ORG/NAME")
    g.add_argument("--pretrained", help="weights tag (openai, laion2b_s34b_b88k, ...) or a local checkpoint file")
    g.add_argument("--backend", choices=["open_clip", "hf"], default="open_clip")
    g.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    g.add_argument("--preprocess", default="auto", help="evaluation transform preset (auto, clip, lift, model_default)")
    g.add_argument(
        "--trust-checkpoint", action="store_true", help="allow pickled checkpoints (they can run code when loaded)"
    )


def add_extraction_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("extraction")
    g.add_argument("--views", type=int, default=10, help="augmented views per support image (default 10)")
    g.add_argument("--augmentation", default="tip_cache", help="augmentation preset of the views (default tip_cache)")
    g.add_argument(
        "--augment-seed", type=int, default=0, help="seed of the views; keep it fixed across few-shot seeds (0)"
    )
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--workers", type=int, help="DataLoader workers (default: 0 for small jobs, else up to 16)")
    g.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images out and record them")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_cache_dir_argument(parser)


def extraction_options(args: argparse.Namespace):
    from ..features.pipeline import ExtractionOptions

    return ExtractionOptions(
        views=args.views,
        augmentation=args.augmentation,
        augment_seed=args.augment_seed,
        batch_size=args.batch_size,
        num_workers=args.workers,
        skip_bad_images=args.skip_bad_images,
        progress=not args.no_progress,
    )


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


# --------------------------------------------------------------------------- run


def config_from_args(args: argparse.Namespace, methods: list[str] | None = None):
    """The :class:`~fewclip.protocols.fewshot.FewShotConfig` of ``run`` / ``extract`` arguments."""
    from ..protocols.fewshot import FewShotConfig

    sweep = {}
    if methods is not None:
        sweep = {
            "methods": methods,
            "shots": args.shots,
            "seeds": args.seeds,
            "preset": args.preset,
            "overrides": parse_method_sets(args.set),
            "selection": args.selection,
            "protocol": args.protocol,
            "imbalance_ratio": args.imbalance_ratio,
            "base_eval": args.base_eval.replace("-", "_"),
        }
    return FewShotConfig(
        dataset=args.name,
        data_root=args.data_root,
        path=args.path,
        kind_options=kind_options_from_args(args),
        model=args.model,
        pretrained=args.pretrained,
        backend=args.backend,
        precision=args.precision,
        device=args.device,
        preprocess=args.preprocess,
        trust_checkpoint=args.trust_checkpoint,
        prompts=args.prompts,
        sampler=args.sampler,
        val_kind=args.val_kind,
        extraction=extraction_options(args),
        cache_dir=args.cache_dir,
        **sweep,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from ..protocols.fewshot import run_fewshot

    config = config_from_args(args, methods=list(dict.fromkeys(args.method)))
    try:
        if args.protocol == "transfer":
            return _run_transfer(args, config)
        report = run_fewshot(config, args.out, force=args.force)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished results and encoded features are kept; run the same command again to continue.",
            file=sys.stderr,
        )
        return 130
    print(f"\n{report.dataset}, {report.protocol.name}: {report.protocol.describe()}, mean ± std over seeds "
          f"{list(dict.fromkeys(args.seeds))}")  # fmt: skip
    print(report.table())
    print(
        f"{len(report.written)} result(s) written, {len(report.skipped)} reused; {report.encoded} image view(s) "
        f"encoded, {report.cached} from the cache. Results: {report.summary_path.parent}/"
    )
    return 0


def _run_transfer(args: argparse.Namespace, config) -> int:
    from ..protocols.transfer import run_transfer

    if not args.targets:
        raise CLIError("--protocol transfer needs --targets (e.g. imagenet_v2 imagenet_sketch caltech101).")
    out = run_transfer(
        config,
        args.targets,
        args.out,
        variant_eval=args.variant_eval,
        variant_scoring=args.variant_scoring.replace("-", "_"),
        force=args.force,
    )
    print(f"\n{config.dataset} -> targets: top-1 test accuracy (%), mean ± std over seeds")
    print(out["table"])
    print(f"{len(out['written'])} result(s) written, {len(out['skipped'])} reused.")
    return 0


# --------------------------------------------------------------------------- extract


def cmd_extract(args: argparse.Namespace) -> int:
    from ..data import load_prompts, subsample_splits
    from ..features import bundle as bundle_io
    from ..features.pipeline import encode_images_once, episode_bundle
    from ..features.store import FeatureStore
    from ..features.text import encode_text_classifier
    from ..protocols.fewshot import load_config_backbone
    from .datasets import episode_from_args, load_from_args

    config = config_from_args(args)
    splits = load_from_args(args)
    prompts = load_prompts(config.prompts, splits.name)
    episode = episode_from_args(args, splits)
    test = subsample_splits(splits, args.subsample).test
    backbone = load_config_backbone(config)
    store = FeatureStore(config.cache_dir)
    options = config.extraction
    pool = encode_images_once(backbone, splits, [episode], test=test, store=store, options=options)
    text_weights, _ = encode_text_classifier(backbone, episode.classnames, prompts, store=store)
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
    bundle, dropped = episode_bundle(pool, episode, test, text_weights, metadata=metadata)
    path = bundle_io.save(bundle, args.out)
    print(f"wrote {path}: {json.dumps(bundle.summary())}")
    print(f"{pool.encoded} image view(s) encoded, {pool.cached} from the cache")
    if any(dropped.values()):
        print(f"left out as unreadable: {dropped}")
    return 0


# --------------------------------------------------------------------------- parser


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run", help="few-shot results from a dataset on disk: extract what the cache lacks, fit, evaluate"
    )
    add_data_arguments(run, as_option=True)
    add_model_arguments(run)
    add_prompt_argument(run)
    run.add_argument("--method", nargs="+", required=True, help="one or more methods (see: fewclip methods list)")
    run.add_argument(
        "--protocol",
        choices=["fewshot", "base2new", "base2new-imbalanced", "longtail", "transfer"],
        default="fewshot",
        help="fewshot (all classes); base2new: fit on the first ceil(C/2) classes, score base and new, HM; "
        "base2new-imbalanced: Candle's exponential profile on the base support (--shots is the cap); "
        "longtail: ImageNet-LT / Places-LT, --shots caps each class (0 = the whole list), many/medium/few; "
        "transfer: fit on --dataset, score the --targets",
    )
    run.add_argument("--targets", nargs="+", help="transfer: target datasets (ImageNet variants or other datasets)")
    run.add_argument(
        "--variant-eval",
        choices=["200way", "1000way"],
        default="200way",
        help="transfer: ImageNet-A/-R scored within their 200 ImageNet columns (default) or over all 1000",
    )
    run.add_argument(
        "--variant-scoring",
        choices=["source-columns", "new-classes"],
        default="source-columns",
        help="transfer: score ImageNet variants through the source's columns (default) or append their classes as "
        "new classes, as Candle's published cross-dataset setting does",
    )
    run.add_argument("--imbalance-ratio", type=float, help="base2new-imbalanced: the ratio r (Candle: 0.02)")
    run.add_argument(
        "--base-eval",
        choices=["within-base", "all-classes"],
        default="within-base",
        help="base-to-new: score base rows within the base columns (CoCoOp, default) or over all columns as Candle's "
        "released code does (both are always recorded; this picks the headline and HM)",
    )
    run.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    run.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    run.add_argument(
        "--preset",
        help="'paper': each method's published configuration for this dataset where it has one; or a preset name",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[METHOD:]KEY=VALUE",
        help="override a hyperparameter of every method, or of METHOD only",
    )
    run.add_argument("--selection", choices=["val", "none"], default="val")
    run.add_argument("--sampler", choices=["dassl", "portable"], help="default: dassl for registered datasets")
    run.add_argument("--val-kind", choices=["fewshot", "full"], default="fewshot")
    add_extraction_arguments(run)
    run.add_argument("--out", default="results", help="results folder (default: results)")
    run.add_argument("--force", action="store_true", help="re-run results that exist already")
    run.set_defaults(func=cmd_run)

    ext = subparsers.add_parser("extract", help="write the feature bundle of one (dataset, K, seed) episode")
    add_data_arguments(ext, as_option=True)
    add_model_arguments(ext)
    add_prompt_argument(ext)
    add_episode_arguments(ext)
    add_extraction_arguments(ext)
    ext.add_argument("--out", required=True, help="the bundle file to write (.safetensors)")
    ext.set_defaults(func=cmd_extract)
