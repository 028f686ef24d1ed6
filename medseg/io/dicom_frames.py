"""Split one DICOM instance into 2D frames with their patient-space geometry.

Three kinds of instance carry image planes:

- classic single-frame images (CT/MR/PT Image Storage): one frame, geometry from
  ImagePositionPatient / ImageOrientationPatient / PixelSpacing (DICOM PS3.3 C.7.6.2);
- enhanced multi-frame images: per-frame and shared functional groups (PS3.3 C.7.6.16), with
  PlanePositionSequence, PlaneOrientationSequence, PixelMeasuresSequence and
  PixelValueTransformationSequence looked up per frame first, then in the shared groups;
- Siemens mosaics (ImageType contains ``MOSAIC``): N tiles of one 2D image, de-tiled using
  NumberOfImagesInMosaic (0019,100A) or the CSA image header, with the position correction and
  slice normal that dcm2niix and nibabel use (the CSA ``SliceNormalVector``).

Positions and directions stay in DICOM LPS millimetres here; :mod:`medseg.io.dicom_volume`
converts to the RAS+ affine once.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.errors
import pydicom.uid
from pydicom.dataset import Dataset

from medseg.errors import MissingGeometryError, UnreadableFileError, UnsupportedInputError

#: Decimal places used to compare orientation cosines (about 0.006 degrees).
ORIENTATION_DECIMALS = 4


@dataclass
class Frame:
    """One image plane of a DICOM instance.

    Attributes:
        file: the instance's path.
        frame_number: 1-based frame number inside a multi-frame instance, ``None`` otherwise.
        position: ``(3,)`` LPS position (mm) of the centre of the first transmitted pixel.
        row_cosine / column_cosine: ``(3,)`` LPS unit vectors along a row (increasing column
            index) and along a column (increasing row index), ImageOrientationPatient.
        pixel_spacing: ``(row spacing, column spacing)`` in mm, DICOM PixelSpacing order.
        shape: ``(rows, columns)``.
        slope / intercept: RescaleSlope / RescaleIntercept of this frame.
        volume_key: what defines the frame's time point in a multi-volume series:
            ``(TemporalPositionIdentifier / TemporalPositionIndex, (b-value, gradient) or (),
            TriggerTime)`` (see :func:`diffusion_key`).
        temporal_key: tie-breakers ordering frames with the same volume key:
            ``(InstanceNumber, AcquisitionNumber, frame index)``.
        slice_normal: ``(3,)`` LPS unit normal; the CSA SliceNormalVector for mosaics,
            otherwise ``row_cosine x column_cosine``.
        tile: for mosaics, ``(tile_row, tile_col, tile_rows, tile_cols)`` in the mosaic image.
    """

    file: str
    frame_number: int | None
    position: np.ndarray
    row_cosine: np.ndarray
    column_cosine: np.ndarray
    pixel_spacing: tuple[float, float]
    shape: tuple[int, int]
    slope: float = 1.0
    intercept: float = 0.0
    temporal_key: tuple = ()
    volume_key: tuple = ()
    slice_normal: np.ndarray = field(default_factory=lambda: np.zeros(3))
    tile: tuple[int, int, int, int] | None = None

    def orientation_key(self) -> tuple[float, ...]:
        """Rounded ImageOrientationPatient, to compare orientations between frames."""
        return tuple(np.round(np.concatenate([self.row_cosine, self.column_cosine]), ORIENTATION_DECIMALS).tolist())


def _floats(value: Any, count: int, what: str, name: str) -> np.ndarray:
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise MissingGeometryError(f"{name}: {what} is not numeric") from None
    if array.shape != (count,) or not np.all(np.isfinite(array)):
        raise MissingGeometryError(f"{name}: {what} must hold {count} numbers")
    return array


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    if seq is None or len(seq) == 0:
        return None
    return seq[0]


def _functional_group(ds: Dataset, index: int, macro: str) -> Dataset | None:
    """The ``macro`` sequence item for frame ``index`` (0-based): per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and index < len(per_frame):
        item = _first_item(per_frame[index], macro)
        if item is not None:
            return item
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    if shared is not None:
        return _first_item(shared, macro)
    return None


