"""Methods fitted on images (``inputs = "images"``): the contract of the feature methods, checked on an image
episode of generated images and a tiny open_clip model loaded back by path."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import fewclip.methods as M
from conftest import FAST
from fewclip import data
from fewclip.cli.main import main
from fewclip.data.generate import make_folder_dataset
from fewclip.errors import MethodError, NotFittedError
from fewclip.features import bundle as bundle_io
from fewclip.features.extract import extract
from fewclip.features.text import encode_text_classifier
from fewclip.methods import ImageEpisode
from fewclip.models import BackboneSpec, TrainableBackbone
from fewclip.models.tiny import save_tiny_openclip

IMAGE_METHODS = [m for m in M.list_methods() if M.get_class(m).inputs == "images"]
CLASSES = ("amber", "azure", "cobalt")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    folder = make_folder_dataset(root / "images", CLASSES, {"train": 4, "val": 2, "test": 3}, size=32, seed=0)
    tiny = save_tiny_openclip(root / "model", "vit", name="fewclip-test-image-vit", seed=0)
    spec = BackboneSpec(f"local-dir:{tiny.folder}")
    backbone = spec.load()
    splits = data.load_dataset("folder", path=folder, warn=False)
    text, _ = encode_text_classifier(backbone, splits.classnames, data.load_prompts("single", "folder"))
    episode = ImageEpisode(splits, data.sample_episode(splits, 2, 1), spec, text, test=splits.test, loaded=backbone)
    return SimpleNamespace(root=root, folder=folder, spec=spec, backbone=backbone, splits=splits, episode=episode)


def make(name, **kw):
    return M.create(name, **{**FAST.get(name, {}), **kw})


@pytest.fixture(params=IMAGE_METHODS)
def name(request):
    return request.param


def encode(encoder, env, items):
    out = extract(encoder, env.splits.root, [i.path for i in items], progress=False)
    return out.features, torch.tensor([i.label for i in items])


def test_there_is_an_image_method():
    assert "clip-ft" in IMAGE_METHODS


def test_fit_returns_self_records_state_and_the_validation_accuracy_of_the_encoder(env, name):
    model = make(name)
    assert model.fit(env.episode) is model and model.inputs == "images"
    hp = model.hyperparameters()
    assert set(model.get_params()) <= set(hp) and hp["preset"] is None and model.selection_used_ == "val"
    # the recorded validation accuracy is the head's on the validation images encoded by the fine-tuned encoder
    val_features, val_labels = encode(model.image_encoder(), env, env.episode.val)
    assert model.val_accuracy_ == pytest.approx(model.score(val_features, val_labels))
    assert model.best_epoch_ == 1 + max(
        range(len(model.history_)), key=lambda e: (model.history_[e]["val_accuracy"], -e)
    )


def test_clip_ft_trains_only_its_scope_and_its_head_is_zero_shots_over_the_new_features(env):
    model = make("clip-ft").fit(env.episode)
    base = TrainableBackbone(env.backbone, "last")
    assert sorted(model.encoder_state_) == sorted(base.trainable_names)
    before = base.trainable_state()
    assert any(not torch.equal(before[k], model.encoder_state_[k]) for k in before)  # it learned something
    encoder = model.image_encoder()
    assert encoder.identity["finetuned"] == {"scope": "last", "sha256": model.encoder_sha256_}
    assert encoder.cache_key() != env.backbone.cache_key()
    features, _ = encode(encoder, env, env.splits.test)
    expected = 100.0 * F.normalize(features, dim=-1) @ env.episode.text_weights.T
    torch.testing.assert_close(model.predict_logits(features), expected)
    # every parameter outside the scope is the pre-trained one
    frozen = dict(encoder.model.named_parameters())
    for key, value in env.backbone.model.named_parameters():
        if key not in model.encoder_state_:
            assert torch.equal(frozen[key], value), key


def test_save_load_rebuilds_the_fine_tuned_encoder(tmp_path, env, name):
    model = make(name).fit(env.episode)
    back = M.load(model.save(tmp_path / f"{name}.safetensors"))
    assert type(back) is type(model) and back.get_params() == json.loads(json.dumps(model.get_params()))
    assert back.encoder_sha256_ == model.encoder_sha256_ and not hasattr(back, "_encoder_")
    rebuilt = back.image_encoder()  # from the spec and the saved state, as another process would
    assert rebuilt.cache_key() == model.image_encoder().cache_key()
    a, _ = encode(model.image_encoder(), env, env.splits.test)
    b, _ = encode(rebuilt, env, env.splits.test)
    torch.testing.assert_close(a, b)
    assert torch.equal(back.predict_logits(b), model.predict_logits(b))


def test_deterministic_for_a_seed(env, name):
    a, b = make(name).fit(env.episode), make(name).fit(env.episode)
    assert a.encoder_sha256_ == b.encoder_sha256_ and a.history_ == b.history_
    c = make(name, seed=2).fit(env.episode)
    assert c.encoder_sha256_ != a.encoder_sha256_


def test_refuses_a_bundle_and_is_unfitted_until_a_fit_succeeds(env, name, bundle, monkeypatch):
    model = make(name)
    with pytest.raises(NotFittedError):
        model.image_encoder()
    with pytest.raises(MethodError, match=f"{name} fine-tunes CLIP on images.*fewclip run"):
        model.fit(bundle)
    with pytest.raises(NotFittedError):
        model.predict_logits(torch.zeros(1, env.episode.dim))
    model.fit(env.episode)

    def fails(self, data):
        self.encoder_state_ = {}
        raise MethodError("boom")

    monkeypatch.setattr(type(model), "_fit", fails)
    with pytest.raises(MethodError, match="boom"):
        model.fit(env.episode)
    with pytest.raises(NotFittedError):
        model.image_encoder()


def test_selection_none_keeps_the_last_epoch_and_still_reports_validation(env, name):
    model = make(name, selection="none").fit(env.episode)
    # the last epoch (clip-lora: its one round of every iteration)
    assert model.best_epoch_ == len(model.history_) == model.hyperparameters().get("epochs", 1)
    assert model.selection_used_ == "none"
    val_features, val_labels = encode(model.image_encoder(), env, env.episode.val)
    assert model.val_accuracy_ == pytest.approx(model.score(val_features, val_labels))
    no_val = replace(env.episode, episode=replace(env.episode.episode, val=[]))
    if M.get_class(name).falls_back_without_validation:  # clip-lora: the final iterate, as released
        assert make(name).fit(no_val).selection_used_ == "none"
    else:
        with pytest.raises(MethodError, match="selection='val' needs validation data"):
            make(name).fit(no_val)


@pytest.mark.slow
def test_clip_ft_runs_through_fewclip_run_and_caches_the_fine_tuned_features(env, tmp_path, capsys, bundle):
    argv = ["run", "--dataset", "folder", "--path", str(env.folder), "--model", env.spec.model, "--views", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--no-progress",
            "--method", "zero-shot", "clip-ft", "--shots", "2", "--seeds", "1",
            *[f"--set=clip-ft:{k}={json.dumps(v)}" for k, v in FAST["clip-ft"].items()]]  # fmt: skip
    assert main(argv) == 0
    folder = tmp_path / "out/folder/local-dir-model/fewshot"
    ft = json.loads((folder / "clip-ft/shots_2-seed_1.json").read_text())
    zs = json.loads((folder / "zero-shot/shots_2-seed_1.json").read_text())
    assert set(ft) - set(zs) == {"image_encoder"} and ft["status"] == "ok" and len(ft["history"]) == 2
    assert ft["image_encoder"]["scope"] == "last" and ft["image_encoder"]["test_encoded"] == ft["episode"]["test"]
    assert ft["model"] == zs["model"]  # the pre-trained backbone; the fine-tuned one is recorded by its hash
    # the same fit again: the same weights, so its test features come from the cache
    assert main([*argv, "--force"]) == 0
    again = json.loads((folder / "clip-ft/shots_2-seed_1.json").read_text())
    assert again["image_encoder"]["sha256"] == ft["image_encoder"]["sha256"]
    assert again["image_encoder"]["test_encoded"] == 0 and again["image_encoder"]["test_cached"] == 9
    assert again["accuracy"] == ft["accuracy"]
    capsys.readouterr()
    # `fewclip fit` has features only: it says where an image method runs
    assert main(["fit", str(bundle_io.save(bundle, tmp_path / "b.safetensors")), "--method", "clip-ft"]) == 2
    assert "clip-ft fine-tunes CLIP on images" in capsys.readouterr().err


def test_an_unreadable_support_image_is_named_or_skipped_and_recorded(env, tmp_path):
    import shutil

    from fewclip.features.pipeline import ExtractionOptions

    folder = tmp_path / "images"
    shutil.copytree(env.folder, folder)
    splits = data.load_dataset("folder", path=folder, warn=False)
    episode = replace(env.episode, splits=splits)
    broken = episode.train[0].path
    (folder / broken).write_bytes(b"\xff\xd8\xff not a jpeg")  # e.g. replaced after its features were cached
    with pytest.raises(MethodError, match=f"{broken}: cannot be read .*--skip-bad-images"):
        make("clip-ft").fit(episode)
    model = make("clip-ft").fit(replace(episode, options=ExtractionOptions(skip_bad_images=True)))
    assert model.skipped_images_ == [broken] and model.best_epoch_ >= 1


def test_readable_accuracy_counts_only_the_images_that_could_be_read():
    """4 items, one unreadable (recorded while reading): 2 hits of 3 readable = 66.7 %, not 2 of 4."""
    from fewclip.data import Item
    from fewclip.methods.image import readable_accuracy

    items = [Item(f"{i}.png", y, "") for i, y in enumerate([0, 1, 1, 0])]
    unreadable: set[str] = set()

    def batches():  # what image_batches yields: item 2 left out, its path recorded
        yield torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 1])  # items 0 (miss) and 1 (hit)
        unreadable.add("2.png")
        yield torch.tensor([[1.0, 0.0]]), torch.tensor([0])  # item 3 (hit)

    assert readable_accuracy(batches(), lambda scores: scores, items, unreadable) == pytest.approx(200 / 3)
    assert readable_accuracy(iter([]), lambda scores: scores, [], set()) == 0.0
