"""DICOM Segmentation objects (PS3.3 A.51, C.8.20) written and read with highdicom.

:func:`write_seg` stores a label map as a BINARY SEG with one segment per label of the card,
each carrying the label's SNOMED CT segmented property category and type, its display colour
(converted to CIELab by highdicom), the algorithm identification (name, version) and a tracking
ID ``medseg label <id>`` from which :func:`read_seg` restores the original label ids. The SEG
references every source instance, so viewers and PACS overlay it on the source series.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom

from medseg.errors import InputShapeError, MedsegError, UnreadableFileError, UnsupportedInputError
from medseg.io.atomic import atomic_write
from medseg.io.dicom_volume import LPS_TO_RAS
from medseg.io.image import Image
from medseg.labels import Code, Label

log = logging.getLogger(__name__)

TRACKING_PREFIX = "medseg label "
#: Affine agreement (mm) required between a label map and its source image.
GRID_ATOL_MM = 1e-3
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                 "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


def _default_version() -> str:
    from medseg import __version__

    return str(__version__)


def _coded(code: Code):
    from highdicom.sr.coding import CodedConcept

    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _source_datasets(source: Image) -> list[pydicom.Dataset]:
    files = source.dicom_source
    if not files:
        raise UnsupportedInputError("DICOM SEG needs a DICOM source series; the source image "
                                    "was not read from DICOM (or was resampled)")
    layout = source.meta.get("dicom_layout", "single-frame")
    if layout == "mosaic":
        raise UnsupportedInputError(f"series {source.meta.get('series_uid', '')}: DICOM SEG on "
                                    "a Siemens mosaic source is not supported")
    if source.array.ndim != 3:
        raise UnsupportedInputError(f"series {source.meta.get('series_uid', '')}: DICOM SEG on a "
                                    "multi-volume (4D) source is not supported")
    unique = list(dict.fromkeys(files))
    datasets = []
    for path in unique:
        try:
            datasets.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as error:
            raise UnreadableFileError(f"{Path(path).name}: cannot read SEG source instance "
                                      f"({type(error).__name__})") from None
    for ds in datasets:
        # Type 2 patient/study attributes that highdicom copies from the source: present but
        # empty when the export dropped them (PS3.3 C.7.1.1, C.7.2.1).
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            if not str(ds.get(keyword) or "").strip():
                raise UnsupportedInputError(f"{Path(ds.filename).name}: source has no {keyword}; "
                                            "a DICOM SEG cannot reference it")
    return datasets


def write_seg(label_map: Image, source: Image, labels: list[Label], path: str | Path, *,
              series_description: str = "medseg segmentation", algorithm_name: str = "medseg",
              algorithm_version: str | None = None, series_number: int | None = None) -> Path:
    """Write a BINARY DICOM SEG of ``label_map`` referencing ``source``'s series, atomically.

    Args:
        label_map: integer label map on the source grid, ``array`` ``(I, J, K)`` with the same
            shape and affine as ``source``.
        source: the image read from DICOM (``source.dicom_source`` lists the slice files).
        labels: the card's labels; one segment per label (empty segments are allowed), with
            segment numbers 1..N in label-id order.
        path: output ``.dcm`` path.
        series_description / algorithm_name / algorithm_version: written into the SEG.
        series_number: SeriesNumber of the SEG (default: source SeriesNumber + 1000).

    Raises:
        UnsupportedInputError: source not DICOM, mosaic, 4D or without UIDs; label values with no
            label in ``labels``; no labels.
        InputShapeError: label map not on the source grid.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not labels:
        raise UnsupportedInputError("DICOM SEG needs at least one label")
    labels = sorted(labels, key=lambda label: label.id)
    if len({label.id for label in labels}) != len(labels):
        raise UnsupportedInputError("DICOM SEG labels must have unique ids")
    array = np.asarray(label_map.array)
    if array.shape != source.array.shape[:3] or array.ndim != 3:
        raise InputShapeError(f"label map shape {array.shape} is not the source grid "
                              f"{source.array.shape[:3]}")
    if not np.allclose(label_map.affine, source.affine, atol=GRID_ATOL_MM, rtol=0):
        raise InputShapeError("label map affine differs from the source image affine; resample "
                              "the label map to the source grid first")
    if array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            raise UnsupportedInputError("label map holds non-integer values")
    array = array.astype(np.int64, copy=False)
    present = set(np.unique(array).tolist()) - {0}
    unknown = sorted(present - {label.id for label in labels})
    if unknown:
        raise UnsupportedInputError(f"label map holds values {unknown[:10]} that have no label")
    datasets = _source_datasets(source)

    # label id -> segment number 1..N
    lut = np.zeros(max(label.id for label in labels) + 1, dtype=np.uint16)
    for number, label in enumerate(labels, start=1):
        lut[label.id] = number
    segments = lut[array]  # (I, J, K)
    frames = np.ascontiguousarray(np.transpose(segments, (2, 1, 0)))  # (K, rows, cols)
    frames = frames.astype(np.uint8 if len(labels) < 256 else np.uint16)
    if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames") or 1) > 1:
        numbers = source.meta.get("dicom_frame_numbers")
        if not numbers or len(numbers) != frames.shape[0]:
            raise UnsupportedInputError("multi-frame source without frame order information")
        by_frame = np.zeros_like(frames)
        by_frame[np.asarray(numbers) - 1] = frames
        frames = by_frame
    elif len(datasets) != frames.shape[0]:
        raise UnsupportedInputError("source series has a different number of instances than "
                                    "slices; DICOM SEG cannot reference it")

    version = algorithm_version or _default_version()
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=version, family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label.name[:64],
            segmented_property_category=_coded(label.category),
            segmented_property_type=_coded(label.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=f"{TRACKING_PREFIX}{label.id}",
            display_color=hd.color.CIELabColor.from_rgb(*label.color),
        )
        for number, label in enumerate(labels, start=1)
    ]
    if series_number is None:
        series_number = int(source.meta.get("series_number") or 0) + 1000
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medseg",
        manufacturer_model_name=algorithm_name,
        software_versions=version,
        device_serial_number="0",
        series_description=series_description[:64],
        omit_empty_frames=True,
    )
    return atomic_write(path, lambda tmp: seg.save_as(str(tmp)))


