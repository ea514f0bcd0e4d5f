"""The rest of issue 16: selection="cv" for the trained adapters (one epoch hook), GDA's count-invariant α under cv,
automatic cv on a folder of class sub-folders, the temperature of an image method, its classifier file and
`fewclip predict`, and the `--pretrained` override of a moved weights file."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fewclip.methods as M
from conftest import FAST, make_shop
from fewclip import data
from fewclip.cli.main import main
from fewclip.data.generate import make_folder_dataset
from fewclip.errors import ClassifierError, MethodError
from fewclip.features.extract import extract
from fewclip.features.synthetic import make_synthetic_bundle
from fewclip.features.text import encode_text_classifier
from fewclip.methods import ImageEpisode
from fewclip.methods.cv import cv_fold_count, cv_fold_ids, fold_bundle
from fewclip.methods.gda import gda_precision, gda_spread
from fewclip.methods.temperature import fit_temperature
from fewclip.methods.training import epoch_counts, train_on_views
from fewclip.models import BackboneSpec
from fewclip.models.tiny import save_tiny_openclip
from fewclip.protocols.deploy import load_classifier
from fewclip.protocols.results import read_predictions, read_result
from fewclip.protocols.runner import cv_fallback, default_selection

ADAPTERS = ["candle", "clip-adapter", "tip-adapter-f", "ape-t"]

pytestmark = pytest.mark.filterwarnings("ignore::fewclip.errors.DataWarning")


@pytest.fixture(scope="module")
def small():
    """4 classes, 4 shots, D = 32, 2 views: cv's folds hold one image of every class."""
    return make_synthetic_bundle(classes=4, shots=4, dim=32, views=2, val_per_class=2, test_per_class=5, seed=1)


def fitted(name, bundle, **kw):
    return M.create(name, **{**FAST.get(name, {}), **kw}).fit(bundle)


def folds_of(bundle):
    train = bundle.without_test()
    k = cv_fold_count(train.shots_per_class())
    ids = cv_fold_ids(train.support_labels, train.num_classes, k, seed=1)  # the adapters' seed
    return [fold_bundle(train, ids == f) for f in range(k)]


# --------------------------------------------------------------------------- cv for the trained adapters


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_cv_never_reads_test_or_val_is_deterministic_and_stratified(small, name):
    bundle = small
    kw = {"batch_size": 8, "epochs": 3, **({"channels": 16} if name == "ape-t" else {})}
    first = fitted(name, bundle, selection="cv", **kw)
    perm = torch.randperm(bundle.test_labels.numel(), generator=torch.Generator().manual_seed(0))
    shuffled = replace(bundle, test_labels=bundle.test_labels[perm], val_labels=bundle.val_labels.flip(0))
    second = fitted(name, shuffled, selection="cv", **kw)
    assert M.get_class(name).cross_validates
    assert first.selection_used_ == "cv" and first.selected_["cv_folds"] == 4
    assert first.selected_ == second.selected_
    assert torch.equal(first.predict_logits(bundle.test_features), second.predict_logits(bundle.test_features))
    # stratified: 4 shots of each of 4 classes over 4 folds → 1 image of every class in every fold
    assert first.cv_["fold_sizes"] == [4, 4, 4, 4]
    assert first.best_epoch_ == first.cv_["chosen"]["stop_epoch"] == first.selected_["epoch"]
    assert first.temperature_fit_["source"] == "cv" and first.temperature_fit_["rows"] == 16
    no_val = replace(bundle, val_features=None, val_labels=None)
    assert fitted(name, no_val, selection="cv", **kw).selected_ == first.selected_  # no validation split needed


