"""Candle (KDD'24): the CLA loss, prototypes, token sets, masks, exact per-image inference, training, options.

Spec ``candle.md`` §10 acceptance checks 1-6 and 9 are marked ``[§10.n]``. Every model here is tiny (D ≤ 32) so the
file runs in seconds on two cores.
"""

import math
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import fewclip.methods as M
from fewclip.features.synthetic import make_synthetic_bundle
from fewclip.methods.base import MethodError
from fewclip.methods.candle import (
    IMAGE,
    LOGIT_SCALE,
    MASKS,
    TEXT,
    VISUAL,
    CandleHead,
    attention_mask,
    candle_lr,
    cla_loss,
    cla_prior,
    epoch_order,
    initial_parameters,
    initial_prototypes,
    multi_head_attention,
    token_kinds,
)

#: a few SGD steps: on b2n's 30 support rows batch 16 is one step per epoch (the step-count tests rely on it)
STEPS = {"epochs": 3, "batch_size": 16}


@pytest.fixture(scope="module")
def b2n():
    """Base-to-new: 7 classes, D = 32, classes 2 and 5 without support (new classes need not be the last labels)."""
    return make_synthetic_bundle(
        classes=7, shots=[6, 6, 0, 6, 6, 0, 6], dim=32, views=3, val_per_class=3, test_per_class=6, seed=2
    )


def random_head(dim=16, classes=5, new=(1, 3), heads=4, mask="none", seed=0, dtype=torch.float32, ratio=0.8):
    """A head whose parameters are all far from their initial values, so every term of the fusion matters."""
    g = torch.Generator().manual_seed(seed)
    new = torch.tensor(new, dtype=torch.long)
    params = initial_parameters(dim, torch.randn(len(new), dim, generator=g), ratio, g)
    for name, value in params.items():
        if name != "ratio":
            params[name] = value + 0.3 * torch.randn(value.shape, generator=g)
    base = 5.0 * torch.randn(classes, dim, generator=g)
    base[new] = 0.0
    text = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    head = CandleHead(params, base, text, new, heads=heads, mask=mask, scale=0.7)
    return head.to(dtype)


def reference_scores(head: CandleHead, images: torch.Tensor) -> torch.Tensor:
    """z^{vt} + z^{vv} of the image rows of ONE token set [images W_I; P W_I; T W_T], written with PyTorch's own
    multi-head attention (independent of fewclip's attention code)."""
    visual, text = head.prototypes()
    b, c, dim = images.shape[0], head.num_classes, images.shape[1]
    tokens = torch.cat([images @ head.w_image, visual @ head.w_image, text @ head.w_text])
    normed = F.layer_norm(tokens, (dim,), head.ln_weight, head.ln_bias, 1e-5)
    mask = attention_mask(token_kinds(b, c), head.mask)
    out, _ = F.multi_head_attention_forward(
        normed, normed, normed, dim, head.heads, head.in_proj_weight, head.in_proj_bias, None, None, False, 0.0,
        head.out_proj_weight, head.out_proj_bias, training=False, need_weights=False, attn_mask=mask,
    )  # fmt: skip
    fused = normed + head.ratio * out
    rows = F.normalize(fused[:b], dim=-1)
    return (
        LOGIT_SCALE * rows @ F.normalize(fused[b + c :], dim=-1).T
        + LOGIT_SCALE * head.scale * rows @ F.normalize(fused[b : b + c], dim=-1).T
    )


# --------------------------------------------------------------------------- the CLA loss and the schedule


def test_cla_loss_hand_example_and_counts_untouched():  # [§10.4]
    counts = torch.tensor([5, 1, 0])
    before = counts.clone()
    prior = cla_prior(counts)
    assert torch.allclose(prior, torch.tensor([6.0, 2.0, 1.0]) / 9.0, atol=1e-6, rtol=0)
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    targets = torch.tensor([0, 2])
    # row 1: z + log π = [1 + log(6/9), 2 + log(2/9), 0.5 + log(1/9)]; row 2 likewise
    adj = [[1.0 + math.log(6 / 9), 2.0 + math.log(2 / 9), 0.5 + math.log(1 / 9)],
           [0.0 + math.log(6 / 9), -1.0 + math.log(2 / 9), 3.0 + math.log(1 / 9)]]  # fmt: skip
    rows = [-(a[t] - math.log(sum(math.exp(v) for v in a))) for a, t in zip(adj, [0, 2])]
    expected = sum(rows) / 2
    assert float(cla_loss(logits, targets, counts)) == pytest.approx(expected, abs=1e-6)
    assert torch.equal(counts, before) and counts.dtype == before.dtype  # the released loss adds 1 in place (C9)


