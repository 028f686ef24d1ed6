"""The shared reader never reads a file it was not given: detached MetaImage/NRRD data only from
the header's own folder (CLI) or not at all (service policy); lying headers are refused before
their pixels are decoded; messages never carry server folders. Real images, rewritten in tmp_path."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from medseg.errors import (
    InputTooLargeError,
    MissingGeometryError,
    UnreadableFileError,
    UnsafeInputError,
    UnsupportedInputError,
    redact_paths,
)
from medseg.io import read_image
from medseg.io.safety import ReadPolicy, detached_data_files
from tests.conftest import shared_path

SERVICE = ReadPolicy(detached_data="refuse", max_voxels=10**7)


@pytest.fixture
def real_mhd(tmp_path):
    """A real hippocampus MR case as a MetaImage header + raw data pair."""
    import SimpleITK as sitk

    case = shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz")
    folder = tmp_path / "pair"
    folder.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(case)), str(folder / "case.mhd"))
    return folder / "case.mhd", case


def _rewrite_data_file(header, value: str) -> None:
    text = header.read_text()
    start = text.index("ElementDataFile")
    header.write_text(text[:start] + f"ElementDataFile = {value}\n")


def test_a_same_folder_pair_reads_like_the_original(real_mhd):
    header, case = real_mhd
    assert detached_data_files(header) == ["case.raw"]
    pair, original = read_image(header), read_image(case)
    np.testing.assert_array_equal(pair.array, original.array)
    np.testing.assert_allclose(pair.affine, original.affine, atol=1e-5)
    with pytest.raises(UnsafeInputError, match="self-contained"):
        read_image(header, policy=SERVICE)


@pytest.mark.parametrize(
    "value", ["/etc/passwd", "../pair/case.raw", "sub/case.raw", "..", "LIST", "case%03d.raw 1 3 1"]
)
def test_a_data_file_elsewhere_is_refused_before_any_read(real_mhd, value, tmp_path):
    header, _ = real_mhd
    (tmp_path / "sub").mkdir()
    _rewrite_data_file(header, value)
    with pytest.raises(UnsafeInputError) as error:
        read_image(header)
    message = str(error.value)
    assert message.startswith("case.mhd") and "\n" not in message and str(tmp_path) not in message


def test_nrrd_detached_forms(tmp_path):
    data = tmp_path / "scan.raw"
    data.write_bytes(bytes(8 * 8 * 8))
    base = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 8 8 8\nencoding: raw\n"
    good = tmp_path / "good.nhdr"
    good.write_text(base + "data file: scan.raw\n\n")
    assert read_image(good).shape == (8, 8, 8)
    for name, field in [
        ("abs.nhdr", f"data file: {data}\n"),
        ("up.nhdr", "datafile: ../x.raw\n"),
        ("list.nhdr", f"data file: LIST\n{data}\n"),
    ]:
        (tmp_path / name).write_text(base + field + ("\n" if "LIST" not in field else ""))
        with pytest.raises(UnsafeInputError):
            read_image(tmp_path / name)
    with pytest.raises(UnsafeInputError):
        read_image(good, policy=SERVICE)


def test_cli_gives_one_line_and_exit_2_for_a_detached_header(real_mhd, capsys, tmp_path):
    from medseg.cli import main

    header, _ = real_mhd
    _rewrite_data_file(header, "/etc/passwd")
    out = tmp_path / "out" / "case.nii.gz"
    assert main(["convert", str(header), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "case.mhd" in err and "/etc/passwd" not in err
    assert not out.exists()


def test_a_lying_gzip_header_is_refused_without_decoding(tmp_path):
    import nibabel as nib

    real = nib.load(str(shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz")))
    header = real.header.copy()
    header.set_data_shape((1000, 1000, 400))
    header.set_data_dtype(np.float32)
    liar = tmp_path / "liar.nii.gz"
    liar.write_bytes(gzip.compress(header.binaryblock + bytes(4) + bytes(4096)))
    with pytest.raises(UnreadableFileError, match="truncated"):
        read_image(liar)
    with pytest.raises(InputTooLargeError, match="400000000 voxels"):
        read_image(liar, policy=SERVICE)
    truncated = tmp_path / "cut.nii"
    raw = nib.Nifti1Image(np.asarray(real.dataobj), real.affine)
    nib.save(raw, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(UnreadableFileError, match="truncated|cannot read"):
        read_image(truncated)


def test_singular_affine_and_rgb_are_refused_with_one_line(tmp_path):
    import nibabel as nib

    real = nib.load(str(shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz")))
    array = np.asarray(real.dataobj).astype(np.float32)
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(np.float32)
    header["sform_code"], header["qform_code"], header["vox_offset"] = 1, 0, 352
    singular = tmp_path / "zero.nii"
    singular.write_bytes(header.binaryblock + bytes(4) + array.tobytes(order="F"))
    with pytest.raises(MissingGeometryError, match="zero.nii"):
        read_image(singular)
    rgb = np.zeros(array.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = array.astype(np.uint8)
    nib.save(nib.Nifti1Image(rgb, real.affine), str(tmp_path / "rgb.nii.gz"))
    with pytest.raises(UnsupportedInputError, match="RGB"):
        read_image(tmp_path / "rgb.nii.gz")


def test_messages_never_carry_absolute_paths():
    assert (
        redact_paths("cannot read /srv/medseg/incoming/ab12/00000.mha (ITK: /etc/passwd)")
        == "cannot read 00000.mha (ITK: passwd)"
    )
    assert redact_paths("spacing 0.7/1.5 mm, ratio 3/4") == "spacing 0.7/1.5 mm, ratio 3/4"
    error = UnreadableFileError("/data/jobs/x/input/scan.nii.gz: truncated")
    assert str(error) == "scan.nii.gz: truncated"
