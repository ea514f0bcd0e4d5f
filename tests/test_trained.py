"""Tip-Adapter-F, APE-T and CLIP-Adapter: formulas, parameter counts, training, determinism, honesty."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import fewclip.methods as M
from conftest import FAST
from fewclip.features.synthetic import make_synthetic_bundle
from fewclip.methods.ape_t import ape_t_logits, ape_t_weights, factored_logits
from fewclip.methods.base import MethodError
from fewclip.methods.clip_adapter import adapter_features
from fewclip.methods.search import ClassLayout, phi
from fewclip.methods.tip_adapter_f import cache_logits
from fewclip.methods.training import MixedPrecision, canonical_order, draw_views, fit_epochs


def fast(name, **kw):
    """The suite's FAST settings for ``name`` (small search grids, few epochs), overridden by ``kw``."""
    return {**FAST.get(name, {}), **kw}


@pytest.fixture(scope="module")
def trainable():
    """Big enough for training to matter: 10 classes x 16 shots, D = 64, 6 views, 10 val rows per class."""
    return make_synthetic_bundle(classes=10, shots=16, dim=64, views=6, val_per_class=10, test_per_class=20, seed=5)


# --------------------------------------------------------------------------- formulas on tiny cases


def test_ape_t_weights_add_the_class_residual_on_the_selected_channels_only():
    text = torch.zeros(2, 4)
    keys = torch.zeros(3, 4)
    labels = torch.tensor([0, 1, 1])
    channels = torch.tensor([3, 1])
    residual = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # R[class, q] acts on channel channels[q]
    new_text, new_keys = ape_t_weights(text, keys, labels, channels, residual)
    assert new_text.tolist() == [[0, 2, 0, 1], [0, 4, 0, 3]]
    assert new_keys.tolist() == [[0, 2, 0, 1], [0, 4, 0, 3], [0, 4, 0, 3]]
    assert text.abs().sum() == 0 and keys.abs().sum() == 0  # inputs untouched


def test_ape_t_logits_match_a_hand_computation():
    # 2 classes, 1 key each, D = 2, channel 0 selected. x = (1, 0).
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[0.6, 0.8], [0.8, -0.6]])
    labels = torch.tensor([0, 1])
    residual = torch.tensor([[0.1], [-0.2]])
    v = torch.tensor([2.0, 0.5])
    x = torch.tensor([[1.0, 0.0]])
    out = ape_t_logits(x, text, keys, labels, torch.tensor([0]), residual, v, alpha=3.0, beta=2.0)
    # W̃ = [[1.1, 0], [-0.2, 1]], F̃ = [[0.7, 0.8], [0.6, -0.6]]; x·W̃ᵀ = [1.1, -0.2]; x·F̃ᵀ = [0.7, 0.6]
    expected0 = 110.0 + 3.0 * 2.0 * torch.exp(torch.tensor(-2.0 * 0.3))
    expected1 = -20.0 + 3.0 * 0.5 * torch.exp(torch.tensor(-2.0 * 0.4))
    assert torch.allclose(out, torch.stack([expected0, expected1])[None], atol=1e-4)


def test_factored_training_forward_equals_the_formula():
    g = torch.Generator().manual_seed(0)
    C, K, D, Q = 3, 2, 8, 5
    text, keys = (
        F.normalize(torch.randn(C, D, generator=g), dim=-1),
        F.normalize(torch.randn(C * K, D, generator=g), dim=-1),
    )
    labels = torch.tensor([2, 0, 1, 0, 2, 1])  # not class-grouped
    channels = torch.tensor([6, 0, 3, 1, 4])
    residual, v = 0.3 * torch.randn(C, Q, generator=g), 1 + 0.5 * torch.rand(C * K, generator=g)
    x = F.normalize(torch.randn(4, D, generator=g), dim=-1)
    alpha, beta = 1.7, 3.2
    layout = ClassLayout(labels, C)
    reference = ape_t_logits(x, text, keys, labels, channels, residual, v, alpha, beta)
    grouped = phi(layout.arrange(x @ keys.T), beta)
    fast = factored_logits(
        x @ text.T, grouped, x[:, channels], residual, layout.arrange_weights(v[None]), layout, alpha, beta
    )
    assert torch.allclose(fast, reference, atol=1e-4, rtol=1e-5)