def _segment_ids(seg) -> dict[int, int]:
    """Segment number -> label id (from ``medseg label <id>`` tracking IDs, else the number)."""
    mapping = {}
    for number in seg.get_segment_numbers():
        description = seg.get_segment_description(number)
        label_id = number
        tracking = description.tracking_id if "TrackingID" in description else None
        if tracking and str(tracking).startswith(TRACKING_PREFIX):
            try:
                label_id = int(str(tracking)[len(TRACKING_PREFIX):])
            except ValueError:
                label_id = number
        mapping[number] = label_id
    return mapping


def _segments_meta(seg, mapping: dict[int, int]) -> list[dict]:
    result = []
    for number, label_id in mapping.items():
        description = seg.get_segment_description(number)
        category = description.segmented_property_category
        kind = description.segmented_property_type
        result.append({
            "segment_number": number, "label_id": label_id,
            "name": str(description.segment_label),
            "category": {"value": category.value, "scheme": category.scheme_designator,
                         "meaning": category.meaning},
            "type": {"value": kind.value, "scheme": kind.scheme_designator,
                     "meaning": kind.meaning},
        })
    return result


def read_seg(path: str | Path, source: Image | None = None) -> Image:
    """Read a DICOM SEG back into a label map (highdicom's reading API).

    Segments are combined into one label map whose values are the original label ids (from the
    ``medseg label <id>`` tracking IDs; segment numbers for SEGs written by other tools).
    Fractional segments are thresholded at 0.5.

    Args:
        path: the SEG file.
        source: the image the SEG refers to; when given, the label map is built frame by frame
            from the source instances and returned on exactly the source grid. Without it, the
            SEG's own volume geometry (its plane positions) is used.

    Returns:
        ``Image`` with an integer ``array`` ``(I, J, K)`` and RAS+ ``affine``; ``meta["segments"]``
        describes each segment (number, label id, name, SNOMED CT codes).

    Raises:
        UnreadableFileError: not a readable SEG.
        UnsupportedInputError: overlapping segments (cannot be one label map), or no 3D geometry.
    """
    import highdicom as hd

    path = Path(path)
    try:
        seg = hd.seg.segread(str(path))
    except Exception as error:
        raise UnreadableFileError(f"{path.name}: not a readable DICOM SEG "
                                  f"({type(error).__name__})") from None
    mapping = _segment_ids(seg)
    lut = np.zeros(max(mapping, default=0) + 1, dtype=np.int64)
    for number, label_id in mapping.items():
        lut[number] = label_id
    dtype = np.uint8 if max(mapping.values(), default=0) < 256 else np.uint16
    try:
        if source is not None:
            files = source.dicom_source or []
            uids = [str(pydicom.dcmread(f, stop_before_pixels=True,
                                        specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
                    for f in files]
            if not uids:
                raise UnsupportedInputError("read_seg: the source image was not read from DICOM")
            referenced = _referenced_series(seg)
            if referenced and referenced != str(source.meta.get("series_uid", referenced)):
                raise UnsupportedInputError(f"{path.name}: the SEG references series "
                                            f"{referenced}, not the given source series "
                                            f"{source.meta.get('series_uid')}")
            frame_numbers = source.meta.get("dicom_frame_numbers")
            if len(set(uids)) == 1 and frame_numbers:
                frames = _pixels_by_source(seg, uids[:1], frame_numbers)
            else:
                frames = _pixels_by_source(seg, uids)
            array = lut[frames].astype(dtype)  # (K, rows, cols)
            label_map = source.with_array(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
            label_map.meta = {**label_map.meta}
        else:
            volume = _volume(seg)
            array = np.asarray(volume.array)
            while array.ndim > 3:
                array = array[..., 0]
            array = lut[array].astype(dtype)
            # highdicom volumes are indexed (slice, row, column) with an LPS affine; reverse the
            # axes to (column, row, slice) = (i, j, k) and convert to RAS+.
            affine_lps = np.asarray(volume.affine, dtype=np.float64)
            permuted = np.eye(4)
            permuted[:3, :3] = affine_lps[:3, :3][:, ::-1]
            permuted[:3, 3] = affine_lps[:3, 3]
            label_map = Image(array=np.ascontiguousarray(np.transpose(array, (2, 1, 0))),
                              affine=LPS_TO_RAS @ permuted, meta={})
    except MedsegError:
        raise
    except Exception as error:  # highdicom raises ValueError/RuntimeError/sqlite errors
        text = str(error).lower()
        if "overlap" in text:
            raise UnsupportedInputError(f"{path.name}: segments overlap and cannot be combined "
                                        "into one label map") from None
        raise UnsupportedInputError(f"{path.name}: cannot place the SEG frames on a volume "
                                    f"({str(error).splitlines()[0][:150]})") from None
    label_map.meta.update({
        "modality": "SEG", "source": str(path), "segments": _segments_meta(seg, mapping),
        "series_uid": str(seg.SeriesInstanceUID),
        "series_description": str(seg.get("SeriesDescription", "")),
        "referenced_series_uid": _referenced_series(seg),
    })
    return label_map


def _binary(seg) -> bool:
    return str(seg.SegmentationType) == "BINARY"


def _pixels_by_source(seg, uids: Sequence[str],
                      frame_numbers: Sequence[int] | None = None) -> np.ndarray:
    """``(K, rows, cols)`` segment numbers for the source instances (or frames of one
    multi-frame instance), in the given order."""
    if frame_numbers is not None:
        def get(**kwargs):
            return seg.get_pixels_by_source_frame(uids[0], source_frame_numbers=list(frame_numbers),
                                                  assert_missing_frames_are_empty=True, **kwargs)
    else:
        def get(**kwargs):
            return seg.get_pixels_by_source_instance(list(uids),
                                                     assert_missing_frames_are_empty=True,
                                                     **kwargs)
    if _binary(seg):
        return get(combine_segments=True)
    return _combine_fractional(get())


def _volume(seg):
    if _binary(seg):
        return seg.get_volume(combine_segments=True)
    volume = seg.get_volume()
    return volume.with_array(_combine_fractional(np.asarray(volume.array)))


def _combine_fractional(stack: np.ndarray) -> np.ndarray:
    """``(..., S)`` fractional segment probabilities -> segment number (0 = none), threshold 0.5."""
    binary = stack >= 0.5
    if np.any(binary.sum(axis=-1) > 1):
        raise ValueError("segments overlap")
    numbers = np.arange(1, stack.shape[-1] + 1)
    return (binary * numbers).sum(axis=-1)


def _referenced_series(seg) -> str:
    sequence = seg.get("ReferencedSeriesSequence")
    if sequence:
        return str(sequence[0].get("SeriesInstanceUID", ""))
    return ""
