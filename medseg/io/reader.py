"""Entry points: :func:`find_series` and :func:`read_image` for any supported input path.

Supported inputs: a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage
(``.mha``, ``.mhd``) file; one DICOM file; a folder tree holding DICOM files and/or volume files;
a ``.zip`` archive of any of these (checked by :mod:`medseg.io.archive` before extraction).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from medseg.errors import MixedSeriesError, NoImageDataError, UnreadableFileError
from medseg.formats import has_dicm_marker
from medseg.io.archive import extract_zip
from medseg.io.dicom_scan import scan_dicom_files
from medseg.io.image import Image
from medseg.io.safety import CLI_POLICY, ReadPolicy
from medseg.io.series_info import SeriesInfo
from medseg.io.volume_files import read_itk, read_nifti, volume_format


def _volume_series(path: Path, source: str, policy: ReadPolicy) -> SeriesInfo:
    fmt = volume_format(path)
    from medseg.io.volume_files import guess_modality

    def reader(info: SeriesInfo) -> Image:
        read = read_nifti if info.format == "nifti" else read_itk
        image = read(info.files[0], info.policy)
        image.meta.update({"series_uid": info.uid, "series_description": info.description,
                           "instance_count": 1})
        return image

    return SeriesInfo(uid=str(path), modality=guess_modality(path), description=path.name,
                      instance_count=1, files=[str(path)], format=fmt or "", source=source,
                      policy=policy, _reader=reader)


def _walk(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            if not name.startswith("."):
                files.append(Path(root) / name)
    return files


def _is_zip(path: Path) -> bool:
    return path.suffix.lower() == ".zip"


def find_series(path: str | Path, policy: ReadPolicy = CLI_POLICY) -> list[SeriesInfo]:
    """Every image series in a file, folder tree or ZIP archive, without reading pixel data.

    ``policy`` (:class:`medseg.io.safety.ReadPolicy`) travels with each series and is enforced
    when it is read: detached MetaImage/NRRD data files, and the declared voxel count.

    DICOM instances are grouped by SeriesInstanceUID across the whole tree; each volume file
    (NIfTI/NRRD/MetaImage) is one series whose ``uid`` is its path. For an archive, the files
    live in a temporary folder that stays until the returned series (and images read from them)
    are garbage-collected.

    Raises:
        UnreadableFileError: the path does not exist, or a single file is corrupt / unknown.
        UnsafeArchiveError: see :func:`medseg.io.archive.check_archive`.
        NoImageDataError: a folder or archive without any image series.
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise UnreadableFileError(f"{path.name}: no such file or folder")
    if path.is_dir():
        return _find_in_folder(path, source, policy)
    if volume_format(path):
        return [_volume_series(path, source, policy)]
    if _is_zip(path) or (zipfile.is_zipfile(path) and not _has_dicm_marker(path)):
        folder = extract_zip(path)
        series = _find_in_folder(Path(folder.name), source, policy, archive=True)
        for info in series:
            info._keepalive = folder
            if info.format != "dicom":
                info.uid = str(Path(info.files[0]).relative_to(folder.name))
        return series
    from medseg.io.dicom_scan import read_header

    ds = read_header(path)  # raises UnreadableFileError for a corrupt DICOM file
    if ds is None:
        raise UnreadableFileError(f"{path.name}: not a DICOM, NIfTI, NRRD, MetaImage or ZIP file")
    series = scan_dicom_files([path], source=source, policy=policy)
    if not series:
        raise NoImageDataError(f"{path.name}: DICOM file holds no image "
                               f"(Modality {ds.get('Modality') or 'unknown'})")
    return series


def _has_dicm_marker(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return has_dicm_marker(head)


def _find_in_folder(folder: Path, source: str, policy: ReadPolicy, *,
                    archive: bool = False) -> list[SeriesInfo]:
    files = _walk(folder)
    volumes = [p for p in files if volume_format(p)]
    # .raw/.zraw data files of MetaImage headers are not DICOM candidates
    skip = {p.with_suffix(s) for p in volumes if p.suffix.lower() == ".mhd" for s in (".raw", ".zraw")}
    others = [p for p in files if not volume_format(p) and p not in skip]
    series = scan_dicom_files(others, source=source, policy=policy) if others else []
    series += [_volume_series(p, source, policy) for p in volumes]
    if not series:
        kind = "archive" if archive else "folder"
        raise NoImageDataError(f"{Path(source).name}: {kind} holds no DICOM image series or "
                               "image file")
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
        raise MixedSeriesError(f"{name}: series {series_uid} not found; available: "
                               + ", ".join(s.uid for s in series))
    if len(series) > 1:
        listing = ", ".join(f"{s.uid} ({s.modality} {s.description})".replace(" )", ")")
                            for s in series)
        raise MixedSeriesError(f"{name}: {len(series)} series found, choose one with "
                               f"series_uid / --series: {listing}")
    return series[0]


def read_image(path: str | Path, series_uid: str | None = None,
               policy: ReadPolicy = CLI_POLICY) -> Image:
    """Read one volume from a file, DICOM folder tree or ZIP archive.

    Args:
        path: NIfTI/NRRD/MetaImage file, DICOM file, folder or ``.zip``.
        series_uid: which series, when the input holds several (see :func:`find_series`).
        policy: what reading may touch (:class:`medseg.io.safety.ReadPolicy`).

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
    series = find_series(path, policy)
    return choose_series(series, series_uid, path.name).read()
