"""Issue 13: nothing stale, nothing lost, nothing silently wrong. Each case of the issue, with what it must do.

- §1–2 the feature cache is keyed by image content (two datasets with the same file names each get their own
  features; an image replaced in place is encoded again), corrupt shards are set aside, a kill loses little and the
  rerun encodes only what is missing; the setup fingerprint holds the weights', images' and prompts' hashes;
- §2 one run at a time per results folder, a result and its predictions always from the same run, summaries of one
  setup, output folders that are files, unwritable or full;
- §3 option values, hyperparameters and bundles refused before any work; datasets and images refused with the file
  and the value, or (16-bit and float images) decoded correctly.

Generated images in the real datasets' layouts, a tiny open_clip model saved to disk and loaded back by path,
synthetic bundles.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import pickle
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import types
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from conftest import PETS, make_pets
from fewclip import data, hashing
from fewclip import methods as M
from fewclip.cli.main import main
from fewclip.data.generate import make_folder_dataset, write_images
from fewclip.errors import BundleError, MethodError, OutputError, ResultsError, ResultsLockedError
from fewclip.features import bundle as bundle_io
from fewclip.features.extract import BadImagesError, extract, extract_support, load_image
from fewclip.features.store import FeatureStore, read_shard_header
from fewclip.features.synthetic import make_synthetic_bundle
from fewclip.hashing import MEMO_NAME, HashMemo
from fewclip.io import file_sha256
from fewclip.methods import cache as cache_module
from fewclip.methods.params import Interval, Optional, SequenceOf, constraint_of
from fewclip.methods.search import search_memory
from fewclip.models import BackboneSpec
from fewclip.models.tiny import save_tiny_openclip
from fewclip.protocols.config import DataConfig, MethodsConfig, ProtocolConfig, RunConfig
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
from fewclip.protocols.runner import Cell, partition, plan, run, summary_cells

# ====================================================================================================
# §1–2 A feature cache keyed by content; results that know their weights, images and prompts
# ====================================================================================================
SRC = Path(__file__).resolve().parents[1] / "src"
CLASSES = ("amber", "azure", "cobalt")
LOG = re.compile(r"(\d+) image view\(s\) encoded, (\d+) read from the cache")


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    tiny = save_tiny_openclip(root / "model", "vit", name="fewclip-test-reliability-vit", seed=0)
    spec = BackboneSpec(f"local-dir:{tiny.folder}")
    counts = {"train": 3, "val": 1, "test": 2}
    # two datasets: same class names, same file names, different pixels
    a = make_folder_dataset(root / "a", CLASSES, counts, size=32, seed=0)
    b = make_folder_dataset(root / "b", CLASSES, counts, size=32, seed=1)
    return SimpleNamespace(root=root, tiny=tiny, spec=spec, backbone=spec.load(), a=a, b=b)


def listed_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jpg"))


def encode_direct(backbone, root, paths):
    return backbone.encode_images(torch.stack([backbone.preprocess(load_image(root / p)) for p in paths]))


def cache_config(
    cache_env, folder: Path, cache: Path, *, model: str | None = None, methods=("zero-shot",)
) -> RunConfig:
    return RunConfig(
        DataConfig("folder", path=str(folder)),
        BackboneSpec(model or f"local-dir:{cache_env.tiny.folder}"),
        MethodsConfig(list(methods)),
        ProtocolConfig(shots=[1], seeds=[1]),
        cache_dir=str(cache),
    )


# --------------------------------------------------------------------------- content keys


def test_same_file_names_different_pixels_get_their_own_features(cache_env, tmp_path):
    paths = listed_files(cache_env.a)
    assert paths == listed_files(cache_env.b) and any(
        (cache_env.a / p).read_bytes() != (cache_env.b / p).read_bytes() for p in paths
    )
    store = FeatureStore(tmp_path / "cache")
    first = extract(cache_env.backbone, cache_env.a, paths, store=store, progress=False)
    second = extract(cache_env.backbone, cache_env.b, paths, store=store, progress=False)
    assert first.encoded == len(paths) and second.encoded == len(paths) and second.cached == 0
    torch.testing.assert_close(
        second.features, encode_direct(cache_env.backbone, cache_env.b, paths), atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(first.features, second.features)
    # both are cached now, each under its own content
    again = extract(cache_env.backbone, cache_env.a, paths, store=FeatureStore(tmp_path / "cache"), progress=False)
    assert again.encoded == 0
    torch.testing.assert_close(again.features, first.features)


def test_fewclip_run_on_a_second_dataset_with_the_same_names_encodes_it(cache_env, tmp_path):
    cache, log = tmp_path / "cache", []
    report_a = run(cache_config(cache_env, cache_env.a, cache), tmp_path / "out_a", log=log.append)
    report_b = run(cache_config(cache_env, cache_env.b, cache), tmp_path / "out_b", log=log.append)
    assert report_a.encoded == report_b.encoded > 0 and report_b.cached == 0  # nothing of A's is reused
    # B's result equals B's in a fresh cache, not A's
    fresh = run(cache_config(cache_env, cache_env.b, tmp_path / "fresh"), tmp_path / "out_fresh", log=log.append)
    assert report_b.results[0]["accuracy"] == fresh.results[0]["accuracy"]
    assert report_b.results[0]["setup"]["images_sha256"] != report_a.results[0]["setup"]["images_sha256"]


def test_an_image_replaced_in_place_is_encoded_again(cache_env, tmp_path):
    folder = tmp_path / "data"
    paths = listed_files(cache_env.a)
    for p in paths:
        (folder / p).parent.mkdir(parents=True, exist_ok=True)
        (folder / p).write_bytes((cache_env.a / p).read_bytes())
    store = FeatureStore(tmp_path / "cache")
    before = extract_support(cache_env.backbone, folder, paths, views=2, store=store, progress=False)
    (folder / paths[0]).write_bytes((cache_env.b / paths[0]).read_bytes())  # other pixels under the same name
    after = extract_support(
        cache_env.backbone, folder, paths, views=2, store=FeatureStore(tmp_path / "cache"), progress=False
    )
    assert after.encoded == 3 and after.cached == 3 * (len(paths) - 1)  # its 2 views + clean, nothing else
    torch.testing.assert_close(
        after.clean[0], encode_direct(cache_env.backbone, cache_env.b, paths[:1])[0], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(after.clean[1:], before.clean[1:])
    # identical bytes get identical augmented views wherever they live
    store = FeatureStore(tmp_path / "cache")
    elsewhere = extract_support(cache_env.backbone, cache_env.b, paths[:1], views=2, store=store, progress=False)
    assert elsewhere.encoded == 0
    torch.testing.assert_close(elsewhere.features[:, 0], after.features[:, 0])


# --------------------------------------------------------------------------- the hash memo


def test_hash_memo_reads_a_file_once_and_again_when_it_changes(tmp_path, monkeypatch):
    calls = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = [f"{i}.bin" for i in range(20)]  # over the inline threshold: hashed in threads
    for i, name in enumerate(names):
        (folder / name).write_bytes(bytes([i]) * (100 + i))
    memo_file = tmp_path / "cache" / MEMO_NAME
    digests = HashMemo(memo_file).sha256_many([folder / n for n in names])
    assert digests[3] == real(folder / "3.bin") and sorted(calls) == sorted(names)
    calls.clear()
    memo = HashMemo(memo_file)  # another process: the SQLite file remembers
    assert memo.sha256_many([folder / n for n in names]) == digests and calls == [] and memo.hashed == 0
    before = (folder / "3.bin").stat()
    (folder / "3.bin").write_bytes(b"x" * 103)  # same size, new content, and the old mtime put back: the ctime says
    os.utime(folder / "3.bin", ns=(before.st_atime_ns, before.st_mtime_ns))
    (folder / "4.bin").write_bytes(b"longer than before" * 20)
    os.utime(folder / "5.bin", ns=(1, 1))  # only the mtime
    errors: dict[str, str] = {}
    again = memo.sha256_many([folder / n for n in names] + [folder / "gone.bin"], errors=errors)
    assert sorted(calls) == ["3.bin", "4.bin", "5.bin"] and memo.hashed == 3
    assert again[3] == real(folder / "3.bin") != digests[3] and again[5] == digests[5]
    assert again[-1] is None and "No such file" in errors[str(folder / "gone.bin")]


def test_hashing_reports_progress_for_the_files_it_reads_only(tmp_path):
    """A cold pass over a large dataset reads every byte (minutes): it reports progress, one update per file read;
    a warm pass reads nothing and opens no report."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i}.bin").write_bytes(bytes([i]) * 50)
    opened: list[int] = []
    updates: list[int] = []

    class Report:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def update(self, n):
            updates.append(n)

    def report(total):
        opened.append(total)
        return Report()

    memo = HashMemo(tmp_path / MEMO_NAME)
    memo.sha256_many([folder / f"{i}.bin" for i in range(8)], progress=report)
    assert opened == [8] and updates == [1] * 8
    memo.sha256_many([folder / f"{i}.bin" for i in range(12)], progress=report)  # 8 remembered, 4 read
    assert opened == [8, 4] and len(updates) == 12
    memo.sha256_many([folder / f"{i}.bin" for i in range(12)], progress=report)  # all remembered
    assert opened == [8, 4]