def test_at_initialisation_tip_f_and_ape_t_equal_tip_adapter(trainable):
    tip = M.create("tip-adapter", selection="none", init_alpha=2.5, init_beta=3.0).fit(trainable)
    x = F.normalize(trainable.test_features, dim=-1)
    expected = tip.predict_logits(trainable.test_features)
    layout = ClassLayout(tip.key_labels_, trainable.num_classes)
    assert torch.allclose(cache_logits(x, tip.text_, tip.cache_keys_, layout, 2.5, 3.0), expected, atol=1e-3)
    zeros, ones = torch.zeros(trainable.num_classes, 7), torch.ones(tip.key_labels_.numel())
    channels = torch.arange(7)
    got = ape_t_logits(x, tip.text_, tip.cache_keys_, tip.key_labels_, channels, zeros, ones, 2.5, 3.0)
    assert torch.allclose(got, expected, atol=1e-3)


def test_clip_adapter_features_formula():
    x = torch.tensor([[1.0, -1.0]])
    w1 = torch.tensor([[[1.0], [0.5]]])  # [R=1, D=2, H=1]
    w2 = torch.tensor([[[2.0, -3.0]]])  # [1, H=1, D=2]
    # hidden = relu(1 - 0.5) = 0.5; adapted = relu([1.0, -1.5]) = [1, 0]; x' = 0.25·[1, 0] + 0.75·[1, -1]
    out = adapter_features(x, w1, w2, torch.tensor([0.25]))
    assert torch.allclose(out, torch.tensor([[[1.0, -0.75]]]))


# --------------------------------------------------------------------------- parameters, channels, presets


def test_parameter_counts(trainable):
    C, N, D = trainable.num_classes, trainable.num_support, trainable.dim
    tip_f = M.create("tip-adapter-f", **fast("tip-adapter-f", epochs=1)).fit(trainable)
    assert tip_f.trained_parameters_ == N * D == tip_f.cache_keys_.numel()
    ape_t = M.create("ape-t", **fast("ape-t", channels=24, epochs=1)).fit(trainable)
    assert ape_t.trained_parameters_ == C * 24 + N
    assert ape_t.residual_.shape == (C, 24) and ape_t.value_weights_.shape == (N,)
    adapter = M.create("clip-adapter", epochs=1).fit(trainable)
    assert adapter.trained_parameters_ == 2 * D * (D // 4)


def test_ape_t_channel_count_may_differ_from_training_free_ape(trainable):
    """The published configs use Q_T ≠ Q (upstream crashes then). Both presets rescale from D = 1024."""
    ape = M.create("ape", preset="caltech101", search_step=[4, 4, 2]).fit(trainable)
    ape_t = M.create("ape-t", preset="caltech101", epochs=2, search_step=[4, 4]).fit(trainable)
    assert ape.channels_.numel() == round(800 * 64 / 1024) == 50
    assert ape_t.channels_train_.numel() == round(900 * 64 / 1024) == 56
    assert ape_t.trained_parameters_ == trainable.num_classes * 56 + trainable.num_support


def test_ape_t_criterion_pool_changes_the_channels(trainable):
    a = M.create("ape-t", channels=20, epochs=1, selection="none").fit(trainable)
    b = M.create("ape-t", channels=20, epochs=1, selection="none", criterion_pool="text+cache").fit(trainable)
    assert not torch.equal(torch.sort(a.channels_train_).values, torch.sort(b.channels_train_).values)
    with pytest.raises(
        MethodError, match=r"ape-t: criterion_pool='keys' is not valid; expected one of \['text', 'text\+cache'\]\."
    ):
        M.create("ape-t", criterion_pool="keys").fit(trainable)


def test_presets_carry_the_published_training_settings():
    assert M.preset_params("tip-adapter-f", "eurosat")["epochs"] == 100
    p = M.preset_params("tip-adapter-f", "imagenet")
    assert (p["lr"], p["eps"], p["epochs"], p["search_scale"], p["init_alpha"]) == (1e-3, 1e-4, 20, [7, 3], 1.17)
    p = M.preset_params("ape-t", "stanfordcars")  # alias of stanford_cars
    assert (p["channels"], p["lr"], p["eps"], p["epochs"], p["w_sim"], p["w_var"]) == (800, 1e-3, 5e-3, 30, 0.2, 0.8)
    assert M.create("ape-t", preset="imagenet", lr=0.01).lr == 0.01  # every default can be overridden


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("tip-adapter-f", {"epochs": 0}, r"epochs=0 is not valid; expected a positive integer\."),
        ("ape-t", {"lr": -1.0}, r"lr=-1.0 is not valid; expected a finite real number > 0\."),
        ("clip-adapter", {"batch_size": 2.5}, r"batch_size=2.5 is not valid; expected a positive integer\."),
        (
            "clip-adapter",
            {"ratios": [0.2, 1.5]},
            r"ratios=\[0.2, 1.5\] is not valid; expected a list of finite real numbers in \[0, 1\]\.",
        ),
        ("clip-adapter", {"reduction": 0}, r"reduction=0 is not valid; expected a positive integer\."),
        ("clip-adapter", {"reduction": 65}, r"reduction=65 is not valid; expected a positive integer ≤ D = 64\."),
        ("clip-adapter", {"ratios": []}, r"ratios=\[\] is not valid under selection='val'; expected a non-empty list"),
        (
            "tip-adapter-f",
            {"weight_decay": -0.1},
            r"weight_decay=-0.1 is not valid; expected a finite real number ≥ 0\.",
        ),
    ],
)
def test_bad_training_hyperparameters_are_named(trainable, name, params, message):
    with pytest.raises(MethodError, match=f"^{name}: {message}"):
        M.create(name, **params).fit(trainable)


