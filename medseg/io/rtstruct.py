"""DICOM RT Structure Set (RTSTRUCT) output: planar contours of a label map on the source slices.

The RT Structure Set IOD (DICOM PS3.3 A.19) is written with pydicom, module by module: Patient,
General Study (copied from the source, values repaired like the SEG's), RT Series (C.8.8.1),
General Equipment, Frame of Reference, Structure Set (C.8.8.5: one referenced frame of reference
with the source study, series and every slice in ContourImageSequence), ROI Contour (C.8.8.6),
RT ROI Observations (C.8.8.8) and SOP Common.

One ROI per label of the card (ROINumber = label id, ROIName = label name, ROIDisplayColor = label
colour; a label absent from the map is an ROI without contours). For every k-slice of the source
the label's mask is traced with marching squares (``skimage.measure.find_contours`` at level 0.5,
half-way between pixel centres) into CLOSED_PLANAR contours lying exactly on that slice's plane,
each referencing its slice's SOP Instance. Holes are separate contours nested inside the outer
one: readers fill them with the even-odd rule (as :func:`rasterise_rtstruct` does).
ContourData are LPS patient coordinates in mm (PS3.3 C.8.8.6.1).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medseg.errors import InputShapeError, UnsupportedInputError
from medseg.io.atomic import atomic_write
from medseg.io.derived import source_headers
from medseg.io.image import Image
from medseg.labels import Label

#: RT Structure Set Storage SOP Class (PS3.4 B.5).
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
#: Study Component Management SOP Class, the class referenced by RTReferencedStudySequence.
STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
#: LPS <-> RAS (negate x and y).
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Largest allowed difference (mm) between label map and source affines.
GRID_ATOL_MM = 1e-3

_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyDescription",
)


def _source_headers(source: Image) -> list[Dataset]:
    headers = source_headers(source, "RTSTRUCT", layouts=("single-frame",))
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        if not str(headers[0].get(keyword) or ""):
            raise UnsupportedInputError(f"RTSTRUCT source has no {keyword}")
    return headers


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a 2D boolean ``mask`` ``(I, J)`` as ``(N, 2)`` float ``(i, j)`` voxel
    coordinates, outer boundaries and holes alike (marching squares at level 0.5, the repeated
    closing point dropped)."""
    from skimage.measure import find_contours

    padded = np.pad(mask.astype(np.float32), 1)
    contours = []
    for contour in find_contours(padded, 0.5):
        points = contour[:-1] - 1.0 if np.allclose(contour[0], contour[-1]) else contour - 1.0
        if len(points) >= 3:
            contours.append(points)
    return contours


