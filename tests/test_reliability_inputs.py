"""Bad input refused before work (issue 13 §3: option values, hyperparameters, bundles).

Each refusal is checked for what it names (the option or hyperparameter, the value, the fix) and for what it did not
do: no feature cache and no results folder exist afterwards. Generated images in CoOp's layout and a tiny open_clip
model saved to disk; synthetic bundles for ``fewclip fit``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

from fewclip import methods as M
from fewclip.cli.main import main
from fewclip.data.generate import write_images
from fewclip.errors import BundleError, MethodError
from fewclip.features import bundle as bundle_io
from fewclip.features.synthetic import make_synthetic_bundle
from fewclip.methods import cache as cache_module
from fewclip.methods.params import Interval, Optional, SequenceOf, constraint_of
from fewclip.methods.search import search_memory
from fewclip.models.tiny import save_tiny_openclip

NAMES = ["abyssinian", "beagle", "chihuahua"]


def make_pets(root: Path, train: list[int]) -> Path:
    """oxford_pets/images + split_zhou_OxfordPets.json with ``train[y]`` training images of class y, 2 val, 3 test."""
    folder = root / "oxford_pets"
    counts = {"train": train, "val": [2] * len(NAMES), "test": [3] * len(NAMES)}
    split = {
        s: [[f"{NAMES[y]}_{s}_{i}.jpg", y, NAMES[y]] for y in range(len(NAMES)) for i in range(n[y])]
        for s, n in counts.items()
    }
    write_images(folder / "images", [(p, y) for rows in split.values() for p, y, _ in rows], len(NAMES), size=32)
    (folder / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    tiny = save_tiny_openclip(root / "model", "vit", name="fewclip-test-inputs-vit", seed=0)
    return SimpleNamespace(
        model=f"local-dir:{tiny.folder}",
        data=make_pets(root / "data", [6, 6, 6]),
        uneven=make_pets(root / "uneven", [6, 2, 6]),
    )


def run_argv(env, tmp_path: Path, *extra: str, data: Path | None = None) -> list[str]:
    """``fewclip run`` on the generated data, one shot and one seed unless ``extra`` gives them."""
    episodes = [opt for opt, value in (("--shots", "1"), ("--seeds", "1")) if opt not in extra for opt in (opt, value)]
    return [
        "run", "--dataset", "oxford_pets", "--data-root", str(data or env.data), "--model", env.model,
        "--views", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--no-progress",
        *episodes, *extra,
    ]  # fmt: skip


def refused(capsys, argv: list[str]) -> str:
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
def test_bad_run_options_are_refused_before_anything_is_written(env, tmp_path, capsys, case):
    extra, expected = PLAN_REFUSALS[case]
    method = [] if "--method" in extra else ["--method", "zero-shot"]
    message = refused(capsys, run_argv(env, tmp_path, *method, *extra))
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
    env, tmp_path, capsys, extra, expected
):
    """D is known once the backbone is loaded: the refusal comes then, not after the extraction as a failed cell."""
    message = refused(capsys, run_argv(env, tmp_path, *extra))
    for text in expected:
        assert text in message, (text, message)
    cache, out = tmp_path / "cache", tmp_path / "out"
    assert not [p for p in (cache / "features").rglob("*") if p.is_file()]  # nothing encoded (the file-hash memo aside)
    assert not list(out.rglob("shots_*.json")) and not list(out.rglob("summary.json"))  # no result


def test_a_dataset_alias_names_the_same_preset(env, tmp_path):
    from fewclip.protocols.runner import method_preset

    assert method_preset("tip-adapter", "flowers102", "oxford_pets") == "oxford_flowers"
    assert method_preset("tip-adapter", "paper", "oxford_pets") == "oxford_pets"
    assert method_preset("zero-shot", "caltech101", "oxford_pets") is None  # no presets: its defaults
    with pytest.raises(MethodError, match="unknown preset 'nonsense'.*caltech101.*--preset paper"):
        method_preset("ape", "nonsense", "oxford_pets")


def test_a_class_with_fewer_images_than_shots_is_warned_about_and_recorded(env, tmp_path, capsys):
    """beagle has 2 training images: a 4-shot episode takes both (Dassl's behaviour) and says so, per class."""
    argv = run_argv(env, tmp_path, "--method", "zero-shot", "--shots", "1", "4", "--seeds", "1", data=env.uneven)
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
        with pytest.raises(MethodError, match=rf"^{method}: {key}={bad!r} is not valid; expected "):
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
    # steps [2, 3], one val row, one cache entry, one class: counts 8·2·3 + α counts 8·3, per chunk 4·(2·1·1 + 1 + 1),
    # anchors {0, 2} of α: 4·2·1·1
    assert search_memory([2, 3]) == 48 + 24 + 16 + 8
    # APE's third grid (γ) multiplies the counts grid
    assert search_memory([2, 3, 4]) == 8 * 24 + 8 * 12 + 4 * (2 + 4 + 4) + 4 * 2 * 4


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
    message = refused(capsys, ["fit", str(path), "--method", "linear-probe", "--json"])
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
    message = refused(capsys, ["fit", str(missing), "--method", "linear-probe", "--set", "C=-1"])
    assert "C=-1 is not valid" in message and "absent" not in message
    message = refused(capsys, ["fit", str(missing), "--method", "ape", "--preset", "nonsense"])
    assert "unknown preset 'nonsense'" in message and "caltech101" in message
    message = refused(capsys, ["fit", str(missing), "--method", "ape", "--set", "selection=none"])
    assert "--set selection=" in message and "--selection none" in message
