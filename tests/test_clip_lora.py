"""CLIP-LoRA: the LoRA maths against hand computations (the packed q/k/v rows, rsLoRA scale, dropout placement, the
first AdamW step, the schedule), the spec's invariants (B = 0 changes nothing; merged weights give the unmerged
logits), the method on a tiny open_clip (what trains, the head, selection, save/load), and `fewclip run`."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewclip.methods as M
import fewclip.methods.clip_lora as clip_lora_module
from conftest import FAST, PETS, make_pets
from fewclip import data
from fewclip.cli.main import main
from fewclip.data.generate import make_folder_dataset
from fewclip.errors import BackboneError, MethodError
from fewclip.features.extract import extract
from fewclip.features.text import encode_text_classifier
from fewclip.methods import ImageEpisode
from fewclip.methods.clip_lora import cosine_lr, evaluation_rounds, support_schedule, total_iterations
from fewclip.models import BackboneSpec
from fewclip.models.lora import (
    LoRAAttention,
    add_lora,
    block_indices,
    encode_text_trimmed,
    lora_parameters,
    lora_scale,
    merge_packed,
    merged_weights,
    packed_delta,
    set_lora_training,
    training_copy,
)
from fewclip.models.tiny import save_tiny_hf_clip, save_tiny_openclip

CLASSES = ("amber", "azure", "cobalt")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    folder = make_folder_dataset(root / "images", CLASSES, {"train": 4, "val": 2, "test": 3}, size=32, seed=0)
    tiny = save_tiny_openclip(root / "model", "vit", name="fewclip-test-lora-vit", seed=0, layers=2)
    spec = BackboneSpec(f"local-dir:{tiny.folder}")
    backbone = spec.load()
    splits = data.load_dataset("folder", path=folder, warn=False)
    text, _ = encode_text_classifier(backbone, splits.classnames, data.load_prompts("single", "folder"))
    episode = ImageEpisode(splits, data.sample_episode(splits, 2, 1), spec, text, test=splits.test, loaded=backbone)
    return SimpleNamespace(root=root, folder=folder, tiny=tiny, spec=spec, backbone=backbone, splits=splits,
                           episode=episode)  # fmt: skip


def make(**kw):
    return M.create("clip-lora", **{**FAST["clip-lora"], **kw})


def random_b(model: nn.Module, seed: int = 0, std: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def adapted(backbone, **kw):
    model = training_copy(backbone)
    add_lora(model, "open_clip", generator=torch.Generator().manual_seed(0), **kw)
    return model


def images_of(env, n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- pure maths


def test_scale_schedule_iterations_and_positions_match_the_released_numbers():
    assert lora_scale(1.0, 2) == pytest.approx(0.70711, abs=1e-5)  # rsLoRA α/√r, not α/r
    assert cosine_lr(0, 8000, 2e-4, 1e-6) == pytest.approx(2e-4)
    assert cosine_lr(4000, 8000, 2e-4, 1e-6) == pytest.approx(1.005e-4)
    assert cosine_lr(8000, 8000, 2e-4, 1e-6) == pytest.approx(1e-6)
    assert total_iterations(None, 500, 16) == 8000 and total_iterations(7, 500, 16) == 7
    assert evaluation_rounds(8000, 10) == [800] * 10 and evaluation_rounds(25, 10) == [3] * 8 + [1]
    assert evaluation_rounds(4, 10) == [1, 1, 1, 1] and evaluation_rounds(5, 1) == [5]
    # the released block ranges for 12-block towers, and ViT-L/14's 24-block halves
    expect = {"all": range(12), "bottom": range(4), "mid": range(4, 8), "up": range(8, 12),
              "half-up": range(6, 12), "half-bottom": range(6), "top3": range(9, 12)}  # fmt: skip
    for position, blocks in expect.items():
        assert block_indices(position, 12) == list(blocks), position
    assert block_indices("half-up", 24) == list(range(12, 24)) and block_indices("all", 24) == list(range(24))
    with pytest.raises(BackboneError, match="unknown"):
        block_indices("top", 12)


def test_support_schedule_reshuffles_every_pass_and_stops_after_exactly_total_batches():
    keys = support_schedule(5, 2, 7, torch.Generator().manual_seed(0))
    assert [len(b) for b in keys] == [2, 2, 1, 2, 2, 1, 2]  # drop_last=False: each pass ends with a short batch
    passes = [[i for b in keys for i, d in b if d == p] for p in range(3)]
    assert sorted(passes[0]) == sorted(passes[1]) == list(range(5)) and passes[0] != passes[1]
    assert keys == support_schedule(5, 2, 7, torch.Generator().manual_seed(0))  # seeded
    assert [len(b) for b in support_schedule(40, 32, 3, torch.Generator().manual_seed(0))] == [32, 8, 32]


def test_torch_cosine_schedule_is_the_closed_form():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=80, eta_min=1e-6)
    for step in range(81):
        assert opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(step, 80, 2e-4, 1e-6), rel=1e-9, abs=1e-12)
        opt.step()
        sched.step()


def test_packed_delta_puts_each_targets_update_in_its_rows():
    e, r, s = 4, 2, 0.5
    g = torch.Generator().manual_seed(0)
    pairs = {p: (torch.randn(r, e, generator=g), torch.randn(e, r, generator=g)) for p in ("q", "v")}
    delta = packed_delta(pairs, e, s)
    assert delta.shape == (3 * e, e)
    torch.testing.assert_close(delta[:e], s * pairs["q"][1] @ pairs["q"][0])
    assert torch.equal(delta[e : 2 * e], torch.zeros(e, e))  # k has no pair
    torch.testing.assert_close(delta[2 * e :], s * pairs["v"][1] @ pairs["v"][0])
    w = torch.randn(3 * e, e, generator=g)
    torch.testing.assert_close(merge_packed(w, pairs, s), w + delta)
    with pytest.raises(BackboneError, match="3E"):
        merge_packed(torch.zeros(5, 4), pairs, s)


# --------------------------------------------------------------------------- the attention module


def mha(e=4, heads=2, batch_first=True, seed=0):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(e, heads, batch_first=batch_first)
    with torch.no_grad():
        m.in_proj_bias.normal_()
        m.out_proj.bias.normal_()
    return m.eval()


def manual_attention(x, w, b, out_w, out_b, heads, mask=None):
    """softmax(q kᵀ/√d + mask) v per head, then the output projection: written out by hand."""
    n, length, e = x.shape
    d = e // heads
    q, k, v = (x @ w[i * e : (i + 1) * e].T + b[i * e : (i + 1) * e] for i in range(3))
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)
        if mask is not None:
            scores = scores + mask
        outs.append(torch.softmax(scores, dim=-1) @ v[..., sl])
    return torch.cat(outs, dim=-1) @ out_w.T + out_b


@pytest.mark.parametrize("target", ["q", "k", "v"])
def test_a_targets_lora_changes_exactly_its_rows_of_the_packed_weight(target):
    base = mha()
    lora = LoRAAttention(base, rank=2, alpha=1.0, dropout=0.0, generator=torch.Generator().manual_seed(1),
                         targets=(target,))  # fmt: skip
    with torch.no_grad():
        lora.lora[target].lora_B.normal_()
    lora.eval()
    e = 4
    rows = {"q": slice(0, e), "k": slice(e, 2 * e), "v": slice(2 * e, 3 * e)}
    a, b = lora.lora[target].lora_A, lora.lora[target].lora_B
    expected = base.in_proj_weight.detach().clone()
    expected[rows[target]] += lora.scale * (b @ a).detach()
    torch.testing.assert_close(lora.merged_in_proj(), expected)
    # the forward is the hand-written attention with those weights, with and without a causal float mask
    x = torch.randn(3, 5, e, generator=torch.Generator().manual_seed(2))
    causal = torch.full((5, 5), float("-inf")).triu(1)
    for mask in (None, causal):
        out, weights = lora(x, x, x, need_weights=False, attn_mask=mask)
        ref = manual_attention(x, expected, base.in_proj_bias, base.out_proj.weight, base.out_proj.bias, 2, mask)
        assert weights is None
        torch.testing.assert_close(out, ref.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_merged_attention_equals_nn_multihead_attention_with_the_merged_weight(batch_first):
    base = mha(batch_first=batch_first)
    lora = LoRAAttention(base, rank=2, alpha=1.0, dropout=0.25, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for branch in lora.lora.values():
            branch.lora_B.normal_()
    lora.eval()  # eval: no dropout, the branch computed explicitly
    merged = mha(batch_first=batch_first)
    with torch.no_grad():
        merged.in_proj_weight.copy_(lora.merged_in_proj())
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(2))
    if not batch_first:
        x = x.transpose(0, 1)
    bool_mask = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True = not allowed, as nn.MultiheadAttention reads it
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 4] = True
    for kw in ({}, {"attn_mask": bool_mask}, {"key_padding_mask": padding}):
        ours, _ = lora(x, x, x, need_weights=False, **kw)
        theirs, _ = merged(x, x, x, need_weights=False, **kw)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # separate key/value inputs (cross-attention) go through the same rows
    y = torch.randn_like(x)
    torch.testing.assert_close(lora(x, y, y, need_weights=False)[0], merged(x, y, y, need_weights=False)[0],
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_dropout_acts_on_the_lora_input_only():
    base = mha()
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(3))
    plain = base(x, x, x, need_weights=False)[0]
    for p, expect_base in ((1.0, True), (0.0, False)):
        lora = LoRAAttention(base, rank=2, alpha=1.0, dropout=p, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            for branch in lora.lora.values():
                branch.lora_B.normal_()
        lora.train()
        trained = lora(x, x, x, need_weights=False)[0]
        lora.eval()
        merged = lora(x, x, x, need_weights=False)[0]
        if expect_base:  # p = 1: the branch is fully dropped; the frozen path has no dropout
            torch.testing.assert_close(trained, plain, atol=1e-6, rtol=1e-6)
            assert not torch.allclose(merged, plain, atol=1e-3)
        else:  # p = 0: train mode is the merged output
            torch.testing.assert_close(trained, merged, atol=1e-6, rtol=1e-6)
    # 0 < p < 1: masks drawn from the adapter's generator, so a seeded run repeats itself
    lora = LoRAAttention(base, rank=2, alpha=1.0, dropout=0.5, generator=torch.Generator().manual_seed(1)).train()
    with torch.no_grad():
        for branch in lora.lora.values():
            branch.lora_B.normal_()
    outs = []
    for _ in range(2):
        for branch in lora.lora.values():
            branch.generator = torch.Generator().manual_seed(7)
        outs.append(lora(x, x, x, need_weights=False)[0])
    assert torch.equal(outs[0], outs[1])


# --------------------------------------------------------------------------- on a tiny open_clip


def test_b_zero_leaves_every_output_of_the_backbone_unchanged(env):
    model = adapted(env.backbone)
    assert sum(isinstance(m, LoRAAttention) for m in model.modules()) == 4  # 2 blocks × 2 towers
    images = images_of(env)
    tokens = env.backbone.tokenizer(["a photo of a amber.", "a photo of a much longer class name."])
    base = env.backbone.model
    for mode in (False, True):  # eval, and train (dropout on a zero branch adds nothing)
        set_lora_training(model, mode)
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(images), base.encode_image(images), atol=1e-5, rtol=1e-6)
            torch.testing.assert_close(model.encode_text(tokens), base.encode_text(tokens), atol=1e-5, rtol=1e-6)
            torch.testing.assert_close(
                encode_text_trimmed(model, tokens), base.encode_text(tokens), atol=1e-5, rtol=1e-6
            )
    # the backbone itself was not touched: it has no LoRA module, and the copy's frozen parameters are its storage
    assert not any(isinstance(m, LoRAAttention) for m in base.modules())
    assert isinstance(base.visual.transformer.resblocks[0].attn, nn.MultiheadAttention)
    shared = model.visual.transformer.resblocks[0].attn.base.in_proj_weight
    assert shared.data_ptr() == base.visual.transformer.resblocks[0].attn.in_proj_weight.data_ptr()
    assert not shared.requires_grad


def test_trimmed_text_pass_equals_the_full_77_token_pass_with_lora(env):
    model = adapted(env.backbone)
    random_b(model)
    set_lora_training(model, False)
    tokens = env.backbone.tokenizer(["a photo of a amber.", "x", "a photo of a much longer class name, a type of pet."])
    with torch.no_grad():
        torch.testing.assert_close(encode_text_trimmed(model, tokens), model.encode_text(tokens), atol=1e-5, rtol=0)


def test_merged_weights_give_the_unmerged_models_outputs(env):
    model = adapted(env.backbone)
    random_b(model)
    set_lora_training(model, False)
    state = merged_weights(model, "visual.")
    assert sorted(state) == [f"visual.transformer.resblocks.{i}.attn.in_proj_weight" for i in range(2)]
    plain = copy.deepcopy(env.backbone.model)  # a model without any LoRA module (its own storage)
    plain.load_state_dict({**plain.state_dict(), **merged_weights(model)})
    images = images_of(env)
    tokens = env.backbone.tokenizer(["a photo of a amber.", "a photo of a azure."])
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(images), model.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain.encode_text(tokens), model.encode_text(tokens), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(plain.encode_image(images), env.backbone.model.encode_image(images), atol=1e-3)


def test_only_lora_parameters_get_gradients_and_both_towers_get_them(env):
    model = adapted(env.backbone)
    set_lora_training(model, True)
    params = lora_parameters(model)
    # 2·E·r per projection, 3 projections per block: 6·E·r = 384 per block for E = 32, r = 2; 4 blocks
    assert sum(p.numel() for p in params.values()) == 4 * 6 * 32 * 2
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(params)
    tokens = env.backbone.tokenizer([f"a photo of a {c}." for c in CLASSES])
    text = F.normalize(encode_text_trimmed(model, tokens), dim=-1)
    logits = 100 * F.normalize(model.encode_image(images_of(env)), dim=-1) @ text.T
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in params)
    for name, p in params.items():  # at B = 0: ∂L/∂A = 0 exactly, ∂L/∂B ≠ 0, in both towers
        if name.endswith("lora_A"):
            assert torch.equal(p.grad, torch.zeros_like(p)), name
        else:
            assert p.grad.abs().sum() > 0, name
    assert any(n.startswith("transformer.") for n in params) and any(n.startswith("visual.") for n in params)


def test_position_and_encoders_choose_the_adapted_modules(env):
    model = adapted(env.backbone, towers=("image",), position="half-up")
    paths = [n for n, m in model.named_modules() if isinstance(m, LoRAAttention)]
    assert paths == ["visual.transformer.resblocks.1.attn"]
    with pytest.raises(BackboneError, match="selects no block"):
        adapted(env.backbone, position="bottom")  # 2 blocks: ⌊2/3⌋ = 0 blocks


def test_unsupported_models_are_refused_by_name():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(BackboneError, match="needs a CLIPModel.*got Linear"):
        add_lora(nn.Linear(2, 2), "hf", generator=g)
    with pytest.raises(BackboneError, match="backend 'timm' is not supported"):
        add_lora(nn.Linear(2, 2), "timm", generator=g)
    with pytest.raises(BackboneError, match="tower 'audio' is unknown"):
        add_lora(nn.Linear(2, 2), "open_clip", towers=("audio",), generator=g)


def test_resnet_image_tower_is_refused_and_text_only_works(tmp_path):
    tiny = save_tiny_openclip(tmp_path / "rn", "resnet", name="fewclip-test-lora-rn", seed=0)
    backbone = BackboneSpec(f"local-dir:{tiny.folder}").load()
    with pytest.raises(BackboneError, match="needs a ViT.*ModifiedResNet.*towers='text'"):
        adapted(backbone)
    model = adapted(backbone, towers=("text",))
    assert len([m for m in model.modules() if isinstance(m, LoRAAttention)]) == 1


# --------------------------------------------------------------------------- the method


def test_first_adamw_step_decays_a_and_moves_b_by_lr_times_sign(env):
    """At step 1 B = 0 so ∂L/∂A = 0: A₁ = A₀·(1 − lr·wd) exactly; every B entry with a gradient ≈ −lr·sign(g)."""
    model = make(iterations=1, lr=2e-4, weight_decay=1e-2, selection="none").fit(env.episode)
    init_a = lora_parameters(adapted_seeded(env, model.seed))  # A drawn from the same seeded generator
    assert set(model.lora_state_) == set(init_a)
    for name, value in model.lora_state_.items():
        if name.endswith("lora_A"):
            torch.testing.assert_close(value, init_a[name].detach() * (1 - 2e-4 * 1e-2), atol=0, rtol=1e-6)
        else:
            # |ΔB| = lr·|g|/(|g| + 1e-8) ≤ lr, and ≈ lr wherever |g| ≫ 1e-8
            moved = value[value != 0].abs()
            assert moved.numel() > 0 and bool((moved <= 2e-4 * (1 + 1e-5)).all())
            assert float((moved > 0.99 * 2e-4).float().mean()) > 0.9


def adapted_seeded(env, seed):
    model = training_copy(env.backbone)
    add_lora(model, "open_clip", generator=torch.Generator().manual_seed(seed))
    return model


def test_fit_with_zero_effect_is_zero_shot_with_the_template(env):
    """lr tiny and a single step: the merged encoder is (numerically) the backbone, and the head is the text tower's
    template features, not the episode's classifier."""
    model = make(iterations=1, lr=1e-12, eta_min=0.0, weight_decay=0.0, selection="none").fit(env.episode)
    prompts = [f"a photo of a {c}." for c in env.episode.classnames]
    expected = F.normalize(env.backbone.encode_text(prompts), dim=-1)
    torch.testing.assert_close(model.text_, expected, atol=1e-5, rtol=0)
    images = images_of(env)
    torch.testing.assert_close(model.image_encoder().encode_images(images), env.backbone.encode_images(images),
                               atol=1e-5, rtol=0)  # fmt: skip


