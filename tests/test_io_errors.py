"""Bad input gives one typed, one-line error naming the file or series; archives are checked
before extraction. Every corrupt input is made in tmp_path from real files."""

from __future__ import annotations

import gc
import os
import stat
import zipfile
from pathlib import Path

import pydicom
import pytest

import medseg.io.archive as archive
from medseg.errors import MedsegError, MissingGeometryError, NoImageDataError, UnreadableFileError, UnsafeArchiveError
from medseg.io import find_series, read_image
from tests.conftest import shared_path

HIPPO = ("dicom", "hippocampus_crop_study1")


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


@pytest.fixture
def private_tmpdir(tmp_path, monkeypatch):
    """Route tempfile to a folder we can inspect for leftovers."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _zip_folder(folder: Path, target: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(folder.iterdir()):
            handle.write(path, prefix + path.name)
    return target


def test_zip_of_a_series_reads_like_the_folder_and_is_cleaned_up(tmp_path, private_tmpdir):
    folder = shared_path(*HIPPO)
    expected = read_image(folder)
    image = read_image(_zip_folder(folder, tmp_path / "study.zip", prefix="export/DICOM/"))
    assert (image.array == expected.array).all()
    assert (image.affine == expected.affine).all()
    extracted = Path(image.dicom_source[0])
    assert extracted.is_file()  # kept alive for DICOM SEG while the image lives
    labels = image.with_array(image.array > 0)
    del image
    gc.collect()
    assert extracted.is_file()  # the label map shares the source list
    del labels
    gc.collect()
    assert not extracted.exists()
    assert list(private_tmpdir.iterdir()) == []


@pytest.mark.parametrize(
    "bad_name", ["../evil.dcm", "/tmp/evil.dcm", "a/../../evil.dcm", "C:\\evil.dcm", "..\\evil.dcm"]
)
def test_path_traversal_names_are_refused_before_extraction(tmp_path, private_tmpdir, bad_name):
    real = next(shared_path(*HIPPO).iterdir())
    target = tmp_path / "evil.zip"
    with zipfile.ZipFile(target, "w") as handle:
        handle.write(real, "fine.dcm")
        handle.writestr(bad_name, real.read_bytes())
    with pytest.raises(UnsafeArchiveError) as error:
        find_series(target)
    assert "evil.zip" in _one_line(error)
    assert list(private_tmpdir.iterdir()) == []
    assert not (tmp_path.parent / "evil.dcm").exists()


def test_symlink_entries_are_refused(tmp_path, private_tmpdir):
    target = tmp_path / "link.zip"
    with zipfile.ZipFile(target, "w") as handle:
        info = zipfile.ZipInfo("link.dcm")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        handle.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError):
        read_image(target)
    assert list(private_tmpdir.iterdir()) == []


def test_zip_bomb_of_zeros_is_refused(tmp_path, private_tmpdir):
    target = tmp_path / "bomb.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("zeros.dcm", bytes(16 * 1024 * 1024))
    assert target.stat().st_size < 100_000
    with pytest.raises(UnsafeArchiveError) as error:
        read_image(target)
    assert "ratio" in _one_line(error)
    assert list(private_tmpdir.iterdir()) == []


def test_total_size_limit_is_a_configurable_module_constant(tmp_path, monkeypatch):
    target = _zip_folder(shared_path(*HIPPO), tmp_path / "study.zip")
    monkeypatch.setattr(archive, "MAX_UNCOMPRESSED_BYTES", 10_000)
    with pytest.raises(UnsafeArchiveError) as error:
        read_image(target)
    assert "size" in _one_line(error)


def test_not_a_zip_and_garbage_files(tmp_path):
    garbage = os.urandom(4096)
    for name in ("fake.zip", "fake.nii.gz", "fake.mha", "fake.dcm", "noextension"):
        (tmp_path / name).write_bytes(garbage)
        with pytest.raises(UnreadableFileError) as error:
            read_image(tmp_path / name)
        assert name in _one_line(error)
    with pytest.raises(UnreadableFileError):
        read_image(tmp_path / "does-not-exist.dcm")


def test_truncated_dicom_file(tmp_path):
    real = sorted(shared_path(*HIPPO).iterdir())[0]
    data = real.read_bytes()
    (tmp_path / "half.dcm").write_bytes(data[: len(data) - 1000])  # pixel data cut short
    with pytest.raises(UnreadableFileError) as error:
        read_image(tmp_path / "half.dcm")
    assert "half.dcm" in _one_line(error)
    (tmp_path / "head.dcm").write_bytes(data[:300])  # cut inside the header
    with pytest.raises(UnreadableFileError) as error:
        read_image(tmp_path / "head.dcm")
    assert "head.dcm" in _one_line(error)


def test_truncated_slice_inside_a_series_names_the_file(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    for path in shared_path(*HIPPO).iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    data = (folder / "12.dcm").read_bytes()
    (folder / "12.dcm").write_bytes(data[:-500])
    with pytest.raises(UnreadableFileError) as error:
        read_image(folder)
    assert "12.dcm" in _one_line(error)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "README.txt").write_text("not an image")
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(NoImageDataError) as error:
        read_image(tmp_path)
    _one_line(error)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoImageDataError):
        find_series(empty)
    with pytest.raises(NoImageDataError):  # a structured report only
        read_image(shared_path("dicom", "seg_examples", "data", "test_files", "sr_document.dcm"))


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry_tags(tmp_path, keyword):
    folder = tmp_path / "series"
    folder.mkdir()
    for path in shared_path(*HIPPO).iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    ds = pydicom.dcmread(folder / "9.dcm")
    delattr(ds, keyword)
    ds.save_as(folder / "9.dcm")
    with pytest.raises(MissingGeometryError) as error:
        read_image(folder)
    message = _one_line(error)
    assert "9.dcm" in message and keyword in message


def test_errors_never_carry_patient_identifiers(tmp_path):
    real = sorted(shared_path("dicom", "dcm_qa_nih", "In", "20180918Si", "mr_0003").glob("*.dcm"))[0]
    ds = pydicom.dcmread(real)
    assert str(ds.PatientName)
    delattr(ds, "PixelSpacing")
    ds.save_as(tmp_path / "x.dcm")
    with pytest.raises(MedsegError) as error:
        read_image(tmp_path / "x.dcm")
    assert str(ds.PatientName) not in str(error.value)
    assert str(ds.PatientID) not in str(error.value)
