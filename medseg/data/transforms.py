"""MONAI transform chains for training and validation.

Deterministic part (cached by :class:`monai.data.CacheDataset`): load (NIfTI via ``LoadImaged``),
channel first, orientation RAS, resampling to the plan's spacing (bilinear image, nearest label),
label cast to ``uint8`` (some label files are float32), intensity normalisation through
:func:`medseg.preprocess.normalize_intensity` (the one implementation shared with inference).
Training adds padding to the patch size, foreground/background indices (cached), then per sample:
a foreground-oversampled random crop (``RandCropByPosNegLabeld``; nnU-Net: 1/3 of patches
centred on a foreground voxel) and nnU-Net-style augmentation: rotation/scaling, Gaussian noise
and blur, brightness, gamma, mirroring.

TIFF stacks (:mod:`medseg.io.tiff`) are loaded by :class:`LoadVolumed` through :mod:`medseg.io`
(with the case's ``spacing``, 0/255 masks as 0/1); every other file by MONAI's ``LoadImaged``.

SPOCKMIP's MIP target (Radhakrishna et al., arXiv 2407.08655): the maximum projection of the
*whole* label volume, cropped to the patch's in-plane window, so that a vessel leaving the patch's
slab still counts. :class:`WholeVolumeMIPd` stores, per axis, the whole-volume projection
broadcast back along the projected axis (``P_z[h, w, d] = max_d' label[h, w, d']``); it is cropped,
flipped and rotated with the label by the same transforms, and :class:`ProjectMIPd` reduces the
patch's copy over that axis, which is exactly the whole-volume projection cropped to the window.
The crop's start (voxel of the padded, RAS-oriented volume) is kept as ``patch_start``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    CastToTyped,
    Compose,
    DeleteItemsd,
    EnsureTyped,
    FgBgToIndicesd,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    Spacingd,
    SpatialPadd,
    SqueezeDimd,
)

from medseg.package import Normalization
from medseg.preprocess import normalize_intensity, window_max_normalize

IMAGE, LABEL = "image", "label"
_INDICES = ("label_fg_indices", "label_bg_indices")
#: spatial dim of a channel-first ``(C, H, W, D)`` sample that each MIP axis projects over
MIP_DIMS = {"x": 1, "y": 2, "z": 3}
PATCH_START = "patch_start"


def mip_key(axis: str) -> str:
    """Key of the MIP target for ``axis`` (``"label_mip_z"``); in a batch ``(B, 1, *plane)``."""
    return f"{LABEL}_mip_{axis}"


def mip_axes(axis: str | None) -> tuple[str, ...]:
    """``"x"``/``"y"``/``"z"`` -> that axis, ``"multi"`` -> all three, ``None`` -> none.

    Raises:
        ValueError: another value.
    """
    if axis is None:
        return ()
    if axis == "multi":
        return tuple(MIP_DIMS)
    if axis not in MIP_DIMS:
        raise ValueError(f"MIP axis must be x, y, z or multi, got {axis!r}")
    return (axis,)


class LoadVolumed(MapTransform):
    """Load ``keys`` as channel-first ``(1, H, W, D)`` MetaTensors: TIFF stacks through
    :func:`medseg.io.read_image` (spacing from ``d[spacing_key]`` when present, mm along X, Y, Z;
    a 0/255 or 0/254 mask as 0/1), any other file through MONAI ``LoadImaged`` (unchanged
    behaviour). The affine is the reader's RAS+ one (``meta["space"] = "RAS"``). ``spacing_key``
    is removed from the dictionary.

    Raises:
        MissingGeometryError: a TIFF without voxel size and no spacing in the case.
    """

    def __init__(self, keys: KeysCollection, spacing_key: str = "spacing"):
        super().__init__(keys)
        self.spacing_key = spacing_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from medseg.io import read_image
        from medseg.io.tiff import is_tiff

        d = dict(data)
        spacing = d.pop(self.spacing_key, None)
        others = [k for k in self.key_iterator(d) if not is_tiff(d[k])]
        if others:
            d = LoadImaged(keys=others, image_only=True, ensure_channel_first=True)(d)
        for key in self.key_iterator(d):
            if isinstance(d[key], (str, bytes)) or hasattr(d[key], "__fspath__"):
                image = read_image(d[key], spacing=tuple(spacing) if spacing is not None else None)
                d[key] = MetaTensor(
                    torch.from_numpy(np.ascontiguousarray(image.array))[None],
                    affine=torch.as_tensor(image.affine, dtype=torch.float64),
                    meta={"filename_or_obj": str(d[key]), "space": "RAS", "original_channel_dim": "no_channel"},
                )
        return d


class WholeVolumeMIPd(MapTransform):
    """Add ``label_mip_<axis>`` for each axis: the whole label volume's maximum projection along it,
    broadcast back to the label's shape ``(1, H, W, D)`` (uint8, the label's MetaTensor meta), so that
    crops and flips applied to it with the label keep it aligned (see the module docstring).
    Binary labels give a 0/1 projection; multi-class ones the maximum class id."""

    def __init__(self, label_key: str = LABEL, axes: Sequence[str] = ("z",)):
        super().__init__([label_key])
        self.label_key, self.axes = label_key, tuple(axes)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        label = d[self.label_key]
        for axis in self.axes:
            projected = torch.as_tensor(label).amax(dim=MIP_DIMS[axis], keepdim=True).expand(label.shape)
            copy = label.clone()
            copy.copy_(projected)
            d[mip_key(axis)] = copy
        return d


class ProjectMIPd(MapTransform):
    """Reduce each broadcast ``label_mip_<axis>`` patch ``(1, H, W, D)`` to its projection
    ``(1, *plane)`` (e.g. ``(1, H, W)`` for ``"z"``), float32: the whole-volume MIP cropped to the
    patch's in-plane window."""

    def __init__(self, axes: Sequence[str] = ("z",)):
        super().__init__([mip_key(a) for a in axes])
        self.axes = tuple(axes)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for axis in self.axes:
            d[mip_key(axis)] = torch.as_tensor(d[mip_key(axis)]).amax(dim=MIP_DIMS[axis]).float()
        return d