def test_a_corrupt_or_unwritable_memo_never_stops_hashing(tmp_path, caplog):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    memo_file = tmp_path / MEMO_NAME
    memo_file.write_bytes(b"this is not an SQLite file" * 100)
    with caplog.at_level("WARNING", logger="fewclip.hashing"):
        assert HashMemo(memo_file).sha256(f) == hashing.sha256_file(f)
    assert f"file-hash memo {memo_file} is unreadable" in caplog.text
    assert list(tmp_path.glob(f"{MEMO_NAME}.corrupt-*"))  # set aside, and a new memo works
    with sqlite3.connect(memo_file) as conn:
        assert conn.execute("SELECT count(*) FROM files").fetchone() == (1,)


# --------------------------------------------------------------------------- shards


def test_a_truncated_shard_is_named_set_aside_and_re_encoded(cache_env, tmp_path, caplog):
    paths = listed_files(cache_env.a)
    store = FeatureStore(tmp_path / "cache")
    first = extract(cache_env.backbone, cache_env.a, paths, store=store, progress=False)
    shard = next((tmp_path / "cache").rglob("*.safetensors"))
    keys, _ = read_shard_header(shard)
    shard.write_bytes(shard.read_bytes()[:-10])  # the header is intact, the data cut short
    with caplog.at_level("WARNING", logger="fewclip.features"):
        out = extract(cache_env.backbone, cache_env.a, paths, store=FeatureStore(tmp_path / "cache"), progress=False)
    assert f"cache shard {shard} is unreadable or truncated" in caplog.text and "truncated or corrupt" in caplog.text
    assert out.encoded == len(keys) and not shard.exists() and (shard.parent / "quarantine" / shard.name).is_file()
    torch.testing.assert_close(out.features, first.features)
    # later runs are not blocked: everything is cached again
    assert (
        extract(cache_env.backbone, cache_env.a, paths, store=FeatureStore(tmp_path / "cache"), progress=False).encoded
        == 0
    )


def test_a_shard_that_fails_when_read_is_set_aside_not_read(cache_env, tmp_path, caplog):
    paths = listed_files(cache_env.a)
    store = FeatureStore(tmp_path / "cache")
    first = extract(cache_env.backbone, cache_env.a, paths, store=store, progress=False)
    group = next(iter(store._groups.values()))
    keys = sorted(group.keys())  # indexed while the shard was whole
    shard = next(group.path.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])  # then cut short (a disk error, another process)
    with caplog.at_level("WARNING", logger="fewclip.features"):
        rows, found = group.read(keys)
        with pytest.raises(KeyError, match="not in cache group"):
            group.get(keys)
    assert found == [False] * len(keys) and shard.name in caplog.text and not shard.exists()
    out = extract(cache_env.backbone, cache_env.a, paths, store=store, progress=False)
    assert out.encoded == len(paths)
    torch.testing.assert_close(out.features, first.features)


def test_a_pass_flushes_every_flush_rows_over_all_its_views(cache_env, tmp_path, monkeypatch):
    paths = listed_files(cache_env.a)  # 18 images, 3 views each: 54 rows; batches of 2 images (6 rows)
    store = FeatureStore(tmp_path / "cache")
    calls = {"n": 0}
    real = cache_env.backbone.encode_images

    def dies(images):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt("killed")
        return real(images)

    monkeypatch.setattr(cache_env.backbone, "encode_images", dies)
    with pytest.raises(KeyboardInterrupt):
        extract_support(
            cache_env.backbone, cache_env.a, paths, views=2, store=store, batch_size=6, flush_rows=10, progress=False
        )
    monkeypatch.undo()
    saved = sum(len(read_shard_header(s)[0]) for s in (tmp_path / "cache").rglob("*.safetensors"))
    assert saved == 4 * 6  # every encoded row was saved; the last partial budget is flushed on the way out
    shards = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(shards) >= 4  # flushed during the pass (after 12 and 24 rows), not only at the end


def test_the_flush_budget_is_shared_by_the_views_of_a_pass(cache_env, tmp_path, monkeypatch):
    """A budget per view would let 10 views + clean hold 11 x ``flush_rows`` rows unsaved; the pass shares one."""
    from fewclip.features import store as store_module

    flushed = []
    real_put = store_module.FeatureGroup.put

    def put(self, keys, features):
        flushed.append(len(keys))
        return real_put(self, keys, features)

    monkeypatch.setattr(store_module.FeatureGroup, "put", put)
    paths = listed_files(cache_env.a)[:6]
    extract_support(cache_env.backbone, cache_env.a, paths, views=10, store=FeatureStore(tmp_path / "c"), batch_size=11,
                    flush_rows=12, progress=False)  # fmt: skip
    # one image (11 rows) per batch, flushed when the 11 views together pass 12 rows: every 2 images
    assert sum(flushed) == 11 * len(paths) and max(flushed) <= 2


def test_a_full_cache_disk_is_one_error_naming_the_shard_and_nothing_half_written(cache_env, tmp_path, monkeypatch):
    import errno

    from fewclip.errors import FeatureStoreError
    from fewclip.features import store as store_module

    real = store_module.atomic_write
    writes = []

    def full_after_one(path, writer):
        writes.append(path)
        if len(writes) <= 2:  # group.json and the first shard fit, then the disk is full
            return real(path, writer)

        def fills_the_disk(tmp):
            writer(tmp)
            raise OSError(errno.ENOSPC, "No space left on device")

        return real(path, fills_the_disk)

    monkeypatch.setattr(store_module, "atomic_write", full_after_one)
    cache = tmp_path / "cache"
    paths = listed_files(cache_env.a)
    with pytest.raises(FeatureStoreError) as info:
        extract(cache_env.backbone, cache_env.a, paths, store=FeatureStore(cache), batch_size=4, flush_rows=4,
                progress=False)  # fmt: skip
    message = str(info.value)
    assert str(writes[-1]) in message and "No space left" in message and "--cache-dir" in message
    assert not [p for p in cache.rglob("*.tmp")]  # nothing half-written
    kept = [s for s in cache.rglob("*.safetensors")]
    assert len(kept) == 1 and len(read_shard_header(kept[0])[0]) == 4  # the shard written before stays usable
    monkeypatch.undo()
    again = extract(cache_env.backbone, cache_env.a, paths, store=FeatureStore(cache), progress=False)
    assert again.cached == 4 and again.encoded == len(paths) - 4


def test_cache_files_follow_the_umask(cache_env, tmp_path):
    old = os.umask(0o002)
    try:
        extract(
            cache_env.backbone,
            cache_env.a,
            listed_files(cache_env.a),
            store=FeatureStore(tmp_path / "cache"),
            progress=False,
        )
    finally:
        os.umask(old)
    made = [p for p in (tmp_path / "cache").rglob("*")]
    names = {p.name for p in made}
    assert MEMO_NAME in names and "group.json" in names and any(n.endswith(".safetensors") for n in names)
    for p in made:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o060 == 0o060, f"{p} has mode {oct(mode)}: not group-readable and writable"


# --------------------------------------------------------------------------- results know their weights


def test_new_weights_under_the_same_path_change_the_fingerprint(cache_env, tmp_path, monkeypatch):
    model = tmp_path / "model"
    saved = save_tiny_openclip(model, "vit", name="fewclip-test-reliability-vit", seed=0)
    cfg = cache_config(cache_env, cache_env.a, tmp_path / "cache", model=f"local-dir:{saved.folder}")
    out = tmp_path / "out"
    first = run(cfg, out, log=lambda m: None)
    setup = first.results[0]["setup"]
    assert setup["weights"]["sha256"] == first.results[0]["model"]["weights"]["sha256"]
    assert setup["images_sha256"] and setup["prompts_sha256"] and "params" in setup
    # same folder, other weights
    save_tiny_openclip(model, "vit", name="fewclip-test-reliability-vit", seed=7)
    reads: list[str] = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: reads.append(Path(p).name) or real(p))
    with pytest.raises(ResultsError, match="another setup.*weights"):
        partition(plan(cfg, out))
    again = run(cfg, out, force=True, log=lambda m: None)
    assert again.encoded == first.encoded and again.results[0]["setup"]["weights"] != setup["weights"]
    # the first plan hashed the new weights; the second plan and the loading only stat'ed them
    assert reads.count(Path(saved.weights).name) == 1


