"""``medseg info`` and ``medseg convert`` on real scanner exports."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np

from medseg.cli import main
from medseg.io import find_series, read_image
from tests.conftest import shared_path


def test_info_json_lists_every_series_with_geometry(capsys):
    folder = shared_path("dicom", "mr_brain_study3_export")
    assert main(["info", str(folder), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert len(listing) == 5
    t2 = next(entry for entry in listing if entry["description"] == "T2_reg")
    assert t2["modality"] == "MR" and t2["instance_count"] == 22
    assert t2["shape"] == [280, 320, 22]
    assert np.allclose(t2["spacing"], [0.6875, 0.6875, 6.5], atol=1e-4)
    assert np.allclose(t2["affine"], read_image(folder, series_uid=t2["uid"]).affine, atol=1e-6)
    assert {entry["uid"] for entry in listing} == {s.uid for s in find_series(folder)}


def test_info_text_shows_warnings(capsys):
    assert main(["info", str(shared_path("dicom", "dcm_qa_ct_gantry_tilt", "In"))]) == 0
    out = capsys.readouterr().out
    assert "CT" in out and "spacing" in out and "warning: resampled" in out


def test_convert_writes_the_chosen_series(tmp_path, capsys):
    folder = shared_path("dicom", "mr_brain_study3_export")
    uid = next(s.uid for s in find_series(folder) if s.description == "FLAIR_reg")
    out = tmp_path / "flair.nii.gz"
    assert main(["convert", str(folder), str(out), "--series", uid]) == 0
    saved = nib.load(out)
    expected = read_image(folder, series_uid=uid)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), expected.array)
    np.testing.assert_allclose(saved.affine, expected.affine, atol=1e-6)
    assert "wrote" in capsys.readouterr().out


def test_convert_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    folder = shared_path("dicom", "mr_brain_study3_export")
    out = tmp_path / "out.nii.gz"
    assert main(["convert", str(folder), str(out)]) == 2  # five series, none chosen
    err = capsys.readouterr().err.strip()
    assert err.startswith("medseg convert: error:") and "\n" not in err and "Traceback" not in err
    assert main(["convert", str(folder), str(out), "--series", "1.2.3.4"]) == 2
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00not dicom" * 100)
    assert main(["convert", str(garbage), str(out)]) == 2
    assert main(["convert", str(shared_path("dicom", "hippocampus_crop_study1")), str(tmp_path / "out.png")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.dcm"]


def test_medseg_info_subprocess_on_a_real_folder():
    folder = shared_path("dicom", "hippocampus_crop_study1")
    result = subprocess.run(
        [sys.executable, "-m", "medseg", "info", str(folder), "--json"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    [entry] = json.loads(result.stdout)
    assert entry["shape"] == [35, 51, 32] and entry["instance_count"] == 32