def test_stop_epoch_keeps_that_epoch_of_the_full_schedule(bundle):
    """Under val the best epoch's keys; with stop_epoch = that epoch and no selection, the same keys (the schedule
    still spans `epochs`), unlike a shorter run (epochs = that epoch, a different cosine)."""
    val = fitted("tip-adapter-f", bundle, epochs=6)
    best = val.best_epoch_
    fixed = fitted("tip-adapter-f", bundle, epochs=6, selection="none", stop_epoch=best)
    assert torch.equal(fixed.cache_keys_, val.cache_keys_) and fixed.best_epoch_ == best
    if best < 6:
        shorter = fitted("tip-adapter-f", bundle, epochs=best, selection="none")
        assert not torch.equal(shorter.cache_keys_, val.cache_keys_)
    with pytest.raises(MethodError, match=r"stop_epoch=9 is after the last epoch \(epochs=6\)"):
        fitted("tip-adapter-f", bundle, epochs=6, selection="none", stop_epoch=9)


def test_clip_adapter_cv_choice_equals_a_naive_loop_over_ratio_epoch_and_folds(small):
    bundle = small
    ratios, epochs = [0.2, 0.6], 3
    model = fitted("clip-adapter", bundle, selection="cv", ratios=ratios, epochs=epochs, batch_size=8)
    folds = folds_of(bundle)
    best, choice = -1, None
    for ratio in ratios:
        for epoch in range(1, epochs + 1):
            correct = 0
            for fold in folds:
                m = M.create(
                    "clip-adapter", selection="none", init_ratio=ratio, epochs=epochs, stop_epoch=epoch, batch_size=8
                )
                m._cv_full_rows = bundle.num_support  # what cv sets on its fold copies: epochs of N_full rows
                m.fit(fold)
                correct += int((m.predict(fold.val_features) == fold.val_labels).sum())
            if correct > best:
                best, choice = correct, (ratio, epoch)
    assert (model.ratio_, model.best_epoch_) == choice
    assert model.cv_["best_correct"] == best


def test_a_fold_epoch_draws_the_full_supports_row_count():
    """train_on_views with epoch_rows: ⌈rows/B⌉ steps an epoch, of the batch sizes of a pass over that many rows."""
    feats = torch.randn(2, 6, 4)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    seen = []

    def loss_fn(queries, batch_labels):
        seen.append(batch_labels.numel())
        return (w * queries).sum() * 0.0 + w.sum() * 0.0

    w = torch.zeros(4, requires_grad=True)
    kw = {"batch_size": 4, "lr": 1e-3, "eps": 1e-8, "weight_decay": 0.0, "seed": 0}
    train_on_views({"w": w}, loss_fn, feats, labels, epochs=2, epoch_rows=10, **kw)
    assert seen == [4, 4, 2, 4, 4, 2]  # 10 rows an epoch, batches of 4
    seen.clear()
    train_on_views({"w": w}, loss_fn, feats, labels, epochs=1, **kw)
    assert seen == [4, 2]  # one pass over the 6 rows


def test_tip_adapter_f_cv_trains_at_the_initial_alpha_beta_and_predicts_at_the_chosen(bundle):
    model = fitted("tip-adapter-f", bundle, selection="cv")
    chosen = model.cv_["chosen"]
    assert set(chosen) == {"stop_epoch", "final_alpha", "final_beta"}
    assert (model.alpha_, model.beta_) == (chosen["final_alpha"], chosen["final_beta"])
    # the same keys as training to that epoch at the initial (α, β) = (1, 1)
    plain = fitted("tip-adapter-f", bundle, selection="none", stop_epoch=chosen["stop_epoch"])
    assert torch.equal(model.cache_keys_, plain.cache_keys_) and (plain.alpha_, plain.beta_) == (1.0, 1.0)


def test_epoch_counts_from_a_history():
    history = [{"val_accuracy": 50.0}, {"val_accuracy": 75.0}, {"val_accuracy": [25.0, 100.0]}]
    with pytest.raises(MethodError):
        epoch_counts([{"val_accuracy": None}], 4)
    assert epoch_counts(history[:2], 4).tolist() == [[2.0, 3.0]]
    two = [{"val_accuracy": [50.0, 25.0]}, {"val_accuracy": [100.0, 75.0]}]
    assert epoch_counts(two, 4).tolist() == [[2.0, 4.0], [1.0, 3.0]]  # [candidate, epoch]


