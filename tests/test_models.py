"""Backbones: name resolution, loading tiny saved models back by path, backends' parity, text classifiers."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from fewclip.data import Prompts  # noqa: E402
from fewclip.errors import TextClassifierError  # noqa: E402
from fewclip.features.store import FeatureStore  # noqa: E402
from fewclip.features.text import encode_prompts, encode_text_classifier  # noqa: E402
from fewclip.models import (  # noqa: E402
    OPENAI_MODELS,
    BackboneError,
    load_backbone,
    resolve_model,
)
from fewclip.models.load_open_clip import is_torchscript_archive  # noqa: E402
from fewclip.models.tiny import save_openai_torchscript, save_tiny_hf_clip, save_tiny_openclip  # noqa: E402


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "vit": save_tiny_openclip(root / "vit", "vit", name="fewclip-test-tiny-vit", seed=0),
        "resnet": save_tiny_openclip(root / "resnet", "resnet", name="fewclip-test-tiny-rn", seed=1),
    }


@pytest.fixture(scope="module")
def vit(tiny):
    return load_backbone(tiny["vit"].config_name, str(tiny["vit"].weights))


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=g)


def reference_model(saved):
    """The same weights loaded by open_clip directly, bypassing fewclip."""
    import open_clip
    from safetensors.torch import load_file

    model = open_clip.CLIP(**saved.model_cfg)
    model.load_state_dict(load_file(str(saved.weights)))
    return model.eval()


# --------------------------------------------------------------------------- name resolution (no download)


@pytest.mark.parametrize("paper", list(OPENAI_MODELS))
def test_openai_paper_names_resolve_to_quickgelu_configs(paper):
    spec = resolve_model(paper, "openai")
    assert spec.name == OPENAI_MODELS[paper] and spec.name.endswith("-quickgelu")
    assert spec.pretrained == "openai" and spec.source == "tag"
    assert resolve_model(paper).pretrained == "openai"  # the paper names default to OpenAI's weights


def test_rn50_openai_resolves_to_quickgelu_and_open_clip_names_are_upgraded():
    assert resolve_model("RN50", "openai").name == "RN50-quickgelu"
    assert resolve_model("ViT-B-16", "openai").name == "ViT-B-16-quickgelu"  # the open_clip ≥ 2.29 trap
    assert resolve_model("ViT-B-16-quickgelu", "openai").name == "ViT-B-16-quickgelu"
    assert resolve_model("rn50", "openai").name == "RN50-quickgelu"


def test_hf_backend_names():
    assert resolve_model("ViT-B/16", backend="hf").name == "openai/clip-vit-base-patch16"
    assert resolve_model("hf-hub:org/repo", backend="hf").name == "org/repo"
    with pytest.raises(BackboneError, match="no Hugging Face transformers version"):
        resolve_model("RN50", backend="hf")
    with pytest.raises(BackboneError, match="drop --pretrained"):
        resolve_model("org/repo", "weights.bin", backend="hf")


def test_resolution_errors_name_the_value_and_the_fix(tmp_path):
    with pytest.raises(BackboneError, match="did you mean"):
        resolve_model("ViT-B-61", "openai")
    with pytest.raises(BackboneError, match="known tags: .*openai"):
        resolve_model("ViT-B-32", "no-such-tag")
    with pytest.raises(BackboneError, match="no such weights file"):
        resolve_model("ViT-B-32", str(tmp_path / "missing.pt"))
    with pytest.raises(BackboneError, match="needs --pretrained"):
        resolve_model("ViT-B-32")
    bad = tmp_path / "weights.txt"
    bad.write_text("x")
    with pytest.raises(BackboneError, match="suffix '.txt'"):
        resolve_model("ViT-B-32", str(bad))
    with pytest.raises(BackboneError, match="open_clip_config.json"):
        resolve_model(f"local-dir:{tmp_path}")
    with pytest.raises(BackboneError, match="drop --pretrained"):
        resolve_model("hf-hub:org/repo", "openai")
    with pytest.raises(BackboneError, match="backend 'jax' is unknown"):
        resolve_model("RN50", backend="jax")


def test_load_option_errors(tiny):
    path = str(tiny["vit"].weights)
    with pytest.raises(BackboneError, match="precision 'fp8'"):
        load_backbone(tiny["vit"].config_name, path, precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(BackboneError, match="use --device cpu"):
            load_backbone(tiny["vit"].config_name, path, device="cuda")


# --------------------------------------------------------------------------- tiny models loaded back by path


@pytest.mark.parametrize("arch", ["vit", "resnet"])
@pytest.mark.parametrize("how", ["file", "local-dir"])
def test_tiny_models_load_back_by_path(tiny, images, arch, how):
    saved = tiny[arch]
    if how == "file":
        bb = load_backbone(saved.config_name, str(saved.weights))
    else:
        bb = load_backbone(f"local-dir:{saved.folder}")
    feats = bb.encode_images(images)
    assert feats.shape == (4, 16) and feats.dtype == torch.float32
    with torch.no_grad():
        expected = reference_model(saved).encode_image(images)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
    ident = bb.identity
    assert ident["backend"] == "open_clip" and ident["quick_gelu"] is True and ident["precision"] == "fp32"
    from fewclip.io import file_sha256

    assert ident["weights"]["sha256"] == file_sha256(saved.weights)
    assert ident["image_size"] == 32 and bb.embed_dim == 16 and ident["preprocess"] == "clip"
    # raw features are ordinary tensors: usable in autograd after extraction
    w = torch.ones(16, requires_grad=True)
    (feats * w).sum().backward()
    assert w.grad is not None


def test_cache_key_follows_the_weights_not_their_path(tiny, vit, tmp_path):
    import shutil

    moved = tmp_path / "elsewhere.safetensors"
    shutil.copy(tiny["vit"].weights, moved)
    again = load_backbone(tiny["vit"].config_name, str(moved))
    assert again.cache_key() == vit.cache_key() and again.identity["pretrained"] == str(moved)
    assert "file" not in str(vit.cache_key()["weights"])
    other = load_backbone(tiny["resnet"].config_name, str(tiny["resnet"].weights))
    assert other.cache_key() != vit.cache_key()


def test_preprocess_matches_open_clip_val_transform(tiny):
    import open_clip

    bb = load_backbone(f"local-dir:{tiny['vit'].folder}")
    _, _, val = open_clip.create_model_and_transforms(f"local-dir:{tiny['vit'].folder}")
    img = Image.fromarray((torch.rand(50, 70, 3) * 255).byte().numpy())
    torch.testing.assert_close(bb.preprocess(img), val(img))
    assert bb.preprocess(img).shape == (3, 32, 32)
    lift = load_backbone(f"local-dir:{tiny['vit'].folder}", preprocess="lift")
    assert lift.identity["preprocess"] == "lift" and lift.preprocess(img).shape == (3, 32, 32)
    assert lift.cache_key() != bb.cache_key()


def test_augment_is_random_but_reproducible_under_a_seed(vit):
    from fewclip.features.extract import seeded

    img = Image.fromarray((torch.rand(48, 64, 3) * 255).byte().numpy())
    aug = vit.augment("tip_cache")
    with seeded(5):
        a = aug(img)
    with seeded(5):
        b = aug(img)
    with seeded(6):
        c = aug(img)
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert "0.5" in vit.augment_description("tip_cache")


def test_torchscript_archive_is_detected_and_converted_once(tiny, images, tmp_path, monkeypatch, caplog):
    archive = save_openai_torchscript(tiny["vit"], tmp_path / "ViT-tiny.pt")
    assert is_torchscript_archive(archive) and not is_torchscript_archive(tiny["vit"].weights)
    cache = tmp_path / "cache"
    with caplog.at_level("WARNING", logger="fewclip.models"):
        bb = load_backbone(tiny["vit"].config_name, str(archive), cache_dir=cache)
    assert "TorchScript archive" in caplog.text and str(archive) in caplog.text
    assert bb.identity["weights"]["converted_from_torchscript"] is True
    assert len(list((cache / "checkpoints").glob("*.safetensors"))) == 1
    with torch.no_grad():
        expected = reference_model(tiny["vit"]).encode_image(images)
    torch.testing.assert_close(bb.encode_images(images), expected, atol=1e-5, rtol=1e-5)

    def no_jit(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    again = load_backbone(tiny["vit"].config_name, str(archive), cache_dir=cache)
    torch.testing.assert_close(again.encode_images(images), expected, atol=1e-5, rtol=1e-5)


def test_pickled_checkpoint_needs_trust(tiny, tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "trainer_checkpoint.pt"
    torch.save({"state_dict": load_file(str(tiny["vit"].weights)), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(BackboneError, match="--trust-checkpoint"):
        load_backbone(tiny["vit"].config_name, str(path))
    bb = load_backbone(tiny["vit"].config_name, str(path), trust_checkpoint=True)
    assert bb.embed_dim == 16


def test_bf16_precision_returns_float32(tiny, vit, images):
    bb = load_backbone(tiny["vit"].config_name, str(tiny["vit"].weights), precision="bf16")
    feats = bb.encode_images(images)
    assert feats.dtype == torch.float32 and bb.identity["precision"] == "bf16"
    assert bb.cache_key() != vit.cache_key()
    cos = (unit(feats) * unit(vit.encode_images(images))).sum(-1)
    assert bool((cos > 0.95).all())


# --------------------------------------------------------------------------- Hugging Face backend: parity


def test_hf_backend_matches_open_clip(tiny, vit, images, tmp_path):
    folder = save_tiny_hf_clip(tmp_path / "hf", tiny["vit"])
    hf = load_backbone(str(folder), backend="hf")
    assert hf.identity["backend"] == "hf" and hf.identity["quick_gelu"] is True
    assert hf.identity["preprocess_description"] == vit.identity["preprocess_description"]
    a, b = unit(vit.encode_images(images)), unit(hf.encode_images(images))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    texts = ["a photo of a cat.", "a bad photo of the dog", "itap of a {}.", "word " * 90]
    ta, tb = unit(vit.encode_text(texts)), unit(hf.encode_text(texts))
    torch.testing.assert_close(ta, tb, atol=1e-4, rtol=0)
    assert torch.equal((a @ ta.T).argmax(1), (b @ tb.T).argmax(1))
    assert vit.count_truncated(texts) == hf.count_truncated(texts) == 1


# --------------------------------------------------------------------------- text classifier


def test_text_classifier_normalises_per_prompt_then_averages(vit):
    classnames = ["cat", "dog", "red_fox"]
    templates = ("a photo of a {}.", "a drawing of a {c}.")
    weights, info = encode_text_classifier(vit, classnames, Prompts("t", "templates", templates), batch_size=2)
    assert weights.shape == (3, 16)
    torch.testing.assert_close(weights.norm(dim=1), torch.ones(3))
    expected = []
    for c in ("cat", "dog", "red fox"):  # underscores become spaces: the run path's one prompt builder
        mean = unit(vit.encode_text([f"a photo of a {c}.", f"a drawing of a {c}."])).mean(0)
        expected.append(mean / mean.norm())
    torch.testing.assert_close(weights, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert info["prompts"] == 6 and info["truncated"] == 0

    descriptions = Prompts("d", "descriptions", descriptions={"cat": ["a small feline"], "dog": ["barks", "a dog"]})
    weights, info = encode_text_classifier(vit, ["cat", "dog"], descriptions)
    mean = unit(vit.encode_text(["barks", "a dog"])).mean(0)
    torch.testing.assert_close(weights[1], mean / mean.norm(), atol=1e-5, rtol=1e-5)
    assert info["prompts"] == 3


def test_text_classifier_counts_truncated_and_caches(vit, tmp_path):
    store = FeatureStore(tmp_path / "cache")
    prompts = [["a cat", "a cat " * 60], ["a dog"]]
    w1, info1 = encode_prompts(vit, prompts, store=store)
    assert info1["truncated"] == 1 and info1["encoded"] == 3
    w2, info2 = encode_prompts(vit, prompts, store=store)
    assert info2["encoded"] == 0
    torch.testing.assert_close(w1, w2)


def test_text_classifier_errors(vit):
    with pytest.raises(TextClassifierError, match=r"class\(es\) \[1\] have none"):
        encode_prompts(vit, [["a cat"], []])
    with pytest.raises(TextClassifierError, match="batch_size"):
        encode_prompts(vit, [["a cat"]], batch_size=0)
