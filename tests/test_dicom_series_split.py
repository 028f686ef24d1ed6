"""Multi-volume ordering, echo/phase/derived splitting and ``.dcm.gz`` inputs, on copies of
real scanner exports rewritten with pydicom."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medseg.io import find_series, read_image
from medseg.io.reader import choose_series
from tests.conftest import shared_path

#: GE axial EPI fMRI: 150 single-frame files, 15 slices x 10 volumes, AcquisitionNumber 1.
GE_EPI = ("dicom", "dcm_qa_nih", "In", "20180918GE", "mr_0004")


def _copy(tmp_path: Path, name: str, edit) -> Path:
    """Copies of the GE EPI series with ``edit(ds, volume, slice)`` applied to each file."""
    source = shared_path(*GE_EPI)
    folder = tmp_path / name
    folder.mkdir()
    for path in sorted(source.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        index = int(ds.InstanceNumber) - 1
        edit(ds, index // 15, index % 15)
        ds.save_as(folder / path.name)
    return folder


@pytest.fixture(scope="module")
def reference():
    return read_image(shared_path(*GE_EPI))


def test_reference_is_a_10_volume_series(reference):
    assert reference.array.shape == (64, 64, 15, 10)


def test_acquisition_number_varying_within_a_volume_keeps_volumes_apart(tmp_path, reference):
    def perturb(ds, volume, slice_):  # Philips-like: numbered per slice group, not per volume
        ds.AcquisitionNumber = (slice_ * 3 + 7 * (9 - volume)) % 10 + 1

    image = read_image(_copy(tmp_path, "perturbed", perturb))
    np.testing.assert_array_equal(image.array, reference.array)
    np.testing.assert_allclose(image.affine, reference.affine)


def test_diffusion_direction_defines_the_volume(tmp_path, reference):
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(10, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)

    def diffusion(ds, volume, slice_):
        ds.DiffusionBValue = 0.0 if volume == 0 else 1000.0
        ds.DiffusionGradientOrientation = [float(v) for v in (directions[volume] if volume else (0, 0, 0))]
        ds.AcquisitionNumber = (slice_ * 5 + volume * 3) % 7 + 1
        # instance numbers scrambled within each slice position: only the gradient is reliable
        ds.InstanceNumber = 1 + slice_ * 10 + (volume * 7 + slice_) % 10

    image = read_image(_copy(tmp_path, "dwi", diffusion))
    assert image.array.shape == reference.array.shape
    # each output volume is one whole input volume (order may follow first appearance)
    for t in range(10):
        matches = [u for u in range(10) if np.array_equal(image.array[..., t], reference.array[..., u])]
        assert len(matches) == 1, f"volume {t} mixes slices of several volumes"


def _two_echoes(ds, volume, slice_):
    """Volumes 0-4 become echo 1 (TE 30), volumes 5-9 echo 2 (TE 60) of one series."""
    echo = 1 if volume < 5 else 2
    ds.EchoNumbers = echo
    ds.EchoTime = 30.0 * echo


def test_two_echoes_become_two_series(tmp_path, reference):
    folder = _copy(tmp_path, "echoes", _two_echoes)
    series = find_series(folder)
    uid = str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
    assert [s.uid for s in series] == [uid, uid + ".e2"]
    assert all(any("split by echo: 2 echoes" in w for w in s.warnings) for s in series)
    first = choose_series(series, uid, "echoes").read()
    second = choose_series(series, uid + ".e2", "echoes").read()
    np.testing.assert_array_equal(first.array, reference.array[..., :5])
    np.testing.assert_array_equal(second.array, reference.array[..., 5:])
    assert first.meta["series_uid"] == uid and second.meta["series_part"] == uid + ".e2"


def test_phase_and_derived_images_are_split_off(tmp_path, reference):
    def kinds(ds, volume, slice_):
        if volume == 8:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "P", "ND"]
        elif volume == 9:
            ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"]

    series = {s.uid: s for s in find_series(_copy(tmp_path, "kinds", kinds))}
    uid = min(series, key=len)
    assert set(series) == {uid, uid + ".ph", uid + ".derived"}
    main, phase, derived = (series[uid + suffix].read() for suffix in ("", ".ph", ".derived"))
    assert any("split by image type: magnitude, phase, derived" in w for w in main.warnings)
    np.testing.assert_array_equal(main.array, reference.array[..., :8])
    np.testing.assert_array_equal(phase.array, reference.array[..., 8])
    np.testing.assert_array_equal(derived.array, reference.array[..., 9])


def test_gzipped_dicom_files_are_read(tmp_path, reference):
    folder = tmp_path / "gz"
    folder.mkdir()
    for path in sorted(shared_path(*GE_EPI).glob("*.dcm")):
        with path.open("rb") as source, gzip.open(folder / (path.name + ".gz"), "wb") as sink:
            shutil.copyfileobj(source, sink)
    before = sorted(p.name for p in folder.iterdir())
    image = read_image(folder)
    np.testing.assert_array_equal(image.array, reference.array)
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written beside input
    single = read_image(folder / before[0])
    np.testing.assert_array_equal(single.array, reference.array[:, :, :1, 0])


def test_gzip_bomb_is_refused(tmp_path, monkeypatch):
    from medseg.errors import UnsafeArchiveError
    from medseg.io import reader

    path = tmp_path / "bomb.dcm.gz"
    with gzip.open(path, "wb") as sink:  # a DICOM preamble, then 4 MiB of zeros
        sink.write(b"\0" * 128 + b"DICM" + b"\0" * (4 * 1024**2))
    with pytest.raises(UnsafeArchiveError, match="compression ratio"):
        find_series(tmp_path)
    monkeypatch.setattr(reader, "MAX_GZIP_BYTES", 1024)
    with pytest.raises(UnsafeArchiveError, match="more than 1024 bytes"):
        find_series(path)


def test_medseg_info_reports_the_echo_split(tmp_path, capsys):
    from medseg.cli import main

    folder = _copy(tmp_path, "echoes", _two_echoes)
    assert main(["info", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "warning: split by echo: 2 echoes" in text
    assert text.count("shape: (64, 64, 15, 5)") == 2 and ".e2\n" in text
