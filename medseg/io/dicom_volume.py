"""Stack the frames of one DICOM series into a volume with a verified RAS+ affine.

Slices are ordered by their distance along the slice normal (``row x column`` of
ImageOrientationPatient) computed from ImagePositionPatient, never by InstanceNumber or file name.
Frames at the same position are either duplicates (identical pixels: dropped with a warning) or
the time points of a multi-volume series (fMRI, DWI), which become a trailing T axis. Time
points are ordered by what defines them: TemporalPositionIdentifier, the diffusion b-value and
gradient direction (public or Siemens/GE/Philips private tags), TriggerTime, and only then
InstanceNumber and AcquisitionNumber (:func:`_time_order`): Philips exports whose
AcquisitionNumber changes within a volume would otherwise mix slices of different volumes.
Echoes and magnitude/phase/derived images of one series are separated earlier, by the scan
(:func:`medseg.io.dicom_scan.split_series`).

A stack whose positions do not lie on a regular grid along the normal (variable slice gaps, or
the sheared stack of a CT with gantry tilt) is resampled onto the orthogonal grid
``(row, column, normal)`` with linear interpolation, with a warning; the affine is never silently
wrong.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MissingGeometryError, UnreadableFileError, UnsupportedInputError
from medseg.io.dicom_frames import Frame, decode_pixels, frame_pixels, frames_of, read_instance
from medseg.io.image import Image

log = logging.getLogger(__name__)

#: LPS (DICOM patient) <-> RAS+ (NIfTI world): negate the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Largest distance (mm) between a slice's ImagePositionPatient and the regular grid through the
#: first and last slice before the stack counts as non-uniform or sheared (and is resampled).
GRID_TOLERANCE_MM = 0.02

#: Frames whose positions along the normal differ by less than this (mm) share one slice.
SAME_POSITION_MM = 0.01

#: Relative tolerance for PixelSpacing to be considered equal between frames.
PIXEL_SPACING_RTOL = 1e-4


def _dataset_meta(ds: Any) -> dict[str, Any]:
    """Series-level metadata without patient identifiers."""

    def text(keyword: str) -> str:
        value = ds.get(keyword)
        return "" if value is None else str(value)

    number = ds.get("SeriesNumber")
    try:
        number = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        number = None
    return {
        "modality": text("Modality"),
        "series_uid": text("SeriesInstanceUID"),
        "study_uid": text("StudyInstanceUID"),
        "series_description": text("SeriesDescription"),
        "series_number": number,
        "manufacturer": text("Manufacturer"),
        "frame_of_reference_uid": text("FrameOfReferenceUID"),
    }


def _output_dtype(
    stored: list[np.dtype], slopes: np.ndarray, intercepts: np.ndarray, low: float, high: float
) -> np.dtype:
    """Smallest dtype that holds rescaled values exactly (float32 when a slope is not 1)."""
    if np.any(slopes != 1.0) or np.any(intercepts != np.round(intercepts)):
        return np.dtype(np.float32)
    if np.all(intercepts == 0) and len(set(stored)) == 1 and stored[0].kind in "ui":
        return stored[0]
    for candidate in (np.int16, np.int32):
        info = np.iinfo(candidate)
        if info.min <= low and high <= info.max:
            return np.dtype(candidate)
    return np.dtype(np.float64)


def read_dicom_volume(
    files: list[str], *, series_name: str, warnings: list[str] | None = None, meta: dict[str, Any] | None = None
) -> Image:
    """Read one series' instances into an :class:`Image`.

    Args:
        files: paths of the series' image instances (any order).
        series_name: how to name the series in messages (UID, or description and UID).
        warnings: notes gathered while scanning (copied into ``Image.warnings``).
        meta: extra metadata merged into ``Image.meta``.

    Returns:
        ``Image`` with ``array`` ``(I, J, K)`` or ``(I, J, K, T)`` where ``I`` runs along a row
        (column index), ``J`` down the columns (row index) and ``K`` along the slice normal;
        values rescaled by RescaleSlope/Intercept (CT in HU); ``affine`` voxel -> RAS+ mm;
        ``dicom_source`` the file of each k-slice (first time point).

    Raises:
        NoImageDataError / UnreadableFileError / UnsupportedInputError / MissingGeometryError:
            see :func:`medseg.io.dicom_frames.frames_of` and the checks below, each naming the
            series.
    """
    notes = list(warnings or [])
    frames, planes, first_ds = _decode_frames(files, series_name)
    reference = frames[0]
    _check_same_plane(frames, series_name)
    normal = np.cross(reference.row_cosine, reference.column_cosine)
    clusters = _slice_positions(frames, planes, normal, series_name, notes)
    volumes = len(clusters[0])
    array = _stack(frames, planes, clusters, volumes)
    array, affine, resampled = _geometry(array, frames, clusters, normal, first_ds, series_name, notes)
    if volumes == 1:
        array = array[..., 0]
    source_files = [frames[c[0]].file for c in clusters]
    image_meta = _dataset_meta(first_ds) if first_ds is not None else {}
    image_meta.update(meta or {})
    image_meta.update(
        {
            "instance_count": len({f.file for f in frames}),
            "dicom_layout": (
                "mosaic"
                if reference.tile is not None
                else "multi-frame"
                if reference.frame_number is not None
                else "single-frame"
            ),
            "resampled": resampled,
        }
    )
    if reference.frame_number is not None:
        image_meta["dicom_frame_numbers"] = [frames[c[0]].frame_number for c in clusters]
    if volumes > 1:
        image_meta["volumes"] = volumes
    for note in notes:
        log.info("series %s: %s", series_name, note)
    return Image(
        array=array, affine=affine, meta=image_meta, warnings=notes, dicom_source=None if resampled else source_files
    )


def _decode_frames(files: list[str], series_name: str) -> tuple[list[Frame], list[np.ndarray], Any]:
    """Every frame of every instance with its ``(rows, columns)`` stored plane, and the first
    dataset (for series-level attributes)."""
    frames: list[Frame] = []
    planes: list[np.ndarray] = []
    first_ds = None
    for path in files:
        ds = read_instance(path)
        if first_ds is None:
            first_ds = ds
        instance_frames = frames_of(ds, path)
        pixels = decode_pixels(ds, path)
        frame_count = pixels.shape[0] if pixels.ndim == 3 else 1
        if instance_frames[0].frame_number and len(instance_frames) != frame_count:
            raise UnreadableFileError(f"{Path(path).name}: NumberOfFrames does not match the pixel data")
        for frame in instance_frames:
            frames.append(frame)
            planes.append(frame_pixels(pixels, frame))
    if not frames:
        raise MissingGeometryError(f"series {series_name}: no image frames")
    return frames, planes, first_ds


def _check_same_plane(frames: list[Frame], series_name: str) -> None:
    """All frames share orientation, matrix size and PixelSpacing (else UnsupportedInputError)."""
    reference = frames[0]
    for frame in frames[1:]:
        if frame.orientation_key() != reference.orientation_key():
            raise UnsupportedInputError(f"series {series_name}: frames with different orientations in one series")
        if frame.shape != reference.shape:
            raise UnsupportedInputError(
                f"series {series_name}: frames of different sizes {frame.shape} and {reference.shape}"
            )
        if not np.allclose(frame.pixel_spacing, reference.pixel_spacing, rtol=PIXEL_SPACING_RTOL, atol=0):
            raise UnsupportedInputError(f"series {series_name}: frames with different PixelSpacing")


def _slice_positions(
    frames: list[Frame], planes: list[np.ndarray], normal: np.ndarray, series_name: str, notes: list[str]
) -> list[list[int]]:
    """Frame indices per slice position along ``normal`` (sorted), each in time order with exact
    duplicates dropped; every position holds the same number of frames (volumes)."""
    clusters = _position_clusters(frames, normal, series_name)
    order_key = _time_order(frames)
    duplicates: list[str] = []  # file of each dropped frame
    for cluster in clusters:
        cluster.sort(key=order_key)
        seen: set[bytes] = set()
        kept = []
        for index in cluster:
            digest = hashlib.sha1(np.ascontiguousarray(planes[index]).tobytes()).digest()
            if digest in seen:
                duplicates.append(Path(frames[index].file).name)
                continue
            seen.add(digest)
            kept.append(index)
        cluster[:] = kept
    if duplicates:
        names = sorted(set(duplicates))
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        notes.append(
            f"skipped {len(duplicates)} duplicate slice(s) (same position and pixel "
            f"data) in {len(names)} file(s): {shown}"
        )
    counts = {len(cluster) for cluster in clusters}
    if len(counts) != 1:
        raise UnsupportedInputError(
            f"series {series_name}: slice positions hold different numbers of images "
            f"({min(counts)}..{max(counts)}); incomplete multi-volume series?"
        )
    return clusters


def _position_clusters(frames: list[Frame], normal: np.ndarray, series_name: str) -> list[list[int]]:
    """Frame indices grouped by slice position along ``normal`` (sorted by distance); headers only.

    Raises:
        UnsupportedInputError: frames at one slice location with different in-plane positions.
    """
    distances = np.array([float(np.dot(f.position, normal)) for f in frames])
    order = np.argsort(distances, kind="stable")
    clusters: list[list[int]] = []
    for index in order:
        if clusters and abs(distances[index] - distances[clusters[-1][0]]) < SAME_POSITION_MM:
            clusters[-1].append(int(index))
        else:
            clusters.append([int(index)])
    for cluster in clusters:
        base = frames[cluster[0]].position
        for index in cluster[1:]:
            if np.linalg.norm(frames[index].position - base) > GRID_TOLERANCE_MM:
                raise UnsupportedInputError(
                    f"series {series_name}: frames at the same slice location have different in-plane positions"
                )
    return clusters


def _time_order(frames: list[Frame]):
    """Sort key (frame index -> tuple) putting the frames at one position in time order.

    Time points are ordered by what defines them (:attr:`Frame.volume_key`):
    TemporalPositionIdentifier, then the diffusion (b-value, gradient direction) -- ranked by
    first appearance (smallest InstanceNumber) so that volumes keep their acquisition order --
    then TriggerTime; InstanceNumber and AcquisitionNumber only break the remaining ties.
    """
    first: dict[Any, tuple] = {}
    for frame in frames:
        diffusion = frame.volume_key[1] if len(frame.volume_key) > 1 else ()
        if diffusion not in first or frame.temporal_key < first[diffusion]:
            first[diffusion] = frame.temporal_key
    rank = {key: index for index, key in enumerate(sorted(first, key=lambda k: first[k]))}

    def key(index: int) -> tuple:
        frame = frames[index]
        volume = frame.volume_key or (0.0, (), 0.0)
        return (volume[0], rank[volume[1]], volume[2], *frame.temporal_key)

    return key


def _stack(frames: list[Frame], planes: list[np.ndarray], clusters: list[list[int]], volumes: int) -> np.ndarray:
    """Rescaled (RescaleSlope/Intercept) planes stacked as ``(I, J, K, T)`` in the smallest
    dtype that holds the values."""
    slopes = np.array([frames[c[t]].slope for c in clusters for t in range(volumes)])
    intercepts = np.array([frames[c[t]].intercept for c in clusters for t in range(volumes)])
    low = min(
        float(planes[i].min()) * s + b for c in clusters for i in c for s, b in [(frames[i].slope, frames[i].intercept)]
    )
    high = max(
        float(planes[i].max()) * s + b for c in clusters for i in c for s, b in [(frames[i].slope, frames[i].intercept)]
    )
    low, high = min(low, high), max(low, high)
    dtype = _output_dtype([planes[i].dtype for c in clusters for i in c], slopes, intercepts, low, high)
    rows, cols = frames[0].shape
    array = np.empty((cols, rows, len(clusters), volumes), dtype=dtype)
    for k, cluster in enumerate(clusters):
        for t, index in enumerate(cluster):
            frame, plane = frames[index], planes[index]
            if frame.slope != 1.0 or frame.intercept != 0.0:
                values = plane.astype(np.float64) * frame.slope + frame.intercept
            else:
                values = plane
            array[:, :, k, t] = values.T.astype(dtype, copy=False)
    return array


def _stack_affine(
    frames: list[Frame], clusters: list[list[int]], normal: np.ndarray, first_ds: Any, notes: list[str]
) -> tuple[np.ndarray, bool, bool]:
    """The LPS affine of the regular grid through the first and last slice, and whether the
    slices are sheared (gantry tilt) or unevenly spaced (then they must be resampled)."""
    reference = frames[0]
    row, col = reference.row_cosine, reference.column_cosine
    row_spacing, col_spacing = reference.pixel_spacing
    positions = np.array([frames[c[0]].position for c in clusters])
    affine = np.eye(4)
    affine[:3, 0] = row * col_spacing
    affine[:3, 1] = col * row_spacing
    affine[:3, 3] = positions[0]
    if len(clusters) == 1:
        step = None
        if first_ds is not None:
            step = first_ds.get("SpacingBetweenSlices") or first_ds.get("SliceThickness")
        if step in (None, ""):
            notes.append("single slice without SpacingBetweenSlices/SliceThickness: slice spacing set to 1 mm")
            step = 1.0
        affine[:3, 2] = normal * float(step)
        return affine, False, False
    offsets = positions - positions[0]
    along = offsets @ normal
    in_plane = offsets - along[:, None] * normal
    regular = np.arange(len(clusters)) * (along[-1] / (len(clusters) - 1))
    sheared = float(np.linalg.norm(in_plane, axis=1).max()) > GRID_TOLERANCE_MM
    uneven = float(np.abs(along - regular).max()) > GRID_TOLERANCE_MM
    affine[:3, 2] = (positions[-1] - positions[0]) / (len(clusters) - 1)
    return affine, sheared, uneven


def _geometry(
    array: np.ndarray,
    frames: list[Frame],
    clusters: list[list[int]],
    normal: np.ndarray,
    first_ds: Any,
    series_name: str,
    notes: list[str],
) -> tuple[np.ndarray, np.ndarray, bool]:
    """The RAS+ affine on the regular grid through the first and last slice; a sheared (gantry
    tilt) or unevenly spaced series is resampled onto a regular grid. Returns
    ``(array, affine, resampled)``."""
    affine, sheared, uneven = _stack_affine(frames, clusters, normal, first_ds, notes)
    resampled = False
    if sheared or uneven:
        reference = frames[0]
        positions = np.array([frames[c[0]].position for c in clusters])
        array, affine, note = _resample_regular(
            array,
            positions,
            reference.row_cosine,
            reference.column_cosine,
            normal,
            reference.pixel_spacing,
            series_name,
            sheared=sheared,
        )
        notes.append(note)
        resampled = True
    return array, LPS_TO_RAS @ affine, resampled


def _regular_grid(
    positions: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    normal: np.ndarray,
    spacing: tuple[float, float],
    series_name: str,
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """The grid a sheared or unevenly spaced stack is resampled onto: ``(along, LPS affine,
    step (mm), slice count)``, ``along`` being each slice's distance from the first along ``normal``.

    Raises:
        MissingGeometryError: two slices at the same position.
    """
    row_spacing, col_spacing = spacing
    along = (positions - positions[0]) @ normal
    gaps = np.diff(along)
    if np.any(gaps <= 0):
        raise MissingGeometryError(f"series {series_name}: slice positions are not distinct")
    step = float(np.median(gaps))
    count = int(round(along[-1] / step)) + 1
    affine = np.eye(4)
    affine[:3, 0] = row * col_spacing
    affine[:3, 1] = col * row_spacing
    affine[:3, 2] = normal * step
    affine[:3, 3] = positions[0]
    return along, affine, step, count


#: Pixel data elements (PixelData, FloatPixelData, DoubleFloatPixelData) and the VRs with a
#: 4-byte length in explicit VR encoding.
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"UN", b"UC", b"UR", b"UT", b"SQ", b"SV", b"UV"}


def check_pixel_data_length(path: str | Path) -> None:
    """Refuse a DICOM file that ends before the end its pixel data element declares.

    Only the element's header is read (its tag and length), never the pixel data: a stat of the
    file tells the rest. Encapsulated (compressed) pixel data has no declared length and is
    checked when decoded; so are deflated datasets.

    Raises:
        UnreadableFileError: the file is shorter than its pixel data element says (truncated).
    """
    import os
    import struct

    import pydicom

    path = Path(path)
    with path.open("rb") as handle:
        try:
            ds = pydicom.dcmread(handle, stop_before_pixels=True, force=True)
        except Exception:  # not for this check to judge (read_header accepted the file)
            return
        offset = handle.tell()
        meta = getattr(ds, "file_meta", None)
        syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        implicit, little = ds.original_encoding
        if implicit is None or little is None or syntax == "1.2.840.10008.1.2.1.99":  # deflated
            return
        handle.seek(offset)
        head = handle.read(12)
    order = "<" if little else ">"
    if len(head) < 8 or struct.unpack(order + "HH", head[:4]) not in _PIXEL_TAGS:
        return
    if implicit:
        header, length = 8, struct.unpack(order + "I", head[4:8])[0]
    elif head[4:6] in _LONG_VRS:
        if len(head) < 12:
            raise UnreadableFileError(f"{path.name}: truncated DICOM file (pixel data element cut off)")
        header, length = 12, struct.unpack(order + "I", head[8:12])[0]
    else:
        header, length = 8, struct.unpack(order + "H", head[6:8])[0]
    if length == 0xFFFFFFFF:  # encapsulated
        return
    if os.path.getsize(path) < offset + header + length:
        raise UnreadableFileError(f"{path.name}: truncated DICOM file (pixel data shorter than its header declares)")


def header_geometry(files: list[str], *, series_name: str) -> tuple[tuple[int, ...], np.ndarray]:
    """The grid :func:`read_dicom_volume` would return for ``files``, from their headers alone
    (pydicom ``stop_before_pixels``; no pixel data is read or decoded).

    Frames are grouped by slice position as the reader does; frames at one position count as
    time points when their time keys (temporal position, diffusion, trigger time, instance and
    acquisition numbers) differ, and as copies of one slice when they are equal (the reader drops
    copies by their identical pixels, which are not read here). A sheared or unevenly spaced stack
    gets the grid it will be resampled onto.

    Returns:
        ``(shape, affine)``: ``(I, J, K)`` or ``(I, J, K, T)`` and the voxel -> RAS+ mm affine.

    Raises:
        UnreadableFileError: a file is not DICOM, its header is corrupt, or the file is shorter
            than its pixel data element declares (:func:`check_pixel_data_length`).
        MissingGeometryError / UnsupportedInputError: the header checks of
            :func:`medseg.io.dicom_frames.frames_of` and :func:`read_dicom_volume` (missing or
            inconsistent geometry, colour images, mixed orientations or sizes).
    """
    from collections import Counter

    from medseg.io.dicom_header import read_header

    frames: list[Frame] = []
    first_ds = None
    seen: set[tuple] = set()
    for path in files:
        ds = read_header(path)
        if ds is None:
            raise UnreadableFileError(f"{Path(path).name}: not a DICOM file")
        if first_ds is None:
            first_ds = ds
        check_pixel_data_length(path)
        uid = str(ds.get("SOPInstanceUID") or path)
        instance_frames = frames_of(ds, path)
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:  # as decode_pixels refuses them
            raise UnsupportedInputError(
                f"{Path(path).name}: colour images (SamplesPerPixel > 1) are not supported for segmentation volumes"
            )
        for frame in instance_frames:
            key = (uid, frame.frame_number, frame.tile)
            if key not in seen:
                seen.add(key)
                frames.append(frame)
    if not frames:
        raise MissingGeometryError(f"series {series_name}: no image frames")
    _check_same_plane(frames, series_name)
    reference = frames[0]
    normal = np.cross(reference.row_cosine, reference.column_cosine)
    clusters = _position_clusters(frames, normal, series_name)
    # time points at one position: frames whose time keys differ (equal keys: copies of a slice,
    # which the reader drops by their identical pixels)
    volumes = Counter(
        len({(frames[i].volume_key, frames[i].temporal_key[:-1]) for i in c}) for c in clusters
    ).most_common(1)[0][0]
    affine, sheared, uneven = _stack_affine(frames, clusters, normal, first_ds, [])
    slices = len(clusters)
    if sheared or uneven:
        positions = np.array([frames[c[0]].position for c in clusters])
        _, affine, _, slices = _regular_grid(
            positions,
            reference.row_cosine,
            reference.column_cosine,
            normal,
            reference.pixel_spacing,
            series_name,
        )
    rows, cols = reference.shape
    shape = (cols, rows, slices) + ((volumes,) if volumes > 1 else ())
    return shape, LPS_TO_RAS @ affine


def _resample_regular(
    array: np.ndarray,
    positions: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    normal: np.ndarray,
    spacing: tuple[float, float],
    series_name: str,
    *,
    sheared: bool,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Resample a sheared or unevenly spaced stack onto a regular orthogonal grid.

    The output grid keeps the in-plane axes and pixel spacing, takes the slice normal as k axis
    with the median gap as spacing, and starts at the first slice. Each output slice is the
    linear interpolation (along the normal) of the two enclosing input slices, each sampled at
    the output grid points with bilinear interpolation (``scipy.ndimage.map_coordinates``);
    points outside the input are filled with the volume minimum.

    Args:
        array: ``(I, J, K, T)`` input stack, slices ordered along ``normal``.
        positions: ``(K, 3)`` LPS positions of the slices.

    Returns:
        ``(array (I, J, K', T), LPS affine, warning text)``.
    """
    from scipy.ndimage import map_coordinates

    row_spacing, col_spacing = spacing
    along, affine, step, count = _regular_grid(positions, row, col, normal, spacing, series_name)
    gaps = np.diff(along)
    ni, nj = array.shape[:2]
    ii, jj = np.meshgrid(np.arange(ni, dtype=np.float64), np.arange(nj, dtype=np.float64), indexing="ij")
    fill = float(array.min())
    out = np.empty((ni, nj, count, array.shape[3]), dtype=np.float32)
    for k in range(count):
        distance = min(k * step, float(along[-1]))
        upper = int(np.searchsorted(along, distance, side="left"))
        upper = min(max(upper, 1), len(along) - 1)
        lower = upper - 1
        weight = (distance - along[lower]) / (along[upper] - along[lower])
        target = positions[0] + distance * normal
        for t in range(array.shape[3]):
            value = np.zeros((ni, nj), dtype=np.float64)
            for index, w in ((lower, 1.0 - weight), (upper, weight)):
                if w <= 0:
                    continue
                offset = target - positions[index]
                di = float(offset @ row) / col_spacing
                dj = float(offset @ col) / row_spacing
                sampled = map_coordinates(
                    array[:, :, index, t].astype(np.float32), [ii + di, jj + dj], order=1, mode="constant", cval=fill
                )
                value += w * sampled
            out[:, :, k, t] = value
    if array.dtype.kind in "ui":
        out = np.round(out).astype(array.dtype)
    reason = []
    if sheared:
        reason.append("gantry tilt (slice positions sheared against the slice normal)")
    if float(np.abs(gaps - step).max()) > GRID_TOLERANCE_MM:
        reason.append(f"variable slice gaps {gaps.min():.2f}..{gaps.max():.2f} mm")
    note = (
        f"resampled to a regular grid ({count} slices at {step:.3f} mm along the slice "
        f"normal) because of {' and '.join(reason)}"
    )
    return out, affine, note
