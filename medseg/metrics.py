"""Segmentation metrics per class: Dice and HD95 (MONAI's ``DiceMetric`` / ``HausdorffDistanceMetric``),
and for tubular structures the topology metrics clDice and the Betti-0 error.

One implementation used by training validation and by ``medseg evaluate``. HD95 is in mm when a
spacing is given (MONAI's ``spacing`` argument), in voxels otherwise. Background is excluded.

clDice: Shit, Paetzold et al., "clDice - a Novel Topology-Preserving Loss Function for Tubular
Structure Segmentation", CVPR 2021, eq. (1)-(3): with skeletons ``S`` (scikit-image
``skeletonize``, Lee et al. 1994 thinning in 3D) of the predicted ``V_P`` and reference ``V_L`` masks,
``Tprec = |S_P & V_L| / |S_P|``, ``Tsens = |S_L & V_P| / |S_L|``, ``clDice = 2 Tprec Tsens /
(Tprec + Tsens)``. Betti-0 error: ``|b0(P) - b0(L)|``, the difference in the number of connected
components (``scipy.ndimage.label``, full connectivity: 26-neighbourhood in 3D, 8 in 2D).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot


def skeleton(mask: np.ndarray) -> np.ndarray:
    """Boolean skeleton of a 2D or 3D binary mask (``skimage.morphology.skeletonize``; Lee's
    thinning in 3D), same shape as ``mask``."""
    from skimage.morphology import skeletonize

    mask = np.asarray(mask, dtype=bool)
    return skeletonize(mask).astype(bool) if mask.any() else np.zeros_like(mask)


def cl_dice(prediction: np.ndarray, label: np.ndarray) -> float:
    """clDice (Shit et al., CVPR 2021) of two binary masks of the same shape ``(H, W[, D])``.

    Returns 1.0 when both are empty, 0.0 when only one is; else ``2 Tprec Tsens / (Tprec + Tsens)``
    (module docstring), in [0, 1].

    Raises:
        ValueError: the shapes differ.
    """
    p, y = np.asarray(prediction, dtype=bool), np.asarray(label, dtype=bool)
    if p.shape != y.shape:
        raise ValueError(f"prediction shape {p.shape} differs from label shape {y.shape}")
    if not p.any() and not y.any():
        return 1.0
    if not p.any() or not y.any():
        return 0.0
    sp, sy = skeleton(p), skeleton(y)
    tprec = float((sp & y).sum()) / max(int(sp.sum()), 1)
    tsens = float((sy & p).sum()) / max(int(sy.sum()), 1)
    return 0.0 if tprec + tsens == 0 else 2.0 * tprec * tsens / (tprec + tsens)


def connected_components(mask: np.ndarray) -> int:
    """Betti number b0 of a binary mask: its connected components under full connectivity
    (26-neighbourhood in 3D), ``scipy.ndimage.label``."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    return int(ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))[1])


def topology_metrics(prediction: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """``{"cldice", "betti0_error", "components_pred", "components_label"}`` of two binary masks
    ``(H, W[, D])`` (see the module docstring). Raises ``ValueError`` for different shapes."""
    cl = cl_dice(prediction, label)
    b_pred, b_label = connected_components(prediction), connected_components(label)
    return {
        "cldice": cl,
        "betti0_error": float(abs(b_pred - b_label)),
        "components_pred": float(b_pred),
        "components_label": float(b_label),
    }


def label_map_metrics(
    prediction: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    topology: bool = False,
) -> dict[int, dict[str, float]]:
    """Dice and HD95 of one case, per foreground class; with ``topology`` also clDice and the
    Betti-0 error (:func:`topology_metrics`).

    Args:
        prediction, label: integer label maps of the same spatial shape ``(H, W[, D])``.
        num_classes: classes including background.
        spacing: voxel size in mm per axis, for HD95 in mm.
        topology: add ``cldice``, ``betti0_error``, ``components_pred``, ``components_label`` per class
            (skeletonisation costs seconds for a 512 x 512 x 25 stack).

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
        if topology:
            result[index + 1].update(topology_metrics(prediction.numpy() == index + 1, label.numpy() == index + 1))
    return result


def summarize(per_case: list[dict[int, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean of every metric (Dice, HD95 and, when computed, clDice, Betti-0 error...) per class over
    cases (NaN-aware) plus ``"mean"`` over classes."""
    classes = sorted({c for case in per_case for c in case})
    keys = ["dice", "hd95"]
    for case in per_case:
        for values in case.values():
            keys += [k for k in values if k not in keys]
    summary: dict[str, dict[str, float]] = {}
    for c in classes:
        summary[str(c)] = {
            key: float(np.nanmean([case[c][key] for case in per_case if c in case and key in case[c]]))
            if any(math.isfinite(case[c].get(key, math.nan)) for case in per_case if c in case)
            else float("nan")
            for key in keys
        }
    if classes:
        summary["mean"] = {
            key: float(np.nanmean([summary[str(c)][key] for c in classes]))
            if any(math.isfinite(summary[str(c)][key]) for c in classes)
            else float("nan")
            for key in keys
        }
    return summary