def test_clip_ft_refuses_cv_naming_the_fallback(bundle):
    with pytest.raises(MethodError, match=r"clip-ft: selection='cv' is not implemented.*--selection none"):
        M.create("clip-ft", selection="cv")._check_cv(bundle)


# --------------------------------------------------------------------------- GDA: α in a count-invariant form


def test_gda_spread_by_hand():
    means = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    precision = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    present = torch.tensor([True, True, False])
    # centred means ±(1, 0): (1, 0) P (1, 0)ᵀ = 2 for both
    assert gda_spread(means, precision, present) == pytest.approx(2.0)
    assert gda_spread(means, precision, torch.tensor([True, False, False])) == 0.0


def test_gda_cv_scores_each_fold_at_the_rescaled_alpha(bundle):
    """The choice equals a loop scoring each fold's fit at α_j·Δ²_full/Δ²_fold, and the final α is α_j itself."""
    grid = (0.01, 0.1, 1.0, 10.0, 100.0)
    model = M.create("gda", selection="cv", alpha_grid=grid).fit(bundle)
    train = bundle.without_test()
    views, n, dim = train.support_features.shape
    x = torch.nn.functional.normalize(train.support_features.reshape(views * n, dim), dim=-1)
    means, precision = gda_precision(x, train.support_labels.repeat(views), train.num_classes)
    full = gda_spread(means, precision, train.shots_per_class() > 0)
    ids = cv_fold_ids(train.support_labels, train.num_classes, 4, seed=0)
    totals = []
    for alpha in grid:
        correct = 0
        for f in range(4):
            fold = fold_bundle(train, ids == f)
            spread = M.create("gda", selection="none").fit(fold).spread_
            m = M.create("gda", selection="none", init_alpha=alpha * full / spread).fit(fold)
            correct += int((m.predict(fold.val_features) == fold.val_labels).sum())
        totals.append(correct)
    assert model.alpha_ == grid[totals.index(max(totals))]
    assert model.cv_["best_correct"] == max(totals)


@pytest.mark.slow
def test_gda_cv_matches_few_shot_val_at_16_shots():
    """The 16-shot loss of issue 16 (α chosen on folds with ¾ of the support): gone on the benchmark's bundles."""
    for seed in range(2):
        b = make_synthetic_bundle(classes=20, shots=16, dim=128, views=10, seed=seed)
        val, cv = M.create("gda").fit(b), M.create("gda", selection="cv").fit(b)
        assert cv.score(b.test_features, b.test_labels) >= val.score(b.test_features, b.test_labels) - 1.0


# --------------------------------------------------------------------------- automatic cv


def splits_with(source: str, val: bool, standard: bool = False):
    item = data.Item("a/1.png", 0, "a")
    return data.DatasetSplits(
        name="shop", root=Path("."), classnames=["a"], train=[item], val=[item] if val else [], test=[item],
        split_sha256="0" * 64, split_source=source, standard_split=standard,
    )  # fmt: skip


def test_automatic_cv_falls_back_at_one_shot_and_runs_from_two():
    """At K = 1 every fold holds out some classes' only support image, so an automatic cv would choose for classes
    without support: the method keeps its initial values, with the reason; from K = 2 (leave one out per class) it
    cross-validates. A method without a choice never falls back."""
    one = make_synthetic_bundle(classes=5, shots=1, dim=16, views=2, seed=0)
    two = make_synthetic_bundle(classes=5, shots=2, dim=16, views=2, seed=0)
    assert "1 support image" in cv_fallback(M.create("tip-adapter"), one)
    assert cv_fallback(M.create("tip-adapter"), two) is None
    assert cv_fallback(M.create("zero-shot"), one) is None


