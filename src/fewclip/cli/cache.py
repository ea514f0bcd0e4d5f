"""``fewclip cache info``: what the feature cache holds and how much disk it uses."""

from __future__ import annotations

import argparse
import json
from typing import Any


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def add_cache_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="feature cache folder (default: $FEWCLIP_CACHE or ~/.cache/fewclip)",
    )


def add_parsers(subparsers: Any) -> None:
    """Register ``fewclip cache ...`` on the sub-parsers object of the main parser."""
    cache = subparsers.add_parser("cache", help="inspect the on-disk feature cache")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    info = csub.add_parser("info", help="size, rows and shards of each cached feature group")
    add_cache_dir_argument(info)
    info.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    info.set_defaults(func=cmd_cache_info)


def cmd_cache_info(args: argparse.Namespace) -> int:
    from ..features.store import FeatureStore
    from ..protocols.report import text_table

    store = FeatureStore(args.cache_dir)
    info = store.info()
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"cache dir   {info['root']}")
    if not store.root.exists():
        print("(does not exist yet: nothing cached)")
        return 0
    groups = info["groups"]
    images = [g for g in groups if g["kind"] == "image"]
    texts = [g for g in groups if g["kind"] == "text"]
    print(
        f"features    {info['feature_rows']} rows in {len(groups)} groups ({len(images)} image views, "
        f"{len(texts)} text), {_size(info['feature_bytes'])}"
    )
    print(f"checkpoints {info['checkpoints']} converted file(s), {_size(info['checkpoint_bytes'])}")
    if info["stale_temp_bytes"]:
        print(f"stale temp  {_size(info['stale_temp_bytes'])} left by interrupted writes (safe to delete *.tmp)")
    print(f"total       {_size(info['total_bytes'])}")
    if groups:
        header = ("group", "kind", "model", "weights", "view", "rows", "shards", "size")
        rows = [
            (
                g["id"][:12],
                str(g["kind"]),
                str(g["model"]),
                str(g["weights"]),
                str(g["view"] if g["view"] is not None else "-"),
                str(g["rows"]),
                str(g["shards"])
                + (f" ({g['unreadable_shards']} unreadable)" if g["unreadable_shards"] else "")
                + (f" ({g['quarantined_shards']} set aside)" if g["quarantined_shards"] else ""),
                _size(g["bytes"]),
            )
            for g in groups
        ]
        print()
        print(text_table(header, rows))
    return 0
