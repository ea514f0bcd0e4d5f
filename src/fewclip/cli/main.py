"""The ``fewclip`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..errors import CLIError, FewclipError
from .common import EXIT_USAGE, fit_and_evaluate, fmt, parse_set

# --------------------------------------------------------------------------- fit


def cmd_fit(args: argparse.Namespace) -> int:
    from .. import methods
    from ..features import bundle as bundle_io

    overrides = parse_set(args.set)
    if "selection" in overrides:
        raise CLIError(
            f"--set selection={overrides['selection']}: give it as --selection {overrides['selection']}, not --set."
        )
    # the method, its preset and every value checked before the bundle is read
    methods.create(args.method, preset=args.preset, selection=args.selection, **overrides).validate_params()
    bundle = bundle_io.load(args.bundle)
    model, result = fit_and_evaluate(bundle, args.method, args.preset, overrides, args.selection)
    if args.save_model:
        model.save(args.save_model)
        result["model_path"] = str(args.save_model)
    if args.json:
        print(json.dumps(result, allow_nan=False))
        return 0
    val = "n/a" if result["val_accuracy"] is None else f"{result['val_accuracy']:.2f}%"
    hp = ", ".join(f"{k}={fmt(v)}" for k, v in result["hyperparameters"].items())
    print(f"method          {args.method}" + (f" (preset {args.preset})" if args.preset else ""))
    print(f"bundle          {args.bundle}: {json.dumps(result['bundle'])}")
    print(f"selection       {args.selection}")
    print(f"hyperparameters {hp}")
    print(f"val accuracy    {val}")
    print(f"test accuracy   {result['test_accuracy']:.2f}%")
    print(f"seconds         fit {result['fit_seconds']:.2f}, predict {result['predict_seconds']:.2f}")
    if args.save_model:
        print(f"model saved     {args.save_model}")
    return 0


# --------------------------------------------------------------------------- bundle, methods


def cmd_bundle_info(args: argparse.Namespace) -> int:
    from ..features import bundle as bundle_io

    info = bundle_io.info(bundle_io.load(args.file))
    if args.json:
        print(json.dumps(info, allow_nan=False))
        return 0
    print(f"file      {args.file}")
    print(f"format    {info['format']}")
    for name, shape in info["tensors"].items():
        print(f"tensor    {name:24s} {shape}")
    print(f"classes   {info['classes']}   dim {info['dim']}   views {info['views']}   support rows {info['support']}")
    shots = info["shots"]
    if isinstance(shots, int):
        print(f"shots     {shots} per class")
    else:
        print(f"shots     unequal: min {info['shots_min']}, max {info['shots_max']} per class")
    if info["classes_without_support"]:
        print(f"no support for classes {info['classes_without_support']}")
    print(f"val rows  {info['val'] if info['val'] is not None else 'none'}   test rows {info['test']}")
    names = info["classnames"]
    print(f"classnames {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    for key, value in sorted(info["metadata"].items()):
        print(f"meta      {key} = {value}")
    return 0


def cmd_bundle_import(args: argparse.Namespace) -> int:
    from ..features import bundle as bundle_io
    from ..features.importers import import_upstream_cache

    bundle = import_upstream_cache(
        args.source,
        args.directory,
        args.shots,
        text_weights=args.text_weights,
        classnames=args.classnames,
        backbone=args.backbone,
        dataset=args.dataset,
        seed=args.seed,
    )
    path = bundle_io.save(bundle, args.out)
    print(
        f"wrote {path}: {json.dumps(bundle.summary())}, val rows {bundle.val_labels.numel() if bundle.has_val else 0}"
    )
    if not bundle.has_val:
        print("note: this cache has no validation split; fit it with --selection none (or add val features).")
    return 0


def cmd_methods_list(args: argparse.Namespace) -> int:
    from .. import methods

    for name in methods.list_methods():
        cls = methods.get_class(name)
        presets = methods.list_presets(name)
        params = ", ".join(cls.param_names())
        fitted_on = "images (fewclip run)" if cls.inputs == "images" else "features (fewclip fit, fewclip run)"
        print(
            f"{name}\n  fitted on: {fitted_on}\n  hyperparameters: {params}\n"
            f"  presets: {', '.join(presets) if presets else 'none'}"
        )
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="fewclip", description="Few-shot adaptation of CLIP on cached features.")
    parser.add_argument("--version", action="version", version=f"fewclip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from .demo import add_parser as add_demo_parser

    add_demo_parser(sub)

    fit = sub.add_parser("fit", help="fit one method on a feature bundle and evaluate it on the bundle's test split")
    fit.add_argument("bundle", help="a .safetensors feature bundle")
    fit.add_argument("--method", required=True, help="method name (see: fewclip methods list)")
    fit.add_argument("--preset", help="published per-dataset configuration, e.g. caltech101 or imagenet")
    fit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a hyperparameter")
    fit.add_argument(
        "--selection",
        choices=["val", "cv", "none"],
        default="val",
        help="choose hyperparameters on the bundle's validation split (default), by k-fold cross-validation over the "
        "support images (cv), or keep initial values (none)",
    )
    fit.add_argument(
        "--save-model",
        metavar="PATH",
        help="write the fitted model (safetensors); a bundle names no backbone, so this is the method's model file, "
        "not a classifier for fewclip predict (fewclip run --save-models writes those)",
    )
    fit.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    fit.set_defaults(func=cmd_fit)

    bundle = sub.add_parser("bundle", help="inspect or import feature bundles")
    bsub = bundle.add_subparsers(dest="bundle_command", required=True)
    binfo = bsub.add_parser("info", help="shapes, classes, shots per class and metadata of a bundle")
    binfo.add_argument("file")
    binfo.add_argument("--json", action="store_true")
    binfo.set_defaults(func=cmd_bundle_info)
    bimp = bsub.add_parser("import", help="turn an APE or Tip-Adapter cache folder into a bundle")
    bimp.add_argument("directory", help="the cache folder (caches/<dataset>/ of the upstream code)")
    bimp.add_argument("--from", dest="source", required=True, choices=["ape", "tip-adapter"])
    bimp.add_argument("--shots", type=int, required=True)
    bimp.add_argument("--out", required=True)
    bimp.add_argument("--text-weights", help="zero-shot classifier file (.pt, [D, C] or [C, D])")
    bimp.add_argument("--classnames", help="text file with one class name per line")
    bimp.add_argument("--backbone", help="the backbone that produced the cache (recorded; not in upstream file names)")
    bimp.add_argument("--dataset")
    bimp.add_argument("--seed", type=int)
    bimp.set_defaults(func=cmd_bundle_import)

    meth = sub.add_parser("methods", help="list methods, their hyperparameters and presets")
    msub = meth.add_subparsers(dest="methods_command", required=True)
    mlist = msub.add_parser("list")
    mlist.set_defaults(func=cmd_methods_list)

    from .cache import add_parsers as add_cache_parsers
    from .datasets import add_parsers as add_dataset_parsers
    from .generate import add_parsers as add_generate_parsers
    from .predict import add_parser as add_predict_parser
    from .report import add_parser as add_report_parser
    from .results import add_parsers as add_results_parsers
    from .run import add_parsers as add_run_parsers
    from .sweep import add_parser as add_sweep_parser

    add_run_parsers(sub)
    add_sweep_parser(sub)
    add_predict_parser(sub)
    add_results_parsers(sub)
    add_report_parser(sub)
    add_dataset_parsers(sub)
    add_cache_parsers(sub)
    add_generate_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FewclipError as exc:
        print(f"fewclip {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
