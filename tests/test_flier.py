"""FLIER (methods/flier.py): the maths against formulas and hand-checked numbers, training on a tiny open_clip
model with a generated set of small images and random 4×8×8 latents, selection on validation only, and
``fewclip run --method flier --generated DIR`` end to end."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import fewclip.methods as M
from fewclip import data
from fewclip.cli.main import main
from fewclip.data.generate import make_folder_dataset
from fewclip.errors import DataError, MethodError
from fewclip.features.extract import extract
from fewclip.features.text import encode_text_classifier
from fewclip.generation import GeneratedSet, load_generated_set, write_generated_set
from fewclip.methods import ImageEpisode, generated_for_episode
from fewclip.methods.flier import (
    LatentEncoder,
    draw_generated,
    ema_update,
    flier_loss,
    layer_id,
    lr_at,
    param_groups,
    select_weights,
    set_lr,
)
from fewclip.models import BackboneSpec, TrainableBackbone
from fewclip.models.tiny import save_tiny_openclip

CLASSES = ("amber", "azure", "cobalt")
#: fast settings: the last block only, plain crops, a short warm-up-free schedule, an EMA that moves
FAST = {
    "blocks": 1,
    "epochs": 3,
    "warmup_epochs": 0,
    "lr": 1e-3,
    "batch_size": 8,
    "augmentation": "dassl_train",
    "ema_decay": 0.5,
}


def separable_latents(labels: torch.Tensor, seed: int = 0, shape=(4, 8, 8)) -> torch.Tensor:
    """Latents of class c: noise plus +3 on channel c (a toy set the latent encoder can separate)."""
    g = torch.Generator().manual_seed(seed)
    z = 0.3 * torch.randn(labels.numel(), *shape, generator=g)
    z[torch.arange(labels.numel()), labels] += 3.0
    return z


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("flier")
    folder = make_folder_dataset(root / "images", CLASSES, {"train": 4, "val": 2, "test": 3}, size=32, seed=0)
    pngs = make_folder_dataset(root / "pngs", CLASSES, {"train": 8}, size=32, seed=5)
    images = sorted((pngs / "train").rglob("*.jpg"))
    labels = torch.tensor([CLASSES.index(p.parent.name) for p in images])
    generated = GeneratedSet(
        classnames=CLASSES,
        images=tuple(images),
        labels=labels,
        latents=separable_latents(labels),
        prompts=tuple(f"a photo of a {CLASSES[y]}" for y in labels.tolist()),
    )
    gen_dir = root / "generated"
    write_generated_set(gen_dir, generated)
    tiny = save_tiny_openclip(root / "model", "vit", name="fewclip-test-flier-vit", seed=0, layers=2)
    spec = BackboneSpec(f"local-dir:{tiny.folder}")
    backbone = spec.load()
    splits = data.load_dataset("folder", path=folder, warn=False)
    text, _ = encode_text_classifier(backbone, splits.classnames, data.load_prompts("single", "folder"))
    episode = data.sample_episode(splits, 2, 1)
    loaded = load_generated_set(gen_dir)
    image_episode = ImageEpisode(
        splits,
        episode,
        spec,
        text,
        test=splits.test,
        loaded=backbone,
        generated=generated_for_episode(loaded, episode),
    )
    return SimpleNamespace(
        root=root, folder=folder, gen_dir=gen_dir, spec=spec, backbone=backbone, splits=splits, episode=image_episode
    )


@pytest.fixture(scope="module")
def fitted(env):
    """FLIER with the FAST settings fitted once on the episode (several tests read it)."""
    return make().fit(env.episode)


def make(**kw):
    return M.create("flier", **{**FAST, **kw})


def latent_init(model, num_classes=3, shape=(4, 8, 8)) -> dict[str, torch.Tensor]:
    """The latent encoder's initial weights for the model's seed (built as ``fit`` builds them)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model.seed)
        return {k: v.clone() for k, v in LatentEncoder(shape, num_classes).state_dict().items()}


# --------------------------------------------------------------------------- the maths


