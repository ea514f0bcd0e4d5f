"""What keying the feature cache by image content costs: hashing 10,000 small JPEGs cold and warm, and a warm
(everything cached) :func:`~fewclip.features.extract.extract` call end to end.

    python benchmarks/bench_hashing.py                                   # 10,000 JPEGs in a temporary folder
    python benchmarks/bench_hashing.py --images 2000 --repeats 3
    python benchmarks/bench_hashing.py --folder /tmp/jpegs --keep        # reuse the images between runs
    PYTHONPATH=/old/checkout/src python benchmarks/bench_hashing.py --folder /tmp/jpegs --keep   # "before"

JPEGs of random sizes (64x64 to 256x256, smooth colour fields plus noise) are written once. Then:

* hash cold: every file's SHA-256 through a new :class:`~fewclip.hashing.HashMemo` (an empty SQLite memo), i.e.
  every byte read and hashed (from the page cache: the files were just written or read);
* hash warm: the same files through a new memo object on the same SQLite file: one ``stat`` per file and a batched
  lookup, no file read;
* warm extract: the cache filled once for the clean view of every image (random features written as the pipeline
  writes them, so no model time is spent), then ``extract(backbone, root, paths, store=FeatureStore(cache))`` with
  a fresh store object each round: the group index rebuilt from the shard headers, every key looked up (the
  content keys through the memo), every row read back. With an older fewclip on ``PYTHONPATH`` (before content
  keys), the rows are keyed by relative path as that version keys them, and only this last figure is measured.

Each figure is the median of ``--repeats`` rounds. Nothing here is asserted.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import inspect  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import fewclip  # noqa: E402
from fewclip.features import extract as extract_module  # noqa: E402
from fewclip.features.store import FeatureStore  # noqa: E402
from fewclip.models import load_backbone  # noqa: E402
from fewclip.models.tiny import save_tiny_openclip  # noqa: E402

CONTENT_KEYS = "hashes" in inspect.signature(extract_module.extract).parameters
SHARD_ROWS = 1024 if CONTENT_KEYS else 4096  # what each version's writer flushes


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        rel = f"class_{i % 100:03d}/img_{i:05d}.jpg"
        path = folder / rel
        paths.append(rel)
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(64, 257, size=2))
        y, x = np.mgrid[0:h, 0:w]
        base = rng.uniform(0, 255, size=3)
        slope = rng.uniform(-1, 1, size=(2, 3))
        pixels = base + y[..., None] * slope[0] + x[..., None] * slope[1] + rng.normal(0, 12, size=(h, w, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return paths


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fill_cache(backbone, root: Path, paths: list[str], cache: Path) -> None:
    """Every image's clean-view row in the cache, keyed as this fewclip version keys it."""
    store = FeatureStore(cache)
    if CONTENT_KEYS:
        spec = extract_module._group_spec(backbone, "clean", 0, "tip_cache")
        hashes = extract_module.content_hashes(root, paths, memo=store.memo)
        keys = list(dict.fromkeys(hashes[p] for p in paths))
    else:
        spec = extract_module._group_spec(backbone, "clean", 0, "tip_cache", f"root:{root.resolve()}", None)
        keys = paths
    group = store.group(spec)
    g = torch.Generator().manual_seed(0)
    for s in range(0, len(keys), SHARD_ROWS):
        chunk = keys[s : s + SHARD_ROWS]
        group.put(chunk, torch.randn(len(chunk), backbone.embed_dim, generator=g))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", help="where the JPEGs are (written if missing); default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep --folder's JPEGs afterwards")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fewclip-bench-hashing-"))
    folder = Path(args.folder) if args.folder else tmp / "images"
    try:
        t0 = time.perf_counter()
        paths = write_jpegs(folder, args.images)
        size = sum((folder / p).stat().st_size for p in paths)
        print(f"fewclip {fewclip.__version__} from {Path(fewclip.__file__).parent}")
        print(f"{len(paths)} JPEGs, {size / 2**20:.1f} MiB, in {folder} (ready in {time.perf_counter() - t0:.1f} s)")
        print(f"cache keyed by {'image content (SHA-256)' if CONTENT_KEYS else 'relative path'}")
        rows = []
        if CONTENT_KEYS:
            from fewclip.hashing import HashMemo

            absolute = [folder / p for p in paths]
            cold, warm = [], []
            for r in range(args.repeats):
                memo_file = tmp / f"memo-{r}.sqlite3"
                cold.append(timed(lambda: HashMemo(memo_file).sha256_many(absolute)))  # noqa: B023
                warm.append(timed(lambda: HashMemo(memo_file).sha256_many(absolute)))  # noqa: B023
            rows += [("hash cold (no memo)", cold), ("hash warm (memo hit, stat only)", warm)]

        saved = save_tiny_openclip(tmp / "model", "vit", name="fewclip-bench-hashing-vit", seed=0)
        backbone = load_backbone(saved.config_name, str(saved.weights))
        cache = tmp / "cache"
        fill_cache(backbone, folder, paths, cache)
        check = extract_module.extract(backbone, folder, paths, store=FeatureStore(cache), progress=False)
        assert check.encoded == 0, "the cache was not filled as extract keys it"
        warm_run = [
            timed(lambda: extract_module.extract(backbone, folder, paths, store=FeatureStore(cache), progress=False))
            for _ in range(args.repeats)
        ]
        rows.append(("warm extract, all cached", warm_run))

        print(f"\n{'measure':<34} {'median s':>9} {'min s':>8} {'µs/image':>9}")
        for name, values in rows:
            med = statistics.median(values)
            print(f"{name:<34} {med:>9.3f} {min(values):>8.3f} {1e6 * med / len(paths):>9.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if args.folder and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