# --------------------------------------------------------------------------- training behaviour


@pytest.mark.parametrize("name", ["tip-adapter-f", "ape-t", "clip-adapter"])
def test_training_lowers_the_loss_and_raises_validation_accuracy(trainable, name):
    model = M.create(name, **fast(name, epochs=15, batch_size=64)).fit(trainable)
    history = model.history_
    assert len(history) == 15 and [h["epoch"] for h in history] == list(range(1, 16))
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]
    val = [max(h["val_accuracy"]) if isinstance(h["val_accuracy"], list) else h["val_accuracy"] for h in history]
    assert max(val) > val[0]
    chosen = model.best_epoch_
    assert model.hyperparameters()["epoch"] == chosen
    if name == "clip-adapter":  # each ratio keeps its own best epoch; the chosen ratio's column decides
        columns = list(zip(*(h["val_accuracy"] for h in history)))
        best_ratio = max(range(len(columns)), key=lambda r: (max(columns[r]), -r))
        assert model.ratio_ == model.ratios[best_ratio]
        val = list(columns[best_ratio])
    assert chosen == 1 + val.index(max(val))  # the first epoch with the best validation accuracy


def test_trained_cache_methods_beat_training_free_tip_adapter(trainable):
    tip = M.create("tip-adapter", **fast("tip-adapter")).fit(trainable)
    tip_accuracy = tip.score(trainable.test_features, trainable.test_labels)
    for name in ("tip-adapter-f", "ape-t"):
        model = M.create(name, **fast(name, epochs=15, batch_size=64)).fit(trainable)
        assert model.score(trainable.test_features, trainable.test_labels) > tip_accuracy, name


def test_clip_adapter_batched_ratios_train_like_separate_runs(trainable):
    ratios = [0.2, 0.6]
    both = M.create("clip-adapter", ratios=ratios, epochs=5, batch_size=64).fit(trainable)
    alone = [M.create("clip-adapter", ratios=[r], epochs=5, batch_size=64).fit(trainable) for r in ratios]
    for r, single in enumerate(alone):  # each ratio's validation curve is that of its own run
        assert [h["val_accuracy"][r] for h in both.history_] == [h["val_accuracy"] for h in single.history_]
    best = max(range(2), key=lambda r: (max(h["val_accuracy"][r] for h in both.history_), -r))
    assert both.ratio_ == ratios[best]
    # the weights kept are those the chosen ratio reaches on its own, at the same epoch
    chosen = alone[best]
    assert both.best_epoch_ == chosen.best_epoch_
    assert torch.allclose(both.w1_, chosen.w1_, atol=1e-5) and torch.allclose(both.w2_, chosen.w2_, atol=1e-5)


def test_selection_none_keeps_the_last_epoch_and_needs_no_validation(trainable):
    no_val = replace(trainable, val_features=None, val_labels=None)
    model = M.create("tip-adapter-f", selection="none", epochs=3, init_alpha=2.0, init_beta=4.0).fit(no_val)
    assert model.best_epoch_ == 3 and model.val_accuracy_ is None
    assert (model.alpha_, model.beta_) == (2.0, 4.0)
    assert all(h["val_accuracy"] is None for h in model.history_)
    with pytest.raises(MethodError, match="selection='none'"):
        M.create("ape-t").fit(no_val)


