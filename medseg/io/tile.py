"""2D pathology / microscopy tiles (PNG, JPEG, TIFF) as 8-bit RGB, with their pixel size in microns.

A *tile* is one 2D image plane: an H&E field of view (MoNuSeg: 1000x1000 RGB at 0.25 um/px) or a
grey-value fluorescence image. :func:`read_tile` turns any of them into a :class:`Tile` whose
``array`` is ``(H, W, 3)`` ``uint8`` RGB (row, column, channel), the layout the nuclei network and
the overlay writer expect, and whose ``mpp`` is the isotropic pixel size in microns per pixel (or
``None`` when the file does not state a trustworthy one).

Pixel values, in this order:

- ``(H, W)`` grey values are replicated to three channels; grey + alpha keeps the grey channel;
- ``(H, W, 4)`` RGBA (and palette images with transparency) drop the alpha channel without
  compositing: the colours are kept as stored;
- palette (indexed) images are expanded through their colour table;
- anything that is not ``uint8`` (16-bit fluorescence, 32-bit or float data) is rescaled by the
  image's own maximum: ``out = round(clip(v, 0, None) * 255 / max)`` over all channels at once
  (one factor, so colours keep their balance); negative values become 0; an all-zero image stays
  0; a boolean image becomes 0/255. Non-finite values are refused.

Pixel size (``mpp``, um/px), in this order:

1. the ``mpp`` argument, if given (it must be a positive finite number);
2. TIFF: ``XResolution``/``YResolution`` (pixels per unit) with ``ResolutionUnit`` centimetre
   (``1e4 / res`` um) or inch (``25400 / res`` um; inch is also the TIFF default when the unit tag
   is absent); unit *none* is not trusted, except that ImageJ TIFFs state their unit (``micron``,
   ``mm``...) in the ImageJ metadata, which is used then;
3. PNG: the ``pHYs`` chunk, only when its unit is the metre (Pillow then reports ``info["dpi"]``,
   ``mpp = 25400 / dpi``); a unit-less pHYs (aspect ratio only) gives ``None``;
4. JPEG: ``None`` (the JFIF density is nearly always a 72/96 dpi screen default).

A file value coarser than :data:`MAX_FILE_MPP` (20 um/px, i.e. under 1270 dpi) is a screen or print
default (72 dpi = 352.8 um/px, 300 dpi = 84.7 um/px), not a microscope scale, and gives ``None``.
When the x and y sizes differ by less than 1 % their mean is used; a larger difference is refused
(pixels must be square for the nuclei measurements), unless ``mpp`` is given.

Only :func:`read_tile` and :func:`read_instance_map` touch the file, and only to read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import InputTooLargeError, UnreadableFileError, UnsupportedInputError
from medseg.io.safety import CLI_POLICY, ReadPolicy, check_declared_voxels

TILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
#: coarsest pixel size (um/px) a file may state and be believed (see the module docstring)
MAX_FILE_MPP = 20.0
#: largest relative x/y pixel-size difference averaged away (else the tile is refused)
ANISOTROPY_TOLERANCE = 0.01

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_TIFF_UNIT_UM = {2: 25400.0, 3: 1e4}  # ResolutionUnit inch / centimetre -> um per unit
#: ImageJ ``unit`` strings -> um per unit
_IMAGEJ_UNIT_UM = {
    "um": 1.0,
    "µm": 1.0,
    "\u03bcm": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "nm": 1e-3,
    "mm": 1e3,
    "cm": 1e4,
    "inch": 25400.0,
}


def is_tile_file(name: str | Path) -> bool:
    """Whether ``name`` is named like a tile image (:data:`TILE_SUFFIXES`, case-insensitive)."""
    return str(name).lower().endswith(TILE_SUFFIXES)


@dataclass
class Tile:
    """One 2D RGB tile.

    Attributes:
        array: ``(H, W, 3)`` ``uint8`` RGB, rows top to bottom, columns left to right.
        mpp: isotropic pixel size in microns per pixel, or ``None`` when unknown.
        name: the file name (no folder), for messages and reports.
        path: the file it was read from (``None`` for an in-memory tile); writers use it to make
            sure they never overwrite the input.
    """

    array: np.ndarray
    mpp: float | None
    name: str
    path: Path | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(H, W, 3)``."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]


def _check_mpp(mpp: float) -> float:
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise ValueError(f"mpp {mpp!r}: expected a positive number of microns per pixel") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"mpp {mpp!r}: expected a positive number of microns per pixel")
    return value


def _isotropic(x_um: float | None, y_um: float | None, name: str) -> float | None:
    """One pixel size from the file's x/y sizes (um), or ``None`` when absent or implausible."""
    if x_um is None or y_um is None or not (math.isfinite(x_um) and math.isfinite(y_um)):
        return None
    if x_um <= 0 or y_um <= 0:
        return None
    if abs(x_um - y_um) > ANISOTROPY_TOLERANCE * max(x_um, y_um):
        raise UnsupportedInputError(
            f"{name}: pixels are not square ({x_um:.4g} x {y_um:.4g} um); give the pixel size with --mpp"
        )
    value = (x_um + y_um) / 2
    return value if value <= MAX_FILE_MPP else None


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` as ``uint8`` by the module docstring's rule (max -> 255)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.dtype.kind not in "iuf":
        raise UnsupportedInputError(f"{name}: pixel type {array.dtype} is not supported for a tile")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise UnsupportedInputError(f"{name}: the image holds non-finite (NaN or infinite) values")
    np.clip(values, 0, None, out=values)
    high = float(values.max()) if values.size else 0.0
    if high <= 0:
        return np.zeros(array.shape, np.uint8)
    return np.rint(values * (255.0 / high)).astype(np.uint8)


def _to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    """``(H, W)``, ``(H, W, 1|2|3|4)`` -> ``(H, W, 3)`` uint8 (alpha dropped, grey replicated)."""
    if array.ndim == 3 and array.shape[2] in (2, 4):
        array = array[:, :, : array.shape[2] - 1]  # drop alpha
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(_to_uint8(array, name)[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 3:
        array = _to_uint8(array, name)
    else:
        raise UnsupportedInputError(f"{name}: expected a 2D grey or RGB tile, got shape {array.shape}")
    return np.ascontiguousarray(array)


def _tiff_page_mpp(tif, page, name: str) -> float | None:
    x, y = page.tags.get("XResolution"), page.tags.get("YResolution")
    if x is None or y is None:
        return None

    def size(tag, um_per_unit: float) -> float | None:
        numerator, denominator = tag.value
        if not numerator or not denominator:
            return None
        return um_per_unit * denominator / numerator  # pixels per unit -> um per pixel

    unit_tag = page.tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF 6.0 default: inch
    if unit in _TIFF_UNIT_UM:
        return _isotropic(size(x, _TIFF_UNIT_UM[unit]), size(y, _TIFF_UNIT_UM[unit]), name)
    meta = tif.imagej_metadata or {}
    imagej_unit = str(meta.get("unit", "")).strip().lower().replace("\\u00b5", "µ")
    if imagej_unit in _IMAGEJ_UNIT_UM:
        scale = _IMAGEJ_UNIT_UM[imagej_unit]
        return _isotropic(size(x, scale), size(y, scale), name)
    return None  # unit "none": a bare ratio, not a physical size


def _read_tiff_tile(path: Path, policy: ReadPolicy, read_mpp: bool) -> tuple[np.ndarray, float | None]:
    import tifffile

    name = path.name
    try:
        with tifffile.TiffFile(str(path)) as tif:
            series = tif.series[0].levels[0]  # pyramids: the full-resolution level
            shape, axes = tuple(int(s) for s in series.shape), series.axes
            check_declared_voxels(math.prod(shape), policy, name)
            planes = [s for s, a in zip(shape, axes) if a not in "YXS" and s > 1]
            if planes:
                raise UnsupportedInputError(
                    f"{name}: a {len(planes) + 2}D TIFF (axes {axes}, shape {shape}); a 2D tile is needed "
                    "(one plane, grey or RGB), not a z-stack, time series or multi-channel image"
                )
            page = series.keyframe if hasattr(series, "keyframe") else tif.pages[0]
            photometric = int(getattr(page, "photometric", 1))
            if photometric in (5, 6, 8, 9, 10, 32844, 32845):  # CMYK, CIELab... (YCbCr JPEG decodes to RGB)
                if not (photometric == 6 and page.compression == 7):
                    raise UnsupportedInputError(f"{name}: TIFF colour space {photometric} is not supported")
            mpp = _tiff_page_mpp(tif, page, name) if read_mpp else None
            array = series.asarray()
            colormap = page.colormap if photometric == 3 else None
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError, MemoryError) as error:
        raise UnreadableFileError(f"{name}: cannot read TIFF ({type(error).__name__})") from None
    array = np.asarray(array)
    kept = "".join(a for a in axes if a in "YXS")
    array = array.reshape([s for s, a in zip(shape, axes) if a in "YXS"])
    if kept == "SYX":
        array = np.moveaxis(array, 0, -1)  # (S, H, W) planar -> (H, W, S)
    if colormap is not None and array.ndim == 2:  # palette: (3, 2**bits) uint16 table
        table = np.asarray(colormap)
        table = (table >> 8).astype(np.uint8) if table.max() > 255 else table.astype(np.uint8)
        array = table.T[array]
    elif photometric == 0 and array.ndim == 2 and array.dtype.kind in "ui":  # min-is-white
        array = np.iinfo(array.dtype).max - array
    return array, mpp


def _read_pillow_tile(path: Path, policy: ReadPolicy, read_mpp: bool) -> tuple[np.ndarray, float | None]:
    from PIL import Image as PILImage

    name = path.name
    try:
        with PILImage.open(path) as image:
            check_declared_voxels(image.width * image.height * max(len(image.getbands()), 1), policy, name)
            if image.format == "PNG" and getattr(image, "n_frames", 1) > 1:
                raise UnsupportedInputError(f"{name}: an animated PNG with several frames; a 2D tile is needed")
            if image.format not in ("PNG", "JPEG", "MPO"):
                raise UnsupportedInputError(f"{name}: {image.format} images are not supported as tiles (PNG, JPEG)")
            dpi = image.info.get("dpi") if image.format == "PNG" and read_mpp else None
            image.load()
            mode = image.mode
            if mode in ("P", "PA"):
                image = image.convert("RGBA")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
                image = image.convert("RGB")
            elif mode == "1":
                image = image.convert("L")
            array = np.array(image)
    except PILImage.DecompressionBombError:
        raise InputTooLargeError(f"{name}: the image declares too many pixels") from None
    except (PILImage.UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as error:
        raise UnreadableFileError(f"{name}: cannot read image ({type(error).__name__})") from None
    mpp = None
    if dpi:  # Pillow sets "dpi" only for a pHYs chunk in metres: dpi = px/m * 0.0254
        dx, dy = (float(v) for v in dpi)
        mpp = _isotropic(25400.0 / dx if dx > 0 else None, 25400.0 / dy if dy > 0 else None, name)
    return array, mpp


def read_tile(path: str | Path, mpp: float | None = None, *, policy: ReadPolicy = CLI_POLICY) -> Tile:
    """Read a 2D PNG, JPEG or TIFF tile as ``(H, W, 3)`` uint8 RGB with its pixel size.

    The format is told by the file's first bytes (TIFF magic -> tifffile, else Pillow), so a
    misnamed file still reads; the name must still have one of :data:`TILE_SUFFIXES`. TIFF: the
    first series' full-resolution level, a single page ``(H, W)``, ``(H, W, 3|4)`` interleaved or
    ``(3|4, H, W)`` planar RGB(A). See the module docstring for the pixel-value and ``mpp`` rules.

    Args:
        path: the tile file; never modified.
        mpp: microns per pixel; overrides what the file states.
        policy: ``max_voxels`` is checked against the declared size before decoding.

    Returns:
        :class:`Tile` with ``array`` ``(H, W, 3)`` uint8, ``mpp`` (um/px or ``None``), ``name``.

    Raises:
        ValueError: ``mpp`` is not a positive finite number.
        UnreadableFileError: missing, corrupt or truncated file.
        UnsupportedInputError: not a tile image (other suffix or format), a 3D / multi-plane or
            multi-channel stack, an unsupported colour space, or non-square pixels in the file
            (without ``mpp``).
        InputTooLargeError: more pixels than ``policy.max_voxels`` (or Pillow's bomb limit).
    """
    given = _check_mpp(mpp) if mpp is not None else None
    path = Path(path)
    name = path.name
    if not is_tile_file(name):
        raise UnsupportedInputError(
            f"{name}: not a 2D tile image; a 2D tile is needed as .png, .jpg, .jpeg, .tif or .tiff"
        )
    if not path.is_file():
        raise UnreadableFileError(f"{name}: no such file")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise UnreadableFileError(f"{name}: cannot read file ({type(error).__name__})") from None
    reader = _read_tiff_tile if magic in _TIFF_MAGIC else _read_pillow_tile
    # the file's resolution is not even looked at when the caller states the pixel size
    array, stored = reader(path, policy, read_mpp=given is None)
    rgb = _to_rgb(np.asarray(array), name)
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise UnreadableFileError(f"{name}: the image has no pixels")
    return Tile(array=rgb, mpp=given if given is not None else stored, name=name, path=path)


def read_instance_map(path: str | Path) -> np.ndarray:
    """Read an instance label image (0 background, objects 1..N) as ``(H, W)`` int32.

    PNG (8 or 16 bit grey, via Pillow, all 16 bits kept) or TIFF (one 2D page, via tifffile). The
    values are taken as they are, not rescaled.

    Raises:
        UnreadableFileError: missing or corrupt file.
        UnsupportedInputError: colour / multi-channel or multi-plane images, non-integer values,
            or ids outside ``0 .. 2**31 - 1``.
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise UnreadableFileError(f"{name}: no such file")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic in _TIFF_MAGIC:
        import tifffile

        try:
            with tifffile.TiffFile(str(path)) as tif:
                array = tif.series[0].levels[0].asarray()
        except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError) as error:
            raise UnreadableFileError(f"{name}: cannot read TIFF ({type(error).__name__})") from None
        array = np.squeeze(np.asarray(array))
    else:
        from PIL import Image as PILImage

        try:
            with PILImage.open(path) as image:
                if image.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N"):
                    raise UnsupportedInputError(
                        f"{name}: a {image.mode} image is not an instance map (one grey channel of ids needed)"
                    )
                array = np.array(image)  # "P": the palette indices are the ids
        except (PILImage.UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as error:
            raise UnreadableFileError(f"{name}: cannot read image ({type(error).__name__})") from None
    if array.ndim != 2:
        raise UnsupportedInputError(
            f"{name}: an instance map must be one 2D grey channel of ids, got shape {array.shape}"
        )
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise UnsupportedInputError(f"{name}: an instance map must hold integer ids")
    elif array.dtype.kind not in "iu":
        raise UnsupportedInputError(f"{name}: pixel type {array.dtype} is not an instance map")
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.int32).max):
        raise UnsupportedInputError(f"{name}: instance ids must be in 0 .. 2**31 - 1")
    return array.astype(np.int32)
