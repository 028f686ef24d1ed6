"""MONAI transform chains for training and validation.

Deterministic part (cached by :class:`monai.data.CacheDataset`): load (NIfTI via ``LoadImaged``),
channel first, orientation RAS, resampling to the plan's spacing (bilinear image, nearest label),
label cast to ``uint8`` (some label files are float32), intensity normalisation through
:func:`medseg.preprocess.normalize_intensity` (the one implementation shared with inference).
Training adds padding to the patch size, foreground/background indices (cached), then per sample:
a foreground-oversampled random crop (``RandCropByPosNegLabeld``; nnU-Net: 1/3 of patches
centred on a foreground voxel) and nnU-Net-style augmentation: rotation/scaling, Gaussian noise
and blur, brightness, gamma, mirroring.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
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
)

from medseg.package import Normalization
from medseg.preprocess import normalize_intensity

IMAGE, LABEL = "image", "label"
_INDICES = ("label_fg_indices", "label_bg_indices")


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
        LoadImaged(keys=[IMAGE, LABEL], image_only=True, ensure_channel_first=True),
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
) -> Compose:
    """Deterministic preprocessing, padding and fg/bg indices (cacheable), then random crop and
    augmentation. ``augmentation`` is a :class:`medseg.training.config.AugmentationConfig` (None: off).
    Output per sample: ``image`` ``(1, *patch_size)`` float32, ``label`` ``(1, *patch_size)``."""
    patch = tuple(int(p) for p in patch_size)
    transforms = preprocessing(spacing, normalization) + [
        SpatialPadd(keys=[IMAGE, LABEL], spatial_size=patch),
        FgBgToIndicesd(keys=LABEL, image_key=None),
        RandCropByPosNegLabeld(
            keys=[IMAGE, LABEL],
            label_key=LABEL,
            spatial_size=patch,
            pos=foreground_oversample,
            neg=1.0 - foreground_oversample,
            num_samples=1,
            fg_indices_key=_INDICES[0],
            bg_indices_key=_INDICES[1],
            allow_smaller=False,
        ),
        DeleteItemsd(keys=list(_INDICES)),
    ]
    if augmentation is not None and augmentation.enabled:
        a = augmentation
        rotate = math.radians(a.rotate_deg)
        transforms += [
            RandAffined(
                keys=[IMAGE, LABEL],
                prob=a.affine_prob,
                rotate_range=(rotate,) * len(patch),
                scale_range=(a.scale,) * len(patch),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
                spatial_size=patch,
                cache_grid=True,
            ),
            RandGaussianNoised(keys=IMAGE, prob=a.noise_prob, std=0.1),
            RandGaussianSmoothd(
                keys=IMAGE, prob=a.blur_prob, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)
            ),
            RandScaleIntensityd(keys=IMAGE, factors=0.25, prob=a.brightness_prob),
            RandAdjustContrastd(keys=IMAGE, prob=a.gamma_prob, gamma=(0.7, 1.5)),
        ] + [RandFlipd(keys=[IMAGE, LABEL], prob=a.flip_prob, spatial_axis=axis) for axis in range(len(patch))]
    transforms.append(EnsureTyped(keys=[IMAGE, LABEL], track_meta=False))
    return Compose(transforms)
