"""``medseg predict`` over real scanner exports: series matching, outputs, a bad series in the
batch, resuming, exit codes."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.cli import main
from medseg.io import read_image, read_seg
from tests.conftest import shared_path
from tests.test_inference_predictor import make_package


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("models") / "hippocampus-test")


def _patient_strings(folder: Path) -> set[str]:
    ds = pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True)
    values = {str(ds.get(keyword) or "") for keyword in ("PatientName", "PatientID")}
    return {v for v in values if len(v) > 2}


def test_study_export_zip_bad_file_and_other_modality(package, tmp_path, capsys):
    export = shared_path("dicom", "mr_brain_study3_export")
    crop = shared_path("dicom", "hippocampus_crop_study1")
    ct = shared_path("dicom", "ct_jpeg2000_series")
    archive = tmp_path / "crop.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(crop.iterdir()):
            zf.write(path, f"export/{path.name}")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00 not really a gzip stream")
    out = tmp_path / "out"

    code = main(
        ["predict", str(export), str(broken), str(archive), str(ct), "--model", str(package.path), "--output", str(out)]
    )
    stdout = capsys.readouterr().out
    assert code == 1  # the broken file failed; everything else went on
    lines = stdout.splitlines()
    done = [line for line in lines if line.startswith("done")]
    skipped = [line for line in lines if line.startswith("skipped")]
    failed = [line for line in lines if line.startswith("failed")]
    assert len(done) == 2 and all("HippoCrop" in line for line in done)
    fov_skips = [line for line in skipped if "field of view" in line]
    assert sorted(line.split()[1] for line in fov_skips) == ["FLAIR_reg", "T1post", "T1pre_reg", "T2_reg"]
    assert any("modality CT" in line for line in skipped)
    assert len(failed) == 1 and "broken" in failed[0]
    assert "2 segmented, 0 already done, 5 skipped, 1 failed" in stdout

    reports = sorted(out.glob("*.json"))
    assert len(reports) == 2
    names = " ".join(p.name for p in out.iterdir())
    for secret in _patient_strings(export) | _patient_strings(crop):
        assert secret not in names
        for report in reports:
            assert secret not in report.read_text()
    assert not [p for p in out.iterdir() if ".partial" in p.name]

    # the export's crop series: label map and SEG on the source grid
    source = read_image(export / "11_HCropVolume")
    stem = next(
        r.name[:-5] for r in reports if json.loads(r.read_text())["input"]["series_uid"] == source.meta["series_uid"]
    )
    nifti = nib.load(str(out / f"{stem}.nii.gz"))
    assert nifti.shape == source.shape
    np.testing.assert_allclose(nifti.affine, source.affine, atol=1e-5)
    seg = read_seg(out / f"{stem}.seg.dcm", source=source)
    assert np.array_equal(seg.array, np.asarray(nifti.dataobj))
    assert (out / f"{stem}.png").is_file()
    report = json.loads((out / f"{stem}.json").read_text())
    assert report["input"]["modality"] == "MR" and report["input"]["shape"] == list(source.shape)
    assert {"preprocess", "inference", "total"} <= set(report["timings_s"])

    # resume: nothing is recomputed, nothing rewritten
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code = main(
        [
            "predict",
            str(export),
            "--model",
            str(package.path),
            "--output",
            str(out),
            "--skip-existing",
            "--formats",
            "nifti,json",
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    assert "0 segmented, 1 already done, 4 skipped, 0 failed" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_only_requested_formats_and_nifti_input(package, tmp_path, capsys):
    image = shared_path("hippocampus", "imagesTr", "hippocampus_004.nii.gz")
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            str(image),
            "--model",
            str(package.path),
            "--output",
            str(out),
            "--formats",
            "nifti,json",
            "--overlap",
            "0.25",
        ]
    )
    assert code == 0, capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["hippocampus_004.json", "hippocampus_004.nii.gz"]
    report = json.loads((out / "hippocampus_004.json").read_text())
    assert report["settings"]["overlap"] == 0.25


def test_nothing_fits_and_bad_arguments(package, tmp_path, capsys):
    ct = shared_path("dicom", "ct_jpeg2000_series")
    assert main(["predict", str(ct), "--model", str(package.path), "--output", str(tmp_path)]) == 1
    assert "no input fits the model" in capsys.readouterr().err
    assert (
        main(["predict", str(ct), "--model", str(package.path), "--output", str(tmp_path), "--formats", "nifti,stl"])
        == 2
    )
    assert "--formats" in capsys.readouterr().err
    assert main(["predict", str(ct), "--model", str(tmp_path / "nope"), "--output", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["predict", str(ct), "--model", str(package.path), "--output", str(tmp_path), "--overlap", "1.5"]) == 2


def test_copied_series_with_a_truncated_slice_fails_alone(package, tmp_path, capsys):
    crop = shared_path("dicom", "hippocampus_crop_study1")
    copy = tmp_path / "copy"
    shutil.copytree(crop, copy)
    victim = sorted(copy.glob("*.dcm"))[5]
    victim.write_bytes(victim.read_bytes()[:400])  # header cut short: pixel data gone
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            str(copy),
            str(shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz")),
            "--model",
            str(package.path),
            "--output",
            str(out),
            "--formats",
            "json",
        ]
    )
    stdout = capsys.readouterr().out
    assert "hippocampus_001" in stdout and (out / "hippocampus_001.json").is_file()
    # a truncated slice is either dropped with a warning or fails the series; never the batch
    assert code in (0, 1)
    assert any(line.startswith("failed") for line in stdout.splitlines()) == (code == 1)