def is_mosaic(ds: Dataset) -> bool:
    """True for a Siemens mosaic (ImageType contains ``MOSAIC``)."""
    return any(str(v).upper() == "MOSAIC" for v in ds.get("ImageType", []) or [])


def is_enhanced_multiframe(ds: Dataset) -> bool:
    """True when the instance uses functional groups (enhanced / legacy-converted multi-frame)."""
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _csa_image_header(ds: Dataset) -> dict | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom import csareader
    try:
        return csareader.get_csa_header(ds, "image")
    except Exception:  # malformed private CSA data: fall back to the public tags
        return None


def mosaic_layout(ds: Dataset, name: str) -> tuple[int, np.ndarray | None]:
    """``(number of images, CSA slice normal or None)`` of a Siemens mosaic.

    NumberOfImagesInMosaic is read from the ``SIEMENS MR HEADER`` private block (usually
    (0019,100A)), else from the CSA image header (read with nibabel's ``csareader``).

    Raises:
        UnsupportedInputError: neither source gives the tile count.
    """
    csa = _csa_image_header(ds)
    count = None
    try:  # the element's offset follows the "SIEMENS MR HEADER" private creator
        tag = ds.private_block(0x0019, "SIEMENS MR HEADER")[0x0A]
    except (KeyError, ValueError):
        tag = ds.get((0x0019, 0x100A))
    if tag is not None and tag.value not in (None, b"", ""):
        try:
            count = int(tag.value if not isinstance(tag.value, bytes) else int.from_bytes(tag.value[:2], "little"))
        except (TypeError, ValueError):
            count = None
    normal = None
    if csa:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from nibabel.nicom import csareader
        if not count:
            try:
                count = csareader.get_n_mosaic(csa)
            except Exception:
                count = None
        try:
            value = csareader.get_slice_normal(csa)
            if value is not None and np.linalg.norm(value) > 0.5:
                normal = np.asarray(value, dtype=np.float64)
                normal /= np.linalg.norm(normal)
        except Exception:
            normal = None
    if not count or count < 1:
        raise UnsupportedInputError(f"{name}: Siemens mosaic without NumberOfImagesInMosaic (0019,100A or CSA header)")
    return int(count), normal


def _number(value: Any) -> float | None:
    """``value`` as a float (first item of a multi-value; an undecoded private IS/DS element is
    read as text, ``b"1000\\8\\0\\0"`` -> 1000), or ``None``."""
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii").split("\\")[0].strip("\0 ")
        except UnicodeDecodeError:
            return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
        if value is None:
            return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _vector(value: Any) -> tuple[float, ...] | None:
    if isinstance(value, bytes):  # an undecoded private FD element (Siemens, implicit VR)
        if len(value) != 24:
            return None
        import struct

        value = struct.unpack("<3d", value)
    try:
        vector = tuple(round(float(v), 4) for v in value)
    except (TypeError, ValueError):
        return None
    return vector if len(vector) == 3 else None


def _private(ds: Dataset, group: int, creator: str, offset: int, tag: int) -> Any:
    """A private element by its creator (falls back to the usual fixed tag ``tag``)."""
    try:
        return ds.private_block(group, creator)[offset].value
    except (KeyError, ValueError):
        element = ds.get(tag)
        return None if element is None else element.value


