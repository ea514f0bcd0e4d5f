"""`fewclip run --save-models` and `fewclip predict`: a deployable classifier file reproduces the run's test
predictions from the images, refuses another backbone, and reports unreadable images without stopping."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import PETS, make_pets
from fewclip.cli.main import main
from fewclip.errors import ClassifierError
from fewclip.models.tiny import save_tiny_openclip
from fewclip.protocols.deploy import load_classifier
from fewclip.protocols.results import read_predictions, read_result

NAMES = PETS
BB = "local-dir-model"  # the results folder of the tiny model saved in <root>/model
COUNTS = {"train": 6, "val": 4, "test": 5}


pytestmark = pytest.mark.filterwarnings("ignore::fewclip.errors.DataWarning")

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    tiny = save_tiny_openclip(root / "model", "vit", name="fewclip-test-predict-vit", seed=0)
    data_root = make_pets(root / "data", **COUNTS)
    out, cache = root / "results", root / "cache"
    argv = [
        "run", "--dataset", "oxford_pets", "--data-root", str(data_root), "--model", f"local-dir:{tiny.folder}",
        "--views", "2", "--cache-dir", str(cache), "--out", str(out), "--no-progress", "--shots", "2",
        "--seeds", "1", "--method", "zero-shot", "tip-adapter", "--save-models",
    ]  # fmt: skip
    assert main(argv) == 0
    folder = out / "oxford_pets" / BB / "fewshot"
    images = data_root / "oxford_pets" / "images"
    test = [images / f"{NAMES[y]}_test_{i}.jpg" for y in range(len(NAMES)) for i in range(COUNTS["test"])]
    return SimpleNamespace(root=root, folder=folder, test=test, tiny=tiny)


def result_of(env, method: str) -> Path:
    return env.folder / method / "shots_2-seed_1.json"


def classifier_of(env, method: str) -> Path:
    record = read_result(result_of(env, method))
    path = result_of(env, method).with_name(record["classifier_file"])
    assert path.is_file()
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["classifier_sha256"]
    return path


def predict_cli(*args: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fewclip", "predict", *args, "--no-progress"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
    )


@pytest.mark.parametrize("method", ["zero-shot", "tip-adapter"])
def test_predict_reproduces_the_runs_test_predictions(env, method):
    predictions, _, names = read_predictions(result_of(env, method))
    expected = [names[i] for i in predictions.tolist()]
    rows = load_classifier(classifier_of(env, method)).predict_images([str(p) for p in env.test], progress=False)
    assert [r["path"] for r in rows] == [str(p) for p in env.test]
    assert [r["class"] for r in rows] == expected


@pytest.mark.slow  # several fewclip predict subprocesses
def test_cli_writes_csv_and_jsonl_that_parse(env, tmp_path):
    clf = classifier_of(env, "tip-adapter")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in env.test[:4]) + "\n")
    done = predict_cli(str(clf), str(listing), "--out", str(tmp_path / "p.csv"), "--top-k", "2")
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == [str(p) for p in env.test[:4]]
    assert all(r["class"] in NAMES and 0 < float(r["probability"]) <= 1 for r in rows)
    folder = env.test[0].parent
    done = predict_cli(str(clf), str(folder), "--out", str(tmp_path / "p.jsonl"))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(lines) == sum(COUNTS.values()) * len(NAMES)  # every image of the folder, recursively
    for row in lines:
        probs = [p for _, p in row["top_k"]]
        assert len(probs) == len(NAMES) and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert row["top_k"][0] == [row["class"], row["probability"]]
    done = predict_cli(str(clf), str(env.test[0]))  # no --out: JSON lines on stdout
    assert done.returncode == 0 and json.loads(done.stdout.splitlines()[0])["path"] == str(env.test[0])


def test_a_corrupt_image_is_reported_and_the_rest_predicted(env, tmp_path):
    clf = classifier_of(env, "zero-shot")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    inputs = [str(env.test[0]), str(bad), str(env.test[1])]
    done = predict_cli(str(clf), *inputs, "--out", str(tmp_path / "p.jsonl"))
    assert done.returncode == 1
    assert "1 of 3 image(s) unreadable" in done.stderr and str(bad) in done.stderr
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == inputs
    assert rows[1]["error"] and rows[1]["class"] is None
    assert rows[0]["class"] in NAMES and rows[2]["class"] in NAMES and not rows[0]["error"]


def test_a_classifier_of_other_weights_is_refused_naming_both_hashes(env, tmp_path):
    clf = classifier_of(env, "zero-shot")
    tensors = load_file(str(clf))
    with safe_open(str(clf), "pt") as fh:
        meta = dict(fh.metadata())
    found = json.loads(meta["weights"])["sha256"]
    meta["weights"] = json.dumps({"sha256": "0" * 64})
    forged = tmp_path / "forged.classifier.safetensors"
    save_file(tensors, str(forged), metadata=meta)
    with pytest.raises(ClassifierError) as err:
        load_classifier(forged).predict_images([str(env.test[0])], progress=False)
    assert "0" * 64 in str(err.value) and found in str(err.value)
    done = predict_cli(str(forged), str(env.test[0]))
    assert done.returncode == 2 and found in done.stderr


def test_predict_features_is_the_softmax_of_the_models_logits(env):
    clf = load_classifier(classifier_of(env, "tip-adapter"))
    features = torch.randn(7, clf.text_weights.shape[1])
    rows = clf.predict_features(features, top_k=3)
    probs = torch.softmax(clf.model.predict_logits(features) / clf.temperature, dim=1)
    for i, row in enumerate(rows):
        assert row["class"] == NAMES[int(probs[i].argmax())] == clf.classnames[int(probs[i].argmax())]
        assert row["probability"] == pytest.approx(float(probs[i].max()), abs=1e-7)
        assert [p for _, p in row["top_k"]] == pytest.approx(probs[i].sort(descending=True).values[:3].tolist())
    assert clf.classnames == NAMES and clf.prompts["templates"]


def test_top_level_load_classifier_is_lazy():
    code = "import sys, fewclip; assert 'torch' not in sys.modules; f = fewclip.load_classifier; assert callable(f)"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
    assert done.returncode == 0
