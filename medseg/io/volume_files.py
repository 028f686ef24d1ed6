"""Single-file volumes: NIfTI (nibabel) and NRRD / MetaImage (SimpleITK), read and write.

NIfTI's affine is already voxel -> RAS+ mm. ITK images carry origin, spacing and a direction
matrix in LPS; they are converted once to the RAS+ affine
``diag(-1, -1, 1) @ [direction @ diag(spacing) | origin]`` with the array transposed from ITK's
``(z, y, x)`` to ``(i, j, k)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import UnreadableFileError, UnsupportedInputError
from medseg.io.atomic import atomic_write
from medseg.io.image import Image

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = {".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "metaimage", ".mhd": "metaimage"}
_LPS = np.diag([-1.0, -1.0, 1.0])
_MODALITY_TOKENS = {"ct": "CT", "mr": "MR", "mri": "MR", "t1": "MR", "t2": "MR", "flair": "MR",
                    "pet": "PT", "pt": "PT"}


def volume_format(path: str | Path) -> str | None:
    """``"nifti"``, ``"nrrd"``, ``"metaimage"`` or ``None`` from the file name."""
    name = Path(path).name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    return ITK_SUFFIXES.get(Path(name).suffix)


def guess_modality(path: str | Path) -> str:
    """Modality from a dcm2niix/BIDS sidecar JSON (``Modality``) or file-name tokens, else ``""``."""
    path = Path(path)
    stem = path.name
    for suffix in (*NIFTI_SUFFIXES, *ITK_SUFFIXES):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
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


def read_nifti(path: str | Path) -> Image:
    """Read a NIfTI-1/2 file (nibabel). ``array`` keeps the stored dtype unless scl_slope/inter
    are set (then float); affine is the sform if set, else the qform.

    Raises:
        UnreadableFileError: corrupt or truncated file.
        UnsupportedInputError: more than 4 dimensions.
    """
    import nibabel as nib

    path = Path(path)
    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
    except Exception as error:
        raise UnreadableFileError(f"{path.name}: cannot read NIfTI ({type(error).__name__})") from None
    array = _to_3d(array, path.name)
    return Image(array=array, affine=np.asarray(image.affine, dtype=np.float64),
                 meta={"format": "nifti", "source": str(path), "modality": guess_modality(path)})


def read_itk(path: str | Path) -> Image:
    """Read NRRD / MetaImage (.mha, .mhd+raw) with SimpleITK, converting LPS to RAS+.

    Vector (multi-component) images become a trailing T axis.

    Raises:
        UnreadableFileError: corrupt file or missing data file.
        UnsupportedInputError: more than 3 spatial dimensions.
    """
    import SimpleITK as sitk

    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise UnreadableFileError(f"{path.name}: cannot read image ({_first_line(error)})") from None
    dimension = image.GetDimension()
    if dimension not in (2, 3):
        raise UnsupportedInputError(f"{path.name}: {dimension}D images are not supported")
    array = sitk.GetArrayFromImage(image)  # (z, y, x[, c]) or (y, x[, c])
    components = image.GetNumberOfComponentsPerPixel()
    spatial = array.ndim - (1 if components > 1 else 0)
    array = np.moveaxis(array, range(spatial), range(spatial)[::-1])  # -> (x, y[, z][, c])
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dimension, dimension)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    lps = np.eye(4)
    lps[:dimension, :dimension] = direction @ np.diag(spacing)
    lps[:dimension, 3] = origin
    if dimension == 2:
        array = array[:, :, None, ...]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    fmt = ITK_SUFFIXES.get(path.suffix.lower(), "itk")
    return Image(array=np.ascontiguousarray(array), affine=affine,
                 meta={"format": fmt, "source": str(path), "modality": guess_modality(path)})


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if "ERROR" in line or "exception" in line.lower()]
    return (useful or lines or [type(error).__name__])[-1][:200]


def _to_3d(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim == 5 and array.shape[3] == 1:  # NIfTI vector intent (x, y, z, 1, c)
        return array[:, :, :, 0, :]
    if array.ndim > 4:
        raise UnsupportedInputError(f"{name}: {array.ndim}D images are not supported")
    return array


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
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
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
