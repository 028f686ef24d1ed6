"""Validating a job's options and input before it is queued.

An upload is one NIfTI / NRRD / MetaImage file, one ZIP of DICOM files, or one or more DICOM
files. It is accepted only if it is readable (headers and pixels, with :mod:`medseg.io`, the same
reader the worker uses), holds exactly one image series or the one chosen by ``series_uid``, and
that series' modality fits the model card. Everything else is a 4xx
:class:`medseg.errors.MedsegError` naming the file or series (never a patient identifier).
"""

from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medseg.errors import (
    InputTooLargeError,
    MedsegError,
    ModalityMismatchError,
    NoImageDataError,
    SeriesMismatchError,
    UnreadableFileError,
    UnsafeArchiveError,
    UnsupportedInputError,
)
from medseg.formats import has_dicm_marker
from medseg.package import MODEL_NAME_PATTERN, ModelCard
from service.config import Settings
from service.pipeline import RESULT_FORMATS
from service.problems import Problem
from service.uploads import Received, display_name

DICOM_ONLY = ("seg", "rtstruct")
#: results written only when asked for (not in the default "all that fit the input")
OPT_IN = ("rtstruct",)
MAX_OVERLAP = 0.9  # the work grows as 1 / (1 - overlap) ** 3: 0.99 is a million times 0.5


