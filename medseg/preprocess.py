"""Preprocessing shared by training and inference, so a model sees in production what it saw in
training: intensity normalisation here; orientation and resampling to the model's spacing are
added by the inference engine's owners in this module too (one implementation each).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medseg.package import Normalization

ArrayLike = np.ndarray | torch.Tensor


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
    is_tensor = isinstance(x, torch.Tensor)
    t = (x if is_tensor else torch.as_tensor(np.asarray(x))).float()
    if normalization.scheme == "zscore":
        t = (t - t.mean()) / t.std().clamp_min(1e-8)
    elif normalization.scheme == "ct":
        n = normalization
        if n.clip is None or n.mean is None or n.std is None:
            raise ValueError("ct normalization needs clip, mean and std")
        t = (t.clamp(n.clip[0], n.clip[1]) - n.mean) / max(n.std, 1e-8)
    elif normalization.scheme == "max":
        t = t / t.amax().clamp_min(1e-8)
    return t if is_tensor else t.numpy()


def window_max_normalize(windows: torch.Tensor) -> torch.Tensor:
    """Each window and channel of ``windows`` ``(N, C, *spatial)`` divided by its own maximum
    (``x / max(max(x), 1e-8)``; SPOCKMIP's per-patch max normalisation, Radhakrishna et al. 2024).
    Returns a new tensor (windows are often views of the whole image)."""
    peak = windows.flatten(2).amax(2).clamp_min(1e-8)
    return windows / peak.reshape(*peak.shape, *([1] * (windows.ndim - 2))).to(windows.dtype)


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

    def to_model(self, array: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``(C, I, J, K)`` on the input grid -> a new float32 ``(C, *model_shape)`` tensor on the
        model grid (never sharing memory with ``array``); sets :attr:`model_shape` /
        :attr:`model_affine`."""
        from monai.data import MetaTensor
        from monai.transforms import Orientation, Spacing

        tensor = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array)
        if tuple(tensor.shape[1:]) != self.input_shape:
            raise ValueError(f"array shape {tuple(tensor.shape)} is not (C, {self.input_shape})")
        image = MetaTensor(tensor.float(), affine=torch.as_tensor(self.input_affine))
        image = Orientation(axcodes=self.orientation, labels=RAS_LABELS)(image)
        if self.resampled:
            image = Spacing(pixdim=self.spacing, mode="bilinear")(image)
        self.model_shape = tuple(int(s) for s in image.shape[1:])
        self.model_affine = image.affine.numpy().astype(np.float64)
        out = image.as_tensor().float().contiguous()
        # never a view of the caller's array (it is normalised in place next)
        return out.clone() if out.data_ptr() == tensor.data_ptr() else out

    def to_oriented(self, array: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """``(C, *model_shape)`` -> float32 ``(C, *oriented_shape)``: the spacing step inverted
        (identity when :attr:`resampled` is false)."""
        if not self.resampled:
            return array
        from monai.data import MetaTensor
        from monai.transforms import SpatialResample

        image = MetaTensor(array, affine=torch.as_tensor(self.model_affine))
        out = SpatialResample(mode=mode, padding_mode="border", dtype=torch.float32)(
            image, dst_affine=torch.as_tensor(self.oriented_affine), spatial_size=self.oriented_shape
        )
        return out.as_tensor()

    def to_input(self, array: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """``(..., *oriented_shape)`` -> ``(..., *input_shape)``: the exact inverse axis
        permutation/flip of the orientation step (any leading axes are kept)."""
        lead = array.ndim - 3
        ornt = self._ornt
        # oriented axis ornt[i, 0] holds input axis i, flipped when ornt[i, 1] == -1
        order = [int(ornt[i, 0]) for i in range(3)]
        flips = [lead + order[i] for i in range(3) if ornt[i, 1] == -1]
        if isinstance(array, torch.Tensor):
            out = torch.flip(array, flips) if flips else array
            return out.permute(*range(lead), *[lead + o for o in order])
        out = np.flip(array, flips) if flips else array
        return np.transpose(out, (*range(lead), *[lead + o for o in order]))
