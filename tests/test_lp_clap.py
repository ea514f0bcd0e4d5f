"""LP++ and CLAP (issue 15): the spec's hand-checked toy cases (``new_methods.md`` §1.6 and §2.6), their
invariants, the released-behaviour options, the bundle's optional ``text_norms`` and an end-to-end run."""

import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fewclip.methods as M
from conftest import FAST, make_pets
from fewclip.cli.main import main
from fewclip.errors import BundleError, DataWarning
from fewclip.features import bundle as bundle_io
from fewclip.features.synthetic import make_synthetic_bundle
from fewclip.features.text import encode_prompts
from fewclip.methods.clap import (
    batches_per_epoch,
    canonical_order,
    clap_gradient,
    clap_logits,
    clap_lr,
    class_weights,
    train_clap,
)
from fewclip.methods.lp_plus_plus import (
    alpha_init,
    class_sums,
    lambda_max_gram,
    lpp_gradients,
    lpp_logits,
    step_sizes,
    train_lpp,
)
from fewclip.models.tiny import save_tiny_openclip

D64 = torch.float64


# --------------------------------------------------------------------------- LP++: the toy of spec §1.6


@pytest.fixture
def lpp_toy():
    r9, r87 = math.sqrt(0.90), math.sqrt(0.87)
    features = torch.tensor(
        [
            [0.3, 0.1, 0, r9],
            [0.3, 0, 0.1, r9],
            [0.1, 0.3, 0, r9],
            [0, 0.3, 0.1, r9],
            [0, 0.1, 0.3, r9],
            [0.3, 0, 0.2, r87],
        ],
        dtype=D64,
    )
    return features, torch.tensor([0, 0, 1, 1, 2, 2]), torch.eye(3, 4, dtype=D64)


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=D64), torch.tensor(expected, dtype=D64), atol=tol, rtol=0)


def test_lpp_toy_initial_state_and_step_sizes(lpp_toy):
    x, y, t = lpp_toy
    close(class_sums(x, y, 3), [[0.6, 0.1, 0.1, 1.897367], [0.1, 0.6, 0.1, 1.897367], [0.3, 0.1, 0.5, 1.881421]])
    close(lambda_max_gram(x), 5.724967)
    lr_w, lr_alpha = step_sizes(x, t)
    close(lr_w, 4.192164)
    close(lr_alpha, 5.357143)
    assert lr_w * lambda_max_gram(x) == pytest.approx(4 * 6, rel=1e-12)  # lr_W·λ_max = 4N exactly
    close(((x @ t.T) ** 2).sum(0), [0.28, 0.20, 0.15])
    close(alpha_init(x, y, t), 70.833333)
    # the formula's own pieces: α̃ = [0.30, 0.30, 0.25], α₀ = 250 · their mean; and the eigenvalue both ways
    assert alpha_init(x, y, t, scale=1.0) == pytest.approx((0.30 + 0.30 + 0.25) / 3)
    assert lambda_max_gram(x[:3]) == pytest.approx(float(torch.linalg.svdvals(x[:3])[0] ** 2))


def test_lpp_toy_logits_loss_gradients_and_first_step(lpp_toy):
    x, y, t = lpp_toy
    w, b, a = class_sums(x, y, 3), torch.zeros(3, dtype=D64), torch.full((3,), alpha_init(x, y, t), dtype=D64)
    z = lpp_logits(x, x @ t.T, w, b, a)
    close(z[0], [23.24, 8.973333, 1.884873])
    close(z[5], [23.219746, 1.819746, 16.111540])
    loss, g_w, g_b, g_a = lpp_gradients(x, x @ t.T, F.one_hot(y, 3).to(D64), w, b, a)
    close(loss, 1.184838)
    close(g_a, [0.049959, 0, -0.033306])
    close(g_b, [0.166530, 0, -0.166530])
    close(g_w[0], [0.049959, 0, 0.033306, 0.155329])
    one = train_lpp(x, y, t, epochs=1, dtype=D64)
    close(one.state.weight[0], [0.390563, 0.1, -0.039624, 1.246202])
    close(one.state.weight[2], [0.509437, 0.1, 0.639625, 2.532586])


