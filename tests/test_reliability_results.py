"""Results integrity (issue 13, §2 and the output-folder part of §3): one run at a time in a results folder, a result
and its predictions always from the same run, summaries of one setup, and a results folder that cannot be written
refused up front or, when the disk fills, one line naming the path with nothing half-written.

Generated images in CoOp's layout and a tiny open_clip model, as tests/test_run.py."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fewclip.cli.main import main
from fewclip.data.generate import write_images
from fewclip.errors import OutputError, ResultsError, ResultsLockedError
from fewclip.io import file_sha256
from fewclip.models.tiny import save_tiny_openclip
from fewclip.protocols.results import (
    LOCK_NAME,
    RESULT_FORMAT,
    check_output_folder,
    predictions_path,
    publish_result,
    read_predictions,
    read_result,
    result_confusion,
    results_lock,
    write_predictions,
)
from fewclip.protocols.runner import Cell, summary_cells

SRC = Path(__file__).resolve().parents[1] / "src"
NAMES = ["abyssinian", "beagle", "chihuahua"]
COUNTS = {"train": 4, "val": 2, "test": 3}
BB = "local-dir-model"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """3 pets classes in CoOp's layout, the tiny model, and one feature cache the module's runs share."""
    root = tmp_path_factory.mktemp("reliability-results")
    folder = root / "data" / "oxford_pets"
    split = {
        s: [[f"{NAMES[y]}_{s}_{i}.jpg", y, NAMES[y]] for y in range(len(NAMES)) for i in range(n)]
        for s, n in COUNTS.items()
    }
    write_images(folder / "images", [(p, y) for rows in split.values() for p, y, _ in rows], len(NAMES), size=32)
    (folder / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    tiny = save_tiny_openclip(root / "model", "vit", name="fewclip-test-reliability-results", seed=0)
    return SimpleNamespace(root=root, data_root=root / "data", model=f"local-dir:{tiny.folder}", cache=root / "cache")


def run_argv(env, out: Path, *extra: str, cache: Path | None = None) -> list[str]:
    return [
        "run", "--dataset", "oxford_pets", "--data-root", str(env.data_root), "--model", env.model, "--views", "1",
        "--cache-dir", str(cache or env.cache), "--out", str(out), "--no-progress", "--shots", "1", "--seeds", "1",
        *extra,
    ]  # fmt: skip


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def one_error_line(err: str) -> str:
    """The one line ``fewclip run`` printed for a refused run (no traceback)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("fewclip run: error:")]
    assert len(lines) == 1, err
    return lines[0]


def assert_published_pairs(folder: Path) -> None:
    """Every finished result under ``folder`` names a predictions file that is there and has the recorded SHA-256;
    no predictions file is left that no result names, and no temporary file is left at all."""
    named = set()
    for path in folder.rglob("shots_*-seed_*.json"):
        record = read_result(path)
        assert record is not None, path
        if record["status"] == "ok":
            predictions = path.with_name(record["predictions_file"])
            assert file_sha256(predictions) == record["predictions_sha256"], path
            named.add(predictions)
        else:
            assert "predictions_file" not in record
    assert set(folder.rglob("*.predictions.safetensors")) == named
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- one run at a time


