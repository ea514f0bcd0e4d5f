"""``fewclip datasets``: list, check, prompts, sample, import-coop.

Wired into the main parser by ``add_parsers(subparsers)``. The shared options (``add_data_arguments``,
``add_prompt_argument``, ``add_episode_arguments``) and ``load_from_args`` / ``episode_from_args`` are meant
for other commands that read datasets (feature extraction, runs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import CLIError, format_table

# --------------------------------------------------------------------------- shared options


def add_data_arguments(parser: argparse.ArgumentParser, *, as_option: bool = False, required: bool = True) -> None:
    """``NAME`` (``--dataset NAME`` with ``as_option``), ``--data-root``, ``--path`` and the per-kind options of
    :func:`fewclip.data.load_dataset`."""
    help_text = "dataset key or alias (see: fewclip datasets list), or folder / csv"
    if as_option:
        parser.add_argument("--dataset", dest="name", required=required, metavar="NAME", help=help_text)
    else:
        parser.add_argument("name", help=help_text)
    parser.add_argument("--data-root", help="folder holding one folder per dataset (CoOp's names; APE/Candle's too)")
    parser.add_argument("--path", help="the dataset folder itself (overrides --data-root); for folder/csv: the data")
    g = parser.add_argument_group("split options")
    g.add_argument("--split-file", help="a split JSON in CoOp's format instead of the default one")
    g.add_argument(
        "--regenerate-split",
        type=int,
        metavar="SEED",
        help="Caltech101/DTD/EuroSAT/Food101: make a NON-standard 50/20/30 split with this seed",
    )
    g.add_argument("--split-seed", type=int, help="folder/csv without a split: seed of the 50/20/30 split (1)")
    g.add_argument("--lists-dir", help="ImageNet-LT / Places-LT: folder holding the list files and classnames.txt")
    g.add_argument("--image-root", help="folder/csv: what relative image paths are relative to")
    g.add_argument("--train-csv", help="csv: the train rows (path,label[,classname])")
    g.add_argument("--val-csv", help="csv: the val rows")
    g.add_argument("--test-csv", help="csv: the test rows")
    g.add_argument("--classnames-file", help="csv: class names, one per line (line i = label i)")
    g.add_argument(
        "--allow-outside-root",
        action="store_true",
        default=None,
        help="accept image paths that leave the image root (../ or absolute paths in a split file or CSV)",
    )


def kind_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``load_dataset`` keyword options the user actually set (others are left to the defaults)."""
    names = {
        "split_file": "split_file",
        "regenerate_split": "regenerate_split",
        "split_seed": "split_seed",
        "lists_dir": "lists_dir",
        "image_root": "image_root",
        "train_csv": "train",
        "val_csv": "val",
        "test_csv": "test",
        "classnames_file": "classnames_file",
        "allow_outside_root": "allow_outside_root",
    }
    return {opt: getattr(args, attr) for attr, opt in names.items() if getattr(args, attr, None) is not None}


def load_from_args(args: argparse.Namespace, *, check_files: bool = True, warn: bool = True):
    """``load_dataset`` with the options of :func:`add_data_arguments`."""
    from ..data import load_dataset

    return load_dataset(
        args.name, args.data_root, path=args.path, check_files=check_files, warn=warn, **kind_options_from_args(args)
    )


def add_prompt_argument(parser: argparse.ArgumentParser, default: str | None = "single") -> None:
    parser.add_argument(
        "--prompts",
        default=default,
        help="template set (single, imagenet7, imagenet80) or a file: templates (.txt, JSON list, JSON keyed by "
        "dataset) or CuPL-style descriptions {classname: [sentences]} (default: single)",
    )


def add_episode_arguments(parser: argparse.ArgumentParser) -> None:
    """``--shots``, ``--seed``, ``--sampler``, ``--val-kind``, ``--repeat``, ``--subsample``, ``--imbalance-ratio``."""
    parser.add_argument("--shots", type=int, required=True, help="K images per class")
    parser.add_argument("--seed", type=int, default=1, help="sampling seed (CoOp scripts use 1, 2, 3)")
    parser.add_argument(
        "--sampler",
        choices=["dassl", "portable"],
        help="dassl = CoOp/Dassl's draw (default for the registered datasets); portable = sorted paths + numpy",
    )
    parser.add_argument(
        "--val-kind",
        choices=["fewshot", "full"],
        default="fewshot",
        help="min(K, 4) val images per class (default) or the whole val split",
    )
    parser.add_argument("--repeat", action="store_true", help="fill classes with fewer than K images by repetition")
    parser.add_argument(
        "--subsample", choices=["all", "base", "new"], default="all", help="base-to-new: keep the first or second half"
    )
    parser.add_argument(
        "--imbalance-ratio",
        type=float,
        help="Candle's exponential profile on the support (after --subsample), e.g. 0.02",
    )


