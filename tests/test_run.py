"""`fewclip run` and `fewclip extract` end to end: generated images in CoOp's layout, a tiny open_clip model
loaded back by path, the feature cache, results files, skipping and forcing, bad images."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors
import safetensors.torch
import torch

from conftest import PETS, make_pets
from fewclip import data
from fewclip.cli.main import main
from fewclip.cli.run import parse_method_sets
from fewclip.data.generate import write_images
from fewclip.errors import ExtractionError, ResultsError
from fewclip.features import bundle as bundle_io
from fewclip.features.extract import BadImage
from fewclip.features.pipeline import ExtractionOptions, FeaturePool, episode_bundle
from fewclip.io import file_sha256
from fewclip.metrics import confusion_matrix, macro_f1
from fewclip.models import BackboneSpec
from fewclip.models.tiny import save_tiny_openclip
from fewclip.protocols.config import DataConfig, MethodsConfig, ProtocolConfig, RunConfig
from fewclip.protocols.protocol import (
    LONGTAIL_METHOD_DEFAULTS,
    BaseToNew,
    base_new_scores,
    group_accuracies,
    harmonic_mean,
    shot_groups,
)
from fewclip.protocols.report import format_summary, mean_std, summarize
from fewclip.protocols.results import RESULT_FORMAT, publish_result, read_predictions, result_confusion
from fewclip.protocols.runner import run
from fewclip.protocols.transfer import domain_predictions

NAMES = PETS
BB = "local-dir-model"  # the results folder of the tiny model saved in <root>/model
COUNTS = {"train": 6, "val": 4, "test": 5}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    tiny = save_tiny_openclip(root / "model", "vit", name="fewclip-test-run-vit", seed=0)
    return SimpleNamespace(root=root, data_root=make_pets(root / "data", **COUNTS), model=f"local-dir:{tiny.folder}")


def run_argv(env, out: Path, cache: Path, *extra: str, data_root: Path | None = None) -> list[str]:
    return [
        "run", "--dataset", "oxford_pets", "--data-root", str(data_root or env.data_root), "--model", env.model,
        "--views", "2", "--cache-dir", str(cache), "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_run_end_to_end_skip_reuse_force_and_conflict(env, tmp_path, capsys):
    out, cache = tmp_path / "results", tmp_path / "cache"
    sweep = ["--shots", "1", "2", "--seeds", "1", "2"]
    assert main(run_argv(env, out, cache, "--method", "zero-shot", "tip-adapter", "gda", *sweep)) == 0
    printed = capsys.readouterr().out
    files = sorted((out / "oxford_pets" / BB / "fewshot").glob("*/shots_*-seed_*.json"))
    assert len(files) == 3 * 2 * 2

    splits = data.load_dataset("oxford_pets", env.data_root, warn=False)
    r = json.loads((out / "oxford_pets" / BB / "fewshot" / "gda" / "shots_2-seed_1.json").read_text())
    assert (r["dataset"], r["method"], r["shots"], r["seed"], r["selection"]) == ("oxford_pets", "gda", 2, 1, "val")
    assert r["split"]["sha256"] == splits.split_sha256 and r["setup"]["split_sha256"] == splits.split_sha256
    assert r["model"]["weights"]["sha256"] and r["versions"]["torch"] and r["versions"]["fewclip"]
    assert r["prompts"]["templates"] == ["a photo of a {}, a type of pet."] and r["test_tuned"] is False
    assert r["episode"]["support"] == 3 * 2 and r["episode"]["val"] == 3 * 2 and r["episode"]["test"] == 15
    episode = data.load_episode(out / r["episode"]["file"], splits)
    assert episode == data.sample_episode(splits, 2, 1)  # the subset file is the dassl draw, reloadable
    assert len(r["per_class_accuracy"]) == 3 and "alpha" in r["selected"]
    cal = r["calibration"]  # temperature fitted on val; test ECE reported only
    assert cal["source"] == "val" and cal["temperature"] == r["selected"]["temperature"] > 0
    assert all(math.isfinite(cal[k]) for k in ("val_ece_before", "val_ece_after", "test_ece_before", "test_ece_after"))
    assert r["accuracy"]["test_mean_per_class"] == pytest.approx(sum(r["per_class_accuracy"]) / 3)
    # the test rows' predictions are saved beside the result; the confusion matrix comes from them
    result_file = out / "oxford_pets" / BB / "fewshot" / "gda" / "shots_2-seed_1.json"
    predictions, labels, _ = read_predictions(result_file)
    assert r["predictions_file"] == f"shots_2-seed_1.{r['run_id']}.predictions.safetensors" and labels.numel() == 15
    assert r["predictions_sha256"] == file_sha256(result_file.with_name(r["predictions_file"]))
    assert 100 * float((predictions == labels).double().mean()) == pytest.approx(r["accuracy"]["test_accuracy"])
    capsys.readouterr()
    assert main(["results", "confusion", str(result_file), "--out", str(tmp_path / "cmat.safetensors")]) == 0
    shown = capsys.readouterr().out
    assert f"3 classes, mean per-class accuracy {r['accuracy']['test_mean_per_class']:.2f}%" in shown
    matrix = safetensors.torch.load_file(str(tmp_path / "cmat.safetensors"))["confusion"]
    assert matrix.shape == (3, 3) and torch.allclose(matrix.sum(1), torch.ones(3))
    assert 100 * matrix.diagonal().tolist()[0] == pytest.approx(r["per_class_accuracy"][0])
    assert safetensors.safe_open(str(tmp_path / "cmat.safetensors"), "pt").metadata()["classnames"].split("\n") == (
        splits.classnames
    )

    # the printed table is mean ± population std over the seeds' files
    folder = out / "oxford_pets" / BB / "fewshot"
    accs = [json.loads((folder / "gda" / f"shots_2-seed_{s}.json").read_text()) for s in (1, 2)]
    mean, std = mean_std([a["accuracy"]["test_accuracy"] for a in accs])
    gda_row = next(line for line in printed.splitlines() if line.startswith("gda "))
    assert f"{mean:.2f} ± {std:.2f}" in gda_row

    # the same command again: everything reused, nothing encoded
    assert main(run_argv(env, out, cache, "--method", "zero-shot", "tip-adapter", "gda", *sweep)) == 0
    assert "0 result(s) written, 12 reused, 0 failed; 0 image view(s) encoded" in capsys.readouterr().out
    # a new method on the same episodes: fitted, but every image comes from the cache
    assert main(run_argv(env, out, cache, "--method", "gda", "linear-probe", *sweep)) == 0
    assert "4 result(s) written, 4 reused, 0 failed; 0 image view(s) encoded" in capsys.readouterr().out
    before = (out / "oxford_pets" / BB / "fewshot" / "gda" / "shots_1-seed_1.json").stat().st_mtime_ns
    assert main(run_argv(env, out, cache, "--method", "gda", "--shots", "1", "--seeds", "1", "--force")) == 0
    assert "1 result(s) written, 0 reused" in capsys.readouterr().out
    assert (out / "oxford_pets" / BB / "fewshot" / "gda" / "shots_1-seed_1.json").stat().st_mtime_ns != before

    # a result of another setup is never overwritten silently
    conflict = run_argv(env, out, cache, "--method", "tip-adapter", "--shots", "1", "--seeds", "1")
    assert main([*conflict, "--set", "tip-adapter:search_step=[10,5]"]) == 2
    err = capsys.readouterr().err
    assert "shots_1-seed_1.json holds a result of another setup" in err and "overrides" in err and "--force" in err


def test_encodes_each_image_once_for_the_whole_sweep(env, tmp_path):
    config = RunConfig(
        DataConfig("oxford_pets", data_root=str(env.data_root)),
        BackboneSpec(env.model),
        MethodsConfig(["zero-shot"]),
        ProtocolConfig(shots=[1, 2], seeds=[1, 2]),
        ExtractionOptions(views=2, progress=False),
        cache_dir=str(tmp_path / "cache"),
    )
    report = run(config, tmp_path / "out", log=lambda m: None)
    splits = data.load_dataset("oxford_pets", env.data_root, warn=False)
    episodes = [data.sample_episode(splits, k, s) for k in (1, 2) for s in (1, 2)]
    support = {i.path for e in episodes for i in e.train}
    evaluation = {i.path for e in episodes for i in e.val} | {i.path for i in splits.test}
    assert report.encoded == 3 * len(support) + len(evaluation)  # 2 views + clean per support image
    again = run(config, tmp_path / "out2", log=lambda m: None)
    assert again.encoded == 0 and again.cached == report.encoded
    assert [r["accuracy"] for r in again.results] == [r["accuracy"] for r in report.results]


def test_bad_images_are_listed_or_skipped_and_recorded(env, tmp_path, capsys):
    data_root = tmp_path / "data"
    shutil.copytree(env.data_root, data_root)
    broken = data_root / "oxford_pets" / "images" / "beagle_test_3.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    argv = run_argv(env, tmp_path / "out", tmp_path / "cache", "--method", "zero-shot", "--shots", "1",
                    "--seeds", "1", data_root=data_root)  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "beagle_test_3.jpg" in err and "--skip-bad-images" in err
    assert main([*argv, "--skip-bad-images"]) == 0
    r = json.loads((tmp_path / "out/oxford_pets" / BB / "fewshot/zero-shot/shots_1-seed_1.json").read_text())
    assert [b["path"] for b in r["bad_images"]] == ["beagle_test_3.jpg"]
    assert r["episode"]["test"] == 14 and r["episode"]["dropped_bad_images"]["test"] == 1


def test_extract_writes_the_episode_bundle(env, tmp_path, capsys):
    out = tmp_path / "pets_k2_s1.safetensors"
    argv = ["extract", "--dataset", "oxford_pets", "--data-root", str(env.data_root), "--model", env.model,
            "--shots", "2", "--seed", "1", "--views", "3", "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    b = bundle_io.load(out)
    assert b.support_features.shape[:2] == (3, 6) and b.support_clean_features.shape[0] == 6
    assert torch.bincount(b.support_labels).tolist() == [2, 2, 2]
    assert b.val_labels.numel() == 6 and b.test_labels.numel() == 15 and list(b.classnames) == NAMES
    splits = data.load_dataset("oxford_pets", env.data_root, warn=False)
    meta = b.metadata
    assert (meta["dataset"], meta["shots"], meta["seed"], meta["views"]) == ("oxford_pets", "2", "1", "3")
    assert meta["split_sha256"] == splits.split_sha256 and meta["backbone"] == env.model
    capsys.readouterr()
    assert main(["fit", str(out), "--method", "tip-adapter", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bundle"]["classes"] == 3

    base = tmp_path / "base.safetensors"
    assert main([*argv[:-1], str(base), "--subsample", "base"]) == 0
    b = bundle_io.load(base)  # first ceil(3 / 2) = 2 labels, relabelled; test restricted to them
    assert list(b.classnames) == NAMES[:2] and b.test_labels.numel() == 10 and int(b.test_labels.max()) == 1


def test_episode_bundle_slices_the_pool_by_path():
    d = 4
    support = torch.arange(2 * 3 * d, dtype=torch.float32).reshape(2, 3, d) + 1
    pool = FeaturePool(
        support=support,
        support_clean=support[0] * 10,
        support_index={"a.jpg": 0, "b.jpg": 1, "c.jpg": 2},
        evaluation=torch.arange(3 * d, dtype=torch.float32).reshape(3, d) + 1,
        eval_index={"v.jpg": 0, "t1.jpg": 1, "t2.jpg": 2},
        bad=[BadImage("gone.jpg", "OSError")],
    )
    item = data.Item
    episode = data.Episode(
        dataset="x", train=[item("c.jpg", 1, "b"), item("gone.jpg", 0, "a"), item("a.jpg", 0, "a")],
        val=[item("v.jpg", 0, "a")], classnames=["a", "b"], k=1, seed=1, sampler="portable", split_sha256="0" * 64,
    )  # fmt: skip
    text = torch.eye(2, d)
    b, dropped = episode_bundle(pool, episode, [item("t2.jpg", 1, "b"), item("t1.jpg", 0, "a")], text)
    assert dropped == {"support": 1, "val": 0, "test": 0}
    assert torch.equal(b.support_features, support[:, [2, 0]]) and b.support_labels.tolist() == [1, 0]
    assert torch.equal(b.support_clean_features, support[0, [2, 0]] * 10)
    assert torch.equal(b.test_features, pool.evaluation[[2, 1]]) and b.test_labels.tolist() == [1, 0]
    assert torch.equal(b.val_features, pool.evaluation[[0]]) and b.metadata["views"] == "2"


def test_summary_is_mean_and_population_std_over_seeds():
    assert mean_std([70.0, 72.0, 77.0]) == pytest.approx((73.0, math.sqrt((9 + 1 + 16) / 3)))
    results = [
        {"method": "ape", "shots": 1, "seed": s, "accuracy": {"test_accuracy": a}} for s, a in [(2, 60.0), (1, 50.0)]
    ] + [{"method": "gda", "shots": 1, "seed": 1, "accuracy": {"test_accuracy": 40.0}}]
    rows = summarize(results)
    assert rows[0] == {"method": "ape", "shots": 1, "mean": 55.0, "std": 5.0, "seeds": [1, 2], "n": 2}
    table = format_summary(rows, seeds_expected=2)
    assert "55.00 ± 5.00" in table and "40.00 ± 0.00 (1 seed)" in table


def test_set_targets_every_method_or_one():
    sets = parse_method_sets(["epochs=5", "ape:search_step=[10,5,5]", "tip-adapter-f:lr=0.01"])
    assert sets == {"*": {"epochs": 5}, "ape": {"search_step": [10, 5, 5]}, "tip-adapter-f": {"lr": 0.01}}


# --------------------------------------------------------------------------- base-to-new


def test_base_new_scores_restrict_columns_by_hand():
    # classes 0, 1 base; 2, 3 new. Row 0 (base, label 0): a new column wins overall, base column 0 wins within base.
    logits = torch.tensor(
        [
            [5.0, 1.0, 9.0, 0.0],  # label 0: within base -> 0 (right); all columns -> 2 (wrong)
            [1.0, 2.0, 0.0, 0.0],  # label 1: within base -> 1 (right); all -> 1 (right)
            [9.0, 0.0, 1.0, 3.0],  # label 3: within new -> 3 (right); all -> 0 (wrong)
            [0.0, 0.0, 2.0, 1.0],  # label 3: within new -> 2 (wrong)
        ]
    )
    scores = base_new_scores(logits, torch.tensor([0, 1, 3, 3]), num_base=2)
    assert scores["base"] == 100.0 and scores["new"] == 50.0
    assert scores["harmonic_mean"] == pytest.approx(2 * 100 * 50 / 150)
    assert scores["base_all_classes"] == 50.0 and scores["new_all_classes"] == 0.0
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_base2new_summary_takes_hm_of_the_seed_means():
    results = [
        {
            "method": "gda",
            "shots": 16,
            "seed": s,
            "accuracy": {"base": b, "new": n, "base_all_classes": b / 2, "new_all_classes": n / 2},
        }
        for s, b, n in [(1, 80.0, 40.0), (2, 60.0, 80.0)]
    ]
    (row,) = BaseToNew().summarize(results)
    assert (row["base"], row["new"]) == (70.0, 60.0)
    assert row["harmonic_mean"] == pytest.approx(2 * 70 * 60 / 130)  # not the mean of per-seed HMs
    assert "64.62" in BaseToNew().format([row], 2)


def test_base2new_episode_keeps_every_class_but_supports_only_base(env):
    splits = data.load_dataset("oxford_pets", env.data_root, warn=False)
    episode = BaseToNew().episode(splits, 4, 1, sampler=None, val_kind="fewshot")
    assert episode.classnames == NAMES and episode.extra["base_classes"] == [0, 1]
    assert {i.label for i in episode.train} == {0, 1} and {i.label for i in episode.val} == {0, 1}
    full = data.sample_episode(splits, 4, 1)
    assert episode.train == [i for i in full.train if i.label < 2]
    imbalanced = BaseToNew(0.5).episode(splits, 4, 1, sampler=None, val_kind="fewshot")
    assert sorted(imbalanced.shots_per_class()[:2], reverse=True) == data.imbalance_counts(4, 2, 0.5) == [4, 2]
    with pytest.raises(ResultsError, match="linear-probe needs support images for every class.*gda"):
        BaseToNew().check_method("linear-probe")


@pytest.mark.slow
def test_run_base2new_end_to_end(env, tmp_path, capsys):
    out = tmp_path / "results"
    argv = run_argv(env, out, tmp_path / "cache", "--protocol", "base2new", "--method", "zero-shot", "gda",
                    "tip-adapter", "--shots", "2", "--seeds", "1", "2")  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "oxford_pets" / BB / "base2new" / "gda" / "shots_2-seed_1.json").read_text())
    assert r["protocol"] == "base2new" and r["base_classes"] == [0, 1] and r["new_classes"] == [2]
    assert r["episode"]["support"] == 4 and r["episode"]["test"] == 15  # base support only; every test image
    assert set(r["accuracy"]) >= {"base", "new", "harmonic_mean", "base_all_classes", "new_all_classes",
                                  "all_classes_harmonic_mean", "val_accuracy"}  # fmt: skip
    acc = r["accuracy"]
    assert acc["all_classes_harmonic_mean"] == pytest.approx(
        harmonic_mean(acc["base_all_classes"], acc["new_all_classes"])
    )
    header = ["method", "shots", "base", "new", "HM", "base-all", "new-all", "HM-all"]
    assert any(line.split() == header for line in printed.splitlines())
    assert "gda: base " in printed and "all_classes_harmonic_mean " in printed  # the per-cell log line
    summary = json.loads((out / "oxford_pets" / BB / "base2new" / "summary.json").read_text())["summary"]
    assert {"base_all_classes", "new_all_classes", "all_classes_harmonic_mean"} <= set(summary[0])
    imbalanced = run_argv(env, out, tmp_path / "cache", "--protocol", "base2new-imbalanced", "--imbalance-ratio",
                          "0.5", "--method", "gda", "--shots", "4", "--seeds", "1")  # fmt: skip
    assert main(imbalanced) == 0
    r = json.loads((out / "oxford_pets" / BB / "base2new-imbalanced/gda/shots_4-seed_1.json").read_text())
    assert r["setup"]["imbalance_ratio"] == 0.5 and r["episode"]["support"] == 4 + 2  # profile [4, 2] on the base
    capsys.readouterr()
    refused = run_argv(env, out, tmp_path / "cache", "--protocol", "base2new", "--method", "linear-probe")
    assert main(refused) == 2
    assert "cannot score new classes under base2new" in capsys.readouterr().err


# --------------------------------------------------------------------------- long-tail


def test_shot_groups_and_group_accuracies_by_hand():
    groups = shot_groups([150, 100, 20, 19, 101])
    assert groups == {"many": [0, 4], "medium": [1, 2], "few": [3]}
    accs = group_accuracies([90.0, 50.0, None, 10.0, 70.0], groups)
    assert accs == {"many": 80.0, "medium": 50.0, "few": 10.0}


def make_lt(root: Path, train_counts: list[int]) -> Path:
    """imagenet_lt/: train/<wnid>/, val/<wnid>/ images, ImageNet_LT_{train,val,test}.txt lists, classnames.txt."""
    folder = root / "imagenet_lt"
    wnids = [f"n0000000{c}" for c in range(len(train_counts))]
    lists = {"train": [], "val": [], "test": []}
    for c, w in enumerate(wnids):
        lists["train"] += [(f"train/{w}/{w}_{i}.JPEG", c) for i in range(train_counts[c])]
        lists["val"] += [(f"train/{w}/{w}_val{i}.JPEG", c) for i in range(2)]  # LT val comes from ImageNet train
        lists["test"] += [(f"val/{w}/ILSVRC_{c}_{i}.JPEG", c) for i in range(4)]
    write_images(folder, [item for rows in lists.values() for item in rows], len(wnids), size=32, seed=1)
    for split, rows in lists.items():
        (folder / f"ImageNet_LT_{split}.txt").write_text("".join(f"{p} {y}\n" for p, y in rows))
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(wnids, NAMES)))
    return root


@pytest.mark.slow
def test_run_longtail_end_to_end(env, tmp_path, capsys):
    data_root = make_lt(tmp_path / "data", [120, 30, 5])
    out = tmp_path / "results"
    argv = ["run", "--dataset", "imagenet_lt", "--data-root", str(data_root), "--model", env.model, "--views", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress", "--protocol", "longtail",
            "--method", "zero-shot", "gda", "tip-adapter", "candle", "--shots", "0", "4", "--seeds", "1",
            "--set", "candle:epochs=3"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "imagenet_lt" / BB / "longtail" / "gda" / "shots_0-seed_1.json").read_text())
    assert "protocol_defaults" not in r["setup"]
    # Candle gets the protocol's step budget; the user's --set still wins over it
    c = json.loads((out / "imagenet_lt" / BB / "longtail" / "candle" / "shots_0-seed_1.json").read_text())
    assert c["setup"]["protocol_defaults"] == LONGTAIL_METHOD_DEFAULTS["candle"] and c["overrides"] == {"epochs": 3}
    assert c["hyperparameters"]["iterations_per_epoch"] == LONGTAIL_METHOD_DEFAULTS["candle"]["iterations_per_epoch"]
    assert c["hyperparameters"]["epochs"] == 3 and len(c["history"]) == 3
    assert r["episode"]["support"] == 155 and r["episode"]["val"] == 6 and r["episode"]["test"] == 12
    assert r["shot_groups"] == {"many": 1, "medium": 1, "few": 1}
    per_class = r["per_class_accuracy"]
    assert (r["accuracy"]["many"], r["accuracy"]["medium"], r["accuracy"]["few"]) == tuple(per_class)
    capped = json.loads((out / "imagenet_lt" / BB / "longtail" / "tip-adapter" / "shots_4-seed_1.json").read_text())
    assert capped["episode"]["support"] == 12 and capped["shot_groups"] == r["shot_groups"]  # groups: full list
    assert any(line.split()[:2] == ["gda", "all"] for line in printed.splitlines())


# --------------------------------------------------------------------------- transfer


def test_domain_predictions_200way_restricts_to_the_variant_columns():
    logits = torch.tensor([[1.0, 5.0, 2.0], [3.0, 0.0, 1.0]])  # source space: 3 classes
    local = torch.tensor([1, 0])  # the variant's classes are source classes 0 and 2
    predicted, truth, in_source = domain_predictions(logits, local, [0, 2], "200way")
    assert (predicted.tolist(), truth.tolist(), in_source) == ([1, 0], [1, 0], False)  # local: both right
    predicted, truth, in_source = domain_predictions(logits, local, [0, 2], "1000way")
    assert (predicted.tolist(), truth.tolist(), in_source) == ([1, 0], [2, 0], True)  # row 0 predicts source class 1


@pytest.mark.slow
def test_run_transfer_domain_and_cross_dataset(env, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(env.data_root, root)  # oxford_pets: the cross-dataset target
    wnids = ["n01440764", "n01443537", "n01484850"]
    names = "".join(f"{w} {n}\n" for w, n in zip(wnids, ["tench", "goldfish", "great white shark"]))
    items = [(f"imagenet/images/train/{w}/{w}_{i}.JPEG", c) for c, w in enumerate(wnids) for i in range(8)]
    items += [(f"imagenet/images/val/{w}/val_{i}.JPEG", c) for c, w in enumerate(wnids) for i in range(3)]
    items += [(f"imagenet-adversarial/imagenet-a/{w}/a_{i}.jpg", c) for c, w in enumerate(wnids) if c != 1
              for i in range(3)]  # fmt: skip
    write_images(root, items, 3, size=32, seed=2)
    for folder in ("imagenet", "imagenet-adversarial"):
        (root / folder / "classnames.txt").write_text(names)
    out = tmp_path / "results"
    argv = ["run", "--dataset", "imagenet", "--data-root", str(root), "--model", env.model, "--views", "2",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress", "--protocol", "transfer",
            "--targets", "imagenet_a", "oxford_pets", "--method", "zero-shot", "gda", "tip-adapter",
            "--shots", "2", "--seeds", "1"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    a = json.loads((out / "imagenet" / BB / "transfer" / "imagenet_a" / "gda" / "shots_2-seed_1.json").read_text())
    assert (a["transfer"], a["variant_eval"], len(a["per_class_accuracy"])) == ("domain", "200way", 2)
    assert a["accuracy"]["test_accuracy"] == pytest.approx(sum(a["per_class_accuracy"]) / 2)  # 3 images per class
    pets_file = out / "imagenet" / BB / "transfer" / "oxford_pets" / "gda" / "shots_2-seed_1.json"
    pets = json.loads(pets_file.read_text())
    assert pets["transfer"] == "cross-dataset" and len(pets["per_class_accuracy"]) == 3
    # predictions are saved in the target's classes; the confusion matrix carries the target's names
    predictions, labels, _ = read_predictions(pets_file)
    assert labels.numel() == 15 and int(predictions.max()) < 3 and pets["predictions_file"].endswith(".safetensors")
    assert 100 * float((predictions == labels).double().mean()) == pytest.approx(pets["accuracy"]["test_accuracy"])
    matrix, names = result_confusion(pets_file)
    assert matrix.shape == (3, 3) and names == data.load_dataset("oxford_pets", root, warn=False).classnames
    predictions, labels, _ = read_predictions(out / "imagenet" / BB / "transfer/imagenet_a/gda/shots_2-seed_1.json")
    assert sorted(set(labels.tolist())) == [0, 1] and int(predictions.max()) < 2  # 200way: the variant's classes
    assert any(line.split()[:4] == ["method", "shots", "imagenet_a", "oxford_pets"] for line in printed.splitlines())
    assert main(argv) == 0 and "0 result(s) written, 6 reused, 0 failed" in capsys.readouterr().out
    refused = [*argv[: argv.index("--method")], "--method", "linear-probe", "--shots", "2", "--seeds", "1"]
    assert main(refused) == 2
    assert "cannot score oxford_pets's classes" in capsys.readouterr().err
    # Candle's published setting: the variant's classes join as separate new classes, scored within them
    copies = [*argv[: argv.index("--targets")], "--targets", "imagenet_a", "--method", "zero-shot", "--shots", "2",
              "--seeds", "1", "--variant-scoring", "new-classes"]  # fmt: skip
    copies[copies.index("--out") + 1] = str(tmp_path / "copies")
    assert main(copies) == 0
    copied = tmp_path / "copies/imagenet" / BB / "transfer/imagenet_a/zero-shot/shots_2-seed_1.json"
    r = json.loads(copied.read_text())
    assert r["transfer"] == "cross-dataset" and r["variant_eval"] is None and len(r["per_class_accuracy"]) == 2
    # all 1000 (here 3) source columns: predictions and labels in the source's classes, named by the source
    wide = [*argv[: argv.index("--targets")], "--targets", "imagenet_a", "--method", "zero-shot", "--shots", "2",
            "--seeds", "1", "--variant-eval", "1000way"]  # fmt: skip
    wide[wide.index("--out") + 1] = str(tmp_path / "wide")
    assert main(wide) == 0
    wide_file = tmp_path / "wide/imagenet" / BB / "transfer/imagenet_a/zero-shot/shots_2-seed_1.json"
    w = json.loads(wide_file.read_text())
    predictions, labels, _ = read_predictions(wide_file)
    assert sorted(set(labels.tolist())) == [0, 2]  # source indices of the variant's classes (no goldfish)
    assert 100 * float((predictions == labels).double().mean()) == pytest.approx(w["accuracy"]["test_accuracy"])
    matrix, names = result_confusion(wide_file)
    assert matrix.shape == (3, 3) and names == ["tench", "goldfish", "great white shark"]


def test_macro_f1_by_hand():
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1]), 4).float()  # class 3: no rows, no predictions
    # F1: class 0 = 2·1/(1 + 2), class 1 = 2·1/(3 + 1), class 2 = 0/(0 + 1); class 3 undefined, left out
    assert macro_f1(logits, torch.tensor([0, 0, 1, 2]), 4) == pytest.approx(100 * (2 / 3 + 0.5 + 0) / 3)


def test_base_eval_all_classes_makes_the_released_scoring_the_headline():
    logits = torch.tensor([[5.0, 1.0, 9.0], [1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 1, 2])  # 3 classes: base 0, 1; new 2
    default, _ = BaseToNew().evaluate(logits, labels, 3)
    released, extra = BaseToNew(base_eval="all_classes").evaluate(logits, labels, 3)
    assert (default["base"], default["new"]) == (100.0, 100.0)
    assert (released["base"], released["base_within_base"], released["new"]) == (50.0, 100.0, 100.0)
    assert released["harmonic_mean"] == pytest.approx(2 * 50 * 100 / 150) and extra["base_eval"] == "all_classes"
    assert BaseToNew(base_eval="all_classes").params() == {"base_eval": "all_classes"}  # part of the fingerprint


def test_base2new_predictions_and_per_class_accuracy_follow_the_column_scoring():
    logits = torch.tensor(
        [
            [5.0, 1.0, 9.0, 0.0],  # label 0: within base -> 0; all columns -> 2
            [9.0, 0.0, 1.0, 3.0],  # label 3: within new -> 3 (all columns would say 0)
            [0.0, 0.0, 2.0, 1.0],  # label 3: within new -> 2
        ]
    )
    labels = torch.tensor([0, 3, 3])
    assert BaseToNew().predictions(logits, labels).tolist() == [0, 3, 2]
    assert BaseToNew(base_eval="all_classes").predictions(logits, labels).tolist() == [2, 3, 2]
    _, extra = BaseToNew().evaluate(logits, labels, 4)
    assert extra["per_class_accuracy"] == [100.0, None, None, 50.0]
    _, released = BaseToNew(base_eval="all_classes").evaluate(logits, labels, 4)
    assert released["per_class_accuracy"] == [0.0, None, None, 50.0]


def test_confusion_matrix_by_hand():
    predictions, labels = torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 2])
    counts = confusion_matrix(predictions, labels, 4, normalize=False)
    assert counts.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    rows = confusion_matrix(predictions, labels, 4)
    assert rows.tolist() == [[0.5, 0.5, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]  # class 3: no rows


def test_result_confusion_takes_classes_from_the_predictions_file(tmp_path):
    predictions, labels = torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 2])
    result = tmp_path / "shots_1-seed_1.json"
    record = {"format": RESULT_FORMAT, "per_class_accuracy": [50.0, 100.0, 0.0, None]}
    publish_result(result, record, (predictions, labels, ["a", "b", "c", "d", "e"]))  # 5 names: C = 5
    matrix, names = result_confusion(result)
    assert names == ["a", "b", "c", "d", "e"] and matrix.shape == (5, 5) and matrix[0, :2].tolist() == [0.5, 0.5]
    publish_result(result, record, (predictions, labels, None))  # no names recorded: C from the per-class accuracies
    matrix, names = result_confusion(result)
    assert names is None and matrix.shape == (4, 4)
    # a result written before results recorded their predictions' hash reads the fixed name beside it
    result.write_text(json.dumps(record))
    result.with_name("shots_1-seed_1.predictions.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ResultsError, match="not a readable predictions file"):
        result_confusion(result)


# --------------------------------------------------------------------------- the staged runner


def test_a_backbone_sweep_into_one_folder_keeps_each_backbone_apart(env, tmp_path, capsys):
    other = save_tiny_openclip(tmp_path / "model2", "vit", name="fewclip-test-run-vit-2", seed=5)
    out, cache = tmp_path / "results", tmp_path / "cache"
    sweep = ["--method", "zero-shot", "tip-adapter", "--shots", "1", "--seeds", "1"]
    assert main(run_argv(env, out, cache, *sweep)) == 0
    second = run_argv(env, out, cache, *sweep)
    second[second.index("--model") + 1] = f"local-dir:{other.folder}"
    assert main(second) == 0  # no conflict: the backbone is a folder of the results tree
    first = json.loads((out / "oxford_pets" / BB / "fewshot/zero-shot/shots_1-seed_1.json").read_text())
    again = json.loads((out / "oxford_pets/local-dir-model2/fewshot/zero-shot/shots_1-seed_1.json").read_text())
    assert first["backbone"] == BB and again["backbone"] == "local-dir-model2"
    assert first["model"]["weights"]["sha256"] != again["model"]["weights"]["sha256"]
    # both read the one episode file, shared by every backbone
    assert first["episode"]["file"] == again["episode"]["file"] and (out / first["episode"]["file"]).is_file()
    capsys.readouterr()


def test_a_failing_cell_is_recorded_and_the_run_goes_on(env, tmp_path, capsys):
    out, cache = tmp_path / "results", tmp_path / "cache"
    # a learning rate of 1e30 is a valid value whose training loss becomes NaN inside the fit
    argv = run_argv(env, out, cache, "--method", "zero-shot", "tip-adapter-f", "--shots", "1", "2", "--seeds", "1",
                    "--set", "tip-adapter-f:epochs=2", "--set", "tip-adapter-f:lr=1e30")  # fmt: skip
    assert main(argv) == 1  # some cells failed
    captured = capsys.readouterr()
    assert "2 result(s) written, 0 reused, 2 failed" in captured.out and "2 cell(s) failed" in captured.err
    folder = out / "oxford_pets" / BB / "fewshot"
    failed = json.loads((folder / "tip-adapter-f/shots_2-seed_1.json").read_text())
    assert failed["status"] == "failed" and failed["error"]["type"] == "MethodError"
    assert "lower lr (now 1e+30)" in failed["error"]["message"]
    assert failed["setup"]["overrides"] == {"epochs": 2, "lr": 1e30}
    assert not list(folder.glob("tip-adapter-f/shots_2-seed_1.*predictions.safetensors"))
    summary = json.loads((folder / "summary.json").read_text())
    assert [r["method"] for r in summary["summary"]] == ["zero-shot", "zero-shot"] and len(summary["failed"]) == 2
    # the next run skips what finished and tries the failed cells again (here, with a valid value)
    fixed = [*argv[: argv.index("--set")], "--set", "tip-adapter-f:epochs=2", "--set", "tip-adapter-f:lr=1e-3"]
    assert main(fixed) == 0
    assert "2 result(s) written, 2 reused, 0 failed" in capsys.readouterr().out
    assert json.loads((folder / "tip-adapter-f/shots_2-seed_1.json").read_text())["status"] == "ok"


def test_transfer_results_have_the_schema_of_every_other_protocol(env, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(env.data_root, root)
    wnids = ["n01440764", "n01443537"]
    items = [(f"imagenet/images/train/{w}/{w}_{i}.JPEG", c) for c, w in enumerate(wnids) for i in range(4)]
    items += [(f"imagenet/images/val/{w}/val_{i}.JPEG", c) for c, w in enumerate(wnids) for i in range(2)]
    write_images(root, items, 2, size=32, seed=2)
    (root / "imagenet" / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(wnids, ["tench", "fish"])))
    common = ["--model", env.model, "--views", "1", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
              "--method", "tip-adapter", "--shots", "1", "--seeds", "1", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(["run", "--dataset", "oxford_pets", "--data-root", str(root), *common]) == 0
    assert main(["run", "--dataset", "imagenet", "--data-root", str(root), *common, "--protocol", "transfer",
                 "--targets", "oxford_pets"]) == 0  # fmt: skip
    few = json.loads((tmp_path / "out/oxford_pets" / BB / "fewshot/tip-adapter/shots_1-seed_1.json").read_text())
    tra = json.loads(
        (tmp_path / "out/imagenet" / BB / "transfer/oxford_pets/tip-adapter/shots_1-seed_1.json").read_text()
    )
    assert set(few) <= set(tra) and set(tra) - set(few) == {"transfer", "variant_eval"}
    for key in ("episode", "prompts", "split", "extraction", "seconds", "selected", "hyperparameters"):
        assert set(few[key]) == set(tra[key]), key
    assert (tmp_path / "out" / tra["episode"]["file"]).is_file() and tra["target"] == "oxford_pets"
    assert few["target"] is None and tra["history"] is None and tra["status"] == few["status"] == "ok"


def test_a_toml_configuration_runs_like_the_options_and_options_override_it(env, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        f"""
cache_dir = "{tmp_path / "cache"}"
[data]
dataset = "oxford_pets"
data_root = "{env.data_root}"
[backbone]
model = "{env.model}"
[extraction]
views = 2
progress = false
[methods]
names = ["zero-shot", "gda"]
overrides = {{ gda = {{ alpha_grid = [0.1, 1.0, 10.0] }} }}
[protocol]
shots = [1]
seeds = [1, 2]
"""
    )
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "a")]) == 0
    argv = run_argv(env, tmp_path / "b", tmp_path / "cache", "--method", "zero-shot", "gda", "--shots", "1",
                    "--seeds", "1", "2", "--set", "gda:alpha_grid=[0.1,1.0,10.0]")  # fmt: skip
    assert main(argv) == 0
    for seed in (1, 2):
        name = f"fewshot/gda/shots_1-seed_{seed}.json"
        a = json.loads((tmp_path / "a/oxford_pets" / BB / name).read_text())
        b = json.loads((tmp_path / "b/oxford_pets" / BB / name).read_text())
        assert a["config_sha256"] == b["config_sha256"] and a["accuracy"] == b["accuracy"]
    # an option given on the command line wins over the file
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "c"), "--seeds", "3", "--method", "gda"]) == 0
    assert [p.name for p in sorted((tmp_path / "c/oxford_pets" / BB / "fewshot").glob("*/*.json"))] == [
        "shots_1-seed_3.json"
    ]
    # --set adds to the file's overrides (tables merge key by key), a value it names wins
    argv = ["run", "--config", str(config), "--out", str(tmp_path / "e"), "--method", "gda", "--seeds", "1"]
    assert main([*argv, "--set", "gda:init_alpha=2.0", "--set", "gda:alpha_grid=[1.0]"]) == 0
    e = json.loads((tmp_path / "e/oxford_pets" / BB / "fewshot/gda/shots_1-seed_1.json").read_text())
    assert e["overrides"] == {"alpha_grid": [1.0], "init_alpha": 2.0}
    capsys.readouterr()
    config.write_text(config.read_text().replace("views = 2", "view = 2"))
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "[extraction]" in err and "'view'" in err and "views" in err
    assert main(["run", "--out", str(tmp_path / "d")]) == 2
    assert "--dataset, --model, --method required" in capsys.readouterr().err


def test_a_bad_hyperparameter_is_refused_before_any_image_is_encoded(env, tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = run_argv(env, tmp_path / "out", cache, "--method", "zero-shot", "gda", "--shots", "1", "--seeds", "1",
                    "--set", 'gda:alpha_grid=["x"]')  # fmt: skip
    assert main(argv) == 2
    assert "gda: alpha_grid=['x'] is not valid" in capsys.readouterr().err
    assert not cache.exists() and not (tmp_path / "out").exists()


def test_run_config_round_trips_through_plain_data_and_names_what_is_missing():
    config = RunConfig.from_dict(
        {"data": {"dataset": "dtd"}, "backbone": {"model": "RN50", "pretrained": "openai"}, "cache_dir": "/c",
         "methods": {"names": ["ape"], "overrides": {"ape": {"search_step": [10, 5, 5]}}}}
    )  # fmt: skip
    assert config.backbone.cache_dir == "/c"  # converted checkpoints go to the run's cache folder too
    assert RunConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ResultsError, match=r"\[data\]: dataset must be given"):
        RunConfig.from_dict({"data": {}, "backbone": {"model": "RN50"}})
    with pytest.raises(ResultsError, match=r"unknown section\(s\) \['method'\]"):
        RunConfig.from_dict({"data": {"dataset": "dtd"}, "backbone": {"model": "RN50"}, "method": {}})
    with pytest.raises(ResultsError, match=r"\[data\]: dataset = 3 is not valid; expected str"):
        RunConfig.from_dict({"data": {"dataset": 3}, "backbone": {"model": "RN50"}})
    with pytest.raises(ResultsError, match=r"\[backbone\]: trust_checkpoint = 1 is not valid; expected bool"):
        RunConfig.from_dict({"data": {"dataset": "dtd"}, "backbone": {"model": "RN50", "trust_checkpoint": 1}})
    with pytest.raises(ExtractionError, match="views='ten' is not valid"):
        RunConfig.from_dict({"data": {"dataset": "dtd"}, "backbone": {"model": "RN50"}, "extraction": {"views": "ten"}})


@pytest.mark.parametrize(
    "option, message",
    [
        (["--views", "0"], "extraction: views=0 is not valid; expected an integer ≥ 1 (--views)"),
        (["--batch-size", "0"], "extraction: batch_size=0 is not valid; expected an integer ≥ 1 (--batch-size)"),
        (["--workers", "-1"], "extraction: num_workers=-1 is not valid"),
    ],
)
def test_bad_extraction_options_are_one_line_errors_before_any_work(env, tmp_path, capsys, option, message):
    argv = run_argv(env, tmp_path / "out", tmp_path / "cache", "--method", "zero-shot", "--shots", "1", "--seeds", "1")
    argv[argv.index("--views") : argv.index("--views") + 2] = []
    assert main([*argv, *option]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "cache").exists()
