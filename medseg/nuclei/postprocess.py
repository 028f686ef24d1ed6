"""Nuclei from NP and HV maps: HoVer-Net's marker-controlled watershed (Graham et al., Medical
Image Analysis 58, 2019), through :class:`monai.apps.pathology.transforms.HoVerNetInstanceMapPostProcessing`,
with CellViT's parameters at the model's magnification (Hörst et al., Medical Image Analysis 94,
2024): nuclear pixels where P(nucleus) >= 0.5, objects under 10 px removed, Sobel kernel 21 at 40x
(0.25 um/px) and 11 at 20x (0.5 um/px), marker threshold 0.4.

The watershed runs once on the whole stitched image (never per window), so a nucleus on a window
border is one nucleus, counted once.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def sobel_kernel_size(mpp: float) -> int:
    """CellViT's Sobel kernel for a grid of ``mpp`` um/px: 21 at 0.25 (40x), 11 at 0.5 (20x), i.e.
    about 5 um, rounded to the nearest odd size >= 5."""
    size = int(round(5.25 / mpp))
    return max(5, size + (size % 2 == 0))


def instances_from_hover(
    np_logits: np.ndarray | torch.Tensor,
    hv: np.ndarray | torch.Tensor,
    mpp: float = 0.25,
    min_object_size: int = 10,
    marker_threshold: float = 0.4,
) -> np.ndarray:
    """Instance map ``(H, W)`` int32 (0 background, nuclei 1..N, consecutive) from the NP logits
    ``(2, H, W)`` (background, nucleus; nuclear pixels where softmax P(nucleus) >= 0.5) and the HV
    maps ``(2, H, W)`` (horizontal, vertical) on a grid of ``mpp`` um/px.

    MONAI's watershed steps (mask, instance border from the Sobel gradients of HV, distance map,
    markers, watershed) as :class:`~monai.apps.pathology.transforms.HoVerNetInstanceMapPostProcessing`
    chains them, without its per-nucleus contour and centroid tables (the writers make their own).

    Raises:
        ValueError: shapes that do not match.
    """
    from monai.apps.pathology.transforms import (
        GenerateDistanceMap,
        GenerateInstanceBorder,
        GenerateWatershedMarkers,
        GenerateWatershedMask,
        Watershed,
    )
    from skimage.segmentation import relabel_sequential

    logits = torch.as_tensor(np_logits).float()
    hv = torch.as_tensor(hv).float()
    if logits.ndim != 3 or logits.shape[0] != 2 or hv.shape != logits.shape:
        raise ValueError(
            f"need NP logits (2, H, W) and HV (2, H, W) maps, got {tuple(logits.shape)} and {tuple(hv.shape)}"
        )
    with warnings.catch_warnings():  # scikit-image deprecation notes from inside MONAI
        warnings.simplefilter("ignore", FutureWarning)
        mask = GenerateWatershedMask(activation="softmax", min_object_size=min_object_size)(logits)
        if not mask.any():
            return np.zeros(logits.shape[1:], np.int32)
        border = GenerateInstanceBorder(kernel_size=sobel_kernel_size(mpp))(mask, hv)
        distance = GenerateDistanceMap()(mask, border)
        markers = GenerateWatershedMarkers(threshold=marker_threshold, radius=2, min_object_size=min_object_size)(
            mask, border
        )
        instances = Watershed(connectivity=1)(distance, mask, markers)
    instances = np.asarray(instances)[0].astype(np.int32, copy=False)
    return relabel_sequential(instances)[0].astype(np.int32, copy=False)
