"""Validating a job's options and input before it is queued.

An upload is one NIfTI / NRRD / MetaImage file, one ZIP of DICOM files, or one or more DICOM
files. It is accepted only if its headers are readable (:mod:`medseg.io`, the same reader the
worker uses, but headers only: :meth:`medseg.io.SeriesInfo.geometry`), it holds exactly one image
series or the one chosen by ``series_uid``, and that series fits the model card by the rule
``medseg predict`` applies (:func:`medseg.inference.matching.series_mismatch`: modality,
channels, field of view). Pixels are decoded once, by the worker; pixels that turn out to be
undecodable fail the job with the reader's error. Everything else is a 4xx
:class:`medseg.errors.MedsegError` naming the file or series (never a patient identifier).
"""

from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

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
from medseg.package import ModelCard
from service.config import Settings
from service.models import DICOM_ONLY, OPT_IN, JobInput, JobOptions, default_results
from service.problems import Problem
from service.uploads import Received, display_name


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
) -> JobInput:
    """Check an upload in ``upload_dir`` (which becomes ``<job>/input``) from its headers alone;
    returns the job's :class:`~service.models.JobInput` (``path`` relative to the job folder,
    ``shape`` and ``spacing`` (mm) from the headers, ``formats`` resolved, ``validate_s``).

    No pixel is decoded here: the series are found from their headers
    (:func:`medseg.io.find_series`), the chosen one's grid comes from its headers
    (:meth:`medseg.io.SeriesInfo.geometry`) and its fit is decided by
    :func:`medseg.inference.matching.series_mismatch`, as ``medseg predict`` decides it.

    Raises:
        MedsegError: unreadable or truncated headers, unsafe, too large, several series,
            modality / channels / field of view mismatch, too much work, formats that need
            DICOM input.
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
    from medseg.inference.matching import modality_mismatch, series_mismatch
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
        reason = modality_mismatch(series.modality, card)  # before the headers of every instance
        if reason:
            raise ModalityMismatchError(f"series {series.uid}: {reason}")
        formats = options.formats or default_results(source_kind)
        if source_kind != "dicom" and any(f in DICOM_ONLY for f in formats):
            kinds = " and ".join("a DICOM SEG" if f == "seg" else "an RTSTRUCT" for f in DICOM_ONLY if f in formats)
            raise UnsupportedInputError(f"{name}: {kinds} needs DICOM input")
        # the grid from the headers (declared size, detached data and geometry checked as the
        # reader checks them), never the pixels: the worker decodes them, once
        grid = series.geometry()
        reason = series_mismatch(series.modality, grid.shape, grid.affine, card)
        if reason:
            error = ModalityMismatchError if reason.startswith("modality") else SeriesMismatchError
            raise error(f"{name}: {reason}")
        windows = planned_windows(grid.shape[:3], grid.affine, card, options.overlap, options.tta)
        check_work(windows, settings.max_windows, name)
    except MedsegError as error:  # name the client's file, not the server's copy of it
        if target == upload_dir:
            raise
        raise type(error)(str(error).replace(target.name, name)) from None
    return JobInput(
        kind=source_kind,
        path=str(Path("input") / target.relative_to(upload_dir)) if target != upload_dir else "input",
        # a single volume file's "uid" is its path in the upload folder, which moves: not kept
        series_uid=series.uid if target.is_dir() or target.suffix == ".zip" else None,
        study_uid=series.study_uid or None,
        modality=series.modality or None,
        instances=series.instance_count,
        shape=list(grid.shape[:3]),
        spacing=[round(s, 4) for s in grid.spacing],
        warnings=list(series.warnings)[:20],
        formats=formats,
        validate_s=time.perf_counter() - start,
    )


__all__ = ["JobOptions", "DICOM_ONLY", "OPT_IN", "parse_options", "prepare_input", "sniff", "check_zip_limits"]
