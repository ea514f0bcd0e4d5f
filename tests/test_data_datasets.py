"""Dataset registry, folder aliases and readers on generated image trees in the real layouts."""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import pytest
from PIL import Image

from fewclip import data
from fewclip.cli.main import main
from fewclip.data.classnames import canonical_imagenet_classnames


def _image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (3, 2), (200, 30, 90)).save(buf, format=fmt)
    return buf.getvalue()


JPEG = _image_bytes("JPEG")
PNG = _image_bytes("PNG")


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PNG if path.suffix.lower() == ".png" else JPEG)


# --------------------------------------------------------------------------- layout builders

# Caltech101 as CoOp's split file has it: labels follow a case-sensitive sort of the ORIGINAL folder names
# (Faces, Leopards, accordion), names are the renamed ones.
CALTECH = [("Faces", "face"), ("Leopards", "leopard"), ("accordion", "accordion")]


def make_caltech(root: Path, folder: str = "caltech-101", missing: tuple[str, ...] = ()) -> dict:
    """caltech-101/101_ObjectCategories/<folder>/image_000N.jpg + split_zhou_Caltech101.json."""
    d = root / folder
    split = {"train": [], "val": [], "test": []}
    sizes = {"train": (6, 5, 3), "val": (3, 2, 2), "test": (2, 2, 2)}
    n = 0
    for part in ("train", "val", "test"):
        for label, ((orig, name), size) in enumerate(zip(CALTECH, sizes[part])):
            for _ in range(size):
                n += 1
                rel = f"{orig}/image_{n:04d}.jpg"
                split[part].append([rel, label, name])
                if rel not in missing:
                    touch(d / "101_ObjectCategories" / rel)
    (d / "split_zhou_Caltech101.json").write_text(json.dumps(split))
    return split


WNIDS = ["n01440764", "n01443537", "n01484850"]


