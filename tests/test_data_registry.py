"""Folder resolution over every combination of present folders, user-facing source hints, warning order."""

from __future__ import annotations

import dataclasses
import itertools
import json
import warnings
from pathlib import Path

import pytest

from fewclip import data

# What a candidate folder under the data root holds: nothing (absent), an empty folder, the image root, the
# split file, or both.
STATES = ("absent", "empty", "root", "split", "both")


def build(root: Path, info: data.DatasetInfo, states: tuple[str, ...]) -> None:
    for folder, state in zip(info.folders, states):
        if state == "absent":
            continue
        d = root / folder.name
        d.mkdir(parents=True, exist_ok=True)
        if state in ("root", "both"):
            (d / folder.image_root).mkdir(parents=True, exist_ok=True)
        if state in ("split", "both"):
            (d / info.split_file).write_text("{}")


def expected_folder(info: data.DatasetInfo, states: tuple[str, ...]) -> str:
    """The rule, stated plainly: the first folder (registry order) holding its image root and split file (just
    the image root for datasets without one); else the first holding its image root; else the first holding the
    split file; else the first that exists."""
    existing = [(f, s) for f, s in zip(info.folders, states) if s != "absent"]
    has_root = [f for f, s in existing if s in ("root", "both") or f.image_root == "."]
    has_split = [f for f, s in existing if s in ("split", "both")]
    complete = [f for f in has_root if f in has_split or not info.split_file]
    return (complete or has_root or has_split or [f for f, _ in existing])[0].name


@pytest.mark.parametrize("key", ["caltech101", "oxford_pets", "sun397", "fgvc_aircraft", "imagenet_lt"])
def test_resolve_folder_prefers_complete_then_image_root_then_split_file_then_registry_order(tmp_path, key):
    info = data.dataset_info(key)
    assert len(info.folders) >= 2
    states = STATES if info.split_file else STATES[:3]
    checked = 0
    for n, combo in enumerate(itertools.product(states, repeat=len(info.folders))):
        if all(s == "absent" for s in combo):
            continue
        root = tmp_path / str(n)
        root.mkdir()
        build(root, info, combo)
        name = expected_folder(info, combo)
        folder = next(f for f in info.folders if f.name == name)
        assert data.resolve_folder(key, root) == (root / name, name, root / name / folder.image_root), combo
        checked += 1
    assert checked == len(states) ** len(info.folders) - 1


def test_where_from_names_something_a_user_can_find():
    for key in data.list_datasets():
        text = data.dataset_info(key).where_from()
        assert text and "datasets_and_protocols" not in text and "§" not in text
    assert data.dataset_info("caltech101").where_from().startswith("split_zhou_Caltech101.json from KaiyangZhou/CoOp")
    assert "one sub-folder per class" in data.dataset_info("folder").where_from()
    assert "path,label[,classname]" in data.dataset_info("csv").where_from()
    bare = dataclasses.replace(data.dataset_info("imagenet"), obtain=None)
    assert bare.where_from() == (
        "the images under imagenet/images/, laid out as in https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
    )


def test_missing_images_of_custom_data_point_at_the_users_own_files(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "train.csv").write_text("a.jpg,0,cat\n")
    (tmp_path / "test.csv").write_text("b.jpg,0,cat\n")
    with pytest.raises(data.DataError, match=r"1 of 2 images .*b\.jpg.*re-download \(your own images, named by CSV"):
        data.load_dataset("csv", path=tmp_path, warn=False)


def test_reader_warnings_come_before_count_warnings_and_are_emitted_in_that_order(tmp_path):
    for c, n in (("AnnualCrop", 10), ("SeaLake", 5)):
        for i in range(n):
            f = tmp_path / "eurosat" / "2750" / c / f"{c}_{i}.jpg"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = data.load_dataset("eurosat", tmp_path, regenerate_split=3)
    assert s.warnings == (
        "eurosat: using a regenerated split (seed 3), not CoOp's split_zhou_EuroSAT.json.",
        "eurosat: 2 classes, published 10; likely cause: a partial download, another version of the dataset, "
        "or a subset of the classes.",
        "eurosat: 7 train images, published 13500; likely cause: a partial download or another version of the dataset.",
        "eurosat: 3 val images, published 5400; likely cause: a partial download or another version of the dataset.",
        "eurosat: 5 test images, published 8100; likely cause: a partial download or another version of the dataset.",
    )
    assert [str(w.message) for w in caught] == list(s.warnings)
    assert all(w.category is data.DataWarning and w.filename == __file__ for w in caught)


def test_standard_split_count_warnings_blame_the_split_file(tmp_path):
    d = tmp_path / "dtd"
    (d / "images" / "banded").mkdir(parents=True)
    (d / "images" / "banded" / "a.jpg").write_bytes(b"")
    split = {"train": [["banded/a.jpg", 0, "banded"]], "val": [], "test": []}
    (d / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    s = data.load_dataset("dtd", tmp_path, warn=False)
    assert s.standard_split
    assert "dtd: 1 train images, published 2820; likely cause: a split file other than CoOp's" in s.warnings[1]
