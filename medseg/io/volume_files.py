"""Single-file volumes: NIfTI (nibabel) and NRRD / MetaImage (SimpleITK), read and write.

NIfTI's affine is already voxel -> RAS+ mm. ITK images carry origin, spacing and a direction
matrix in LPS; they are converted once to the RAS+ affine
``diag(-1, -1, 1) @ [direction @ diag(spacing) | origin]`` with the array transposed from ITK's
``(z, y, x)`` to ``(i, j, k)``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from medseg import formats
from medseg.errors import (
    MissingGeometryError,
    UnreadableFileError,
    UnsafeInputError,
    UnsupportedInputError,
)
from medseg.io.atomic import atomic_write
from medseg.io.image import Image
from medseg.io.safety import (
    CLI_POLICY,
    ReadPolicy,
    check_attached_length,
    check_declared_voxels,
    check_self_contained,
    check_stream_length,
)

_LPS = np.diag([-1.0, -1.0, 1.0])
_MODALITY_TOKENS = {"ct": "CT", "mr": "MR", "mri": "MR", "t1": "MR", "t2": "MR", "flair": "MR", "pet": "PT", "pt": "PT"}


def volume_format(path: str | Path) -> str | None:
    """``"nifti"``, ``"nrrd"``, ``"metaimage"`` or ``None`` from the file name."""
    return formats.volume_format(Path(path).name)


def guess_modality(path: str | Path) -> str:
    """Modality from a dcm2niix/BIDS sidecar JSON (``Modality``) or file-name tokens, else ``""``."""
    path = Path(path)
    stem = formats.strip_suffix(path.name)
    sidecar = path.with_name(stem + ".json")
    if sidecar.is_file():
        try:
            value = json.loads(sidecar.read_text()).get("Modality", "")
            if isinstance(value, str) and value:
                return value.upper()
        except (OSError, ValueError, AttributeError):
            pass
    for token in re.split(r"[^a-z0-9]+", stem.lower()):
        if token in _MODALITY_TOKENS:
            return _MODALITY_TOKENS[token]
    return ""


def _nifti_header(path: Path, policy: ReadPolicy):
    """Load a NIfTI file's header (nibabel; no pixel is decoded) and run every check that needs
    no pixels; returns the nibabel image (its ``dataobj`` still a proxy).

    Raises: see :func:`read_nifti`.
    """
    import nibabel as nib

    try:
        image = nib.load(str(path))
        header = image.header
        magic = _raw_nifti_magic(path)  # nibabel rewrites a loaded header's magic
        shape = tuple(int(s) for s in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = int(header.get_data_offset())
    except Exception as error:
        raise UnreadableFileError(f"{path.name}: cannot read NIfTI ({type(error).__name__})") from None
    if magic in (b"ni1", b"ni2"):
        raise UnsafeInputError(
            f"{path.name}: a NIfTI header of a .hdr/.img pair (pixel data in "
            "another file); send a single .nii or .nii.gz"
        )
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise UnsupportedInputError(
            f"{path.name}: {_dtype_name(dtype)} voxels are not supported (grey-value volumes only, not RGB/colour)"
        )
    voxels = math.prod(shape)
    check_declared_voxels(voxels, policy, path.name)
    gz = path.name.lower().endswith(".gz")
    check_stream_length(path, offset, voxels * dtype.itemsize, path.name, "gzip" if gz else "none")
    return image


def nifti_geometry(path: str | Path, policy: ReadPolicy = CLI_POLICY) -> tuple[tuple[int, ...], np.ndarray]:
    """The grid :func:`read_nifti` would return, from the header alone (no pixel decoded).

    Returns:
        ``(shape, affine)``: the array shape ``(I, J, K)`` or ``(I, J, K, T)`` and the voxel ->
        RAS+ mm affine, exactly as :func:`read_nifti` gives them.

    Raises:
        The same header errors as :func:`read_nifti` (unreadable, truncated, pair header,
        too large, RGB, more than 4 dimensions, singular affine).
    """
    path = Path(path)
    image = _nifti_header(path, policy)
    shape = _shape_3d(tuple(int(s) for s in image.header.get_data_shape()), path.name)
    affine = np.asarray(image.affine, dtype=np.float64)
    check_affine(affine, path.name)
    return shape, affine


def read_nifti(path: str | Path, policy: ReadPolicy = CLI_POLICY) -> Image:
    """Read a NIfTI-1/2 file (nibabel). ``array`` keeps the stored dtype unless scl_slope/inter
    are set (then float); affine is the sform if set, else the qform.

    The header is checked before any pixel is decoded: the declared shape against
    ``policy.max_voxels``, and the file must hold as many bytes as the header declares (a
    ``.nii.gz`` is decompressed in chunks to count them, never into memory).

    Raises:
        UnreadableFileError: corrupt or truncated file, or data shorter than the header says.
        UnsafeInputError: a header of a ``.hdr``/``.img`` pair (its pixels are in another file).
        InputTooLargeError: more voxels than ``policy.max_voxels``.
        UnsupportedInputError: more than 4 dimensions, or an RGB (colour) volume.
        MissingGeometryError: a singular affine (zero sform and qform and pixdim).
    """
    path = Path(path)
    image = _nifti_header(path, policy)
    try:
        array = np.asanyarray(image.dataobj)
    except Exception as error:
        raise UnreadableFileError(f"{path.name}: cannot read NIfTI ({type(error).__name__})") from None
    array = _to_3d(array, path.name)
    affine = np.asarray(image.affine, dtype=np.float64)
    check_affine(affine, path.name)
    return Image(
        array=array, affine=affine, meta={"format": "nifti", "source": str(path), "modality": guess_modality(path)}
    )


def _raw_nifti_magic(path: Path) -> bytes:
    """The magic string as stored (``n+1``/``n+2`` single file, ``ni1``/``ni2`` header of a pair)."""
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        head = handle.read(540)
    if 540 in (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")):
        return head[4:7]  # NIfTI-2: the magic follows sizeof_hdr
    return head[344:347]


def check_affine(affine: np.ndarray, name: str) -> None:
    """Refuse a voxel -> world affine that is not finite or not invertible.

    Raises:
        MissingGeometryError: e.g. a NIfTI with zero sform, qform and pixdim.
    """
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(linear)) < 1e-12:
        raise MissingGeometryError(
            f"{name}: the voxel-to-world affine is singular or not finite "
            "(no usable sform/qform, or zero voxel spacing)"
        )


def _dtype_name(dtype: np.dtype) -> str:
    return "RGB" if dtype.fields is not None and len(dtype.fields) in (3, 4) else str(dtype)


def _itk_information(path: Path, policy: ReadPolicy):
    """A SimpleITK reader of ``path`` with the image information read (no pixel decoded), after
    the checks that need no pixels. Raises: see :func:`read_itk`."""
    import SimpleITK as sitk

    check_self_contained(path, policy)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise UnreadableFileError(f"{path.name}: cannot read image ({_first_line(error)})") from None
    components = reader.GetNumberOfComponents()
    voxels = math.prod(reader.GetSize()) * components
    check_declared_voxels(voxels, policy, path.name)
    check_attached_length(path, voxels * _component_bytes(reader), path.name)
    return reader


def _itk_affine(dimension: int, direction, spacing, origin, name: str) -> np.ndarray:
    """The voxel -> RAS+ mm affine of an ITK (LPS) direction, spacing and origin."""
    direction = np.asarray(direction, dtype=np.float64).reshape(dimension, dimension)
    lps = np.eye(4)
    lps[:dimension, :dimension] = direction @ np.diag(np.asarray(spacing, dtype=np.float64))
    lps[:dimension, 3] = np.asarray(origin, dtype=np.float64)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    check_affine(affine, name)
    return affine


def itk_geometry(path: str | Path, policy: ReadPolicy = CLI_POLICY) -> tuple[tuple[int, ...], np.ndarray]:
    """The grid :func:`read_itk` would return, from the NRRD / MetaImage header alone.

    Returns:
        ``(shape, affine)``: ``(I, J, K)``, or ``(I, J, K, T)`` for a vector image, and the voxel
        -> RAS+ mm affine, as :func:`read_itk` gives them.

    Raises:
        The same header errors as :func:`read_itk` (detached data, unreadable, too large,
        truncated attached data, more than 3 spatial dimensions, singular geometry).
    """
    path = Path(path)
    reader = _itk_information(path, policy)
    dimension = reader.GetDimension()
    if dimension not in (2, 3):
        raise UnsupportedInputError(f"{path.name}: {dimension}D images are not supported")
    size = tuple(int(s) for s in reader.GetSize())
    if dimension == 2:
        size = (*size, 1)
    components = reader.GetNumberOfComponents()
    shape = (*size, components) if components > 1 else size
    affine = _itk_affine(dimension, reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin(), path.name)
    return shape, affine


def read_itk(path: str | Path, policy: ReadPolicy = CLI_POLICY) -> Image:
    """Read NRRD / MetaImage (.mha, .mhd+raw) with SimpleITK, converting LPS to RAS+.

    Vector (multi-component) images become a trailing T axis. Before any pixel is read, a
    detached data file is checked against ``policy`` (:func:`medseg.io.safety.check_self_contained`),
    the declared size against ``policy.max_voxels``, and attached data must be as long as declared.

    Raises:
        UnsafeInputError: detached pixel data the policy does not allow.
        UnreadableFileError: corrupt or truncated file, or missing data file.
        InputTooLargeError: more voxels than ``policy.max_voxels``.
        UnsupportedInputError: more than 3 spatial dimensions.
        MissingGeometryError: singular direction/spacing.
    """
    import SimpleITK as sitk

    path = Path(path)
    reader = _itk_information(path, policy)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise UnreadableFileError(f"{path.name}: cannot read image ({_first_line(error)})") from None
    dimension = image.GetDimension()
    if dimension not in (2, 3):
        raise UnsupportedInputError(f"{path.name}: {dimension}D images are not supported")
    array = sitk.GetArrayFromImage(image)  # (z, y, x[, c]) or (y, x[, c])
    components = image.GetNumberOfComponentsPerPixel()
    spatial = array.ndim - (1 if components > 1 else 0)
    array = np.moveaxis(array, range(spatial), range(spatial)[::-1])  # -> (x, y[, z][, c])
    if dimension == 2:
        array = array[:, :, None, ...]
    affine = _itk_affine(dimension, image.GetDirection(), image.GetSpacing(), image.GetOrigin(), path.name)
    fmt = volume_format(path) or "itk"
    return Image(
        array=np.ascontiguousarray(array),
        affine=affine,
        meta={"format": fmt, "source": str(path), "modality": guess_modality(path)},
    )


def _component_bytes(reader) -> int:
    import SimpleITK as sitk

    scalar = sitk.Image([1, 1], reader.GetPixelID(), reader.GetNumberOfComponents())
    return int(scalar.GetSizeOfPixelComponent())


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if "ERROR" in line or "exception" in line.lower()]
    return (useful or lines or [type(error).__name__])[-1][:200]


def _to_3d(array: np.ndarray, name: str) -> np.ndarray:
    _shape_3d(array.shape, name)
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim == 5 and array.shape[3] == 1:  # NIfTI vector intent (x, y, z, 1, c)
        return array[:, :, :, 0, :]
    return array


def _shape_3d(shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """The shape :func:`_to_3d` gives an array of ``shape``.

    Raises:
        UnsupportedInputError: more than 4 dimensions (other than a NIfTI vector image).
    """
    if len(shape) == 2:
        return (*shape, 1)
    if len(shape) == 5 and shape[3] == 1:
        return (*shape[:3], shape[4])
    if len(shape) > 4:
        raise UnsupportedInputError(f"{name}: {len(shape)}D images are not supported")
    return tuple(shape)


def label_dtype(array: np.ndarray) -> np.dtype:
    """Smallest integer dtype for a label map's values (uint8, uint16, int16 or int32)."""
    if array.size == 0:
        return np.dtype(np.uint8)
    low, high = int(array.min()), int(array.max())
    for candidate in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(candidate)
        if info.min <= low and high <= info.max:
            return np.dtype(candidate)
    raise UnsupportedInputError(f"label values {low}..{high} do not fit in int32")