def test_the_head_is_the_adapted_text_tower_and_merged_logits_equal_the_unmerged_path(env):
    model = make(iterations=6, lr=5e-2).fit(env.episode)
    assert model.iterations_ == 6 and model.hyperparameters()["iterations"] == 6
    # rebuild the unmerged LoRA model from the saved pairs
    lora = adapted_seeded(env, model.seed)
    lora.load_state_dict({**lora.state_dict(), **model.lora_state_})
    set_lora_training(lora, False)
    prompts = env.backbone.tokenizer([f"a photo of a {c}." for c in env.episode.classnames])
    with torch.no_grad():
        text = F.normalize(encode_text_trimmed(lora, prompts), dim=-1)
    torch.testing.assert_close(model.text_, text, atol=1e-5, rtol=1e-6)
    assert not torch.allclose(model.text_, env.episode.text_weights, atol=1e-3)  # the text tower was trained
    items = env.splits.test
    encoder = model.image_encoder()
    assert not any(isinstance(m, LoRAAttention) for m in encoder.model.modules())  # prediction: no LoRA code path
    assert encoder.identity["finetuned"] == {"scope": "lora", "sha256": model.encoder_sha256_}
    assert encoder.cache_key() != env.backbone.cache_key()
    features = extract(encoder, env.splits.root, [i.path for i in items], progress=False).features
    images = torch.stack([encoder.preprocess(data_image(env, i.path)) for i in items])
    with torch.no_grad():
        unmerged = 100 * F.normalize(lora.encode_image(images), dim=-1) @ text.T
    torch.testing.assert_close(model.predict_logits(features), unmerged, atol=1e-3, rtol=1e-4)
    # the frozen weights outside the q/k/v projections are the pre-trained ones
    trained = dict(encoder.model.named_parameters())
    for key, value in env.backbone.model.named_parameters():
        if key not in model.encoder_state_:
            assert torch.equal(trained[key], value), key
        else:
            assert not torch.equal(trained[key], value), key


