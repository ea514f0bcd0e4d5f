import json

import pytest
import torch
from safetensors.torch import save_file

from fewclip.features import bundle as bio
from fewclip.features.bundle import BundleError, make_bundle


def tensors(c=3, n=6, d=4, v=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(c, d, generator=g)
    return {
        "support_features": torch.randn(v, n, d, generator=g),
        "support_labels": torch.arange(n) % c,
        "text_weights": text / text.norm(dim=1, keepdim=True),
        "test_features": torch.randn(5, d, generator=g),
        "test_labels": torch.tensor([0, 1, 2, 0, 1]),
        "val_features": torch.randn(3, d, generator=g),
        "val_labels": torch.tensor([2, 1, 0]),
    }


def write(path, ts, meta=None):
    m = {"format": bio.FORMAT, "classnames": json.dumps(["a", "b", "c"])}
    m.update(meta or {})
    save_file({k: v.contiguous() for k, v in ts.items()}, str(path), metadata=m)
    return path


def test_round_trip_preserves_every_tensor_and_metadata(tmp_path):
    b = make_bundle(
        **tensors(),
        support_clean_features=torch.randn(6, 4),
        text_norms=torch.tensor([1.5, 2.0, 3.0]),
        classnames=["a", "b", "c"],
        metadata={"dataset": "toy", "shots": 2},
    )
    path = bio.save(b, tmp_path / "b.safetensors")
    back = bio.load(path)
    for name in bio.ALL_TENSORS:
        assert torch.equal(getattr(back, name), getattr(b, name)), name
    assert back.classnames == ("a", "b", "c")
    assert back.metadata["dataset"] == "toy" and back.metadata["shots"] == "2" and back.metadata["views"] == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["b.safetensors"]  # no temporary file left behind


def test_two_dimensional_support_is_one_view():
    ts = tensors()
    ts["support_features"] = ts["support_features"][0]
    assert make_bundle(**ts).views == 1


def test_shots_counts_and_class_without_support():
    ts = tensors()
    ts["support_labels"] = torch.tensor([0, 0, 0, 1, 1, 0])
    b = make_bundle(**ts)
    assert b.shots() == [4, 2, 0]
    assert bio.info(b)["classes_without_support"] == [2]
    assert make_bundle(**tensors()).shots() == 2


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.__setitem__(
                "support_features", t["support_features"].index_fill(2, torch.tensor([1]), float("nan"))
            ),
            "'support_features'.*NaN",
        ),
        (
            lambda t: t.__setitem__("test_features", t["test_features"].index_fill(0, torch.tensor([0]), float("inf"))),
            "'test_features'.*infinite",
        ),
        (
            lambda t: t.__setitem__("support_features", torch.randn(2, 6, 5)),
            r"'support_features' has shape \[2, 6, 5\].*\[V, N, 4\]",
        ),
        (
            lambda t: t.__setitem__("support_features", torch.randn(2, 2, 6, 4)),
            r"'support_features' has shape \[2, 2, 6, 4\]",
        ),
        (lambda t: t.__setitem__("test_features", torch.randn(5, 3)), r"'test_features' has shape \[5, 3\]"),
        (
            lambda t: t.__setitem__("support_labels", torch.tensor([0, 1, 2, 3, 0, 1])),
            "'support_labels' holds label 3 outside",
        ),
        (lambda t: t.__setitem__("val_labels", torch.tensor([-1, 1, 0])), "'val_labels' holds label -1"),
        (lambda t: t.__setitem__("support_labels", torch.tensor([0, 1, 2])), "'support_labels' has 3 rows.*N = 6"),
        (lambda t: t.__setitem__("support_labels", torch.zeros(6)), "'support_labels'.*integer labels"),
        (lambda t: t.pop("val_labels"), "'val_features' is present but 'val_labels' is missing"),
        (
            lambda t: t.__setitem__("test_labels", torch.tensor([0, 1])),
            "'test_labels' has 2 rows but 'test_features' has 5",
        ),
        (lambda t: t.__setitem__("text_weights", 2 * t["text_weights"]), "'text_weights' row 0 has norm 2.0000"),
    ],
)
def test_bad_input_names_tensor_and_expectation(tmp_path, edit, message):
    ts = tensors()
    edit(ts)
    path = write(tmp_path / "bad.safetensors", ts)
    with pytest.raises(BundleError, match=message) as err:
        bio.load(path)
    assert str(path) in str(err.value)


def test_missing_required_tensor_and_wrong_format(tmp_path):
    ts = tensors()
    del ts["test_features"], ts["test_labels"]
    with pytest.raises(BundleError, match="required tensor 'test_features' is missing"):
        bio.load(write(tmp_path / "a.safetensors", ts))
    with pytest.raises(BundleError, match="'format' is 'other/2'"):
        bio.load(write(tmp_path / "b.safetensors", tensors(), {"format": "other/2"}))
    with pytest.raises(BundleError, match="classnames' lists 2 names"):
        bio.load(write(tmp_path / "c.safetensors", tensors(), {"classnames": json.dumps(["a", "b"])}))
    (tmp_path / "d.safetensors").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="not a readable bundle file"):
        bio.load(tmp_path / "d.safetensors")
    with pytest.raises(BundleError, match="no such bundle file"):
        bio.load(tmp_path / "missing.safetensors")


def test_interrupted_save_leaves_no_partial_file(tmp_path, monkeypatch):
    b = make_bundle(**tensors())

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fewclip.features.bundle.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        bio.save(b, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_fit_copy_has_no_test_data():
    b = make_bundle(**tensors())
    stripped = b.without_test()
    assert stripped.test_features is None and stripped.test_labels is None
    assert torch.equal(stripped.val_features, b.val_features)