ALPHA = {  # spec §1.6: α after the updates
    ("accumulate", 10): [70.796896, 70.834667, 71.162253],
    ("accumulate", 20): [70.721629, 70.836461, 71.688493],
    ("accumulate", 300): [68.474990, 70.964073, 93.217716],
    ("since_update", 10): [70.796896, 70.834667, 71.162253],
    ("since_update", 20): [70.758066, 70.835127, 71.359574],
    ("since_update", 300): [70.732575, 70.839485, 71.832254],
}


@pytest.mark.parametrize("mode, epochs", sorted(ALPHA))
def test_lpp_toy_alpha_trajectories_of_the_released_and_fixed_gradient(lpp_toy, mode, epochs):
    x, y, t = lpp_toy
    close(train_lpp(x, y, t, epochs=epochs, alpha_grad=mode, dtype=D64).state.alpha, ALPHA[mode, epochs])


def reference_lpp(x, y, t, epochs, alpha_every=10):
    """LP++ written the plain way (autograd, torch.optim.SGD), every gradient cleared each epoch: the default."""
    w = torch.nn.Parameter(class_sums(x, y, 3).clone())
    b = torch.nn.Parameter(torch.zeros(3, dtype=D64))
    a = torch.full((3,), alpha_init(x, y, t), dtype=D64, requires_grad=True)
    lr_w, lr_a = step_sizes(x, t)
    opt = torch.optim.SGD([w, b], lr=lr_w, momentum=0.9)
    for epoch in range(1, epochs + 1):
        opt.zero_grad()
        a.grad = None
        F.cross_entropy(x @ w.T + b + (x @ t.T) * a, y).backward()
        opt.step()
        if epoch % alpha_every == 0:
            with torch.no_grad():
                a -= lr_a * a.grad
    return w.detach(), b.detach(), a.detach()


def test_lpp_default_alpha_gradient_is_cleared_every_epoch(lpp_toy):
    x, y, t = lpp_toy
    w, b, a = reference_lpp(x, y, t, 40)
    run = train_lpp(x, y, t, epochs=40, dtype=D64)
    torch.testing.assert_close(run.state.weight, w, atol=1e-9, rtol=0)
    torch.testing.assert_close(run.state.bias, b, atol=1e-9, rtol=0)
    torch.testing.assert_close(run.state.alpha, a, atol=1e-9, rtol=0)
    # the three modes: α uniform until the first update; "step" differs from the released sum already at epoch 10
    nine = train_lpp(x, y, t, epochs=9, dtype=D64).state.alpha
    assert torch.equal(nine, torch.full((3,), alpha_init(x, y, t), dtype=D64))
    step10 = train_lpp(x, y, t, epochs=10, alpha_grad="step", dtype=D64).state.alpha
    assert not torch.allclose(step10, torch.tensor(ALPHA["accumulate", 10], dtype=D64), atol=1e-3)
    # W and b do not depend on the α mode until α first changes
    same = [train_lpp(x, y, t, epochs=10, alpha_grad=m, dtype=D64).state.weight for m in ("step", "accumulate")]
    torch.testing.assert_close(same[0], same[1])


def test_lpp_invariants_zero_weights_give_zero_shot_argmax_and_relabelling_permutes(lpp_toy):
    x, y, t = lpp_toy
    zero = torch.zeros(3, 4, dtype=D64)
    z = lpp_logits(x, x @ t.T, zero, torch.zeros(3, dtype=D64), torch.full((3,), 70.0, dtype=D64))
    assert torch.equal(z.argmax(1), (x @ t.T).argmax(1))
    perm = torch.tensor([2, 0, 1])  # class k becomes perm[k]
    inverse = torch.argsort(perm)
    a = train_lpp(x, y, t, epochs=30, dtype=D64).state
    b = train_lpp(x, perm[y], t[inverse], epochs=30, dtype=D64).state
    torch.testing.assert_close(lpp_logits(x, x @ t.T, a.weight, a.bias, a.alpha)[:, inverse], lpp_logits(
        x, x @ t[inverse].T, b.weight, b.bias, b.alpha
    ), atol=1e-9, rtol=0)  # fmt: skip