def data_image(env, path):
    from fewclip.features.extract import load_image

    return load_image(env.splits.root / path)


def test_selection_val_keeps_the_best_checkpoint_ties_to_the_earlier(env, monkeypatch):
    snapshots = []
    real = clip_lora_module.fit_epochs

    def recording(params, *args, evaluate=None, **kw):
        def wrapped():
            acc = evaluate()
            snapshots.append({k: v.detach().clone() for k, v in params.items()})
            return acc

        return real(params, *args, evaluate=wrapped if evaluate else None, **kw)

    monkeypatch.setattr(clip_lora_module, "fit_epochs", recording)
    model = make(iterations=8, evaluations=8, lr=5e-2).fit(env.episode)
    accs = [h["val_accuracy"] for h in model.history_]
    best = max(range(len(accs)), key=lambda i: (accs[i], -i))
    assert model.best_epoch_ == best + 1 and model.best_iteration_ == model.history_[best]["iteration"] == best + 1
    assert model.selected_["best_iteration"] == best + 1 and len(snapshots) == 8
    for name, value in model.lora_state_.items():
        assert torch.equal(value, snapshots[best][name].cpu()), name
    assert model.val_accuracy_ == accs[best]


def test_test_images_and_labels_never_reach_the_fit(env, tmp_path):
    a = make().fit(env.episode)
    shuffled = [replace(i, label=(i.label + 1) % 3) for i in env.splits.test]
    missing = [replace(i, path="no/such/file.jpg") for i in env.splits.test]
    for test in (shuffled, missing, None):
        b = make().fit(replace(env.episode, test=test))
        assert b.encoder_sha256_ == a.encoder_sha256_ and b.history_ == a.history_
        assert torch.equal(b.text_, a.text_)


