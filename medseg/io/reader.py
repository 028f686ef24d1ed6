"""Entry points: :func:`find_series` and :func:`read_image` for any supported input path.

Supported inputs: a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage
(``.mha``, ``.mhd``) or 3D TIFF stack (``.tif``, ``.tiff``; :mod:`medseg.io.tiff`, ``spacing`` when
the file states none) file; one DICOM file; a folder tree holding DICOM files and/or volume files;
a ``.zip`` archive of any of these (checked by :mod:`medseg.io.archive` before extraction).
Gzip-compressed DICOM files (``.dcm.gz``, or any non-volume ``.gz`` whose content starts like a
DICOM file) are decompressed into a temporary folder (never beside the input), with the same
size and compression-ratio caps as ZIP archives (:func:`decompress_gzip_dicom`).
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zipfile
import zlib
from pathlib import Path

from medseg.errors import (
    MixedSeriesError,
    NoImageDataError,
    UnreadableFileError,
    UnsafeArchiveError,
)
from medseg.formats import has_dicm_marker, is_gzip_candidate
from medseg.io import archive as _archive
from medseg.io.archive import extract_zip
from medseg.io.image import Image
from medseg.io.safety import CLI_POLICY, ReadPolicy
from medseg.io.series_info import SeriesInfo
from medseg.io.volume_files import read_itk, read_nifti, volume_format


def scan_dicom_files(*args, **kwargs):
    """:func:`medseg.io.dicom_scan.scan_dicom_files`, imported when a DICOM file is met: pydicom
    costs 0.3 s of every start-up that reads NIfTI, NRRD or TIFF only."""
    from medseg.io.dicom_scan import scan_dicom_files as scan

    return scan(*args, **kwargs)


def _volume_series(path: Path, source: str, policy: ReadPolicy, spacing=None) -> SeriesInfo:
    fmt = volume_format(path)
    from medseg.io.volume_files import guess_modality

    def reader(info: SeriesInfo) -> Image:
        if info.format == "tiff":
            from medseg.io.tiff import read_tiff

            image = read_tiff(info.files[0], info.policy, spacing=spacing)
        else:
            read = read_nifti if info.format == "nifti" else read_itk
            image = read(info.files[0], info.policy)
        image.meta.update({"series_uid": info.uid, "series_description": info.description, "instance_count": 1})
        return image

    return SeriesInfo(
        uid=str(path),
        modality=guess_modality(path),
        description=path.name,
        instance_count=1,
        files=[str(path)],
        format=fmt or "",
        source=source,
        policy=policy,
        _reader=reader,
    )


def _walk(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            if not name.startswith("."):
                files.append(Path(root) / name)
    return files


#: Largest total decompressed size of the ``.gz`` files of one input (bytes).
MAX_GZIP_BYTES = _archive.MAX_UNCOMPRESSED_BYTES
#: Raw dataset starts (group 0002/0008, either byte order) accepted like in the scan.
_DATASET_STARTS = {b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"}


def _gzip_head_is_dicom(path: Path) -> bool:
    try:
        with gzip.open(path, "rb") as handle:
            head = handle.read(132)
    except (OSError, EOFError, zlib.error):
        return False
    return has_dicm_marker(head) or head[:2] in _DATASET_STARTS


def decompress_gzip_dicom(
    paths: list[Path], root: Path | None, name: str
) -> tuple[list[Path], tempfile.TemporaryDirectory | None]:
    """Decompress the gzip-compressed DICOM files among ``paths`` into a new temporary folder.

    Only files named ``*.gz`` (not ``.nii.gz``) whose decompressed content starts with the DICOM
    Part 10 marker or a raw dataset are taken; the others are left alone. Files keep their path
    relative to ``root`` (without ``.gz``) inside the folder, so equal names do not collide.

    Returns:
        ``(decompressed paths, folder)``; ``folder`` is ``None`` when no file was taken. The
        caller keeps the folder alive as long as the files are needed.

    Raises:
        UnsafeArchiveError: the total decompressed size exceeds :data:`MAX_GZIP_BYTES`, or a
            file larger than 1 MiB decompresses more than
            :data:`medseg.io.archive.MAX_COMPRESSION_RATIO` times (gzip bomb).
        UnreadableFileError: a file is a corrupt or truncated gzip stream.
    """
    chosen = [p for p in paths if is_gzip_candidate(p.name) and _gzip_head_is_dicom(p)]
    if not chosen:
        return [], None
    folder = tempfile.TemporaryDirectory(prefix="medseg-gz-")
    out: list[Path] = []
    total = 0
    try:
        for index, path in enumerate(chosen):
            relative = Path(path.name) if root is None else path.relative_to(root)
            target = Path(folder.name) / relative.parent / relative.name[:-3]
            if target.exists():  # "a.dcm.gz" beside "a.dcm"
                target = target.with_name(f"{index}-{target.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            compressed = max(path.stat().st_size, 1)
            written = 0
            with gzip.open(path, "rb") as source, target.open("wb") as sink:
                while chunk := source.read(1024**2):
                    written += len(chunk)
                    total += len(chunk)
                    if total > MAX_GZIP_BYTES:
                        raise UnsafeArchiveError(f"{name}: gzip files decompress to more than {MAX_GZIP_BYTES} bytes")
                    if (
                        written >= _archive.RATIO_CHECK_MIN_BYTES
                        and written > _archive.MAX_COMPRESSION_RATIO * compressed
                    ):
                        raise UnsafeArchiveError(
                            f"{name}: {path.name} has compression ratio above "
                            f"{_archive.MAX_COMPRESSION_RATIO:g} (gzip bomb?)"
                        )
                    sink.write(chunk)
            out.append(target)
    except UnsafeArchiveError:
        folder.cleanup()
        raise
    except (OSError, EOFError, zlib.error) as error:
        folder.cleanup()
        raise UnreadableFileError(f"{name}: corrupt gzip file ({type(error).__name__})") from None
    except BaseException:
        folder.cleanup()
        raise
    return out, folder


def _is_zip(path: Path) -> bool:
    return path.suffix.lower() == ".zip"


def find_series(
    path: str | Path, policy: ReadPolicy = CLI_POLICY, spacing: tuple[float, float, float] | None = None
) -> list[SeriesInfo]:
    """Every image series in a file, folder tree or ZIP archive, without reading pixel data.

    ``policy`` (:class:`medseg.io.safety.ReadPolicy`) travels with each series and is enforced
    when it is read: detached MetaImage/NRRD data files, and the declared voxel count.
    ``spacing`` (mm along the array's X, Y, Z) is used for TIFF stacks (:func:`medseg.io.tiff.read_tiff`:
    it overrides the file's ImageJ/OME voxel size, and is required when the file states none).

    DICOM instances are grouped by SeriesInstanceUID across the whole tree; each volume file
    (NIfTI/NRRD/MetaImage) is one series whose ``uid`` is its path. For an archive, the files
    live in a temporary folder that stays until the returned series (and images read from them)
    are garbage-collected.

    Raises:
        UnreadableFileError: the path does not exist, or a single file is corrupt / unknown.
        UnsafeArchiveError: see :func:`medseg.io.archive.check_archive`; ``.gz`` files that
            decompress beyond the caps (:func:`decompress_gzip_dicom`).
        NoImageDataError: a folder or archive without any image series.
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise UnreadableFileError(f"{path.name}: no such file or folder")
    if path.is_dir():
        return _find_in_folder(path, source, policy, spacing=spacing)
    if volume_format(path):
        return [_volume_series(path, source, policy, spacing)]
    if _is_zip(path) or (zipfile.is_zipfile(path) and not _has_dicm_marker(path)):
        folder = extract_zip(path)
        series = _find_in_folder(Path(folder.name), source, policy, archive=True, spacing=spacing)
        for info in series:
            # keep the zip folder alive, and the .gz folder of files decompressed from it
            info._keepalive = folder if info._keepalive is None else (folder, info._keepalive)
            if info.format != "dicom":
                info.uid = str(Path(info.files[0]).relative_to(folder.name))
        return series
    if is_gzip_candidate(path.name):
        files, folder = decompress_gzip_dicom([path], None, path.name)
        if folder is None:
            raise UnreadableFileError(f"{path.name}: not a gzip-compressed DICOM file")
        series = scan_dicom_files(files, source=source, policy=policy)
        if not series:
            raise NoImageDataError(f"{path.name}: compressed DICOM file holds no image")
        for info in series:
            info._keepalive = folder
        return series
    from medseg.io.dicom_header import read_header

    ds = read_header(path)  # raises UnreadableFileError for a corrupt DICOM file
    if ds is None:
        raise UnreadableFileError(f"{path.name}: not a DICOM, NIfTI, NRRD, MetaImage, TIFF or ZIP file")
    series = scan_dicom_files([path], source=source, policy=policy)
    if not series:
        raise NoImageDataError(f"{path.name}: DICOM file holds no image (Modality {ds.get('Modality') or 'unknown'})")
    return series


def _has_dicm_marker(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return has_dicm_marker(head)


def _find_in_folder(
    folder: Path, source: str, policy: ReadPolicy, *, archive: bool = False, spacing=None
) -> list[SeriesInfo]:
    files = _walk(folder)
    volumes = [p for p in files if volume_format(p)]
    # .raw/.zraw data files of MetaImage headers are not DICOM candidates
    skip = {p.with_suffix(s) for p in volumes if p.suffix.lower() == ".mhd" for s in (".raw", ".zraw")}
    others = [p for p in files if not volume_format(p) and p not in skip]
    unzipped, gz_folder = decompress_gzip_dicom(
        [p for p in others if is_gzip_candidate(p.name)], folder, Path(source).name
    )
    others = [p for p in others if not is_gzip_candidate(p.name)] + unzipped
    series = scan_dicom_files(others, source=source, policy=policy) if others else []
    if gz_folder is not None:
        for info in series:
            if any(f.startswith(gz_folder.name) for f in info.files):
                info._keepalive = gz_folder
    series += [_volume_series(p, source, policy, spacing) for p in volumes]
    if not series:
        kind = "archive" if archive else "folder"
        raise NoImageDataError(f"{Path(source).name}: {kind} holds no DICOM image series or image file")
    return series


def choose_series(series: list[SeriesInfo], series_uid: str | None, name: str) -> SeriesInfo:
    """The one series to read: ``series_uid`` if given, else the only one.

    Raises:
        MixedSeriesError: several series and none chosen (the message lists their UIDs), or
            ``series_uid`` is not among them.
    """
    if series_uid is not None:
        for info in series:
            if info.uid == series_uid:
                return info
        raise MixedSeriesError(f"{name}: series {series_uid} not found; available: " + ", ".join(s.uid for s in series))
    if len(series) > 1:
        listing = ", ".join(f"{s.uid} ({s.modality} {s.description})".replace(" )", ")") for s in series)
        raise MixedSeriesError(f"{name}: {len(series)} series found, choose one with series_uid / --series: {listing}")
    return series[0]


def read_image(
    path: str | Path,
    series_uid: str | None = None,
    policy: ReadPolicy = CLI_POLICY,
    spacing: tuple[float, float, float] | None = None,
) -> Image:
    """Read one volume from a file, DICOM folder tree or ZIP archive.

    Args:
        path: NIfTI/NRRD/MetaImage file, DICOM file, folder or ``.zip``.
        series_uid: which series, when the input holds several (see :func:`find_series`).
        policy: what reading may touch (:class:`medseg.io.safety.ReadPolicy`).
        spacing: voxel size in mm along the array's ``(X, Y, Z)`` for TIFF stacks (see
            :func:`medseg.io.tiff.read_tiff`); ignored for other formats, which carry their geometry.

    Returns:
        :class:`Image` with ``array`` ``(I, J, K)`` or ``(I, J, K, T)`` and a voxel -> RAS+ mm
        ``affine``; for DICOM, ``meta`` has modality, series_uid, study_uid,
        series_description, series_number, instance_count, manufacturer and source, and
        ``dicom_source`` lists the slice files in k order.

    Raises:
        MixedSeriesError: several series and ``series_uid`` not given (UIDs listed).
        NoImageDataError, UnreadableFileError, UnsafeArchiveError, MissingGeometryError,
        UnsupportedInputError, UnsafeInputError, InputTooLargeError: bad input, one line naming
        the file or series.
    """
    path = Path(path)
    series = find_series(path, policy, spacing)
    return choose_series(series, series_uid, path.name).read()
