import math

import pytest
import torch

import fewclip.methods as M
from conftest import FAST
from fewclip.features.bundle import make_bundle
from fewclip.methods.ape import resolve_channels
from fewclip.methods.base import MethodError
from fewclip.methods.gda import gda_classifier, gda_precision, symmetric_gram, synthesised_means

TEXT = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
KEYS = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8]])
X = torch.tensor([[0.8, 0.6, 0.0]])


def toy_bundle(order=(0, 1, 2, 3)):
    idx = torch.tensor(order)
    return make_bundle(
        support_features=(3.0 * KEYS[idx])[None],  # raw features: scale must not matter
        support_labels=torch.tensor([0, 0, 1, 1])[idx],
        text_weights=TEXT,
        test_features=X,
        test_labels=torch.tensor([0]),
        val_features=X,
        val_labels=torch.tensor([0]),
    )


def test_zero_shot_logits_by_hand():
    model = M.create("zero-shot").fit(toy_bundle())
    assert torch.allclose(model.predict_logits(X), torch.tensor([[80.0, 60.0]]))


def test_tip_adapter_logits_by_hand():
    model = M.create("tip-adapter", selection="none", init_alpha=2.0, init_beta=1.0).fit(toy_bundle((3, 0, 2, 1)))
    e = math.exp
    expected = [80 + 2 * (e(-0.2) + e(-0.04)), 60 + 2 * (e(-0.4) + e(-0.64))]
    assert torch.allclose(model.predict_logits(X), torch.tensor([expected]), atol=1e-4)


def test_ape_channels_weights_and_logits_by_hand():
    model = M.create("ape", selection="none", channels=2, init_alpha=2.0, init_beta=1.0, init_gamma=0.5)
    model.fit(toy_bundle((2, 0, 3, 1)))
    # S = [0, 4.16/18, 0], V = [0.5, 0.5, 0] -> J = [0.25, 0.134, 0]: channels 0 and 1
    assert sorted(model.channels_.tolist()) == [0, 1]
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731  two-class softmax
    p_true = [sig(1.0), sig(-0.2), sig(1.0), sig(1.0)]  # keys on channels (0,1): [1,0],[.6,.8],[0,1],[0,1]
    d = [math.log2((1 + 1e-6) / (p + 1e-6)) for p in p_true]
    assert model.kl_.tolist() == pytest.approx(d, abs=1e-6)
    r = [math.exp(0.5 * v) for v in d]
    e = math.exp
    expected = [80 + 2 * (e(-0.2) * r[0] + e(-0.04) * r[1]), 60 + 2 * (e(-0.4) * r[2] + e(-0.4) * r[3])]
    assert torch.allclose(model.predict_logits(X), torch.tensor([expected]), atol=1e-4)


def test_gda_precision_and_classifier_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    means, precision = gda_precision(x, y, 2)
    assert torch.allclose(means, torch.tensor([[0.8, 0.4], [0.4, 0.8]], dtype=torch.float64))
    # scatter = [[.4, -.32], [-.32, .4]], tr(Σ̂) = .8/3; P = 2·inv(scatter + tr·I)
    a, b = 0.4 + 0.8 / 3, -0.32
    det = a * a - b * b
    expected_p = 2 * torch.tensor([[a, -b], [-b, a]], dtype=torch.float64) / det
    assert torch.allclose(precision, expected_p, rtol=1e-10)
    w, bias = gda_classifier(means, precision)
    w0 = expected_p @ torch.tensor([0.8, 0.4], dtype=torch.float64)
    assert torch.allclose(w[0], w0)
    assert float(bias[0]) == pytest.approx(
        math.log(0.5) - 0.5 * float(w0 @ torch.tensor([0.8, 0.4], dtype=torch.float64))
    )


