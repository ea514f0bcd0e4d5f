import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewclip import methods
from fewclip.cli.main import main
from fewclip.features import bundle as bio

FIT_KEYS = {"method", "test_accuracy", "val_accuracy", "hyperparameters", "fit_seconds", "predict_seconds", "bundle"}


@pytest.fixture()
def bundle_file(tmp_path, bundle):
    return str(bio.save(bundle, tmp_path / "b.safetensors"))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fit_json_contract(capsys, bundle_file, bundle, tmp_path):
    model_path = tmp_path / "m.safetensors"
    code, out, _ = run(
        capsys,
        "fit",
        bundle_file,
        "--method",
        "tip-adapter",
        "--set",
        "search_step=[10,5]",
        "--save-model",
        model_path,
        "--json",
    )
    assert code == 0
    result = json.loads(out)  # exactly one JSON object on stdout
    assert FIT_KEYS <= set(result)
    assert result["bundle"] == {"classes": 10, "shots": 8, "dim": 64, "views": 4}
    assert result["hyperparameters"]["search_step"] == [10, 5]
    assert set(result["hyperparameters"]) >= {"alpha", "beta"}
    assert 0 <= result["val_accuracy"] <= 100 and 0 <= result["test_accuracy"] <= 100
    # the reported accuracy is the saved model's accuracy on the bundle's test split
    from fewclip.methods import load

    model = load(model_path)
    assert result["test_accuracy"] == pytest.approx(model.score(bundle.test_features, bundle.test_labels))
    assert result["hyperparameters"]["alpha"] == model.alpha_


def test_fit_json_without_val_and_selection_none(capsys, tmp_path, bundle):
    from dataclasses import replace

    path = bio.save(replace(bundle, val_features=None, val_labels=None), tmp_path / "noval.safetensors")
    code, _, err = run(capsys, "fit", path, "--method", "ape")
    assert code == 2 and "selection='none'" in err and "validation" in err
    code, out, _ = run(capsys, "fit", path, "--method", "ape", "--selection", "none", "--json")
    result = json.loads(out)
    assert result["val_accuracy"] is None and result["hyperparameters"]["alpha"] == 1.0


def test_fit_preset_and_readable_output(capsys, bundle_file):
    code, out, _ = run(capsys, "fit", bundle_file, "--method", "ape", "--preset", "dtd", "--set", "search_step=[8,4,2]")
    assert code == 0
    assert "preset dtd" in out and "test accuracy" in out and "channels_used=25" in out  # 400 of 1024 -> 25 of 64


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--method", "nope"],
            "unknown method 'nope'; available: ape, ape-t, candle, clip-adapter, clip-ft, flier, gda, linear-probe, "
            "tip-adapter, tip-adapter-f, zero-shot",
        ),
        (["--method", "ape", "--preset", "mnist"], "unknown preset 'mnist'; valid presets: caltech101"),
        (["--method", "ape", "--set", "beta=3"], "unknown hyperparameter(s) ['beta']; valid:"),
        (["--method", "ape", "--set", "oops"], "--set expects KEY=VALUE"),
    ],
)
def test_fit_errors_list_valid_choices(capsys, bundle_file, argv, message):
    code, out, err = run(capsys, "fit", bundle_file, *argv)
    assert code == 2 and out == ""
    assert message in err


def test_fit_missing_bundle_is_one_line_error(capsys, tmp_path):
    code, _, err = run(capsys, "fit", tmp_path / "none.safetensors", "--method", "ape")
    assert code == 2 and "none.safetensors: no such bundle file" in err and "Traceback" not in err


def test_bundle_info(capsys, bundle_file):
    code, out, _ = run(capsys, "bundle", "info", bundle_file, "--json")
    info = json.loads(out)
    assert info["tensors"]["support_features"] == [4, 80, 64] and info["shots"] == 8 and info["val"] == 40
    code, out, _ = run(capsys, "bundle", "info", bundle_file)
    assert "8 per class" in out and "dataset = synthetic" in out


def test_bundle_import_cli(capsys, tmp_path):
    d = tmp_path / "caches"
    d.mkdir()
    keys = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    torch.save(keys.T.half(), d / "keys_2shots.pt")
    torch.save(torch.nn.functional.one_hot(torch.tensor([1, 1, 0, 0, 2, 2]), 3).half(), d / "values_2shots.pt")
    torch.save(torch.nn.functional.normalize(torch.randn(5, 4), dim=1).half(), d / "val_f.pt")
    torch.save(torch.tensor([0, 1, 2, 0, 1]), d / "val_l.pt")
    torch.save(torch.nn.functional.normalize(torch.randn(4, 3), dim=0), d / "text_weights_cupl_t.pt")
    out_path = tmp_path / "imported.safetensors"
    code, out, _ = run(
        capsys, "bundle", "import", d, "--from", "ape", "--shots", 2, "--out", out_path, "--backbone", "RN50"
    )
    assert code == 0 and "--selection none" in out
    b = bio.load(out_path)
    assert b.support_labels.tolist() == [0, 0, 1, 1, 2, 2] and not b.has_val and b.metadata["backbone"] == "RN50"


def test_methods_list(capsys):
    code, out, _ = run(capsys, "methods", "list")
    assert code == 0 and "ape\n" in out and "presets: caltech101" in out
    assert "clip-ft\n  fitted on: images" in out and "zero-shot\n  fitted on: features" in out


def _console_script(*argv: str) -> subprocess.CompletedProcess:
    # the console script that `pip install` put beside this interpreter (the README's install)
    exe = Path(sys.executable).parent / "fewclip"
    assert exe.is_file(), f"{exe} missing: install the project as the README says (pip install -e .)"
    return subprocess.run(
        [str(exe), *argv], capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""}
    )


@pytest.mark.slow
def test_demo_console_script_runs_offline_from_images():
    """The console script the README's install puts on PATH, on the smallest setting (CI also runs the default)."""
    proc = _console_script("demo", "--classes", "3", "--shots", "1", "2", "--seeds", "1", "--views", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "1-shot" in proc.stdout and "2-shot" in proc.stdout and "loaded back by path" in proc.stdout
    for name in methods.list_methods():
        assert sum(line.startswith(name + " ") for line in lines) == 2, name  # summary row and 2-shot detail row


def test_demo_bundle_reports_what_fit_reports_on_the_same_bundle(capsys, tmp_path):
    assert main(["demo", "--bundle", "--classes", "4", "--shots", "4", "--dim", "16", "--out", str(tmp_path)]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    features = [m for m in methods.list_methods() if methods.get_class(m).inputs == "features"]
    assert all(name in rows for name in features) and "clip-ft" not in rows  # image methods need images
    code, out, _ = run(capsys, "fit", tmp_path / "demo_bundle.safetensors", "--method", "gda", "--json")
    assert code == 0 and f"{json.loads(out)['test_accuracy']:.2f}" == rows["gda"][-2]  # the demo's test accuracy
