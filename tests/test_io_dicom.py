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
    assert {"modality", "study_uid", "series_description", "series_number", "manufacturer", "source"} <= set(meta)
    assert not {"patient_name", "patient_id", "PatientName", "PatientID"} & set(meta)


def test_slices_sorted_by_position_not_instance_number_or_name():
    folder = shared_path("dicom", "hippocampus_crop_study1")
    image = read_image(folder)
    z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in image.dicom_source]
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
    np.testing.assert_allclose(image.affine[:3, 3], lps @ np.array(first.ImagePositionPatient, dtype=float), atol=1e-4)
    np.testing.assert_allclose(
        image.affine @ [0, 0, 21, 1], [*(lps @ np.array(last.ImagePositionPatient, dtype=float)), 1], atol=1e-3
    )
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
    np.testing.assert_array_equal(image.array[:, :, 0], first.pixel_array.T.astype(np.int32) * slope + intercept)
    assert image.array.min() < -900  # air
    assert image.meta["modality"] == "CT"


def _copy_series(source_folder, target):
    target.mkdir()
    for path in sorted(source_folder.iterdir()):
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_localizer_other_orientation_and_duplicate_slices_are_skipped(tmp_path):
    folder = _copy_series(shared_path("dicom", "hippocampus_crop_study1"), tmp_path / "study")
    reference = read_image(shared_path("dicom", "hippocampus_crop_study1"))
    uid = reference.meta["series_uid"]
    # a real slice of another (oblique) series filed under this series' UID, as a scout would be
    oblique = next(
        p for p in sorted(shared_path("dicom", "mr_brain_study3_export").rglob("*.dcm")) if "T1post" in str(p)
    )
    ds = pydicom.dcmread(oblique)
    ds.SeriesInstanceUID = uid
    ds.save_as(folder / "zz_scout.dcm")
    # a slice flagged LOCALIZER
    ds = pydicom.dcmread(folder / "3.dcm")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.ImagePositionPatient = [0, 0, 100]
    ds.save_as(folder / "zz_localizer.dcm")
    # a duplicate of a slice under another file name and SOP Instance UID
    ds = pydicom.dcmread(folder / "7.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "copy_of_7.dcm")

    [info] = find_series(folder)
    assert info.instance_count == 33  # 32 + the duplicate; scout and localizer skipped
    joined = " ".join(info.warnings)
    assert "localizer" in joined and "orientation" in joined
    image = info.read()
    assert any("duplicate" in w for w in image.warnings)
    np.testing.assert_array_equal(image.array, reference.array)
    np.testing.assert_allclose(image.affine, reference.affine)


def test_non_image_objects_are_skipped():
    folder = shared_path("dicom", "seg_examples", "data", "test_files")
    series = find_series(folder)
    assert series and all(s.modality not in {"SEG", "SR", "PR", "KO"} for s in series)
    ct = [s for s in series if s.modality == "CT"]
    assert len(ct) == 1 and ct[0].instance_count == 1
    assert read_image(folder, series_uid=ct[0].uid).shape[2] == 1


def test_enhanced_multiframe_reads_like_the_single_frame_series(tmp_path):
    """A legacy-converted enhanced MR (functional groups, frames stored in reverse order)."""
    import highdicom as hd

    reference = read_image(shared_path("dicom", "hippocampus_crop_study1"))
    datasets = [pydicom.dcmread(p) for p in reversed(reference.dicom_source)]
    multiframe = hd.legacy.LegacyConvertedEnhancedMRImage(
        datasets, series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1
    )
    multiframe.save_as(tmp_path / "enhanced.dcm")
    image = read_image(tmp_path / "enhanced.dcm")
    assert image.meta["dicom_layout"] == "multi-frame"
    np.testing.assert_array_equal(image.array, reference.array)
    np.testing.assert_allclose(image.affine, reference.affine, atol=1e-6)
    assert image.meta["dicom_frame_numbers"][0] == 32
    # a DICOM SEG on the multi-frame source references its frames and reads back the same
    from medseg.data_cards import load_data_card
    from medseg.io import read_seg, write_seg

    labels = (image.array > np.percentile(image.array, 90)).astype(np.uint8)
    seg_path = write_seg(
        image.with_array(labels), image, load_data_card("hippocampus").labels[:1], tmp_path / "seg.dcm"
    )
    np.testing.assert_array_equal(read_seg(seg_path, image).array, labels)


def _bone_centroid_world(values, to_world):
    """World (mm) centroid of bone (> 300 HU) in one 2D slice indexed [i, j]."""
    ij = np.argwhere(values > 300).astype(float)
    return to_world(ij.mean(axis=0))


def test_gantry_tilt_is_resampled_onto_a_correct_orthogonal_grid():
    folder = shared_path("dicom", "dcm_qa_ct_gantry_tilt", "In", "GE")
    image = read_image(folder)
    assert image.meta["resampled"] and image.dicom_source is None
    assert any("gantry tilt" in w and "variable slice gaps" in w for w in image.warnings)
    direction = image.direction
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-6)  # no shear
    # Compare, slice by slice, the world position of the skull between each input slice (own
    # header geometry) and the output slice at the same distance along the normal.
    files = sorted(
        folder.iterdir(), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
    )
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    normal_ras = image.direction[:, 2]
    checked = 0
    for path in files[1:13]:  # the regularly spaced part: output slices coincide with inputs
        ds = pydicom.dcmread(path)
        lps = _lps_affine_from_header(path)
        world = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
        distance = float((world[:3, 3] - image.affine[:3, 3]) @ normal_ras)
        k = int(round(distance / image.spacing[2]))
        assert abs(k * image.spacing[2] - distance) < 0.05
        hu = ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        expected = _bone_centroid_world(hu, lambda ij: (world @ [*ij, 0, 1])[:3])  # noqa: B023
        got = _bone_centroid_world(image.array[:, :, k], lambda ij: (image.affine @ [*ij, k, 1])[:3])  # noqa: B023
        assert np.linalg.norm(got - expected) < 1.0
        checked += 1
    assert checked == 12
    # a naive stack (ignoring the shear) would be off by > 10 mm at the 12th slice
    shear = np.array(pydicom.dcmread(files[12], stop_before_pixels=True).ImagePositionPatient, dtype=float) - np.array(
        first.ImagePositionPatient, dtype=float
    )
    assert np.linalg.norm(shear - (shear @ [0, 0.3173047, 0.9483237]) * np.array([0, 0.3173047, 0.9483237])) > 10


