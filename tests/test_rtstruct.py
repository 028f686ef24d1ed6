"""RTSTRUCT output: the bundled hippocampus model on the real DICOM series, contours rasterised
back and compared with the label map."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.cli import main
from medseg.io import read_image
from medseg.io.rtstruct import rasterise_rtstruct, slice_contours
from medseg.package import resolve_model
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    folder = shared_path("dicom", "hippocampus_crop_study1")
    out = tmp_path_factory.mktemp("rtstruct")
    assert (
        main(["predict", str(folder), "--model", "hippocampus", "--output", str(out), "--formats", "nifti,rtstruct"])
        == 0
    )
    [rtstruct] = out.glob("*.rtstruct.dcm")
    [nifti] = out.glob("*.nii.gz")
    return folder, rtstruct, nifti


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_rtstruct_round_trip_dice(predicted):
    folder, rtstruct, nifti = predicted
    source = read_image(folder)
    label_map = np.asarray(nib.load(nifti).dataobj).astype(int)
    card = resolve_model("hippocampus").card
    masks = rasterise_rtstruct(rtstruct, source)
    assert set(masks) == {label.name for label in card.labels}
    for label in card.labels:
        truth = label_map == label.id
        assert truth.sum() > 100, label.name
        dice = _dice(masks[label.name], truth)
        print(f"RTSTRUCT round trip {label.name}: Dice {dice:.4f}")
        assert dice >= 0.95, (label.name, dice)


def test_rtstruct_references_source_series_and_frame_of_reference(predicted):
    folder, rtstruct, _ = predicted
    ds = pydicom.dcmread(rtstruct)
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and ds.Modality == "RTSTRUCT"
    assert ds.StudyInstanceUID == source[0].StudyInstanceUID
    assert ds.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    [frame_ref] = ds.ReferencedFrameOfReferenceSequence
    [series_ref] = frame_ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence
    assert series_ref.SeriesInstanceUID == source[0].SeriesInstanceUID
    instances = {str(s.SOPInstanceUID) for s in source}
    assert {str(i.ReferencedSOPInstanceUID) for i in series_ref.ContourImageSequence} == instances
    card = resolve_model("hippocampus").card
    by_number = {int(r.ROINumber): r for r in ds.StructureSetROISequence}
    for label, contour in zip(sorted(card.labels, key=lambda x: x.id), ds.ROIContourSequence):
        assert by_number[label.id].ROIName == label.name
        assert int(contour.ReferencedROINumber) == label.id
        assert [int(c) for c in contour.ROIDisplayColor] == list(label.color)
        for item in contour.ContourSequence:
            assert item.ContourGeometricType == "CLOSED_PLANAR"
            assert str(item.ContourImageSequence[0].ReferencedSOPInstanceUID) in instances
    assert not list(rtstruct.parent.glob(".*partial*"))  # written atomically


def test_contours_keep_holes_by_even_odd_rule():
    from skimage.draw import polygon

    mask = np.zeros((12, 12), dtype=bool)
    mask[2:10, 2:10] = True
    mask[5:7, 5:7] = False  # a hole
    mask[0, 11] = True  # a single pixel
    filled = np.zeros_like(mask)
    for points in slice_contours(mask):
        plane = np.zeros_like(mask)
        rr, cc = polygon(points[:, 0], points[:, 1], mask.shape)
        plane[rr, cc] = True
        filled ^= plane
    np.testing.assert_array_equal(filled, mask)


def test_service_offers_rtstruct_for_dicom_only():
    from service.inputs import DICOM_ONLY, OPT_IN, JobOptions
    from service.pipeline import MEDIA_TYPES, RESULT_FORMATS

    assert JobOptions(formats="rtstruct,seg").formats == ["seg", "rtstruct"]
    assert RESULT_FORMATS["rtstruct"] == "rtstruct" and MEDIA_TYPES["rtstruct"] == "application/dicom"
    assert "rtstruct" in DICOM_ONLY and "rtstruct" in OPT_IN  # asked for, never by default


def test_rtstruct_is_skipped_for_nifti_input(tmp_path):
    image = shared_path("hippocampus", "imagesTr", "hippocampus_001.nii.gz")
    assert (
        main(
            ["predict", str(image), "--model", "hippocampus", "--output", str(tmp_path), "--formats", "nifti,rtstruct"]
        )
        == 0
    )
    assert list(tmp_path.glob("*.nii.gz")) and not list(tmp_path.glob("*.rtstruct.dcm"))