def test_gda_precision_equals_naive_ks_estimator():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 8, generator=g, dtype=torch.float64), torch.arange(60) % 3
    _, precision = gda_precision(x, y, 3)
    mu = torch.stack([x[y == c].mean(0) for c in range(3)])
    cov = sum(torch.outer(x[i] - mu[y[i]], x[i] - mu[y[i]]) for i in range(60)) / 59
    naive = 8 * torch.linalg.pinv(59 * cov + torch.trace(cov) * torch.eye(8, dtype=torch.float64))
    assert torch.allclose(precision, naive, rtol=1e-8)


@pytest.mark.parametrize(("dim", "blocks"), [(7, 4), (3, 4), (8, 1), (9, 2)])
def test_symmetric_gram_equals_the_full_product(dim, blocks):
    x = torch.randn(20, dim, generator=torch.Generator().manual_seed(dim), dtype=torch.float64)
    assert torch.allclose(symmetric_gram(x, blocks), x.T @ x, rtol=1e-12, atol=1e-12)


def test_gda_alone_is_nearest_mean_on_isotropic_classes():
    # each class: centre ± r·e_i for every axis i, so the pooled scatter is exactly isotropic
    dim, r = 4, 0.5
    centres = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 1.0]], dtype=torch.float64)
    offsets = torch.cat([r * torch.eye(dim), -r * torch.eye(dim)]).double()
    x = torch.cat([c + offsets for c in centres])
    means, precision = gda_precision(x, torch.arange(2).repeat_interleave(2 * dim), 2)
    assert torch.allclose(precision, precision[0, 0] * torch.eye(dim, dtype=torch.float64))
    w, b = gda_classifier(means, precision)
    q = torch.randn(500, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    nearest = torch.cdist(q, means).argmin(1)
    assert torch.equal((q @ w.T + b).argmax(1), nearest)


def test_linear_probe_solution_satisfies_optimality():
    from fewclip.methods.linear_probe import fit_logistic

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.arange(40) % 3
    c = 0.5
    w, b = fit_logistic(x, y, 3, c, tol=1e-14, max_iter=500)  # tol: relative change of the loss
    w.requires_grad_(True)
    b.requires_grad_(True)
    objective = 0.5 * (w * w).sum() + c * torch.nn.functional.cross_entropy(x @ w.T + b, y, reduction="sum")
    objective.backward()
    assert float(w.grad.abs().max()) < 1e-5 and float(b.grad.abs().max()) < 1e-5


def test_cache_methods_beat_zero_shot_on_structured_bundle(bundle):
    zs = M.create("zero-shot").fit(bundle).score(bundle.test_features, bundle.test_labels)
    for name in ["tip-adapter", "ape", "gda", "linear-probe"]:
        model = M.create(name, **FAST.get(name, {})).fit(bundle)
        assert model.score(bundle.test_features, bundle.test_labels) > zs + 5, name


def test_selection_val_without_val_names_both_alternatives(bundle):
    from dataclasses import replace

    no_val = replace(bundle, val_features=None, val_labels=None)
    with pytest.raises(MethodError, match="no val_features.*selection='none'"):
        M.create("ape").fit(no_val)
    model = M.create("ape", selection="none").fit(no_val)
    assert (model.alpha_, model.beta_, model.gamma_) == (1.0, 1.0, 0.1)
    assert model.val_accuracy_ is None
    M.create("zero-shot").fit(no_val)  # nothing to select: no error
    with pytest.raises(MethodError, match="selection='test' is not valid.*no selection on test"):
        M.create("tip-adapter", selection="test").fit(bundle)


def test_presets_load_published_values_and_scale_channels(bundle):
    model = M.create("ape", preset="fgvc")
    assert (model.channels, model.w_sim, model.w_var, model.init_alpha) == (800, 0.1, 0.9, 5.0)
    assert list(model.search_scale) == [20, 10, 1] and model.preset == "fgvc_aircraft"
    assert list(M.create("ape", preset="imagenet").search_step) == [200, 20, 5]
    assert resolve_channels(800, 1024, 512) == 400
    assert resolve_channels(800, 1024, 64) == 50
    explicit = M.create("ape", preset="dtd", channels=30)
    assert explicit.channels_reference_dim is None
    with pytest.raises(MethodError, match="channels=100 must satisfy 1 <= channels <= D = 64"):
        M.create("ape", channels=100, selection="none").fit(bundle)
    tip = M.create("tip-adapter", preset="oxford_flowers")
    assert list(tip.search_scale) == [50, 50] and tip.init_alpha == 10.0


def test_unknown_names_list_valid_choices():
    with pytest.raises(
        MethodError, match="unknown method 'apex'; available: ape, ape-t, candle, clip-adapter, clip-ft, flier, gda"
    ):
        M.create("apex")
    with pytest.raises(MethodError, match="unknown preset 'mnist'; valid presets: caltech101"):
        M.create("ape", preset="mnist")
    with pytest.raises(MethodError, match=r"unknown hyperparameter\(s\) \['alpah'\]; valid: .*init_alpha"):
        M.create("tip-adapter", alpah=1)


def test_methods_needing_support_refuse_class_without_support(bundle):
    from dataclasses import replace

    keep = bundle.support_labels != 3
    partial = replace(
        bundle,
        support_features=bundle.support_features[:, keep],
        support_labels=bundle.support_labels[keep],
        support_clean_features=bundle.support_clean_features[keep],
    )
    with pytest.raises(MethodError, match="1 class\\(es\\) have none.*class_003"):
        M.create("linear-probe").fit(partial)
    # GDA synthesises the class's mean from its text row and its nearest support views
    gda = M.create("gda").fit(partial)
    assert gda.new_classes_ == [3]
    x = torch.nn.functional.normalize(partial.support_features.reshape(-1, bundle.dim), dim=1).double()
    t = bundle.text_weights[3].double()
    nearest = x[(x @ t).argsort(descending=True)[:64]]
    mean = (nearest.sum(0) + 16 * t) / 80
    assert torch.allclose(synthesised_means(x, t[None])[0], mean)
    _, precision = gda_precision(x, partial.support_labels.repeat(bundle.views), bundle.num_classes)
    assert torch.allclose(gda.weights_[3].double(), mean @ precision, rtol=1e-4, atol=1e-4)
    # cache methods handle it: the class keeps its zero-shot logit, its cache term is 0
    model = M.create("tip-adapter", selection="none").fit(partial)
    z0 = 100 * torch.nn.functional.normalize(bundle.test_features, dim=1) @ bundle.text_weights.T
    assert torch.allclose(model.predict_logits(bundle.test_features)[:, 3], z0[:, 3], atol=1e-4)


def test_preset_names_resolve_through_the_dataset_registry_and_tables_may_hold_other_keys(monkeypatch):
    from fewclip.methods import registry

    table = {"common": {"init_beta": 2.0}, "presets": {"fgvc_aircraft": {"init_alpha": 5.0}, "my-setup": {}}}
    monkeypatch.setattr(registry, "_preset_file", lambda method: table)
    for alias in ("fgvc", "FGVCAircraft", "fgvc_aircraft"):  # dataset spellings resolve to the table's key
        model = M.create("tip-adapter", preset=alias)
        assert (model.preset, model.init_alpha, model.init_beta) == ("fgvc_aircraft", 5.0, 2.0)
    assert M.create("tip-adapter", preset="my-setup").preset == "my-setup"  # not a dataset: used verbatim
    with pytest.raises(MethodError, match=r"unknown preset 'dtd'; valid presets: fgvc_aircraft, my-setup\."):
        M.create("tip-adapter", preset="dtd")  # a dataset, but not in this table


def test_an_explicit_channel_count_is_not_rescaled_from_the_preset():
    for name in ("ape", "ape-t"):
        preset = M.create(name, preset="imagenet")
        assert preset.channels_reference_dim == 1024
        explicit = M.create(name, preset="imagenet", channels=30)
        assert (explicit.channels, explicit.channels_reference_dim) == (30, None)
        both = M.create(name, preset="imagenet", channels=30, channels_reference_dim=512)
        assert both.channels_reference_dim == 512