class RecordPatchStartd(MapTransform):
    """``d["patch_start"]``: the crop's first voxel ``(h0, w0, d0)`` in the padded volume, from the
    invertible-transform record of ``key`` (MONAI's ``extra_info["cropped"]`` of the last crop,
    ``[before_0, after_0, before_1, ...]``, nested under the random crop's own record); int64 tensor
    ``(3,)``."""

    def __init__(self, key: str = LABEL):
        super().__init__([key])
        self.key = key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        start = None
        for op in reversed(getattr(d[self.key], "applied_operations", [])):
            info = op
            while isinstance(info, Mapping) and "cropped" not in info:  # a random crop nests its SpatialCrop
                info = info.get("extra_info")
            if isinstance(info, Mapping):
                start = [int(v) for v in info["cropped"][0::2]]
                break
        if start is not None:
            d[PATCH_START] = torch.as_tensor(start, dtype=torch.int64)
        return d


class PatchMaxNormalized(MapTransform):
    """Per-patch max normalisation (SPOCKMIP): each channel of ``keys`` divided by its maximum
    (``x / max(max(x), 1e-8)``), after cropping."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = window_max_normalize(torch.as_tensor(d[key])[None])[0]
        return d


class NormalizeIntensityByPland(MapTransform):
    """Apply :func:`medseg.preprocess.normalize_intensity` with ``normalization`` to ``keys``
    (each ``(C, H, W, D)``; every channel normalised on its own)."""

    def __init__(self, keys: KeysCollection, normalization: Normalization, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.normalization = normalization

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            channels = [normalize_intensity(image[c], self.normalization) for c in range(image.shape[0])]
            normalised = image.clone() if hasattr(image, "clone") else image.copy()
            for c, values in enumerate(channels):
                normalised[c] = values
            d[key] = normalised
        return d


def preprocessing(spacing: Sequence[float], normalization: Normalization) -> list:
    """The deterministic transforms shared by training and validation (see the module docstring)."""
    return [
        LoadVolumed(keys=[IMAGE, LABEL]),
        EnsureTyped(keys=IMAGE, dtype=np.float32),
        Orientationd(keys=[IMAGE, LABEL], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=[IMAGE, LABEL], pixdim=tuple(spacing), mode=("bilinear", "nearest")),
        CastToTyped(keys=LABEL, dtype=np.uint8),
        NormalizeIntensityByPland(keys=IMAGE, normalization=normalization),
    ]


def training_transforms(
    spacing: Sequence[float],
    normalization: Normalization,
    patch_size: Sequence[int],
    foreground_oversample: float = 0.33,
    augmentation=None,
    mip_axis: str | None = None,
    patch_max_normalization: bool = False,
) -> Compose:
    """Deterministic preprocessing, padding and fg/bg indices (cacheable), then random crop and
    augmentation. ``augmentation`` is a :class:`medseg.training.config.AugmentationConfig` (None: off).

    Args:
        mip_axis: ``"x"``, ``"y"``, ``"z"`` or ``"multi"``: add the whole-volume MIP targets
            (module docstring); ``None``: none.
        patch_max_normalization: divide each image patch by its maximum after cropping (SPOCKMIP).

    A 2D ``patch_size`` ``(H, W)`` trains a 2D network on the volumes' axial slices (the last,
    S-I, axis of the RAS model grid, the axis the Predictor runs a 2D model along): the crop is
    ``(H, W, 1)``, foreground-oversampled like a 3D one, then the slice axis is dropped.

    Output per sample: ``image`` ``(1, *patch_size)`` float32, ``label`` ``(1, *patch_size)``; with
    ``mip_axis``, ``label_mip_<axis>`` ``(1, *plane)`` float32 (``"z"``: ``(1, H, W)``, ``"y"``:
    ``(1, H, D)``, ``"x"``: ``(1, W, D)``) and ``patch_start`` ``(3,)`` int64.

    Raises:
        ValueError: unknown ``mip_axis``, or ``mip_axis`` with a 2D patch.
    """
    patch = tuple(int(p) for p in patch_size)
    axes = mip_axes(mip_axis)
    if axes and len(patch) == 2:
        raise ValueError("MIP targets need a 3D patch")
    crop = patch if len(patch) == 3 else (*patch, 1)  # 2D: one axial slice
    mips = [mip_key(a) for a in axes]
    spatial_keys = [IMAGE, LABEL, *mips]
    transforms = preprocessing(spacing, normalization) + [
        SpatialPadd(keys=[IMAGE, LABEL], spatial_size=crop),
        *([WholeVolumeMIPd(LABEL, axes)] if axes else []),
        FgBgToIndicesd(keys=LABEL, image_key=None),
        RandCropByPosNegLabeld(
            keys=spatial_keys,
            label_key=LABEL,
            spatial_size=crop,
            pos=foreground_oversample,
            neg=1.0 - foreground_oversample,
            num_samples=1,
            fg_indices_key=_INDICES[0],
            bg_indices_key=_INDICES[1],
            allow_smaller=False,
        ),
        DeleteItemsd(keys=list(_INDICES)),
        *([RecordPatchStartd(LABEL)] if axes else []),
        *([SqueezeDimd(keys=[IMAGE, LABEL], dim=3)] if len(patch) == 2 else []),
        *([PatchMaxNormalized(keys=IMAGE)] if patch_max_normalization else []),
    ]
    if augmentation is not None and augmentation.enabled:
        a = augmentation
        rotate = math.radians(a.rotate_deg)
        transforms += [
            RandAffined(
                keys=spatial_keys,
                prob=a.affine_prob,
                rotate_range=(rotate,) * (3 if len(patch) == 3 else 1),  # 2D: one in-plane angle
                scale_range=(a.scale,) * len(patch),
                mode=("bilinear", *(["nearest"] * (1 + len(mips)))),
                padding_mode="zeros",
                spatial_size=patch,
                cache_grid=True,
            ),
            RandGaussianNoised(keys=IMAGE, prob=a.noise_prob, std=0.1),
            RandGaussianSmoothd(
                keys=IMAGE,
                prob=a.blur_prob,
                sigma_x=(0.5, 1.0),
                sigma_y=(0.5, 1.0),
                **({"sigma_z": (0.5, 1.0)} if len(patch) == 3 else {}),
            ),
            RandScaleIntensityd(keys=IMAGE, factors=0.25, prob=a.brightness_prob),
            RandAdjustContrastd(keys=IMAGE, prob=a.gamma_prob, gamma=(0.7, 1.5)),
        ] + [RandFlipd(keys=spatial_keys, prob=a.flip_prob, spatial_axis=axis) for axis in range(len(patch))]
    if axes:
        transforms.append(ProjectMIPd(axes))
    transforms.append(EnsureTyped(keys=spatial_keys, track_meta=False))
    return Compose(transforms)