def _item(**values) -> Dataset:
    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def write_rtstruct(
    label_map: Image,
    source: Image,
    labels: Sequence[Label],
    path: str | Path,
    *,
    series_description: str = "medseg segmentation",
    structure_set_label: str = "medseg",
    algorithm_name: str = "medseg",
    algorithm_version: str | None = None,
    series_number: int | None = None,
    warnings: list[str] | None = None,
) -> Path:
    """Write the label map as a DICOM RT Structure Set referencing ``source``, atomically.

    Args:
        label_map: integer label map on the source grid, ``array`` ``(I, J, K)`` with the same
            shape and affine (voxel -> RAS+ mm) as ``source``.
        source: the image read from single-frame DICOM (``dicom_source``: the file of each
            k-slice).
        labels: the card's labels; one ROI per label (ROINumber = label id).
        path: output ``.dcm`` path (written under a temporary name, then renamed).
        series_description / structure_set_label / algorithm_name / algorithm_version /
            series_number: written into the RT Series and Structure Set modules
            (SeriesNumber defaults to the source SeriesNumber + 2000).
        warnings: if given, receives one message per repaired or emptied patient/study
            attribute (keyword only).

    Returns:
        ``path``.

    Raises:
        UnsupportedInputError: source not single-frame DICOM, 4D, without UIDs; label values
            without a label; no labels.
        InputShapeError: label map not on the source grid.
        UnreadableFileError: a source instance cannot be read.
    """
    from medseg.io.seg import repair_patient_study

    if not labels:
        raise UnsupportedInputError("RTSTRUCT needs at least one label")
    labels = sorted(labels, key=lambda label: label.id)
    array = np.asarray(label_map.array)
    if array.ndim != 3 or array.shape != source.array.shape[:3]:
        raise InputShapeError(f"label map shape {array.shape} is not the source grid {source.array.shape[:3]}")
    if not np.allclose(label_map.affine, source.affine, atol=GRID_ATOL_MM, rtol=0):
        raise InputShapeError("label map affine differs from the source image affine")
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise UnsupportedInputError("label map holds non-integer values")
    array = array.astype(np.int64, copy=False)
    unknown = sorted(set(np.unique(array).tolist()) - {0} - {label.id for label in labels})
    if unknown:
        raise UnsupportedInputError(f"label map holds values {unknown[:10]} that have no label")
    headers = _source_headers(source)
    if len(headers) != array.shape[2]:
        raise UnsupportedInputError(
            "source series has a different number of instances than slices; RTSTRUCT cannot reference it"
        )
    first = headers[0]
    version = algorithm_version or _default_version()
    now = _dt.datetime.now()
    frame_of_reference = str(first.FrameOfReferenceUID)
    to_lps = _FLIP @ np.asarray(source.affine, dtype=np.float64)

    ds = Dataset()
    for keyword in _PATIENT_STUDY:  # Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1)
        setattr(ds, keyword, first.get(keyword, ""))
    notes = repair_patient_study(ds, list(_PATIENT_STUDY))
    if warnings is not None:
        warnings.extend(f"RTSTRUCT: {note}" for note in notes if note not in warnings)
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"  # RT Series module (C.8.8.1)
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(source.meta.get("series_number") or 0) + 2000 if series_number is None else series_number
    ds.SeriesDescription = series_description[:64]
    ds.OperatorsName = ""
    ds.Manufacturer = "medseg"  # General Equipment (C.7.5.1)
    ds.ManufacturerModelName = algorithm_name[:64]
    ds.SoftwareVersions = version[:64]
    ds.FrameOfReferenceUID = frame_of_reference  # Frame of Reference (C.7.4.1)
    ds.PositionReferenceIndicator = ""
    ds.StructureSetLabel = structure_set_label[:16]  # Structure Set (C.8.8.5)
    ds.StructureSetName = f"{algorithm_name} {version}"[:64]
    ds.StructureSetDate = ds.InstanceCreationDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = ds.InstanceCreationTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.InstanceNumber = 1
    ds.SpecificCharacterSet = "ISO_IR 192"

    image_refs = [
        _item(ReferencedSOPClassUID=str(h.SOPClassUID), ReferencedSOPInstanceUID=str(h.SOPInstanceUID)) for h in headers
    ]
    series_ref = _item(SeriesInstanceUID=str(first.SeriesInstanceUID), ContourImageSequence=DicomSequence(image_refs))
    study_ref = _item(
        ReferencedSOPClassUID=STUDY_COMPONENT_SOP_CLASS,
        ReferencedSOPInstanceUID=str(first.StudyInstanceUID),
        RTReferencedSeriesSequence=DicomSequence([series_ref]),
    )
    ds.ReferencedFrameOfReferenceSequence = DicomSequence(
        [_item(FrameOfReferenceUID=frame_of_reference, RTReferencedStudySequence=DicomSequence([study_ref]))]
    )

    rois, roi_contours, observations = [], [], []
    for label in labels:
        rois.append(
            _item(
                ROINumber=label.id,
                ReferencedFrameOfReferenceUID=frame_of_reference,
                ROIName=label.name[:64],
                ROIGenerationAlgorithm="AUTOMATIC",
                ROIGenerationDescription=f"{algorithm_name} {version}"[:64],
            )
        )
        contours = []
        mask = array == label.id
        for k in np.flatnonzero(mask.any(axis=(0, 1))):
            for points in slice_contours(mask[:, :, k]):
                voxels = np.column_stack([points, np.full(len(points), float(k)), np.ones(len(points))])
                world = (to_lps @ voxels.T).T[:, :3]
                contours.append(
                    _item(
                        ContourImageSequence=DicomSequence(
                            [
                                _item(
                                    ReferencedSOPClassUID=image_refs[k].ReferencedSOPClassUID,
                                    ReferencedSOPInstanceUID=image_refs[k].ReferencedSOPInstanceUID,
                                )
                            ]
                        ),
                        ContourGeometricType="CLOSED_PLANAR",
                        NumberOfContourPoints=len(points),
                        ContourData=[float(f"{v:.4f}") for v in world.ravel()],
                    )
                )
        roi_contour = _item(ROIDisplayColor=[int(c) for c in label.color], ReferencedROINumber=label.id)
        if contours:
            roi_contour.ContourSequence = DicomSequence(contours)
        roi_contours.append(roi_contour)
        observations.append(
            _item(
                ObservationNumber=label.id,
                ReferencedROINumber=label.id,
                ROIObservationLabel=label.name[:16],
                RTROIInterpretedType="ORGAN",
                ROIInterpreter="",
            )
        )
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    return atomic_write(path, lambda tmp: ds.save_as(str(tmp), enforce_file_format=True))


def _default_version() -> str:
    import medseg

    return str(getattr(medseg, "__version__", "0"))


def rasterise_rtstruct(path: str | Path, source: Image) -> dict[str, np.ndarray]:
    """Fill the contours of an RTSTRUCT back into masks on ``source``'s grid.

    Each contour's LPS points are mapped to voxel ``(i, j, k)`` with the inverse source affine
    and filled with ``skimage.draw.polygon`` (pixels whose centre lies inside); contours of one
    ROI on one slice combine by the even-odd rule (holes).

    Returns:
        ``{ROIName: bool array (I, J, K)}``.

    Raises:
        UnsupportedInputError: a contour does not lie on a source slice.
    """
    from skimage.draw import polygon

    ds = pydicom.dcmread(str(path))
    shape = source.array.shape[:3]
    to_voxel = np.linalg.inv(_FLIP @ np.asarray(source.affine, dtype=np.float64))
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    masks = {}
    for roi in ds.ROIContourSequence:
        mask = np.zeros(shape, dtype=bool)
        for contour in roi.get("ContourSequence", []):
            points = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
            voxels = (to_voxel @ np.column_stack([points, np.ones(len(points))]).T).T
            k = int(round(float(np.mean(voxels[:, 2]))))
            if not 0 <= k < shape[2] or np.abs(voxels[:, 2] - k).max() > 1e-2:
                raise UnsupportedInputError("RTSTRUCT contour does not lie on a source slice")
            rr, cc = polygon(voxels[:, 0], voxels[:, 1], shape[:2])
            plane = np.zeros(shape[:2], dtype=bool)
            plane[rr, cc] = True
            mask[:, :, k] ^= plane
        masks[names[int(roi.ReferencedROINumber)]] = mask
    return masks
