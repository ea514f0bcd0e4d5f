"""selection="cv": stratified folds over the support images, summed validation counts, a final fit on all support."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import FAST, make_shop
from fewclip import methods as M
from fewclip.cli.main import main
from fewclip.features.synthetic import make_synthetic_bundle
from fewclip.methods.cv import cv_fold_count, cv_fold_ids, fold_bundle
from fewclip.methods.search import tip_grid
from fewclip.models.tiny import save_tiny_openclip

CV_METHODS = ["tip-adapter", "ape", "gda", "linear-probe"]


def fitted(name, bundle, **kw):
    return M.create(name, **{**FAST.get(name, {}), **kw}).fit(bundle)


def test_folds_are_stratified_by_hand():
    labels = torch.tensor([0] * 5 + [1] * 4 + [2] * 2)
    assert cv_fold_count(torch.bincount(labels)) == 2  # K = 2: leave one out per class
    assert cv_fold_count(torch.tensor([5, 4, 8])) == 4 and cv_fold_count(torch.tensor([0, 1, 3])) == 2
    ids = cv_fold_ids(labels, 3, 4, seed=0)
    for c, k_c in ((0, 5), (1, 4), (2, 2)):
        per_fold = torch.bincount(ids[labels == c], minlength=4)
        assert sorted(per_fold.tolist()) == sorted([k_c // 4 + (i < k_c % 4) for i in range(4)])
    assert torch.equal(ids, cv_fold_ids(labels, 3, 4, seed=0))
    assert not torch.equal(cv_fold_ids(torch.arange(40) % 2, 2, 4, 0), cv_fold_ids(torch.arange(40) % 2, 2, 4, 1))


def test_fold_bundle_holds_out_whole_images():
    b = make_synthetic_bundle(classes=3, shots=4, dim=16, views=3, val_per_class=0, test_per_class=2, seed=0)
    held = torch.zeros(b.num_support, dtype=torch.bool)
    held[[0, 5]] = True
    fold = fold_bundle(b, held)
    assert fold.support_features.shape == (3, b.num_support - 2, 16) and fold.test_features is None
    assert torch.equal(fold.val_features, b.support_clean_features[held])
    assert torch.equal(fold.val_labels, b.support_labels[held])
    kept = b.support_features[:, ~held]
    assert torch.equal(fold.support_features, kept)  # no view of a held-out image is in the fold's support


@pytest.mark.parametrize("name", CV_METHODS)
def test_cv_never_reads_test_or_val_and_is_deterministic(bundle, name):
    first = fitted(name, bundle, selection="cv")
    perm = torch.randperm(bundle.test_labels.numel(), generator=torch.Generator().manual_seed(0))
    shuffled = replace(bundle, test_labels=bundle.test_labels[perm], val_labels=bundle.val_labels.flip(0))
    second = fitted(name, shuffled, selection="cv")
    assert first.selection_used_ == "cv" and first.selected_["cv_folds"] == 4
    assert first.selected_ == second.selected_
    assert torch.equal(first.predict_logits(bundle.test_features), second.predict_logits(bundle.test_features))
    no_val = replace(bundle, val_features=None, val_labels=None)
    assert fitted(name, no_val, selection="cv").selected_ == first.selected_  # the val split is never needed


def test_summed_counts_choice_equals_a_naive_loop(bundle):
    """Tip-Adapter's (β, α) by cv equals a loop over folds and grid points scoring each fold's fit, α_j at
    α_j·N_full/N_fold on a fold (the cache term sums over the entries: a count-invariant α)."""
    step = [5, 4]
    model = M.create("tip-adapter", search_step=step, selection="cv").fit(bundle)
    train = bundle.without_test()
    k = cv_fold_count(train.shots_per_class())
    ids = cv_fold_ids(train.support_labels, train.num_classes, k, seed=0)
    betas, alphas = tip_grid(7.0, step[0]).tolist(), tip_grid(7.0, step[1]).tolist()
    best, choice = -1, None
    for beta in betas:
        for alpha in alphas:
            correct = 0
            for f in range(k):
                fold = fold_bundle(train, ids == f)
                scaled = alpha * train.num_support / fold.num_support
                m = M.create("tip-adapter", selection="none", init_alpha=scaled, init_beta=beta).fit(fold)
                correct += int((m.predict(fold.val_features) == fold.val_labels).sum())
            if correct > best:
                best, choice = correct, (beta, alpha)
    assert (model.beta_, model.alpha_) == pytest.approx(choice)
    assert model.cv_["best_correct"] == best


def test_k1_refusal_names_the_fallback():
    b = make_synthetic_bundle(classes=4, shots=1, dim=16, views=2, val_per_class=0, test_per_class=2, seed=0)
    with pytest.raises(M.MethodError, match=r"linear-probe: selection='cv'.*--selection none"):
        M.create("linear-probe", selection="cv").fit(b)
    assert M.create("tip-adapter", search_step=[4, 4], selection="cv").fit(b).selected_["cv_folds"] == 2


def test_a_method_with_nothing_to_select_is_unaffected(bundle):
    cv, none = M.create("zero-shot", selection="cv").fit(bundle), M.create("zero-shot", selection="none").fit(bundle)
    assert cv.selection_used_ == "none"
    assert torch.equal(cv.predict_logits(bundle.test_features), none.predict_logits(bundle.test_features))


def test_a_method_without_cv_refuses_it(bundle):
    with pytest.raises(M.MethodError, match=r"clip-ft: selection='cv' is not implemented.*--selection none"):
        M.create("clip-ft", selection="cv")._check_cv(bundle)


@pytest.mark.slow
def test_a_folder_of_class_subfolders_runs_with_selection_cv(tmp_path):
    root = make_shop(tmp_path / "shop")
    tiny = save_tiny_openclip(tmp_path / "model", "vit", name="fewclip-test-cv-vit", seed=0)
    out = tmp_path / "results"
    argv = [
        "run", "--dataset", "folder", "--path", str(root), "--model", f"local-dir:{tiny.folder}", "--views", "2",
        "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress", "--shots", "2", "--seeds", "1",
        "--method", "zero-shot", "tip-adapter", "gda", "--selection", "cv",
    ]  # fmt: skip
    assert main(argv) == 0
    results = [json.loads(p.read_text()) for p in Path(out).rglob("shots_2-seed_1.json")]
    assert len(results) == 3 and all(r["selection"] == "cv" for r in results)
    tip = next(r for r in results if r["method"] == "tip-adapter")
    assert tip["selected"]["cv_folds"] == 2