def write_nifti(image: Image, path: str | Path, *, label_map: bool | None = None) -> Path:
    """Write ``image`` as NIfTI-1 (``.nii`` or ``.nii.gz``), atomically.

    The affine is stored exactly in the sform and as the qform (both code 1, scanner); units are
    mm. Boolean and integer arrays (label maps) are written as the smallest integer type that
    holds their values; ``label_map=True`` forces that for float arrays holding integers.
    The file is written under a temporary name in the target folder, then renamed.

    Raises:
        UnsupportedInputError: wrong suffix, or a float label map with non-integer values.
    """
    import nibabel as nib

    path = Path(path)
    if not path.name.lower().endswith(formats.NIFTI_SUFFIXES):
        raise UnsupportedInputError(f"{path.name}: a NIfTI output must end in .nii or .nii.gz")
    array = np.asarray(image.array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif label_map or (label_map is None and array.dtype.kind in "ui"):
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
                raise UnsupportedInputError(f"{path.name}: label map holds non-integer values")
        array = array.astype(label_dtype(array), copy=False)
    elif array.dtype == np.float64 or array.dtype == np.float16:
        array = array.astype(np.float32)
    nifti = nib.Nifti1Image(array, image.affine)
    nifti.set_sform(image.affine, code=1)
    nifti.set_qform(image.affine, code=1)
    nifti.header.set_xyzt_units("mm", "sec")
    nifti.header.set_data_dtype(array.dtype)
    description = str(image.meta.get("series_description", ""))[:79]
    if description:
        nifti.header["descrip"] = description.encode("ascii", "replace")
    return atomic_write(path, lambda tmp: nib.save(nifti, str(tmp)))


def describe(image: Image) -> dict[str, Any]:
    """Shape, spacing (mm), orientation and affine of ``image`` as plain Python values."""
    return {
        "shape": list(image.array.shape),
        "spacing": [round(v, 6) for v in image.spacing],
        "orientation": image.orientation,
        "affine": np.round(image.affine, 6).tolist(),
        "dtype": str(image.array.dtype),
    }