def test_cla_loss_matches_its_formula_for_tau_and_virtual_count():
    g = torch.Generator().manual_seed(0)
    logits, targets = 3 * torch.randn(9, 4, generator=g), torch.randint(4, (9,), generator=g)
    counts = torch.tensor([7, 0, 2, 1])
    for tau, k in [(1.0, 1.0), (0.5, 2.0), (2.0, 0.25)]:
        prior = [(n + k) / sum(m + k for m in counts.tolist()) for n in counts.tolist()]
        total = 0.0
        for z, y in zip(logits.double().tolist(), targets.tolist()):
            adj = [zi + tau * math.log(p) for zi, p in zip(z, prior)]
            total += math.log(sum(math.exp(a) for a in adj)) - adj[y]
        assert float(cla_loss(logits, targets, counts, tau, k)) == pytest.approx(total / 9, abs=1e-5)


def test_lr_schedule_is_dassl_constant_warmup_around_cosine():
    class ConstantWarmup(torch.optim.lr_scheduler.LRScheduler):
        """Dassl's ConstantWarmupScheduler (dassl/optim/lr_scheduler.py), re-expressed for this check."""

        def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
            self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
            super().__init__(optimizer)

        def get_lr(self):
            if self.last_epoch >= self.warmup_epoch:
                return self.successor.get_last_lr()
            return [self.cons_lr for _ in self.base_lrs]

        def step(self, epoch=None):
            if self.last_epoch >= self.warmup_epoch:
                self.successor.step(epoch)
                self._last_lr = self.successor.get_last_lr()
            else:
                super().step(epoch)

    epochs, lr = 7, 3e-4
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = ConstantWarmup(optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs), 1, 1e-5)
        seen = []
        for _ in range(epochs):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    ours = [candle_lr(e, epochs, lr, 1e-5) for e in range(epochs)]
    assert ours == pytest.approx(seen, rel=1e-9)
    assert ours[0] == 1e-5 and ours[1] == lr
    assert ours[3] == pytest.approx(lr * (1 + math.cos(math.pi * 2 / epochs)) / 2)


# --------------------------------------------------------------------------- model: parameters, prototypes, tokens


def test_parameter_count_is_6d2_6d_1_plus_cn_d(b2n):  # [§10.2]
    d, c_n = 16, 3
    head = random_head(dim=d, classes=6, new=(0, 2, 5))
    assert sum(p.numel() for p in head.parameters()) == 6 * d * d + 6 * d + 1 + c_n * d
    model = M.create("candle", epochs=1, batch_size=64).fit(b2n)
    d = b2n.dim
    assert model.trained_parameters_ == 6 * d * d + 6 * d + 1 + 2 * d
    assert model.virtual_prototypes_.shape == (2, d) and model.new_classes_.tolist() == [2, 5]


def test_identity_init_pre_fusion_logits_are_zero_shot_cosines():  # [§10.3]
    g = torch.Generator().manual_seed(1)
    dim, classes = 16, 4
    new = torch.tensor([3])
    text = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    base = 4 * torch.randn(classes, dim, generator=g)
    base[new] = 0
    head = CandleHead(initial_parameters(dim, text[new], 0.1, g), base, text, new, heads=8)
    x = 6 * torch.randn(5, dim, generator=g)
    z0, _, _ = head.train_logits(x)
    visual = base.clone()
    visual[3] = text[3]
    expected = 100 * torch.cat([F.cosine_similarity(x[:, None], text[None], dim=-1),
                                F.cosine_similarity(visual[:, None], text[None], dim=-1)])  # fmt: skip
    assert torch.allclose(z0, expected, atol=1e-4)