def diffusion_key(ds: Dataset) -> tuple:
    """``(b-value, gradient direction)`` of a diffusion-weighted image, or ``()``.

    Read from the public DiffusionBValue (0018,9087) and DiffusionGradientOrientation
    (0018,9089) (top level or in MRDiffusionSequence), else the private equivalents: Siemens
    B_value (0019,100C) / DiffusionGradientDirection (0019,100E), Philips (2001,1003) /
    (2005,10B0..10B2), GE (0043,1039) (first value, modulo 1e9) / (0019,10BB..10BD).
    The direction is rounded to 4 decimals; either part may be ``None``.
    """
    source = ds
    seq = ds.get("MRDiffusionSequence")
    if seq:
        source = seq[0]
    bvalue = _number(source.get("DiffusionBValue"))
    gradient = None
    directional = source.get("DiffusionGradientDirectionSequence")
    if directional:
        gradient = _vector(directional[0].get("DiffusionGradientOrientation") or ())
    if gradient is None and source.get("DiffusionGradientOrientation") is not None:
        gradient = _vector(source.get("DiffusionGradientOrientation"))
    if bvalue is None:
        bvalue = _number(_private(ds, 0x0019, "SIEMENS MR HEADER", 0x0C, 0x0019100C))
    if gradient is None:
        gradient = _vector(_private(ds, 0x0019, "SIEMENS MR HEADER", 0x0E, 0x0019100E) or ())
    if bvalue is None:
        bvalue = _number(_private(ds, 0x2001, "Philips Imaging DD 001", 0x03, 0x20011003))
    if gradient is None:
        parts = [
            _number(_private(ds, 0x2005, "Philips MR Imaging DD 004", o, 0x20051000 + o)) for o in (0xB0, 0xB1, 0xB2)
        ]
        if all(p is not None for p in parts):
            gradient = _vector(parts)
    if bvalue is None:
        ge = _number(_private(ds, 0x0043, "GEMS_PARM_01", 0x39, 0x00431039))
        if ge is not None:
            bvalue = ge % 1e9
    if gradient is None:
        parts = [_number(_private(ds, 0x0019, "GEMS_ACQU_01", o, 0x00191000 + o)) for o in (0xBB, 0xBC, 0xBD)]
        if all(p is not None for p in parts):
            gradient = _vector(parts)
    if bvalue is None and gradient is None:
        return ()
    return (bvalue, gradient)


def _volume_key(ds: Dataset, temporal_index: float | None = None) -> tuple:
    """What defines the time point (volume) of an image: ``(TemporalPositionIdentifier or
    TemporalPositionIndex, diffusion key, TriggerTime)``; see :class:`Frame`."""
    temporal = temporal_index if temporal_index else _number(ds.get("TemporalPositionIdentifier"))
    return (temporal or 0.0, diffusion_key(ds), _number(ds.get("TriggerTime")) or 0.0)


def _temporal_key(ds: Dataset) -> tuple:
    """``(InstanceNumber, AcquisitionNumber)``: the tie-breakers after the volume key.

    AcquisitionNumber comes last: Philips exports number acquisitions per slice group, not per
    volume, so ordering by it first mixes slices of different volumes.
    """
    return (_number(ds.get("InstanceNumber")) or 0.0, _number(ds.get("AcquisitionNumber")) or 0.0)