# --------------------------------------------------------------------------- LP++: the estimator


@pytest.fixture(scope="module")
def small():
    return make_synthetic_bundle(classes=6, shots=4, dim=32, views=3, val_per_class=5, test_per_class=10, seed=4)


def test_lpp_val_selection_keeps_the_last_best_epoch_and_records_it(small):
    model = M.create("lp++", epochs=40).fit(small)
    counts = [h["val_correct"] for h in model.history_]
    best = max(counts)
    assert model.best_epoch_ == max(e for e, c in enumerate(counts, 1) if c == best)  # ties: the later epoch
    assert model.selected_["epoch"] == model.best_epoch_ and model.search_["val_rows"] == 30
    assert model._cv_counts_.tolist() == counts[::-1]
    assert model._cv_values((0,)) == {"epochs": 40} and model._cv_values((39,)) == {"epochs": 1}
    # the selected model is the one trained for exactly that many epochs
    again = M.create("lp++", epochs=model.best_epoch_, selection="none").fit(small)
    torch.testing.assert_close(again.predict_logits(small.test_features), model.predict_logits(small.test_features))
    assert model.val_accuracy_ == pytest.approx(100 * best / 30)
    # the closed-form step sizes of the training view (view 0)
    lr_w, lr_alpha = step_sizes(F.normalize(small.support_features[0], dim=-1), small.text_weights)
    assert model.step_sizes_["lr_w"] == pytest.approx(lr_w, rel=1e-5)
    assert model.step_sizes_["lr_alpha"] == pytest.approx(lr_alpha, rel=1e-5)


def test_lpp_selection_none_keeps_the_last_epoch(small):
    model = M.create("lp++", epochs=25, selection="none").fit(small)
    assert model.best_epoch_ == 25 and len(model.history_) == 25 and not hasattr(model, "_cv_counts_")


def test_lpp_cv_sums_fold_counts_and_refits_on_all_support(small):
    from fewclip.methods.cv import cv_fold_count, cv_fold_ids, fold_bundle

    model = M.create("lp++", epochs=30, selection="cv").fit(small)
    assert model.selection_used_ == "cv"
    k = cv_fold_count(small.shots_per_class())
    ids = cv_fold_ids(small.support_labels, small.num_classes, k, model._cv_seed())
    total = torch.zeros(30)
    for f in range(k):
        probe = M.create("lp++", epochs=30, calibrate="none").fit(fold_bundle(small.without_test(), ids == f))
        total += torch.tensor([h["val_correct"] for h in probe.history_], dtype=torch.float32)
    expected = max(e for e in range(1, 31) if total[e - 1] == total.max())  # ties: the later epoch
    assert model.cv_["chosen"] == {"epochs": expected} and model.best_epoch_ == expected
    refit = M.create("lp++", epochs=expected, selection="none").fit(small)
    torch.testing.assert_close(refit.predict_logits(small.test_features), model.predict_logits(small.test_features))


def test_lpp_released_options_differ_as_the_spec_says(small):
    fixed = M.create("lp++", epochs=30, selection="none").fit(small)
    released = M.create("lp++", preset="released", epochs=30, selection="none").fit(small)
    assert (released.alpha_grad, released.precision, released.bias_init) == ("accumulate", "fp16", "torch_default")
    assert not torch.allclose(fixed.alpha_, released.alpha_)
    accumulate = M.create("lp++", epochs=30, selection="none", alpha_grad="accumulate").fit(small)
    assert not torch.allclose(fixed.alpha_, accumulate.alpha_)
    # fp16: the same run up to float16 rounding (logits of order 10: a few hundredths)
    fp16 = M.create("lp++", epochs=30, selection="none", precision="fp16").fit(small)
    a, b = fixed.predict_logits(small.test_features), fp16.predict_logits(small.test_features)
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.5, rtol=0.02)
    # the released bias: nn.Linear's U(−1/√D, 1/√D), seeded
    bias = M.create("lp++", epochs=1, selection="none", bias_init="torch_default")._initial_bias(6, 32)
    assert bias.abs().max() <= 1 / math.sqrt(32) and bias.abs().min() > 0
    assert torch.equal(bias, M.create("lp++", bias_init="torch_default")._initial_bias(6, 32))
    assert not torch.equal(bias, M.create("lp++", bias_init="torch_default", seed=1)._initial_bias(6, 32))