def test_a_warm_plan_only_stats_the_images(cache_env, tmp_path, monkeypatch):
    cfg = cache_config(cache_env, cache_env.a, tmp_path / "cache")
    plan(cfg, tmp_path / "out")
    reads = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: reads.append(p) or real(p))
    again = plan(cfg, tmp_path / "out")
    assert reads == [] and all(again.hashes[str(cache_env.a)].values())


# --------------------------------------------------------------------------- kill and resume


@pytest.mark.slow
def test_a_killed_run_resumes_with_only_what_was_missing(cache_env, tmp_path):
    """SIGKILL a real `fewclip run` once its first shard is on disk; the rerun encodes only the rest, and the
    results equal those of an uninterrupted run in a fresh cache."""
    classes = [f"class{i}" for i in range(8)]
    folder = make_folder_dataset(tmp_path / "big", classes, {"train": 40, "val": 2, "test": 3}, size=36, seed=3)
    cache, out = tmp_path / "cache", tmp_path / "out"
    options = ["run", "--dataset", "folder", "--path", str(folder), "--model", f"local-dir:{cache_env.tiny.folder}",
               "--method", "tip-adapter", "--shots", "40", "--seeds", "1", "--workers", "0",
               "--no-progress"]  # fmt: skip
    argv = [sys.executable, "-m", "fewclip", *options, "--cache-dir", str(cache)]
    environ = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*argv, "--out", str(out)], env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob("features/*/*.safetensors")):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "no shard written in 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    saved = sum(len(read_shard_header(s)[0]) for s in cache.glob("features/*/*.safetensors"))
    total = 8 * 40 * 11 + 8 * (2 + 3)  # support x (10 views + clean), val and test x clean
    assert 0 < saved < total

    rerun = subprocess.run([*argv, "--out", str(out)], env=environ, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    encoded, cached = map(int, LOG.search(rerun.stdout + rerun.stderr).groups())
    assert (encoded, cached) == (total - saved, saved)

    fresh = tmp_path / "fresh"
    assert main([*options, "--cache-dir", str(fresh / "cache"), "--out", str(fresh)]) == 0
    name = "tip-adapter/shots_40-seed_1.json"
    resumed = json.loads(next(out.rglob(name)).read_text())
    clean = json.loads(next(fresh.rglob(name)).read_text())
    assert resumed["accuracy"] == clean["accuracy"] and resumed["config_sha256"] == clean["config_sha256"]
    assert torch.equal(read_predictions(next(out.rglob(name)))[0], read_predictions(next(fresh.rglob(name)))[0])


# ====================================================================================================
# §2 One run per results folder; a result published with its own predictions; summaries of one setup; output folders
# ====================================================================================================
SRC = Path(__file__).resolve().parents[1] / "src"
NAMES = PETS
COUNTS = {"train": 4, "val": 2, "test": 3}
BB = "local-dir-model"


@pytest.fixture(scope="module")
def results_env(tmp_path_factory):
    """3 pets classes in CoOp's layout, the tiny model, and one feature cache the module's runs share."""
    root = tmp_path_factory.mktemp("reliability-results")
    make_pets(root / "data", COUNTS["train"], COUNTS["val"], COUNTS["test"], size=32)
    tiny = save_tiny_openclip(root / "model", "vit", name="fewclip-test-reliability-results", seed=0)
    return SimpleNamespace(root=root, data_root=root / "data", model=f"local-dir:{tiny.folder}", cache=root / "cache")


def results_argv(results_env, out: Path, *extra: str, cache: Path | None = None) -> list[str]:
    return [
        "run", "--dataset", "oxford_pets", "--data-root", str(results_env.data_root), "--model", results_env.model,
        "--views", "1", "--cache-dir", str(cache or results_env.cache), "--out", str(out), "--no-progress",
        "--shots", "1", "--seeds", "1",
        *extra,
    ]  # fmt: skip


def child_env() -> dict[str, str]:
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


def test_a_second_run_into_a_held_folder_refuses_naming_the_folder_and_the_holder(results_env, tmp_path, capsys):
    out = tmp_path / "out"
    folder = out / "oxford_pets" / BB / "fewshot"
    cache = tmp_path / "cache"
    with results_lock(folder):
        holder = json.loads((folder / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert main(results_argv(results_env, out, "--method", "zero-shot", cache=cache)) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{folder} is in use by another fewclip run (pid {os.getpid()} on {socket.gethostname()}, " in line
        assert f"started {holder['started']})" in line and "--wait" in line
        # refused before the skip-or-run decision: no episode drawn, nothing encoded, no result (the plan stage
        # has only hashed the images into the cache's file-hash memo)
        assert not (out / "oxford_pets" / "episodes").exists() and not (cache / "features").exists()
        assert not list(folder.rglob("*.json"))
    assert (folder / LOCK_NAME).read_text() == ""  # the holder's text goes with the lock
    assert (
        main(results_argv(results_env, out, "--method", "zero-shot", cache=cache)) == 0
    )  # released: the run goes ahead
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
def test_a_killed_holder_leaves_the_folder_free(results_env, tmp_path, capsys):
    out = tmp_path / "out"
    folder = out / "oxford_pets" / BB / "fewshot"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(),
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(results_argv(results_env, out, "--method", "zero-shot")) == 2
        assert f"(pid {holder.pid} on {socket.gethostname()}" in one_error_line(capsys.readouterr().err)
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel releases the flock
        holder.wait()
    assert main(results_argv(results_env, out, "--method", "zero-shot")) == 0
    assert "1 result(s) written" in capsys.readouterr().out


@pytest.mark.slow
def test_wait_queues_behind_a_running_run_and_then_reuses_what_it_finished(results_env, tmp_path):
    """A second `fewclip run --wait` started while the first holds the folder (mid-run, after extraction) waits,
    then reuses every result the first wrote instead of running the cells again."""
    from fewclip.protocols.config import RunConfig
    from fewclip.protocols.runner import run

    out = tmp_path / "out"
    argv = results_argv(results_env, out, "--method", "zero-shot", "tip-adapter", "--wait")
    second: list[subprocess.Popen] = []
    waiting: list[str] = []

    def log(message: str) -> None:
        if "image view(s) encoded" in message and not second:  # the first run holds the lock and has cells to fit
            proc = subprocess.Popen(
                [sys.executable, "-m", "fewclip", *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=child_env(),
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
            "data": {"dataset": "oxford_pets", "data_root": str(results_env.data_root)},
            "backbone": {"model": results_env.model},
            "extraction": {"views": 1, "progress": False},
            "methods": {"names": ["zero-shot", "tip-adapter"]},
            "protocol": {"shots": [1], "seeds": [1]},
            "cache_dir": str(results_env.cache),
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


def test_a_run_publishes_every_result_with_its_own_predictions(results_env, tmp_path):
    out = tmp_path / "out"
    assert main(results_argv(results_env, out, "--method", "zero-shot", "tip-adapter")) == 0
    folder = out / "oxford_pets" / BB / "fewshot"
    assert_published_pairs(folder)
    first = read_result(folder / "tip-adapter" / "shots_1-seed_1.json")
    assert main(results_argv(results_env, out, "--method", "tip-adapter", "--force")) == 0
    again = read_result(folder / "tip-adapter" / "shots_1-seed_1.json")
    assert again["run_id"] != first["run_id"] and again["predictions_file"] != first["predictions_file"]
    assert not (folder / "tip-adapter" / first["predictions_file"]).exists()  # the replaced pair's file is gone
    assert_published_pairs(folder)


# --------------------------------------------------------------------------- summaries


def test_the_summary_holds_only_this_runs_setup(results_env, tmp_path, capsys):
    out = tmp_path / "out"
    folder = out / "oxford_pets" / BB / "fewshot"
    assert main(results_argv(results_env, out, "--method", "zero-shot", "tip-adapter")) == 0
    capsys.readouterr()
    # tip-adapter again under another setup (--force replaces its result); zero-shot's result stays in the folder
    assert (
        main(results_argv(results_env, out, "--method", "tip-adapter", "--set", "search_step=[10,5]", "--force")) == 0
    )
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


def test_an_out_that_is_a_file_is_refused_before_any_work(results_env, tmp_path, capsys):
    cache = tmp_path / "cache"
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    assert main(results_argv(results_env, target, "--method", "zero-shot", cache=cache)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"the results folder (--out) {target} is a file" in line
    assert main(results_argv(results_env, target / "sub", "--method", "zero-shot", cache=cache)) == 2
    assert f"{target / 'sub'} cannot be created: {target} is a file" in one_error_line(capsys.readouterr().err)
    assert not cache.exists() and target.read_text() == "not a folder"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_an_unwritable_out_is_refused_before_any_work(results_env, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):  # root (with CAP_DAC_OVERRIDE) writes into any folder
            pytest.skip("this user can write into a read-only folder")
        assert main(results_argv(results_env, out / "results", "--method", "zero-shot", cache=cache)) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"cannot create a file in {out} (Permission denied)" in line and "another --out" in line
        assert not cache.exists() and not list(out.iterdir())
    finally:
        out.chmod(0o755)


def test_a_read_only_out_is_refused_before_any_work(results_env, tmp_path, capsys, monkeypatch):
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
    assert main(results_argv(results_env, tmp_path / "out", "--method", "zero-shot", cache=cache)) == 2
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
    results_env, tmp_path, capsys, monkeypatch, target
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
    argv = results_argv(results_env, out, "--method", "zero-shot", "tip-adapter")
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


# ====================================================================================================
# §3 Option values, hyperparameters and bundles refused before any work
# ====================================================================================================


@pytest.fixture(scope="module")
def inputs_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    tiny = save_tiny_openclip(root / "model", "vit", name="fewclip-test-inputs-vit", seed=0)
    return SimpleNamespace(
        model=f"local-dir:{tiny.folder}",
        data=make_pets(root / "data", [6, 6, 6], 2, 3, size=32),
        uneven=make_pets(root / "uneven", [6, 2, 6], 2, 3, size=32),
    )


def inputs_argv(inputs_env, tmp_path: Path, *extra: str, data: Path | None = None) -> list[str]:
    """``fewclip run`` on the generated data, one shot and one seed unless ``extra`` gives them."""
    episodes = [opt for opt, value in (("--shots", "1"), ("--seeds", "1")) if opt not in extra for opt in (opt, value)]
    return [
        "run", "--dataset", "oxford_pets", "--data-root", str(data or inputs_env.data), "--model", inputs_env.model,
        "--views", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--no-progress",
        *episodes, *extra,
    ]  # fmt: skip


def refused_message(capsys, argv: list[str]) -> str:
    """Run ``argv``; assert exit status 2 (a usage error) and return the one-line message."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# --------------------------------------------------------------------------- fewclip run: refused at plan time

PLAN_REFUSALS = {
    "shots zero": (["--shots", "0"], ["--shots 0", "positive"]),
    "shots negative": (["--shots", "4", "-1"], ["--shots 4 -1", "positive"]),
    "seeds negative": (["--seeds", "1", "-2"], ["--seeds 1 -2", "≥ 0"]),
    "views zero": (["--views", "0"], ["views=0", "--views"]),
    "batch size zero": (["--batch-size", "0"], ["batch_size=0", "--batch-size"]),
    "batch size negative": (["--batch-size", "-3"], ["batch_size=-3", "--batch-size"]),
    "workers negative": (["--workers", "-1"], ["num_workers=-1", "--workers"]),
    "unknown preset": (["--method", "tip-adapter", "--preset", "nonsense"], ["'nonsense'", "caltech101", "paper"]),
    "preset of no method": (["--method", "zero-shot", "--preset", "caltech101"], ["'caltech101'", "ships presets"]),
    "more shots than any class has": (["--shots", "4", "100"], ["--shots 100", "largest has 6", "at most 6"]),
    "selection through --set": (["--method", "ape", "--set", "selection=none"], ["--selection none", "not --set"]),
    "wrong-typed --set": (["--method", "tip-adapter", "--set", "init_alpha=abc"], ["init_alpha='abc'"]),
    "NaN --set": (["--method", "linear-probe", "--set", "C=NaN"], ["linear-probe", "C=nan", "> 0"]),
    "empty grid": (["--method", "gda", "--set", "alpha_grid=[]"], ["gda", "alpha_grid=[]", "non-empty"]),
    "empty ratios under selection": (["--method", "clip-adapter", "--set", "ratios=[]"], ["ratios=[]", "non-empty"]),
    "two parameters together": (
        ["--method", "candle", "--set", "tie_virtual_text=true", "--set", "vir_init=visual"],
        ["tie_virtual_text=True", "vir_init='visual'"],
    ),
    "search grid too large": (
        ["--method", "tip-adapter", "--set", "search_step=[1000000,1000000]"],
        ["search_step=[1000000, 1000000]", "TB", "coarser step"],
    ),
    "imbalance ratio NaN": (
        ["--protocol", "base2new-imbalanced", "--imbalance-ratio", "nan"],
        ["imbalance ratio", "nan"],
    ),
}


@pytest.mark.parametrize("case", list(PLAN_REFUSALS))
def test_bad_run_options_are_refused_before_anything_is_written(inputs_env, tmp_path, capsys, case):
    extra, expected = PLAN_REFUSALS[case]
    method = [] if "--method" in extra else ["--method", "zero-shot"]
    message = refused_message(capsys, inputs_argv(inputs_env, tmp_path, *method, *extra))
    for text in expected:
        assert text in message, (text, message)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--method", "ape", "--set", "channels=1000"], ["channels=1000", "D = 16"]),
        (["--method", "candle", "--set", "heads=7"], ["heads = 7", "divisor of D"]),
        (["--method", "clip-adapter", "--set", "reduction=32"], ["reduction=32", "D = 16"]),
    ],
)
def test_values_that_need_the_feature_dimension_are_refused_before_any_image_is_encoded(
    inputs_env, tmp_path, capsys, extra, expected
):
    """D is known once the backbone is loaded: the refusal comes then, not after the extraction as a failed cell."""
    message = refused_message(capsys, inputs_argv(inputs_env, tmp_path, *extra))
    for text in expected:
        assert text in message, (text, message)
    cache, out = tmp_path / "cache", tmp_path / "out"
    assert not [p for p in (cache / "features").rglob("*") if p.is_file()]  # nothing encoded (the file-hash memo aside)
    assert not list(out.rglob("shots_*.json")) and not list(out.rglob("summary.json"))  # no result


def test_a_dataset_alias_names_the_same_preset(inputs_env, tmp_path):
    from fewclip.protocols.runner import method_preset

    assert method_preset("tip-adapter", "flowers102", "oxford_pets") == "oxford_flowers"
    assert method_preset("tip-adapter", "paper", "oxford_pets") == "oxford_pets"
    assert method_preset("zero-shot", "caltech101", "oxford_pets") is None  # no presets: its defaults
    with pytest.raises(MethodError, match="unknown preset 'nonsense'.*caltech101.*--preset paper"):
        method_preset("ape", "nonsense", "oxford_pets")


def test_a_class_with_fewer_images_than_shots_is_warned_about_and_recorded(inputs_env, tmp_path, capsys):
    """beagle has 2 training images: a 4-shot episode takes both (Dassl's behaviour) and says so, per class."""
    argv = inputs_argv(
        inputs_env, tmp_path, "--method", "zero-shot", "--shots", "1", "4", "--seeds", "1", data=inputs_env.uneven
    )
    with pytest.warns(UserWarning, match=r"1 class\(es\) have fewer than 4 training images.*beagle \(2\)"):
        assert main(argv) == 0
    folder = tmp_path / "out" / "oxford_pets" / "local-dir-model" / "fewshot" / "zero-shot"
    four = json.loads((folder / "shots_4-seed_1.json").read_text())
    assert four["episode"]["short_classes"] == {"beagle": 2} and four["episode"]["support"] == 4 + 2 + 4
    assert json.loads((folder / "shots_1-seed_1.json").read_text())["episode"]["short_classes"] == {}
    episode = json.loads(next((tmp_path / "out").rglob("*_k4_s1_*.json")).read_text())
    assert episode["meta"]["short_classes"] == {"beagle": 2}


# --------------------------------------------------------------------------- hyperparameters of every method


def _params():
    for name in M.list_methods():
        for f in M.get_class(name).param_fields():
            yield name, f.name, constraint_of(f)


def _inner(constraint):
    return constraint.constraint if isinstance(constraint, Optional) else constraint


NUMERIC = [(m, p) for m, p, c in _params() if isinstance(_inner(c), Interval)]
SEQUENCES = [(m, p) for m, p, c in _params() if isinstance(_inner(c), SequenceOf)]
#: numbers bounded below by 0 or more (the others, e.g. candle's tau, accept negative values by design)
BOUNDED = [
    (m, p, _inner(c)) for m, p, c in _params() if isinstance(_inner(c), Interval) and (_inner(c).left or -1) >= 0
]


@pytest.mark.parametrize(("method", "key"), NUMERIC)
def test_every_numeric_hyperparameter_refuses_nan_and_infinity_without_data(method, key):
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(MethodError, match=rf"^{re.escape(method)}: {key}={bad!r} is not valid; expected "):
            M.create(method, **{key: bad}).validate_params()


@pytest.mark.parametrize(("method", "key", "interval"), BOUNDED)
def test_negative_values_are_refused_where_a_bound_says_so(method, key, interval):
    with pytest.raises(MethodError, match=rf"{key}=-1 is not valid"):
        M.create(method, **{key: -1}).validate_params()
    if interval.left == 0 and interval.closed in ("neither", "right"):
        with pytest.raises(MethodError, match=rf"{key}=0 is not valid"):
            M.create(method, **{key: 0}).validate_params()


def test_the_hyperparameters_that_must_be_positive_are():
    """The parameters the issue names, and every learning rate, epoch count and search grid: zero is refused."""
    positive = {(m, p) for m, p, c in _params() if isinstance(_inner(c), Interval) and _inner(c).left is not None}
    refuse_zero = set()
    for method, key in positive:
        try:
            M.create(method, **{key: 0}).validate_params()
        except MethodError:
            refuse_zero.add((method, key))
    for method, key in [("linear-probe", "C"), ("linear-probe", "max_iter"), ("linear-probe", "tol")]:
        assert (method, key) in refuse_zero
    for method, key in positive:
        if key in ("lr", "epochs", "batch_size", "warmup_lr", "heads", "reduction", "eps"):
            assert (method, key) in refuse_zero, (method, key)


@pytest.mark.parametrize(("method", "key"), SEQUENCES)
def test_no_grid_or_candidate_list_may_be_empty_when_it_is_searched(method, key):
    with pytest.raises(MethodError, match=rf"{key}=\[\] is not valid"):
        M.create(method, **{key: []}).validate_params()


def test_search_memory_is_estimated_by_hand():
    # steps [2, 3], one val row, one cache entry, one class (Γ = 1, T = 1 offset): counts 8·2·3; per chunk
    # 4·(2·1·1 + 1 + 7); per β 3·8·1·4 + 48·1·1; interval temporaries 12·1·1·1; exactly evaluated logits 4·3·1
    assert search_memory([2, 3]) == 48 + 40 + (96 + 48) + 12 + 12
    # APE's third grid (γ, Γ = 4) multiplies the counts grid and the per-β terms
    assert search_memory([2, 3, 4]) == 8 * 24 + 4 * (2 + 4 + 7) + (24 * 4 * 4 + 48 * 4) + 12 * 4 + 4 * 12
    # calibration's offsets (T = 5) multiply the counts grid and the per-offset logits and interval constants
    assert search_memory([2, 3], offsets=5) == 48 * 5 + 4 * (2 + 1 + 35) + (96 + 48) + 12 + 12
    # a large bundle: the [m, N] slabs of one chunk of rows dominate the grid's own part
    assert search_memory([200, 20], val_rows=1600, entries=16000, classes=100) > 2 * 4 * 1048 * 16000


SEARCHED = [name for name in M.list_methods() if "search_step" in M.get_class(name).param_names()]


@pytest.mark.parametrize("method", SEARCHED)
def test_a_search_grid_that_would_not_fit_in_memory_is_refused_with_its_size(method):
    size = len(M.get_class(method).default_params()["search_step"])
    huge = [10**6] * size
    with pytest.raises(MethodError, match=r"search_step=\[1000000.*would allocate about .* [TP]B.*coarser step"):
        M.create(method, search_step=huge).validate_params()
    M.create(method, search_step=huge, selection="none").validate_params()  # no search: nothing allocated


def test_the_data_decides_the_rest_of_the_estimate_before_any_work(monkeypatch, bundle):
    """A grid that is small alone but not for this bundle's rows, keys and classes is refused at fit, before work."""
    step = [12, 6]
    alone = search_memory(step)
    monkeypatch.setattr(cache_module, "memory_limit", lambda: alone + 1)
    model = M.create("tip-adapter", search_step=step)
    model.validate_params()  # the grid alone fits
    monkeypatch.setattr(cache_module, "cache_search", lambda *a, **k: pytest.fail("the search ran"))
    with pytest.raises(MethodError, match=r"search_step=\[12, 6\].*more than this machine's"):
        model.fit(bundle)
    assert not hasattr(model, "dim_")


# --------------------------------------------------------------------------- bundles and fewclip fit


def _save_raw(path: Path, bundle, **replace) -> Path:
    """Write ``bundle`` with some tensors replaced, bypassing the validation of ``make_bundle``."""
    tensors = {
        name: getattr(bundle, name).contiguous() for name in bundle_io.ALL_TENSORS if getattr(bundle, name) is not None
    }
    tensors.update(replace)
    meta = {"format": bundle_io.FORMAT, "classnames": json.dumps(list(bundle.classnames))}
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    return path


def strict_json(text: str):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def small():
    return make_synthetic_bundle(classes=4, shots=2, dim=16, views=2, val_per_class=2, test_per_class=3, seed=1)


def test_an_empty_validation_split_is_no_validation_split(tmp_path, capsys, small):
    path = _save_raw(
        tmp_path / "b.safetensors", small, val_features=torch.zeros(0, 16), val_labels=torch.zeros(0).long()
    )
    loaded = bundle_io.load(path)
    assert not loaded.has_val and bundle_io.info(loaded)["val"] == 0
    message = refused_message(capsys, ["fit", str(path), "--method", "linear-probe", "--json"])
    assert "selection='val' needs validation data" in message and "0 rows" in message
    assert "--selection none" in message
    # a method that falls back without validation does so, and records it
    model = M.create("candle", epochs=2, batch_size=4).fit(loaded)
    assert model.selection_used_ == "none" and model.val_accuracy_ is None
    # and with --selection none, the JSON says there is no validation accuracy (null, not NaN)
    assert main(["fit", str(path), "--method", "linear-probe", "--selection", "none", "--json"]) == 0
    result = strict_json(capsys.readouterr().out)
    assert result["val_accuracy"] is None and math.isfinite(result["test_accuracy"])


def test_an_empty_test_split_is_refused_naming_the_file(tmp_path, capsys, small):
    path = _save_raw(
        tmp_path / "b.safetensors", small, test_features=torch.zeros(0, 16), test_labels=torch.zeros(0).long()
    )
    with pytest.raises(BundleError, match=r"b\.safetensors: the test split is empty"):
        bundle_io.load(path)
    code = main(["fit", str(path), "--method", "zero-shot", "--json"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and "the test split is empty" in captured.err


@pytest.mark.parametrize("method", ["zero-shot", "tip-adapter", "linear-probe"])
def test_fit_json_is_always_strict_json(tmp_path, capsys, small, method):
    path = bundle_io.save(small, tmp_path / "b.safetensors")
    assert main(["fit", str(path), "--method", method, "--selection", "none", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    strict_json(out)
    assert main(["bundle", "info", str(path), "--json"]) == 0
    strict_json(capsys.readouterr().out)


def test_fit_checks_its_options_before_reading_the_bundle(tmp_path, capsys):
    missing = tmp_path / "absent.safetensors"
    message = refused_message(capsys, ["fit", str(missing), "--method", "linear-probe", "--set", "C=-1"])
    assert "C=-1 is not valid" in message and "absent" not in message
    message = refused_message(capsys, ["fit", str(missing), "--method", "ape", "--preset", "nonsense"])
    assert "unknown preset 'nonsense'" in message and "caltech101" in message
    message = refused_message(capsys, ["fit", str(missing), "--method", "ape", "--set", "selection=none"])
    assert "--set selection=" in message and "--selection none" in message


# ====================================================================================================
# §3 Datasets and images: refused with the file and the value, or decoded correctly
# ====================================================================================================
needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="POSIX symbolic links")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str) -> str:
    """The error text of a refused command: one line, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def csv_dataset(root: Path, train: str, test: str = "path,label,classname\na/1.jpg,0,a\nb/1.jpg,1,b\n") -> Path:
    """``root/{a,b}/{0,1}.jpg`` and the given train.csv / test.csv."""
    write_images(root, [(f"{c}/{i}.jpg", y) for y, c in enumerate("ab") for i in range(2)], 2, size=8)
    (root / "train.csv").write_text(train)
    (root / "test.csv").write_text(test)
    return root


def folder_dataset(root: Path, classes: str = "ab", per_class: int = 3) -> Path:
    """``root/<class>/<i>.png``: the ``folder`` kind without a split (generated 50/20/30)."""
    items = [(f"{c}/{i}.png", y) for y, c in enumerate(classes) for i in range(per_class)]
    write_images(root, items, len(classes), size=8)
    return root


def sample_argv(*data_args, out: Path) -> list:
    return ["datasets", "sample", *data_args, "--shots", 1, "--out", out]


# --------------------------------------------------------------------------- labels


def test_huge_csv_label_is_refused_with_file_line_and_value(capsys, tmp_path):
    # before: the gap check built range(10000000001) and `datasets check` ate 13 GB
    ds = csv_dataset(tmp_path / "ds", "path,label,classname\na/0.jpg,0,a\nb/0.jpg,10000000000,b\n")
    code, _, err = run_cli(capsys, "datasets", "check", "csv", "--path", ds)
    line = one_line_error(err)
    assert code == 2
    # labels {0, 1 (test.csv), 10000000000}: 3 distinct, so 0..2 is the valid range
    assert f"{ds / 'train.csv'}:3: label 10000000000 is out of range" in line
    assert "3 distinct labels, so labels must run 0..2" in line and "(label(s) 2, 3, 4, 5, 6, ... never appear)" in line
    out = tmp_path / "episode.json"
    assert run_cli(capsys, *sample_argv("csv", "--path", ds, out=out))[0] == 2
    assert not out.exists()


def test_csv_label_named_by_classnames_file_is_in_range(tmp_path):
    # labels 0 and 3 with four names in classnames.txt: classes 1 and 2 have no rows but are named, so 0..3 is valid
    ds = csv_dataset(tmp_path / "ds", "a/0.jpg,0\nb/0.jpg,3\n", test="a/1.jpg,0\nb/1.jpg,3\n")
    (ds / "classnames.txt").write_text("ant\nbee\ncat\ndog\n")
    splits = data.load_dataset("csv", path=ds, warn=False)
    assert splits.classnames == ["ant", "bee", "cat", "dog"] and [i.label for i in splits.train] == [0, 3]
    # a label past the named classes is refused, naming the file, the line and the classnames file
    (ds / "train.csv").write_text("a/0.jpg,0\nb/0.jpg,4\n")
    with pytest.raises(data.DataError, match=r"train\.csv:2: label 4 is out of range: the CSV has 3 distinct labels "
                       r"and .*classnames\.txt names 4 classes, so labels must run 0\.\.3"):  # fmt: skip
        data.load_dataset("csv", path=ds, warn=False)


def test_huge_split_json_label_is_refused_with_row_and_value(tmp_path):
    ds = folder_dataset(tmp_path / "ds")
    split = {"train": [["a/0.png", 0, "a"], ["b/0.png", 10**10, "b"]], "val": [], "test": [["a/1.png", 0, "a"]]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(data.DataError) as info:
        data.load_dataset("folder", path=ds, split_file=tmp_path / "split.json", warn=False)
    assert str(info.value) == (
        f"{tmp_path / 'split.json'}: train[1] has label 10000000000, but the split has 2 distinct labels, so they "
        "must run 0..1 without gaps (label(s) 1, 2, 3, 4, 5, ... never appear). Relabel the rows or restore the "
        "missing classes."
    )


def test_label_gap_names_the_missing_label(tmp_path):
    ds = folder_dataset(tmp_path / "ds", "abc")
    split = {"train": [["a/0.png", 0, "a"], ["c/0.png", 2, "c"]], "val": [], "test": [["c/1.png", 2, "c"]]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(
        data.DataError, match=r"train\[1\] has label 2, .* run 0\.\.1 without gaps \(label\(s\) 1 never"
    ):
        data.load_dataset("folder", path=ds, split_file=tmp_path / "split.json", warn=False)


def test_first_gaps_is_bounded_and_exact():
    from fewclip.data.readers import _first_gaps

    assert _first_gaps({0: "a", 2: "c"}, 3) == "1"
    assert _first_gaps({0: "a", 10**10: "b"}, 10**10 + 1) == "1, 2, 3, 4, 5, ..."
    assert _first_gaps(dict.fromkeys([0, 1, 2, 8]), 9) == "3, 4, 5, 6, 7"  # exactly five gaps: no "..."


@pytest.mark.parametrize("label", ["²", "٣", "1.0", "1e3"])
def test_non_ascii_or_non_integer_label_text_is_refused(tmp_path, label):
    ds = csv_dataset(tmp_path / "ds", f"a/0.jpg,0,a\nb/0.jpg,{label},b\n")
    with pytest.raises(data.DataError, match=rf"train\.csv:2: label '{label}' is not an integer"):
        data.load_dataset("csv", path=ds, warn=False)


# --------------------------------------------------------------------------- symbolic links


@needs_symlinks
@pytest.mark.parametrize(
    "where", ["a/loop.png", "a/x.png->a/y.png", "loopdir"], ids=["file-to-itself", "two-links", "class-folder"]
)
def test_symlink_loop_is_refused_naming_the_link(capsys, tmp_path, where):
    ds = folder_dataset(tmp_path / "ds")
    if "->" in where:  # x.png -> y.png -> x.png
        first, second = where.split("->")
        os.symlink(Path(second).name, ds / first)
        os.symlink(Path(first).name, ds / second)
        named = {ds / first, ds / second}
    else:
        os.symlink(Path(where).name, ds / where)
        named = {ds / where}
    code, _, err = run_cli(capsys, "datasets", "check", "folder", "--path", ds)
    line = one_line_error(err)
    assert code == 2 and "a symbolic-link loop" in line and "remove the link" in line
    assert any(line.startswith(f"fewclip datasets: error: {p}: ") for p in named), line
    out = tmp_path / "episode.json"
    assert run_cli(capsys, *sample_argv("folder", "--path", ds, out=out))[0] == 2
    assert not out.exists()


@needs_symlinks
def test_symlink_loop_named_by_a_split_file_is_refused(tmp_path):
    ds = folder_dataset(tmp_path / "ds")
    os.symlink("loop.png", ds / "a" / "loop.png")
    split = {"train": [["a/loop.png", 0, "a"], ["b/0.png", 1, "b"]], "val": [], "test": [["b/1.png", 1, "b"]]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(data.DataError, match=rf"^{re.escape(str(ds / 'a' / 'loop.png'))}: a symbolic-link loop"):
        data.load_dataset("folder", path=ds, split_file=tmp_path / "split.json", warn=False)


@needs_symlinks
def test_dataset_path_that_is_a_symlink_loop_says_so(tmp_path):
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(data.DataError, match=r"loop does not exist \(a symbolic link that loops or leads nowhere\)"):
        data.load_dataset("folder", path=tmp_path / "loop")


# --------------------------------------------------------------------------- paths outside the image root


def test_outside_root_by_hand(tmp_path):
    from fewclip.data.datasets import outside_root

    root = tmp_path / "root"
    paths = ["a/x.jpg", "a/../b/y.jpg", "..x/y.jpg", "a..b.jpg", "../x.jpg", "a/../../x.jpg",
             str(root / "a" / "z.jpg"), str(tmp_path / "elsewhere.jpg"), str(tmp_path / "rootx" / "z.jpg")]  # fmt: skip
    assert outside_root(root, paths) == [
        "../x.jpg",
        "a/../../x.jpg",
        str(tmp_path / "elsewhere.jpg"),
        str(tmp_path / "rootx" / "z.jpg"),  # a sibling whose name starts with the root's is not inside it
    ]


def test_split_file_path_leaving_the_root_is_refused_unless_allowed(capsys, tmp_path):
    ds = folder_dataset(tmp_path / "ds")
    write_images(tmp_path / "secret", [("x.png", 1)], 2, size=8)
    split = {"train": [["a/0.png", 0, "a"], ["../secret/x.png", 1, "b"]], "val": [], "test": [["b/1.png", 1, "b"]]}
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps(split))
    data_args = ["folder", "--path", ds, "--split-file", split_file]
    code, _, err = run_cli(capsys, "datasets", "check", *data_args)
    assert code == 2 and one_line_error(err) == (
        f"fewclip datasets: error: folder: 1 train path(s) in split.json leave the image root {ds} (first: "
        "'../secret/x.png'). Fix the paths, or pass allow_outside_root=True (CLI --allow-outside-root) if they are "
        "meant to point outside it."
    )
    out = tmp_path / "episode.json"
    assert run_cli(capsys, *sample_argv(*data_args, out=out))[0] == 2
    assert not out.exists()
    # asked for: the path is kept as written and opens outside the root
    code, text, _ = run_cli(capsys, "datasets", "check", *data_args, "--allow-outside-root")
    assert code == 0 and "3 named, 0 missing" in text
    splits = data.load_dataset("folder", path=ds, split_file=split_file, allow_outside_root=True, warn=False)
    assert (splits.root / splits.train[1].path).resolve() == (tmp_path / "secret" / "x.png").resolve()


def test_csv_absolute_paths_inside_the_root_pass_and_dotdot_inside_stays_inside(tmp_path):
    ds = csv_dataset(
        tmp_path / "ds", f"path,label,classname\n{tmp_path / 'ds' / 'a' / '0.jpg'},0,a\na/../b/0.jpg,1,b\n"
    )
    splits = data.load_dataset("csv", path=ds, warn=False)
    assert [i.path for i in splits.train] == [str(ds / "a" / "0.jpg"), "a/../b/0.jpg"]


@needs_symlinks
def test_symlinks_inside_the_root_are_followed_wherever_they_lead(tmp_path):
    """Decision: the check is on the paths as written; links are the user's own layout (a folder on another disk)."""
    ds = folder_dataset(tmp_path / "ds")
    write_images(tmp_path / "other_disk" / "c", [(f"{i}.png", 2) for i in range(3)], 3, size=8)
    os.symlink(tmp_path / "other_disk" / "c", ds / "c")
    splits = data.load_dataset("folder", path=ds, warn=False)
    assert splits.classnames == ["a", "b", "c"]
    assert data.find_missing(splits.root, [i.path for i in (*splits.train, *splits.test)]) == []


def test_run_config_carries_allow_outside_root(tmp_path):
    import argparse

    from fewclip.cli.datasets import add_data_arguments, kind_options_from_args

    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    assert "allow_outside_root" not in kind_options_from_args(parser.parse_args(["folder"]))
    assert kind_options_from_args(parser.parse_args(["folder", "--allow-outside-root"]))["allow_outside_root"] is True


# --------------------------------------------------------------------------- text encodings


@pytest.mark.parametrize("suffix", [".txt", ".json"])
def test_non_utf8_prompts_file_names_the_byte_offset(capsys, tmp_path, suffix):
    raw = b"a photo of a {}.\n\xe9t\xe9 {}\n" if suffix == ".txt" else b'["a photo of a {}.", "\xe9t\xe9 {}"]'
    offset = raw.index(b"\xe9")  # 17 and 21: the first Latin-1 byte
    prompts = tmp_path / f"prompts{suffix}"
    prompts.write_bytes(raw)
    with pytest.raises(data.DataError) as info:
        data.load_prompts(prompts, "caltech101")
    assert str(info.value) == (
        f"{prompts}: not UTF-8 text (byte 0xe9 at offset {offset}: invalid continuation byte); save it as UTF-8."
    )
    ds = folder_dataset(tmp_path / "ds")
    code, _, err = run_cli(capsys, "datasets", "prompts", "folder", "--path", ds, "--prompts", prompts)
    assert code == 2 and f"offset {offset}" in one_line_error(err)


def test_prompts_with_byte_order_mark_read_without_it(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes("\ufeffa photo of a {}.\n".encode())
    assert data.load_prompts(prompts).templates == ("a photo of a {}.",)


def test_non_utf8_csv_and_classnames_are_one_line_errors(tmp_path):
    ds = csv_dataset(tmp_path / "ds", "path,label\na/0.jpg,0\nb/0.jpg,1\n", test="a/1.jpg,0\nb/1.jpg,1\n")
    (ds / "classnames.txt").write_bytes(b"caf\xe9\nbee\n")
    with pytest.raises(data.DataError, match=r"classnames\.txt: not UTF-8 text \(byte 0xe9 at offset 3"):
        data.load_dataset("csv", path=ds, warn=False)
    (ds / "train.csv").write_bytes(b"path,label,classname\na/0.jpg,0,caf\xe9\n")  # 21 + 13 bytes before 0xe9
    with pytest.raises(data.DataError, match=r"train\.csv: not UTF-8 text \(byte 0xe9 at offset 34.*save it as UTF-8"):
        data.load_dataset("csv", path=ds, warn=False)


# --------------------------------------------------------------------------- CoOp pickles


DATASSL = "dassl.data.datasets.base_dataset"


class Datum:
    """Dassl's Datum as CoOp pickles it (attributes ``_impath``, ``_label``, ``_domain``, ``_classname``)."""

    def __init__(self, **fields):
        for k, v in fields.items():
            setattr(self, f"_{k}", v)


@pytest.fixture()
def dassl_module(monkeypatch):
    """Make ``Datum`` pickle under Dassl's module name (no Dassl is installed)."""
    mod = types.ModuleType(DATASSL)
    monkeypatch.setattr(Datum, "__module__", DATASSL)
    mod.Datum = Datum
    for name in ("dassl", "dassl.data", "dassl.data.datasets"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, DATASSL, mod)


@pytest.fixture()
def coop_setup(tmp_path):
    """A folder dataset with a split file (train a/0, a/1, b/0, b/1; val a/2, b/2) and its 1-shot draw."""
    ds = folder_dataset(tmp_path / "ds")
    split = {
        "train": [["a/0.png", 0, "a"], ["a/1.png", 0, "a"], ["b/0.png", 1, "b"], ["b/1.png", 1, "b"]],
        "val": [["a/2.png", 0, "a"], ["b/2.png", 1, "b"]],
        "test": [["a/2.png", 0, "a"], ["b/2.png", 1, "b"]],
    }
    (tmp_path / "split.json").write_text(json.dumps(split))
    return ds, tmp_path / "split.json"


def good(path: str, label: int, classname: str) -> Datum:
    return Datum(impath=f"/home/someone/DATA/ds/{path}", label=label, domain=0, classname=classname)


GOOD_VAL = [good("a/2.png", 0, "a"), good("b/2.png", 1, "b")]

BAD_PICKLES = {
    # what the pickle holds -> what the message must say (after "<file>: ")
    "label-str": ({"train": [good("a/0.png", 0, "a"), Datum(impath="/d/b/0.png", label="1", classname="b")],
                   "val": GOOD_VAL}, r"train\[1\]: field label is '1' \(str\); expected the class index \(an int\)"),
    "label-missing": ({"train": [Datum(impath="/d/a/0.png", classname="a")], "val": GOOD_VAL},
                      r"train\[0\]: field label is None \(NoneType\)"),
    "label-bool": ({"train": [Datum(impath="/d/a/0.png", label=True, classname="a")], "val": GOOD_VAL},
                   r"train\[0\]: field label is True \(bool\)"),
    "label-list": ({"train": [Datum(impath="/d/a/0.png", label=[0], classname="a")], "val": GOOD_VAL},
                   r"train\[0\]: field label is \[0\] \(list\)"),
    "impath-int": ({"train": [Datum(impath=7, label=0, classname="a")], "val": GOOD_VAL},
                   r"train\[0\]: field impath is 7 \(int\); expected the image path \(a string\)"),
    "impath-empty": ({"train": [Datum(impath="", label=0, classname="a")], "val": GOOD_VAL},
                     r"train\[0\]: field impath is '' \(str\)"),
    "classname-bytes": ({"train": [good("a/0.png", 0, "a")], "val": [Datum(impath="/d/a/2.png", label=0,
                         classname=b"a")]}, r"val\[0\]: field classname is b'a' \(bytes\)"),  # fmt: skip
    "row-dict": ({"train": [good("a/0.png", 0, "a"), {"impath": "b/0.png"}], "val": GOOD_VAL},
                 r"train\[1\] is \{'impath': 'b/0.png'\} \(dict\); expected a Datum"),
    "ragged-tuple": ({"train": [good("a/0.png", 0, "a"), ("b/0.png", 1)], "val": GOOD_VAL},
                     r"train\[1\] is \('b/0.png', 1\) \(tuple\); expected a Datum"),
    "train-tuple": ({"train": (good("a/0.png", 0, "a"),), "val": GOOD_VAL},
                    r"'train' is \(<.*\.\.\. \(tuple\); expected a list"),
    "val-none": ({"train": [good("a/0.png", 0, "a"), good("b/0.png", 1, "b")], "val": None},
                 r"'val' is None \(NoneType\); expected a list of Datum"),
    "no-train": ({"val": GOOD_VAL}, r"expected a dict with 'train' \(and 'val'\) lists of Datum, found keys \['val'\]"),
    "a-list": ([good("a/0.png", 0, "a")], r"expected a dict with 'train' .* found a list"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_PICKLES))
def test_malformed_coop_pickle_names_file_and_field(capsys, tmp_path, dassl_module, coop_setup, case):
    payload, message = BAD_PICKLES[case]
    ds, split_file = coop_setup
    pkl = tmp_path / "shot_1-seed_1.pkl"
    pkl.write_bytes(pickle.dumps(payload))
    splits = data.load_dataset("folder", path=ds, split_file=split_file, warn=False)
    with pytest.raises(data.DataError, match=rf"^{re.escape(str(pkl))}: {message}"):
        data.import_coop_pickle(pkl, splits)
    out = tmp_path / "episode.json"
    code, _, err = run_cli(capsys, "datasets", "import-coop", "folder", "--path", ds, "--split-file", split_file, pkl,
                       "--out", out)  # fmt: skip
    assert code == 2 and one_line_error(err).startswith(f"fewclip datasets: error: {pkl}: ")
    assert not out.exists()


def test_well_formed_coop_pickle_still_imports(tmp_path, dassl_module, coop_setup):
    """The control case of the table above: the same draw with every field right is accepted."""
    ds, split_file = coop_setup
    pkl = tmp_path / "shot_1-seed_1.pkl"
    pkl.write_bytes(pickle.dumps({"train": [good("a/0.png", 0, "a"), good("b/1.png", 1, "b")], "val": GOOD_VAL}))
    splits = data.load_dataset("folder", path=ds, split_file=split_file, warn=False)
    episode = data.import_coop_pickle(pkl, splits)
    assert [i.path for i in episode.train] == ["a/0.png", "b/1.png"] and [i.path for i in episode.val] == [
        "a/2.png",
        "b/2.png",
    ]


class _Payload:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_coop_pickle_payload_never_runs(tmp_path, coop_setup):
    ds, split_file = coop_setup
    marker = tmp_path / "pwned"
    pkl = tmp_path / "shot_1-seed_1.pkl"
    pkl.write_bytes(pickle.dumps({"train": [_Payload(marker)], "val": []}))
    splits = data.load_dataset("folder", path=ds, split_file=split_file, warn=False)
    with pytest.raises(data.DataError, match=r"refusing to load (builtins|io)\.open"):
        data.import_coop_pickle(pkl, splits)
    assert not marker.exists()


def test_pickled_state_cannot_shadow_the_stand_in(tmp_path, dassl_module, coop_setup):
    """A Datum whose state carries a 'field' entry (the old stand-in's method name) is read as data."""
    ds, split_file = coop_setup
    d = good("a/0.png", 0, "a")
    d.field = "not callable"
    pkl = tmp_path / "shot_1-seed_1.pkl"
    pkl.write_bytes(pickle.dumps({"train": [d, good("b/0.png", 1, "b")], "val": GOOD_VAL}))
    splits = data.load_dataset("folder", path=ds, split_file=split_file, warn=False)
    assert [i.path for i in data.import_coop_pickle(pkl, splits).train] == ["a/0.png", "b/0.png"]


# --------------------------------------------------------------------------- image decoding


def saved(image: Image.Image, name: str, tmp_path: Path, **kw) -> Path:
    path = tmp_path / name
    image.save(path, **kw)
    return path


def red(path: Path) -> list[int]:
    """Channel 0 of the loaded image, first row (grey images repeat the level in R, G and B)."""
    rgb = np.asarray(load_image(path))
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[0, :, 0].tolist()


# 16 bits: round(v / 257); 128 / 257 = 0.498 -> 0, 129 / 257 = 0.502 -> 1, 32768 / 257 = 127.502 -> 128
SIXTEEN = [0, 128, 129, 257, 32768, 65535]
SIXTEEN_8BIT = [0, 0, 1, 1, 128, 255]


@pytest.mark.parametrize(
    "name,mode",
    [("g.png", "I;16"), ("g.tif", "I;16"), ("g_be.tif", "I;16B"), ("g.pgm", "I")],
)
def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path, name, mode):
    a = np.array([SIXTEEN], dtype=">u2" if mode == "I;16B" else np.uint16)
    path = saved(Image.fromarray(a), name, tmp_path)
    with Image.open(path) as im:
        assert im.mode == mode  # the mode this test is about (PIL decodes 16-bit PGM into "I")
    assert red(path) == SIXTEEN_8BIT  # before: convert("RGB") clipped to [0, 255, 255, 255, 255, 255]


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    # floor(255 v + 0.5): 0.25 -> 63.75 -> 64; 0.5 -> 127.5 -> 128 (half rounds up); 0.998 -> 254.49 -> 254
    a = np.array([[0.0, 0.25, 0.5, 0.998, 1.0]], dtype=np.float32)
    path = saved(Image.fromarray(a), "f.tif", tmp_path)
    assert red(path) == [0, 64, 128, 254, 255]  # before: [0, 0, 0, 0, 1]


@pytest.mark.parametrize(
    "values,message",
    [
        ([0.0, 255.0], r"f\.tif: a floating-point image \(mode F\) with values in \[0, 255\]; .* \[0, 1\] .* only"),
        ([-0.5, 0.5], r"f\.tif: a floating-point image \(mode F\) with values in \[-0\.5, 0\.5\]"),
        ([0.0, float("nan")], r"f\.tif: a floating-point image \(mode F\) with NaN or infinite values"),
    ],
)
def test_float_tiff_outside_unit_range_is_refused_by_name(tmp_path, values, message):
    path = saved(Image.fromarray(np.array([values], dtype=np.float32)), "f.tif", tmp_path)
    with pytest.raises(ValueError, match=message):
        load_image(path)


def test_thirty_two_bit_integer_tiff_is_refused_by_name(tmp_path):
    path = saved(Image.fromarray(np.array([[0, 70000, -5]], dtype=np.int32)), "i.tif", tmp_path)
    with pytest.raises(ValueError, match=r"i\.tif: a 32-bit integer image \(mode I, TIFF format\) with values in "
                       r"\[-5, 70000\]; its white level is unknown"):  # fmt: skip
        load_image(path)


def test_palette_with_transparency_keeps_its_colours_without_warning(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    path = saved(im, "p.png", tmp_path, transparency=0)  # index 0 (red) transparent: a tRNS chunk
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = np.asarray(load_image(path))
    assert rgb.tolist() == [[[255, 0, 0], [0, 0, 255]]]  # the transparent pixel keeps its palette colour


def test_cmyk_la_and_one_bit_convert_as_pil_does(tmp_path):
    cmyk = Image.new("CMYK", (3, 1))
    for x, px in enumerate([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]):
        cmyk.putpixel((x, 0), px)
    # PIL: R = 255 - min(255, C + K), ...: white, cyan, black
    assert np.asarray(load_image(saved(cmyk, "c.tif", tmp_path))).tolist() == [
        [[255, 255, 255], [0, 255, 255], [0, 0, 0]]
    ]
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (100, 0))
    la.putpixel((1, 0), (200, 255))
    assert red(saved(la, "la.png", tmp_path)) == [100, 200]  # grey repeated, alpha dropped
    bits = Image.new("1", (3, 1))
    bits.putpixel((1, 0), 1)
    assert red(saved(bits, "b.png", tmp_path)) == [0, 255, 0]


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (2, 2), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    with Image.open(path) as im:
        assert im.n_frames == 2
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 0, 0]


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    from fewclip.models import load_backbone
    from fewclip.models.tiny import save_tiny_openclip

    saved_model = save_tiny_openclip(tmp_path_factory.mktemp("model"), "vit", name="fewclip-test-rel-data", seed=3)
    return load_backbone(saved_model.config_name, str(saved_model.weights))


@pytest.mark.slow  # building the tiny backbone imports open_clip (seconds on a cold run)
def test_sixteen_bit_png_encodes_like_its_eight_bit_twin_and_float_out_of_range_is_listed(tiny_backbone, tmp_path):
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, size=(20, 24), dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # v * 257 -> round(v) = v exactly
    out = extract(tiny_backbone, tmp_path, ["eight.png", "sixteen.png"], batch_size=2, num_workers=0, progress=False)
    torch.testing.assert_close(out.features[0], out.features[1], atol=0, rtol=0)
    Image.fromarray(np.full((20, 24), 3.0, dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(BadImagesError, match=r"float\.tif: ValueError: float\.tif: a floating-point image"):
        extract(tiny_backbone, tmp_path, ["eight.png", "float.tif"], batch_size=2, num_workers=0, progress=False)


def test_eight_bit_rgb_is_returned_unchanged(tmp_path):
    """Control for the cases above: an ordinary 8-bit RGB PNG is returned unchanged."""
    buf = io.BytesIO()
    Image.new("RGB", (2, 1), (10, 20, 30)).save(buf, format="PNG")
    (tmp_path / "rgb.png").write_bytes(buf.getvalue())
    assert np.asarray(load_image(tmp_path / "rgb.png")).tolist() == [[[10, 20, 30], [10, 20, 30]]]
