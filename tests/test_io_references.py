"""Geometry and voxel data checked against independent references on real data.

- dcm2niix's NIfTI output (dcm_qa_ts, dcm_qa_nih ``Ref/``): same world geometry and voxels.
  dcm2niix flips rows and may reverse slices, so both sides are reoriented to the closest RAS+
  canonical orientation with nibabel before comparing (affine to 1e-3 mm, voxels exactly).
- TotalSegmentator's segmentation of the JPEG 2000 CT series: written on the same physical grid.
- SimpleITK's own origin / spacing / direction for a MetaImage file.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.io import find_series, read_image, write_nifti
from tests.conftest import shared_path


def _canonical(array, affine):
    image = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array), affine))
    return np.asanyarray(image.dataobj), image.affine


def _assert_same_world(image, reference_path):
    reference = nib.load(reference_path)
    ours, our_affine = _canonical(image.array, image.affine)
    theirs, their_affine = _canonical(np.asanyarray(reference.dataobj), reference.affine)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(our_affine, their_affine, atol=1e-3)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("number", range(1, 10))
def test_every_transfer_syntax_decodes_to_the_dcm2niix_mosaic_volume(number):
    """dcm_qa_ts: one Siemens mosaic in nine transfer syntaxes (explicit/implicit/big endian,
    RLE, JPEG lossless, JPEG-LS, JPEG 2000); de-tiled to 64x64x35 exactly as dcm2niix."""
    image = read_image(shared_path("dicom", "dcm_qa_ts", "In", f"{number}.dcm"))
    assert image.shape == (64, 64, 35)
    assert image.meta["dicom_layout"] == "mosaic"
    _assert_same_world(image, shared_path("dicom", "dcm_qa_ts", "Ref", f"{number}.nii"))


def test_same_series_in_nine_files_is_deduplicated():
    image = read_image(shared_path("dicom", "dcm_qa_ts", "In"))
    assert image.shape == (64, 64, 35) and image.array.ndim == 3
    assert any("duplicate" in warning for warning in image.warnings)
    _assert_same_world(image, shared_path("dicom", "dcm_qa_ts", "Ref", "1.nii"))


@pytest.mark.parametrize(
    "folder, reference",
    [
        ("20180918GE/mr_0004", "DCM2NIIX_regression_test_4.nii"),  # GE, interleaved, 150 files
        ("20180918GE/mr_0007", "DCM2NIIX_regression_test_7.nii"),  # GE, sequential S->I
        ("20180918Si/mr_0003", "EPI_PE=AP_3.nii"),  # Siemens mosaic time series
        ("20180918Si/mr_0005", "EPI_PE=RL_5.nii"),
    ],
)
def test_multi_volume_epi_matches_dcm2niix(folder, reference):
    [info] = find_series(shared_path("dicom", "dcm_qa_nih", "In", *folder.split("/")))
    image = info.read()
    assert image.array.ndim == 4 and image.meta["volumes"] == image.array.shape[3]
    _assert_same_world(image, shared_path("dicom", "dcm_qa_nih", "Ref", reference))


def test_jpeg2000_ct_on_the_grid_of_the_totalsegmentator_reference():
    image = read_image(shared_path("dicom", "ct_jpeg2000_series"))
    reference = nib.load(shared_path("dicom", "ct_jpeg2000_series_reference_seg.nii.gz"))
    assert image.shape == reference.shape
    ours, our_affine = _canonical(image.array, image.affine)
    _, their_affine = _canonical(np.zeros(reference.shape, np.uint8), reference.affine)
    np.testing.assert_allclose(our_affine, their_affine, atol=1e-3)
    assert image.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))


def test_metaimage_geometry_matches_simpleitk(tmp_path):
    path = shared_path("vessels", "aorta_angiography", "aorta.mha")
    image = read_image(path)
    itk = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(image.array, sitk.GetArrayFromImage(itk).transpose(2, 1, 0))
    assert image.spacing == pytest.approx(itk.GetSpacing())
    lps_origin = np.array(itk.GetOrigin())
    np.testing.assert_allclose(image.origin, lps_origin * [-1, -1, 1])
    direction = np.array(itk.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(image.direction, np.diag([-1, -1, 1]) @ direction, atol=1e-9)
    # world position of the last voxel agrees with ITK's own index -> physical point
    last = [s - 1 for s in itk.GetSize()]
    expected = np.array(itk.TransformIndexToPhysicalPoint(last)) * [-1, -1, 1]
    np.testing.assert_allclose((image.affine @ [*last, 1])[:3], expected, atol=1e-6)
    # NRRD written by SimpleITK reads back to the same image; NIfTI round trip keeps it too
    sitk.WriteImage(itk, str(tmp_path / "aorta.nrrd"))
    nrrd = read_image(tmp_path / "aorta.nrrd")
    np.testing.assert_array_equal(nrrd.array, image.array)
    np.testing.assert_allclose(nrrd.affine, image.affine, atol=1e-9)
    nifti = read_image(write_nifti(image, tmp_path / "aorta.nii.gz"))
    np.testing.assert_allclose(nifti.affine, image.affine, atol=1e-6)