def test_raw_datasets_without_part10_header_are_read(tmp_path):
    """Old exports write bare datasets (no preamble, no DICM, no file meta)."""
    source = shared_path("dicom", "hippocampus_crop_study1")
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path)
        ds.preamble = None
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        pydicom.dcmwrite(tmp_path / path.stem, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    assert (tmp_path / "1").read_bytes()[128:132] != b"DICM"
    image = read_image(tmp_path)
    np.testing.assert_array_equal(image.array, read_image(source).array)


def test_missing_slice_is_detected_and_interpolated_on_a_regular_grid(tmp_path):
    source = shared_path("dicom", "hippocampus_crop_study1")
    reference = read_image(source)
    missing = reference.dicom_source[10]  # k = 10
    folder = tmp_path / "gap"
    folder.mkdir()
    for path in source.iterdir():
        if str(path) != missing:
            (folder / path.name).write_bytes(path.read_bytes())
    image = read_image(folder)
    assert any("variable slice gaps 1.00..2.00 mm" in w for w in image.warnings)
    assert image.shape == reference.shape and image.meta["resampled"]
    np.testing.assert_allclose(image.affine, reference.affine, atol=1e-6)
    kept = [k for k in range(32) if k != 10]
    np.testing.assert_array_equal(image.array[:, :, kept], reference.array[:, :, kept])
    halfway = (reference.array[:, :, 9].astype(float) + reference.array[:, :, 11]) / 2
    assert np.abs(image.array[:, :, 10] - halfway).max() <= 0.5