def test_lpp_training_views(small):
    first = M.create("lp++", epochs=5, selection="none").fit(small)
    clean = M.create("lp++", epochs=5, selection="none", train_view="clean").fit(small)
    rand = M.create("lp++", epochs=5, selection="none", train_view="random").fit(small)
    sums = class_sums(F.normalize(small.support_features[0], dim=-1), small.support_labels, 6)
    one = M.create("lp++", epochs=1, selection="none").fit(small)
    assert not torch.allclose(one.weight_, sums)  # trained one step away from the class sums of view 0 ...
    zero_lr = M.create("lp++", epochs=1, selection="none", lr_w_scale=1e-12).fit(small)
    torch.testing.assert_close(zero_lr.weight_, sums, atol=1e-5, rtol=0)  # ... which are its start
    assert len({tuple(m.weight_.flatten()[:4].tolist()) for m in (first, clean, rand)}) == 3
    assert first.train_features_ == "support view 0" and clean.train_features_ == "support_clean_features"
    with pytest.raises(M.MethodError, match="train_view='clean' needs support_clean_features"):
        M.create("lp++", train_view="clean").fit(replace(small, support_clean_features=None))


@pytest.mark.parametrize("name", ["lp++", "clap"])
def test_fit_never_reads_test_labels(small, name):
    normed = replace(small, text_norms=torch.full((6,), 3.0))
    g = torch.Generator().manual_seed(0)
    scrambled = replace(normed, test_labels=normed.test_labels[torch.randperm(60, generator=g)])
    a = M.create(name, **FAST[name]).fit(normed)
    b = M.create(name, **FAST[name]).fit(scrambled)
    assert a.hyperparameters() == b.hyperparameters() and a.history_ == b.history_
    assert torch.equal(a.predict_logits(small.test_features), b.predict_logits(small.test_features))


# --------------------------------------------------------------------------- CLAP: the toy of spec §2.6


@pytest.fixture
def clap_toy():
    rows = [(0.30, 0.29, 0.28), (0.31, 0.30, 0.27), (0.29, 0.30, 0.28), (0.30, 0.29, 0.31), (0.28, 0.29, 0.30)]
    rows.append((0.27, 0.28, 0.30))
    x = torch.tensor([[*r, math.sqrt(1 - sum(v * v for v in r))] for r in rows], dtype=D64)
    return x, torch.tensor([0, 0, 1, 1, 2, 2]), torch.eye(3, 4, dtype=D64)


def test_clap_toy_weights_loss_gradient_and_one_step(clap_toy):
    x, y, t = clap_toy
    close(torch.softmax(clap_logits(x, t, 100.0), dim=1)[0], [0.665241, 0.244728, 0.090031])
    lam = class_weights(x, y, t, 100.0)
    close(lam, [0.693320, 0.377636, 0.754518])
    ce, penalty, grad = clap_gradient(x, y, t.clone(), t, lam, 100.0)
    close(ce, 0.687805)
    assert penalty == 0.0
    close(
        grad,
        [[0, 0.026685, 0.250787, 0.097271], [-1.917091, 0, -2.132787, -5.261758], [2.014639, 1.819736, 0, 5.164486]],
    )
    ce1, penalty1, _ = clap_gradient(x, y, t - 0.1 * grad, t, lam, 100.0)
    close(ce1, 47.031486)
    close(penalty1, 0.130990)
    # the same step through the training loop: one epoch, one full batch, at lr 0.1 (no warm-up epoch)
    run = train_clap(x, y, t, num_support=6, epochs=1, lr=0.1, warmup_lr=0.1)
    torch.testing.assert_close(run.prototypes, t - 0.1 * grad)


