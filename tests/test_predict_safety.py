"""``medseg predict`` never writes a silent empty result, never overwrites an input, never takes
its own outputs for input, and answers bad arguments with one line and exit code 2. Real MSD
hippocampus cases through the bundled model, rewritten in tmp_path."""

from __future__ import annotations

import hashlib
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from tests.conftest import shared_path


@pytest.fixture
def case(tmp_path):
    source = shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz")
    folder = tmp_path / "images"
    folder.mkdir()
    return shutil.copy(source, folder / "case.nii.gz")


def _with_nan(path, fraction: float):
    image = nib.load(str(path))
    array = np.asarray(image.dataobj).astype(np.float32)
    count = int(round(array.size * fraction))
    np.put(array, np.random.default_rng(0).choice(array.size, count, replace=False), np.nan)
    nib.save(nib.Nifti1Image(array, image.affine), str(path))
    return count


def test_nan_voxels_are_repaired_with_a_warning(case, tmp_path, capsys):
    count = _with_nan(case, 0.016)
    out = tmp_path / "out"
    assert main(["predict", str(case), "--model", "hippocampus", "--output", str(out)]) == 0
    report = json.loads((out / "case.json").read_text())
    assert any(f"{count} voxel(s)" in w and "NaN" in w for w in report["input"]["warnings"])
    label_map = np.asarray(nib.load(str(out / "case.nii.gz")).dataobj)
    assert (label_map > 0).sum() > 100  # not the silent empty label map of a NaN-poisoned input


def test_an_all_nan_image_fails_loudly_and_leaves_no_output_folder(case, tmp_path, capsys):
    _with_nan(case, 1.0)
    out = tmp_path / "out"
    assert main(["predict", str(case), "--model", "hippocampus", "--output", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "every voxel is NaN" in printed
    assert not out.exists()


def test_outputs_never_overwrite_an_input(case, capsys, monkeypatch):
    before = hashlib.sha256(case.read_bytes()).hexdigest()
    monkeypatch.chdir(case.parent)
    assert main(["predict", "case.nii.gz", "--model", "hippocampus", "--output", "."]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "would overwrite an input" in err
    assert hashlib.sha256(case.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in case.parent.iterdir()) == ["case.nii.gz"]


def test_an_output_folder_inside_the_input_folder_is_not_input_next_time(case, capsys):
    folder = case.parent
    out = folder / "segmentations"
    for _ in range(2):
        assert main(["predict", str(folder), "--model", "hippocampus", "--output", str(out)]) == 0
        summary = capsys.readouterr().out.splitlines()[-1]
        assert summary.startswith("1 segmented, 0 already done, 0 skipped, 0 failed"), summary


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--runtime", "tensorrt"], "--runtime tensorrt"),
        (["--overlap", "1.5"], "--overlap"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(case, tmp_path, capsys, extra, expected):
    out = tmp_path / "out"
    assert main(["predict", str(case), "--model", "hippocampus", "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err
    assert not out.exists()


def test_output_naming_an_existing_file_is_one_line(case, tmp_path, capsys):
    target = tmp_path / "taken.txt"
    target.write_text("mine")
    assert main(["predict", str(case), "--model", "hippocampus", "--output", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a folder" in err
    assert target.read_text() == "mine"
