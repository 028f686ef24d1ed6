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

Instance metrics of 2D nucleus instance maps (:func:`instance_metrics`), in the HoVer-Net
convention (Graham et al., "HoVer-Net: Simultaneous Segmentation and Classification of Nuclei in
Multi-Tissue Histology Images", Medical Image Analysis 2019, section 4.2):

- Panoptic quality (Kirillov et al., "Panoptic Segmentation", CVPR 2019, eq. (1)): a predicted and a
  reference nucleus match when their IoU is strictly above 0.5 (unique by construction); with ``TP``
  matches, ``FP`` unmatched predictions and ``FN`` unmatched references, ``DQ = TP / (TP + FP/2 +
  FN/2)`` (MONAI's "RQ"), ``SQ = sum of matched IoUs / TP``, ``PQ = DQ * SQ``. The values are those of
  ``monai.metrics.compute_panoptic_quality(pred, gt, remap=True, match_iou_threshold=0.5)`` (without
  its 1e-6 smoothing term); they are computed here from one pred x reference contingency table,
  because MONAI's version builds a full-size mask per instance and takes ~20 s for a 1000 x 1000
  MoNuSeg tile with ~600 nuclei (this takes ~25 ms).
- Aggregated Jaccard Index (Kumar et al., "A Dataset and a Technique for Generalized Nuclear
  Segmentation for Computational Pathology", IEEE TMI 2017, Algorithm 1): every reference nucleus
  ``G_i`` takes the prediction ``S_j`` of largest IoU with it (ties: the lowest id), ``C += |G_i & S_j|``,
  ``U += |G_i | S_j|``; a reference overlapping no prediction adds ``|G_i|`` to ``U`` only; finally
  ``U`` grows by the area of every prediction never taken; ``AJI = C / U``. A prediction may be taken
  by several references (the original AJI, not AJI+).
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


#: keys of :func:`instance_metrics`, in table order
INSTANCE_METRICS = ("pq", "dq", "sq", "aji", "dice", "num_predicted", "num_reference")

# dense contingency tables (np.bincount) up to this many cells; sparse (np.unique) beyond
_DENSE_TABLE_CELLS = 1 << 24


def _consecutive_ids(instances: np.ndarray) -> tuple[np.ndarray, int]:
    """``instances`` (flat, integer ids >= 0) relabelled so that background stays 0 and the nonzero
    ids become ``1..n`` in increasing order, and ``n``, the number of distinct nonzero ids."""
    top = int(instances.max()) if instances.size else 0
    if top < _DENSE_TABLE_CELLS:
        present = np.bincount(instances, minlength=top + 1) > 0
        present[0] = True  # background keeps index 0 whether or not it occurs
        lut = np.cumsum(present) - 1
        return lut[instances], int(present.sum()) - 1
    ids, inverse = np.unique(instances, return_inverse=True)
    if ids[0] != 0:
        inverse = inverse + 1
    return inverse.reshape(-1), int(np.count_nonzero(ids))


def _instance_array(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2D instance map (H, W), got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer instance ids, got dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"{name} holds negative instance ids (min {array.min()})")
    return array.reshape(-1).astype(np.int64, copy=False)


def instance_metrics(prediction: np.ndarray, label: np.ndarray, iou_threshold: float = 0.5) -> dict[str, float]:
    """PQ, DQ, SQ, AJI and foreground Dice of one 2D instance map against its reference
    (definitions and references in the module docstring).

    Args:
        prediction, label: instance maps ``(H, W)`` of the same shape, integer ids with 0 for
            background; ids need not be consecutive, only distinct per nucleus.
        iou_threshold: PQ's matching threshold in (0, 1]; pairs match when IoU > threshold. At 0.5
            and above matches are unique; below 0.5 they are the maximum-IoU one-to-one assignment
            (``scipy.optimize.linear_sum_assignment``), as MONAI does.

    Returns:
        ``{"pq", "dq", "sq", "aji", "dice"}`` in [0, 1] and ``"num_predicted"``, ``"num_reference"``
        (nonzero ids, ints). Both maps empty: every score is 1.0; exactly one empty: every score is
        0.0. ``SQ`` is 0.0 when no pair matches.

    Raises:
        ValueError: an input is not 2D, the shapes differ, ids are not integers >= 0, or
            ``iou_threshold`` is outside (0, 1].
    """
    if np.shape(prediction) != np.shape(label):
        raise ValueError(f"prediction shape {np.shape(prediction)} differs from label shape {np.shape(label)}")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    p, num_pred = _consecutive_ids(_instance_array(prediction, "prediction"))
    g, num_ref = _consecutive_ids(_instance_array(label, "label"))
    counts = {"num_predicted": num_pred, "num_reference": num_ref}
    if num_pred == 0 or num_ref == 0:
        score = 1.0 if num_pred == num_ref else 0.0
        return {"pq": score, "dq": score, "sq": score, "aji": score, "dice": score, **counts}

    # contingency table as triplets (reference index, prediction index, overlap in pixels), foreground only
    cells = (num_ref + 1) * (num_pred + 1)
    if cells <= _DENSE_TABLE_CELLS:
        table = np.bincount(g * (num_pred + 1) + p, minlength=cells).reshape(num_ref + 1, num_pred + 1)
        gi, pj = np.nonzero(table[1:, 1:])
        inter = table[1:, 1:][gi, pj]
    else:
        keys, inter = np.unique(g * (num_pred + 1) + p, return_counts=True)
        gi, pj = np.divmod(keys, num_pred + 1)
        keep = (gi > 0) & (pj > 0)
        gi, pj, inter = gi[keep] - 1, pj[keep] - 1, inter[keep]
    ref_area = np.bincount(g, minlength=num_ref + 1)[1:]
    pred_area = np.bincount(p, minlength=num_pred + 1)[1:]
    union = ref_area[gi] + pred_area[pj] - inter
    iou = inter / union

    # PQ: pairs above the threshold (unique at >= 0.5), else a maximum-IoU assignment
    if iou_threshold >= 0.5:
        matched = iou[iou > iou_threshold]
    else:
        from scipy.optimize import linear_sum_assignment

        dense = np.zeros((num_ref, num_pred))
        dense[gi, pj] = iou
        rows, cols = linear_sum_assignment(-dense)
        matched = dense[rows, cols]
        matched = matched[matched > iou_threshold]
    tp = matched.size
    dq = tp / (tp + 0.5 * (num_pred - tp) + 0.5 * (num_ref - tp))
    sq = float(matched.sum()) / tp if tp else 0.0

    # AJI: per reference nucleus, its prediction of largest IoU (ties: lowest id)
    order = np.lexsort((pj, -iou, gi))
    best_ref, first = np.unique(gi[order], return_index=True)
    best = order[first]
    used = np.zeros(num_pred, dtype=bool)
    used[pj[best]] = True
    missed_ref = np.ones(num_ref, dtype=bool)
    missed_ref[best_ref] = False
    aji_union = int(union[best].sum()) + int(ref_area[missed_ref].sum()) + int(pred_area[~used].sum())
    aji = int(inter[best].sum()) / aji_union

    fg_pred, fg_ref = int(pred_area.sum()), int(ref_area.sum())
    dice = 2.0 * int(inter.sum()) / (fg_pred + fg_ref)
    return {"pq": dq * sq, "dq": dq, "sq": sq, "aji": aji, "dice": dice, **counts}


def summarize_instances(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every :func:`instance_metrics` value over images (``{}`` for no images).

    PQ (and DQ, SQ, AJI, Dice) is computed per image and then averaged over images, as the
    MoNuSeg / HoVer-Net evaluation protocol does; it is not the PQ of the images' pooled TP/FP/FN.
    ``num_predicted`` / ``num_reference`` are the mean counts per image.
    """
    keys = [k for k in INSTANCE_METRICS if any(k in image for image in per_image)]
    keys += [k for image in per_image for k in image if k not in keys]
    return {key: float(np.mean([image[key] for image in per_image if key in image])) for key in keys}
