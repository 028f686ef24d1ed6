"""Segmentation metrics per class: Dice and HD95 (MONAI's ``DiceMetric`` / ``HausdorffDistanceMetric``).

One implementation used by training validation and by ``medseg evaluate``. HD95 is in mm when a
spacing is given (MONAI's ``spacing`` argument), in voxels otherwise. Background is excluded.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot


def label_map_metrics(
    prediction: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] | None = None,
) -> dict[int, dict[str, float]]:
    """Dice and HD95 of one case, per foreground class.

    Args:
        prediction, label: integer label maps of the same spatial shape ``(H, W[, D])``.
        num_classes: classes including background.
        spacing: voxel size in mm per axis, for HD95 in mm.

    Returns:
        ``{class_id: {"dice": float, "hd95": float}}`` for ids ``1..num_classes-1``. Dice is 1 when
        both prediction and label are empty for a class; HD95 is NaN when either is empty (MONAI
        convention), so means must use ``nanmean``.

    Raises:
        ValueError: the shapes differ.
    """
    prediction = torch.as_tensor(np.asarray(prediction)).long()
    label = torch.as_tensor(np.asarray(label)).long()
    if prediction.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} differs from label shape {tuple(label.shape)}")
    p = one_hot(prediction[None, None], num_classes)
    y = one_hot(label[None, None], num_classes)
    spacing_arg = None if spacing is None else [float(s) for s in spacing]
    with warnings.catch_warnings():  # empty classes are expected; handled below
        warnings.simplefilter("ignore")
        dice = compute_dice(p, y, include_background=False, ignore_empty=False)[0]
        hd95 = compute_hausdorff_distance(p, y, include_background=False, percentile=95, spacing=spacing_arg)[0]
    result = {}
    for index in range(num_classes - 1):
        both_empty = not p[0, index + 1].any() and not y[0, index + 1].any()
        h = float(hd95[index])
        result[index + 1] = {
            "dice": 1.0 if both_empty else float(dice[index]),
            "hd95": h if math.isfinite(h) and p[0, index + 1].any() and y[0, index + 1].any() else float("nan"),
        }
    return result


def summarize(per_case: list[dict[int, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean Dice and HD95 per class over cases (NaN-aware) plus ``"mean"`` over classes."""
    classes = sorted({c for case in per_case for c in case})
    summary: dict[str, dict[str, float]] = {}
    for c in classes:
        summary[str(c)] = {
            key: float(np.nanmean([case[c][key] for case in per_case if c in case]))
            if any(math.isfinite(case[c][key]) for case in per_case if c in case)
            else float("nan")
            for key in ("dice", "hd95")
        }
    if classes:
        summary["mean"] = {key: float(np.nanmean([summary[str(c)][key] for c in classes])) for key in ("dice", "hd95")}
    return summary