def write_imagenet_classnames(path: Path, full: bool = False, rename: dict[int, str] | None = None) -> None:
    names = canonical_imagenet_classnames()
    if full:  # 1000 lines with the canonical names (the wnids of the first three are real)
        wnids = WNIDS + [f"n9{i:07d}" for i in range(3, 1000)]
    else:
        wnids = WNIDS
    lines = []
    for i, w in enumerate(wnids):
        lines.append(f"{w} {(rename or {}).get(i, names[i])}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def make_imagenet(root: Path, flat_val: bool = False, full_classnames: bool = True) -> Path:
    """imagenet/images/{train,val}/<wnid>/*.JPEG + classnames.txt."""
    d = root / "imagenet"
    write_imagenet_classnames(d / "classnames.txt", full=full_classnames)
    for w, n in zip(WNIDS, (4, 3, 5)):
        for i in range(n):
            touch(d / "images" / "train" / w / f"{w}_{i}.JPEG")
    (d / "images" / "train" / WNIDS[0] / ".DS_Store").write_text("hidden")
    for j, w in enumerate(WNIDS):
        for i in range(2):
            name = f"ILSVRC2012_val_{j * 2 + i:08d}.JPEG"
            touch(d / "images" / "val" / name if flat_val else d / "images" / "val" / w / name)
    return d


def make_fgvc(root: Path, folder: str = "fgvc_aircraft") -> Path:
    d = root / folder
    variants = ["707-320", "A300B4", "Cessna 172"]
    (d).mkdir(parents=True)
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    rows = {"train": [("1025794", 2), ("0034309", 0), ("1340192", 1)], "val": [("2000001", 1)], "test": []}
    rows["test"] = [("3000001", 0), ("3000002", 2)]
    for part, items in rows.items():
        (d / f"images_variant_{part}.txt").write_text("".join(f"{i} {variants[y]}\n" for i, y in items))
        for i, _ in items:
            touch(d / "images" / f"{i}.jpg")
    return d


def make_imagenet_lt(root: Path) -> Path:
    d = root / "ImageNet_LT"
    write_imagenet_classnames(d / "classnames.txt")
    lists = {
        "train": [f"train/{WNIDS[0]}/{WNIDS[0]}_762.JPEG 0", f"train/{WNIDS[2]}/{WNIDS[2]}_1.JPEG 2"],
        "val": [f"train/{WNIDS[1]}/{WNIDS[1]}_5.JPEG 1"],
        "test": [f"val/{WNIDS[0]}/ILSVRC2012_val_00029930.JPEG 0", f"val/{WNIDS[1]}/ILSVRC2012_val_1.JPEG 1"],
    }
    for part, lines in lists.items():
        (d / f"ImageNet_LT_{part}.txt").write_text("\n".join(lines) + "\n")
        for line in lines:
            touch(d / line.split()[0])
    return d


# --------------------------------------------------------------------------- registry


def test_registry_holds_the_published_datasets_and_counts():
    keys = data.list_datasets()
    standard = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101"]
    standard += ["fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
    assert keys[:11] == standard
    assert {"imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r", "imagenet_lt", "places_lt"} <= set(keys)
    assert keys[-2:] == ["folder", "csv"]
    assert data.dataset_info("food101").counts == {"classes": 101, "train": 50500, "val": 20200, "test": 30300}
    assert data.dataset_info("dtd").template == "{} texture."
    assert data.dataset_info("eurosat").template == "a centered satellite photo of {}."
    assert data.dataset_info("sun397").folders[1].image_root == "."  # Candle keeps images at SUN397/'s root


@pytest.mark.parametrize(
    "alias, key",
    [("fgvc", "fgvc_aircraft"), ("FGVCAircraft", "fgvc_aircraft"), ("flowers-102", "oxford_flowers"),
     ("oxfordpets", "oxford_pets"), ("DescribableTextures", "dtd"), ("caltech-101", "caltech101"),
     ("imagenet-adversarial", "imagenet_a"), ("ImageNet_LT", "imagenet_lt")],
)  # fmt: skip
def test_name_aliases_resolve(alias, key):
    assert data.resolve_name(alias) == key


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(data.DataError, match="unknown dataset 'cifar10'.*caltech101"):
        data.resolve_name("cifar10")


def test_prompt_name_replaces_underscores():
    assert data.prompt_name("yin_yang") == "yin yang"


# --------------------------------------------------------------------------- split_zhou


def test_split_json_dataset_labels_and_names_from_the_file(tmp_path):
    split = make_caltech(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = data.load_dataset("caltech101", tmp_path)
    assert [str(w.message) for w in caught] == list(s.warnings) and len(caught) == 4
    assert s.root == tmp_path / "caltech-101" / "101_ObjectCategories"
    assert s.folder_alias == "caltech-101"
    assert s.classnames == ["face", "leopard", "accordion"]
    assert [(i.path, i.label, i.classname) for i in s.train] == [tuple(r) for r in split["train"]]
    assert (len(s.train), len(s.val), len(s.test)) == (14, 7, 6)
    raw = (tmp_path / "caltech-101" / "split_zhou_Caltech101.json").read_bytes()
    assert s.split_sha256 == hashlib.sha256(raw).hexdigest()
    assert s.standard_split and s.template == "a photo of a {}."
    assert (s.root / s.test[0].path).is_file()
    assert any("3 classes, published 100" in w for w in s.warnings)


def test_candle_alias_and_explicit_path(tmp_path):
    make_caltech(tmp_path, folder="caltech101")  # Candle's folder name
    s = data.load_dataset("caltech101", tmp_path, warn=False)
    assert s.folder_alias == "caltech101" and s.root == tmp_path / "caltech101" / "101_ObjectCategories"
    s2 = data.load_dataset("caltech101", None, path=tmp_path / "caltech101", warn=False)
    assert s2.folder_alias is None and s2.train == s.train


def test_sun397_candle_layout_has_images_at_the_folder_root(tmp_path):
    d = tmp_path / "SUN397"
    split = {"train": [["a/abbey/sun_1.jpg", 0, "abbey"]], "val": [["a/abbey/sun_2.jpg", 0, "abbey"]], "test": []}
    split["test"] = [["o/office/sun_3.jpg", 1, "office"]]
    for part in split.values():
        for rel, _, _ in part:
            touch(d / rel)
    (d / "split_zhou_SUN397.json").write_text(json.dumps(split))
    s = data.load_dataset("sun397", tmp_path, warn=False)
    assert s.root == d and s.classnames == ["abbey", "office"]


def test_missing_split_file_says_where_it_goes(tmp_path):
    (tmp_path / "eurosat" / "2750").mkdir(parents=True)
    with pytest.raises(data.DataError) as err:
        data.load_dataset("eurosat", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "eurosat" / "split_zhou_EuroSAT.json") in msg
    assert "DATASETS.md" in msg and "never re-splits silently" in msg and "--regenerate-split" in msg


def test_missing_dataset_folder_names_the_aliases_tried(tmp_path):
    with pytest.raises(data.DataError, match=r"tried oxford_pets/ \(CoOp\), oxfordpets/ \(APE\), oxford-iiit-pet/"):
        data.load_dataset("oxford_pets", tmp_path)


def test_missing_images_are_an_error_with_examples(tmp_path):
    make_caltech(tmp_path, missing=("Faces/image_0002.jpg", "accordion/image_0012.jpg"))
    with pytest.raises(data.DataError, match=r"2 of 27 images .* missing .*Faces/image_0002.jpg"):
        data.load_dataset("caltech101", tmp_path)


def test_malformed_split_rows_are_named(tmp_path):
    d = tmp_path / "dtd"
    (d / "images").mkdir(parents=True)
    (d / "split_zhou_DescribableTextures.json").write_text(json.dumps({"train": [["a.jpg", "x", "banded"]]}))
    with pytest.raises(data.DataError, match="exactly the keys train, val, test"):
        data.load_dataset("dtd", tmp_path)
    bad = {"train": [["banded/a.jpg", "one", "banded"]], "val": [], "test": []}
    (d / "split_zhou_DescribableTextures.json").write_text(json.dumps(bad))
    with pytest.raises(data.DataError, match=r"train\[0\]: label 'one' is not an integer"):
        data.load_dataset("dtd", tmp_path)


def test_raw_eurosat_names_warn(tmp_path):
    d = tmp_path / "eurosat"
    split = {"train": [["AnnualCrop/a.jpg", 0, "AnnualCrop"]], "val": [], "test": [["Forest/b.jpg", 1, "Forest"]]}
    for rel, _, _ in split["train"] + split["test"]:
        touch(d / "2750" / rel)
    (d / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    s = data.load_dataset("eurosat", tmp_path, warn=False)
    assert any("raw folder names" in w and "Annual Crop Land" in w for w in s.warnings)


def test_regenerated_split_is_explicit_and_marked(tmp_path):
    for c, n in (("AnnualCrop", 10), ("SeaLake", 5)):
        for i in range(n):
            touch(tmp_path / "eurosat" / "2750" / c / f"{c}_{i}.jpg")
    s = data.load_dataset("eurosat", tmp_path, regenerate_split=3, warn=False)
    assert not s.standard_split and "NON-standard" in s.split_source
    assert s.classnames == ["Annual Crop Land", "Sea or Lake"]
    # DTD's rule: train round(0.5 n), val round(0.2 n), test the rest: 10 -> 5/2/3, 5 -> 2 (banker's)/1/2
    assert (len(s.train), len(s.val), len(s.test)) == (7, 3, 5)
    again = data.load_dataset("eurosat", tmp_path, regenerate_split=3, warn=False)
    assert again.split_sha256 == s.split_sha256
    with pytest.raises(data.DataError, match="regenerate_split is supported only for"):
        data.load_dataset("oxford_pets", None, path=tmp_path / "eurosat", regenerate_split=1)


# --------------------------------------------------------------------------- ImageNet family


def test_imagenet_folders_and_classnames(tmp_path):
    make_imagenet(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = data.load_dataset("imagenet", tmp_path)
    assert s.root == tmp_path / "imagenet" / "images"
    assert s.classnames == ["tench", "goldfish", "great white shark"] and s.wnids == WNIDS
    assert s.val == [] and len(s.train) == 12 and len(s.test) == 6  # .DS_Store skipped; val used as test
    assert s.train[0] == data.Item(f"train/{WNIDS[0]}/{WNIDS[0]}_0.JPEG", 0, "tench")
    assert {i.label for i in s.test if i.path.startswith(f"val/{WNIDS[2]}/")} == {2}
    assert s.imagenet_indices == [0, 1, 2]
    texts = [str(w.message) for w in caught if issubclass(w.category, data.DataWarning)]
    assert any("3 classes, published 1000" in t for t in texts)
    assert not any("IMAGENET_CLASSNAMES" in t for t in texts)  # the canonical names: no difference


def test_imagenet_flat_val_is_detected_and_explained(tmp_path):
    make_imagenet(tmp_path, flat_val=True)
    with pytest.raises(data.DataError, match=r"holds 6 files and no class folders.*flat.*images/val/<wnid>/"):
        data.load_dataset("imagenet", tmp_path)


def test_imagenet_classnames_difference_warns(tmp_path):
    make_imagenet(tmp_path)
    write_imagenet_classnames(tmp_path / "imagenet" / "classnames.txt", full=True, rename={1: "gold fish"})
    s = data.load_dataset("imagenet", tmp_path, warn=False)
    assert any("1 of 1000 class names differ" in w and "line 2 'gold fish'" in w for w in s.warnings)


def test_imagenet_a_sorted_wnids_and_imagenet_indices(tmp_path):
    d = tmp_path / "imagenet-adversarial"
    write_imagenet_classnames(d / "classnames.txt")
    for w in (WNIDS[2], WNIDS[0]):
        touch(d / "imagenet-a" / w / "x.jpg")
    (d / "imagenet-a" / "README.txt").write_text("ignored")
    s = data.load_dataset("imagenet_a", tmp_path, warn=False)
    assert s.classnames == ["tench", "great white shark"] and s.imagenet_indices == [0, 2]
    assert s.train == [] and s.val == [] and [i.label for i in s.test] == [0, 1]


def test_imagenet_v2_integer_folders(tmp_path):
    d = tmp_path / "imagenetv2"
    write_imagenet_classnames(d / "classnames.txt")
    for label in (2, 0):
        touch(d / "imagenetv2-matched-frequency-format-val" / str(label) / "a.jpeg")
    s = data.load_dataset("imagenet_v2", tmp_path, warn=False)
    assert [(i.path, i.label, i.classname) for i in s.test] == [
        ("0/a.jpeg", 0, "tench"),
        ("2/a.jpeg", 2, s.classnames[2]),
    ]


# --------------------------------------------------------------------------- FGVC, LT


def test_fgvc_variant_lists(tmp_path):
    make_fgvc(tmp_path, folder="fgvc-aircraft-2013b/data")  # Candle's folder
    s = data.load_dataset("fgvc_aircraft", tmp_path, warn=False)
    assert s.folder_alias == "fgvc-aircraft-2013b/data"
    assert s.classnames == ["707-320", "A300B4", "Cessna 172"]
    assert s.train == [data.Item("1025794.jpg", 2, "Cessna 172"), data.Item("0034309.jpg", 0, "707-320"),
                       data.Item("1340192.jpg", 1, "A300B4")]  # fmt: skip
    assert (len(s.val), len(s.test)) == (1, 2)


def test_fgvc_unknown_variant_names_file_and_line(tmp_path):
    d = make_fgvc(tmp_path)
    (d / "images_variant_val.txt").write_text("2000001 A300B4\n2000002 Boeing 999\n")
    with pytest.raises(data.DataError, match=r"images_variant_val.txt:2: variant 'Boeing 999'"):
        data.load_dataset("fgvc_aircraft", tmp_path)


def test_imagenet_lt_lists(tmp_path):
    make_imagenet_lt(tmp_path)
    s = data.load_dataset("imagenet_lt", tmp_path, warn=False)
    assert s.root == tmp_path / "ImageNet_LT" and s.folder_alias == "ImageNet_LT"
    assert s.train[0] == data.Item(f"train/{WNIDS[0]}/{WNIDS[0]}_762.JPEG", 0, "tench")
    assert [i.label for i in s.test] == [0, 1] and s.classnames[2] == "great white shark"
    assert any("2 train images, published 115846" in w for w in s.warnings)


def test_lt_label_outside_classnames(tmp_path):
    d = make_imagenet_lt(tmp_path)
    (d / "ImageNet_LT_val.txt").write_text("train/x/y.JPEG 7\n")
    with pytest.raises(data.DataError, match=r"ImageNet_LT_val.txt:1: label 7, but .* lists 3 classes"):
        data.load_dataset("imagenet_lt", tmp_path)


# --------------------------------------------------------------------------- custom kinds


def test_folder_kind_generates_a_recorded_split(tmp_path):
    for c, n in (("dog", 10), ("cat", 4)):
        for i in range(n):
            touch(tmp_path / "pets" / c / f"{i}.png")
    (tmp_path / "pets" / "cat" / "notes.txt").write_text("not an image")
    s = data.load_dataset("folder", path=tmp_path / "pets", warn=False)
    assert s.classnames == ["cat", "dog"] and not s.standard_split
    assert (len(s.train), len(s.val), len(s.test)) == (2 + 5, 1 + 2, 1 + 3)
    assert "seed 1" in s.split_source
    other = data.load_dataset("folder", path=tmp_path / "pets", split_seed=2, warn=False)
    assert {i.path for i in other.train} != {i.path for i in s.train} and len(other.train) == 7
    saved = data.save_split(s, tmp_path / "split.json")
    again = data.load_dataset("folder", path=tmp_path / "pets", split_file=saved, warn=False)
    assert (again.train, again.val, again.test) == (s.train, s.val, s.test)


def test_folder_kind_with_train_test_folders(tmp_path):
    for part, c in (("train", "a"), ("train", "b"), ("test", "b"), ("test", "a")):
        touch(tmp_path / "d" / part / c / "x.jpg")
    s = data.load_dataset("folder", path=tmp_path / "d", warn=False)
    assert s.train == [data.Item("train/a/x.jpg", 0, "a"), data.Item("train/b/x.jpg", 1, "b")]
    assert s.val == [] and len(s.test) == 2


def test_csv_kind(tmp_path):
    absolute = tmp_path / "elsewhere" / "z.jpg"
    touch(absolute)
    for rel in ("img/a.jpg", "img/b.jpg", "img/c.jpg"):
        touch(tmp_path / "ds" / rel)
    (tmp_path / "ds" / "train.csv").write_text(f"path,label,classname\nimg/a.jpg,0,red_fox\n{absolute},1,owl\n")
    (tmp_path / "ds" / "test.csv").write_text("img/b.jpg,1\nimg/c.jpg,0\n")
    # the absolute row lies outside the image root: accepted only when asked for
    with pytest.raises(data.DataError, match=r"1 train path\(s\) in train.csv \+ test.csv leave the image root"):
        data.load_dataset("csv", path=tmp_path / "ds", warn=False)
    s = data.load_dataset("csv", path=tmp_path / "ds", warn=False, allow_outside_root=True)
    assert s.classnames == ["red_fox", "owl"] and s.root == tmp_path / "ds"
    assert s.train == [data.Item("img/a.jpg", 0, "red_fox"), data.Item(str(absolute), 1, "owl")]
    assert s.test[0] == data.Item("img/b.jpg", 1, "owl") and (s.root / s.train[1].path) == absolute


def test_csv_without_names_needs_classnames(tmp_path):
    (tmp_path / "train.csv").write_text("a.jpg,0\nb.jpg,1\n")
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.jpg")
    with pytest.raises(data.DataError, match=r"no class name for label\(s\) \[0, 1\]; add a third column"):
        data.load_dataset("csv", path=tmp_path / "train.csv")
    (tmp_path / "classnames.txt").write_text("apple\nbanana\n")
    with pytest.raises(data.DataError, match="class 'apple' has 1 image"):  # one CSV is split per class
        data.load_dataset("csv", path=tmp_path / "train.csv")


def test_unknown_kind_option_is_named():
    with pytest.raises(data.DataError, match=r"unknown option\(s\) \['split_seed'\]; valid .*split_file"):
        data.load_dataset("caltech101", "/nonexistent", split_seed=3)


# --------------------------------------------------------------------------- CLI


def run_cli(argv: list[str]) -> int:
    return main(argv)


def test_cli_list(capsys):
    assert run_cli(["datasets", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    row = {r["dataset"]: r for r in rows}["oxford_flowers"]
    assert row["folder"] == "oxford_flowers/" and row["also accepted"] == "flowers102/, flowers-102/"
    assert row["train/val/test"] == "4093/1633/2463"


def test_cli_check_reports_counts_and_every_missing_file(tmp_path, capsys):
    make_caltech(tmp_path, missing=("Faces/image_0002.jpg", "accordion/image_0026.jpg"))
    assert run_cli(["datasets", "check", "caltech101", "--data-root", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "2 of 27 images named by split_zhou_Caltech101.json are missing" in err
    assert "missing   Faces/image_0002.jpg" in out and "missing   accordion/image_0026.jpg" in out
    assert "classes           3        100  <- differs" in out
    assert "warning: caltech101: 3 classes, published 100" in out


def test_cli_check_ok_and_json(tmp_path, capsys):
    make_imagenet(tmp_path)
    assert run_cli(["datasets", "check", "imagenet", "--data-root", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["missing"] == 0 and report["files"] == 18
    assert report["counts"]["test"] == {"found": 6, "published": 50000}


def test_cli_check_layout_error_is_one_line(tmp_path, capsys):
    make_imagenet(tmp_path, flat_val=True)
    assert run_cli(["datasets", "check", "imagenet", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no class folders" in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_prompts(tmp_path, capsys):
    make_caltech(tmp_path)
    assert run_cli(["datasets", "prompts", "caltech101", "--data-root", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["classes"][0]["sentences"] == ["a photo of a face."]
