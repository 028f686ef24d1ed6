"""Multi-page 3D TIFF stacks (microscopy, vessel labels), read and written with tifffile.

Axis order. A z-stack TIFF holds one page per slice, so tifffile returns ``(Z, Y, X)`` (page,
row, column). It becomes the project's ``(I, J, K) = (X, Y, Z)`` array by a transpose, exactly as
:func:`medseg.io.volume_files.read_itk` turns ITK's ``(z, y, x)`` array around: the voxel of the
file at page ``z``, row ``y``, column ``x`` is ``image.array[x, y, z]``. TIFF has no patient frame,
so the geometry is the one ITK (and SimpleITK, Fiji's "Bio-Formats") gives a TIFF: identity
direction in LPS, origin 0, i.e. the RAS+ affine ``diag(-sx, -sy, sz)`` with the spacing in mm.
After ``Orientationd("RAS")`` in training the in-plane axes are flipped, the stack axis stays the
third (``D``) axis, so the MIP loss's ``"z"`` axis is the stack axis.

Spacing (mm), in this order:

1. ``spacing`` given by the caller (``--spacing``, ``data.input_spacing`` or a manifest entry),
   in the array's ``(X, Y, Z)`` order; it wins over the file (a warning when they differ).
2. ImageJ metadata: ``unit`` and ``spacing`` (z step) with the ``XResolution``/``YResolution``
   tags (pixels per unit); or OME-XML ``PhysicalSizeX/Y/Z`` with their units.
3. Neither: :class:`~medseg.errors.MissingGeometryError`. A silent 1 mm default would make HD95,
   volumes and the model card's spacing lies for microscopy (voxels of ~1 um), so the reader refuses
   and names ``--spacing``. Plain TIFF resolution tags without ImageJ/OME metadata are ignored:
   72 dpi is the default every writer puts there and carries no voxel size.

Binary labels. A stack whose values are exactly ``{0, 254}`` or ``{0, 255}`` (an 8/16-bit mask, as
the vesselNN labels are) is read as a 0/1 label map (``meta["binarized_from"]`` records the value,
``warnings`` says so); ``label=True`` also maps any non-zero of a two-valued stack to 1, and
``label=False`` keeps the values.

Writing (:func:`write_label_tiff`): the label map (class ids, ``uint8``/``uint16``) back as a
``(Z, Y, X)`` ImageJ hyperstack, zlib-compressed, spacing in mm in the ImageJ metadata (``unit``
``mm``, resolution tags = pixels per mm, ``spacing`` = z step), so that reading it gives the same
array and spacing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.errors import MissingGeometryError, UnreadableFileError, UnsupportedInputError
from medseg.io.atomic import atomic_write
from medseg.io.image import Image
from medseg.io.safety import CLI_POLICY, ReadPolicy, check_declared_voxels

TIFF_SUFFIXES = (".tif", ".tiff")
#: length units of ImageJ / OME metadata -> mm
UNIT_MM = {
    "mm": 1.0,
    "millimeter": 1.0,
    "millimetre": 1.0,
    "cm": 10.0,
    "m": 1000.0,
    "um": 1e-3,
    "µm": 1e-3,
    "\u03bcm": 1e-3,
    "micron": 1e-3,
    "microns": 1e-3,
    "micrometer": 1e-3,
    "micrometre": 1e-3,
    "nm": 1e-6,
    "nanometer": 1e-6,
    "inch": 25.4,
    "in": 25.4,
}
#: values of a binary mask stack that become label 1
MASK_VALUES = (254, 255)


def is_tiff(path: str | Path) -> bool:
    """Whether ``path`` is named like a TIFF file (``.tif``/``.tiff``, case-insensitive)."""
    return str(path).lower().endswith(TIFF_SUFFIXES)


def parse_spacing(text: str | Sequence[float] | None) -> tuple[float, float, float] | None:
    """``--spacing`` as mm along the array axes ``(X, Y, Z)``.

    Accepts ``"0.5"`` (isotropic), ``"0.99,0.99,5"`` or a sequence; a unit suffix ``um``/``µm``/``nm``/
    ``mm`` (default mm) applies to all values, e.g. ``"0.99,0.99,5um"``.

    Raises:
        ValueError: not 1 or 3 positive finite numbers, or an unknown unit.
    """
    if text is None:
        return None
    if isinstance(text, str):
        match = re.fullmatch(r"\s*([0-9eE.+,\s-]+?)\s*([a-zA-Zµ\u03bc]*)\s*", text)
        if not match:
            raise ValueError(f"spacing {text!r}: expected 1 or 3 numbers, e.g. 0.99,0.99,5um")
        unit = match[2].lower() or "mm"
        if unit not in UNIT_MM:
            raise ValueError(f"spacing {text!r}: unknown unit {match[2]!r} (mm, um, nm)")
        try:
            values = [float(v) * UNIT_MM[unit] for v in match[1].replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError(f"spacing {text!r}: expected 1 or 3 numbers, e.g. 0.99,0.99,5um") from None
    else:
        values = [float(v) for v in text]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing {text!r}: expected 1 or 3 positive numbers (X, Y, Z in mm)")
    return (values[0], values[1], values[2])


def _resolution_mm(page, tag: str, unit_mm: float) -> float | None:
    value = page.tags.get(tag)
    if value is None:
        return None
    numerator, denominator = value.value
    if not numerator or not denominator:
        return None
    return unit_mm * denominator / numerator  # pixels per unit -> unit per pixel -> mm


def _imagej_spacing(tif) -> tuple[float, float, float] | None:
    meta = tif.imagej_metadata or {}
    unit = str(meta.get("unit", "")).strip().lower().replace("\\u00b5", "µ")
    if unit not in UNIT_MM:
        return None
    page = tif.pages[0]
    scale = UNIT_MM[unit]
    sx, sy = _resolution_mm(page, "XResolution", scale), _resolution_mm(page, "YResolution", scale)
    sz = float(meta["spacing"]) * scale if meta.get("spacing") else None
    if sx is None or sy is None or sz is None:
        return None
    return (sx, sy, sz)


def _ome_spacing(tif) -> tuple[float, float, float] | None:
    if not tif.is_ome or not tif.ome_metadata:
        return None
    pixels = re.search(r"<(?:\w+:)?Pixels\b([^>]*)>", tif.ome_metadata)
    if not pixels:
        return None
    attributes = dict(re.findall(r'(\w+)="([^"]*)"', pixels[1]))
    values = []
    for axis in "XYZ":
        size = attributes.get(f"PhysicalSize{axis}")
        unit = attributes.get(f"PhysicalSize{axis}Unit", "µm").lower()
        if size is None or unit not in UNIT_MM:
            return None
        values.append(float(size) * UNIT_MM[unit])
    return (values[0], values[1], values[2])


def file_spacing(path: str | Path) -> tuple[float, float, float] | None:
    """The voxel size (mm, ``(X, Y, Z)``) the TIFF's ImageJ or OME metadata states, or ``None``.

    Raises:
        UnreadableFileError: not a readable TIFF.
    """
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            return _imagej_spacing(tif) or _ome_spacing(tif)
    except (tifffile.TiffFileError, OSError, ValueError) as error:
        raise UnreadableFileError(f"{Path(path).name}: cannot read TIFF ({type(error).__name__})") from None


def read_tiff(
    path: str | Path,
    policy: ReadPolicy = CLI_POLICY,
    spacing: Sequence[float] | None = None,
    label: bool | None = None,
) -> Image:
    """Read a single-channel 2D or 3D TIFF stack into an :class:`Image` (see the module docstring).

    Args:
        path: ``.tif``/``.tiff`` file; pages are the z slices.
        policy: ``max_voxels`` is checked against the declared shape before decoding.
        spacing: mm along ``(X, Y, Z)``; overrides the file's metadata.
        label: ``None`` detect a 0/254 or 0/255 mask and map it to 0/1; ``True`` map any two-valued
            ``{0, v}`` stack to 0/1; ``False`` keep the values.

    Returns:
        ``array`` ``(X, Y, Z)`` (the file's ``(Z, Y, X)`` transposed; a 2D TIFF gets ``Z = 1``),
        ``affine`` ``diag(-sx, -sy, sz, 1)`` (LPS identity, as ITK), ``meta["format"] == "tiff"``,
        ``meta["spacing_source"]`` ``"argument"`` or ``"file"``.

    Raises:
        UnreadableFileError: not a readable TIFF.
        UnsupportedInputError: colour (RGB) or multi-channel / time-lapse stacks (more than 3 axes).
        InputTooLargeError: more voxels than ``policy.max_voxels``.
        MissingGeometryError: no spacing in the file and none given.
    """
    import tifffile

    path = Path(path)
    name = path.name
    try:
        with tifffile.TiffFile(str(path)) as tif:
            series = tif.series[0]
            shape, axes = tuple(int(s) for s in series.shape), series.axes
            check_declared_voxels(math.prod(shape), policy, name)
            if "S" in axes or series.dtype.kind not in "biuf":
                raise UnsupportedInputError(f"{name}: colour (RGB) TIFFs are not supported (grey-value stacks only)")
            squeezed = tuple(s for s in shape if s != 1)
            if len(squeezed) > 3:
                raise UnsupportedInputError(
                    f"{name}: {len(squeezed)}D TIFF (axes {axes}) is not supported; one channel, one time point"
                )
            stored = _imagej_spacing(tif) or _ome_spacing(tif)
            array = series.asarray()
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError) as error:
        raise UnreadableFileError(f"{name}: cannot read TIFF ({type(error).__name__}: {error})") from None
    array = np.squeeze(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise UnsupportedInputError(f"{name}: expected a (Z, Y, X) stack, got shape {array.shape}")
    warnings: list[str] = []
    given = parse_spacing(spacing) if spacing is not None else None
    if given is not None:
        if stored is not None and not np.allclose(given, stored, rtol=1e-3):
            warnings.append(f"spacing {given} mm given; the file states {tuple(round(v, 6) for v in stored)} mm")
        voxel, source = given, "argument"
    elif stored is not None:
        voxel, source = stored, "file"
    else:
        raise MissingGeometryError(
            f"{name}: the TIFF states no voxel size (no ImageJ/OME metadata); give it with "
            "--spacing X,Y,Z (mm, or e.g. 0.99,0.99,5um) or data.input_spacing"
        )
    meta = {"format": "tiff", "source": str(path), "modality": "", "spacing_source": source}
    values = np.unique(array) if array.dtype.kind in "iub" and array.itemsize <= 2 else None
    if label is not False and values is not None and len(values) == 2 and values[0] == 0:
        high = int(values[1])
        if high in MASK_VALUES or label:
            array = (array > 0).astype(np.uint8)
            meta["binarized_from"] = high
            warnings.append(f"binary mask with values 0/{high} read as label 0/1")
    array = np.ascontiguousarray(np.transpose(array, (2, 1, 0)))  # (Z, Y, X) -> (X, Y, Z)
    affine = np.diag([-voxel[0], -voxel[1], voxel[2], 1.0])
    return Image(array=array, affine=affine, meta=meta, warnings=warnings)


def write_label_tiff(image: Image, path: str | Path) -> Path:
    """Write a label map ``image`` (``(X, Y, Z)`` class ids) as a ``(Z, Y, X)`` ImageJ TIFF, atomically.

    Spacing (mm, the affine's column norms) goes into the ImageJ metadata (``unit=mm``, resolution
    tags in pixels per mm, ``spacing`` the z step); the world orientation is not stored (TIFF has no
    frame), so :func:`read_tiff` gives back the same array for a TIFF input's prediction.

    Raises:
        UnsupportedInputError: not a ``.tif``/``.tiff`` name, a non-integer or 4D array, or ids
            above 65535.
    """
    import tifffile

    path = Path(path)
    if not is_tiff(path):
        raise UnsupportedInputError(f"{path.name}: a TIFF output must end in .tif or .tiff")
    array = np.asarray(image.array)
    if array.ndim != 3:
        raise UnsupportedInputError(f"{path.name}: a label TIFF needs a 3D label map, got shape {array.shape}")
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise UnsupportedInputError(f"{path.name}: label map holds non-integer values")
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise UnsupportedInputError(f"{path.name}: label ids must be in 0..65535")
    dtype = np.uint8 if not array.size or array.max() < 256 else np.uint16
    stack = np.ascontiguousarray(np.transpose(array.astype(dtype), (2, 1, 0)))
    sx, sy, sz = image.spacing

    def write(tmp: Path) -> None:
        tifffile.imwrite(
            str(tmp),
            stack,
            imagej=True,
            resolution=(1.0 / sx, 1.0 / sy),
            metadata={"unit": "mm", "spacing": sz, "axes": "ZYX"},
            compression="zlib",
        )

    return atomic_write(path, write)
