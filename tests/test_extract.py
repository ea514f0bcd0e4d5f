"""Feature extraction and the on-disk cache: reuse, resume, atomic writes, determinism, corrupt images."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from fewclip.cli.cache import add_parsers  # noqa: E402
from fewclip.features.extract import BadImagesError, extract, extract_support, load_image  # noqa: E402
from fewclip.features.store import FeatureStore, FeatureStoreError, default_cache_dir  # noqa: E402
from fewclip.models import load_backbone  # noqa: E402
from fewclip.models.tiny import save_tiny_openclip  # noqa: E402

N = 10


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    saved = save_tiny_openclip(tmp_path_factory.mktemp("model"), "vit", name="fewclip-test-extract-vit", seed=3)
    return load_backbone(saved.config_name, str(saved.weights))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """N small images of varied sizes in two class folders; returns (root, relative paths)."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(N):
        rel = f"class_{i % 2}/img_{i}.{'png' if i % 3 == 0 else 'jpg'}"
        (root / rel).parent.mkdir(exist_ok=True)
        h, w = 36 + 4 * (i % 3), 44 + 2 * i
        pixels = (torch.rand(h, w, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(root / rel)
        paths.append(rel)
    return root, paths


def direct(backbone, root, paths):
    return backbone.encode_images(torch.stack([backbone.preprocess(load_image(root / p)) for p in paths]))


def test_clean_features_equal_direct_encoding(backbone, dataset):
    root, paths = dataset
    out = extract(backbone, root, paths, batch_size=4, progress=False)
    assert out.features.shape == (N, 16) and out.kept == list(range(N)) and out.bad == []
    assert out.encoded == N and out.cached == 0
    torch.testing.assert_close(out.features, direct(backbone, root, paths), atol=1e-5, rtol=1e-5)


def test_cache_reuse_second_run_encodes_nothing(backbone, dataset, tmp_path):
    root, paths = dataset
    store = FeatureStore(tmp_path / "cache")
    kw = dict(store=store, batch_size=8, progress=False)
    first = extract_support(backbone, root, paths, views=3, **kw)
    assert first.features.shape == (3, N, 16) and first.clean.shape == (N, 16)
    assert first.encoded == 4 * N and first.cached == 0
    again = extract_support(backbone, root, paths, views=3, **{**kw, "store": FeatureStore(tmp_path / "cache")})
    assert again.encoded == 0 and again.cached == 4 * N
    torch.testing.assert_close(again.features, first.features)
    torch.testing.assert_close(again.clean, first.clean)
    # a 2-shot subset, another order, and the clean view for evaluation: all from the cache
    subset = [paths[7], paths[2], paths[4]]
    sub = extract_support(backbone, root, subset, views=3, **kw)
    assert sub.encoded == 0
    torch.testing.assert_close(sub.features, first.features[:, [7, 2, 4]])
    test = extract(backbone, root, paths, **kw)
    assert test.encoded == 0
    torch.testing.assert_close(test.features, first.clean)
    # more views: only the new view is encoded; another augmentation seed re-encodes augmented views only
    more = extract_support(backbone, root, paths, views=4, **kw)
    assert more.encoded == N
    other_seed = extract_support(backbone, root, paths, views=2, seed=1, **kw)
    assert other_seed.encoded == 2 * N
    assert not torch.allclose(other_seed.features[0], first.features[0])
    # rows are keyed by content, not by path: the same files under another root and other names are cached
    copy = tmp_path / "copy"
    for i, p in enumerate(paths):
        (copy / f"renamed_{i}{os.path.splitext(p)[1]}").parent.mkdir(parents=True, exist_ok=True)
        (copy / f"renamed_{i}{os.path.splitext(p)[1]}").write_bytes((root / p).read_bytes())
    moved = extract_support(backbone, copy, sorted(q.name for q in copy.iterdir()), views=3, **kw)
    assert moved.encoded == 0 and moved.cached == 4 * N


def test_augmented_views_are_deterministic_across_batching_and_workers(backbone, dataset):
    root, paths = dataset
    a = extract_support(backbone, root, paths, views=2, batch_size=3, num_workers=0, progress=False)
    b = extract_support(backbone, root, paths, views=2, batch_size=16, num_workers=2, progress=False)
    c = extract_support(backbone, root, paths[::-1], views=2, batch_size=5, num_workers=0, progress=False)
    torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.features, c.features.flip(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.clean, b.clean, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a.features[0], a.features[1])  # views differ from each other
    assert not torch.allclose(a.features[0], a.clean)  # and from the clean view
    single = extract(backbone, root, paths, view=1, progress=False)
    torch.testing.assert_close(single.features, a.features[1], atol=1e-5, rtol=1e-5)


def test_resume_after_interruption(backbone, dataset, tmp_path, monkeypatch):
    root, paths = dataset
    store = FeatureStore(tmp_path / "cache")
    calls = {"n": 0}
    real = backbone.encode_images

    def flaky(images):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(images)

    monkeypatch.setattr(backbone, "encode_images", flaky)
    with pytest.raises(KeyboardInterrupt):
        extract(backbone, root, paths, store=store, batch_size=2, progress=False)
    monkeypatch.undo()
    group = next(iter(store._groups.values()))
    assert len(group) == 4  # two batches of two were encoded and saved before the interruption
    resumed = extract(backbone, root, paths, store=FeatureStore(tmp_path / "cache"), batch_size=2, progress=False)
    assert resumed.encoded == N - 4 and resumed.cached == 4
    torch.testing.assert_close(resumed.features, direct(backbone, root, paths), atol=1e-5, rtol=1e-5)


def test_failed_writes_leave_no_partial_files(backbone, dataset, tmp_path, monkeypatch):
    root, paths = dataset
    store = FeatureStore(tmp_path / "cache")

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 17)  # half a file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr("fewclip.features.store.save_file", crash)
    with pytest.raises(FeatureStoreError, match="cannot write to the feature cache .*disk full"):
        extract(backbone, root, paths, store=store, progress=False)
    monkeypatch.undo()
    kept = ("group.json", "file-hashes.sqlite3")  # the spec and the hash memo, both complete
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name not in kept]
    assert leftovers == []
    out = extract(backbone, root, paths, store=FeatureStore(tmp_path / "cache"), progress=False)
    assert out.encoded == N


