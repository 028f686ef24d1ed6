"""Preprocessing shared by training and inference, so a model sees in production what it saw in
training: intensity normalisation here; orientation and resampling to the model's spacing are
added by the inference engine's owners in this module too (one implementation each).
"""

from __future__ import annotations

import numpy as np
import torch

from medseg.package import Normalization

ArrayLike = np.ndarray | torch.Tensor


def normalize_intensity(x: ArrayLike, normalization: Normalization) -> ArrayLike:
    """Normalise intensities as nnU-Net does; returns float32 of the same type and shape.

    - ``zscore`` (MR): ``(x - mean(x)) / max(std(x), 1e-8)`` over the whole image.
    - ``ct``: clip to ``normalization.clip`` (HU), then ``(x - mean) / std`` with the dataset's
      foreground statistics stored in the model card.
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
    return t if is_tensor else t.numpy()
