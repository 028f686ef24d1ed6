"""Training transforms for nuclei networks (MONAI dictionary transforms).

One case is ``{"image": tile path, "label": instance-map path, "spacing": (x, y) mm or None}``.
The deterministic head (cached by ``CacheDataset``) reads both with :mod:`medseg.io.tile` and
resamples them to the model's pixel size; the random tail draws a patch and augments it the way
HoVer-Net and CellViT train (flips, 90-degree rotations, elastic deformation with arbitrary
rotation and zoom, stain / colour jitter, blur, noise), then computes the HoVer targets on the
augmented instance map (so distances stay exact after the deformation) and normalises the image
with mean = std = 0.5 per channel (CellViT).

Output per sample: ``image`` ``(3, P, P)`` float32, ``label`` ``(3, P, P)`` float32 (NP mask, H
map, V map; :func:`medseg.nuclei.targets.hover_targets`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    MapTransform,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandRotate90d,
    RandSpatialCropd,
    SpatialPadd,
)

from medseg.io.tile import read_instance_map, read_tile
from medseg.nuclei.targets import HoVerTargetsd


def rgb_normalize(image: torch.Tensor) -> torch.Tensor:
    """``(..., 3, H, W)`` RGB in 0..255 -> ``(x / 255 - 0.5) / 0.5`` (CellViT's mean = std = 0.5)."""
    return image.float() / 127.5 - 1.0


def resample_tile(
    image: torch.Tensor, label: torch.Tensor | None, mpp: float | None, target_mpp: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample ``image`` ``(C, H, W)`` (bilinear, antialiased) and ``label`` ``(1, H, W)`` (nearest)
    from ``mpp`` to ``target_mpp`` microns per pixel; unchanged when ``mpp`` is unknown or within 2 %."""
    if mpp is None or abs(mpp / target_mpp - 1) < 0.02:
        return image, label
    size = [max(1, round(s * mpp / target_mpp)) for s in image.shape[-2:]]
    image = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    if label is not None:
        label = F.interpolate(label[None].float(), size=size, mode="nearest-exact")[0].to(label.dtype)
    return image, label


def case_mpp(case: dict) -> float | None:
    """A case's pixel size in um/px from its manifest ``spacing`` (mm along x, y), or ``None``
    (then the tile file's own applies)."""
    spacing = case.get("spacing")
    return 1000.0 * float(spacing[0]) if spacing else None


class LoadTiled(MapTransform):
    """Read ``image`` (tile -> ``(3, H, W)`` float32 0..255) and ``label`` (instance map ->
    ``(1, H, W)`` int32) and resample both to ``target_mpp``. The pixel size is the case's
    ``spacing`` (mm, from the manifest) when given, else what the tile file states."""

    def __init__(self, target_mpp: float):
        super().__init__(["image", "label"])
        self.target_mpp = float(target_mpp)

    def __call__(self, data):
        d = dict(data)
        tile = read_tile(d["image"], mpp=case_mpp(d))
        image = torch.from_numpy(np.ascontiguousarray(tile.array.transpose(2, 0, 1))).float()
        label = torch.from_numpy(read_instance_map(d["label"]))[None]
        if label.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"{tile.name}: label {tuple(label.shape[-2:])} and image {tuple(image.shape[-2:])} differ")
        d["image"], d["label"] = resample_tile(image, label, tile.mpp, self.target_mpp)
        d.pop("spacing", None)
        return d


class RandHEDJitterd(RandomizableTransform, MapTransform):
    """Stain augmentation in HED space (Tellez et al., "Quantifying the effects of data augmentation
    and stain color normalization in convolutional neural networks for computational pathology",
    Medical Image Analysis 58, 2019): colour deconvolution (``skimage.color.rgb2hed``, Ruifrok &
    Johnston), each of the haematoxylin, eosin and DAB channels scaled by ``U(1 - sigma, 1 + sigma)``
    and shifted by ``U(-sigma, sigma)`` times its range, then back to RGB. ``image``: ``(3, H, W)``
    float 0..255."""

    def __init__(self, keys: Sequence[str], prob: float = 0.5, sigma: float = 0.05):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.sigma = sigma

    def __call__(self, data):
        from skimage.color import hed2rgb, rgb2hed

        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        alpha = self.R.uniform(1 - self.sigma, 1 + self.sigma, 3)
        beta = self.R.uniform(-self.sigma, self.sigma, 3)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            rgb = (image.permute(1, 2, 0).numpy() / 255.0).clip(0, 1)
            hed = rgb2hed(rgb)
            span = hed.reshape(-1, 3).max(0) - hed.reshape(-1, 3).min(0)
            hed = hed * alpha + beta * span
            out = (hed2rgb(hed).clip(0, 1) * 255.0).astype(np.float32)
            d[key] = torch.from_numpy(out.transpose(2, 0, 1).copy())
        return d


class RGBNormalized(MapTransform):
    """``image`` 0..255 -> :func:`rgb_normalize`."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = rgb_normalize(torch.as_tensor(d[key]))
        return d


def nuclei_training_transforms(target_mpp: float, patch_size: Sequence[int], augmentation) -> Compose:
    """The transform chain (module docstring) for ``patch_size`` ``(P, P)`` patches at ``target_mpp``
    um/px; ``augmentation`` a :class:`medseg.training.config.AugmentationConfig`
    (``enabled: false`` keeps only the crop, targets and normalisation)."""
    size = tuple(int(p) for p in patch_size)
    a = augmentation
    zoom = a.scale if a.affine_prob > 0 else 0.0
    # a window large enough for any rotation and zoom of the patch, so the elastic step never pads
    outer = tuple(int(math.ceil(p * math.sqrt(2) * (1 + zoom))) + 8 for p in size) if a.enabled else size
    keys = ["image", "label"]
    chain: list = [LoadTiled(target_mpp), SpatialPadd(keys, outer), RandSpatialCropd(keys, outer, random_size=False)]
    if a.enabled:
        chain += [
            Rand2DElasticd(
                keys,
                spacing=(max(8, size[0] // 4), max(8, size[1] // 4)),
                magnitude_range=(0.0, 2.0),
                spatial_size=size,
                prob=1.0,  # always: it also crops the outer window to the patch
                rotate_range=(math.pi if a.affine_prob > 0 else 0.0,),
                scale_range=((zoom, zoom) if zoom else None),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandFlipd(keys, prob=a.flip_prob, spatial_axis=0),
            RandFlipd(keys, prob=a.flip_prob, spatial_axis=1),
            RandRotate90d(keys, prob=0.5, max_k=3),
            RandHEDJitterd(["image"], prob=a.brightness_prob, sigma=0.05),
            RandAdjustContrastd(["image"], prob=a.gamma_prob, gamma=(0.7, 1.5), retain_stats=True),
            RandGaussianSmoothd(["image"], prob=a.blur_prob, sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2)),
            RandGaussianNoised(["image"], prob=a.noise_prob, std=4.0),
        ]
    chain += [HoVerTargetsd(["label"]), RGBNormalized(["image"])]
    return Compose(chain)