class JobOptions(BaseModel):
    """Options of a job (form fields of ``POST /v1/jobs``)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        max_length=100,
        pattern=MODEL_NAME_PATTERN,
        description="a registered model name (GET /v1/models), never a path; default: the service's",
    )
    series_uid: str | None = Field(
        None, max_length=200, description="series to segment when the upload holds several (SeriesInstanceUID)"
    )
    tta: bool = Field(False, description="test-time augmentation (mirroring)")
    overlap: float | None = Field(
        None, ge=0.0, le=MAX_OVERLAP, description="sliding-window overlap in [0, 0.9]; default: the model card's"
    )
    formats: list[str] | None = Field(
        None,
        description="results to write: seg, nifti, report, "
        "preview, rtstruct (default: all that fit the input, "
        "except rtstruct; seg and rtstruct need DICOM input)",
    )

    @field_validator("formats", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            value = [part.strip() for item in value for part in str(item).split(",") if part.strip()]
            unknown = sorted(set(value) - set(RESULT_FORMATS))
            if unknown:
                raise ValueError(f"unknown format(s) {', '.join(unknown)} (choose from {', '.join(RESULT_FORMATS)})")
            return sorted(set(value), key=list(RESULT_FORMATS).index) or None
        return value


def parse_options(fields: dict[str, list[str]]) -> JobOptions:
    """Form fields -> :class:`JobOptions`.

    Raises:
        Problem: 422 ``invalid-request`` naming the bad field.
    """
    values: dict[str, Any] = {name: (vals if name == "formats" else vals[-1]) for name, vals in fields.items()}
    for name in ("model", "series_uid", "overlap"):
        if values.get(name) == "":
            values[name] = None
    try:
        return JobOptions.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        name = ".".join(str(p) for p in first["loc"]) or "form"
        message = "unknown form field" if first["type"] == "extra_forbidden" else first["msg"]
        raise Problem(422, "invalid-request", f"form field '{name[:40]}': {message}") from None


def sniff(path: Path) -> str:
    """``zip``, ``dicom``, ``nifti``, ``nifti-gz``, ``nrrd``, ``metaimage`` or ``unknown``, by content."""
    with open(path, "rb") as handle:
        head = handle.read(352)
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        return "zip"
    if has_dicm_marker(head):
        return "dicom"
    if head[:2] == b"\x1f\x8b":
        return "nifti-gz"
    if head[:4] == b"NRRD":
        return "nrrd"
    if head.lstrip().startswith((b"ObjectType", b"NDims")):
        return "metaimage"
    if len(head) >= 348 and head[344:347] in (b"n+1", b"ni1", b"n+2"):
        return "nifti"
    return "unknown"


_SUFFIX = {"zip": ".zip", "nifti-gz": ".nii.gz", "nifti": ".nii", "nrrd": ".nrrd", "metaimage": ".mha"}


def check_zip_limits(path: Path, settings: Settings, name: str) -> None:
    """The service's configured ZIP limits (entries, uncompressed size, ratio), before extraction.

    :func:`medseg.io.archive.check_archive` (called by the reader) adds the safety rules
    (traversal, links) and its own hard ceilings.

    Raises:
        UnreadableFileError: not a readable ZIP. UnsafeArchiveError / InputTooLargeError: limits.
    """
    from medseg.io.archive import check_archive

    try:
        with zipfile.ZipFile(path) as archive:
            entries = check_archive(archive, name)
    except zipfile.BadZipFile:
        raise UnreadableFileError(f"{name}: not a readable ZIP archive") from None
    if len(entries) > settings.max_instances:
        raise InputTooLargeError(f"{name}: {len(entries)} files exceed the limit of {settings.max_instances}")
    total = sum(e.file_size for e in entries)
    compressed = sum(e.compress_size for e in entries)
    if total > settings.max_uncompressed_bytes:
        raise UnsafeArchiveError(
            f"{name}: uncompressed size {total} bytes exceeds the limit of {settings.max_uncompressed_bytes} bytes"
        )
    if total > settings.max_zip_ratio * max(compressed, 1) and total > 1024**2:
        raise UnsafeArchiveError(
            f"{name}: compression ratio {total / max(compressed, 1):.0f} exceeds {settings.max_zip_ratio:g} (zip bomb?)"
        )


def prepare_input(
    received: Received, upload_dir: Path, settings: Settings, card: ModelCard, options: JobOptions
) -> dict[str, Any]:
    """Check an upload in ``upload_dir`` (which becomes ``<job>/input``); returns the job's input
    record: ``kind``, ``path`` (relative to the job folder), ``series_uid``, ``modality``,
    ``instances``, ``shape``, ``spacing`` (mm) and ``validate_s``.

    Raises:
        MedsegError: unreadable, unsafe, several series, modality mismatch, wrong formats.
    """
    start = time.perf_counter()
    files = received.files
    if not files:
        raise NoImageDataError("no file in the upload (send the image in form field 'file')")
    kinds = [sniff(f.path) for f in files]
    if len(files) == 1 and kinds[0] != "dicom":
        file, kind = files[0], kinds[0]
        name = display_name(file.filename)
        if kind == "unknown":
            raise UnreadableFileError(f"{name}: not a NIfTI, NRRD, MetaImage, DICOM or ZIP file")
        target = file.path
        wanted = _SUFFIX[kind]
        if not (kind == "metaimage" and target.suffix.lower() == ".mhd") and not target.name.lower().endswith(wanted):
            target = target.with_name(target.name.split(".")[0] + wanted)
            os.replace(file.path, target)
        if kind == "zip":
            check_zip_limits(target, settings, name)
    else:
        if "zip" in kinds:
            raise UnsupportedInputError("send one ZIP archive, or DICOM files, not both")
        bad = [display_name(f.filename) for f, k in zip(files, kinds) if k != "dicom"]
        if len(bad) == len(files):
            raise UnreadableFileError(f"{bad[0]}: not a DICOM file")
        target, name = upload_dir, f"{len(files)} uploaded files"

    from medseg.inference.budget import check_work, planned_windows
    from medseg.inference.matching import image_mismatch, modality_mismatch
    from medseg.io import find_series
    from medseg.io.reader import choose_series

    try:
        series_list = find_series(target, settings.read_policy)
        if not series_list:
            raise NoImageDataError(f"{name}: no image series found")
        series = choose_series(series_list, options.series_uid, name)
        source_kind = "dicom" if series.format == "dicom" else "volume"
        if series.instance_count > settings.max_instances:
            raise InputTooLargeError(
                f"series {series.uid}: {series.instance_count} instances exceed the limit of {settings.max_instances}"
            )
        reason = modality_mismatch(series.modality, card)  # before any pixel is read
        if reason:
            raise ModalityMismatchError(f"series {series.uid}: {reason}")
        formats = options.formats or [
            f for f in RESULT_FORMATS if f not in OPT_IN and (source_kind == "dicom" or f not in DICOM_ONLY)
        ]
        if source_kind != "dicom" and any(f in DICOM_ONLY for f in formats):
            kinds = " and ".join("a DICOM SEG" if f == "seg" else "an RTSTRUCT" for f in DICOM_ONLY if f in formats)
            raise UnsupportedInputError(f"{name}: {kinds} needs DICOM input")
        # pixels too (headers first: detached data, declared size): a truncated, undecodable or
        # unsafe file is refused now, by the same reader and the same checks the worker uses
        image = series.read()
        reason = image_mismatch(image, card)
        if reason:
            error = ModalityMismatchError if reason.startswith("modality") else SeriesMismatchError
            raise error(f"{name}: {reason}")
        windows = planned_windows(image.shape, image.affine, card, options.overlap, options.tta)
        check_work(windows, settings.max_windows, name)
    except MedsegError as error:  # name the client's file, not the server's copy of it
        if target == upload_dir:
            raise
        raise type(error)(str(error).replace(target.name, name)) from None
    return {
        "kind": source_kind,
        "path": str(Path("input") / target.relative_to(upload_dir)) if target != upload_dir else "input",
        # a single volume file's "uid" is its path in the upload folder, which moves: not kept
        "series_uid": series.uid if target.is_dir() or target.suffix == ".zip" else None,
        "study_uid": series.study_uid or None,
        "modality": series.modality or None,
        "instances": series.instance_count,
        "shape": list(image.shape),
        "spacing": [round(s, 4) for s in image.spacing],
        "warnings": list(image.warnings)[:20],
        "formats": formats,
        "validate_s": time.perf_counter() - start,
    }


__all__ = ["JobOptions", "parse_options", "prepare_input", "sniff", "check_zip_limits"]
