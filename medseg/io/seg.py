"""DICOM Segmentation objects (PS3.3 A.51, C.8.20) written and read with highdicom.

:func:`write_seg` stores a label map as a BINARY SEG with one segment per label of the card,
each carrying the label's SNOMED CT segmented property category and type, its display colour
(converted to CIELab by highdicom), the algorithm identification (name, version, parameters such
as the weights' sha256) and a tracking ID ``medseg label <id>`` from which :func:`read_seg`
restores the original label ids. The SEG's ContentDescription names the algorithm. The SEG
references every source instance, so viewers and PACS overlay it on the source series.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from medseg.errors import InputShapeError, MedsegError, UnreadableFileError, UnsupportedInputError
from medseg.io.atomic import atomic_write
from medseg.io.derived import source_headers
from medseg.io.dicom_volume import LPS_TO_RAS
from medseg.io.image import Image
from medseg.labels import Code, Label

log = logging.getLogger(__name__)

TRACKING_PREFIX = "medseg label "
#: Affine agreement (mm) required between a label map and its source image.
GRID_ATOL_MM = 1e-3
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _default_version() -> str:
    from medseg import __version__

    return str(__version__)


def _coded(code: Code):
    from highdicom.sr.coding import CodedConcept

    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


#: Patient/study attributes the SEG copies from its source (highdicom copies the root attributes
#: of the Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial Study
#: modules); used when highdicom's module tables cannot be read.
_COPIED_FALLBACK = _TYPE2_COPIED + (
    "IssuerOfPatientID",
    "TypeOfPatientID",
    "PatientBirthTime",
    "PatientAlternativeCalendar",
    "QualityControlSubject",
    "OtherPatientNames",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "PatientSpeciesDescription",
    "PatientBreedDescription",
    "ConsultingPhysicianName",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingService",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientBodyMassIndex",
    "MeasuredAPDimension",
    "MeasuredLateralDimension",
    "PatientWeight",
    "MedicalAlerts",
    "Allergies",
    "Occupation",
    "SmokingStatus",
    "AdditionalPatientHistory",
    "LastMenstrualDate",
    "PatientSexNeutered",
    "AdmissionID",
    "ServiceEpisodeID",
    "ServiceEpisodeDescription",
    "PatientState",
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
    "LongitudinalTemporalEventType",
)
#: VRs whose values are checked (text VRs with a grammar or a length limit, PS3.5 6.2)
_CHECKED_VRS = {"AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM"}
_SEX = {"m": "M", "male": "M", "man": "M", "f": "F", "female": "F", "woman": "F", "o": "O", "other": "O"}


@functools.lru_cache(maxsize=32)
def _copied_keywords(sop_class_uid: str) -> tuple[str, ...]:
    """Keywords of the patient/study attributes highdicom copies into the SEG from a source
    instance of this SOP class."""
    try:
        from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map

        modules = get_iod_module_map()[get_sop_class_iod_map()[sop_class_uid]]
        attributes = get_module_attribute_map()
        found = [
            str(item["keyword"])
            for module in modules
            if module["ie"] in ("Patient", "Study")
            for item in attributes[module["key"]]
            if len(item["path"]) == 0
        ]
    except Exception:  # private highdicom tables moved, or an unknown SOP class
        found = []
    return tuple(dict.fromkeys([*_TYPE2_COPIED, *found, *_COPIED_FALLBACK]))


def _valid(vr: str, text: str) -> bool:
    """One value (not a multi-value) is valid for ``vr`` (PS3.5 6.2, Table 6.2-1)."""
    from pydicom import valuerep

    if not text:
        return True
    if vr == "PN":  # up to 3 component groups of <= 64 chars, each <= 5 components
        groups = text.split("=")
        return len(groups) <= 3 and all(len(g) <= 64 and g.count("^") <= 4 for g in groups)
    validator = valuerep.VALIDATORS.get(vr)
    if validator is not None and not validator(vr, text)[0]:
        return False
    if vr in ("DA", "TM", "DT"):  # the grammar allows ranges and impossible dates
        try:
            getattr(valuerep, vr)(text)
        except Exception:
            return False
    return True


def _needs_repair(keyword: str, vr: str, text: str) -> bool:
    if keyword == "PatientSex":
        return text not in ("", "M", "F", "O")
    if keyword == "PatientName" and text and not set("^=") & set(text):
        return True
    return not _valid(vr, text)


def _repaired(keyword: str, vr: str, text: str) -> str | None:
    """``text`` made valid for ``vr`` (or ``None`` when it cannot be)."""
    value = text.strip()
    if keyword == "PatientSex":  # enumerated M, F, O (PS3.3 C.7.1.1)
        return _SEX.get(value.lower()) if value else ""
    if vr == "DA":  # 1970-03-21, 1970.03.21 (ACR-NEMA), 1970/03/21 -> 19700321
        match = re.fullmatch(r"(\d{4})[-./](\d{2})[-./](\d{2})", value)
        value = "".join(match.groups()) if match else value
    elif vr == "TM":  # 01:03:13 (ACR-NEMA) -> 010313
        if re.fullmatch(r"\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?", value):
            value = value.replace(":", "")
    elif vr == "AS":  # 45Y, 45 y -> 045Y
        match = re.fullmatch(r"(\d{1,3})\s*([DWMYdwmy])", value)
        value = f"{int(match.group(1)):03d}{match.group(2).upper()}" if match else value
    elif vr == "CS":
        value = value.upper()
    elif vr == "PN" and keyword == "PatientName" and value and not set("^=") & set(value):
        # a name without separators is a family name alone (PS3.5 6.2.1.2); the trailing '^'
        # says so explicitly (highdicom warns about such names otherwise)
        value += "^"
    return value if _valid(vr, value) else None


def repair_patient_study(dataset: pydicom.Dataset, keywords: Sequence[str] | None = None) -> list[str]:
    """Make the patient/study attributes of ``dataset`` valid for their VR, in place.

    Real PACS exports often carry values that break the value representations of PS3.5 6.2
    (Table 6.2-1): ``PatientBirthDate=1970-03-21`` (DA is ``YYYYMMDD``), ``PatientSex=female``
    (CS is upper case; PS3.3 C.7.1.1 enumerates ``M``, ``F``, ``O``), ``PatientAge=45Y`` (AS is
    ``nnnD|W|M|Y``). highdicom refuses to write a SEG from them. Each attribute in ``keywords``
    (default: those highdicom copies into the SEG, see :func:`_copied_keywords`) with a text VR
    is checked (DA, TM, DT, AS, CS, PN component groups and lengths, DS, IS, LO, SH, LT, ST);
    an invalid value is repaired where its meaning is clear (dates ``1970-03-21``/``1970.03.21``
    -> ``19700321``, times ``01:03:13`` -> ``010313``, ages ``45Y`` -> ``045Y``, CS to upper
    case, ``female``/``f``/``woman`` -> ``F``, ``male``/``m``/``man`` -> ``M``,
    ``other``/``o`` -> ``O``; a PatientName without ``^`` gets a trailing ``^``, its meaning
    unchanged) and is emptied otherwise. Never raises for a value.

    Use it on a copy of a header (e.g. a fresh ``pydicom.dcmread``): the files are not touched.

    Returns:
        one message per repaired or emptied attribute, naming its keyword, never its value.
    """
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import DataElement
    from pydicom.multival import MultiValue
    from pydicom.valuerep import PersonName

    messages = []
    if keywords is None:
        keywords = _copied_keywords(str(dataset.get("SOPClassUID") or ""))
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None or tag not in dataset:
            continue
        try:
            element = dataset[tag]
            vr = str(element.VR) if element.VR in _CHECKED_VRS else dictionary_VR(tag)
        except Exception:  # an undecodable value: empty it
            vr, element = dictionary_VR(tag), None
        if vr not in _CHECKED_VRS:
            continue
        if element is None:
            dataset[tag] = DataElement(tag, vr, "")
            messages.append(f"{keyword}: unreadable value; left empty in the SEG")
            continue
        value = element.value
        items = list(value) if isinstance(value, MultiValue) else [value]
        if not all(item is None or isinstance(item, (str, PersonName)) for item in items):
            continue  # already converted numbers (DS, IS) parsed fine
        texts = ["" if item is None else str(item) for item in items]
        bad = [_needs_repair(keyword, vr, text) for text in texts]
        if not any(bad):
            continue
        fixed = [_repaired(keyword, vr, text) if wrong else text for text, wrong in zip(texts, bad)]
        if any(text is None for text in fixed):
            element.value = ""
            messages.append(f"{keyword}: not a valid DICOM {vr} value; left empty in the SEG")
            continue
        element.value = fixed if len(fixed) > 1 else fixed[0]
        if keyword == "PatientName" and _valid(vr, texts[0]):
            messages.append(
                f"{keyword}: a single name component; written with a trailing '^' (family name only) in the SEG"
            )
        else:
            messages.append(f"{keyword}: not a valid DICOM {vr} value; repaired in the SEG")
    return messages


def _source_datasets(source: Image, warnings: list[str] | None = None) -> list[pydicom.Dataset]:
    datasets = source_headers(source, "DICOM SEG", layouts=("single-frame", "multi-frame"))
    notes = warnings if warnings is not None else []
    for ds in datasets:
        # Type 2 patient/study attributes that highdicom copies from the source: present but
        # empty when the export dropped them (PS3.3 C.7.1.1, C.7.2.1).
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
        # values highdicom refuses (PatientBirthDate=1970-03-21, PatientSex=female): repaired
        # or emptied in these in-memory copies, never in the files
        for message in repair_patient_study(ds):
            if message not in notes:
                notes.append(message)
                log.warning("SEG source %s", message)
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            if not str(ds.get(keyword) or "").strip():
                raise UnsupportedInputError(
                    f"{Path(ds.filename).name}: source has no {keyword}; a DICOM SEG cannot reference it"
                )
    return datasets


def write_seg(
    label_map: Image,
    source: Image,
    labels: list[Label],
    path: str | Path,
    *,
    series_description: str = "medseg segmentation",
    algorithm_name: str = "medseg",
    algorithm_version: str | None = None,
    series_number: int | None = None,
    warnings: list[str] | None = None,
    algorithm_parameters: dict[str, str] | None = None,
    content_description: str | None = None,
) -> Path:
    """Write a BINARY DICOM SEG of ``label_map`` referencing ``source``'s series, atomically.

    Patient/study attributes are copied from the source leniently: values invalid for their VR
    are repaired or left empty in the SEG (:func:`repair_patient_study`), never an error.

    Args:
        label_map: integer label map on the source grid, ``array`` ``(I, J, K)`` with the same
            shape and affine as ``source``.
        source: the image read from DICOM (``source.dicom_source`` lists the slice files).
        labels: the card's labels; one segment per label (empty segments are allowed), with
            segment numbers 1..N in label-id order.
        path: output ``.dcm`` path.
        series_description / algorithm_name / algorithm_version: written into the SEG
            (AlgorithmIdentificationSequence of every segment: AlgorithmName, AlgorithmVersion;
            ``algorithm_version`` defaults to the medseg version).
        algorithm_parameters: ``{name: value}`` written as the segments' AlgorithmParameters
            (``name=value`` pairs, comma-separated), e.g. ``{"weights_sha256": ...,
            "trained_at": ...}`` to identify the exact weights.
        content_description: ContentDescription (LO, cut to 64 characters); default
            ``"<algorithm_name> <algorithm_version>"``.
        series_number: SeriesNumber of the SEG (default: source SeriesNumber + 1000).
        warnings: if given, receives one message per repaired or emptied source attribute (its
            keyword, never its value).

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
        raise InputShapeError(f"label map shape {array.shape} is not the source grid {source.array.shape[:3]}")
    if not np.allclose(label_map.affine, source.affine, atol=GRID_ATOL_MM, rtol=0):
        raise InputShapeError(
            "label map affine differs from the source image affine; resample the label map to the source grid first"
        )
    if array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            raise UnsupportedInputError("label map holds non-integer values")
    array = array.astype(np.int64, copy=False)
    present = set(np.unique(array).tolist()) - {0}
    unknown = sorted(present - {label.id for label in labels})
    if unknown:
        raise UnsupportedInputError(f"label map holds values {unknown[:10]} that have no label")
    datasets = _source_datasets(source, warnings)

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
        raise UnsupportedInputError(
            "source series has a different number of instances than slices; DICOM SEG cannot reference it"
        )

    version = algorithm_version or _default_version()
    parameters = {str(k): str(v) for k, v in (algorithm_parameters or {}).items()} or None
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=version, family=codes.cid7162.ArtificialIntelligence, parameters=parameters
    )
    if content_description is None:
        content_description = f"{algorithm_name} {version}"
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
        content_description=content_description[:64] or None,
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
                label_id = int(str(tracking)[len(TRACKING_PREFIX) :])
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
        result.append(
            {
                "segment_number": number,
                "label_id": label_id,
                "name": str(description.segment_label),
                "category": {
                    "value": category.value,
                    "scheme": category.scheme_designator,
                    "meaning": category.meaning,
                },
                "type": {"value": kind.value, "scheme": kind.scheme_designator, "meaning": kind.meaning},
            }
        )
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
        raise UnreadableFileError(f"{path.name}: not a readable DICOM SEG ({type(error).__name__})") from None
    mapping = _segment_ids(seg)
    lut = np.zeros(max(mapping, default=0) + 1, dtype=np.int64)
    for number, label_id in mapping.items():
        lut[number] = label_id
    dtype = np.uint8 if max(mapping.values(), default=0) < 256 else np.uint16
    try:
        if source is not None:
            files = source.dicom_source or []
            uids = [
                str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
                for f in files
            ]
            if not uids:
                raise UnsupportedInputError("read_seg: the source image was not read from DICOM")
            referenced = _referenced_series(seg)
            if referenced and referenced != str(source.meta.get("series_uid", referenced)):
                raise UnsupportedInputError(
                    f"{path.name}: the SEG references series "
                    f"{referenced}, not the given source series "
                    f"{source.meta.get('series_uid')}"
                )
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
            label_map = Image(
                array=np.ascontiguousarray(np.transpose(array, (2, 1, 0))), affine=LPS_TO_RAS @ permuted, meta={}
            )
    except MedsegError:
        raise
    except Exception as error:  # highdicom raises ValueError/RuntimeError/sqlite errors
        text = str(error).lower()
        if "overlap" in text:
            raise UnsupportedInputError(
                f"{path.name}: segments overlap and cannot be combined into one label map"
            ) from None
        raise UnsupportedInputError(
            f"{path.name}: cannot place the SEG frames on a volume ({str(error).splitlines()[0][:150]})"
        ) from None
    label_map.meta.update(
        {
            "modality": "SEG",
            "source": str(path),
            "segments": _segments_meta(seg, mapping),
            "series_uid": str(seg.SeriesInstanceUID),
            "series_description": str(seg.get("SeriesDescription", "")),
            "referenced_series_uid": _referenced_series(seg),
        }
    )
    return label_map


def _binary(seg) -> bool:
    return str(seg.SegmentationType) == "BINARY"


def _pixels_by_source(seg, uids: Sequence[str], frame_numbers: Sequence[int] | None = None) -> np.ndarray:
    """``(K, rows, cols)`` segment numbers for the source instances (or frames of one
    multi-frame instance), in the given order."""
    if frame_numbers is not None:

        def get(**kwargs):
            return seg.get_pixels_by_source_frame(
                uids[0], source_frame_numbers=list(frame_numbers), assert_missing_frames_are_empty=True, **kwargs
            )
    else:

        def get(**kwargs):
            return seg.get_pixels_by_source_instance(list(uids), assert_missing_frames_are_empty=True, **kwargs)

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