def test_clap_gradient_invariants(clap_toy):
    x, y, t = clap_toy
    g = torch.Generator().manual_seed(1)
    p = t + 0.3 * torch.randn(3, 4, generator=g, dtype=D64)
    lam = torch.tensor([0.2, 0.5, 0.9], dtype=D64)
    _, _, ce_grad = clap_gradient(x, y, p, t, torch.zeros(3, dtype=D64), 100.0)
    close((ce_grad * p).sum(1), [0, 0, 0], tol=1e-10)  # logits are scale-invariant in p_k
    _, penalty, full = clap_gradient(x, y, p, t, lam, 100.0)
    torch.testing.assert_close(full - ce_grad, (2 / 3) * lam[:, None] * (p - t))
    assert penalty == pytest.approx(float((lam * ((p - t) ** 2).sum(1)).sum()) / 3)
    # against autograd
    q = p.clone().requires_grad_(True)
    loss = F.cross_entropy(100 * x @ F.normalize(q, dim=-1).T, y) + (lam * ((q - t) ** 2).sum(1)).sum() / 3
    loss.backward()
    torch.testing.assert_close(full, q.grad)


def test_clap_raw_space_equals_normalised_space_with_scaled_rate_and_penalty(clap_toy):
    """Spec C1: SGD on p = s·v from s·n(t) at lr equals SGD on v from n(t) at lr/s² with penalty λs² (per class)."""
    x, y, t = clap_toy
    s = torch.tensor([3.0, 0.5, 7.0], dtype=D64)
    lam = torch.tensor([0.7, 0.4, 0.75], dtype=D64)
    p, vp = s[:, None] * t, torch.zeros(3, 4, dtype=D64)
    v, vv = t.clone(), torch.zeros(3, 4, dtype=D64)
    for step in range(25):
        rows = torch.arange(6)[step % 2 :: 2]
        vp.mul_(0.9).add_(clap_gradient(x[rows], y[rows], p, s[:, None] * t, lam, 100.0)[2])
        p -= 0.05 * vp
        vv.mul_(0.9).add_(clap_gradient(x[rows], y[rows], v, t, lam * s * s, 100.0)[2])
        v -= (0.05 / s**2)[:, None] * vv
    torch.testing.assert_close(p / s[:, None], v, atol=1e-10, rtol=0)


def test_clap_schedule_and_batches():
    assert clap_lr(0, 300, 0.1) == 1e-5
    assert clap_lr(1, 300, 0.1) == pytest.approx(0.1)
    assert clap_lr(150, 300, 0.1) == pytest.approx(0.05052, abs=1e-5)
    assert clap_lr(299, 300, 0.1) == pytest.approx(1.0966e-5, rel=1e-4)
    assert batches_per_epoch(16000, 256) == 62 and batches_per_epoch(100, 256) == 1 and batches_per_epoch(512, 256) == 2
    # an epoch is n_b batches of the shuffled pool: 300 epochs x 62 steps for ImageNet 16-shot
    x = F.normalize(torch.randn(40, 8, dtype=D64), dim=-1)
    run = train_clap(x, torch.arange(4).repeat(10), torch.eye(4, 8, dtype=D64), num_support=20, epochs=3, batch_size=8)
    assert run.steps == 3 * 2 and [h["lr"] for h in run.history] == [1e-5, 0.1, clap_lr(2, 3, 0.1)]


def test_canonical_order_ignores_arrival_order():
    x, y = torch.randn(12, 5), torch.arange(3).repeat(4)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(2))
    assert torch.equal(perm[canonical_order(x[perm], y[perm])], canonical_order(x, y))
    assert torch.equal(y[canonical_order(x, y)], torch.arange(3).repeat_interleave(4))


# --------------------------------------------------------------------------- CLAP: the estimator and text norms


@pytest.fixture(scope="module")
def normed(small):
    return replace(small, text_norms=torch.linspace(2.0, 4.0, 6))