def test_a_second_run_into_a_held_folder_refuses_naming_the_folder_and_the_holder(env, tmp_path, capsys):
    out = tmp_path / "out"
    folder = out / "oxford_pets" / BB / "fewshot"
    cache = tmp_path / "cache"
    with results_lock(folder):
        holder = json.loads((folder / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert main(run_argv(env, out, "--method", "zero-shot", cache=cache)) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{folder} is in use by another fewclip run (pid {os.getpid()} on {socket.gethostname()}, " in line
        assert f"started {holder['started']})" in line and "--wait" in line
        # refused before the skip-or-run decision: no episode drawn, nothing encoded, no result (the plan stage
        # has only hashed the images into the cache's file-hash memo)
        assert not (out / "oxford_pets" / "episodes").exists() and not (cache / "features").exists()
        assert not list(folder.rglob("*.json"))
    assert (folder / LOCK_NAME).read_text() == ""  # the holder's text goes with the lock
    assert main(run_argv(env, out, "--method", "zero-shot", cache=cache)) == 0  # released: the run goes ahead
    assert read_result(folder / "zero-shot" / "shots_1-seed_1.json")["status"] == "ok"


def test_the_lock_is_released_when_its_holder_raises_and_refuses_while_held(tmp_path):
    folder = tmp_path / "protocol"
    with pytest.raises(RuntimeError, match="boom"):
        with results_lock(folder):
            raise RuntimeError("boom")
    with results_lock(folder):  # free again
        with pytest.raises(ResultsLockedError, match=f"{folder} is in use by another fewclip run"):
            with results_lock(folder):  # another open file description: flock refuses it even in one process
                pass
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()  # a refusal leaves it as it was


HOLDER = """
import sys
from fewclip.protocols.results import results_lock
with results_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.mark.slow
def test_a_killed_holder_leaves_the_folder_free(env, tmp_path, capsys):
    out = tmp_path / "out"
    folder = out / "oxford_pets" / BB / "fewshot"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=subprocess_env(),
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(run_argv(env, out, "--method", "zero-shot")) == 2
        assert f"(pid {holder.pid} on {socket.gethostname()}" in one_error_line(capsys.readouterr().err)
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel releases the flock
        holder.wait()
    assert main(run_argv(env, out, "--method", "zero-shot")) == 0
    assert "1 result(s) written" in capsys.readouterr().out


@pytest.mark.slow
def test_wait_queues_behind_a_running_run_and_then_reuses_what_it_finished(env, tmp_path):
    """A second `fewclip run --wait` started while the first holds the folder (mid-run, after extraction) waits,
    then reuses every result the first wrote instead of running the cells again."""
    from fewclip.protocols.config import RunConfig
    from fewclip.protocols.runner import run

    out = tmp_path / "out"
    argv = run_argv(env, out, "--method", "zero-shot", "tip-adapter", "--wait")
    second: list[subprocess.Popen] = []
    waiting: list[str] = []

    def log(message: str) -> None:
        if "image view(s) encoded" in message and not second:  # the first run holds the lock and has cells to fit
            proc = subprocess.Popen(
                [sys.executable, "-m", "fewclip", *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=subprocess_env(),
                text=True,
            )
            second.append(proc)

            def read_until_waiting() -> None:
                for line in proc.stdout:  # until the second run says it waits (or ends, failing the test)
                    if "waiting for it to finish" in line:
                        waiting.append(line)
                        return

            reader = threading.Thread(target=read_until_waiting, daemon=True)
            reader.start()
            reader.join(timeout=300)  # a guard against a hang, not a timing assertion
            if not waiting:
                proc.kill()

    config = RunConfig.from_dict(
        {
            "data": {"dataset": "oxford_pets", "data_root": str(env.data_root)},
            "backbone": {"model": env.model},
            "extraction": {"views": 1, "progress": False},
            "methods": {"names": ["zero-shot", "tip-adapter"]},
            "protocol": {"shots": [1], "seeds": [1]},
            "cache_dir": str(env.cache),
        }
    )
    rest = ""
    try:
        report = run(config, out, log=log)
    finally:
        for proc in second:
            rest = proc.communicate()[0]
    folder = out / "oxford_pets" / BB / "fewshot"
    assert waiting and str(folder) in waiting[0] and f"pid {os.getpid()}" in waiting[0]
    assert len(report.written) == 2 and second[0].returncode == 0
    assert "0 result(s) written, 2 reused, 0 failed" in rest
    first = {p: read_result(p)["run_id"] for p in report.written}
    assert all(read_result(p)["run_id"] == run_id for p, run_id in first.items())  # the second wrote none


# --------------------------------------------------------------------------- a result and its predictions


def publish(path: Path, run: int) -> dict:
    """Publish a toy result whose predictions all say class ``run`` (so a reader can tell the runs apart)."""
    record = {"format": RESULT_FORMAT, "status": "ok", "config_sha256": "x"}
    predicted, truth = torch.full((5,), run), torch.arange(5) % 4
    return publish_result(path, record, (predicted, truth, list("abcdefgh")), run_id=f"run{run}")


def test_a_crash_while_publishing_leaves_the_earlier_pair_never_a_mix(tmp_path, monkeypatch):
    path = tmp_path / "gda" / "shots_1-seed_1.json"
    publish(path, 1)
    assert read_predictions(path)[0].tolist() == [1] * 5 and read_result(path)["run_id"] == "run1"

    # the result JSON's rename fails (after the new predictions were written): the old pair stands, the new
    # predictions are removed with the temporary file
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OutputError, match=f"{path}: could not write \\(Input/output error\\)"):
        publish(path, 2)
    monkeypatch.undo()
    assert read_result(path)["run_id"] == "run1" and read_predictions(path)[0].tolist() == [1] * 5
    assert_published_pairs(tmp_path)

    # a kill between the two writes: the new predictions file exists, no result names it; readers still see run 1,
    # and the next publication removes it
    orphan = predictions_path(path, "run3")
    write_predictions(orphan, torch.full((5,), 3), torch.arange(5) % 4)
    assert read_result(path)["run_id"] == "run1" and read_predictions(path)[0].tolist() == [1] * 5
    # a kill after the JSON's rename, before the earlier predictions were removed: readers see the new pair
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)
    publish(path, 4)
    monkeypatch.undo()
    assert predictions_path(path, "run1").is_file()  # left behind by the "kill"
    assert read_result(path)["run_id"] == "run4" and read_predictions(path)[0].tolist() == [4] * 5
    publish(path, 5)
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "shots_1-seed_1.json",
        "shots_1-seed_1.run5.predictions.safetensors",
    ]
    matrix, names = result_confusion(path)  # the confusion matrix comes from run 5's predictions: every row -> 5
    assert names == list("abcdefgh") and matrix[:4, 5].tolist() == [1.0] * 4


def test_predictions_that_are_not_the_results_own_are_refused_naming_both(tmp_path):
    path = tmp_path / "shots_1-seed_1.json"
    record = publish(path, 1)
    predictions = path.with_name(record["predictions_file"])
    write_predictions(predictions, torch.full((5,), 7), torch.arange(5) % 4)  # replaced by another run's file
    with pytest.raises(ResultsError) as caught:
        read_predictions(path)
    message = str(caught.value)
    assert str(predictions) in message and str(path) in message and "SHA-256" in message and "--force" in message
    predictions.unlink()
    with pytest.raises(ResultsError, match="its predictions .* are missing"):
        result_confusion(path)
    path.write_text(json.dumps({**record, "predictions_file": "../elsewhere.predictions.safetensors"}))
    with pytest.raises(ResultsError, match="not a file name beside it"):
        read_predictions(path)


def test_a_failed_result_replacing_a_success_takes_its_predictions_away(tmp_path):
    path = tmp_path / "shots_1-seed_1.json"
    publish(path, 1)
    publish_result(path, {"format": RESULT_FORMAT, "status": "failed", "error": {"type": "MethodError"}})
    assert not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(ResultsError, match="a failed result has no predictions"):
        read_predictions(path)


def test_a_run_publishes_every_result_with_its_own_predictions(env, tmp_path):
    out = tmp_path / "out"
    assert main(run_argv(env, out, "--method", "zero-shot", "tip-adapter")) == 0
    folder = out / "oxford_pets" / BB / "fewshot"
    assert_published_pairs(folder)
    first = read_result(folder / "tip-adapter" / "shots_1-seed_1.json")
    assert main(run_argv(env, out, "--method", "tip-adapter", "--force")) == 0
    again = read_result(folder / "tip-adapter" / "shots_1-seed_1.json")
    assert again["run_id"] != first["run_id"] and again["predictions_file"] != first["predictions_file"]
    assert not (folder / "tip-adapter" / first["predictions_file"]).exists()  # the replaced pair's file is gone
    assert_published_pairs(folder)


# --------------------------------------------------------------------------- summaries


def test_the_summary_holds_only_this_runs_setup(env, tmp_path, capsys):
    out = tmp_path / "out"
    folder = out / "oxford_pets" / BB / "fewshot"
    assert main(run_argv(env, out, "--method", "zero-shot", "tip-adapter")) == 0
    capsys.readouterr()
    # tip-adapter again under another setup (--force replaces its result); zero-shot's result stays in the folder
    assert main(run_argv(env, out, "--method", "tip-adapter", "--set", "search_step=[10,5]", "--force")) == 0
    printed = capsys.readouterr().out
    assert f"{folder / 'summary.json'}: the 1 result(s) of this run's setup; 1 other result file(s) in {folder}" in (
        printed
    )
    summary = json.loads((folder / "summary.json").read_text())
    tip = read_result(folder / "tip-adapter" / "shots_1-seed_1.json")
    assert tip["overrides"] == {"search_step": [10, 5]}
    assert summary["results"] == [{"file": "tip-adapter/shots_1-seed_1.json", "config_sha256": tip["config_sha256"]}]
    assert [(r["method"], r["mean"]) for r in summary["summary"]] == [
        ("tip-adapter", pytest.approx(tip["accuracy"]["test_accuracy"]))
    ]
    assert summary["run_id"] == tip["run_id"]


def test_summary_cells_leave_out_a_result_of_another_setup():
    class FakePlan:
        cells = [Cell("a", 1, 1), Cell("b", 1, 1), Cell("c", 1, 1)]
        setups = {c: {"method": c.method} for c in cells}

    from fewclip.protocols.results import config_sha256

    plan = FakePlan()
    results = {c: {"status": "ok", "config_sha256": config_sha256(plan.setups[c])} for c in plan.cells}
    results[plan.cells[1]] = {"status": "ok", "config_sha256": config_sha256({"method": "b", "other": 1})}
    results[plan.cells[2]] = {**results[plan.cells[2]], "status": "failed"}
    assert summary_cells(plan, results) == [plan.cells[0]]


# --------------------------------------------------------------------------- a results folder that cannot be written


def test_an_out_that_is_a_file_is_refused_before_any_work(env, tmp_path, capsys):
    cache = tmp_path / "cache"
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    assert main(run_argv(env, target, "--method", "zero-shot", cache=cache)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"the results folder (--out) {target} is a file" in line
    assert main(run_argv(env, target / "sub", "--method", "zero-shot", cache=cache)) == 2
    assert f"{target / 'sub'} cannot be created: {target} is a file" in one_error_line(capsys.readouterr().err)
    assert not cache.exists() and target.read_text() == "not a folder"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_an_unwritable_out_is_refused_before_any_work(env, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):  # root (with CAP_DAC_OVERRIDE) writes into any folder
            pytest.skip("this user can write into a read-only folder")
        assert main(run_argv(env, out / "results", "--method", "zero-shot", cache=cache)) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"cannot create a file in {out} (Permission denied)" in line and "another --out" in line
        assert not cache.exists() and not list(out.iterdir())
    finally:
        out.chmod(0o755)


def test_a_read_only_out_is_refused_before_any_work(env, tmp_path, capsys, monkeypatch):
    """As above, for any user (root included): the probe's file creation fails as on a read-only file system."""
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if Path(path).name.startswith(".fewclip-probe-"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OutputError, match=f"cannot create a file in {tmp_path} \\(Read-only file system\\)"):
        check_output_folder(tmp_path / "out")
    cache = tmp_path / "cache"
    assert main(run_argv(env, tmp_path / "out", "--method", "zero-shot", cache=cache)) == 2
    assert "Read-only file system" in one_error_line(capsys.readouterr().err)
    assert not cache.exists() and not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert check_output_folder(tmp_path / "out") == tmp_path / "out" and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "target",
    [
        "episodes/fewshot/",  # an episode file
        ".predictions.safetensors",  # the first cell's predictions
        "tip-adapter/shots_1-seed_1.json",  # the second cell's result, after the first was published
        "summary.json",
    ],
)
def test_a_full_disk_is_one_line_naming_the_path_and_nothing_is_half_written(
    env, tmp_path, capsys, monkeypatch, target
):
    out = tmp_path / "out"
    real_replace = os.replace
    failed: list[str] = []

    def full_disk(src, dst):
        if target in str(dst) and not failed:
            failed.append(str(dst))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    argv = run_argv(env, out, "--method", "zero-shot", "tip-adapter")
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert failed and f"{failed[0]}: could not write (No space left on device); free space" in line
    folder = out / "oxford_pets" / BB / "fewshot"
    assert_published_pairs(out)  # every published result has its predictions; no orphan, no temporary file
    published = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("shots_*.json"))
    assert (
        published
        == {
            "episodes/fewshot/": [],
            ".predictions.safetensors": [],
            "tip-adapter/shots_1-seed_1.json": ["zero-shot/shots_1-seed_1.json"],
            "summary.json": ["tip-adapter/shots_1-seed_1.json", "zero-shot/shots_1-seed_1.json"],
        }[target]
    )
    assert not (folder / "summary.json").exists()
    monkeypatch.undo()
    # space freed: the same command finishes what is missing and reuses what was published
    assert main(argv) == 0
    reused = {"tip-adapter/shots_1-seed_1.json": 1, "summary.json": 2}.get(target, 0)
    assert f"{2 - reused} result(s) written, {reused} reused, 0 failed" in capsys.readouterr().out
    assert_published_pairs(out)
    summary = json.loads((folder / "summary.json").read_text())
    assert [r["file"] for r in summary["results"]] == [f"{m}/shots_1-seed_1.json" for m in ("zero-shot", "tip-adapter")]


def test_results_confusion_refuses_foreign_predictions_and_a_full_disk_in_one_line(tmp_path, capsys, monkeypatch):
    path = tmp_path / "shots_1-seed_1.json"
    record = publish(path, 1)
    cmat = tmp_path / "cmat.safetensors"
    real_replace = os.replace

    def full_disk(src, dst):
        if Path(dst) == cmat:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    assert main(["results", "confusion", str(path), "--out", str(cmat)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"error: {cmat}: could not write (No space left on device)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, record["predictions_file"]]  # no partial file
    monkeypatch.undo()
    write_predictions(path.with_name(record["predictions_file"]), torch.full((5,), 2), torch.arange(5) % 4)
    assert main(["results", "confusion", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"is not the predictions file {path} was written with" in err and record["predictions_file"] in err
