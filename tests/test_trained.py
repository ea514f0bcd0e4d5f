"""Tip-Adapter-F, APE-T and CLIP-Adapter: formulas, parameter counts, training, determinism, honesty."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import fewclip.methods as M
from fewclip.features.synthetic import make_synthetic_bundle
from fewclip.methods.ape_t import ape_t_logits, ape_t_weights, factored_logits
from fewclip.methods.base import MethodError
from fewclip.methods.clip_adapter import adapter_features
from fewclip.methods.search import ClassLayout, phi
from fewclip.methods.tip_adapter_f import cache_logits
from fewclip.methods.training import canonical_order, draw_views

GRID = {"search_step": [10, 5]}


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
    tip_f = M.create("tip-adapter-f", epochs=1, **GRID).fit(trainable)
    assert tip_f.trained_parameters_ == N * D == tip_f.cache_keys_.numel()
    ape_t = M.create("ape-t", channels=24, epochs=1, **GRID).fit(trainable)
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
    model = M.create(name, epochs=15, batch_size=64, **({} if name == "clip-adapter" else GRID)).fit(trainable)
    history = model.history_
    assert len(history) == 15 and [h["epoch"] for h in history] == list(range(1, 16))
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]
    val = [max(h["val_accuracy"]) if isinstance(h["val_accuracy"], list) else h["val_accuracy"] for h in history]
    assert max(val) > val[0]
    chosen = model.best_epoch_
    assert model.hyperparameters()["epoch"] == chosen
    best = max(val) if name != "clip-adapter" else None
    if best is not None:  # the first epoch with the best validation accuracy
        assert chosen == 1 + val.index(best)


def test_trained_cache_methods_beat_training_free_tip_adapter(trainable):
    tip = M.create("tip-adapter", **GRID).fit(trainable).score(trainable.test_features, trainable.test_labels)
    for name in ("tip-adapter-f", "ape-t"):
        model = M.create(name, epochs=15, batch_size=64, **GRID).fit(trainable)
        assert model.score(trainable.test_features, trainable.test_labels) > tip, name


def test_clip_adapter_batched_ratios_train_like_separate_runs(trainable):
    both = M.create("clip-adapter", ratios=[0.2, 0.6], epochs=5, batch_size=64).fit(trainable)
    alone = M.create("clip-adapter", ratios=[0.6], epochs=5, batch_size=64).fit(trainable)
    assert [h["val_accuracy"][1] for h in both.history_] == [h["val_accuracy"] for h in alone.history_]
    best = max(range(2), key=lambda r: (max(h["val_accuracy"][r] for h in both.history_), -r))
    assert both.ratio_ == [0.2, 0.6][best]
    if both.ratio_ == 0.6:
        assert torch.allclose(both.w1_, alone.w1_, atol=1e-5)


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
    model = M.create("ape-t", epochs=3, **GRID).fit(one)
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
    kw = {"epochs": 4, "batch_size": 64, **({} if name == "clip-adapter" else GRID)}
    a, b = M.create(name, seed=3, **kw).fit(trainable), M.create(name, seed=3, **kw).fit(trainable)
    c = M.create(name, seed=4, **kw).fit(trainable)
    assert a.history_ == b.history_
    assert torch.equal(a.predict_logits(trainable.test_features), b.predict_logits(trainable.test_features))
    assert [h["loss"] for h in a.history_] != [h["loss"] for h in c.history_]


@pytest.mark.parametrize("name", ["tip-adapter-f", "ape-t", "clip-adapter"])
def test_shuffled_test_labels_change_nothing_that_is_selected(trainable, name):
    g = torch.Generator().manual_seed(11)
    shuffled = replace(
        trainable, test_labels=trainable.test_labels[torch.randperm(trainable.test_labels.numel(), generator=g)]
    )
    kw = {"epochs": 6, "batch_size": 64, **({} if name == "clip-adapter" else GRID)}
    a, b = M.create(name, **kw).fit(trainable), M.create(name, **kw).fit(shuffled)
    assert a.best_epoch_ == b.best_epoch_
    assert a.hyperparameters() == b.hyperparameters()
    assert a.history_ == b.history_


def test_fp16_support_features_train_fp32_weights(trainable):
    half = replace(trainable, support_features=trainable.support_features.half())
    model = M.create("tip-adapter-f", epochs=2, **GRID).fit(half)
    assert model.cache_keys_.dtype == torch.float32