def test_default_selection_is_cv_only_without_a_validation_split_of_ones_own():
    generated = splits_with("generated 50/20/30 per class, seed 1", val=True)
    assert default_selection("folder", generated)[0] == "cv"
    assert "no validation split of its own" in default_selection("folder", generated)[1]
    assert default_selection("csv", splits_with("train.csv, generated 50/20/30 per class, seed 1", True))[0] == "cv"
    assert default_selection("folder", splits_with("train/, test/ class folders (no val)", val=False))[0] == "cv"
    assert default_selection("folder", splits_with("train/, val/, test/ class folders", val=True)) == ("val", None)
    assert default_selection("oxford_pets", splits_with("split_zhou_OxfordPets.json", True, True)) == ("val", None)


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """One `fewclip run` (no --selection, --save-models) on a folder of class sub-folders only, 1 and 2 shots."""
    tmp = tmp_path_factory.mktemp("shop")
    root = make_shop(tmp / "shop")
    tiny = save_tiny_openclip(tmp / "model", "vit", name="fewclip-test-auto-cv-vit", seed=0)
    out = tmp / "results"
    argv = [
        "run", "--dataset", "folder", "--path", str(root), "--model", f"local-dir:{tiny.folder}", "--views", "2",
        "--cache-dir", str(tmp / "cache"), "--out", str(out), "--no-progress", "--shots", "1", "2", "--seeds", "1",
        "--method", "zero-shot", "tip-adapter", "linear-probe", "clip-adapter", "clip-ft", "--save-models",
        "--set", "tip-adapter:search_step=[6,4]", "--set", "clip-adapter:epochs=2", "--set", "clip-ft:epochs=1",
        "--set", "clip-ft:scope=last", "--set", "clip-ft:batch_size=8",
    ]  # fmt: skip
    assert main(argv) == 0
    results = {}
    for path in out.rglob("shots_*-seed_1.json"):
        record = read_result(path)
        results[record["method"], record["shots"]] = (path, record)
    splits = data.load_dataset("folder", path=root, warn=False)
    return SimpleNamespace(tmp=tmp, root=root, tiny=tiny, results=results, splits=splits)


@pytest.mark.slow
def test_auto_cv_on_a_folder_records_cv_in_every_result_and_falls_back_per_method(shop):
    assert len(shop.results) == 10
    for (method, shots), (_, r) in shop.results.items():
        assert r["status"] == "ok" and r["selection"] == "cv" and r["setup"]["selection"] == "cv"
        assert "no validation split of its own" in r["selection_auto"]
        fallback = r.get("selection_fallback")
        if method == "zero-shot":
            assert r["selection_used"] == "none" and fallback is None  # nothing to select
        elif method == "clip-ft" or (method == "linear-probe" and shots == 1):
            assert r["selection_used"] == "none" and "selection='cv'" in fallback
        elif shots == 1:  # folds would hold out classes' only support image: the initial values, recorded
            assert r["selection_used"] == "none" and "1 support image" in fallback
        else:
            assert r["selection_used"] == "cv" and fallback is None and r["selected"]["cv_folds"] == 2
    assert "K ≥ 2" in shop.results["linear-probe", 1][1]["selection_fallback"]


def image_cell(shop, method="clip-ft", shots=2):
    path, record = shop.results[method, shots]
    return path, record, path.with_name(record["classifier_file"])


@pytest.mark.slow
def test_clip_ft_classifier_file_reproduces_the_runs_test_predictions(shop):
    path, record, classifier = image_cell(shop)
    clf = load_classifier(classifier)
    assert clf.model.inputs == "images" and clf.model.encoder_state_
    test = [str(shop.root / i.path) for i in shop.splits.test]
    rows = clf.predict_images(test, progress=False)
    predicted, truth, names = read_predictions(path)
    assert [r["class"] for r in rows] == [names[int(p)] for p in predicted]
    assert clf.temperature == record["calibration"]["temperature"]


