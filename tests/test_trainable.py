"""Trainable view of a backbone: what trains per scope, one SGD step, frozen copies, state round trips, specs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import dataclasses  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from fewclip.models import (  # noqa: E402
    BackboneError,
    BackboneSpec,
    TrainableBackbone,
    load_backbone,
)
from fewclip.models.tiny import save_tiny_hf_clip, save_tiny_openclip  # noqa: E402
from fewclip.models.trainable import state_sha256  # noqa: E402

ARCHS = ("vit", "resnet", "hf")

#: what each scope trains, written out by hand from the architectures (names as in the model's state dict)
EXPECTED = {
    ("vit", "all"): ("visual",),
    ("vit", "last"): ("visual.transformer.resblocks.1", "visual.ln_post", "visual.proj"),
    ("resnet", "all"): ("visual",),
    ("resnet", "last"): ("visual.layer4.0", "visual.attnpool"),
    ("hf", "all"): ("vision_model", "visual_projection"),
    ("hf", "last"): ("vision_model.encoder.layers.1", "vision_model.post_layernorm", "visual_projection"),
}
IMAGE_TOWER = {"vit": ("visual",), "resnet": ("visual",), "hf": ("vision_model", "visual_projection")}


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """Tiny models with two blocks per tower (so 'last' is not 'all'), named by specs a worker could rebuild."""
    root = tmp_path_factory.mktemp("trainable_models")
    vit = save_tiny_openclip(root / "vit", "vit", name="fewclip-trainable-vit", seed=0, layers=2)
    rn = save_tiny_openclip(root / "rn", "resnet", name="fewclip-trainable-rn", seed=1, layers=2)
    hf = save_tiny_hf_clip(root / "hf", vit)
    return {
        "vit": BackboneSpec(f"local-dir:{vit.folder}"),
        "resnet": BackboneSpec(rn.config_name, str(rn.weights)),
        "hf": BackboneSpec(str(hf), backend="hf"),
    }


@pytest.fixture(scope="module")
def bases(specs):
    return {arch: spec.load() for arch, spec in specs.items()}


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def sgd_step(tb: TrainableBackbone, images: torch.Tensor, text: torch.Tensor, lr: float = 0.5) -> None:
    """One SGD step of a CLIP-style cross-entropy (image features against fixed class text embeddings)."""
    opt = torch.optim.SGD(tb.parameters(), lr=lr)
    logits = 20 * unit(tb.image_features(images)) @ text.T
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    opt.zero_grad()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("scope", ["all", "last"])
@pytest.mark.parametrize("arch", ARCHS)
def test_scope_trains_exactly_the_expected_parameters(bases, images, arch, scope):
    base = bases[arch]
    base_flags = {n: p.requires_grad for n, p in base.model.named_parameters()}
    tb = TrainableBackbone(base, scope)
    names = [n for n, _ in tb.model.named_parameters()]
    expected = {n for n in names if under(n, EXPECTED[arch, scope])}
    assert expected and {n for n, p in tb.model.named_parameters() if p.requires_grad} == expected
    assert [n for n, _ in tb.named_parameters()] == [n for n in names if n in expected]
    assert len(tb.parameters()) == len(expected) and all(p.dtype == torch.float32 for p in tb.parameters())
    assert all(under(n, IMAGE_TOWER[arch]) for n in expected)  # nothing of the text tower
    torch.autograd.grad(tb.image_features(images).sum(), tb.parameters())  # each one is on the path (or raises)
    if scope == "last":
        assert expected < {n for n in names if under(n, IMAGE_TOWER[arch])}
    # the loaded backbone is left as it was
    assert {n: p.requires_grad for n, p in base.model.named_parameters()} == base_flags
    assert not base.model.training


def test_train_and_eval_toggle_the_image_tower_but_batchnorm_keeps_its_statistics(bases, images):
    tb = TrainableBackbone(bases["resnet"], "all")
    assert tb.training and tb.model.visual.training and not tb.model.transformer.training
    norms = [m for m in tb.model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    before = {n: b.clone() for n, b in tb.model.visual.named_buffers()}
    tb.image_features(images)
    assert all(torch.equal(b, before[n]) for n, b in tb.model.visual.named_buffers())
    assert tb.eval() is tb and not tb.training and not tb.model.visual.training
    assert tb.train().training


@pytest.mark.parametrize("scope", ["all", "last"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_step_changes_only_the_scope_and_frozen_copies_keep_their_weights(bases, images, arch, scope):
    base = bases[arch]
    base_features = base.encode_images(images)
    text = unit(base.encode_text(["a photo of a cat.", "a photo of a dog.", "a photo of a car."]))
    tb = TrainableBackbone(base, scope)

    torch.testing.assert_close(tb.eval().image_features(images).detach(), base_features)  # starts at the backbone
    before = snapshot(tb.model)
    sgd_step(tb.train(), images, text)
    changed = {n for n, p in tb.model.named_parameters() if not torch.equal(p, before[n])}
    if arch == "resnet":  # open_clip starts each ResNet block's last BatchNorm at weight 0, so most of the
        assert changed and changed <= set(tb.trainable_names)  # block gets zero gradient on a fresh model
    else:
        assert changed == set(tb.trainable_names)
    assert torch.equal(base.encode_images(images), base_features)  # the backbone did not move

    frozen = tb.frozen()
    assert type(frozen) is type(base) and frozen.dtype == base.dtype and not frozen.model.training
    tuned = tb.eval().image_features(images).detach()
    assert not torch.allclose(tuned, base_features)
    frozen_features = frozen.encode_images(images)
    torch.testing.assert_close(frozen_features, tuned)
    torch.testing.assert_close(frozen.encode_text(["a photo of a cat."]), base.encode_text(["a photo of a cat."]))
    assert frozen.identity["finetuned"] == {"scope": scope, "sha256": tb.state_sha256()}
    assert frozen.cache_key() != base.cache_key()
    assert frozen.cache_key() == tb.frozen().cache_key()  # deterministic: the same weights, the same key
    assert frozen.cache_key()["finetuned"] == frozen.identity["finetuned"] and "finetuned" not in base.cache_key()

    sgd_step(tb.train(), images, text)  # training on does not reach an earlier frozen copy
    assert torch.equal(frozen.encode_images(images), frozen_features)
    assert tb.frozen().cache_key() != frozen.cache_key()


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_state_rebuilds_the_fine_tuned_encoder_from_the_spec(specs, bases, images, arch):
    base = bases[arch]
    text = unit(base.encode_text(["a cat", "a dog", "a car"]))
    tb = TrainableBackbone(base, "last", spec=specs[arch])
    sgd_step(tb, images, text)
    state = tb.trainable_state()
    assert list(state) == list(tb.trainable_names)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad for t in state.values())
    frozen = tb.frozen()

    payload = json.loads(json.dumps(specs[arch].to_dict()))  # what a worker receives
    worker = TrainableBackbone.from_spec(BackboneSpec.from_dict(payload), "last", state=state)
    assert worker.state_sha256() == tb.state_sha256()
    rebuilt = worker.frozen()
    assert rebuilt.cache_key() == frozen.cache_key()
    torch.testing.assert_close(rebuilt.encode_images(images), frozen.encode_images(images))

    sgd_step(tb, images, text)  # the state is a copy, not a view of the parameters
    assert state_sha256(state) == worker.state_sha256()


def test_state_sha256_ignores_dict_order_and_sees_every_byte(bases):
    state = TrainableBackbone(bases["vit"], "last").trainable_state()
    digest = state_sha256(state)
    assert state_sha256(dict(reversed(list(state.items())))) == digest
    nudged = dict(state)
    name = next(iter(nudged))
    nudged[name] = nudged[name].clone()
    nudged[name].view(-1)[0] += 1e-6
    assert state_sha256(nudged) != digest
    assert state_sha256({**state, name: state[name].double()}) != digest  # the dtype counts


def test_load_trainable_state_names_wrong_keys_and_shapes(specs, bases):
    tb = TrainableBackbone(bases["vit"], "last")
    state = tb.trainable_state()
    with pytest.raises(BackboneError, match=r"missing keys \['visual.proj'\]"):
        tb.load_trainable_state({k: v for k, v in state.items() if k != "visual.proj"})
    with pytest.raises(BackboneError, match=r"unexpected keys \['visual.conv1.weight'\]"):
        tb.load_trainable_state({**state, "visual.conv1.weight": torch.zeros(1)})
    with pytest.raises(BackboneError, match=r"shape mismatches \['visual.proj \[32, 8\] \(model: \[32, 16\]\)'\]"):
        tb.load_trainable_state({**state, "visual.proj": torch.zeros(32, 8)})
    with pytest.raises(BackboneError, match="missing keys .*visual.conv1.weight"):  # a 'last' state for 'all'
        TrainableBackbone.from_spec(specs["vit"], "all", state=state)


def test_cpu_path_runs_in_float32_whatever_the_precision(specs, images):
    spec = dataclasses.replace(specs["vit"], precision="bf16")
    tb = TrainableBackbone.from_spec(spec, "last")
    assert tb.autocast_dtype is None and tb.spec == spec
    assert all(p.dtype == torch.float32 for p in tb.model.visual.parameters())
    feats = tb.image_features(images)
    assert feats.dtype == torch.float32 and feats.requires_grad
    frozen = tb.frozen()
    assert frozen.identity["precision"] == "bf16" and frozen.dtype == torch.bfloat16
    assert frozen.model.visual.proj.dtype == tb.backbone.model.visual.proj.dtype == torch.bfloat16
    assert frozen.encode_images(images).dtype == torch.float32


def test_spec_round_trips_and_loads_the_same_backbone(specs, bases, images):
    for arch, spec in specs.items():
        data = spec.to_dict()
        assert json.loads(json.dumps(data)) == data and BackboneSpec.from_dict(data) == spec
        assert set(data) == {f.name for f in dataclasses.fields(BackboneSpec)}
        direct = load_backbone(spec.model, spec.pretrained, backend=spec.backend)
        again = BackboneSpec.from_dict(data).load()
        assert again.identity == bases[arch].identity == direct.identity
        assert torch.equal(again.encode_images(images), direct.encode_images(images))
    with pytest.raises(BackboneError, match=r"unknown key\(s\) \['modle'\]"):
        BackboneSpec.from_dict({"modle": "RN50"})
    with pytest.raises(BackboneError, match="'model' must be given"):
        BackboneSpec.from_dict({"pretrained": "openai"})


def test_scope_and_architecture_errors_name_the_model_and_the_scopes(bases):
    with pytest.raises(BackboneError, match=r"scope 'first' is unknown; choose one of \['all', 'last'\]"):
        TrainableBackbone(bases["vit"], "first")
    odd = torch.nn.Module()
    odd.visual = torch.nn.Linear(3, 4)
    strange = dataclasses.replace(bases["vit"], model=odd)
    with pytest.raises(BackboneError, match=r"scope 'last' is not defined for model 'local-dir:.*Linear.*all, last"):
        TrainableBackbone(strange, "last")
    assert TrainableBackbone(strange, "all").trainable_names == ("visual.weight", "visual.bias")


def test_transforms_are_the_backbones(bases):
    tb = TrainableBackbone(bases["vit"], "last")
    img = Image.fromarray((torch.rand(40, 60, 3) * 255).byte().numpy())
    assert tb.eval_transform() is bases["vit"].preprocess
    assert tb.train_transform("dassl_train")(img).shape == (3, 32, 32)
    with pytest.raises(Exception, match="augmentation preset 'nope'"):
        tb.train_transform("nope")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast and GradScaler need CUDA")
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_half_precision_autocasts_over_float32_master_weights(specs, images, arch):
    spec = dataclasses.replace(specs[arch], precision="fp16", device="cuda")
    tb = TrainableBackbone.from_spec(spec, "last")
    assert tb.autocast_dtype == torch.float16
    assert all(p.dtype == torch.float32 and p.is_cuda for p in tb.parameters())
    text = unit(tb.backbone.encode_text(["a cat", "a dog", "a car"])).cuda()
    # a modest initial scale, so that this one step is not skipped for an overflow
    scaler = torch.amp.GradScaler(init_scale=2.0**10, enabled=tb.autocast_dtype == torch.float16)
    opt = torch.optim.SGD(tb.parameters(), lr=0.5)
    feats = tb.image_features(images)
    assert feats.dtype == torch.float32 and feats.is_cuda and feats.requires_grad
    before = snapshot(tb.model)
    scaler.scale(F.cross_entropy(20 * unit(feats) @ text.T, torch.tensor([0, 1, 2, 0], device="cuda"))).backward()
    scaler.step(opt)
    scaler.update()
    changed = {n for n, p in tb.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(tb.trainable_names)
    frozen = tb.frozen()
    assert frozen.identity["precision"] == "fp16" and frozen.dtype == torch.float16
    cos = (unit(frozen.encode_images(images)) * unit(tb.eval().image_features(images).detach().cpu())).sum(-1)
    assert bool((cos > 0.99).all())
