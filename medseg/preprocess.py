"""Preprocessing shared by training and inference, so a model sees in production what it saw in
training: intensity normalisation here; orientation and resampling to the model's spacing are
added by the inference engine's owners in this module too (one implementation each).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medseg.package import Normalization

ArrayLike = Any  # a NumPy array or a CPU tensor: what goes in comes out


def normalize_intensity(x: ArrayLike, normalization: Normalization) -> ArrayLike:
    """Normalise intensities as nnU-Net does; returns float32 of the same type and shape.

    - ``zscore`` (MR): ``(x - mean(x)) / max(std(x), 1e-8)`` over the whole image.
    - ``ct``: clip to ``normalization.clip`` (HU), then ``(x - mean) / std`` with the dataset's
      foreground statistics stored in the model card.
    - ``max``: ``x / max(max(x), 1e-8)`` over the whole image (SPOCKMIP, Radhakrishna et al. 2024).
    - ``none``: cast only.

    Raises:
        ValueError: ``ct`` without clip/mean/std.
    """
    is_tensor = not isinstance(x, np.ndarray) and type(x).__module__.startswith(("torch", "monai"))
    a = np.asarray(x.detach().cpu().numpy() if is_tensor else x, dtype=np.float32)
    if normalization.scheme == "zscore":
        std = max(float(a.std(dtype=np.float64, ddof=1)) if a.size > 1 else 0.0, 1e-8)  # unbiased, as torch.std
        a = ((a - np.float32(a.mean(dtype=np.float64))) / np.float32(std)).astype(np.float32, copy=False)
    elif normalization.scheme == "ct":
        n = normalization
        if n.clip is None or n.mean is None or n.std is None:
            raise ValueError("ct normalization needs clip, mean and std")
        a = ((np.clip(a, n.clip[0], n.clip[1]) - np.float32(n.mean)) / np.float32(max(n.std, 1e-8))).astype(np.float32)
    elif normalization.scheme == "max":
        a = a / np.float32(max(float(a.max()) if a.size else 0.0, 1e-8))
    elif a is x:
        a = a.copy()
    if is_tensor:
        import torch

        return torch.from_numpy(np.ascontiguousarray(a))
    return a


def window_max_normalize(windows: ArrayLike) -> ArrayLike:
    """Each window and channel of ``windows`` ``(N, C, *spatial)`` (an array or a tensor) divided
    by its own maximum (``x / max(max(x), 1e-8)``; SPOCKMIP's per-patch max normalisation,
    Radhakrishna et al. 2024). Returns a new array of the same kind (windows are often views of
    the whole image)."""
    shape = (*windows.shape[:2], *([1] * (windows.ndim - 2)))
    if isinstance(windows, np.ndarray):
        peak = np.maximum(windows.reshape(*windows.shape[:2], -1).max(axis=2), 1e-8).astype(windows.dtype)
        return windows / peak.reshape(shape)
    peak = windows.flatten(2).amax(2).clamp_min(1e-8)
    return windows / peak.reshape(shape).to(windows.dtype)


# --------------------------------------------------------------------------------------------
# Orientation and resampling between an input grid and a model grid
# --------------------------------------------------------------------------------------------

#: MONAI axis-code labels for RAS+ world coordinates (NIfTI / nibabel convention)
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
#: relative spacing difference below which no resampling is done (the grids are the same)
SPACING_RTOL = 1e-3


class ModelGrid:
    """The geometry between an input grid and a model grid, and the resampling both ways.

    Forward (:meth:`to_model`), as training's preprocessing does it (``Orientationd`` to
    ``orientation`` with RAS+ labels, then ``Spacingd`` to ``spacing``, bilinear, border
    padding): an exact axis permutation/flip by MONAI's ``Orientation``, then MONAI's ``Spacing``
    (skipped when the spacing already matches within :data:`SPACING_RTOL`, so such inputs are
    not interpolated at all). Direction cosines are kept (no rotation to the world axes).

    Inverse (:meth:`to_oriented` then :meth:`to_input`): MONAI's ``SpatialResample`` from the model
    grid back onto the oriented input grid (the affines define the mapping; border padding), then
    the exact inverse permutation/flip. Resample *probabilities* with it, then take the argmax;
    since the orientation step is a permutation, the argmax may also be taken before it.

    Attributes:
        input_shape, input_affine: the input grid ``(I, J, K)`` and its voxel -> RAS+ mm affine.
        oriented_shape, oriented_affine: after the orientation step.
        model_shape, model_affine: the model grid.
        resampled: whether the spacing step interpolates.
    """

    def __init__(
        self, input_shape: Sequence[int], input_affine: np.ndarray, spacing: Sequence[float], orientation: str = "RAS"
    ):
        import nibabel as nib

        self.input_shape = tuple(int(s) for s in input_shape)
        self.input_affine = np.asarray(input_affine, dtype=np.float64)
        self.spacing = tuple(float(s) for s in spacing)
        self.orientation = orientation
        self.input_axcodes = "".join(nib.aff2axcodes(self.input_affine))
        start = nib.orientations.io_orientation(self.input_affine)
        self._ornt = nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(orientation))
        self.oriented_shape = tuple(int(self.input_shape[int(a)]) for a in np.argsort(self._ornt[:, 0]))
        self.oriented_affine = self.input_affine @ nib.orientations.inv_ornt_aff(self._ornt, self.input_shape)
        current = np.linalg.norm(self.oriented_affine[:3, :3], axis=0)
        self.resampled = not np.allclose(current, self.spacing, rtol=SPACING_RTOL, atol=0)
        # the model grid is what MONAI's Spacing makes of the oriented grid; computed lazily
        self.model_shape: tuple[int, ...] = self.oriented_shape
        self.model_affine: np.ndarray = self.oriented_affine

    @property
    def planned_model_shape(self) -> tuple[int, ...]:
        """The model grid's shape as the spacing step will make it (to within a voxel), known
        before any resampling: ``oriented_shape * current spacing / target spacing``."""
        if not self.resampled:
            return self.oriented_shape
        current = np.linalg.norm(self.oriented_affine[:3, :3], axis=0)
        return tuple(max(1, int(round(n * c / t))) for n, c, t in zip(self.oriented_shape, current, self.spacing))

    def to_model(self, array: ArrayLike) -> np.ndarray:
        """``(C, I, J, K)`` on the input grid -> a new float32 ``(C, *model_shape)`` array on the
        model grid (never sharing memory with ``array``); sets :attr:`model_shape` /
        :attr:`model_affine`. Without resampling this is the exact axis permutation/flip (NumPy
        only); with it, MONAI's ``Orientation`` and ``Spacing``.

        Raises:
            ValueError: ``array`` is not ``(C, *input_shape)``.
        """
        array = np.asarray(array.numpy() if not isinstance(array, np.ndarray) else array)
        if tuple(array.shape[1:]) != self.input_shape:
            raise ValueError(f"array shape {tuple(array.shape)} is not (C, {self.input_shape})")
        if not self.resampled:
            # the inverse of to_input: oriented axis i holds input axis order[i], flipped where marked
            order = [int(a) for a in np.argsort(self._ornt[:, 0])]
            out = np.transpose(array, (0, *[1 + o for o in order]))
            flips = [1 + int(self._ornt[i, 0]) for i in range(3) if self._ornt[i, 1] == -1]
            out = np.flip(out, flips) if flips else out
            return np.array(out, dtype=np.float32, order="C", copy=True)
        import torch
        from monai.data import MetaTensor
        from monai.transforms import Orientation, Spacing

        image = MetaTensor(torch.as_tensor(array, dtype=torch.float32), affine=torch.as_tensor(self.input_affine))
        image = Orientation(axcodes=self.orientation, labels=RAS_LABELS)(image)
        image = Spacing(pixdim=self.spacing, mode="bilinear")(image)
        self.model_shape = tuple(int(s) for s in image.shape[1:])
        self.model_affine = image.affine.numpy().astype(np.float64)
        return np.array(image.as_tensor().float().numpy(), order="C", copy=True)

    def to_oriented(self, array: ArrayLike, mode: str = "bilinear") -> np.ndarray:
        """``(C, *model_shape)`` -> float32 ``(C, *oriented_shape)``: the spacing step inverted
        (identity when :attr:`resampled` is false)."""
        if not self.resampled:
            return array
        import torch
        from monai.data import MetaTensor
        from monai.transforms import SpatialResample

        image = MetaTensor(torch.as_tensor(array), affine=torch.as_tensor(self.model_affine))
        out = SpatialResample(mode=mode, padding_mode="border", dtype=torch.float32)(
            image, dst_affine=torch.as_tensor(self.oriented_affine), spatial_size=self.oriented_shape
        )
        return out.as_tensor().numpy()

    def to_input(self, array: ArrayLike) -> ArrayLike:
        """``(..., *oriented_shape)`` -> ``(..., *input_shape)``: the exact inverse axis
        permutation/flip of the orientation step (any leading axes are kept)."""
        lead = array.ndim - 3
        ornt = self._ornt
        # oriented axis ornt[i, 0] holds input axis i, flipped when ornt[i, 1] == -1
        order = [int(ornt[i, 0]) for i in range(3)]
        flips = [lead + order[i] for i in range(3) if ornt[i, 1] == -1]
        if not isinstance(array, np.ndarray):  # a tensor
            out = array.flip(flips) if flips else array
            return out.permute(*range(lead), *[lead + o for o in order])
        out = np.flip(array, flips) if flips else array
        return np.transpose(out, (*range(lead), *[lead + o for o in order]))