@pytest.mark.slow
def test_pretrained_override_of_a_moved_weights_folder_is_hash_checked(shop, tmp_path):
    for method in ("tip-adapter", "clip-ft"):
        path, record = shop.results[method, 2]
        classifier = path.with_name(record["classifier_file"])
        moved = tmp_path / f"moved-{method}"
        shutil.copytree(shop.tiny.folder, moved)
        image = str(shop.root / shop.splits.test[0].path)
        expected = load_classifier(classifier).predict_images([image], progress=False)
        clf = load_classifier(classifier, pretrained=moved)
        assert clf.backbone_spec.model == f"local-dir:{moved}"
        assert clf.predict_images([image], progress=False) == expected
        other = save_tiny_openclip(tmp_path / f"other-{method}", "vit", name="fewclip-test-auto-cv-vit", seed=1)
        with pytest.raises(ClassifierError, match="SHA-256"):
            load_classifier(classifier, pretrained=other.folder).predict_images([image], progress=False)
    out = tmp_path / "preds.csv"
    argv = ["predict", str(classifier), image, "--pretrained", str(moved), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    with open(out, newline="") as fh:
        assert next(csv.DictReader(fh))["class"] == expected[0]["class"]
    with pytest.raises(ClassifierError, match="give the folder it moved to"):
        load_classifier(classifier, pretrained=tmp_path / "nowhere")


@pytest.mark.slow
def test_an_image_classifier_without_its_encoder_hash_is_refused_naming_the_file(shop, tmp_path):
    _, _, classifier = image_cell(shop)
    with safe_open(str(classifier), "pt") as fh:
        meta, tensors = dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    key = next(k for k in tensors if "encoder_state" in k and tensors[k].is_floating_point())
    tensors[key] = tensors[key] + 1.0  # damaged parameters ...
    method = json.loads(meta["method"])
    fitted = json.loads(method["fitted"])
    assert fitted.pop("encoder_sha256_")  # ... and the hash that would have caught them gone
    method["fitted"] = json.dumps(fitted)
    meta["method"] = json.dumps(method)
    forged = tmp_path / "forged.classifier.safetensors"
    save_file(tensors, str(forged), metadata=meta)
    image = str(shop.root / shop.splits.test[0].path)
    with pytest.raises(ClassifierError, match="damaged or not written by fewclip") as err:
        load_classifier(forged).predict_images([image], progress=False)
    assert str(forged) in str(err.value) and "--save-models" in str(err.value)


# --------------------------------------------------------------------------- an image method's temperature


@pytest.fixture(scope="module")
def episode(tmp_path_factory):
    root = tmp_path_factory.mktemp("images16")
    folder = make_folder_dataset(root / "images", ("amber", "azure", "cobalt"), {"train": 4, "val": 3, "test": 2},
                                 size=32, seed=0)  # fmt: skip
    tiny = save_tiny_openclip(root / "model", "vit", name="fewclip-test-image16-vit", seed=0)
    spec = BackboneSpec(f"local-dir:{tiny.folder}")
    backbone = spec.load()
    splits = data.load_dataset("folder", path=folder, warn=False)
    text, _ = encode_text_classifier(backbone, splits.classnames, data.load_prompts("single", "folder"))
    return ImageEpisode(splits, data.sample_episode(splits, 2, 1), spec, text, loaded=backbone)


def test_image_method_temperature_is_fitted_on_validation_through_the_fine_tuned_encoder(episode):
    model = M.create("clip-ft", **FAST["clip-ft"]).fit(episode)
    out = extract(model.image_encoder(), episode.splits.root, [i.path for i in episode.val], progress=False)
    labels = torch.tensor([i.label for i in episode.val])
    assert model.temperature_fit_["source"] == "val" and model.temperature_fit_["rows"] == len(episode.val)
    assert model.temperature_ == fit_temperature(model.predict_logits(out.features), labels)
    none = M.create("clip-ft", **{**FAST["clip-ft"], "selection": "none"}).fit(episode)
    assert none.temperature_ == 1.0 and none.temperature_fit_["source"] == "none"
    assert json.dumps(model.temperature_fit_)  # a plain record, saved with the model
