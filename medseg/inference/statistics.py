"""Per-label statistics of a label map: voxel count, volume (ml) and mean image intensity."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.labels import Label


def label_statistics(
    label_map: np.ndarray, affine: np.ndarray, labels: Sequence[Label], intensities: np.ndarray | None = None
) -> list[dict]:
    """One dict per label of the card (absent labels included, with zero volume).

    Args:
        label_map: integer array ``(I, J, K)``.
        affine: the grid's ``(4, 4)`` voxel -> mm affine; the voxel volume is ``|det(affine[:3, :3])|``.
        labels: the model card's labels.
        intensities: the image ``(I, J, K)`` in its own units (HU for CT); ``None`` omits the mean.

    Returns:
        ``[{"id", "name", "voxels", "volume_ml", "mean_intensity"}]`` in label-id order;
        ``mean_intensity`` is ``None`` for an empty label or when no image is given.
    """
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    flat = np.asarray(label_map).ravel()
    size = max([label.id for label in labels] + [int(flat.max(initial=0))]) + 1
    counts = np.bincount(flat, minlength=size)
    sums = None
    if intensities is not None:
        sums = np.bincount(flat, weights=np.asarray(intensities, dtype=np.float64).ravel(), minlength=size)
    stats = []
    for label in sorted(labels, key=lambda item: item.id):
        voxels = int(counts[label.id])
        mean = float(sums[label.id] / voxels) if sums is not None and voxels else None
        stats.append(
            {
                "id": label.id,
                "name": label.name,
                "voxels": voxels,
                "volume_ml": round(voxels * voxel_ml, 6),
                "mean_intensity": None if mean is None else round(mean, 4),
            }
        )
    return stats