def test_loss_matches_a_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    latent = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1])
    eps, lam = 0.1, 0.25

    def smoothed(row, y):  # (1 − ε)·(−log p_y) + ε·mean_c(−log p_c)
        logp = [v - math.log(sum(math.exp(u) for u in row)) for v in row]
        return (1 - eps) * -logp[y] + eps * -sum(logp) / len(row)

    clip = (smoothed([2, 0, 0], 0) + smoothed([0, 1, 0], 1)) / 2
    lat = (smoothed([0, 0, 0], 0) + smoothed([1, 0, 1], 1)) / 2
    real = flier_loss(logits, labels, latent_weight=lam, smoothing=eps)
    gen = flier_loss(logits, labels, latent, latent_weight=lam, smoothing=eps)
    assert float(real) == pytest.approx(clip, abs=1e-6)
    assert float(gen) == pytest.approx((1 - lam) * clip + lam * lat, abs=1e-6)
    # λ = 0: the latent branch has no weight; a uniform latent row costs log C whatever ε
    assert float(flier_loss(logits, labels, latent, latent_weight=0.0, smoothing=eps)) == pytest.approx(clip)
    assert smoothed([0, 0, 0], 0) == pytest.approx(math.log(3))


def test_warmup_then_cosine_per_step():
    kw = {"base": 1e-3, "minimum": 1e-5, "warmup_steps": 4, "total_steps": 12}
    assert [lr_at(s, **kw) for s in range(5)] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(8, **kw) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_at(12, **kw) == pytest.approx(1e-5)
    assert lr_at(3, base=1.0, minimum=0.0, warmup_steps=0, total_steps=6) == pytest.approx(0.5)


def test_layer_wise_lr_decay_and_weight_decay_follow_the_formula(env):
    tb = TrainableBackbone(env.backbone, "all")
    latent = LatentEncoder((4, 8, 8), 3)
    head = {"head.weight": torch.zeros(3, 16, requires_grad=True), "head.bias": torch.zeros(3, requires_grad=True)}
    named = [*tb.named_parameters(), *head.items(), *((f"latent.{n}", p) for n, p in latent.named_parameters())]
    L, decay = 2, 0.7
    groups = param_groups(named, num_blocks=L, layer_decay=decay, weight_decay=0.05)
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    set_lr(optimizer, 1e-3)
    lr_of = {n: g["lr"] for g in optimizer.param_groups for n in g["names"]}
    wd_of = {n: g["weight_decay"] for g in optimizer.param_groups for n in g["names"]}
    assert set(lr_of) == {n for n, _ in named}
    for name, _ in named:
        expected = 1e-3 * decay ** (L + 1 - layer_id(name, L))
        assert lr_of[name] == pytest.approx(expected), name
    assert layer_id("visual.class_embedding", L) == 0 and layer_id("visual.conv1.weight", L) == 0
    assert layer_id("visual.transformer.resblocks.0.attn.in_proj_weight", L) == 1
    assert layer_id("visual.transformer.resblocks.1.mlp.c_fc.weight", L) == 2
    assert layer_id("visual.proj", L) == layer_id("head.weight", L) == layer_id("latent.conv1.weight", L) == 3
    assert layer_id("vision_model.encoder.layers.1.mlp.fc1.weight", L) == 2
    assert layer_id("vision_model.embeddings.position_embedding.weight", L) == 0
    assert lr_of["visual.positional_embedding"] == pytest.approx(1e-3 * 0.7**3)
    assert lr_of["head.weight"] == lr_of["latent.conv2.bias"] == pytest.approx(1e-3)
    no_decay = {n for n, wd in wd_of.items() if wd == 0}
    assert {"visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight", "head.bias"} <= no_decay
    assert {"latent.conv1.bias", "latent.head.bias"} <= no_decay
    assert wd_of["visual.proj"] == wd_of["head.weight"] == wd_of["latent.conv1.weight"] == 0.05
    assert wd_of["visual.transformer.resblocks.0.attn.in_proj_weight"] == 0.05


def test_ema_update_is_the_exponential_average():
    ema, params = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])], [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    ema_update(ema, params, 0.9)
    torch.testing.assert_close(ema[0], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 0]))
    torch.testing.assert_close(ema[1], torch.tensor([[0.4]]))
    ema_update(ema, params, 0.9)
    assert float(ema[1]) == pytest.approx(0.9 * 0.4 + 0.1 * 4)