def test_without_validation_images_selection_val_keeps_the_final_iterate_as_released(env):
    """No validation split: clip-lora does not refuse the data, it keeps the final iterate (the released behaviour)
    and records that nothing was selected; the same weights as an explicit selection='none'."""
    episode = replace(env.episode, episode=replace(env.episode.episode, val=[]))
    model = make().fit(episode)
    assert model.selection == "val" and model.selection_used_ == "none" and model.val_accuracy_ is None
    assert model.encoder_sha256_ == make(selection="none").fit(episode).encoder_sha256_


def test_selection_cv_is_refused_naming_the_fallback(env):
    with pytest.raises(MethodError, match="selection='cv' is not implemented.*selection='none'"):
        make(selection="cv").fit(env.episode)


def test_bad_hyperparameters_are_refused_before_any_work(env):
    with pytest.raises(MethodError, match="template"):
        make(template="a photo").fit(env.episode)
    with pytest.raises(MethodError, match="dropout"):
        make(dropout=1.0).fit(env.episode)
    with pytest.raises(MethodError, match="eta_min"):
        make(lr=1e-7).fit(env.episode)


def test_save_load_round_trip_rebuilds_the_merged_encoder(env, tmp_path):
    model = make(iterations=4, lr=5e-2).fit(env.episode)
    back = M.load(model.save(tmp_path / "lora.safetensors"))
    assert back.get_params() == json.loads(json.dumps(model.get_params()))
    assert back.encoder_sha256_ == model.encoder_sha256_ and not hasattr(back, "_encoder_")
    for name, value in model.encoder_state_.items():
        assert torch.equal(back.encoder_state_[name], value)
    for name, value in model.lora_state_.items():
        assert torch.equal(back.lora_state_[name], value)
    assert torch.equal(back.text_, model.text_)
    rebuilt = back.image_encoder()
    assert rebuilt.cache_key() == model.image_encoder().cache_key()
    images = images_of(env)
    assert torch.equal(rebuilt.encode_images(images), model.image_encoder().encode_images(images))


