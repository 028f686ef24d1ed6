"""The runtime benchmarks run: ``benchmarks/runtimes.py`` prints a row per network, and
``benchmarks/ct_package.py`` writes a CT package that ``medseg predict`` runs on the shared CT."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED_DATA, shared_path

pytestmark = pytest.mark.timeout(300)


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        MEDSEG_SHARED_DATA=str(SHARED_DATA),
        MEDSEG_CACHE=str(tmp_path / "cache"),
    )
    return env


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_runtimes_benchmark_prints_a_row_with_its_runtime_and_equal_labels(tmp_path):
    shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz")
    pytest.importorskip("openvino")
    command = [sys.executable, "benchmarks/runtimes.py", "--networks", "unet", "--cases", "1", "--repeat", "1"]
    result = subprocess.run(
        command, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| network | config |"))
    rows = [line for line in lines if line.startswith("| unet | unet |")]
    assert len(rows) == 1, result.stdout
    row = dict(zip(_cells(header), _cells(rows[0]), strict=True))
    assert row["runtime (auto)"] == "openvino", row
    assert row["fallback reason"] == "-", row
    assert re.fullmatch(r"\d+\.\d+ %", row["labels equal (min over cases)"]), row
    assert float(row["labels equal (min over cases)"].split()[0]) >= 99.9, row
    assert "random weights" in result.stdout.lower()


def test_ct_package_is_predicted_by_medseg_on_the_ct(tmp_path):
    ct = shared_path("ct_mr_multilabel", "example_ct_sm.nii.gz")
    pytest.importorskip("openvino")
    medseg = shutil.which("medseg", path=str(Path(sys.executable).parent)) or shutil.which("medseg")
    if medseg is None:
        pytest.skip("the medseg command is not installed (pip install -e .)")
    env = _env(tmp_path)
    package = tmp_path / "ct_unet"
    # the script's options at a smaller width (its default 32..320 takes ~30 s to convert here)
    write = [sys.executable, "benchmarks/ct_package.py", str(package), "--image", str(ct), "--filters", "8,16,32,64,80"]
    result = subprocess.run(write, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(result.stdout)
    assert written["spacing"] == [3.0, 3.0, 3.0] and written["patch_size"] == [96, 96, 32]
    assert written["normalization"]["scheme"] == "ct" and written["normalization"]["clip"] == [-1000.0, 1000.0]
    assert (package / written["openvino_ir"][0]).is_file()
    card = json.loads((package / "configs" / "metadata.json").read_text())["medseg"]
    assert card["network"]["name"] == "unet" and card["network"]["config"]["out_channels"] == 4
    assert (package / "configs" / "inference.json").is_file()  # the MONAI bundle runner can run it too

    out = tmp_path / "out"
    predict = [medseg, "predict", str(ct), "--model", str(package), "--output", str(out), "--formats", "nifti,json"]
    result = subprocess.run(predict, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "example_ct_sm.json").read_text())
    assert report["settings"]["runtime"] == "openvino" and not report["settings"]["runtime_fallback"]
    assert report["settings"]["model_grid"]["resampled"] is False  # the card's spacing is the CT's own
    import nibabel as nib

    labels = nib.load(str(out / "example_ct_sm.nii.gz"))
    assert labels.shape == (122, 101, 30)