def test_select_weights_picks_the_best_validation_epoch_then_raw_over_ema_on_ties():
    assert select_weights([(50.0, 40.0), (60.0, 70.0), (70.0, 65.0)]) == (2, "ema", 70.0)  # earliest of the 70s
    assert select_weights([(50.0, 50.0), (40.0, 45.0)]) == (1, "raw", 50.0)
    assert select_weights([(10.0, None), (20.0, None)]) == (2, "raw", 20.0)


def test_latent_encoder_shapes_and_init():
    g = LatentEncoder((4, 64, 64), 37)
    assert g.head.in_features == 768 and g(torch.randn(2, 4, 64, 64)).shape == (2, 37)  # the released 3·16·16
    small = LatentEncoder((4, 16, 16), 5)
    assert small.head.in_features == 48 and small(torch.randn(3, 4, 16, 16)).shape == (3, 5)
    assert float(g.head.weight.detach().std()) == pytest.approx(0.02 * 0.001, rel=0.1)  # trunc-normal(0.02) × 0.001
    assert sum(p.numel() for p in g.parameters()) == 50 + 33 + 769 * 37  # spec §4's count
    with pytest.raises(MethodError, match="too small"):
        LatentEncoder((4, 2, 2), 3)


def test_draw_generated_takes_k_per_class_seeded():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    rows = draw_generated(labels, torch.tensor([2, 5, 0]), torch.Generator().manual_seed(0))
    assert labels[rows].tolist() == [0, 0, 1, 1] and len(set(rows.tolist())) == 4
    again = draw_generated(labels, torch.tensor([2, 5, 0]), torch.Generator().manual_seed(0))
    assert torch.equal(rows, again)


# --------------------------------------------------------------------------- training


def test_flier_trains_both_branches(env, fitted):
    model = fitted
    base = TrainableBackbone(env.backbone, "all").trainable_state()
    changed = [k for k in base if not torch.equal(base[k], model.encoder_state_[k])]
    # the last block and what follows it trained; earlier blocks, embeddings and the patch embedding did not
    assert changed and all(
        k.startswith(("visual.transformer.resblocks.1.", "visual.ln_post", "visual.proj")) for k in changed
    )
    assert not torch.equal(model.head_weight_, env.episode.text_weights)  # the text-initialised head trained
    init = latent_init(model)
    assert all(not torch.equal(init[k], model.latent_state_[k]) for k in init)  # every tensor of g trained
    assert model.generated_used_ == 6  # K = 2 per class, as the real support
    hp = model.hyperparameters()
    assert hp["generated_images"] == 6 and hp["weights"] in ("raw", "ema") and hp["epoch"] == model.best_epoch_
    assert hp["latent_encoder"] == "trained jointly"
    # the test path is the CLIP branch alone: 100·n(f)·Wᵀ + b over the fine-tuned encoder's features
    out = extract(model.image_encoder(), env.splits.root, [i.path for i in env.splits.test], progress=False)
    expected = 100 * F.normalize(out.features, dim=-1) @ model.head_weight_.T + model.head_bias_
    torch.testing.assert_close(model.predict_logits(out.features), expected)


def test_released_behaviour_leaves_the_latent_encoder_untouched(env):
    model = make(train_latent_encoder=False, epochs=2).fit(env.episode)
    init = latent_init(model)
    assert all(torch.equal(init[k], model.latent_state_[k]) for k in init)
    assert model.hyperparameters()["latent_encoder"] == "untrained (the released code's behaviour)"
    assert model.history_[-1]["latent_loss"] is not None  # its loss is still computed, as released


def test_the_latent_branch_learns_a_separable_latent_set(env):
    model = make(epochs=6, lr=1e-2, generated_shots=8, latent_weight=0.9, selection="none").fit(env.episode)
    losses = [r["latent_loss"] for r in model.history_]
    assert losses[0] == pytest.approx(math.log(3), abs=0.05)  # g starts near uniform (0.001-scaled head)
    assert losses[-1] < losses[0] - 0.2 and model.generated_used_ == 24
    # and it now classifies the generated latents better than chance (1/3)
    g = model.latent_encoder()
    gen = env.episode.generated
    assert float((g(gen.latents).argmax(1) == gen.labels).float().mean()) > 0.5