def test_encoders_vision_keeps_the_text_tower_and_text_reuses_the_pretrained_image_encoder(env):
    vision = make(encoders="vision").fit(env.episode)
    assert all(n.startswith("visual.") for n in vision.lora_state_)
    prompts = [f"a photo of a {c}." for c in env.episode.classnames]
    torch.testing.assert_close(vision.text_, F.normalize(env.backbone.encode_text(prompts), dim=-1), atol=1e-6,
                               rtol=0)  # fmt: skip
    text = make(encoders="text", lr=5e-2).fit(env.episode)
    assert text.encoder_state_ == {} and all(not n.startswith("visual.") for n in text.lora_state_)
    assert text.image_encoder().cache_key() == env.backbone.cache_key()  # the cached pre-trained features serve


@pytest.mark.slow
def test_the_transformers_backend_gets_lora_on_its_separate_projections(env, tmp_path):
    folder = save_tiny_hf_clip(tmp_path / "hf", env.tiny)
    spec = BackboneSpec(str(folder), backend="hf")
    hf = spec.load()
    episode = replace(env.episode, backbone=spec, loaded=hf)
    model = make(iterations=3, lr=5e-2, selection="none").fit(episode)
    assert sorted(model.encoder_state_) == sorted(
        f"vision_model.encoder.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkv"
    )
    assert model.trained_parameters_ == 4 * 6 * 32 * 2
    encoder = model.image_encoder()
    images = images_of(env)
    assert not torch.allclose(encoder.encode_images(images), hf.encode_images(images), atol=1e-4)
    assert model.predict_logits(encoder.encode_images(images)).shape == (4, 3)


