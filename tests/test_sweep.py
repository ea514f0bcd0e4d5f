"""`fewclip sweep`: the grid from options and TOML, resuming after a kill, failures recorded, the dry run, and the
same results files from serial, `--jobs 2`, Ray local and a torchrun extraction."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from conftest import make_pets
from fewclip.cli.main import main
from fewclip.data.generate import make_folder_dataset
from fewclip.errors import ResultsError
from fewclip.models import BackboneSpec
from fewclip.models.tiny import save_tiny_openclip
from fewclip.protocols import runner
from fewclip.protocols.results import read_predictions, read_result
from fewclip.protocols.sweep import (
    Distributed,
    SweepConfig,
    load_sweep,
    run_cells,
    shard_of,
    sweep,
    task_device,
    task_groups,
    worker_context,
)

SRC = Path(__file__).resolve().parents[1] / "src"
BB = "local-dir-model"


@pytest.fixture(autouse=True)
def one_thread():
    """The grids' tensors are tiny: one thread each (on a loaded machine, two threads make a small softmax 1000x
    slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    tiny = save_tiny_openclip(root / "model", "vit", name="fewclip-test-sweep-vit", seed=0)
    other = save_tiny_openclip(root / "model2", "vit", name="fewclip-test-sweep-vit", seed=1)
    data_root = make_pets(root / "data", train=4, val=2, test=3)
    birds = make_folder_dataset(root / "birds", ["crow", "robin"], {"train": 3, "val": 2, "test": 3}, size=32)
    return SimpleNamespace(
        root=root,
        data_root=data_root,
        birds=birds,
        model=f"local-dir:{tiny.folder}",
        model2=f"local-dir:{other.folder}",
    )


def grid(env, tmp_path, methods=("zero-shot", "tip-adapter"), *, datasets=None, backbones=None, **protocol):
    return SweepConfig.from_dict(
        {
            "data": {"data_root": str(env.data_root), "datasets": datasets or ["oxford_pets"]},
            "backbones": backbones or [{"model": env.model}],
            "methods": {"names": list(methods)},
            "protocol": {"shots": [1, 2], "seeds": [1, 2], **protocol},
            "extraction": {"views": 2, "progress": False},
            "cache_dir": str(tmp_path / "cache"),
        }
    )


