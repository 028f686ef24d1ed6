"""DICOM series reading on real scanner exports: grouping, sorting, geometry, rescaling."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from medseg.errors import MixedSeriesError
from medseg.io import find_series, read_image
from tests.conftest import shared_path


def _lps_affine_from_header(path):
    """Independent voxel -> LPS affine of one slice from its own header (i = column index)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * col_spacing
    affine[:3, 1] = iop[3:] * row_spacing
    affine[:3, 3] = np.array(ds.ImagePositionPatient, dtype=float)
    return affine


def test_hippocampus_crop_series_geometry_and_pixels():
    folder = shared_path("dicom", "hippocampus_crop_study1")
    [info] = find_series(folder)
    assert info.modality == "MR" and info.instance_count == 32
    image = info.read()
    assert image.shape == (35, 51, 32)
    assert image.spacing == pytest.approx((1.0, 1.0, 1.0))
    # every slice's pixels and position come from the file named in dicom_source
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    for k, path in enumerate(image.dicom_source):
        ds = pydicom.dcmread(path)
        np.testing.assert_array_equal(image.array[:, :, k], ds.pixel_array.T)
        header = lps_to_ras @ _lps_affine_from_header(path)
        np.testing.assert_allclose(image.affine[:, :2], header[:, :2], atol=1e-6)
        np.testing.assert_allclose(image.affine @ [0, 0, k, 1], header[:, 3], atol=1e-4)
    meta = image.meta
    assert meta["series_uid"] == info.uid and meta["instance_count"] == 32
    assert {"modality", "study_uid", "series_description", "series_number", "manufacturer",
            "source"} <= set(meta)
    assert not {"patient_name", "patient_id", "PatientName", "PatientID"} & set(meta)


def test_slices_sorted_by_position_not_instance_number_or_name():
    folder = shared_path("dicom", "hippocampus_crop_study1")
    image = read_image(folder)
    z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
         for p in image.dicom_source]
    assert z == sorted(z) and len(set(z)) == len(z)
    names = [p.rsplit("/", 1)[1] for p in image.dicom_source]
    assert names != sorted(names)  # "10.dcm" sorts before "2.dcm": order is not by name


def test_study_export_groups_by_series_uid_and_uses_gapped_spacing():
    folder = shared_path("dicom", "mr_brain_study3_export")
    series = find_series(folder)
    assert len(series) == 5
    assert len({s.uid for s in series}) == 5
    descriptions = {s.description for s in series}
    assert {"T1post", "T1pre_reg", "FLAIR_reg", "T2_reg", "HippoCrop"} == descriptions
    t2 = next(s for s in series if s.description == "T2_reg")
    image = t2.read()
    assert image.shape == (280, 320, 22)
    # 5 mm slices every 6.5 mm: the affine uses the 6.5 mm spacing between slice positions
    assert image.spacing == pytest.approx((0.6875, 0.6875, 6.5), abs=1e-4)
    first = pydicom.dcmread(image.dicom_source[0], stop_before_pixels=True)
    last = pydicom.dcmread(image.dicom_source[-1], stop_before_pixels=True)
    lps = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(image.affine[:3, 3], lps @ np.array(first.ImagePositionPatient,
                                                                   dtype=float), atol=1e-4)
    np.testing.assert_allclose(image.affine @ [0, 0, 21, 1],
                               [*(lps @ np.array(last.ImagePositionPatient, dtype=float)), 1],
                               atol=1e-3)
    assert image.warnings == []


def test_several_series_without_choice_is_a_mixed_series_error():
    folder = shared_path("dicom", "mr_brain_study3_export")
    with pytest.raises(MixedSeriesError) as error:
        read_image(folder)
    message = str(error.value)
    assert "\n" not in message
    for info in find_series(folder):
        assert info.uid in message
    chosen = find_series(folder)[0]
    assert read_image(folder, series_uid=chosen.uid).meta["series_uid"] == chosen.uid


def test_ct_rescale_gives_hounsfield_units():
    folder = shared_path("dicom", "ct_jpeg2000_series")
    image = read_image(folder)
    first = pydicom.dcmread(image.dicom_source[0])
    slope, intercept = float(first.RescaleSlope), float(first.RescaleIntercept)
    assert intercept == -1024
    np.testing.assert_array_equal(image.array[:, :, 0],
                                  first.pixel_array.T.astype(np.int32) * slope + intercept)
    assert image.array.min() < -900  # air
    assert image.meta["modality"] == "CT"