@pytest.mark.slow
def test_vit_b16_has_the_released_184320_lora_parameters():
    import open_clip

    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    add_lora(model, "open_clip", generator=torch.Generator().manual_seed(0))
    assert sum(p.numel() for p in lora_parameters(model).values()) == 184_320


def test_fewclip_run_fits_clip_lora_end_to_end(env, tmp_path, capsys):
    root = make_pets(tmp_path / "data", train=2, val=1, test=2, size=32)
    argv = ["run", "--dataset", "oxford_pets", "--data-root", str(root), "--model", env.spec.model, "--views", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--no-progress",
            "--method", "zero-shot", "clip-lora", "--shots", "2", "--seeds", "1",
            *[f"--set=clip-lora:{k}={json.dumps(v)}" for k, v in FAST["clip-lora"].items()]]  # fmt: skip
    assert main(argv) == 0
    folder = tmp_path / "out/oxford_pets/local-dir-model/fewshot"
    r = json.loads((folder / "clip-lora/shots_2-seed_1.json").read_text())
    assert r["status"] == "ok" and r["hyperparameters"]["iterations"] == 4 and len(r["history"]) == 2
    assert r["image_encoder"]["scope"] == "lora" and r["image_encoder"]["test_encoded"] == 2 * len(PETS)
    assert r["selected"]["best_iteration"] in (2, 4) and r["hyperparameters"]["template"] == "a photo of a {}."
    assert main([*argv, "--force"]) == 0  # the same weights again: the test features come from the cache
    again = json.loads((folder / "clip-lora/shots_2-seed_1.json").read_text())
    assert (
        again["image_encoder"]["sha256"] == r["image_encoder"]["sha256"] and again["image_encoder"]["test_cached"] == 6
    )
    assert again["accuracy"] == r["accuracy"]