def test_clap_with_zero_epochs_is_zero_shot(normed):
    """The invariant of spec §2.6. Every epoch count and learning rate must be > 0 in fewclip, so the estimator runs
    its one warm-up epoch at a rate of 1e-12 (no step, to float32 rounding); the training function runs 0 epochs."""
    anchors = normed.text_weights * normed.text_norms[:, None]
    pool = F.normalize(normed.support_features.reshape(-1, normed.dim), dim=-1)
    labels = normed.support_labels.repeat(normed.views)
    run = train_clap(pool, labels, anchors, num_support=normed.num_support, epochs=0)
    assert torch.equal(run.prototypes, anchors) and run.steps == 0
    zs = M.create("zero-shot").fit(normed)
    b = zs.predict_logits(normed.test_features)
    torch.testing.assert_close(clap_logits(normed.test_features, run.prototypes, 100.0), b, atol=1e-4, rtol=1e-6)
    clap = M.create("clap", epochs=1, warmup_lr=1e-12).fit(normed)
    a = clap.predict_logits(normed.test_features)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-6)  # float32 rounding of n(s_k·t_k) on logits of scale 100
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert clap.selection_used_ == "none" and clap.selected_["text_norms"] == "bundle text_norms"
    torch.testing.assert_close(clap.prototypes_, anchors)


def test_clap_lambda_is_mean_true_class_zero_shot_probability_over_every_view(normed):
    clap = M.create("clap", epochs=1).fit(normed)
    views = F.normalize(normed.support_features, dim=-1)  # [V, N, D]
    probs = torch.softmax(100 * views @ normed.text_weights.T, dim=-1)  # [V, N, C]
    own = probs.gather(2, normed.support_labels[None, :, None].expand(normed.views, -1, 1))[..., 0]
    expected = torch.stack([own[:, normed.support_labels == k].mean() for k in range(6)])
    torch.testing.assert_close(clap.lambda_, expected)
    assert clap.pool_ == {"views": 3, "rows": 72, "batches_per_epoch": 1}
    zslp = M.create("clap", epochs=1, constraint="none").fit(normed)
    assert torch.equal(zslp.lambda_, torch.zeros(6))


def test_clap_trains_away_from_zero_shot_and_the_penalty_holds_it(normed):
    zs = M.create("zero-shot").fit(normed).predict_logits(normed.test_features)
    near = M.create("clap", epochs=30, text_norm=1.0).fit(normed)
    free = M.create("clap", epochs=30, text_norm=1.0, constraint="none").fit(normed)
    d_near = (near.predict_logits(normed.test_features) - zs).abs().mean()
    d_free = (free.predict_logits(normed.test_features) - zs).abs().mean()
    assert 0 < d_near < d_free
    # larger raw norms = smaller steps in direction space (lr/s²): closer to zero-shot
    big = M.create("clap", epochs=30, text_norm=10.0).fit(normed)
    assert (big.predict_logits(normed.test_features) - zs).abs().mean() < d_near
    assert big.selected_["text_norms"] == "text_norm=10.0"


def test_clap_without_text_norms_warns_naming_the_bundle_and_uses_unit_norms(small, normed):
    with pytest.warns(DataWarning, match=r"clap: the bundle \(dataset=synthetic.*seed=4\) has no text_norms"):
        old = M.create("clap", epochs=5).fit(small)
    assert old.selected_["text_norms"] == "1.0 (bundle has no text_norms)"
    unit_norms = M.create("clap", epochs=5).fit(replace(small, text_norms=torch.ones(6)))
    assert torch.equal(old.predict_logits(small.test_features), unit_norms.predict_logits(small.test_features))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.create("clap", epochs=2).fit(normed)  # norms present: no warning
        M.create("clap", epochs=2, text_norm=2.0).fit(small)  # set by hand: no warning


