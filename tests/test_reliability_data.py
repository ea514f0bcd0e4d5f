"""Issue 13, section 3 (datasets and images): bad dataset input is refused before any work with a message that
names the file, the value and the fix, and images with wide samples are scaled to 8 bits, not clipped.

Each refusal test also checks that the command wrote nothing (``datasets sample --out`` / ``import-coop --out``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewclip import data
from fewclip.cli.main import main
from fewclip.data.generate import write_images
from fewclip.features.extract import BadImagesError, extract, load_image

needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="POSIX symbolic links")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str) -> str:
    """The error text of a refused command: one line, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def csv_dataset(root: Path, train: str, test: str = "path,label,classname\na/1.jpg,0,a\nb/1.jpg,1,b\n") -> Path:
    """``root/{a,b}/{0,1}.jpg`` and the given train.csv / test.csv."""
    write_images(root, [(f"{c}/{i}.jpg", y) for y, c in enumerate("ab") for i in range(2)], 2, size=8)
    (root / "train.csv").write_text(train)
    (root / "test.csv").write_text(test)
    return root


def folder_dataset(root: Path, classes: str = "ab", per_class: int = 3) -> Path:
    """``root/<class>/<i>.png``: the ``folder`` kind without a split (generated 50/20/30)."""
    items = [(f"{c}/{i}.png", y) for y, c in enumerate(classes) for i in range(per_class)]
    write_images(root, items, len(classes), size=8)
    return root


def sample_argv(*data_args, out: Path) -> list:
    return ["datasets", "sample", *data_args, "--shots", 1, "--out", out]


# --------------------------------------------------------------------------- labels


def test_huge_csv_label_is_refused_with_file_line_and_value(capsys, tmp_path):
    # before: the gap check built range(10000000001) and `datasets check` ate 13 GB
    ds = csv_dataset(tmp_path / "ds", "path,label,classname\na/0.jpg,0,a\nb/0.jpg,10000000000,b\n")
    code, _, err = run(capsys, "datasets", "check", "csv", "--path", ds)
    line = one_line_error(err)
    assert code == 2
    # labels {0, 1 (test.csv), 10000000000}: 3 distinct, so 0..2 is the valid range
    assert f"{ds / 'train.csv'}:3: label 10000000000 is out of range" in line
    assert "3 distinct labels, so labels must run 0..2" in line and "(label(s) 2, 3, 4, 5, 6, ... never appear)" in line
    out = tmp_path / "episode.json"
    assert run(capsys, *sample_argv("csv", "--path", ds, out=out))[0] == 2
    assert not out.exists()


def test_csv_label_named_by_classnames_file_is_in_range(tmp_path):
    # labels 0 and 3 with four names in classnames.txt: classes 1 and 2 have no rows but are named, so 0..3 is valid
    ds = csv_dataset(tmp_path / "ds", "a/0.jpg,0\nb/0.jpg,3\n", test="a/1.jpg,0\nb/1.jpg,3\n")
    (ds / "classnames.txt").write_text("ant\nbee\ncat\ndog\n")
    splits = data.load_dataset("csv", path=ds, warn=False)
    assert splits.classnames == ["ant", "bee", "cat", "dog"] and [i.label for i in splits.train] == [0, 3]
    # a label past the named classes is refused, naming the file, the line and the classnames file
    (ds / "train.csv").write_text("a/0.jpg,0\nb/0.jpg,4\n")
    with pytest.raises(data.DataError, match=r"train\.csv:2: label 4 is out of range: the CSV has 3 distinct labels "
                       r"and .*classnames\.txt names 4 classes, so labels must run 0\.\.3"):  # fmt: skip
        data.load_dataset("csv", path=ds, warn=False)


