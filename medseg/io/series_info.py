"""What :func:`medseg.io.find_series` reports about one image series, before any pixel is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from medseg.io.image import Image


@dataclass
class SeriesInfo:
    """One image series found in a file, folder or archive.

    Attributes:
        uid: SeriesInstanceUID for DICOM (a derived ``nouid-...`` key when the tag is empty);
            the file path for NIfTI/NRRD/MetaImage files.
        modality: DICOM Modality (``CT``, ``MR``...), or from the file name / sidecar JSON for
            volume files, else ``""``.
        description: SeriesDescription (or the file name for volume files).
        study_uid: StudyInstanceUID (``""`` when unknown).
        instance_count: image instances kept for the series (1 for a volume file).
        files: the kept instance paths (one path for a volume file).
        warnings: what the scan skipped (localizers, other orientations, unreadable files...).
        series_number: DICOM SeriesNumber, if any.
        format: ``"dicom"``, ``"nifti"``, ``"nrrd"`` or ``"metaimage"``.
        source: the path the user gave (file, folder or archive).
    """

    uid: str
    modality: str = ""
    description: str = ""
    study_uid: str = ""
    instance_count: int = 0
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    series_number: int | None = None
    format: str = "dicom"
    source: str = ""
    _reader: Callable[["SeriesInfo"], Image] | None = field(default=None, repr=False,
                                                            compare=False)
    _keepalive: Any = field(default=None, repr=False, compare=False)

    def read(self) -> Image:
        """Read the series' pixels into an :class:`Image` (see :func:`medseg.io.read_image`)."""
        if self._reader is None:
            raise RuntimeError(f"series {self.uid} has no reader")
        image = self._reader(self)
        image.meta.setdefault("source", self.source)
        image.meta.setdefault("instance_count", self.instance_count)
        return image

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no pixel data, no patient identifiers)."""
        return {
            "uid": self.uid,
            "modality": self.modality,
            "description": self.description,
            "study_uid": self.study_uid,
            "series_number": self.series_number,
            "instance_count": self.instance_count,
            "format": self.format,
            "warnings": list(self.warnings),
        }