def argv(env, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "sweep", "--dataset", "oxford_pets", "--data-root", str(env.data_root), "--model", env.model, "--views", "2",
        "--cache-dir", str(cache), "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def results_of(out: Path) -> dict[str, dict]:
    """{relative path: what decides a result}: accuracies, choices, setup fingerprint, predictions; not times, hosts
    or run ids."""
    found = {}
    for path in sorted(out.rglob("shots_*-seed_*.json")):
        r = read_result(path)
        predictions, labels, names = read_predictions(path)
        found[str(path.relative_to(out))] = {
            "accuracy": r["accuracy"],
            "selected": r["selected"],
            "hyperparameters": r["hyperparameters"],
            "config_sha256": r["config_sha256"],
            "episode": r["episode"],
            "predictions": predictions.tolist(),
            "labels": labels.tolist(),
            "names": names,
        }
    return found


def cache_rows(cache: Path) -> dict[tuple[str, str], bytes]:
    """Every cached row's bytes, keyed by (group, image content hash or prompt)."""
    rows = {}
    for shard in (cache / "features").glob("*/*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            keys = json.loads(f.metadata()["keys"])
            data = f.get_tensor("features")
        for key, row in zip(keys, data):
            rows[shard.parent.name, key] = row.numpy().tobytes()
    return rows


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- the grid


def test_toml_grid_expands_datasets_and_backbones(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(
        """
cache_dir = "/tmp/c"
[data]
data_root = "/data"
prompts = "single"
datasets = ["caltech101", { dataset = "folder", path = "/data/birds", kind_options = { split_seed = 2 } }]

[[backbones]]
model = "RN50"
pretrained = "openai"

[[backbones]]
model = "ViT-B-16"
pretrained = "openai"
precision = "fp16"

[methods]
names = ["zero-shot", "ape"]
preset = "paper"
overrides = { ape = { search_step = [10, 5, 5] } }

[protocol]
shots = [1, 16]
seeds = [1, 2, 3]
""",
        encoding="utf-8",
    )
    g = load_sweep(path)
    assert [(r.data.dataset, r.backbone.model) for r in g.runs] == [
        ("caltech101", "RN50"), ("folder", "RN50"), ("caltech101", "ViT-B-16"), ("folder", "ViT-B-16"),
    ]  # fmt: skip
    folder = g.runs[1]
    assert folder.data.path == "/data/birds" and folder.data.data_root == "/data" and folder.data.prompts == "single"
    assert dict(folder.data.kind_options) == {"split_seed": 2} and g.runs[0].data.kind_options == {}
    assert g.runs[2].backbone.precision == "fp16" and g.runs[0].backbone.precision == "fp32"
    assert g.runs[0].backbone.cache_dir == "/tmp/c" and g.runs[3].cache_dir == "/tmp/c"
    assert g.methods.overrides == {"ape": {"search_step": [10, 5, 5]}} and g.methods.preset == "paper"
    assert g.size() == 4 * 2 * 2 * 3
    # options laid over the file: the datasets replaced, the file's other keys kept
    g2 = load_sweep(path, {"data": {"datasets": ["dtd"]}, "protocol": {"seeds": [7]}})
    assert [r.data.dataset for r in g2.runs] == ["dtd", "dtd"] and g2.protocol.seeds == [7]
    assert g2.protocol.shots == [1, 16] and g2.runs[0].data.data_root == "/data"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[data]\ndatasets = []\n[backbone]\nmodel = 'RN50'\n", "must list at least one dataset"),
        ("[data]\ndatasets = [3]\n[backbone]\nmodel = 'RN50'\n", "datasets entry 1 is 3"),
        ("[data]\ndatasets = ['dtd']\n", "no backbone"),
        ("[data]\ndatasets = ['dtd']\n[backbone]\nmodel='a'\n[[backbones]]\nmodel='b'\n", "not both"),
        ("[data]\ndatasets = ['dtd']\n[backbone]\nmodel = 'RN50'\n[grid]\nx = 1\n", "unknown section(s) ['grid']"),
        ("[data]\ndatasets = ['dtd']\n[backbone]\nmodel = 'RN50'\ncolour = 1\n", "unknown key(s) ['colour']"),
        ("[data]\ndatasets = ['dtd']\n[backbone]\nmodel = 'RN50'\n[protocol]\nshot = [1]\n", "valid: name, shots"),
        ("[data]\ndatasets = ['dtd', 'DTD']\n[backbone]\nmodel = 'RN50'\n", "two entries write to the results folder"),
        ("[data]\ndataset = 'dtd'\ndatasets = ['dtd']\n[backbone]\nmodel = 'RN50'\n", "both dataset and datasets"),
        ("[data\ndatasets = ['dtd']\n", "not a valid TOML file"),
    ],
)
def test_toml_grid_errors_name_the_file_and_the_fix(tmp_path, text, message):
    path = tmp_path / "grid.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ResultsError) as info:
        load_sweep(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_options_build_the_grid_and_bad_options_are_usage_errors(env, tmp_path, capsys):
    assert main(["sweep", "--dataset", "oxford_pets", "--method", "zero-shot", "--out", str(tmp_path)]) == 2
    assert "--model required" in capsys.readouterr().err
    bad = ["sweep", "--dataset", "a", "--model", "m1", "m2", "--pretrained", "x", "y", "z", "--method", "zero-shot"]
    assert main(bad) == 2 and "one per model (2), not 3" in capsys.readouterr().err
    unknown = argv(env, tmp_path / "o", tmp_path / "c", "--method", "no-such-method")
    assert main(unknown) == 2 and "no-such-method" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_task_groups_keep_one_fit_per_method_shots_seed():
    cells = [runner.Cell("ape", 1, 1, t) for t in ("a", "b")] + [runner.Cell("gda", 1, 1, None)]
    assert task_groups(cells) == [cells[:2], cells[2:]]


def test_shards_split_images_by_content_hash():
    assert shard_of("00000000000f" + "0" * 52, 2) == 1 and shard_of("00000000000f" + "f" * 52, 4) == 3
    assert shard_of("000000000010" + "f" * 52, 2) == 0  # the first 12 hex digits decide
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(400)]
    counts = [sum(shard_of(h, 3) == r for h in hashes) for r in range(3)]
    assert sum(counts) == 400 and min(counts) > 100  # every rank gets a fair share


# --------------------------------------------------------------------------- running


def test_sweep_encodes_once_per_backbone_records_a_failing_cell_and_resumes(env, tmp_path, monkeypatch):
    loads = []
    real_load = BackboneSpec.load
    monkeypatch.setattr(BackboneSpec, "load", lambda self: loads.append(self.model) or real_load(self))
    real_fit = runner.fit_and_score

    def fit_or_fail(plan, cell, *args, **kwargs):
        if (cell.method, cell.shots, cell.seed, plan.splits.name, plan.backbone) == (
            "tip-adapter",
            2,
            1,
            "oxford_pets",
            BB,
        ):
            raise RuntimeError("this cell fails on purpose")
        return real_fit(plan, cell, *args, **kwargs)

    monkeypatch.setattr(runner, "fit_and_score", fit_or_fail)
    datasets = ["oxford_pets", {"dataset": "folder", "path": str(env.birds)}]
    backbones = [{"model": env.model}, {"model": env.model2}]
    g = grid(env, tmp_path, datasets=datasets, backbones=backbones)
    out = tmp_path / "out"
    report = sweep(g, out, log=lambda m: None)
    # extraction first: each backbone loaded once for both datasets (and not again to fit)
    assert loads == [env.model, env.model2]
    assert (report.total, report.passed, report.failed, report.skipped) == (32, 31, 1, 0)
    assert report.exit_status == 1 and "31 passed, 1 failed, 0 skipped" in report.last_lines()
    failed = out / "oxford_pets" / BB / "fewshot" / "tip-adapter" / "shots_2-seed_1.json"
    record = read_result(failed)
    assert record["status"] == "failed" and record["error"]["message"] == "this cell fails on purpose"
    assert any("RuntimeError" in line for line in record["error"]["traceback"])
    assert str(failed) in report.last_lines()
    # every unit's folder is what fewclip run writes, with its summary
    for dataset, backbone in [("oxford_pets", BB), ("folder", BB), ("folder", "local-dir-model2")]:
        summary = json.loads((out / dataset / backbone / "fewshot" / "summary.json").read_text())
        assert summary["format"] == "fewclip-summary/1" and summary["dataset"] == dataset
    assert len(json.loads((out / "oxford_pets" / BB / "fewshot" / "summary.json").read_text())["results"]) == 7
    # each image encoded once per backbone: a second sweep over the same cache encodes nothing
    monkeypatch.setattr(runner, "fit_and_score", real_fit)
    again = sweep(g, out, log=lambda m: None)
    assert (again.passed, again.failed, again.skipped, again.encoded) == (1, 0, 31, 0)
    assert read_result(failed)["status"] == "ok" and again.exit_status == 0


def test_save_models_on_a_finished_grid_runs_again_the_cells_without_a_classifier_file(env, tmp_path):
    g = grid(env, tmp_path, ("zero-shot",), shots=[1], seeds=[1, 2])
    out = tmp_path / "out"
    assert sweep(g, out, log=lambda m: None).passed == 2
    paths = sorted(out.rglob("shots_1-seed_*.json"))
    assert len(paths) == 2 and not any("classifier_file" in read_result(p) for p in paths)
    shown: list[str] = []
    sweep(g, out, dry_run=True, save_models=True, log=lambda m: None, out=shown.append)
    assert sum("no classifier file: run again (--save-models)" in line for line in shown) == 2
    again = sweep(g, out, save_models=True, log=lambda m: None)
    assert (again.passed, again.skipped) == (2, 0)
    for path in paths:
        assert runner.has_classifier(path, read_result(path))
    # with the files there, a third --save-models sweep has nothing to do; fewclip run decides the same way
    assert (sweep(g, out, save_models=True, log=lambda m: None).skipped, len(runner.partition(runner.plan(
        g.runs[0], out), save_models=True)[0])) == (2, 0)  # fmt: skip
    path = paths[0]
    path.with_name(read_result(path)["classifier_file"]).unlink()
    assert runner.partition(runner.plan(g.runs[0], out), save_models=True)[0] == [runner.Cell("zero-shot", 1, 1)]
    assert runner.partition(runner.plan(g.runs[0], out))[0] == []  # without --save-models: finished


def test_a_unit_that_cannot_be_planned_is_reported_and_the_rest_runs(env, tmp_path, capsys):
    g = grid(env, tmp_path, ("zero-shot",), datasets=["oxford_pets", "dtd"])
    report = sweep(g, tmp_path / "out", log=print)
    assert report.passed == 4 and report.failed == 4 and report.exit_status == 1
    assert report.failures[0][0] == "dtd/local-dir-model" and "DataError" in report.failures[0][1]


def test_dry_run_prints_cells_cache_and_what_would_be_encoded(env, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main([*argv(env, out, cache, "--method", "zero-shot", "--shots", "1", "--seeds", "1"), "--dry-run"]) == 0
    shown = capsys.readouterr().out
    assert "oxford_pets/local-dir-model (fewshot): 1 cell(s), 0 done, 1 to run" in shown
    assert "zero-shot          1-shot seed 1: to run" in shown
    # 3 support images x (2 views + clean), 3 val + 9 test images clean
    assert "feature cache: 0 image view(s) cached, 21 to encode" in shown and not out.exists()
    assert main(argv(env, out, cache, "--method", "zero-shot", "--shots", "1", "--seeds", "1")) == 0
    assert "21 image view(s) encoded, 0 from the cache" in capsys.readouterr().out  # what the dry run said
    assert (
        main([*argv(env, out, cache, "--method", "zero-shot", "gda", "--shots", "1", "--seeds", "1"), "--dry-run"]) == 0
    )
    shown = capsys.readouterr().out
    assert "zero-shot          1-shot seed 1: done" in shown and "gda                1-shot seed 1: to run" in shown
    assert "feature cache: 21 image view(s) cached, 0 to encode" in shown
    assert "dry run: 1 cell(s) to run of 2" in shown


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_cells(env, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    command = [sys.executable, "-m", "fewclip", *argv(env, out, cache), "--method", "zero-shot", "clip-adapter",
               "--set", "clip-adapter:epochs=100", "--shots", "1", "2", "--seeds", "1", "2", "3"]  # fmt: skip
    proc = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    folder = out / "oxford_pets" / BB / "fewshot"
    deadline = time.monotonic() + 120
    while len(list(folder.glob("*/shots_*.json"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: read_result(p)["run_id"] for p in folder.glob("*/shots_*.json") if read_result(p)}
    assert 3 <= len(finished) < 12, "the sweep finished before it was killed: make its cells slower"
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{12 - len(finished)} passed, 0 failed, {len(finished)} skipped" in done.stdout
    assert {p: read_result(p)["run_id"] for p in finished} == finished  # not redone
    assert len(list(folder.glob("*/shots_*.json"))) == 12


METHODS = ("zero-shot", "tip-adapter", "gda")


@pytest.fixture(scope="module")
def serial(env, tmp_path_factory):
    """The serial sweep the parallel ones must reproduce: (report, results, its folder)."""
    tmp = tmp_path_factory.mktemp("serial")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    report = sweep(grid(env, tmp, METHODS), tmp / "out", log=lambda m: None)
    torch.set_num_threads(threads)
    return report, results_of(tmp / "out"), tmp


@pytest.mark.slow
def test_jobs_2_gives_the_serial_results(env, serial, tmp_path):
    g = grid(env, serial[2], METHODS)  # the serial sweep's warm cache
    parallel = sweep(g, tmp_path / "jobs2", jobs=2, log=lambda m: None)
    assert serial[0].passed == parallel.passed == 12 and parallel.failed == 0 and parallel.encoded == 0
    assert results_of(tmp_path / "jobs2") == serial[1]


@pytest.mark.slow
def test_jobs_a_dead_worker_costs_only_the_group_that_kills_it_twice(env, serial, tmp_path, monkeypatch):
    # in the spawned workers: gda 2-shot seed 1 kills its process every time; tip-adapter 1-shot seed 2 only once
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "from pathlib import Path\n"
        "from fewclip.protocols import sweep\n"
        "real = sweep.run_cells\n"
        "def run_cells(config, out_dir, cells, save_models=False):\n"
        "    c = cells[0]\n"
        "    once = Path(os.environ['FEWCLIP_TEST_ONCE'])\n"
        "    if (c.method, c.shots, c.seed) == ('gda', 2, 1):\n"
        "        os._exit(1)\n"
        "    if (c.method, c.shots, c.seed) == ('tip-adapter', 1, 2) and not once.exists():\n"
        "        once.touch()\n"
        "        os._exit(1)\n"
        "    return real(config, out_dir, cells, save_models)\n"
        "sweep.run_cells = run_cells\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), str(SRC), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FEWCLIP_TEST_ONCE", str(tmp_path / "once"))
    lines: list[str] = []
    report = sweep(grid(env, serial[2], METHODS), tmp_path / "out", jobs=2, log=lines.append)
    assert (report.passed, report.failed) == (11, 1) and (tmp_path / "once").exists()
    assert any("a fitting worker died" in line for line in lines)
    failed = tmp_path / "out" / "oxford_pets" / BB / "fewshot" / "gda" / "shots_2-seed_1.json"
    record = read_result(failed)
    assert record["status"] == "failed" and "died twice" in record["error"]["message"]
    failed.unlink()
    ours = results_of(tmp_path / "out")
    assert ours == {k: v for k, v in serial[1].items() if k in ours} and len(ours) == 11


@pytest.mark.slow
def test_ray_local_gives_the_serial_results(env, serial, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    # a cold cache for Ray: its extraction task encodes, its fitting tasks read what it wrote
    g_ray = grid(env, tmp_path, METHODS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = sweep(g_ray, tmp_path / "ray", ray="local", log=lambda m: None)
    finally:
        ray.shutdown()
    assert remote.passed == 12 and remote.failed == 0 and remote.encoded == serial[0].encoded > 0
    assert results_of(tmp_path / "ray") == serial[1]


@pytest.mark.slow
def test_torchrun_extraction_gives_the_single_process_cache(env, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    args = ["--method", "zero-shot", "--shots", "1", "2", "--seeds", "1", "2"]
    assert main([*argv(env, single / "out", single / "cache"), *args]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fewclip", *argv(env, multi / "out", multi / "cache"), *args]  # fmt: skip
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed, 0 failed" in done.stdout and "sweep rank 1: encoded" in done.stdout
    one, two = cache_rows(single / "cache"), cache_rows(multi / "cache")
    assert one.keys() == two.keys() and len(one) > 20
    assert [k for k in one if one[k] != two[k]] == []
    assert results_of(multi / "out") == results_of(single / "out")
    # both ranks encoded a share: rank 1 says how much, rank 0 read it from the cache
    assert int(done.stdout.split("rank 1: encoded ")[1].split()[0]) > 0


def test_a_fitting_worker_without_a_gpu_fits_on_the_cpu_from_a_warm_cache(env, serial, monkeypatch):
    # the grid names --device cuda; this task has no GPU (none on this machine, or Ray reserved none for it)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = grid(env, serial[2], METHODS).runs[0]
    config = replace(config, backbone=replace(config.backbone, device="cuda"))
    out = str(serial[2] / "out")
    cells = [c for c in runner.plan(config, out).cells if c.method == "tip-adapter" and c.shots == 2]
    outcomes, encoded = run_cells(config, out, cells)
    assert [o.error for o in outcomes] == [None] * len(cells) and len(cells) == 2 and encoded == 0
    assert str(worker_context(config, out)[2].backbone.device) == "cpu"


def test_an_image_method_in_a_worker_without_a_gpu_trains_and_scores_on_the_cpu(env, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    g = SweepConfig.from_dict(
        {
            "data": {"data_root": str(env.data_root), "datasets": ["oxford_pets"]},
            "backbones": [{"model": env.model, "device": "cuda"}],
            "methods": {"names": ["clip-ft"], "overrides": {"clip-ft": {"epochs": 1, "scope": "last"}}},
            "protocol": {"shots": [1], "seeds": [1]},
            "extraction": {"views": 1, "progress": False},
            "cache_dir": str(tmp_path / "cache"),
        }
    )
    config, out = g.runs[0], str(tmp_path / "out")
    assert config.backbone.device == "cuda"
    outcomes, _ = run_cells(config, out, runner.plan(config, out).cells, save_models=True)
    assert [o.error for o in outcomes] == [None] and outcomes[0].classifier


def test_task_device_is_the_gpu_the_task_was_given_or_the_cpu(monkeypatch):
    cuda3 = BackboneSpec("RN50", device="cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert task_device(cuda3).device == "cpu" and task_device(BackboneSpec("RN50")).device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert task_device(cuda3).device == "cuda:3"  # --jobs workers, torchrun ranks: the device named
    gpus: list = []
    context = SimpleNamespace(get_task_id=lambda: "task")
    fake = SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: context, get_gpu_ids=lambda: gpus)
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert task_device(cuda3).device == "cpu"  # a Ray task that reserved no GPU
    gpus.append(3)
    assert task_device(cuda3).device == "cuda"  # Ray exposes its one GPU as cuda (cuda:0)


@pytest.mark.slow
def test_torchrun_a_backbone_failing_on_one_rank_is_reported_by_all_not_a_hang(env, tmp_path):
    # rank 1 cannot load the backbone (a sitecustomize breaks BackboneSpec.load there); rank 0 can
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    from fewclip.errors import BackboneError\n"
        "    from fewclip.models import BackboneSpec\n"
        "    def load(self):\n"
        "        raise BackboneError('rank 1 cannot load it, on purpose')\n"
        "    BackboneSpec.load = load\n"
    )
    environ = subprocess_env()
    environ["PYTHONPATH"] = os.pathsep.join([str(hook), environ["PYTHONPATH"]])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "fewclip", *argv(env, tmp_path / "out", tmp_path / "cache"), "--method", "zero-shot", "--shots", "1",
               "--seeds", "1"]  # fmt: skip
    done = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=240)
    text = done.stdout + done.stderr
    assert "rank 1 cannot load it, on purpose" in text  # rank 1 says why
    assert "cannot be loaded on another rank" in text  # rank 0 says it skipped the backbone with rank 1
    assert "0 passed, 1 failed" in text and done.returncode != 0  # rank 0 reports it (rank 1 exits 0)
    assert "sweep rank 1: encoded 0" in done.stdout


def test_ray_missing_is_a_clear_error(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main([*argv(env, tmp_path / "o", tmp_path / "c", "--method", "zero-shot"), "--ray", "local"]) == 2
    assert "pip install 'fewclip[ray]'" in capsys.readouterr().err


def test_torchrun_environment_and_devices():
    assert Distributed.from_env({}) is None and Distributed.from_env({"WORLD_SIZE": "1"}) is None
    d = Distributed.from_env({"WORLD_SIZE": "4", "RANK": "5", "LOCAL_RANK": "1"})
    assert (d.rank, d.world, d.local_rank) == (5, 4, 1)
    assert d.device(BackboneSpec("RN50", device="cuda")).device == "cuda:1"
    assert d.device(BackboneSpec("RN50", device="cpu")).device == "cpu"