def test_bundle_text_norms_round_trip_validation_and_old_bundles(tmp_path, small):
    norms = torch.linspace(1.5, 9.0, 6)
    path = bundle_io.save(replace(small, text_norms=norms), tmp_path / "new.safetensors")
    back = bundle_io.load(path)
    assert torch.equal(back.text_norms, norms) and bundle_io.info(back)["tensors"]["text_norms"] == [6]
    old = bundle_io.load(bundle_io.save(small, tmp_path / "old.safetensors"))  # written without it, as before
    assert old.text_norms is None
    from safetensors import safe_open

    with safe_open(str(tmp_path / "old.safetensors"), "pt") as f:
        assert "text_norms" not in f.keys() and f.metadata()["format"] == "fewclip-bundle/1"
    fields = {name: getattr(small, name) for name in bundle_io.ALL_TENSORS if name != "text_norms"}
    with pytest.raises(BundleError, match=r"'text_norms' has shape \[5\]; expected \[6\]"):
        bundle_io.make_bundle(**fields, text_norms=torch.ones(5))
    with pytest.raises(BundleError, match=r"'text_norms' holds 0.0 for class 2; every norm must be > 0"):
        bundle_io.make_bundle(**fields, text_norms=torch.tensor([1.0, 1, 0, 1, 1, 1]))
    with pytest.raises(BundleError, match="'text_norms'.*NaN"):
        bundle_io.make_bundle(**fields, text_norms=torch.tensor([1.0, 1, float("nan"), 1, 1, 1]))
    # cross-validation folds keep the norms
    from fewclip.methods.cv import fold_bundle

    assert torch.equal(fold_bundle(back.without_test(), back.support_labels == 0).text_norms, norms)


class FakeBackbone:
    """Just what encode_prompts reads: fixed raw embeddings per sentence."""

    context_length = 77

    def __init__(self, table):
        self.table = table

    def cache_key(self):
        return {"fake": 1}

    def encode_text(self, sentences):
        return torch.stack([self.table[s] for s in sentences])

    def count_truncated(self, sentences):
        return 0


def test_encode_prompts_returns_the_raw_text_norms():
    table = {"a": torch.tensor([3.0, 4.0, 0.0]), "b": torch.tensor([0.0, 0.0, 2.0]), "c": torch.tensor([0.0, 1.0, 0.0])}
    weights, norms, info = encode_prompts(FakeBackbone(table), [["a", "b"], ["c"]], return_norms=True)
    # class 0: the raw mean (1.5, 2, 1) has norm √7.25; the direction is the mean of the unit embeddings, renormalised
    close(norms, [math.sqrt(7.25), 1.0], tol=1e-6)
    close(weights[0], F.normalize(torch.tensor([0.3, 0.4, 0.5], dtype=D64), dim=0), tol=1e-6)
    assert info["prompts"] == 3
    plain = encode_prompts(FakeBackbone(table), [["a", "b"], ["c"]])
    assert len(plain) == 2 and torch.equal(plain[0], weights)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_run_and_extract_end_to_end_with_a_tiny_open_clip(tmp_path):
    data_root = make_pets(tmp_path / "data", train=6, val=4, test=5)
    tiny = save_tiny_openclip(tmp_path / "model", "vit", name="fewclip-test-lpclap-vit", seed=0)
    out, cache = tmp_path / "results", tmp_path / "cache"
    common = ["--dataset", "oxford_pets", "--data-root", str(data_root), "--model", f"local-dir:{tiny.folder}"]
    common += ["--views", "2", "--cache-dir", str(cache), "--no-progress"]
    argv = ["run", *common, "--out", str(out), "--shots", "2", "--seeds", "1", "--method", "lp++", "clap"]
    argv += ["--set", "lp++:epochs=40", "--set", "clap:epochs=40"]
    assert main(argv) == 0
    results = {r["method"]: r for r in (json.loads(p.read_text()) for p in Path(out).rglob("shots_2-seed_1.json"))}
    assert set(results) == {"lp++", "clap"}
    lpp, clap = results["lp++"], results["clap"]
    assert 1 <= lpp["best_epoch"] <= 40 and lpp["selected"]["epoch"] == lpp["best_epoch"]
    assert lpp["selection"] == "val" and len(lpp["history"]) == 40 and len(clap["history"]) == 40
    assert clap["selected"]["text_norms"] == "bundle text_norms" and clap["accuracy"]["test_accuracy"] >= 0
    # the bundle written by extraction carries the raw text norms
    bundle_path = tmp_path / "pets.safetensors"
    assert main(["extract", *common, "--shots", "2", "--seed", "1", "--out", str(bundle_path)]) == 0
    bundle = bundle_io.load(bundle_path)
    assert bundle.text_norms is not None and bundle.text_norms.shape == (3,) and bool((bundle.text_norms > 0).all())