def test_validation_picks_the_epoch_and_the_weights(env, fitted):
    model = fitted
    scores = [(r["val_accuracy_raw"], r["val_accuracy_ema"]) for r in model.history_]
    epoch, weights, accuracy = select_weights(scores)
    assert (model.best_epoch_, model.weights_, model.val_accuracy_) == (epoch, weights, pytest.approx(accuracy))
    out = extract(model.image_encoder(), env.splits.root, [i.path for i in env.episode.val], progress=False)
    labels = torch.tensor([i.label for i in env.episode.val])
    assert model.val_accuracy_ == pytest.approx(model.score(out.features, labels))
    plain = make(epochs=2, ema_decay=0.0).fit(env.episode)
    assert plain.weights_ == "raw" and all(r["val_accuracy_ema"] is None for r in plain.history_)


def test_the_chosen_ema_weights_are_the_ones_kept(env, monkeypatch):
    import fewclip.methods.flier as flier

    # an EMA that barely moves (decay 1 − 1e-9) stays at the initial weights: pre-trained encoder, text head
    monkeypatch.setattr(flier, "select_weights", lambda scores: (1, "ema", scores[0][1]))
    model = make(epochs=1, ema_decay=1 - 1e-9).fit(env.episode)
    base = TrainableBackbone(env.backbone, "all").trainable_state()
    assert model.weights_ == "ema"
    for k, v in base.items():
        torch.testing.assert_close(model.encoder_state_[k], v, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.head_weight_, env.episode.text_weights, rtol=0, atol=1e-6)
    monkeypatch.setattr(flier, "select_weights", lambda scores: (1, "raw", scores[0][0]))
    raw = make(epochs=1, ema_decay=1 - 1e-9).fit(env.episode)
    assert raw.weights_ == "raw" and not torch.equal(raw.head_weight_, model.head_weight_)


def test_without_validation_the_last_epoch_raw_weights(env):
    model = make(selection="none").fit(env.episode)
    assert model.best_epoch_ == FAST["epochs"] and model.weights_ == "raw" and model.selection_used_ == "none"
    assert all(r["val_accuracy"] is None for r in model.history_)


def test_test_labels_do_not_influence_what_is_selected(env, fitted):
    a = fitted
    test = env.episode.test
    permuted = [replace(item, label=test[(i + 1) % len(test)].label) for i, item in enumerate(test)]
    b = make().fit(replace(env.episode, test=permuted))
    assert (a.best_epoch_, a.weights_, a.encoder_sha256_) == (b.best_epoch_, b.weights_, b.encoder_sha256_)
    assert a.history_ == b.history_ and torch.equal(a.head_weight_, b.head_weight_)


def test_random_head_and_real_images_only(env):
    model = make(head_init="random", use_generated=False, epochs=2).fit(env.episode)
    assert model.generated_used_ == 0 and model.latent_state_ == {}
    assert float(model.head_weight_.abs().max()) < 0.01  # FT-CLIP's 0.001-scaled init, trained a few steps
    with pytest.raises(MethodError, match="no latent encoder"):
        model.latent_encoder()


def test_a_random_head_is_refused_when_a_class_has_no_support(env):
    # base-to-new / cross-dataset: class 'azure' has no support image; its random head row would never train
    base_only = replace(env.episode.episode, train=[i for i in env.episode.episode.train if i.label != 1])
    episode = replace(env.episode, episode=base_only, generated=generated_for_episode(
        load_generated_set(env.gen_dir), base_only))  # fmt: skip
    with pytest.raises(MethodError, match=r"head_init='random' with 1 class.*'azure'.*chance.*head_init='text'"):
        make(head_init="random", epochs=1).fit(episode)
    with pytest.raises(MethodError, match="head_init='random'"):
        make(head_init="random", use_generated=False, epochs=1).fit(episode)
    assert make(head_init="text", epochs=1, selection="none").fit(episode).generated_used_ == 4  # the fix works


def test_errors_name_the_fix(env):
    with pytest.raises(MethodError, match="--generated DIR.*use_generated=false"):
        make().fit(replace(env.episode, generated=None))
    with pytest.raises(MethodError, match="warmup_epochs=3 leaves no epoch"):
        make(warmup_epochs=3).fit(env.episode)
    with pytest.raises(MethodError, match="blocks=5, but the image tower has 2 blocks"):
        make(blocks=5).fit(env.episode)


