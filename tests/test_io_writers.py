"""NIfTI and DICOM SEG writers: exact geometry, integer label maps, atomic writes, round trips."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.data_cards import load_data_card
from medseg.errors import InputShapeError, UnsupportedInputError
from medseg.io import read_image, read_seg, write_nifti, write_seg
from medseg.labels import Label
from tests.conftest import shared_path

LABELS = load_data_card("hippocampus").labels
HIPPOCAMPUS = LABELS[0].type


@pytest.fixture(scope="module")
def hippocampus():
    return read_image(shared_path("dicom", "hippocampus_crop_study1"))


def _label_map(image):
    """A label map from the image itself: intensity terciles inside a box."""
    data = image.array.astype(float)
    labels = np.zeros(image.shape, dtype=np.uint8)
    box = (slice(5, 30), slice(10, 40), slice(4, 25))
    inside = data[box]
    low, high = np.percentile(inside, [40, 80])
    labels[box] = np.where(inside > high, 2, np.where(inside > low, 1, 0))
    return labels


def test_write_nifti_keeps_affine_and_writes_integer_labels(hippocampus, tmp_path):
    out = write_nifti(hippocampus, tmp_path / "image.nii.gz")
    saved = nib.load(out)
    np.testing.assert_array_equal(saved.affine, hippocampus.affine)
    np.testing.assert_allclose(saved.get_qform(), hippocampus.affine, atol=1e-5)
    assert int(saved.header["sform_code"]) == 1 and int(saved.header["qform_code"]) == 1
    np.testing.assert_array_equal(np.asarray(saved.dataobj), hippocampus.array)

    labels = hippocampus.with_array(_label_map(hippocampus).astype(np.int64))
    out = write_nifti(labels, tmp_path / "labels.nii.gz")
    saved = nib.load(out)
    assert saved.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(saved.dataobj), labels.array)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert read_image(out).affine == pytest.approx(hippocampus.affine)


def test_write_nifti_float_label_map_is_cast_and_failure_leaves_nothing(hippocampus, tmp_path):
    floats = hippocampus.with_array(_label_map(hippocampus).astype(np.float32))
    out = write_nifti(floats, tmp_path / "labels.nii", label_map=True)
    assert nib.load(out).get_data_dtype().kind == "u"
    half = hippocampus.with_array(np.full(hippocampus.shape, 0.5, dtype=np.float32))
    with pytest.raises(UnsupportedInputError):
        write_nifti(half, tmp_path / "bad.nii.gz", label_map=True)
    with pytest.raises(UnsupportedInputError):
        write_nifti(hippocampus, tmp_path / "image.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii"]


def test_seg_round_trip_on_source_grid(hippocampus, tmp_path):
    labels = _label_map(hippocampus)
    path = write_seg(
        hippocampus.with_array(labels), hippocampus, LABELS, tmp_path / "seg.dcm", algorithm_version="test-1"
    )
    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert len(ds.SegmentSequence) == 2
    first = ds.SegmentSequence[0]
    assert first.SegmentLabel == "anterior hippocampus"
    assert first.SegmentedPropertyTypeCodeSequence[0].CodeValue == "5366008"
    assert first.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert first.SegmentAlgorithmName == "medseg"
    assert len(first.RecommendedDisplayCIELabValue) == 3
    source_uid = hippocampus.meta["series_uid"]
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source_uid
    referenced = {item.ReferencedSOPInstanceUID for item in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in hippocampus.dicom_source}
    assert ds.StudyInstanceUID == hippocampus.meta["study_uid"]

    back = read_seg(path, hippocampus)
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_array_equal(back.affine, hippocampus.affine)
    assert [s["label_id"] for s in back.meta["segments"]] == [1, 2]

    # without the source: the SEG's own plane positions give the same labels in world space
    alone = read_seg(path)
    world = alone.affine @ np.c_[np.argwhere(alone.array == 2), np.ones(int((alone.array == 2).sum()))].T
    voxels = np.round(np.linalg.solve(hippocampus.affine, world)[:3].T).astype(int)
    assert len(voxels) == int((labels == 2).sum())
    assert np.all(labels[tuple(voxels.T)] == 2)


def test_seg_keeps_sparse_label_ids_and_allows_empty_segments(hippocampus, tmp_path):
    labels = _label_map(hippocampus)
    labels[labels == 2] = 7
    cards = [LABELS[0], Label(id=7, name="seven", type=HIPPOCAMPUS), Label(id=9, name="absent", type=HIPPOCAMPUS)]
    path = write_seg(hippocampus.with_array(labels), hippocampus, cards, tmp_path / "seg.dcm")
    assert len(pydicom.dcmread(path).SegmentSequence) == 3
    np.testing.assert_array_equal(read_seg(path, hippocampus).array, labels)

    empty = write_seg(hippocampus.with_array(np.zeros_like(labels)), hippocampus, LABELS, tmp_path / "empty.dcm")
    assert read_seg(empty, hippocampus).array.max() == 0


def test_seg_rejects_wrong_grid_unknown_labels_and_non_dicom_source(hippocampus, tmp_path):
    labels = _label_map(hippocampus)
    with pytest.raises(InputShapeError):
        write_seg(hippocampus.with_array(labels[:-1]), hippocampus, LABELS, tmp_path / "a.dcm")
    moved = hippocampus.with_array(labels)
    moved.affine = moved.affine.copy()
    moved.affine[0, 3] += 1.0
    with pytest.raises(InputShapeError):
        write_seg(moved, hippocampus, LABELS, tmp_path / "b.dcm")
    with pytest.raises(UnsupportedInputError):
        write_seg(hippocampus.with_array(labels), hippocampus, LABELS[:1], tmp_path / "c.dcm")
    nifti = read_image(write_nifti(hippocampus, tmp_path / "image.nii.gz"))
    with pytest.raises(UnsupportedInputError):
        write_seg(nifti.with_array(labels), nifti, LABELS, tmp_path / "d.dcm")
    assert not any(p.suffix == ".dcm" or ".partial" in p.name for p in tmp_path.iterdir())
    assert os.listdir(tmp_path) == ["image.nii.gz"]


SEG_EXAMPLES = ("dicom", "seg_examples", "data", "test_files")


def test_read_seg_written_by_another_tool_on_its_source():
    """highdicom's single-frame CT SEG: frame pixels land on the CT source grid."""
    source = read_image(shared_path(*SEG_EXAMPLES, "ct_image.dcm"))
    path = shared_path(*SEG_EXAMPLES, "seg_image_ct_binary_single_frame.dcm")
    label_map = read_seg(path, source)
    stored = pydicom.dcmread(path).pixel_array  # (rows, cols) of segment 1
    np.testing.assert_array_equal(label_map.array[:, :, 0], stored.T.astype(np.uint8))
    np.testing.assert_array_equal(label_map.affine, source.affine)
    assert label_map.meta["segments"][0]["name"] == "first segment"


def test_read_seg_fractional_is_thresholded_and_overlap_or_wrong_source_refused():
    fractional = shared_path(*SEG_EXAMPLES, "seg_image_ct_true_fractional.dcm")
    ds = pydicom.dcmread(fractional)
    probabilities = ds.pixel_array / float(ds.MaximumFractionalValue)
    label_map = read_seg(fractional)
    assert int((label_map.array > 0).sum()) == int((probabilities >= 0.5).sum())
    with pytest.raises(UnsupportedInputError, match="overlap"):
        read_seg(shared_path(*SEG_EXAMPLES, "seg_image_ct_binary_overlap.dcm"))
    ct = read_image(shared_path(*SEG_EXAMPLES, "ct_image.dcm"))
    with pytest.raises(UnsupportedInputError, match="references series"):
        read_seg(shared_path(*SEG_EXAMPLES, "seg_image_ct_binary.dcm"), ct)
