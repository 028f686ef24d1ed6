"""Reading one DICOM file's header without its pixels, and telling image instances from other
DICOM objects (SR, SEG, RT, presentation states, DICOMDIR): the first step of every DICOM path
(series discovery in :mod:`medseg.io.dicom_scan`, volume reading and header-only geometry in
:mod:`medseg.io.dicom_volume`, single files in :mod:`medseg.io.reader`). DICOM PS3.10 7.1 (the
Part 10 preamble and ``DICM`` marker)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from medseg.formats import has_dicm_marker

#: SOP Class UID prefixes of objects that are not image planes.
NON_IMAGE_SOP_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, fiducials, SEG, surface seg
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF/CDA/STL
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT structure set
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT plan
    "1.2.840.10008.5.1.4.1.1.481.4",  # RT treatment records
    "1.2.840.10008.5.1.4.1.1.481.6",
    "1.2.840.10008.5.1.4.1.1.481.7",
    "1.2.840.10008.5.1.4.1.1.481.8",
    "1.2.840.10008.5.1.4.1.1.481.9",
    "1.2.840.10008.5.1.4.1.1.91.",  # microscopy bulk annotations
)

#: Modalities of non-image objects.
NON_IMAGE_MODALITIES = {
    "SR",
    "PR",
    "SEG",
    "RTSTRUCT",
    "RTPLAN",
    "RTRECORD",
    "KO",
    "REG",
    "DOC",
    "FID",
    "ANN",
    "RWV",
    "AU",
    "ECG",
    "HD",
    "PLAN",
}


#: First two bytes of a DICOM dataset without the Part 10 preamble: group 0002 or 0008, little
#: or big endian.
_RAW_DATASET_STARTS = {b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"}


def read_header(path: str | Path) -> Dataset | None:
    """The header of a DICOM file, or ``None`` when the file is not DICOM.

    Files with the ``DICM`` marker must parse; files without it (some old exports) are accepted
    only if they parse and look like an image instance.

    Raises:
        UnreadableFileError: the file has the ``DICM`` marker but is corrupt.
    """
    from medseg.errors import UnreadableFileError

    path = Path(path)
    try:
        with path.open("rb") as handle:
            preamble = handle.read(132)
    except OSError as error:
        raise UnreadableFileError(f"{path.name}: cannot open ({error.strerror})") from None
    has_marker = has_dicm_marker(preamble)
    if not has_marker and preamble[:2] not in _RAW_DATASET_STARTS:
        return None  # neither Part 10 nor a raw dataset starting with group 0002/0008
    try:
        with path.open("rb") as handle:
            ds = pydicom.dcmread(handle, stop_before_pixels=True, force=not has_marker)
            stopped_at = handle.tell()
    except InvalidDicomError:
        if has_marker:
            raise UnreadableFileError(f"{path.name}: not a valid DICOM file") from None
        return None
    except Exception as error:  # truncated or garbage content
        if has_marker:
            raise UnreadableFileError(
                f"{path.name}: corrupt or truncated DICOM header ({type(error).__name__})"
            ) from None
        return None
    if not looks_like_instance(ds):
        if has_marker:
            raise UnreadableFileError(f"{path.name}: incomplete DICOM header (truncated?)")
        return None
    # pydicom stops in front of the pixel data; reaching the end of the file instead means an
    # image instance whose header (or pixel data element) was cut off.
    if (is_image_instance(ds) or _declares_image(ds)) and stopped_at >= path.stat().st_size:
        raise UnreadableFileError(f"{path.name}: truncated DICOM file (no pixel data)")
    return ds


def _declares_image(ds: Dataset) -> bool:
    """The file meta declares an image SOP class (even if the dataset lost Rows/Columns)."""
    sop = _sop_class(ds)
    return (
        bool(sop)
        and sop.startswith("1.2.840.10008.5.1.4.1.1.")
        and not any(sop.startswith(prefix) for prefix in NON_IMAGE_SOP_CLASS_PREFIXES)
    )


def _sop_class(ds: Dataset) -> str:
    value = str(ds.get("SOPClassUID") or "")
    if not value and getattr(ds, "file_meta", None) is not None:
        value = str(ds.file_meta.get("MediaStorageSOPClassUID") or "")
    return value


def is_image_instance(ds: Dataset) -> bool:
    """True for an instance with image planes (Rows/Columns, an image SOP Class and Modality)."""
    if "DirectoryRecordSequence" in ds:
        return False  # DICOMDIR
    if not ds.get("Rows") or not ds.get("Columns"):
        return False
    sop = _sop_class(ds)
    if any(sop.startswith(prefix) for prefix in NON_IMAGE_SOP_CLASS_PREFIXES):
        return False
    return str(ds.get("Modality") or "").upper() not in NON_IMAGE_MODALITIES


def looks_like_instance(ds: Dataset) -> bool:
    return bool(_sop_class(ds) or ds.get("Rows") or ds.get("SeriesInstanceUID"))