def test_training_and_test_logit_shapes():  # [§10.1]
    head = random_head(classes=5)
    x = torch.randn(6, 16)
    for z in head.train_logits(x):
        assert z.shape == (6 + 5, 5)  # B image rows then C prototype rows, C columns
    # the prototype rows are targeted 0..C-1: in z^{vv} a prototype meets its own column at exactly s·α
    _, _, zvv = head.train_logits(x)
    assert torch.allclose(zvv[6:].diagonal(), torch.full((5,), LOGIT_SCALE * head.scale), atol=1e-4)
    assert head.per_image_scores(x).shape == (6, 5)
    assert head.transductive_scores(x, 4).shape == (6, 5)


def test_prototypes_initialised_as_specified():
    g = torch.Generator().manual_seed(0)
    dim = 256
    labels = torch.tensor([0, 0, 2, 2, 2, 4])
    counts = torch.bincount(labels, minlength=6)
    feats = 10 * torch.randn(6, dim, generator=g)
    text = F.normalize(torch.randn(6, dim, generator=g), dim=-1)
    base, new, virtual = initial_prototypes(feats, labels, counts, text, "text", g)
    assert new.tolist() == [1, 3, 5]
    assert torch.allclose(base[0], feats[:2].mean(0), atol=1e-5) and torch.allclose(base[2], feats[2:5].mean(0))
    assert torch.equal(base[4], feats[5]) and bool((base[new] == 0).all())
    assert torch.equal(virtual, text[new]) and virtual.data_ptr() != text.data_ptr()
    virtual += 1.0  # a copy: the text rows do not move with it
    assert not torch.equal(virtual, text[new])
    _, _, noisy = initial_prototypes(feats, labels, counts, text, "visual", torch.Generator().manual_seed(3))
    centre = base[[0, 2, 4]].mean(0)
    noise = noisy - centre
    assert noise.std().item() == pytest.approx(0.05, rel=0.1)  # N(0, 0.05²), on the raw scale
    assert noise.mean().abs().item() < 0.01 and not torch.allclose(noise[0], noise[1])


def test_fit_builds_prototypes_from_clean_features_or_falls_back_to_views(b2n):
    model = M.create("candle", epochs=1, batch_size=64).fit(b2n)
    labels = b2n.support_labels
    for c in (0, 3, 6):
        assert torch.allclose(model.base_prototypes_[c], b2n.support_clean_features[labels == c].mean(0), atol=1e-5)
    assert model.prototype_source_ == "support_clean_features"
    assert torch.equal(model.class_counts_, torch.tensor([6, 6, 0, 6, 6, 0, 6]))
    assert torch.allclose(model.prior_, torch.tensor([7.0, 7, 1, 7, 7, 1, 7]) / 37, atol=1e-7)
    no_clean = M.create("candle", epochs=1, batch_size=64).fit(replace(b2n, support_clean_features=None))
    assert no_clean.prototype_source_ == "support_features_mean_over_views"
    views_mean = b2n.support_features[:, labels == 3].mean(dim=(0, 1))
    assert torch.allclose(no_clean.base_prototypes_[3], views_mean, atol=1e-5)


def test_token_set_is_images_then_visual_then_text_prototypes():
    head = random_head(classes=4, new=(2,))
    x = torch.randn(3, 16)
    tokens, kinds = head.token_set(x)
    visual, text = head.prototypes()
    assert torch.equal(visual[2], head.virtual[0]) and torch.equal(visual[0], head.base_prototypes[0])
    expected = torch.cat([x @ head.w_image, visual @ head.w_image, text @ head.w_text])
    assert torch.allclose(tokens, expected, atol=1e-6)
    assert kinds.tolist() == [IMAGE] * 3 + [VISUAL] * 4 + [TEXT] * 4


def test_training_attention_is_joint_but_inference_is_per_image():
    head = random_head(classes=4, new=(2,))
    x = torch.randn(4, 16)
    y = x.clone()
    y[3] += 2.0  # another image of the batch changes
    a, b = head.train_logits(x)[1], head.train_logits(y)[1]
    assert not torch.allclose(a[0], b[0])  # in training image 0 attends to the other batch images
    assert not torch.allclose(head.joint_scores(x)[0], head.joint_scores(y)[0])  # so does transductive inference
    assert torch.equal(head.per_image_scores(x)[:3], head.per_image_scores(y)[:3])
    assert torch.allclose(head.per_image_scores(x)[:1], head.per_image_scores(x[:1]), atol=1e-5)


# --------------------------------------------------------------------------- attention and masks