def test_single_view_bundle_trains_on_that_view(trainable):
    one = replace(trainable, support_features=trainable.support_features[:1])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(draw_views(one.support_features, g), F.normalize(one.support_features[0], dim=-1))
    model = M.create("ape-t", **fast("ape-t", epochs=3)).fit(one)
    assert model.score(one.test_features, one.test_labels) > 100 / one.num_classes


def test_views_are_drawn_uniformly_per_image():
    support = torch.eye(4)[:, None, :].expand(4, 1000, 4) * 3.0  # view v of every image points along axis v
    drawn = draw_views(support, torch.Generator().manual_seed(1))
    assert torch.allclose(drawn.norm(dim=1), torch.ones(1000))
    counts = torch.bincount(drawn.argmax(dim=1), minlength=4)
    assert counts.sum() == 1000 and bool((counts > 200).all()) and bool((counts < 300).all())


def test_canonical_order_ignores_row_positions(trainable):
    perm = torch.randperm(trainable.num_support, generator=torch.Generator().manual_seed(3))
    a = canonical_order(trainable.support_features, trainable.support_labels)
    b = canonical_order(trainable.support_features[:, perm], trainable.support_labels[perm])
    assert torch.equal(trainable.support_features[:, a], trainable.support_features[:, perm][:, b])
    assert bool((trainable.support_labels[a][1:] >= trainable.support_labels[a][:-1]).all())


@pytest.mark.parametrize("name", ["tip-adapter-f", "ape-t", "clip-adapter"])
def test_determinism_for_a_seed_and_dependence_on_it(trainable, name):
    kw = fast(name, epochs=4, batch_size=64)
    a, b = M.create(name, seed=3, **kw).fit(trainable), M.create(name, seed=3, **kw).fit(trainable)
    c = M.create(name, seed=4, **kw).fit(trainable)
    assert a.history_ == b.history_
    assert torch.equal(a.predict_logits(trainable.test_features), b.predict_logits(trainable.test_features))
    assert [h["loss"] for h in a.history_] != [h["loss"] for h in c.history_]


def test_fp16_support_features_train_fp32_weights(trainable):
    half = replace(trainable, support_features=trainable.support_features.half())
    model = M.create("tip-adapter-f", **fast("tip-adapter-f", epochs=2)).fit(half)
    assert model.cache_keys_.dtype == torch.float32


# --------------------------------------------------------------------------- the shared epoch loop


def quadratic(target: torch.Tensor):
    """A parameter stack [R, 2] pulled towards ``target`` by SGD: loss Σ (w − target)²."""
    w = torch.zeros(target.shape, requires_grad=True)
    return w, lambda batch: ((w - target) ** 2).sum() * batch


def test_fit_epochs_keeps_each_candidates_first_best_epoch_and_its_state():
    w, loss = quadratic(torch.tensor([[1.0, 2.0], [-1.0, 0.5]]))
    scripted = iter([[10.0, 5.0], [30.0, 5.0], [30.0, 40.0], [20.0, 40.0]])  # ties go to the earliest epoch
    seen = []

    def evaluate():
        seen.append(w.detach().clone())
        return torch.tensor(next(scripted))

    optimizer = torch.optim.SGD([w], lr=0.1)
    result = fit_epochs({"w": w}, optimizer, 4, lambda epoch: [1.0, 1.0], loss, name="toy", lr=0.1, evaluate=evaluate)
    assert result.best_epochs == [2, 3] and result.best_accuracies == [30.0, 40.0]
    assert torch.equal(result.state["w"][0], seen[1][0]) and torch.equal(result.state["w"][1], seen[2][1])
    assert [h["val_accuracy"] for h in result.history] == [[10.0, 5.0], [30.0, 5.0], [30.0, 40.0], [20.0, 40.0]]
    assert [list(h) for h in result.history] == [["epoch", "loss", "val_accuracy"]] * 4