def test_unreadable_shard_is_ignored_and_recomputed(backbone, dataset, tmp_path, caplog):
    root, paths = dataset
    store = FeatureStore(tmp_path / "cache")
    extract(backbone, root, paths, store=store, progress=False)
    shard = next((tmp_path / "cache").rglob("*.safetensors"))
    shard.write_bytes(b"garbage")
    with caplog.at_level("WARNING", logger="fewclip.features"):
        out = extract(backbone, root, paths, store=FeatureStore(tmp_path / "cache"), progress=False)
    assert f"cache shard {shard} is unreadable or truncated" in caplog.text
    assert out.encoded == N
    assert not shard.exists() and (shard.parent / "quarantine" / shard.name).read_bytes() == b"garbage"


def test_corrupt_images_are_listed_together_or_skipped(backbone, dataset, tmp_path):
    good_root, good_paths = dataset
    root = tmp_path / "images"
    for p in good_paths:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes((good_root / p).read_bytes())
    jpg = (root / good_paths[1]).read_bytes()
    (root / "class_0/truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "class_1/not_an_image.jpg").write_text("hello")
    paths = good_paths[:3] + ["class_0/truncated.jpg", "class_1/missing.png", "class_1/not_an_image.jpg"]
    store = FeatureStore(tmp_path / "cache")

    with pytest.raises(BadImagesError) as err:
        extract_support(backbone, root, paths, views=2, store=store, progress=False)
    message = str(err.value)
    for bad in paths[3:]:
        assert bad in message
    assert "--skip-bad-images" in message and len(err.value.bad) == 3

    out = extract_support(backbone, root, paths, views=2, store=store, skip_bad_images=True, progress=False)
    assert out.encoded == 0  # the readable images were cached by the failed run
    assert out.kept == [0, 1, 2] and out.features.shape == (2, 3, 16) and out.clean.shape == (3, 16)
    report = [b.as_dict() for b in out.bad]
    assert [b["path"] for b in report] == paths[3:]
    assert "FileNotFoundError" in report[1]["error"]


def test_store_round_trip_and_validation(tmp_path):
    store = FeatureStore(tmp_path / "c", storage_dtype="float16")
    group = store.group({"kind": "image", "view": "clean"})
    x = torch.randn(5, 8)
    group.put([f"k{i}" for i in range(5)], x)
    torch.testing.assert_close(group.get(["k3", "k0"]), x[[3, 0]].half().float())
    assert group.has(["k1", "zz"]) == [True, False]
    with pytest.raises(KeyError, match="not in cache group"):
        group.get(["zz"])
    with pytest.raises(FeatureStoreError, match="D = 4"):
        group.put(["a"], torch.randn(1, 4))
    with pytest.raises(FeatureStoreError, match="storage_dtype"):
        FeatureStore(tmp_path, storage_dtype="int8")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FeatureStoreError, match="not a folder"):
        FeatureStore(tmp_path / "file")


def test_cache_info_cli(backbone, dataset, tmp_path, monkeypatch, capsys):
    root, paths = dataset
    monkeypatch.setenv("FEWCLIP_CACHE", str(tmp_path / "envcache"))
    assert default_cache_dir() == tmp_path / "envcache"
    store = FeatureStore()
    extract_support(backbone, root, paths, views=2, store=store, progress=False)

    parser = argparse.ArgumentParser(prog="fewclip")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cache", "info", "--json"])
    assert args.func(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["root"] == str(tmp_path / "envcache")
    assert info["feature_rows"] == 3 * N and len(info["groups"]) == 3 and info["total_bytes"] > 0
    assert {g["view"] for g in info["groups"]} == {0, 1, "clean"}
    assert all(g["model"] == "fewclip-test-extract-vit" for g in info["groups"])

    args = parser.parse_args(["cache", "info", "--cache-dir", str(tmp_path / "envcache")])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "30 rows in 3 groups" in text and "fewclip-test-extract-vit" in text
    args = parser.parse_args(["cache", "info", "--cache-dir", str(tmp_path / "nothing")])
    assert args.func(args) == 0
    assert "nothing cached" in capsys.readouterr().out