@pytest.mark.parametrize("mask", MASKS)
def test_attention_equals_torch_multihead_attention(mask):
    head = random_head(heads=4, mask=mask)
    x = torch.randn(3, 16)
    tokens, kinds = head.token_set(x)
    normed = head.layer_norm(tokens)
    blocked = attention_mask(kinds, mask)
    ours, weights = multi_head_attention(normed, head.in_proj_weight, head.in_proj_bias, head.out_proj_weight,
                                         head.out_proj_bias, 4, blocked)  # fmt: skip
    module = torch.nn.MultiheadAttention(16, 4)
    with torch.no_grad():
        for name in ("in_proj_weight", "in_proj_bias"):
            getattr(module, name).copy_(getattr(head, name))
        module.out_proj.weight.copy_(head.out_proj_weight)
        module.out_proj.bias.copy_(head.out_proj_bias)
    module.eval()
    theirs, their_weights = module(normed, normed, normed, attn_mask=blocked, average_attn_weights=False)
    assert torch.allclose(ours, theirs, atol=1e-5) and torch.allclose(weights, their_weights, atol=1e-6)


# rows: queries, columns: keys, for the token set [img, img, vis, vis, txt, txt]; "x" = blocked
MASK_TABLES = {
    "none": ["......", "......", "......", "......", "......", "......"],
    "in_visual": [".xxx..", "x.xx..", "xx.x..", "xxx...", "......", "......"],
    "in_text": ["......", "......", "......", "......", ".....x", "....x."],
    "between_visual_text": ["....xx", "....xx", "....xx", "....xx", "xxxx..", "xxxx.."],
}


@pytest.mark.parametrize("mask", MASKS)
def test_each_mask_blocks_exactly_the_specified_edges(mask):  # [§10.9]
    head = random_head(dim=8, classes=2, new=(1,), heads=2, mask=mask)
    tokens, kinds = head.token_set(torch.randn(2, 8))
    assert kinds.tolist() == [IMAGE, IMAGE, VISUAL, VISUAL, TEXT, TEXT]
    _, weights = head.fuse(tokens, kinds)  # [H, 6, 6], eval (no dropout)
    expected = torch.tensor([[ch == "x" for ch in row] for row in MASK_TABLES[mask]])
    for h in range(2):
        assert torch.equal(weights[h] == 0, expected), (mask, h)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 6))


# --------------------------------------------------------------------------- exact per-image inference


@pytest.mark.parametrize("mask", MASKS)
def test_per_image_evaluation_equals_a_loop_over_single_image_token_sets(mask):  # [§10.6]
    head = random_head(dim=16, classes=5, new=(1, 3), heads=4, mask=mask)
    x = 8 * torch.randn(40, 16, generator=torch.Generator().manual_seed(5))
    fast = head.per_image_scores(x)
    naive = torch.cat([reference_scores(head, x[i : i + 1]) for i in range(x.shape[0])])
    # fp32, scores in units of the cosines (the logits are 100·cos): equal to 1e-5
    torch.testing.assert_close(fast / LOGIT_SCALE, naive / LOGIT_SCALE, atol=1e-5, rtol=0)
    also = torch.cat([head.joint_scores(x[i : i + 1]) for i in range(x.shape[0])])
    torch.testing.assert_close(fast / LOGIT_SCALE, also / LOGIT_SCALE, atol=1e-5, rtol=0)
    # in float64 the factorised evaluation is exact up to rounding
    head64, x64 = head.double(), x.double()
    naive64 = torch.cat([reference_scores(head64, x64[i : i + 1]) for i in range(x.shape[0])])
    torch.testing.assert_close(head64.per_image_scores(x64), naive64, atol=1e-9, rtol=0)


def test_per_image_chunking_does_not_change_scores(monkeypatch):
    import fewclip.methods.candle.head as candle_head

    head = random_head()
    x = torch.randn(30, 16)
    whole = head.per_image_scores(x)
    chunks, original = [], CandleHead._per_image_chunk

    def counted(self, ctx, images):
        chunks.append(images.shape[0])
        return original(self, ctx, images)

    monkeypatch.setattr(candle_head, "PER_IMAGE_BUDGET", 1)  # one image per chunk
    monkeypatch.setattr(CandleHead, "_per_image_chunk", counted)
    torch.testing.assert_close(head.per_image_scores(x), whole, atol=1e-4, rtol=0)
    assert chunks == [1] * 30