@pytest.mark.slow
def test_lora_linear_matches_peft_rslora_on_a_separate_projection():
    """transformers' q/k/v are plain Linears: there, peft's rsLoRA (use_rslora, α/√r) is the same function."""
    peft = pytest.importorskip("peft")
    from fewclip.models.lora import LoRALinear

    torch.manual_seed(0)
    holder = nn.Module()
    holder.q_proj = nn.Linear(8, 8)
    ours = LoRALinear(copy.deepcopy(holder.q_proj), rank=2, alpha=1.0, dropout=0.0,
                      generator=torch.Generator().manual_seed(1))  # fmt: skip
    with torch.no_grad():
        ours.lora.lora_B.normal_()
    config = peft.LoraConfig(r=2, lora_alpha=1, use_rslora=True, lora_dropout=0.0, target_modules=["q_proj"])
    theirs = peft.get_peft_model(holder, config)
    layer = theirs.base_model.model.q_proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora.lora_B)
    assert layer.scaling["default"] == pytest.approx(ours.scale)
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours.eval()(x), layer.eval()(x), atol=1e-6, rtol=1e-6)


def test_loader_workers_do_not_change_the_fit_and_an_unreadable_support_image_is_named_or_skipped(env, tmp_path):
    import shutil

    from fewclip.features.pipeline import ExtractionOptions

    a = make().fit(env.episode)
    b = make().fit(replace(env.episode, options=ExtractionOptions(num_workers=2)))
    assert b.encoder_sha256_ == a.encoder_sha256_ and b.history_ == a.history_  # augmentation seeded per image
    folder = tmp_path / "images"
    shutil.copytree(env.folder, folder)
    episode = replace(env.episode, splits=data.load_dataset("folder", path=folder, warn=False))
    broken = episode.train[0].path
    (folder / broken).write_bytes(b"not a jpeg")
    with pytest.raises(MethodError, match=f"{broken}: cannot be read .*--skip-bad-images"):
        make().fit(episode)
    model = make().fit(replace(episode, options=ExtractionOptions(skip_bad_images=True)))
    assert model.skipped_images_ == [broken] and model.iterations_ == FAST["clip-lora"]["iterations"]


def test_loader_workers_follow_the_request_else_the_device():
    from fewclip.methods.clip_lora import loader_workers

    assert loader_workers(3, torch.device("cpu"), 10) == 3 and loader_workers(0, torch.device("cuda"), 10**6) == 0
    assert loader_workers(None, torch.device("cpu"), 10**6) == 0 and loader_workers(None, torch.device("cuda"), 64) == 0
    assert 0 <= loader_workers(None, torch.device("cuda"), 256_000) <= 16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_fits_on_cuda_under_autocast_and_the_merged_encoder_matches(env, amp):
    spec = replace(env.spec, device="cuda")
    backbone = spec.load()
    episode = replace(env.episode, backbone=spec, loaded=backbone)
    model = make(amp=amp, iterations=6, lr=5e-2).fit(episode)
    assert model.skipped_steps_ >= 0 and all(math.isfinite(h["loss"]) for h in model.history_)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in model.encoder_state_.values())
    images = images_of(env)
    cuda_features = model.image_encoder().encode_images(images)
    cpu_features = model.image_encoder("cpu").encode_images(images)
    torch.testing.assert_close(cuda_features, cpu_features, atol=1e-3, rtol=1e-3)
