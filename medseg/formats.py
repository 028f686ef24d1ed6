"""File formats by name: the one list of volume-file suffixes and the DICOM Part 10 marker.

Kept free of imports so that the command line, the readers, training and the service all use it
without loading numpy or torch.
"""

from __future__ import annotations

#: volume-file suffix -> format (longest suffixes first, so ``.nii.gz`` wins over ``.gz``)
VOLUME_SUFFIXES: dict[str, str] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
    ".tiff": "tiff",
    ".tif": "tiff",
}
NIFTI_SUFFIXES = tuple(s for s, f in VOLUME_SUFFIXES.items() if f == "nifti")
#: what an upload or an input may be named, besides volume files
ARCHIVE_SUFFIX, DICOM_SUFFIX = ".zip", ".dcm"


def volume_suffix(name: str) -> str | None:
    """The volume-file suffix ``name`` ends with (case-insensitive), or ``None``."""
    lower = name.lower()
    return next((s for s in VOLUME_SUFFIXES if lower.endswith(s)), None)


def volume_format(name: str) -> str | None:
    """``"nifti"``, ``"nrrd"``, ``"metaimage"``, ``"tiff"`` (3D stacks, :mod:`medseg.io.tiff`) or
    ``None`` from a file name."""
    suffix = volume_suffix(name)
    return VOLUME_SUFFIXES[suffix] if suffix else None


def strip_suffix(name: str) -> str:
    """``name`` without its volume, ``.dcm`` or ``.zip`` suffix."""
    suffix = volume_suffix(name) or next((s for s in (DICOM_SUFFIX, ARCHIVE_SUFFIX) if name.lower().endswith(s)), "")
    return name[: len(name) - len(suffix)] if suffix else name


def has_dicm_marker(head: bytes) -> bool:
    """Whether the first 132 bytes of a file carry the DICOM Part 10 preamble marker
    (``DICM`` at offset 128, PS3.10 7.1)."""
    return len(head) >= 132 and head[128:132] == b"DICM"


#: suffix of gzip-compressed files; ``.dcm.gz`` (and other non-volume ``.gz``) files are
#: decompressed and read as DICOM when their content carries a DICOM header.
GZIP_SUFFIX, GZIP_DICOM_SUFFIX = ".gz", ".dcm.gz"
#: the first two bytes of every gzip member (RFC 1952)
GZIP_MAGIC = b"\x1f\x8b"


def is_gzip_candidate(name: str) -> bool:
    """Whether ``name`` may be a gzip-compressed DICOM file: ends with ``.gz`` and is not a
    compressed volume file (``.nii.gz``)."""
    return name.lower().endswith(GZIP_SUFFIX) and volume_format(name) is None
