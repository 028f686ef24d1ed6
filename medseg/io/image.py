"""The in-memory image that every step of medseg passes along.

Geometry convention (the one NIfTI, nibabel and MONAI ``MetaTensor`` use): ``array`` is indexed
``[i, j, k]`` (plus a trailing time/volume axis for 4D series) and ``affine`` maps the voxel index
``(i, j, k, 1)`` to RAS+ world coordinates in millimetres. DICOM's LPS patient coordinates are
converted once, in :mod:`medseg.io`, by negating the first two world axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Image:
    """A volume with its geometry.

    Attributes:
        array: voxel data, shape ``(I, J, K)`` or ``(I, J, K, T)`` for multi-volume series. CT is in
            HU (RescaleSlope/Intercept applied); label maps are integer arrays.
        affine: ``(4, 4)`` float64 voxel-to-RAS+ matrix in mm.
        meta: source metadata without patient identifiers: ``modality``, ``series_uid``,
            ``study_uid``, ``series_description``, ``source`` (path), ``instance_count`` and so on.
        warnings: human-readable notes about what the reader skipped or repaired.
        dicom_source: for DICOM input, the sorted source datasets' file paths (one per slice), so
            that a DICOM SEG can reference the series; ``None`` otherwise.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    dicom_source: list[str] | None = None

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape ``(I, J, K)`` (without a time axis)."""
        return tuple(int(s) for s in self.array.shape[:3])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along i, j, k in mm (column norms of the affine)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def direction(self) -> np.ndarray:
        """``(3, 3)`` unit direction cosines (columns = i, j, k axes) in RAS+."""
        return self.affine[:3, :3] / np.asarray(self.spacing)[None, :]

    @property
    def origin(self) -> tuple[float, float, float]:
        """World RAS+ position of voxel (0, 0, 0) in mm."""
        return tuple(float(v) for v in self.affine[:3, 3])

    @property
    def orientation(self) -> str:
        """Axis codes such as ``"RAS"`` or ``"LPS"`` (nibabel's ``aff2axcodes``)."""
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    def with_array(self, array: np.ndarray, **meta: Any) -> Image:
        """A new image on the same grid holding ``array`` (e.g. a label map)."""
        return Image(array=array, affine=self.affine.copy(), meta={**self.meta, **meta}, dicom_source=self.dicom_source)
