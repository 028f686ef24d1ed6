"""What a new user hits first: ``medseg --help`` is fast (no heavy import) and every command follows
one exit-code convention (0 ok, 1 part of a batch failed, 2 usage error or bad input), documented in
the top-level help; :func:`medseg.cli.main` returns the code and never raises ``SystemExit``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from medseg.cli import EXIT_CODES, main

HEAVY = (
    "torch",
    "monai",
    "numpy",
    "SimpleITK",
    "nibabel",
    "scipy",
    "pydicom",
    "highdicom",
    "fastapi",
    "sqlalchemy",
    "uvicorn",
)

_PROBE = """
import contextlib, io, json, sys
from medseg.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _imported_by(*argv: str) -> tuple[int, set[str]]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    return probe["code"], {name.split(".")[0] for name in probe["modules"]}


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["predict", "--help"],
        ["serve", "--help"],
        ["train", "--help"],
        ["models", "--help"],
        ["evaluate", "--help"],
        ["--version"],
    ],
)
def test_help_imports_nothing_heavy(argv):
    code, modules = _imported_by(*argv)
    assert code == 0
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_importtime_of_help_lists_no_heavy_module():
    """The same through the real entry point, as ``python -X importtime -m medseg --help``."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "medseg", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: medseg" in result.stdout
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "medseg" in imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_top_level_help_documents_the_exit_codes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert EXIT_CODES in out
    for code in ("0 ", "1 ", "2 "):
        assert f"\n  {code}" in out


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no command
        ["no-such-command"],
        ["predict"],  # missing INPUT, --model, --output
        ["predict", "x.nii.gz", "--model", "hippocampus", "--output", "out", "--no-such-flag"],
        ["plan", "dataset", "--folds", "three"],  # not an int
        ["keys", "create"],  # --role required
        ["train", "configs/hippocampus/unet.yaml", "training.epochs=1", "--fold", "abc"],  # train's own parser
    ],
)
def test_usage_errors_return_2_without_raising(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: medseg" in err and "error:" in err and "Traceback" not in err


def test_bad_input_returns_2_with_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medseg info: error:")


def test_version_returns_0(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip().startswith("medseg ")


def test_usage_error_exit_status_of_the_process_is_2():
    result = subprocess.run(
        [sys.executable, "-m", "medseg", "predict"], capture_output=True, text=True, timeout=120, cwd=REPO, check=False
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_predict_with_a_shipped_openvino_model_imports_neither_torch_nor_monai(tmp_path):
    """Speed (issue 20): ``medseg predict`` with the bundled model runs on the shipped OpenVINO
    model, verified against its stored reference output, so the process never pays for
    ``import torch`` (2 s here) or ``import monai`` (1.6 s more); its outputs are all written."""
    sample = REPO / "medseg" / "samples" / "hippocampus_mr"
    code, modules = _imported_by("predict", str(sample), "--model", "hippocampus", "--output", str(tmp_path))
    assert code == 0
    assert not {"torch", "monai"} & modules
    assert {p.suffix for p in tmp_path.iterdir()} >= {".gz", ".dcm", ".png", ".json"}