def test_fit_epochs_per_epoch_lr_weighted_loss_and_last_epoch_without_evaluation():
    w, loss = quadratic(torch.tensor([[3.0, 0.0]]))
    optimizer = torch.optim.SGD([w], lr=1.0)
    rates = {1: 0.0, 2: 0.25, 3: 0.125}
    batches = [2.0, 1.0]  # the batch is also its weight: loss mean = Σ w·loss / Σ w
    result = fit_epochs(
        {"w": w}, optimizer, 3, lambda epoch: batches, loss, name="toy", lr=1.0, epoch_lr=rates.get, weight=float
    )
    assert [h["lr"] for h in result.history] == [0.0, 0.25, 0.125]
    assert [list(h) for h in result.history] == [["epoch", "lr", "loss", "val_accuracy"]] * 3
    assert result.history[0]["loss"] == pytest.approx((2 * 2 * 9 + 1 * 1 * 9) / 3)  # lr 0: nothing moved
    assert result.best_epochs == [3] and result.best_accuracies is None
    assert torch.equal(result.state["w"], w.detach()) and optimizer.param_groups[0]["lr"] == 0.125


def test_fit_epochs_names_the_epoch_and_lr_when_the_loss_is_not_finite():
    w = torch.zeros(2, requires_grad=True)

    def loss(epoch):
        return (w**2).sum() + (float("nan") if epoch == 2 else 0.0)

    with pytest.raises(MethodError, match=r"^toy: the training loss became nan at epoch 2; lower lr \(now 0.5\)"):
        fit_epochs({"w": w}, torch.optim.SGD([w], lr=0.5), 3, lambda epoch: [epoch], loss, name="toy", lr=0.5)


def test_mixed_precision_is_a_no_op_on_the_cpu():
    amp = MixedPrecision(torch.float16, torch.device("cpu"))
    assert not amp.enabled and not amp.scaler.is_enabled()
    results = []
    for dtype in (None, torch.float16, torch.bfloat16):
        w, loss = quadratic(torch.tensor([[1.0, -2.0]]))
        optimizer = torch.optim.AdamW([w], lr=0.1)
        evaluate = lambda w=w: float(-((w - 1) ** 2).sum())  # noqa: E731
        results.append(
            fit_epochs(
                {"w": w},
                optimizer,
                3,
                lambda e: [1.0, 1.0],
                loss,
                name="toy",
                lr=0.1,
                evaluate=evaluate,
                mixed_precision=dtype,
            )  # fmt: skip
        )
    for other in results[1:]:
        assert other.history == results[0].history and torch.equal(other.state["w"], results[0].state["w"])


def test_an_image_model_trains_through_the_same_loop():
    """What a method fine-tuning an image tower does: a module, a DataLoader of (images, labels) batches, eval mode
    during evaluation, steps counted by the progress bar."""
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(24, 3, 4, 4, generator=g), torch.arange(24) % 3
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.1), torch.nn.Linear(48, 3))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=8, shuffle=True, generator=g
    )
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)

    def evaluate():
        model.eval()
        accuracy = float((model(images).argmax(1) == labels).float().mean() * 100)
        model.train()
        return accuracy

    result = fit_epochs(
        params, optimizer, 5, lambda epoch: loader,
        lambda batch: torch.nn.functional.cross_entropy(model(batch[0]), batch[1]),
        name="image-toy", lr=1e-2, evaluate=evaluate, steps_per_epoch=len(loader),
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 5 * len(loader)), mixed_precision=torch.float16,
    )  # fmt: skip
    assert len(result.history) == 5 and result.history[-1]["loss"] < result.history[0]["loss"]
    model.load_state_dict(result.state)
    assert evaluate() == max(h["val_accuracy"] for h in result.history)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision runs on CUDA only")
def test_mixed_precision_trains_on_cuda_with_a_grad_scaler():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=g).cuda(), (torch.arange(64) % 4).cuda()
    model = torch.nn.Linear(16, 4).cuda()
    params = dict(model.named_parameters())
    amp = MixedPrecision(torch.float16, x.device)
    assert amp.enabled and amp.scaler.is_enabled()
    result = fit_epochs(
        params, torch.optim.SGD(params.values(), lr=0.5), 5, lambda e: [(x, y)],
        lambda batch: torch.nn.functional.cross_entropy(model(batch[0]), batch[1]), name="cuda-toy", lr=0.5,
        evaluate=lambda: float((model(x).argmax(1) == y).float().mean() * 100), mixed_precision=torch.float16,
    )  # fmt: skip
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert all(v.dtype == torch.float32 for v in result.state.values())