def test_predictions_are_invariant_to_test_order_and_batch(b2n):  # [§10.6]
    model = M.create("candle", **STEPS).fit(b2n)
    x = b2n.test_features
    full = model.predict_logits(x)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.predict_logits(x[perm]), full[perm], atol=1e-4, rtol=0)
    assert torch.equal(model.predict(x[perm]), model.predict(x)[perm])
    torch.testing.assert_close(model.predict_logits(x, batch_size=7), full, atol=1e-4, rtol=0)
    torch.testing.assert_close(model.predict_logits(x[5:6]), full[5:6], atol=1e-4, rtol=0)


def test_transductive_mode_reproduces_a_direct_chunked_evaluation(b2n):  # [§10.6]
    model = M.create("candle", **STEPS).fit(b2n)
    x = b2n.test_features  # 42 rows: chunks of 10, 10, 10, 10, 2
    per_image = model.predict_logits(x)
    model.inference_context, model.test_batch_size = "transductive", 10
    head = model.head()
    direct = torch.cat([reference_scores(head, x[i : i + 10]) for i in range(0, x.shape[0], 10)])
    got = model.predict_logits(x)
    torch.testing.assert_close(got, direct, atol=1e-4, rtol=0)
    torch.testing.assert_close(model.predict_logits(x, batch_size=25), got, atol=1e-4, rtol=0)  # still chunks of 10
    assert not torch.allclose(got, per_image, atol=1e-3)  # the batch is context
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(model.predict_logits(x[perm]), got[perm], atol=1e-3)  # ... so order matters


# --------------------------------------------------------------------------- virtual prototypes and text (C1)


def test_virtual_prototypes_do_not_alias_the_new_text_rows(b2n):  # [§10.5]
    one_step = {"epochs": 1, "batch_size": 1000, "warmup_lr": 0.5, "selection": "none"}  # one SGD step
    model = M.create("candle", **one_step).fit(b2n)
    new = model.new_classes_
    assert len(model.history_) == 1 and model.iterations_per_epoch_ == 1
    assert torch.equal(model.text_prototypes_, b2n.text_weights)  # bit-identical, new rows included
    assert not torch.equal(model.virtual_prototypes_, b2n.text_weights[new])  # while v has moved
    tied = M.create("candle", tie_virtual_text=True, **one_step).fit(b2n)
    assert torch.equal(tied.text_prototypes_[new], tied.virtual_prototypes_)
    assert not torch.equal(tied.virtual_prototypes_, b2n.text_weights[new])
    base = [c for c in range(b2n.num_classes) if c not in new.tolist()]
    assert torch.equal(tied.text_prototypes_[base], b2n.text_weights[base])
    _, text = tied.head().prototypes()
    assert torch.equal(text[new], tied.virtual_prototypes_)  # the tie holds at inference too


def test_one_optimiser_step_on_the_head_leaves_the_text_buffer_alone():
    head = random_head(classes=4, new=(1, 2))
    text0, virtual0 = head.text_prototypes.clone(), head.virtual.detach().clone()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    z = head.train_logits(torch.randn(3, 16), 0.1, torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 3, 0, 0, 1, 2, 3])
    sum(cla_loss(zz, targets, torch.tensor([2, 0, 0, 1])) for zz in z).backward()
    optimizer.step()
    assert torch.equal(head.text_prototypes, text0) and not torch.equal(head.virtual, virtual0)
    assert all(name != "text_prototypes" for name, _ in head.named_parameters())


# --------------------------------------------------------------------------- precision (C2)