def test_a_resnet_backbone_is_refused_by_name(env, tmp_path):
    tiny = save_tiny_openclip(tmp_path / "rn", "resnet", name="fewclip-test-flier-rn", seed=0)
    spec = BackboneSpec(f"local-dir:{tiny.folder}")
    backbone = spec.load()
    text = F.normalize(torch.randn(3, backbone.embed_dim), dim=-1)
    episode = replace(env.episode, backbone=spec, loaded=backbone, text_weights=text)
    with pytest.raises(MethodError, match="flier fine-tunes a ViT image tower.*ModifiedResNet.*ViT-B/16"):
        make().fit(episode)


def test_a_class_without_generated_samples_is_named(env):
    loaded = load_generated_set(env.gen_dir)
    partial = loaded.for_classes(["amber", "cobalt"])
    with pytest.raises(DataError, match="no generated samples for 1 class.*'azure'"):
        generated_for_episode(partial, env.episode.episode)
    # base-to-new: only the classes with support need generated samples, labelled in the episode's classes
    base_only = replace(env.episode.episode, train=[i for i in env.episode.episode.train if i.label != 1])
    sub = generated_for_episode(partial, base_only)
    assert sub.classnames == CLASSES and set(sub.labels.tolist()) == {0, 2}
    assert all(CLASSES[y] in str(p) for p, y in zip(sub.images, sub.labels.tolist()))


def test_two_classes_of_one_name_each_train_on_that_name_s_generated_images(env, monkeypatch):
    import fewclip.methods.flier as flier

    # ImageNet has two classes named 'missile': here class 2 ('cobalt') is renamed 'amber', like the first class;
    # the generated set holds 'amber' once, and both labels must get its samples (the first one got none before)
    names = ["amber", "azure", "amber"]
    episode = replace(env.episode.episode, classnames=names)
    sub = generated_for_episode(load_generated_set(env.gen_dir), episode)
    assert sub.classnames == tuple(names) and torch.bincount(sub.labels, minlength=3).tolist() == [8, 8, 8]
    assert all(Path(p).parent.name == names[y] for p, y in zip(sub.images, sub.labels.tolist()))
    assert torch.equal(sub.latents[sub.labels == 0], sub.latents[sub.labels == 2])  # the same rows, repeated
    # FLIER draws K = 2 per class from the repeated rows: every class gets its two
    drawn: list = []
    real = flier.generated_items
    monkeypatch.setattr(flier, "generated_items", lambda g, rows: drawn.extend(real(g, rows)) or drawn)
    model = make(epochs=1, selection="none").fit(replace(env.episode, episode=episode, generated=sub))
    assert model.generated_used_ == 6
    assert sorted((item.classname, Path(item.path).parent.name) for item in drawn) == [
        ("amber", "amber"), ("amber", "amber"), ("amber", "amber"), ("amber", "amber"), ("azure", "azure"),
        ("azure", "azure"),
    ]  # fmt: skip
    labels = sub.labels[draw_generated(sub.labels, torch.tensor([2, 2, 2]), torch.Generator().manual_seed(0))]
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_save_load_keeps_both_branches(env, fitted, tmp_path):
    model = fitted
    back = M.load(model.save(tmp_path / "flier.safetensors"))
    assert back.weights_ == model.weights_ and back.latent_shape_ == [4, 8, 8]
    for k, v in model.latent_state_.items():
        assert torch.equal(back.latent_state_[k], v)
    torch.testing.assert_close(back.latent_encoder().head.weight, model.latent_encoder().head.weight)
    features = torch.randn(5, env.episode.dim)
    torch.testing.assert_close(back.predict_logits(features), model.predict_logits(features))


# --------------------------------------------------------------------------- fewclip run


def _run_argv(env, out: Path, *extra: str) -> list[str]:
    sets = [f"--set=flier:{k}={json.dumps(v)}" for k, v in {**FAST, "epochs": 2}.items()]
    return ["run", "--dataset", "folder", "--path", str(env.folder), "--model", env.spec.model, "--views", "1",
            "--cache-dir", str(out / "cache"), "--out", str(out / "out"), "--no-progress", "--method", "flier",
            "--shots", "2", "--seeds", "1", *sets, *extra]  # fmt: skip


