"""Issue 13 §1-2: a feature cache keyed by image content, results that know their weights and images, shards that
survive kills and corruption, files that a group can share. Generated images and a tiny open_clip model."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fewclip import hashing
from fewclip.cli.main import main
from fewclip.data.generate import make_folder_dataset
from fewclip.errors import ResultsError
from fewclip.features.extract import extract, extract_support, load_image
from fewclip.features.store import FeatureStore, read_shard_header
from fewclip.hashing import MEMO_NAME, HashMemo
from fewclip.models import BackboneSpec
from fewclip.models.tiny import save_tiny_openclip
from fewclip.protocols.config import DataConfig, MethodsConfig, ProtocolConfig, RunConfig
from fewclip.protocols.results import read_predictions
from fewclip.protocols.runner import partition, plan, run

SRC = Path(__file__).resolve().parents[1] / "src"
CLASSES = ("amber", "azure", "cobalt")
LOG = re.compile(r"(\d+) image view\(s\) encoded, (\d+) read from the cache")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    tiny = save_tiny_openclip(root / "model", "vit", name="fewclip-test-reliability-vit", seed=0)
    spec = BackboneSpec(f"local-dir:{tiny.folder}")
    counts = {"train": 3, "val": 1, "test": 2}
    # two datasets: same class names, same file names, different pixels
    a = make_folder_dataset(root / "a", CLASSES, counts, size=32, seed=0)
    b = make_folder_dataset(root / "b", CLASSES, counts, size=32, seed=1)
    return SimpleNamespace(root=root, tiny=tiny, spec=spec, backbone=spec.load(), a=a, b=b)


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jpg"))


def direct(backbone, root, paths):
    return backbone.encode_images(torch.stack([backbone.preprocess(load_image(root / p)) for p in paths]))


def config(env, folder: Path, cache: Path, *, model: str | None = None, methods=("zero-shot",)) -> RunConfig:
    return RunConfig(
        DataConfig("folder", path=str(folder)),
        BackboneSpec(model or f"local-dir:{env.tiny.folder}"),
        MethodsConfig(list(methods)),
        ProtocolConfig(shots=[1], seeds=[1]),
        cache_dir=str(cache),
    )


# --------------------------------------------------------------------------- content keys


def test_same_file_names_different_pixels_get_their_own_features(env, tmp_path):
    paths = files(env.a)
    assert paths == files(env.b) and any((env.a / p).read_bytes() != (env.b / p).read_bytes() for p in paths)
    store = FeatureStore(tmp_path / "cache")
    first = extract(env.backbone, env.a, paths, store=store, progress=False)
    second = extract(env.backbone, env.b, paths, store=store, progress=False)
    assert first.encoded == len(paths) and second.encoded == len(paths) and second.cached == 0
    torch.testing.assert_close(second.features, direct(env.backbone, env.b, paths), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first.features, second.features)
    # both are cached now, each under its own content
    again = extract(env.backbone, env.a, paths, store=FeatureStore(tmp_path / "cache"), progress=False)
    assert again.encoded == 0
    torch.testing.assert_close(again.features, first.features)


def test_fewclip_run_on_a_second_dataset_with_the_same_names_encodes_it(env, tmp_path):
    cache, log = tmp_path / "cache", []
    report_a = run(config(env, env.a, cache), tmp_path / "out_a", log=log.append)
    report_b = run(config(env, env.b, cache), tmp_path / "out_b", log=log.append)
    assert report_a.encoded == report_b.encoded > 0 and report_b.cached == 0  # nothing of A's is reused
    # B's result equals B's in a fresh cache, not A's
    fresh = run(config(env, env.b, tmp_path / "fresh"), tmp_path / "out_fresh", log=log.append)
    assert report_b.results[0]["accuracy"] == fresh.results[0]["accuracy"]
    assert report_b.results[0]["setup"]["images_sha256"] != report_a.results[0]["setup"]["images_sha256"]


def test_an_image_replaced_in_place_is_encoded_again(env, tmp_path):
    folder = tmp_path / "data"
    paths = files(env.a)
    for p in paths:
        (folder / p).parent.mkdir(parents=True, exist_ok=True)
        (folder / p).write_bytes((env.a / p).read_bytes())
    store = FeatureStore(tmp_path / "cache")
    before = extract_support(env.backbone, folder, paths, views=2, store=store, progress=False)
    (folder / paths[0]).write_bytes((env.b / paths[0]).read_bytes())  # other pixels under the same name
    after = extract_support(
        env.backbone, folder, paths, views=2, store=FeatureStore(tmp_path / "cache"), progress=False
    )
    assert after.encoded == 3 and after.cached == 3 * (len(paths) - 1)  # its 2 views + clean, nothing else
    torch.testing.assert_close(after.clean[0], direct(env.backbone, env.b, paths[:1])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.clean[1:], before.clean[1:])
    # identical bytes get identical augmented views wherever they live
    elsewhere = extract_support(env.backbone, env.b, paths[:1], views=2, store=FeatureStore(tmp_path / "cache"),
                                progress=False)  # fmt: skip
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


def test_a_truncated_shard_is_named_set_aside_and_re_encoded(env, tmp_path, caplog):
    paths = files(env.a)
    store = FeatureStore(tmp_path / "cache")
    first = extract(env.backbone, env.a, paths, store=store, progress=False)
    shard = next((tmp_path / "cache").rglob("*.safetensors"))
    keys, _ = read_shard_header(shard)
    shard.write_bytes(shard.read_bytes()[:-10])  # the header is intact, the data cut short
    with caplog.at_level("WARNING", logger="fewclip.features"):
        out = extract(env.backbone, env.a, paths, store=FeatureStore(tmp_path / "cache"), progress=False)
    assert f"cache shard {shard} is unreadable or truncated" in caplog.text and "truncated or corrupt" in caplog.text
    assert out.encoded == len(keys) and not shard.exists() and (shard.parent / "quarantine" / shard.name).is_file()
    torch.testing.assert_close(out.features, first.features)
    # later runs are not blocked: everything is cached again
    assert extract(env.backbone, env.a, paths, store=FeatureStore(tmp_path / "cache"), progress=False).encoded == 0


def test_a_shard_that_fails_when_read_is_set_aside_not_read(env, tmp_path, caplog):
    paths = files(env.a)
    store = FeatureStore(tmp_path / "cache")
    first = extract(env.backbone, env.a, paths, store=store, progress=False)
    group = next(iter(store._groups.values()))
    keys = sorted(group.keys())  # indexed while the shard was whole
    shard = next(group.path.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])  # then cut short (a disk error, another process)
    with caplog.at_level("WARNING", logger="fewclip.features"):
        rows, found = group.read(keys)
        with pytest.raises(KeyError, match="not in cache group"):
            group.get(keys)
    assert found == [False] * len(keys) and shard.name in caplog.text and not shard.exists()
    out = extract(env.backbone, env.a, paths, store=store, progress=False)
    assert out.encoded == len(paths)
    torch.testing.assert_close(out.features, first.features)


def test_a_pass_flushes_every_flush_rows_over_all_its_views(env, tmp_path, monkeypatch):
    paths = files(env.a)  # 18 images, 3 views each: 54 rows; batches of 2 images (6 rows)
    store = FeatureStore(tmp_path / "cache")
    calls = {"n": 0}
    real = env.backbone.encode_images

    def dies(images):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt("killed")
        return real(images)

    monkeypatch.setattr(env.backbone, "encode_images", dies)
    with pytest.raises(KeyboardInterrupt):
        extract_support(env.backbone, env.a, paths, views=2, store=store, batch_size=6, flush_rows=10, progress=False)
    monkeypatch.undo()
    saved = sum(len(read_shard_header(s)[0]) for s in (tmp_path / "cache").rglob("*.safetensors"))
    assert saved == 4 * 6  # every encoded row was saved; the last partial budget is flushed on the way out
    shards = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(shards) >= 4  # flushed during the pass (after 12 and 24 rows), not only at the end


def test_the_flush_budget_is_shared_by_the_views_of_a_pass(env, tmp_path, monkeypatch):
    """A budget per view would let 10 views + clean hold 11 x ``flush_rows`` rows unsaved; the pass shares one."""
    from fewclip.features import store as store_module

    flushed = []
    real_put = store_module.FeatureGroup.put

    def put(self, keys, features):
        flushed.append(len(keys))
        return real_put(self, keys, features)

    monkeypatch.setattr(store_module.FeatureGroup, "put", put)
    paths = files(env.a)[:6]
    extract_support(env.backbone, env.a, paths, views=10, store=FeatureStore(tmp_path / "c"), batch_size=11,
                    flush_rows=12, progress=False)  # fmt: skip
    # one image (11 rows) per batch, flushed when the 11 views together pass 12 rows: every 2 images
    assert sum(flushed) == 11 * len(paths) and max(flushed) <= 2


def test_cache_files_follow_the_umask(env, tmp_path):
    old = os.umask(0o002)
    try:
        extract(env.backbone, env.a, files(env.a), store=FeatureStore(tmp_path / "cache"), progress=False)
    finally:
        os.umask(old)
    made = [p for p in (tmp_path / "cache").rglob("*")]
    names = {p.name for p in made}
    assert MEMO_NAME in names and "group.json" in names and any(n.endswith(".safetensors") for n in names)
    for p in made:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o060 == 0o060, f"{p} has mode {oct(mode)}: not group-readable and writable"


# --------------------------------------------------------------------------- results know their weights


def test_new_weights_under_the_same_path_change_the_fingerprint(env, tmp_path, monkeypatch):
    model = tmp_path / "model"
    saved = save_tiny_openclip(model, "vit", name="fewclip-test-reliability-vit", seed=0)
    cfg = config(env, env.a, tmp_path / "cache", model=f"local-dir:{saved.folder}")
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


def test_a_warm_plan_only_stats_the_images(env, tmp_path, monkeypatch):
    cfg = config(env, env.a, tmp_path / "cache")
    plan(cfg, tmp_path / "out")
    reads = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: reads.append(p) or real(p))
    again = plan(cfg, tmp_path / "out")
    assert reads == [] and all(again.hashes[str(env.a)].values())


# --------------------------------------------------------------------------- kill and resume


@pytest.mark.slow
def test_a_killed_run_resumes_with_only_what_was_missing(env, tmp_path):
    """SIGKILL a real `fewclip run` once its first shard is on disk; the rerun encodes only the rest, and the
    results equal those of an uninterrupted run in a fresh cache."""
    classes = [f"class{i}" for i in range(8)]
    folder = make_folder_dataset(tmp_path / "big", classes, {"train": 40, "val": 2, "test": 3}, size=36, seed=3)
    cache, out = tmp_path / "cache", tmp_path / "out"
    options = ["run", "--dataset", "folder", "--path", str(folder), "--model", f"local-dir:{env.tiny.folder}",
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
