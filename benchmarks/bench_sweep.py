"""The sweep machinery alone, on cached features: cells per second and the overhead per cell beyond the fit.

    python benchmarks/bench_sweep.py                         # 11 datasets x 8 methods x 5 shots x 3 seeds = 1,320
    python benchmarks/bench_sweep.py --datasets 3 --shots 1 2 --seeds 1 --modes serial jobs2
    python benchmarks/bench_sweep.py --device cuda           # the same grid with the backbone on a GPU

Eleven tiny generated datasets (the nine CoOp split-file ones, FGVC-Aircraft's lists, one ``folder`` dataset; 5
classes, 16 training, 4 validation and 10 test images per class, 32 px) and a tiny random open_clip model. A warm-up
sweep fills the feature cache (not timed); then each mode runs the whole grid into a fresh results folder from that
warm cache, with the feature methods' fast test settings:

- ``serial``: one process (``fewclip sweep``);
- ``jobs2``: ``--jobs 2`` (two spawned worker processes);
- ``ray``: Ray local with 2 CPUs (``--ray local --jobs 2``); ``ray.init`` is timed apart.

"fit s" is the sum over cells of the fit and predict seconds the results record (the work a cell cannot avoid);
"overhead ms/cell" is (wall seconds × processes − fit s) / cells: everything else a cell costs (planning, the
extraction stage's cache reads, rebuilding a unit in a worker, building the episode bundle, the result record, the
atomic writes of the result and its predictions, progress, scheduling), averaged over the grid, workers' start-up
included; "(fit stage)" is the same over the fitting stage alone (the sweep after planning and extraction). Torch
runs one thread per process (the tensors are tiny; on a loaded machine two threads make a small softmax 1000x
slower). Nothing here is asserted; the machine's load average is printed with the figures, since it is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fewclip.data.generate import make_folder_dataset, write_images  # noqa: E402
from fewclip.data.registry import dataset_info  # noqa: E402
from fewclip.models.tiny import save_tiny_openclip  # noqa: E402
from fewclip.protocols.sweep import SweepConfig, ray_connect, sweep  # noqa: E402

SPLIT_JSON = ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "sun397", "dtd", "eurosat",
              "ucf101"]  # fmt: skip
DATASETS = [*SPLIT_JSON, "fgvc_aircraft", "folder"]
METHODS = ["zero-shot", "tip-adapter", "tip-adapter-f", "ape", "ape-t", "gda", "linear-probe", "clip-adapter"]
#: the contract suite's fast settings (tests/conftest.py FAST; APE's channels within the tiny model's D = 16)
FAST = {
    "tip-adapter": {"search_step": [12, 6]},
    "ape": {"search_step": [12, 6, 4], "channels": 8},
    "tip-adapter-f": {"search_step": [12, 6], "epochs": 4, "batch_size": 32},
    "ape-t": {"search_step": [12, 6], "channels": 8, "epochs": 4, "batch_size": 32},
    "clip-adapter": {"epochs": 4, "batch_size": 32},
    "linear-probe": {"max_iter": 50},
}
COUNTS = {"train": 16, "val": 4, "test": 10}
CLASSES = [f"class{i}" for i in range(5)]


def make_dataset(root: Path, key: str, seed: int) -> dict:
    """A tiny dataset of ``key``'s layout under ``root``; returns its sweep entry."""
    if key == "folder":
        make_folder_dataset(root / "folder", CLASSES, COUNTS, size=32, seed=seed)
        return {"dataset": "folder", "path": str(root / "folder")}
    info = dataset_info(key)
    folder = root / info.folders[0].name
    if key == "fgvc_aircraft":
        (folder / "variants.txt").parent.mkdir(parents=True, exist_ok=True)
        (folder / "variants.txt").write_text("\n".join(CLASSES) + "\n")
        items = []
        for split, n in COUNTS.items():
            rows = [(f"{split}{y}{i:03d}", y) for y in range(len(CLASSES)) for i in range(n)]
            (folder / f"images_variant_{split}.txt").write_text("".join(f"{r} {CLASSES[y]}\n" for r, y in rows))
            items += [(f"{r}.jpg", y) for r, y in rows]
        write_images(folder / info.image_root, items, len(CLASSES), size=32, seed=seed)
        return {"dataset": key}
    split = {
        s: [[f"{CLASSES[y]}/{s}_{i:03d}.jpg", y, CLASSES[y]] for y in range(len(CLASSES)) for i in range(n)]
        for s, n in COUNTS.items()
    }
    items = [(p, y) for rows in split.values() for p, y, _ in rows]
    write_images(folder / info.image_root, items, len(CLASSES), size=32, seed=seed)
    (folder / info.split_file).write_text(json.dumps(split))
    return {"dataset": key}


