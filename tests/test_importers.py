import pytest
import torch

from fewclip.features import bundle as bio
from fewclip.features.bundle import BundleError
from fewclip.features.importers import import_upstream_cache

C, K, D = 3, 2, 8
BLOCK_ORDER = [2, 0, 1]  # class-grouped, but not in label order


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def make_cache(path, *, layout="test", kind="ape", text_shape="DC", values=None, val_dim=D, seed=0):
    """An upstream cache folder in the exact on-disk layout (fp16, keys transposed); returns its tensors."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    keys_rows = unit(torch.randn(C * K, D, generator=g)).half()  # rows in BLOCK_ORDER
    labels = torch.tensor([c for c in BLOCK_ORDER for _ in range(K)])
    if values is None:
        values = torch.nn.functional.one_hot(labels, C).half()
    torch.save(keys_rows.T.contiguous(), path / f"keys_{K}shots.pt")
    torch.save(values, path / f"values_{K}shots.pt")
    torch.save(torch.randn(D, 1).half(), path / f"criterion_RN50_{K}shot.pt")  # must be ignored
    feats = {
        "val": unit(torch.randn(5, val_dim, generator=g)).half(),
        "test": unit(torch.randn(7, D, generator=g)).half(),
    }
    flabels = {"val": torch.tensor([0, 1, 2, 2, 1]), "test": torch.tensor([2, 2, 1, 0, 0, 1, 2])}
    for prefix in ["val", "test"] if layout == "test" else ["val"]:
        torch.save(feats[prefix], path / f"{prefix}_f.pt")
        torch.save(flabels[prefix], path / f"{prefix}_l.pt")
    text_cd = torch.randn(C, D, generator=g) * 3  # not normalised: the importer must re-normalise
    if kind == "ape":
        text = text_cd.T if text_shape == "DC" else text_cd
        torch.save(text.contiguous().half(), path / "text_weights_cupl_t.pt")
    return {"keys_rows": keys_rows, "labels": labels, "feats": feats, "flabels": flabels, "text_cd": text_cd}


def test_support_rows_are_transposed_keys_sorted_by_label(tmp_path):
    t = make_cache(tmp_path / "c")
    b = import_upstream_cache("ape", tmp_path / "c", K, backbone="RN50", dataset="toy", seed=1)
    # blocks for labels 2,0,1 -> stable sort by label puts rows 2,3 (label 0), 4,5 (label 1), 0,1 (label 2)
    expected_order = [2, 3, 4, 5, 0, 1]
    assert b.support_features.shape == (1, C * K, D) and b.support_features.dtype == torch.float32
    assert torch.equal(b.support_features[0], t["keys_rows"].float()[expected_order])
    assert b.support_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert b.support_labels.dtype == torch.int64
    assert torch.equal(b.test_features, t["feats"]["test"].float())
    assert b.test_labels.tolist() == [2, 2, 1, 0, 0, 1, 2]
    assert torch.equal(b.val_features, t["feats"]["val"].float())
    assert b.val_labels.tolist() == [0, 1, 2, 2, 1]
    m = b.metadata
    assert m["provenance"] == f"imported from ape cache {tmp_path / 'c'}, unverified provenance"
    assert (m["imported_from"], m["shots"], m["views"], m["averaged_keys_only"]) == ("ape", "2", "1", "true")
    assert (m["backbone"], m["dataset"], m["seed"]) == ("RN50", "toy", "1")
    assert "val_source" not in m
    assert b.classnames == ("class_0", "class_1", "class_2")


@pytest.mark.parametrize("text_shape", ["DC", "CD"])
def test_text_weights_orientation_both_ways(tmp_path, text_shape):
    t = make_cache(tmp_path / "c", text_shape=text_shape)
    b = import_upstream_cache("ape", tmp_path / "c", K)
    expected = unit(t["text_cd"].half().float())
    assert b.text_weights.shape == (C, D)
    assert torch.allclose(b.text_weights, expected, atol=1e-6)
    assert torch.allclose(b.text_weights.norm(dim=1), torch.ones(C), atol=1e-6)
    assert b.metadata["backbone"] == "unknown"


def test_explicit_text_weights_file_overrides_folder(tmp_path):
    make_cache(tmp_path / "c")
    other = unit(torch.randn(C, D, generator=torch.Generator().manual_seed(9)))
    torch.save(other, tmp_path / "zs.pt")
    b = import_upstream_cache("ape", tmp_path / "c", K, text_weights=tmp_path / "zs.pt")
    assert torch.allclose(b.text_weights, other, atol=1e-6)


def test_imagenet_layout_val_files_are_the_test_set(tmp_path):
    t = make_cache(tmp_path / "c", layout="imagenet")
    b = import_upstream_cache("ape", tmp_path / "c", K)
    assert torch.equal(b.test_features, t["feats"]["val"].float())
    assert b.test_labels.tolist() == [0, 1, 2, 2, 1]
    assert not b.has_val and b.val_labels is None
    assert b.metadata["val_source"] == "none (upstream val_* files are the test set)"


def test_missing_keys_file_names_it_and_lists_available_shots(tmp_path):
    make_cache(tmp_path / "c")
    with pytest.raises(BundleError) as err:
        import_upstream_cache("ape", tmp_path / "c", 16)
    msg = str(err.value)
    assert "keys_16shots.pt" in msg and str(tmp_path / "c") in msg
    assert f"keys_{K}shots.pt" in msg


def test_non_one_hot_values_row_is_rejected(tmp_path):
    labels = torch.tensor([c for c in BLOCK_ORDER for _ in range(K)])
    values = torch.nn.functional.one_hot(labels, C).half()
    values[3] = torch.tensor([0.5, 0.5, 0.0])
    make_cache(tmp_path / "c", values=values)
    with pytest.raises(BundleError, match=r"values_2shots\.pt: row 3 is not one-hot"):
        import_upstream_cache("ape", tmp_path / "c", K)


def test_mismatched_feature_dim_is_rejected(tmp_path):
    make_cache(tmp_path / "c", val_dim=D + 2)
    with pytest.raises(BundleError) as err:
        import_upstream_cache("ape", tmp_path / "c", K)
    msg = str(err.value)
    assert "val_f.pt" in msg and f"[5, {D + 2}]" in msg and f"[M, {D}]" in msg


def test_text_weights_with_wrong_class_count_is_rejected(tmp_path):
    make_cache(tmp_path / "c")
    torch.save(torch.randn(D, C + 1), tmp_path / "zs.pt")
    with pytest.raises(BundleError, match=r"zs\.pt: has shape \[8, 4\].*\(D, C\) = \(8, 3\)"):
        import_upstream_cache("ape", tmp_path / "c", K, text_weights=tmp_path / "zs.pt")


def test_tip_adapter_without_text_weights_says_to_pass_them(tmp_path):
    make_cache(tmp_path / "c", kind="tip-adapter")
    with pytest.raises(BundleError, match="text_weights"):
        import_upstream_cache("tip-adapter", tmp_path / "c", K)
    # a Tip-Adapter folder never supplies text weights, even if an APE-named file were there
    make_cache(tmp_path / "d", kind="ape")
    with pytest.raises(BundleError, match="Pass text_weights"):
        import_upstream_cache("tip-adapter", tmp_path / "d", K)


def test_unknown_kind_lists_valid_kinds(tmp_path):
    make_cache(tmp_path / "c")
    with pytest.raises(BundleError, match="ape, tip-adapter"):
        import_upstream_cache("coop", tmp_path / "c", K)


def test_classnames_file(tmp_path):
    make_cache(tmp_path / "c")
    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n")
    b = import_upstream_cache("ape", tmp_path / "c", K, classnames=tmp_path / "names.txt")
    assert b.classnames == ("cat", "dog", "bird")
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    with pytest.raises(BundleError, match=r"two\.txt: lists 2 class names; expected C = 3"):
        import_upstream_cache("ape", tmp_path / "c", K, classnames=tmp_path / "two.txt")


def test_round_trip_through_save_and_load(tmp_path):
    make_cache(tmp_path / "c")
    other = unit(torch.randn(C, D))
    torch.save(other.T.contiguous(), tmp_path / "zs.pt")
    b = import_upstream_cache("tip-adapter", tmp_path / "c", K, text_weights=tmp_path / "zs.pt", dataset="toy")
    back = bio.load(bio.save(b, tmp_path / "b.safetensors"))
    for name in bio.ALL_TENSORS:
        a, z = getattr(b, name), getattr(back, name)
        assert (a is None and z is None) or torch.equal(a, z), name
    assert back.val_features is not None and back.val_features.shape == (5, D)
    assert back.metadata["imported_from"] == "tip-adapter" and back.metadata["averaged_keys_only"] == "true"
    assert back.metadata["dataset"] == "toy" and back.metadata["views"] == "1"
