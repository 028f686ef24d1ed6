"""Which series of a scanner export a model should segment.

A study folder holds many series; with an MR model every series is MR, so the modality alone does
not pick the right one. The rule, applied by ``medseg predict`` to every series found:

1. **Modality** (before reading pixels): the series' DICOM Modality must be one of the card's
   ``modality``. A series without a modality (a NIfTI file without sidecar) passes — the user
   named it explicitly.
2. **Channels** (after reading): a multi-volume series (``(I, J, K, T)``) must have ``T`` equal to
   the network's ``in_channels``; a 3D series fits a single-channel model.
3. **Field of view** (after reading), when the card declares the training field of view as
   ``field_of_view_mm = {"min": [x, y, z], "max": [x, y, z]}`` (mm per axis of the model's
   orientation, e.g. RAS) in its ``training`` or ``data_card`` section: the series' physical extent
   (voxels x spacing, per axis after reorientation) must lie within
   ``[min / FOV_TOLERANCE, max * FOV_TOLERANCE]`` on every axis. A hippocampus-crop model
   (training crops 31-43 x 40-59 x 24-47 mm) then segments the 34 x 50 x 40 mm crop series of a
   study and skips its whole-brain series (about 192 x 220 x 143 mm) with the reason.

Without a declared field of view only rules 1 and 2 apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg.io.image import Image
from medseg.package import ModelCard

#: how far outside the training field of view (factor per axis) a series may be
FOV_TOLERANCE = 2.0


def modality_mismatch(modality: str, card: ModelCard) -> str | None:
    """Reason why a series of ``modality`` does not fit ``card``, or ``None`` if it fits."""
    expected = [m.upper() for m in card.modality]
    modality = (modality or "").upper()
    if modality and expected and modality not in expected:
        return f"modality {modality}, model {card.name} expects {'/'.join(expected)}"
    return None


def training_field_of_view(card: ModelCard) -> tuple[np.ndarray, np.ndarray] | None:
    """The card's declared training field of view ``(min_mm, max_mm)`` per axis, or ``None``."""
    for section in (card.training, card.data_card):
        fov: Any = section.get("field_of_view_mm") if isinstance(section, dict) else None
        if isinstance(fov, dict) and "min" in fov and "max" in fov:
            return np.asarray(fov["min"], dtype=float), np.asarray(fov["max"], dtype=float)
    return None


def field_of_view(image: Image, orientation: str = "RAS") -> np.ndarray:
    """Physical extent of ``image`` in mm (voxels x spacing) per axis of ``orientation``."""
    return grid_field_of_view(image.shape, image.affine, orientation)


def grid_field_of_view(shape: Sequence[int], affine: np.ndarray, orientation: str = "RAS") -> np.ndarray:
    """Physical extent in mm (voxels x spacing) per axis of ``orientation`` of the grid ``shape``
    (``(I, J, K[, T])``; only the first three count) with voxel -> RAS+ mm ``affine``."""
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(orientation)
    )
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    extent = np.asarray(tuple(shape)[:3], dtype=float) * spacing
    out = np.empty(3)
    for axis in range(3):
        out[int(ornt[axis, 0])] = extent[axis]
    return out


def series_mismatch(modality: str, shape: Sequence[int], affine: np.ndarray, card: ModelCard) -> str | None:
    """Reason why a series does not fit ``card`` (rules 1-3), or ``None`` if it fits.

    Needs no pixels: ``modality`` (DICOM Modality, ``""`` when unknown), the array ``shape``
    ``(I, J, K)`` or ``(I, J, K, T)`` and the voxel -> RAS+ mm ``affine`` - from a read image
    (:func:`image_mismatch`) or from the headers alone (:meth:`medseg.io.SeriesInfo.geometry`,
    as the service checks an upload).
    """
    reason = modality_mismatch(modality, card)
    if reason:
        return reason
    shape = tuple(int(s) for s in shape)
    channels = shape[3] if len(shape) == 4 else 1
    expected = int(card.network.config.get("in_channels", 1))
    if channels != expected:
        return f"{channels} volume(s) per voxel, model {card.name} expects {expected} channel(s)"
    declared = training_field_of_view(card)
    if declared is not None:
        low, high = declared
        extent = grid_field_of_view(shape, affine, card.orientation)
        if np.any(extent < low / FOV_TOLERANCE) or np.any(extent > high * FOV_TOLERANCE):
            shown = "x".join(f"{v:.0f}" for v in extent)
            trained = " x ".join(f"{a:.0f}-{b:.0f}" for a, b in zip(low, high))
            return (
                f"field of view {shown} mm is outside model {card.name}'s training range "
                f"({trained} mm, tolerance x{FOV_TOLERANCE:g})"
            )
    return None


def image_mismatch(image: Image, card: ModelCard) -> str | None:
    """Reason why a read ``image`` does not fit ``card`` (rules 1-3), or ``None`` if it fits
    (:func:`series_mismatch` on the image's modality, array shape and affine)."""
    return series_mismatch(str(image.meta.get("modality") or ""), image.array.shape, image.affine, card)