def episode_from_args(args: argparse.Namespace, splits):
    """Sample the episode described by :func:`add_episode_arguments` (subsample, then imbalance)."""
    from dataclasses import replace

    from ..data import make_imbalanced, sample_episode

    episode = sample_episode(
        splits, args.shots, args.seed, sampler=args.sampler, val_kind=args.val_kind, repeat=args.repeat
    )
    episode = episode.subsample_classes(args.subsample)
    if args.imbalance_ratio is not None:
        train = make_imbalanced(episode.train, args.imbalance_ratio, args.seed)
        episode = replace(episode, train=train, imbalance_ratio=args.imbalance_ratio)
    return episode


# --------------------------------------------------------------------------- commands


def cmd_datasets_list(args: argparse.Namespace) -> int:
    """One row per registered dataset: key, CoOp folder, other folder names, kind, published counts, template."""
    from ..data import dataset_info, list_datasets

    rows = []
    for info in map(dataset_info, list_datasets()):
        c = info.counts
        counts = "/".join("-" if c.get(s) is None else str(c[s]) for s in ("train", "val", "test"))
        rows.append(
            {
                "dataset": info.key,
                "folder": info.folders[0].name + "/" if info.folders else "(--path)",
                "also accepted": ", ".join(f.name + "/" for f in info.folders[1:]) or "-",
                "kind": info.kind,
                "classes": "-" if c.get("classes") is None else str(c["classes"]),
                "train/val/test": counts if c else "-",
                "template": info.template,
            }
        )
    if args.json:
        print(json.dumps(rows))
        return 0
    print(format_table(rows, list(rows[0])))
    return 0