def test_fp16_weights_lose_small_updates_on_the_identity_diagonal():
    """The released head trains fp16 weights with plain SGD: an update below half the fp16 spacing around 1.0 rounds
    away, so the warm-up epoch (lr 1e-5) leaves the identity diagonal of W_I untouched; fp32 (the default) keeps it."""
    g = torch.Generator().manual_seed(0)
    dim, classes, new = 32, 4, torch.tensor([3])
    text = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    base = 5 * torch.randn(classes, dim, generator=g)
    base[new] = 0
    params = initial_parameters(dim, text[new], 0.1, g)
    x, y = 5 * torch.randn(8, dim, generator=g), torch.randint(0, 3, (8,), generator=g)
    targets, counts = torch.cat([y, torch.arange(classes)]), torch.tensor([3, 3, 2, 0])
    diagonals = {}
    for dtype in (torch.float32, torch.float16):
        head = CandleHead(params, base, text, new, heads=8).to(dtype)
        optimizer = torch.optim.SGD(head.parameters(), lr=1e-5, momentum=0.9, weight_decay=5e-4)
        sum(cla_loss(z.float(), targets, counts) for z in head.train_logits(x.to(dtype))).backward()
        assert head.w_image.grad.diagonal().abs().max() * 1e-5 < 2.4e-4  # below half the spacing under 1.0
        optimizer.step()
        diagonals[dtype] = head.w_image.detach().float().diagonal()
        off = head.w_image.detach().float() - torch.diag(diagonals[dtype])
        assert bool((off != 0).any())  # near-zero entries still move
    assert bool((diagonals[torch.float16] == 1).all())
    assert int((diagonals[torch.float32] != 1).sum()) > dim // 2  # fp32 keeps most of them


def test_fp16_precision_trains_and_predicts_float32_logits(tmp_path, b2n):
    model = M.create("candle", precision="fp16", **STEPS).fit(b2n)
    assert model.w_image_.dtype == torch.float16 and model.virtual_prototypes_.dtype == torch.float16
    logits = model.predict_logits(b2n.test_features)
    assert logits.dtype == torch.float32 and bool(torch.isfinite(logits).all())
    assert model.score(b2n.test_features, b2n.test_labels) > 100 / b2n.num_classes
    back = M.load(model.save(tmp_path / "fp16.safetensors"))
    assert torch.equal(back.predict_logits(b2n.test_features), logits)


# --------------------------------------------------------------------------- training, selection, determinism


def test_training_lowers_the_loss_and_selects_the_best_validation_epoch(b2n):
    model = M.create("candle", epochs=8, batch_size=16, lr=0.05).fit(b2n)
    history = model.history_
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert [h["lr"] for h in history] == [candle_lr(e, 8, 0.05, 1e-5) for e in range(8)]
    assert history[-1]["loss"] < history[0]["loss"]
    val = [h["val_accuracy"] for h in history]
    assert model.best_epoch_ == 1 + val.index(max(val)) and model.selected_ == {
        "epoch": model.best_epoch_,
        "calibration": "val",  # b2n has classes without support: the epoch is chosen with its best offset
        "calibration_offset": model.calibration_offset_,
        "temperature": model.temperature_,  # fitted on the validation logits after selection
    }
    assert model.selection_used_ == "val"
    assert model.iterations_per_epoch_ == b2n.num_support // 16
    last = M.create("candle", epochs=4, batch_size=16, lr=0.05, selection="none").fit(b2n)
    assert last.best_epoch_ == 4 and all(h["val_accuracy"] is None for h in last.history_)
    no_val = M.create("candle", epochs=2, batch_size=16).fit(replace(b2n, val_features=None, val_labels=None))
    assert no_val.best_epoch_ == 2 and no_val.selection_used_ == "none" and no_val.val_accuracy_ is None


def test_new_classes_are_scored_from_their_virtual_and_text_prototypes(b2n):
    model = M.create("candle", epochs=6, batch_size=16, lr=0.01).fit(b2n)
    logits = model.predict_logits(b2n.test_features)
    new = model.new_classes_
    is_new = torch.isin(b2n.test_labels, new)
    within_new = new[logits[is_new][:, new].argmax(1)]
    assert float((within_new == b2n.test_labels[is_new]).float().mean()) > 0.5  # 2 new classes: chance is 0.5
    assert model.score(b2n.test_features, b2n.test_labels) > 100 / b2n.num_classes


def test_deterministic_for_a_seed_and_dependent_on_it(b2n):
    a, b = M.create("candle", seed=3, **STEPS).fit(b2n), M.create("candle", seed=3, **STEPS).fit(b2n)
    c = M.create("candle", seed=4, **STEPS).fit(b2n)
    assert a.history_ == b.history_
    assert torch.equal(a.predict_logits(b2n.test_features), b.predict_logits(b2n.test_features))
    assert [h["loss"] for h in a.history_] != [h["loss"] for h in c.history_]