def grid(args, root: Path, entries: list[dict], model: str, methods: list[str]) -> SweepConfig:
    return SweepConfig.from_dict(
        {
            "data": {"data_root": str(root / "data"), "datasets": entries},
            "backbone": {"model": model, "device": args.device},
            "methods": {"names": methods, "overrides": {m: FAST[m] for m in methods if m in FAST}},
            "protocol": {"shots": args.shots, "seeds": args.seeds},
            "extraction": {"views": args.views, "progress": False},
            "cache_dir": str(root / "cache"),
        }
    )


def fit_seconds(out: Path) -> float:
    total = 0.0
    for path in out.rglob("shots_*-seed_*.json"):
        r = json.loads(path.read_text())
        if r.get("status") == "ok":
            total += r["seconds"]["fit"] + r["seconds"]["predict"]
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", type=int, default=11, help="how many of the 11 datasets (default all)")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--views", type=int, default=2, help="augmented views per support image (default 2)")
    p.add_argument("--modes", nargs="+", default=["serial", "jobs2", "ray"], choices=["serial", "jobs2", "ray"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", help="keep the data, cache and results in this folder")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench_sweep_"))
    src = Path(__file__).resolve().parents[1] / "src"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])
    quiet = lambda m: None  # noqa: E731
    t0 = time.perf_counter()
    tiny = save_tiny_openclip(root / "model", "vit", name="fewclip-bench-sweep-vit", seed=0)
    model = f"local-dir:{tiny.folder}"
    entries = [make_dataset(root / "data", key, seed) for seed, key in enumerate(DATASETS[: args.datasets])]
    print(f"data: {len(entries)} dataset(s) generated in {time.perf_counter() - t0:.1f} s under {root}")
    t0 = time.perf_counter()
    warm = sweep(grid(args, root, entries, model, ["zero-shot"]), root / "warmup", log=quiet)
    print(f"warm-up: {warm.encoded} image view(s) encoded in {time.perf_counter() - t0:.1f} s (not timed below)")
    cells = None
    rows = []
    for mode in args.modes:
        out = root / f"out-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        g = grid(args, root, entries, model, args.methods)
        extra = ""
        if mode == "ray":
            t1 = time.perf_counter()
            ray_connect("local", num_cpus=2)
            extra = f"ray.init {time.perf_counter() - t1:.1f} s (not in the figures)"
        load = os.getloadavg()[0]
        t1 = time.perf_counter()
        report = sweep(g, out, jobs=2 if mode == "jobs2" else 1, ray="local" if mode == "ray" else None, log=quiet)
        wall = time.perf_counter() - t1
        if report.failed:
            print(f"{mode}: {report.failed} cell(s) failed: {report.failures[:3]}")
        cells = report.passed + report.failed
        work = fit_seconds(out)
        processes = 1 if mode == "serial" else 2
        overhead = (wall * processes - work) / max(cells, 1) * 1000
        fitting = report.seconds.get("fitting", 0.0)
        stage = (fitting * processes - work) / max(cells, 1) * 1000
        rows.append((mode, cells, wall, cells / wall, work, overhead, stage, report.seconds.get("extraction", 0.0),
                     load, extra))  # fmt: skip
    print(
        f"\ngrid: {args.datasets} dataset(s) x {len(args.methods)} method(s) x {len(args.shots)} shot count(s) x "
        f"{len(args.seeds)} seed(s) = {cells} cells; torch {torch.__version__}, {os.cpu_count()} CPU(s), "
        f"device {args.device}"
    )
    header = f"{'mode':<8}{'cells':>7}{'wall s':>9}{'cells/s':>9}{'fit s':>9}{'overhead ms/cell':>18}"
    print(header + f"{'(fit stage)':>13}{'extract s':>11}{'load avg':>10}  note")
    for mode, n, wall, rate, work, overhead, stage, extract_s, load, extra in rows:
        print(f"{mode:<8}{n:>7}{wall:>9.1f}{rate:>9.2f}{work:>9.1f}{overhead:>18.1f}{stage:>13.1f}{extract_s:>11.1f}"
              f"{load:>10.1f}  {extra}")  # fmt: skip
    if "ray" in args.modes:
        import ray

        ray.shutdown()
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