def check_report(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """(report, missing paths) for ``datasets check``; layout errors raise :class:`DataError`."""
    from ..data import dataset_info, find_missing

    info = dataset_info(args.name)
    splits = load_from_args(args, check_files=False, warn=False)
    if not splits.root.is_dir():
        from ..data import DataError

        raise DataError(f"{info.key}: image folder {splits.root} not found. Expected: {info.where_from()}.")
    paths = [i.path for part in (splits.train, splits.val, splits.test) for i in part]
    missing = find_missing(splits.root, paths)
    found = splits.counts()
    report = {
        "dataset": info.key,
        "kind": info.kind,
        "dataset_dir": str(splits.dataset_dir),
        "folder_alias": splits.folder_alias,
        "image_root": str(splits.root),
        "split_source": splits.split_source,
        "standard_split": splits.standard_split,
        "split_sha256": splits.split_sha256,
        "counts": {k: {"found": v, "published": info.counts.get(k)} for k, v in found.items()},
        "files": len(paths),
        "missing": len(missing),
        "warnings": list(splits.warnings),
    }
    return report, missing


def cmd_datasets_check(args: argparse.Namespace) -> int:
    """Verify the layout, list every image the split names that is absent, compare counts with the published."""
    report, missing = check_report(args)
    if args.json:
        print(json.dumps({**report, "missing_paths": missing}))
    else:
        alias = f" (folder name {report['folder_alias']!r})" if report["folder_alias"] else ""
        print(f"dataset   {report['dataset']} ({report['kind']})")
        print(f"folder    {report['dataset_dir']}{alias}")
        print(f"images    {report['image_root']}")
        std = "" if report["standard_split"] else "  [non-standard split]"
        print(f"split     {report['split_source']}  sha256 {report['split_sha256'][:16]}{std}")
        print(f"{'':9} {'found':>9} {'published':>10}")
        for what, c in report["counts"].items():
            pub = "-" if c["published"] is None else str(c["published"])
            mark = "" if c["published"] is None or c["published"] == c["found"] else "  <- differs"
            print(f"{what:9} {c['found']:>9} {pub:>10}{mark}")
        print(f"files     {report['files']} named, {report['missing']} missing")
        for path in missing:
            print(f"missing   {path}")
        for w in report["warnings"]:
            print(f"warning: {w}")
    if missing:
        raise CLIError(
            f"{report['dataset']}: {len(missing)} of {report['files']} images named by {report['split_source']} "
            f"are missing under {report['image_root']} (listed above)."
        )
    return 0


def cmd_datasets_prompts(args: argparse.Namespace) -> int:
    """Print the sentences each class gets under ``--prompts`` (what the text classifier encodes)."""
    from ..data import load_prompts

    splits = load_from_args(args, check_files=False, warn=False)
    prompts = load_prompts(args.prompts, splits.name)
    sentences = prompts.sentences(splits.classnames)
    if args.json:
        rows = [
            {"label": y, "classname": c, "sentences": s} for y, (c, s) in enumerate(zip(splits.classnames, sentences))
        ]
        print(json.dumps({"prompts": prompts.name, "kind": prompts.kind, "sha256": prompts.sha256, "classes": rows}))
        return 0
    print(f"prompts   {prompts.name} ({prompts.kind}{', sha256 ' + prompts.sha256[:16] if prompts.sha256 else ''})")
    for y, (c, s) in enumerate(zip(splits.classnames, sentences)):
        print(f"{y:4d} {c}: " + " | ".join(s[: args.max_sentences]) + (" | ..." if len(s) > args.max_sentences else ""))
    return 0


def _episode_out(out: str, episode) -> Path:
    from ..data import episode_filename

    path = Path(out)
    return path / episode_filename(episode) if path.is_dir() or out.endswith(("/", "\\")) else path


def _print_episode(episode, path: Path) -> None:
    shots = episode.shots_per_class()
    shot_text = str(shots[0]) if len(set(shots)) == 1 else f"{min(shots)}..{max(shots)}"
    print(
        f"wrote {path}: {episode.dataset}, {episode.num_classes} classes ({episode.subsample}), "
        f"{len(episode.train)} support images ({shot_text} per class), {len(episode.val)} val images "
        f"({episode.val_kind}), sampler {episode.sampler}, seed {episode.seed}, split {episode.split_sha256[:12]}"
    )


def cmd_datasets_sample(args: argparse.Namespace) -> int:
    """Draw a K-shot episode and write it as JSON (relative paths, split SHA-256, K, seed, sampler)."""
    from ..data import save_episode

    splits = load_from_args(args)
    episode = episode_from_args(args, splits)
    path = save_episode(episode, _episode_out(args.out, episode))
    _print_episode(episode, path)
    return 0


def cmd_datasets_import_coop(args: argparse.Namespace) -> int:
    """Convert CoOp's split_fewshot/shot_K-seed_S.pkl into an episode JSON."""
    from ..data import import_coop_pickle, save_episode

    splits = load_from_args(args)
    episode = import_coop_pickle(args.pickle, splits, k=args.shots, seed=args.seed)
    path = save_episode(episode, _episode_out(args.out, episode))
    _print_episode(episode, path)
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``datasets {list,check,prompts,sample,import-coop}`` to the main parser's subcommands."""
    ds = subparsers.add_parser("datasets", help="list, check and sample datasets")
    sub = ds.add_subparsers(dest="datasets_command", required=True)

    p = sub.add_parser("list", help="the registered datasets, their folder names and published counts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_datasets_list)

    p = sub.add_parser("check", help="verify a dataset's layout, missing files and counts")
    add_data_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_datasets_check)

    p = sub.add_parser("prompts", help="print the sentences each class gets under --prompts")
    add_data_arguments(p)
    add_prompt_argument(p)
    p.add_argument("--max-sentences", type=int, default=3, help="sentences shown per class (text output)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_datasets_prompts)

    p = sub.add_parser("sample", help="draw a K-shot episode and save it as JSON")
    add_data_arguments(p)
    add_episode_arguments(p)
    p.add_argument("--out", required=True, help="episode file, or a folder (the file is named by its key)")
    p.set_defaults(func=cmd_datasets_sample)

    p = sub.add_parser("import-coop", help="turn CoOp's split_fewshot/shot_K-seed_S.pkl into an episode JSON")
    add_data_arguments(p)
    p.add_argument("pickle", help="the .pkl file")
    p.add_argument("--shots", type=int, help="K (default: from the file name)")
    p.add_argument("--seed", type=int, help="seed (default: from the file name)")
    p.add_argument("--out", required=True, help="episode file, or a folder")
    p.set_defaults(func=cmd_datasets_import_coop)
