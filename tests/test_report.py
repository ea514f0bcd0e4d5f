"""`fewclip report`: tables against hand-computed means, population stds and harmonic means on hand-written result
files in the real format; the 11-dataset average; base/new/HM and many/medium/few; published numbers (every one with
a source) side by side; plots written and opened; the HTML page self-contained; the CSV round-trips; corrupt and
foreign JSON files reported by name."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree

import pytest

from fewclip.cli.main import main
from fewclip.errors import ResultsError
from fewclip.protocols import report as R
from fewclip.protocols.plots import require_matplotlib
from fewclip.protocols.published import load_published, parse_published, published_backbone, published_notes
from fewclip.protocols.report_doc import write_report

RN50 = "RN50-openai"


def record(
    dataset: str,
    method: str,
    shots: int,
    seed: int,
    accuracy: float | dict,
    *,
    protocol: str = "fewshot",
    backbone: str = RN50,
    model: str = "RN50",
    pretrained: str | None = "openai",
    ece: float | None = 5.0,
    selection: str = "val",
    selection_used: str | None = "val",
    preset: str | None = None,
    test_tuned: bool = False,
    target: str | None = None,
) -> dict:
    """A finished result as fewclip run writes it (the fields the report reads, and the usual others)."""
    acc = accuracy if isinstance(accuracy, dict) else {"test_accuracy": accuracy, "test_mean_per_class": accuracy}
    return {
        "format": "fewclip-result/1",
        "protocol": protocol,
        "backbone": backbone,
        "test_tuned": test_tuned,
        "status": "ok",
        "protocol_params": {},
        "config_sha256": f"sha-{dataset}-{method}-{shots}-{seed}",
        "setup": {"protocol": protocol, "dataset": dataset, "model": model, "pretrained": pretrained,
                  "backend": "open_clip", "val_kind": "fewshot", "method": method, "shots": shots, "seed": seed},
        "dataset": dataset,
        "target": target,
        "method": method,
        "shots": shots,
        "seed": seed,
        "preset": preset,
        "overrides": {},
        "selection": selection,
        "selection_used": selection_used,
        "episode": {"sampler": "dassl", "val_kind": "fewshot"},
        "hyperparameters": {},
        "accuracy": {**acc, "val_accuracy": 50.0},
        "calibration": {"temperature": 1.5, "source": "val", "val_ece_before": 3.0, "val_ece_after": 1.0,
                        "test_ece_before": None if ece is None else ece + 1.0, "test_ece_after": ece},
        "seconds": {"fit": 0.5, "predict": 0.01},
        "created": "2026-11-30T05:00:00+0000",
        "run_id": "20261130T050000-00000000",
    }  # fmt: skip


def write(root: Path, rec: dict) -> Path:
    folder = root / rec["dataset"] / rec["backbone"] / rec["protocol"]
    if rec.get("target"):
        folder = folder / rec["target"]
    path = folder / rec["method"] / f"shots_{rec['shots']}-seed_{rec['seed']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1))
    return path


def summaries(root: Path) -> list[R.Summary]:
    return R.summarize_rows(R.collect_results([root]).rows)


def one(items, **where):
    found = [s for s in items if all(getattr(s, k) == v for k, v in where.items())]
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------------------- means, stds, HMs by hand


def test_seed_mean_population_std_and_ece_by_hand(tmp_path):
    for seed, acc, ece in [(1, 70.0, 2.0), (2, 72.0, 4.0), (3, 77.0, 6.0)]:
        write(tmp_path, record("caltech101", "gda", 16, seed, acc, ece=ece))
    s = one(summaries(tmp_path), method="gda")
    # mean 73; population std sqrt((9 + 1 + 16) / 3) = sqrt(26 / 3), not the sample std sqrt(26 / 2)
    assert s.means["test_accuracy"] == pytest.approx(73.0)
    assert s.stds["test_accuracy"] == pytest.approx(math.sqrt(26 / 3))
    assert (s.seeds, s.n, s.ece, s.ece_before) == ([1, 2, 3], 3, pytest.approx(4.0), pytest.approx(5.0))
    files = write_report([tmp_path], tmp_path / "report", plots=False)
    md = files.markdown.read_text()
    assert "| Caltech101 | gda | val (fewshot) | 16 | 73.00 ± 2.94 | 3 | 4.00 |" in md


def test_eleven_dataset_average_by_hand_and_a_partial_average_labelled(tmp_path):
    # dataset i scores 50 + i at seed 1 and 52 + i at seed 2: dataset means 51 + i, per-seed averages 55 and 57
    for i, dataset in enumerate(R.STANDARD_DATASETS):
        for seed, acc in [(1, 50.0 + i), (2, 52.0 + i)]:
            write(tmp_path, record(dataset, "tip-adapter", 4, seed, acc, ece=float(i)))
    write(tmp_path, record("my_folder_dataset", "tip-adapter", 4, 1, 0.0))  # a 12th dataset stays out of the 11
    write(tmp_path, record("my_folder_dataset", "tip-adapter", 4, 2, 0.0))
    avg = one(R.average_summaries(summaries(tmp_path)), method="tip-adapter")
    assert R.is_eleven(avg) and avg.datasets == list(R.STANDARD_DATASETS)
    assert avg.means["test_accuracy"] == pytest.approx(sum(51.0 + i for i in range(11)) / 11)  # = 56
    assert avg.values["test_accuracy"] == {1: pytest.approx(55.0), 2: pytest.approx(57.0)}
    assert avg.stds["test_accuracy"] == pytest.approx(1.0)  # population std of (55, 57)
    assert avg.ece == pytest.approx(5.0)  # mean of 0 ... 10
    assert R.average_label(avg) == "Average (11 datasets)"
    md = write_report([tmp_path], tmp_path / "report", plots=False).markdown.read_text()
    assert "| Average (11 datasets) | tip-adapter | val (fewshot) | 4 | 56.00 ± 1.00 | 2 | 5.00 |" in md

    partial = tmp_path / "partial"
    for dataset, accs in [("dtd", (40.0, 44.0)), ("eurosat", (60.0, 70.0))]:
        for seed, acc in zip((1, 2), accs):
            write(partial, record(dataset, "tip-adapter", 4, seed, acc))
    avg = one(R.average_summaries(summaries(partial)), method="tip-adapter")
    assert not R.is_eleven(avg) and avg.means["test_accuracy"] == pytest.approx(53.5)  # (42 + 65) / 2
    assert avg.stds["test_accuracy"] == pytest.approx(3.5)  # per-seed averages 50 and 57
    assert R.average_label(avg) == "Average of 2 datasets (not the 11): dtd, eurosat"


def test_average_over_datasets_with_different_seeds_has_no_std(tmp_path):
    write(tmp_path, record("dtd", "gda", 1, 1, 40.0))
    write(tmp_path, record("dtd", "gda", 1, 2, 50.0))
    write(tmp_path, record("eurosat", "gda", 1, 1, 70.0))
    avg = one(R.average_summaries(summaries(tmp_path)), method="gda")
    assert avg.means["test_accuracy"] == pytest.approx((45.0 + 70.0) / 2) and avg.stds["test_accuracy"] is None


def test_base_to_new_hm_of_the_seed_means_and_of_the_dataset_means(tmp_path):
    cases = {  # dataset: [(seed, base, new)]
        "dtd": [(1, 80.0, 40.0), (2, 60.0, 80.0)],  # means 70, 60; the mean of per-seed HMs would be 60.95
        "eurosat": [(1, 90.0, 50.0), (2, 90.0, 50.0)],
    }
    for dataset, rows in cases.items():
        for seed, b, n in rows:
            acc = {"base": b, "new": n, "harmonic_mean": -1.0, "base_all_classes": b - 20, "new_all_classes": n - 20,
                   "all_classes_harmonic_mean": -1.0}  # fmt: skip
            write(tmp_path, record(dataset, "zero-shot", 16, seed, acc, protocol="base2new"))
    items = summaries(tmp_path)
    dtd = one(items, dataset="dtd")
    assert (dtd.means["base"], dtd.stds["base"], dtd.means["new"], dtd.stds["new"]) == (70.0, 10.0, 60.0, 20.0)
    assert dtd.hm() == pytest.approx(2 * 70 * 60 / 130)  # 64.62
    assert dtd.hm("base_all_classes", "new_all_classes") == pytest.approx(2 * 50 * 40 / 90)  # 44.44
    avg = one(R.average_summaries(items), method="zero-shot")
    # the average row: base and new averaged over datasets (80, 55), the HM of those
    assert (avg.means["base"], avg.means["new"]) == (pytest.approx(80.0), pytest.approx(55.0))
    assert avg.hm() == pytest.approx(2 * 80 * 55 / 135)
    md = write_report([tmp_path], tmp_path / "report", plots=False).markdown.read_text()
    assert "| DescribableTextures | zero-shot | val (fewshot) | 16 | 70.00 ± 10.00 | 60.00 ± 20.00 | 64.62 |" in md
    assert f"| 80.00 ± 5.00 | 55.00 ± 10.00 | {2 * 80 * 55 / 135:.2f} |" in md  # per-seed averages: 85/75, 45/65


def test_longtail_many_medium_few_and_the_whole_list(tmp_path):
    for seed, (overall, many, medium, few) in [(1, (60.0, 70.0, 55.0, 30.0)), (2, (62.0, 72.0, 57.0, 40.0))]:
        acc = {"test_accuracy": overall, "many": many, "medium": medium, "few": few}
        write(tmp_path, record("imagenet_lt", "gda", 0, seed, acc, protocol="longtail"))
    s = one(summaries(tmp_path), method="gda")
    assert (s.means["few"], s.stds["few"], s.means["many"]) == (35.0, 5.0, 71.0)
    md = write_report([tmp_path], tmp_path / "report", plots=False).markdown.read_text()
    assert "| dataset | method | selected on | cap | overall | many | medium | few | seeds | ECE |" in md
    assert "| gda | val (fewshot) | all | 61.00 ± 1.00 | 71.00 ± 1.00 | 56.00 ± 1.00 | 35.00 ± 5.00 | 2 |" in md
    assert "Average" not in md.split("## RN50-openai · longtail")[1]  # no average over long-tailed sets


def test_transfer_rows_name_source_and_target(tmp_path):
    write(tmp_path, record("imagenet", "gda", 16, 1, 61.0, protocol="transfer", target="imagenet_v2"))
    md = write_report([tmp_path], tmp_path / "report", plots=False).markdown.read_text()
    assert "| ImageNet → ImageNetV2 | gda | val (fewshot) | 16 | 61.00 ± 0.00 | 1 | 5.00 |" in md
    assert "Average" not in md  # no average over transfer targets


# --------------------------------------------------------------------------- selection: never mixed


def test_selected_on_labels_and_test_tuned_results_are_never_averaged_with_honest_ones(tmp_path):
    assert R.selected_on({"selection_used": "val", "val_kind": "full"}) == "val (full)"
    assert R.selected_on({"selection_used": "cv"}) == "cv"
    assert R.selected_on({"selection_used": "none", "preset": "imagenet"}) == "none, preset imagenet"
    assert R.selected_on({"selection": "val", "selection_used": "none"}) == "none"  # zero-shot: nothing to choose
    assert R.selected_on({"selection": "val"}) == "val"  # a result written before selection_used was recorded
    assert R.selected_on({"selection_used": "val", "test_tuned": True}) == "test-tuned"
    write(tmp_path, record("dtd", "tip-adapter", 16, 1, 60.0))
    write(tmp_path / "paper", record("dtd", "tip-adapter", 16, 1, 70.0, test_tuned=True))
    items = R.summarize_rows(R.collect_results([tmp_path]).rows)
    assert sorted((s.selected_on, s.means["test_accuracy"]) for s in items) == [
        ("test-tuned", 70.0),
        ("val (fewshot)", 60.0),
    ]


def test_per_dataset_presets_group_across_datasets(tmp_path):
    # --preset paper gives each dataset its own preset: one variant "[per-dataset]" averaged over datasets
    for dataset, acc in [("dtd", 60.0), ("eurosat", 80.0)]:
        write(tmp_path, record(dataset, "tip-adapter", 16, 1, acc, selection="none", selection_used="none",
                               preset=dataset))  # fmt: skip
    avg = one(R.average_summaries(summaries(tmp_path)), method="tip-adapter")
    assert avg.name == "tip-adapter [per-dataset]" and avg.means["test_accuracy"] == 70.0
    assert avg.selected_on == "none, preset per-dataset"
    assert R.selected_on({"selection_used": "none", "preset": "imagenet", "dataset": "dtd"}) == "none, preset imagenet"


# --------------------------------------------------------------------------- published numbers


def test_published_files_load_and_every_number_has_its_source():
    numbers = load_published(include_unconfirmed=True)
    assert len(numbers) > 300
    for p in numbers:
        assert p.source.strip() and p.spec.strip() and p.published_selection.strip()
        assert p.status in ("confirmed", "approximate", "unconfirmed") and 0 < p.value <= 100
        assert ".md" in p.spec  # the spec section it was taken from
    methods = {p.method for p in numbers}
    wanted = {"zero-shot", "tip-adapter", "tip-adapter-f", "ape", "ape-t", "gda", "clip-adapter", "coop", "lp++",
              "proker", "clip-lora"}  # fmt: skip
    assert wanted <= methods
    notes = published_notes()
    for method in ("linear-probe", "clap", "flier", "candle"):  # no quotable number: the file says why
        assert method not in methods and notes[method].startswith("No number")

    def value(method, backbone, dataset, shots, source_part, key="test_accuracy"):
        found = [p for p in numbers if (p.method, p.backbone, p.dataset, p.shots, p.key) ==
                 (method, backbone, dataset, shots, key) and source_part in p.source]  # fmt: skip
        assert len(found) == 1, found
        return found[0]

    # spot checks against the specs' tables
    assert value("gda", "RN50", "average", 16, "ICLR24").value == 76.05
    assert value("tip-adapter", "RN50", "average", 1, "exp.log").value == 62.33
    assert value("ape", "RN50", "caltech101", 16, "APE_results").value == 92.49
    assert value("zero-shot", "RN50", "average", None, "APE_results").value == 58.53
    assert value("gda", "ViT-B/16", "average", 16, "base2new", key="harmonic_mean").value == 78.97
    assert value("clip-lora", "ViT-B/16", "average", 16, "CLIP-SVD").value == 82.89
    lpp = value("lp++", "RN50", "average", 16, "recollection")
    assert lpp.status == "unconfirmed" and lpp.value == 74.42
    assert lpp not in load_published()  # unconfirmed numbers are left out unless asked


def test_a_published_number_without_a_source_is_refused_by_name():
    entry = {
        "backbone": "RN50",
        "protocol": "fewshot",
        "dataset": "dtd",
        "shots": [1],
        "values": {"test_accuracy": [50.0]},
        "source": "",
        "kind": "log",
        "spec": "x.md",
        "status": "confirmed",
        "published_selection": "val",
    }
    doc = {"format": "fewclip-published/1", "method": "m", "entries": [entry]}
    with pytest.raises(ResultsError, match=r"bad\.json, entry 0: 'source'"):
        parse_published("bad.json", json.dumps(doc))
    entry.update(source="a log", values={"test_accuracy": [50.0, 60.0]})
    with pytest.raises(ResultsError, match="1 number"):
        parse_published("bad.json", json.dumps(doc))


def test_published_backbone_names():
    assert published_backbone("RN50", "openai") == "RN50"
    assert published_backbone("ViT-B-16", "openai") == "ViT-B/16"
    assert published_backbone("ViT-B/16", "openai") == "ViT-B/16"
    assert published_backbone("openai/clip-vit-base-patch16", None) == "ViT-B/16"
    assert published_backbone("ViT-B-16", "laion2b_s34b_b88k") is None  # not the weights the papers used
    assert published_backbone("local-dir:/m", None, {"local-dir-m": "RN50"}, "local-dir-m") == "RN50"


def test_ours_beside_published_with_the_difference(tmp_path):
    # GDA RN50 on the 11 datasets at 16 shots: every dataset 70 (seed 1) and 72 (seed 2) -> average 71 ± 1
    for dataset in R.STANDARD_DATASETS:
        write(tmp_path, record(dataset, "gda", 16, 1, 70.0))
        write(tmp_path, record(dataset, "gda", 16, 2, 72.0))
    md = write_report([tmp_path], tmp_path / "report", plots=False).markdown.read_text()
    part = md.split("### Published numbers side by side")[1]
    # GDA's logs: 76.05 (11-dataset mean) and 63.82 (ImageNet) at 16 shots
    assert (
        "| Average (11 datasets) | gda | val (fewshot) | 16 | top-1 | 71.00 ± 1.00 (2 seeds) | 76.05 | -5.05 |" in part
    )
    assert "| ImageNet | gda | val (fewshot) | 16 | top-1 | 71.00 ± 1.00 (2 seeds) | 63.82 | +7.18 |" in part
    assert "mrflogs/ICLR24" in part and "confirmed" in part
    assert "Published numbers of methods not in these results" in part and "APE-T" in part  # references
    # RN50 few-shot has unconfirmed published numbers (LP++'s): left out, and the note says how to show them
    assert "unconfirmed published number(s) for RN50 left out (--include-unconfirmed shows them, marked)" in part
    assert "(unconfirmed)" not in part
    # not compared: another backbone, or a partial average
    other = tmp_path / "vit-laion"
    write(other, record("dtd", "gda", 16, 1, 50.0, backbone="ViT-B-16-laion", model="ViT-B-16", pretrained="laion"))
    md = write_report([other], other / "report", plots=False).markdown.read_text()
    assert "nothing is compared" in md and "--published-as ViT-B-16-laion=RN50" in md
    md = write_report([other], other / "report", plots=False, published=False).markdown.read_text()
    assert "Published numbers" not in md


# --------------------------------------------------------------------------- files: CSV, plots, HTML


def _fewshot_grid(root: Path) -> None:
    for dataset in ("dtd", "eurosat"):
        for method, base in (("zero-shot", 40.0), ("tip-adapter", 50.0)):
            for shots in (1, 2, 4):
                for seed in (1, 2, 3):
                    write(root, record(dataset, method, shots, seed, base + shots + seed))


def test_csv_round_trips(tmp_path):
    _fewshot_grid(tmp_path)
    write(tmp_path, record("dtd", "gda", 16, 1, 60.0, ece=None, preset="dtd", target=None))
    files = write_report([tmp_path], tmp_path / "report", plots=False)
    rows = R.read_csv(files.csv)
    assert rows == files.collection.rows and len(rows) == 2 * 2 * 3 * 3 + 1
    gda = next(r for r in rows if r["method"] == "gda")
    assert gda["test_ece_after"] is None and gda["test_tuned"] is False and gda["seed"] == 1
    assert gda["path"].endswith("gda/shots_16-seed_1.json") and gda["selected_on"] == "val (fewshot)"
    assert list(rows[0])[: len(R.CSV_COLUMNS)] == list(R.CSV_COLUMNS)


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    """A 2-dataset, 2-method, 3-shot, 3-seed grid reported with plots and the HTML page (once for the module)."""
    root = tmp_path_factory.mktemp("plotted")
    _fewshot_grid(root)
    return root, write_report([root], root / "report", html_page=True)


def test_plots_are_written_opened_and_sized(plotted):
    Image = pytest.importorskip("PIL.Image")
    tmp_path, files = plotted
    names = sorted(p.relative_to(tmp_path / "report").as_posix() for p in files.plots)
    assert names == [f"plots/{RN50}/fewshot/{n}" for n in
                     ("average.png", "average.svg", "dtd.png", "dtd.svg", "eurosat.png", "eurosat.svg")]  # fmt: skip
    for path in files.plots:
        assert path.stat().st_size > 5000
        if path.suffix == ".png":
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:
                assert image.size == (768, 480) and image.format == "PNG"
        else:
            root = ElementTree.parse(path).getroot()
            assert root.tag.endswith("svg") and len(list(root.iter())) > 50
    assert f"![DescribableTextures, {RN50}" in files.markdown.read_text()


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [(tag, k, v or "") for k, v in attrs if k in ("src", "href", "srcset", "data", "action")]


def test_html_page_is_self_contained(plotted):
    _, files = plotted
    text = files.html.read_text()
    parser = _Refs()
    parser.feed(text)
    assert parser.refs and all(tag == "img" and k == "src" and v.startswith("data:image/png;base64,")
                               for tag, k, v in parser.refs)  # fmt: skip
    assert len(parser.refs) == 3 and parser.tags.count("table") >= 2  # 2 datasets + the average
    assert "url(" not in text and "@import" not in text and "<script" not in text and "<link" not in text


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(ResultsError, match=r"pip install 'fewclip\[report\]'"):
        require_matplotlib()
    _fewshot_grid(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "pip install 'fewclip[report]'" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--no-plots"]) == 0  # tables and CSV need no matplotlib
    assert (tmp_path / "report" / "report.md").is_file()


# --------------------------------------------------------------------------- what is not a result


def test_corrupt_foreign_and_failed_files_are_reported_by_name_not_raised(tmp_path, capsys):
    write(tmp_path, record("dtd", "gda", 1, 1, 55.0))
    bad = tmp_path / "dtd" / RN50 / "fewshot" / "gda"
    (bad / "shots_2-seed_1.json").write_text('{"format": "fewclip-result/1", "method": ')  # cut off
    (bad / "notes.json").write_text(json.dumps(["a", "list"]))
    (bad / "other.json").write_text(json.dumps({"format": "someone-else/3"}))
    (bad / "future.json").write_text(json.dumps({"format": "fewclip-result/2"}))
    (bad / "noshots.json").write_text(json.dumps({**record("dtd", "gda", 1, 9, 1.0), "shots": "many"}))
    (bad / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    failed = {
        **record("dtd", "gda", 4, 1, 0.0),
        "status": "failed",
        "error": {"type": "MethodError", "message": "boom"},
    }
    del failed["accuracy"]
    write(tmp_path, failed)
    (tmp_path / "dtd" / RN50 / "fewshot" / "summary.json").write_text(json.dumps({"format": "fewclip-summary/1"}))
    episodes = tmp_path / "dtd" / "episodes" / "fewshot"
    episodes.mkdir(parents=True)
    (episodes / "dtd_k1_s1.json").write_text(json.dumps({"train": [], "meta": {"format": "fewclip-episode/1"}}))

    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    err = capsys.readouterr().err
    for name in ("shots_2-seed_1.json", "notes.json", "other.json", "future.json", "noshots.json", "binary.json"):
        assert f"{bad / name}:" in err
    assert "summary.json" not in err and "dtd_k1_s1.json" not in err  # fewclip's own other files: not results
    assert "fewclip-result/2" in err and "shots" in err and "MethodError: boom" in err
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Files skipped" in md and "other.json" in md and "## Failed results" in md
    assert "| DescribableTextures | gda | val (fewshot) | 1 | 55.00 ± 0.00 | 1 |" in md


def test_no_results_and_missing_folders_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--no-plots"]) == 2
    assert "no fewclip results under" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere"), "--no-plots"]) == 2
    assert "no such results folder" in capsys.readouterr().err
    write(tmp_path / "r", record("dtd", "gda", 1, 1, 55.0))
    assert main(["report", str(tmp_path / "r"), "--no-plots", "--backbone", RN50, "ViT-B-16-openai"]) == 2
    assert "--backbone ViT-B-16-openai: no results of that backbone" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "r"), "--no-plots", "--backbone", RN50]) == 0
    assert main(["report", str(tmp_path / "r"), "--no-plots", "--published-as", f"{RN50}=RN-50"]) == 2
    assert "--published-as: no published numbers for RN-50; valid: RN101, RN50, ViT-B/16" in capsys.readouterr().err


def test_two_folders_with_the_same_cell_keep_the_first(tmp_path):
    first = write(tmp_path / "a", record("dtd", "gda", 1, 1, 55.0))
    second = write(tmp_path / "b", record("dtd", "gda", 1, 1, 99.0))
    c = R.collect_results([tmp_path / "a", tmp_path / "b"])
    assert [r["test_accuracy"] for r in c.rows] == [55.0] and c.duplicates == [(str(second), str(first))]


def test_report_reads_json_only_torch_is_not_imported(tmp_path):
    write(tmp_path, record("dtd", "gda", 1, 1, 55.0))
    code = (
        "import sys\n"
        "from fewclip.cli.main import main\n"
        f"assert main(['report', {str(tmp_path)!r}, '--no-plots', '--html']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "report" / "report.html").is_file()


def test_format_and_dataset_constants_match_the_rest_of_fewclip():
    from fewclip.data.registry import list_datasets
    from fewclip.protocols.results import RESULT_FORMAT

    assert R.RESULT_FORMAT == RESULT_FORMAT
    assert list(R.STANDARD_DATASETS) == list_datasets()[:11]


@pytest.mark.slow
def test_report_of_a_real_run(tmp_path, capsys):
    """fewclip run on generated images with a tiny model, then fewclip report on its folder: one CSV row per finished
    result file, the selection each result records, the tables' means equal the result files', the failed cells (GDA
    at 1 shot with 1 view: one support vector per class) listed with their error."""
    from conftest import make_pets
    from fewclip.models.tiny import save_tiny_openclip

    tiny = save_tiny_openclip(tmp_path / "model", "vit", name="fewclip-test-report-vit", seed=0)
    data_root = make_pets(tmp_path / "data", 4, 2, 3, size=32)
    out = tmp_path / "results"
    argv = ["run", "--dataset", "oxford_pets", "--data-root", str(data_root), "--model", f"local-dir:{tiny.folder}",
            "--views", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress",
            "--shots", "1", "2", "--seeds", "1", "2", "--method", "zero-shot", "gda"]  # fmt: skip
    with pytest.warns(Warning):  # the 3-class dataset is not the published OxfordPets
        assert main(argv) == 1  # the two 1-shot GDA cells fail
    files = sorted(out.rglob("shots_*-seed_*.json"))
    assert len(files) == 2 * 2 * 2
    capsys.readouterr()
    assert main(["report", str(out), "--no-plots", "--html"]) == 0
    err = capsys.readouterr().err
    failed = [f for f in files if "gda/shots_1-" in str(f)]
    assert all(f"failed result {f}: MethodError" in err for f in failed)
    rows = R.read_csv(out / "report" / "results.csv")
    assert sorted(r["path"] for r in rows) == sorted(str(f) for f in files if f not in failed)
    used = {r["method"]: (r["selection_used"], r["selected_on"]) for r in rows}
    assert used == {"zero-shot": ("none", "none"), "gda": ("val", "val (fewshot)")}
    for r in rows:
        saved = json.loads(Path(r["path"]).read_text())
        assert r["test_accuracy"] == saved["accuracy"]["test_accuracy"]
        assert r["test_ece_after"] == saved["calibration"]["test_ece_after"]
    gda = [r["test_accuracy"] for r in rows if r["method"] == "gda" and r["shots"] == 2]
    mean, std = R.mean_std(gda)
    md = (out / "report" / "report.md").read_text()
    assert f"| OxfordPets | gda | val (fewshot) | 2 | {mean:.2f} ± {std:.2f} | 2 |" in md
    assert "local-dir-model is not an OpenAI CLIP model" in md


def test_unconfirmed_numbers_only_when_asked_and_marked(tmp_path):
    for dataset in R.STANDARD_DATASETS:
        write(tmp_path, record(dataset, "lp++", 16, 1, 74.0))
    md = write_report([tmp_path], tmp_path / "report", plots=False).markdown.read_text()
    assert "74.42" not in md and "unconfirmed published number(s) for RN50 left out" in md
    md = write_report([tmp_path], tmp_path / "report", plots=False, include_unconfirmed=True).markdown.read_text()
    row = "| Average (11 datasets) | lp++ | val (fewshot) | 16 | top-1 | 74.00 ± 0.00 (1 seed) | 74.42 (unconfirmed) |"
    assert f"{row} -0.42 |" in md
    assert "recollection" in md  # its source says what it is


def test_base_to_new_and_shot_independent_published_numbers(tmp_path):
    vit = dict(backbone="ViT-B-16-openai", model="ViT-B-16", pretrained="openai", protocol="base2new")
    for dataset in R.STANDARD_DATASETS:
        acc = {"base": 70.0, "new": 74.0, "base_all_classes": 60.0, "new_all_classes": 50.0}
        write(tmp_path, record(dataset, "zero-shot", 16, 1, acc, selection_used="none", **vit))
    for shots in (1, 2):  # zero-shot's published number holds for every shot count: compared once
        write(tmp_path, record("imagenet", "zero-shot", shots, 1, 60.0, selection_used="none"))
    md = write_report([tmp_path], tmp_path / "report", plots=False).markdown.read_text()
    b2n = md.split("## ViT-B-16-openai · base2new")[1]
    # CLIP zero-shot, ViT-B/16, base-to-new 11-dataset means: 69.34 / 74.22 / HM 71.70
    assert "| Average (11 datasets) | zero-shot | none | 16 | base | 70.00 ± 0.00 (1 seed) | 69.34 | +0.66 |" in b2n
    assert "| Average (11 datasets) | zero-shot | none | 16 | new | 74.00 ± 0.00 (1 seed) | 74.22 | -0.22 |" in b2n
    hm = 2 * 70 * 74 / 144
    assert (
        f"| Average (11 datasets) | zero-shot | none | 16 | HM | {hm:.2f} (1 seed) | 71.70 | {hm - 71.70:+.2f} |" in b2n
    )
    few = md.split("## RN50-openai · fewshot")[1]
    rows = [line for line in few.splitlines() if line.startswith("| ImageNet | zero-shot | none |") and "top-1" in line]
    assert [line.split(" | ")[3] for line in rows] == ["1", "1"]  # APE notebook 60.31, Tip-Adapter exp.log 60.32
    assert "| 60.31 | -0.31 |" in rows[0] + rows[1] and "| 60.32 | -0.32 |" in rows[0] + rows[1]


def test_published_as_compares_openai_weights_loaded_from_a_file(tmp_path):
    local = dict(backbone="local-dir-rn50", model="local-dir:/models/rn50", pretrained=None)
    write(tmp_path, record("imagenet", "gda", 16, 1, 63.0, **local))
    md = write_report([tmp_path], tmp_path / "report", plots=False).markdown.read_text()
    assert "nothing is compared" in md
    assert main(["report", str(tmp_path), "--no-plots", "--published-as", "local-dir-rn50=RN50"]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Compared as CLIP RN50" in md and "| ImageNet | gda | val (fewshot) | 16 | top-1 |" in md
    assert "| 63.82 | -0.82 |" in md


def test_results_of_different_setups_are_never_averaged_and_their_rows_say_how(tmp_path):
    # the same method, dataset and shots, seeds 1 and 2, but seed 2 ran with one view instead of two
    for seed, views, acc in [(1, 2, 60.0), (2, 1, 70.0)]:
        rec = record("dtd", "tip-adapter", 16, seed, acc)
        rec["setup"]["views"] = views
        write(tmp_path, rec)
    write(tmp_path, record("dtd", "zero-shot", 16, 1, 40.0))
    items = summaries(tmp_path)
    tips = sorted((s.name, s.n, s.means["test_accuracy"]) for s in items if s.method == "tip-adapter")
    assert tips == [("tip-adapter <views=1>", 1, 70.0), ("tip-adapter <views=2>", 1, 60.0)]
    assert one(items, method="zero-shot").name == "zero-shot"  # one setup: no tag
    md = write_report([tmp_path], tmp_path / "report", plots=False).markdown.read_text()
    assert "tip-adapter <views=2>" in md and "tip-adapter <views=1>" in md
    # the same setup in a second dataset: one variant, averaged; a different split within a dataset is told apart
    for seed in (1, 2):
        rec = record("eurosat", "gda", 16, seed, 50.0 + seed)
        rec["setup"]["split_sha256"] = f"split-{seed}"
        write(tmp_path, rec)
        write(tmp_path, record("dtd", "gda", 16, seed, 60.0))
    gda = [s for s in summaries(tmp_path) if s.method == "gda"]
    assert sorted(s.name for s in gda if s.dataset == "dtd") == ["gda"]
    assert sorted(s.name for s in gda if s.dataset == "eurosat") == ["gda <split_sha256=split-1>",
                                                                     "gda <split_sha256=split-2>"]  # fmt: skip