def test_fewclip_run_writes_the_result_with_the_generated_set(env, tmp_path, capsys):
    assert main(_run_argv(env, tmp_path, "--generated", str(env.gen_dir))) == 0
    path = tmp_path / "out/folder/local-dir-model/fewshot/flier/shots_2-seed_1.json"
    result = json.loads(path.read_text())
    assert result["status"] == "ok" and len(result["history"]) == 2
    assert result["hyperparameters"]["generated_images"] == 6 and len(result["setup"]["generated_sha256"]) == 64
    assert result["image_encoder"]["test_encoded"] == result["episode"]["test"] == 9
    assert result["selected"]["weights"] in ("raw", "ema")
    # no generated set: refused before anything is encoded, naming the option
    capsys.readouterr()
    assert main(_run_argv(env, tmp_path / "none")) == 2
    assert "--generated DIR" in capsys.readouterr().err


def test_fewclip_run_names_missing_generated_classes(env, tmp_path, capsys):
    partial = load_generated_set(env.gen_dir).for_classes(["amber", "cobalt"])
    write_generated_set(tmp_path / "partial", partial)
    assert main(_run_argv(env, tmp_path, "--generated", str(tmp_path / "partial"))) == 2
    err = capsys.readouterr().err
    assert "no generated samples for 1 class" in err and "'azure'" in err
    assert not (tmp_path / "out/folder").exists() or not list((tmp_path / "out/folder").rglob("shots_*.json"))


def test_a_generated_set_no_method_uses_is_not_read_and_says_so(env, tmp_path):
    from fewclip.errors import DataWarning

    argv = _run_argv(env, tmp_path, "--generated", str(tmp_path / "absent"))
    argv[argv.index("flier")] = "zero-shot"
    with pytest.warns(DataWarning, match="none of the methods run .zero-shot. trains on generated images"):
        assert main([a for a in argv if not a.startswith("--set=flier:")]) == 0


@pytest.mark.slow
def test_fewclip_run_base_to_new_trains_on_base_classes_only(env, tmp_path, monkeypatch):
    import fewclip.methods.flier as flier

    # the generated set covers ALL classes, new ones included, so a new class's generated image leaking into
    # training would show: every drawn image must be of a base class ('amber', 'azure'; 'cobalt' is new)
    assert set(load_generated_set(env.gen_dir).labels.tolist()) == {0, 1, 2}
    drawn: list = []
    real = flier.generated_items
    monkeypatch.setattr(flier, "generated_items", lambda g, rows: drawn.extend(real(g, rows)) or drawn)
    # generated_shots=2 (not 0, "as many as the real support"): new classes would get 2 each unless kept out
    argv = _run_argv(env, tmp_path, "--generated", str(env.gen_dir), "--protocol", "base2new", "--set",
                     "flier:generated_shots=2")  # fmt: skip
    assert main(argv) == 0
    path = tmp_path / "out/folder/local-dir-model/base2new/flier/shots_2-seed_1.json"
    result = json.loads(path.read_text())
    assert result["status"] == "ok" and result["hyperparameters"]["generated_images"] == 4
    assert {"base", "new", "harmonic_mean"} <= set(result["accuracy"])
    assert len(drawn) == 4  # K = 2 for each of the two base classes
    assert sorted(item.classname for item in drawn) == ["amber", "amber", "azure", "azure"]
    assert all(Path(item.path).parent.name == item.classname for item in drawn)  # each image of the class it trains


def test_presets_are_the_released_scripts_values():
    pets, caltech, imagenet = (M.create("flier", preset=p) for p in ("oxford_pets", "caltech101", "imagenet"))
    assert (pets.epochs, pets.lr, pets.latent_weight, pets.batch_size) == (150, 1e-4, 0.5, 64)
    assert caltech.latent_weight == 0.2 and imagenet.batch_size == 192 and imagenet.epochs == 70
    assert M.create("flier", preset="eurosat").lr == 4e-4 and pets.layer_decay == 0.7 and pets.ema_decay == 0.9998
    assert pets.head_init == "text"  # fewclip's default; the released random init is head_init="random"