def test_huge_split_json_label_is_refused_with_row_and_value(tmp_path):
    ds = folder_dataset(tmp_path / "ds")
    split = {"train": [["a/0.png", 0, "a"], ["b/0.png", 10**10, "b"]], "val": [], "test": [["a/1.png", 0, "a"]]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(data.DataError) as info:
        data.load_dataset("folder", path=ds, split_file=tmp_path / "split.json", warn=False)
    assert str(info.value) == (
        f"{tmp_path / 'split.json'}: train[1] has label 10000000000, but the split has 2 distinct labels, so they "
        "must run 0..1 without gaps (label(s) 1, 2, 3, 4, 5, ... never appear). Relabel the rows or restore the "
        "missing classes."
    )


def test_label_gap_names_the_missing_label(tmp_path):
    ds = folder_dataset(tmp_path / "ds", "abc")
    split = {"train": [["a/0.png", 0, "a"], ["c/0.png", 2, "c"]], "val": [], "test": [["c/1.png", 2, "c"]]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(
        data.DataError, match=r"train\[1\] has label 2, .* run 0\.\.1 without gaps \(label\(s\) 1 never"
    ):
        data.load_dataset("folder", path=ds, split_file=tmp_path / "split.json", warn=False)


def test_first_gaps_is_bounded_and_exact():
    from fewclip.data.readers import _first_gaps

    assert _first_gaps({0: "a", 2: "c"}, 3) == "1"
    assert _first_gaps({0: "a", 10**10: "b"}, 10**10 + 1) == "1, 2, 3, 4, 5, ..."
    assert _first_gaps(dict.fromkeys([0, 1, 2, 8]), 9) == "3, 4, 5, 6, 7"  # exactly five gaps: no "..."


@pytest.mark.parametrize("label", ["²", "٣", "1.0", "1e3"])
def test_non_ascii_or_non_integer_label_text_is_refused(tmp_path, label):
    ds = csv_dataset(tmp_path / "ds", f"a/0.jpg,0,a\nb/0.jpg,{label},b\n")
    with pytest.raises(data.DataError, match=rf"train\.csv:2: label '{label}' is not an integer"):
        data.load_dataset("csv", path=ds, warn=False)


# --------------------------------------------------------------------------- symbolic links


@needs_symlinks
@pytest.mark.parametrize(
    "where", ["a/loop.png", "a/x.png->a/y.png", "loopdir"], ids=["file-to-itself", "two-links", "class-folder"]
)
def test_symlink_loop_is_refused_naming_the_link(capsys, tmp_path, where):
    ds = folder_dataset(tmp_path / "ds")
    if "->" in where:  # x.png -> y.png -> x.png
        first, second = where.split("->")
        os.symlink(Path(second).name, ds / first)
        os.symlink(Path(first).name, ds / second)
        named = {ds / first, ds / second}
    else:
        os.symlink(Path(where).name, ds / where)
        named = {ds / where}
    code, _, err = run(capsys, "datasets", "check", "folder", "--path", ds)
    line = one_line_error(err)
    assert code == 2 and "a symbolic-link loop" in line and "remove the link" in line
    assert any(line.startswith(f"fewclip datasets: error: {p}: ") for p in named), line
    out = tmp_path / "episode.json"
    assert run(capsys, *sample_argv("folder", "--path", ds, out=out))[0] == 2
    assert not out.exists()


@needs_symlinks
def test_symlink_loop_named_by_a_split_file_is_refused(tmp_path):
    ds = folder_dataset(tmp_path / "ds")
    os.symlink("loop.png", ds / "a" / "loop.png")
    split = {"train": [["a/loop.png", 0, "a"], ["b/0.png", 1, "b"]], "val": [], "test": [["b/1.png", 1, "b"]]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(data.DataError, match=rf"^{re.escape(str(ds / 'a' / 'loop.png'))}: a symbolic-link loop"):
        data.load_dataset("folder", path=ds, split_file=tmp_path / "split.json", warn=False)


@needs_symlinks
def test_dataset_path_that_is_a_symlink_loop_says_so(tmp_path):
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(data.DataError, match=r"loop does not exist \(a symbolic link that loops or leads nowhere\)"):
        data.load_dataset("folder", path=tmp_path / "loop")


# --------------------------------------------------------------------------- paths outside the image root


def test_outside_root_by_hand(tmp_path):
    from fewclip.data.datasets import outside_root

    root = tmp_path / "root"
    paths = ["a/x.jpg", "a/../b/y.jpg", "..x/y.jpg", "a..b.jpg", "../x.jpg", "a/../../x.jpg",
             str(root / "a" / "z.jpg"), str(tmp_path / "elsewhere.jpg"), str(tmp_path / "rootx" / "z.jpg")]  # fmt: skip
    assert outside_root(root, paths) == [
        "../x.jpg",
        "a/../../x.jpg",
        str(tmp_path / "elsewhere.jpg"),
        str(tmp_path / "rootx" / "z.jpg"),  # a sibling whose name starts with the root's is not inside it
    ]


def test_split_file_path_leaving_the_root_is_refused_unless_allowed(capsys, tmp_path):
    ds = folder_dataset(tmp_path / "ds")
    write_images(tmp_path / "secret", [("x.png", 1)], 2, size=8)
    split = {"train": [["a/0.png", 0, "a"], ["../secret/x.png", 1, "b"]], "val": [], "test": [["b/1.png", 1, "b"]]}
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps(split))
    data_args = ["folder", "--path", ds, "--split-file", split_file]
    code, _, err = run(capsys, "datasets", "check", *data_args)
    assert code == 2 and one_line_error(err) == (
        f"fewclip datasets: error: folder: 1 train path(s) in split.json leave the image root {ds} (first: "
        "'../secret/x.png'). Fix the paths, or pass allow_outside_root=True (CLI --allow-outside-root) if they are "
        "meant to point outside it."
    )
    out = tmp_path / "episode.json"
    assert run(capsys, *sample_argv(*data_args, out=out))[0] == 2
    assert not out.exists()
    # asked for: the path is kept as written and opens outside the root
    code, text, _ = run(capsys, "datasets", "check", *data_args, "--allow-outside-root")
    assert code == 0 and "3 named, 0 missing" in text
    splits = data.load_dataset("folder", path=ds, split_file=split_file, allow_outside_root=True, warn=False)
    assert (splits.root / splits.train[1].path).resolve() == (tmp_path / "secret" / "x.png").resolve()


def test_csv_absolute_paths_inside_the_root_pass_and_dotdot_inside_stays_inside(tmp_path):
    ds = csv_dataset(
        tmp_path / "ds", f"path,label,classname\n{tmp_path / 'ds' / 'a' / '0.jpg'},0,a\na/../b/0.jpg,1,b\n"
    )
    splits = data.load_dataset("csv", path=ds, warn=False)
    assert [i.path for i in splits.train] == [str(ds / "a" / "0.jpg"), "a/../b/0.jpg"]


@needs_symlinks
def test_symlinks_inside_the_root_are_followed_wherever_they_lead(tmp_path):
    """Decision: the check is on the paths as written; links are the user's own layout (a folder on another disk)."""
    ds = folder_dataset(tmp_path / "ds")
    write_images(tmp_path / "other_disk" / "c", [(f"{i}.png", 2) for i in range(3)], 3, size=8)
    os.symlink(tmp_path / "other_disk" / "c", ds / "c")
    splits = data.load_dataset("folder", path=ds, warn=False)
    assert splits.classnames == ["a", "b", "c"]
    assert data.find_missing(splits.root, [i.path for i in (*splits.train, *splits.test)]) == []


def test_run_config_carries_allow_outside_root(tmp_path):
    import argparse

    from fewclip.cli.datasets import add_data_arguments, kind_options_from_args

    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    assert "allow_outside_root" not in kind_options_from_args(parser.parse_args(["folder"]))
    assert kind_options_from_args(parser.parse_args(["folder", "--allow-outside-root"]))["allow_outside_root"] is True


# --------------------------------------------------------------------------- text encodings


@pytest.mark.parametrize("suffix", [".txt", ".json"])
def test_non_utf8_prompts_file_names_the_byte_offset(capsys, tmp_path, suffix):
    raw = b"a photo of a {}.\n\xe9t\xe9 {}\n" if suffix == ".txt" else b'["a photo of a {}.", "\xe9t\xe9 {}"]'
    offset = raw.index(b"\xe9")  # 17 and 21: the first Latin-1 byte
    prompts = tmp_path / f"prompts{suffix}"
    prompts.write_bytes(raw)
    with pytest.raises(data.DataError) as info:
        data.load_prompts(prompts, "caltech101")
    assert str(info.value) == (
        f"{prompts}: not UTF-8 text (byte 0xe9 at offset {offset}: invalid continuation byte); save it as UTF-8."
    )
    ds = folder_dataset(tmp_path / "ds")
    code, _, err = run(capsys, "datasets", "prompts", "folder", "--path", ds, "--prompts", prompts)
    assert code == 2 and f"offset {offset}" in one_line_error(err)


def test_prompts_with_byte_order_mark_read_without_it(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes("\ufeffa photo of a {}.\n".encode())
    assert data.load_prompts(prompts).templates == ("a photo of a {}.",)


def test_non_utf8_csv_and_classnames_are_one_line_errors(tmp_path):
    ds = csv_dataset(tmp_path / "ds", "path,label\na/0.jpg,0\nb/0.jpg,1\n", test="a/1.jpg,0\nb/1.jpg,1\n")
    (ds / "classnames.txt").write_bytes(b"caf\xe9\nbee\n")
    with pytest.raises(data.DataError, match=r"classnames\.txt: not UTF-8 text \(byte 0xe9 at offset 3"):
        data.load_dataset("csv", path=ds, warn=False)
    (ds / "train.csv").write_bytes(b"path,label,classname\na/0.jpg,0,caf\xe9\n")  # 21 + 13 bytes before 0xe9
    with pytest.raises(data.DataError, match=r"train\.csv: not UTF-8 text \(byte 0xe9 at offset 34.*save it as UTF-8"):
        data.load_dataset("csv", path=ds, warn=False)


# --------------------------------------------------------------------------- CoOp pickles


DATASSL = "dassl.data.datasets.base_dataset"


class Datum:
    """Dassl's Datum as CoOp pickles it (attributes ``_impath``, ``_label``, ``_domain``, ``_classname``)."""

    def __init__(self, **fields):
        for k, v in fields.items():
            setattr(self, f"_{k}", v)


@pytest.fixture()
def dassl_module(monkeypatch):
    """Make ``Datum`` pickle under Dassl's module name (no Dassl is installed)."""
    mod = types.ModuleType(DATASSL)
    monkeypatch.setattr(Datum, "__module__", DATASSL)
    mod.Datum = Datum
    for name in ("dassl", "dassl.data", "dassl.data.datasets"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, DATASSL, mod)


@pytest.fixture()
def coop_setup(tmp_path):
    """A folder dataset with a split file (train a/0, a/1, b/0, b/1; val a/2, b/2) and its 1-shot draw."""
    ds = folder_dataset(tmp_path / "ds")
    split = {
        "train": [["a/0.png", 0, "a"], ["a/1.png", 0, "a"], ["b/0.png", 1, "b"], ["b/1.png", 1, "b"]],
        "val": [["a/2.png", 0, "a"], ["b/2.png", 1, "b"]],
        "test": [["a/2.png", 0, "a"], ["b/2.png", 1, "b"]],
    }
    (tmp_path / "split.json").write_text(json.dumps(split))
    return ds, tmp_path / "split.json"


def good(path: str, label: int, classname: str) -> Datum:
    return Datum(impath=f"/home/someone/DATA/ds/{path}", label=label, domain=0, classname=classname)


GOOD_VAL = [good("a/2.png", 0, "a"), good("b/2.png", 1, "b")]

BAD_PICKLES = {
    # what the pickle holds -> what the message must say (after "<file>: ")
    "label-str": ({"train": [good("a/0.png", 0, "a"), Datum(impath="/d/b/0.png", label="1", classname="b")],
                   "val": GOOD_VAL}, r"train\[1\]: field label is '1' \(str\); expected the class index \(an int\)"),
    "label-missing": ({"train": [Datum(impath="/d/a/0.png", classname="a")], "val": GOOD_VAL},
                      r"train\[0\]: field label is None \(NoneType\)"),
    "label-bool": ({"train": [Datum(impath="/d/a/0.png", label=True, classname="a")], "val": GOOD_VAL},
                   r"train\[0\]: field label is True \(bool\)"),
    "label-list": ({"train": [Datum(impath="/d/a/0.png", label=[0], classname="a")], "val": GOOD_VAL},
                   r"train\[0\]: field label is \[0\] \(list\)"),
    "impath-int": ({"train": [Datum(impath=7, label=0, classname="a")], "val": GOOD_VAL},
                   r"train\[0\]: field impath is 7 \(int\); expected the image path \(a string\)"),
    "impath-empty": ({"train": [Datum(impath="", label=0, classname="a")], "val": GOOD_VAL},
                     r"train\[0\]: field impath is '' \(str\)"),
    "classname-bytes": ({"train": [good("a/0.png", 0, "a")], "val": [Datum(impath="/d/a/2.png", label=0,
                         classname=b"a")]}, r"val\[0\]: field classname is b'a' \(bytes\)"),  # fmt: skip
    "row-dict": ({"train": [good("a/0.png", 0, "a"), {"impath": "b/0.png"}], "val": GOOD_VAL},
                 r"train\[1\] is \{'impath': 'b/0.png'\} \(dict\); expected a Datum"),
    "ragged-tuple": ({"train": [good("a/0.png", 0, "a"), ("b/0.png", 1)], "val": GOOD_VAL},
                     r"train\[1\] is \('b/0.png', 1\) \(tuple\); expected a Datum"),
    "train-tuple": ({"train": (good("a/0.png", 0, "a"),), "val": GOOD_VAL},
                    r"'train' is \(<.*\.\.\. \(tuple\); expected a list"),
    "val-none": ({"train": [good("a/0.png", 0, "a"), good("b/0.png", 1, "b")], "val": None},
                 r"'val' is None \(NoneType\); expected a list of Datum"),
    "no-train": ({"val": GOOD_VAL}, r"expected a dict with 'train' \(and 'val'\) lists of Datum, found keys \['val'\]"),
    "a-list": ([good("a/0.png", 0, "a")], r"expected a dict with 'train' .* found a list"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_PICKLES))
def test_malformed_coop_pickle_names_file_and_field(capsys, tmp_path, dassl_module, coop_setup, case):
    payload, message = BAD_PICKLES[case]
    ds, split_file = coop_setup
    pkl = tmp_path / "shot_1-seed_1.pkl"
    pkl.write_bytes(pickle.dumps(payload))
    splits = data.load_dataset("folder", path=ds, split_file=split_file, warn=False)
    with pytest.raises(data.DataError, match=rf"^{re.escape(str(pkl))}: {message}"):
        data.import_coop_pickle(pkl, splits)
    out = tmp_path / "episode.json"
    code, _, err = run(capsys, "datasets", "import-coop", "folder", "--path", ds, "--split-file", split_file, pkl,
                       "--out", out)  # fmt: skip
    assert code == 2 and one_line_error(err).startswith(f"fewclip datasets: error: {pkl}: ")
    assert not out.exists()


def test_well_formed_coop_pickle_still_imports(tmp_path, dassl_module, coop_setup):
    """The control case of the table above: the same draw with every field right is accepted."""
    ds, split_file = coop_setup
    pkl = tmp_path / "shot_1-seed_1.pkl"
    pkl.write_bytes(pickle.dumps({"train": [good("a/0.png", 0, "a"), good("b/1.png", 1, "b")], "val": GOOD_VAL}))
    splits = data.load_dataset("folder", path=ds, split_file=split_file, warn=False)
    episode = data.import_coop_pickle(pkl, splits)
    assert [i.path for i in episode.train] == ["a/0.png", "b/1.png"] and [i.path for i in episode.val] == [
        "a/2.png",
        "b/2.png",
    ]


class _Payload:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_coop_pickle_payload_never_runs(tmp_path, coop_setup):
    ds, split_file = coop_setup
    marker = tmp_path / "pwned"
    pkl = tmp_path / "shot_1-seed_1.pkl"
    pkl.write_bytes(pickle.dumps({"train": [_Payload(marker)], "val": []}))
    splits = data.load_dataset("folder", path=ds, split_file=split_file, warn=False)
    with pytest.raises(data.DataError, match=r"refusing to load (builtins|io)\.open"):
        data.import_coop_pickle(pkl, splits)
    assert not marker.exists()


def test_pickled_state_cannot_shadow_the_stand_in(tmp_path, dassl_module, coop_setup):
    """A Datum whose state carries a 'field' entry (the old stand-in's method name) is read as data."""
    ds, split_file = coop_setup
    d = good("a/0.png", 0, "a")
    d.field = "not callable"
    pkl = tmp_path / "shot_1-seed_1.pkl"
    pkl.write_bytes(pickle.dumps({"train": [d, good("b/0.png", 1, "b")], "val": GOOD_VAL}))
    splits = data.load_dataset("folder", path=ds, split_file=split_file, warn=False)
    assert [i.path for i in data.import_coop_pickle(pkl, splits).train] == ["a/0.png", "b/0.png"]


# --------------------------------------------------------------------------- image decoding


def saved(image: Image.Image, name: str, tmp_path: Path, **kw) -> Path:
    path = tmp_path / name
    image.save(path, **kw)
    return path


def red(path: Path) -> list[int]:
    """Channel 0 of the loaded image, first row (grey images repeat the level in R, G and B)."""
    rgb = np.asarray(load_image(path))
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[0, :, 0].tolist()


# 16 bits: round(v / 257); 128 / 257 = 0.498 -> 0, 129 / 257 = 0.502 -> 1, 32768 / 257 = 127.502 -> 128
SIXTEEN = [0, 128, 129, 257, 32768, 65535]
SIXTEEN_8BIT = [0, 0, 1, 1, 128, 255]


@pytest.mark.parametrize(
    "name,mode",
    [("g.png", "I;16"), ("g.tif", "I;16"), ("g_be.tif", "I;16B"), ("g.pgm", "I")],
)
def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path, name, mode):
    a = np.array([SIXTEEN], dtype=">u2" if mode == "I;16B" else np.uint16)
    path = saved(Image.fromarray(a), name, tmp_path)
    with Image.open(path) as im:
        assert im.mode == mode  # the mode this test is about (PIL decodes 16-bit PGM into "I")
    assert red(path) == SIXTEEN_8BIT  # before: convert("RGB") clipped to [0, 255, 255, 255, 255, 255]


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    # floor(255 v + 0.5): 0.25 -> 63.75 -> 64; 0.5 -> 127.5 -> 128 (half rounds up); 0.998 -> 254.49 -> 254
    a = np.array([[0.0, 0.25, 0.5, 0.998, 1.0]], dtype=np.float32)
    path = saved(Image.fromarray(a), "f.tif", tmp_path)
    assert red(path) == [0, 64, 128, 254, 255]  # before: [0, 0, 0, 0, 1]


@pytest.mark.parametrize(
    "values,message",
    [
        ([0.0, 255.0], r"f\.tif: a floating-point image \(mode F\) with values in \[0, 255\]; .* \[0, 1\] .* only"),
        ([-0.5, 0.5], r"f\.tif: a floating-point image \(mode F\) with values in \[-0\.5, 0\.5\]"),
        ([0.0, float("nan")], r"f\.tif: a floating-point image \(mode F\) with NaN or infinite values"),
    ],
)
def test_float_tiff_outside_unit_range_is_refused_by_name(tmp_path, values, message):
    path = saved(Image.fromarray(np.array([values], dtype=np.float32)), "f.tif", tmp_path)
    with pytest.raises(ValueError, match=message):
        load_image(path)


def test_thirty_two_bit_integer_tiff_is_refused_by_name(tmp_path):
    path = saved(Image.fromarray(np.array([[0, 70000, -5]], dtype=np.int32)), "i.tif", tmp_path)
    with pytest.raises(ValueError, match=r"i\.tif: a 32-bit integer image \(mode I, TIFF format\) with values in "
                       r"\[-5, 70000\]; its white level is unknown"):  # fmt: skip
        load_image(path)


def test_palette_with_transparency_keeps_its_colours_without_warning(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    path = saved(im, "p.png", tmp_path, transparency=0)  # index 0 (red) transparent: a tRNS chunk
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = np.asarray(load_image(path))
    assert rgb.tolist() == [[[255, 0, 0], [0, 0, 255]]]  # the transparent pixel keeps its palette colour


def test_cmyk_la_and_one_bit_convert_as_pil_does(tmp_path):
    cmyk = Image.new("CMYK", (3, 1))
    for x, px in enumerate([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]):
        cmyk.putpixel((x, 0), px)
    # PIL: R = 255 - min(255, C + K), ...: white, cyan, black
    assert np.asarray(load_image(saved(cmyk, "c.tif", tmp_path))).tolist() == [
        [[255, 255, 255], [0, 255, 255], [0, 0, 0]]
    ]
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (100, 0))
    la.putpixel((1, 0), (200, 255))
    assert red(saved(la, "la.png", tmp_path)) == [100, 200]  # grey repeated, alpha dropped
    bits = Image.new("1", (3, 1))
    bits.putpixel((1, 0), 1)
    assert red(saved(bits, "b.png", tmp_path)) == [0, 255, 0]


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (2, 2), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    with Image.open(path) as im:
        assert im.n_frames == 2
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 0, 0]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from fewclip.models import load_backbone
    from fewclip.models.tiny import save_tiny_openclip

    saved_model = save_tiny_openclip(tmp_path_factory.mktemp("model"), "vit", name="fewclip-test-rel-data", seed=3)
    return load_backbone(saved_model.config_name, str(saved_model.weights))


@pytest.mark.slow  # building the tiny backbone imports open_clip (seconds on a cold run)
def test_sixteen_bit_png_encodes_like_its_eight_bit_twin_and_float_out_of_range_is_listed(backbone, tmp_path):
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, size=(20, 24), dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # v * 257 -> round(v) = v exactly
    out = extract(backbone, tmp_path, ["eight.png", "sixteen.png"], batch_size=2, num_workers=0, progress=False)
    torch.testing.assert_close(out.features[0], out.features[1], atol=0, rtol=0)
    Image.fromarray(np.full((20, 24), 3.0, dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(BadImagesError, match=r"float\.tif: ValueError: float\.tif: a floating-point image"):
        extract(backbone, tmp_path, ["eight.png", "float.tif"], batch_size=2, num_workers=0, progress=False)


def test_eight_bit_rgb_is_returned_unchanged(tmp_path):
    """Control for the cases above: an ordinary 8-bit RGB PNG is returned unchanged."""
    buf = io.BytesIO()
    Image.new("RGB", (2, 1), (10, 20, 30)).save(buf, format="PNG")
    (tmp_path / "rgb.png").write_bytes(buf.getvalue())
    assert np.asarray(load_image(tmp_path / "rgb.png")).tolist() == [[[10, 20, 30], [10, 20, 30]]]