def _rescale(item: Dataset | None) -> tuple[float, float]:
    if item is None:
        return 1.0, 0.0
    try:
        slope = float(item.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(item.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError):
        return 1.0, 0.0
    return slope, intercept


def frames_of(ds: Dataset, path: str | Path) -> list[Frame]:
    """All image planes of one instance (header only; no pixel data is decoded).

    Args:
        ds: the instance (pixel data may be absent, e.g. read with ``stop_before_pixels``).
        path: its file path (used in error messages and to load pixels later).

    Raises:
        MissingGeometryError: ImagePositionPatient, ImageOrientationPatient or PixelSpacing is
            missing or malformed, or the orientation vectors are not orthonormal.
        UnsupportedInputError: a mosaic whose tile count cannot be determined.
    """
    name = Path(path).name
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows < 1 or cols < 1:
        raise MissingGeometryError(f"{name}: Rows/Columns missing")
    frames: list[Frame] = []
    if is_enhanced_multiframe(ds):
        count = int(ds.get("NumberOfFrames") or 1)
        for index in range(count):
            position = _functional_group(ds, index, "PlanePositionSequence")
            orientation = _functional_group(ds, index, "PlaneOrientationSequence")
            measures = _functional_group(ds, index, "PixelMeasuresSequence")
            if position is None or "ImagePositionPatient" not in position:
                raise MissingGeometryError(f"{name}: frame {index + 1} has no ImagePositionPatient")
            if orientation is None or "ImageOrientationPatient" not in orientation:
                raise MissingGeometryError(f"{name}: frame {index + 1} has no ImageOrientationPatient")
            if measures is None or "PixelSpacing" not in measures:
                raise MissingGeometryError(f"{name}: frame {index + 1} has no PixelSpacing")
            content = _functional_group(ds, index, "FrameContentSequence")
            temporal = _number(content.get("TemporalPositionIndex")) if content else None
            diffusion = _functional_group(ds, index, "MRDiffusionSequence")
            timing = _functional_group(ds, index, "CardiacSynchronizationSequence")
            trigger = _number(timing.get("NominalCardiacTriggerDelayTime")) if timing is not None else None
            frame_ds = Dataset()
            if diffusion is not None:
                frame_ds.MRDiffusionSequence = [diffusion]
            volume_key = (
                temporal or 0.0,
                diffusion_key(frame_ds) if diffusion is not None else diffusion_key(ds),
                trigger or 0.0,
            )
            slope, intercept = _rescale(_functional_group(ds, index, "PixelValueTransformationSequence"))
            iop = _floats(orientation.ImageOrientationPatient, 6, "ImageOrientationPatient", name)
            frames.append(
                Frame(
                    file=str(path),
                    frame_number=index + 1,
                    position=_floats(position.ImagePositionPatient, 3, "ImagePositionPatient", name),
                    row_cosine=iop[:3],
                    column_cosine=iop[3:],
                    pixel_spacing=tuple(_floats(measures.PixelSpacing, 2, "PixelSpacing", name)),
                    shape=(rows, cols),
                    slope=slope,
                    intercept=intercept,
                    temporal_key=(*_temporal_key(ds), index),
                    volume_key=volume_key,
                )
            )
    else:
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if ds.get(keyword) in (None, ""):
                raise MissingGeometryError(f"{name}: {keyword} is missing")
        position = _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", name)
        iop = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", name)
        spacing = tuple(_floats(ds.PixelSpacing, 2, "PixelSpacing", name))
        slope, intercept = _rescale(ds)
        if is_mosaic(ds):
            frames.extend(_mosaic_frames(ds, str(path), position, iop, spacing, slope, intercept))
        else:
            frames.append(
                Frame(
                    file=str(path),
                    frame_number=None,
                    position=position,
                    row_cosine=iop[:3],
                    column_cosine=iop[3:],
                    pixel_spacing=spacing,
                    shape=(rows, cols),
                    slope=slope,
                    intercept=intercept,
                    temporal_key=(*_temporal_key(ds), 0),
                    volume_key=_volume_key(ds),
                )
            )
    for frame in frames:
        _check_orientation(frame, name)
        if frame.tile is None:
            frame.slice_normal = np.cross(frame.row_cosine, frame.column_cosine)
        if min(frame.pixel_spacing) <= 0:
            raise MissingGeometryError(f"{name}: PixelSpacing must be positive")
    return frames


def _check_orientation(frame: Frame, name: str) -> None:
    row, col = frame.row_cosine, frame.column_cosine
    for vector in (row, col):
        norm = np.linalg.norm(vector)
        if not 0.99 < norm < 1.01:
            raise MissingGeometryError(f"{name}: ImageOrientationPatient is not unit length")
    if abs(float(np.dot(row, col))) > 1e-3:
        raise MissingGeometryError(f"{name}: ImageOrientationPatient vectors are not orthogonal")
    frame.row_cosine = row / np.linalg.norm(row)
    frame.column_cosine = col / np.linalg.norm(col)


def _mosaic_frames(
    ds: Dataset,
    path: str,
    position: np.ndarray,
    iop: np.ndarray,
    spacing: tuple[float, float],
    slope: float,
    intercept: float,
) -> list[Frame]:
    name = Path(path).name
    count, normal = mosaic_layout(ds, name)
    grid = math.ceil(math.sqrt(count))
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows % grid or cols % grid:
        raise UnsupportedInputError(f"{name}: mosaic {rows}x{cols} does not split into {grid}x{grid} tiles")
    tile_rows, tile_cols = rows // grid, cols // grid
    row_cos, col_cos = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    if normal is None:
        normal = np.cross(row_cos, col_cos)
    # ImagePositionPatient of a mosaic is the corner of the whole mosaic; move it to the corner
    # of one tile (the correction dcm2niix and nibabel's MosaicWrapper apply).
    first = position + row_cos * spacing[1] * (cols - tile_cols) / 2.0 + col_cos * spacing[0] * (rows - tile_rows) / 2.0
    step = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    if step in (None, ""):
        raise MissingGeometryError(f"{name}: mosaic without SpacingBetweenSlices/SliceThickness")
    step = float(step)
    key = _temporal_key(ds)
    volume_key = _volume_key(ds)
    return [
        Frame(
            file=path,
            frame_number=None,
            position=first + index * step * normal,
            row_cosine=row_cos,
            column_cosine=col_cos,
            pixel_spacing=spacing,
            shape=(tile_rows, tile_cols),
            slope=slope,
            intercept=intercept,
            temporal_key=(*key, 0),
            volume_key=volume_key,
            slice_normal=normal,
            tile=((index // grid) * tile_rows, (index % grid) * tile_cols, tile_rows, tile_cols),
        )
        for index in range(count)
    ]


def read_instance(path: str | Path) -> Dataset:
    """Read one whole DICOM instance (header and pixel data).

    Raises:
        UnreadableFileError: the file is not DICOM, or is corrupt or truncated.
    """
    try:
        try:
            return pydicom.dcmread(str(path))
        except pydicom.errors.InvalidDicomError:
            # a raw dataset without the Part 10 header (accepted by the scan): pydicom infers
            # the encoding; record it as the transfer syntax so the pixel data decodes
            ds = pydicom.dcmread(str(path), force=True)
            if "TransferSyntaxUID" not in ds.file_meta:
                ds.file_meta.TransferSyntaxUID = (
                    pydicom.uid.ImplicitVRLittleEndian
                    if ds.original_encoding[0]
                    else pydicom.uid.ExplicitVRLittleEndian
                )
            return ds
    except Exception as error:  # pydicom raises many types for corrupt input
        raise UnreadableFileError(f"{Path(path).name}: cannot read DICOM ({type(error).__name__})") from None


def decode_pixels(ds: Dataset, path: str | Path) -> np.ndarray:
    """Decoded stored values, ``(rows, cols)`` or ``(frames, rows, cols)``, native byte order.

    Compressed transfer syntaxes are decoded by pydicom's pixel backends (pylibjpeg-libjpeg
    for JPEG/JPEG-LS, pylibjpeg-openjpeg for JPEG 2000, pylibjpeg-rle/numpy for RLE).

    Raises:
        UnsupportedInputError: no decoder for the transfer syntax or photometric interpretation.
        UnreadableFileError: the pixel data is truncated or corrupt.
    """
    name = Path(path).name
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise UnreadableFileError(f"{name}: no pixel data")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise UnsupportedInputError(
            f"{name}: colour images (SamplesPerPixel > 1) are not supported for segmentation volumes"
        )
    try:
        array = ds.pixel_array
    except NotImplementedError as error:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        label = getattr(syntax, "name", str(syntax))
        raise UnsupportedInputError(f"{name}: cannot decode transfer syntax {label}") from error
    except Exception as error:
        raise UnreadableFileError(f"{name}: pixel data is corrupt or truncated ({type(error).__name__})") from None
    array = np.asarray(array)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def frame_pixels(pixels: np.ndarray, frame: Frame) -> np.ndarray:
    """The ``(rows, cols)`` stored values of ``frame`` from its instance's decoded pixels."""
    if frame.frame_number is not None:
        plane = pixels[frame.frame_number - 1] if pixels.ndim == 3 else pixels
    else:
        plane = pixels if pixels.ndim == 2 else pixels[0]
    if frame.tile is not None:
        r0, c0, nr, nc = frame.tile
        plane = plane[r0 : r0 + nr, c0 : c0 + nc]
    return plane
