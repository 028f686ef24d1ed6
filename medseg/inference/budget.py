"""How much work one prediction is, before it starts: sliding-window count x test-time passes.

A request's cost grows with the model-grid volume and steeply with the overlap (a step of
``(1 - overlap) x patch``): overlap 0.99 on a CT is millions of windows, days of CPU. The service
refuses such requests at upload (:func:`check_work`), and a :class:`~medseg.inference.Predictor`
given ``max_windows`` refuses them before it resamples anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.errors import WorkBudgetError
from medseg.inference.engine import grid_windows
from medseg.package import ModelCard
from medseg.preprocess import ModelGrid


def planned_windows(
    shape: Sequence[int],
    affine: np.ndarray,
    card: ModelCard,
    overlap: float | None = None,
    tta: bool = False,
    folds: int = 1,
) -> int:
    """Network evaluations one prediction needs: windows on the model grid x mirror passes x folds.

    Args:
        shape: the input grid ``(I, J, K)``.
        affine: its voxel -> RAS+ mm affine.
        card: the model card (spacing in mm, orientation, patch size, overlap).
        overlap: window overlap in ``[0, 1)``; default the card's.
        tta: mirroring test-time augmentation (``2 ** spatial_dims`` passes).
        folds: models in the ensemble.
    """
    grid = ModelGrid(shape, affine, card.spacing, card.orientation)
    passes = 2 ** len(card.patch_size) if tta else 1
    return window_count(grid, card, overlap) * passes * max(1, int(folds))


def window_count(grid: ModelGrid, card: ModelCard, overlap: float | None = None) -> int:
    """Sliding windows of ``card``'s patch on ``grid``'s model grid (2D models: per slice along
    the last axis), as the engine will place them; no resampling is done to know it."""
    model_shape = grid.planned_model_shape
    patch = tuple(int(p) for p in card.patch_size)
    overlap = card.overlap if overlap is None else float(overlap)
    if len(patch) == 2:
        return int(grid_windows(model_shape[:2], patch, overlap)) * model_shape[2]
    return int(grid_windows(model_shape, patch, overlap))


def check_work(windows: int, max_windows: int | None, name: str) -> None:
    """Refuse a prediction of more than ``max_windows`` network evaluations.

    Raises:
        WorkBudgetError: over the budget (422 in the service); the message gives both numbers.
    """
    if max_windows is not None and windows > max_windows:
        raise WorkBudgetError(
            f"{name}: {windows} sliding-window evaluations exceed the limit of "
            f"{max_windows}; use a lower overlap or no TTA, or crop the image"
        )