def test_epoch_order_is_a_shuffle_of_the_support_set_repeated_as_needed():
    g = torch.Generator().manual_seed(0)
    short = epoch_order(10, 7, g)
    assert short.numel() == 7 and short.unique().numel() == 7 and int(short.max()) < 10
    long = epoch_order(10, 25, g)  # two whole shuffles, then 5 rows of a third
    assert long.numel() == 25
    assert sorted(long[:10].tolist()) == list(range(10)) and sorted(long[10:20].tolist()) == list(range(10))
    assert long[20:].unique().numel() == 5
    assert not torch.equal(long[:10], long[10:20])


def test_iterations_per_epoch_sets_the_steps_and_none_is_the_released_epoch(b2n, monkeypatch):
    support = int(b2n.support_labels.numel())  # 30 rows: the released epoch at batch 16 is one step
    released = M.create("candle", **STEPS).fit(b2n)
    assert released.iterations_per_epoch_ == support // 16 == 1
    explicit = M.create("candle", iterations_per_epoch=1, **STEPS).fit(b2n)
    assert explicit.history_ == released.history_  # same draws, same steps

    calls, original = [], CandleHead.train_logits

    def counted(self, x, *args):
        calls.append(x.shape[0])
        return original(self, x, *args)

    monkeypatch.setattr(CandleHead, "train_logits", counted)
    longer = M.create("candle", iterations_per_epoch=4, **STEPS).fit(b2n)
    assert longer.iterations_per_epoch_ == 4 and len(calls) == 3 * 4 and set(calls) == {16}
    assert longer.history_ != released.history_


def test_visual_init_and_masks_train(b2n):
    for kw in ({"vir_init": "visual"}, {"mask": "in_visual"}, {"mask": "between_visual_text"}):
        model = M.create("candle", **STEPS, **kw).fit(b2n)
        assert model.score(b2n.test_features, b2n.test_labels) > 100 / b2n.num_classes, kw


def test_save_and_load_keep_the_tie_and_the_transductive_option(tmp_path, b2n):
    model = M.create("candle", tie_virtual_text=True, inference_context="transductive", test_batch_size=5, **STEPS)
    model.fit(b2n)
    back = M.load(model.save(tmp_path / "candle.safetensors"))
    assert torch.equal(back.predict_logits(b2n.test_features), model.predict_logits(b2n.test_features))
    assert back.prototype_source_ == model.prototype_source_ and torch.equal(back.ratio_, model.ratio_)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "params, message",
    [
        ({"heads": 5}, r"D = 32 is not divisible by heads = 5; set heads to a divisor of D"),
        ({"mask": "visual"}, r"mask='visual' is not valid; expected one of \['none', 'in_visual'"),
        ({"vir_init": "random"}, r"vir_init='random' is not valid"),
        ({"inference_context": "batch"}, r"inference_context='batch' is not valid"),
        ({"test_batch_size": 0}, r"test_batch_size=0 is not valid; expected a positive integer\."),
        ({"tie_virtual_text": True, "vir_init": "visual"}, r"only exists with vir_init='text'"),
        ({"prior_virtual_count": 0}, r"prior_virtual_count=0 gives the classes without support .*class_002"),
        ({"dropout": 1.0}, r"dropout=1.0 is not valid; expected a finite real number in \[0, 1\)\."),
        ({"precision": "bf16"}, r"precision='bf16' is not valid; expected one of \['fp32', 'fp16'\]\. 'fp16' repro"),
        ({"epochs": 0}, r"epochs=0 is not valid; expected a positive integer\."),
        (
            {"iterations_per_epoch": 0},
            r"iterations_per_epoch=0 is not valid; expected None or a positive integer\. None means",
        ),
    ],
)
def test_bad_settings_name_the_value_and_the_fix(b2n, params, message):
    with pytest.raises(MethodError, match=f"^candle: .*{message}"):
        M.create("candle", **params).fit(b2n)


def test_bundle_without_support_is_refused(b2n):
    empty = replace(
        b2n,
        support_features=b2n.support_features[:, :0],
        support_labels=b2n.support_labels[:0],
        support_clean_features=b2n.support_clean_features[:0],
    )
    with pytest.raises(MethodError, match="no class has support images"):
        M.create("candle", **STEPS).fit(empty)
