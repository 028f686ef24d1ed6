"""HoVer training targets from an instance label map (Graham et al., HoVer-Net, Medical Image
Analysis 58, 2019): the nuclear-pixel (NP) mask and the horizontal / vertical distance of every
nuclear pixel to its nucleus's centroid, each normalised to [-1, 1] per nucleus
(:class:`monai.transforms.ComputeHoVerMaps`)."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import ComputeHoVerMaps, MapTransform


def hover_targets(instances: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(H, W)`` or ``(1, H, W)`` instance map (0 background, ids > 0) -> ``(3, H, W)`` float32:
    channel 0 the NP mask (0/1), 1 the horizontal map (varies along columns, x), 2 the vertical
    map (along rows, y).

    Raises:
        ValueError: not a 2D map.
    """
    label = torch.as_tensor(np.asarray(instances) if not isinstance(instances, torch.Tensor) else instances)
    if label.ndim == 3 and label.shape[0] == 1:
        label = label[0]
    if label.ndim != 2:
        raise ValueError(f"hover_targets needs an (H, W) instance map, got shape {tuple(label.shape)}")
    label = label.to(torch.int64)
    hv = torch.as_tensor(ComputeHoVerMaps()(label[None].numpy()), dtype=torch.float32)
    return torch.cat([(label > 0).to(torch.float32)[None], hv], dim=0)


class HoVerTargetsd(MapTransform):
    """Replace ``data[key]`` (an ``(1, H, W)`` instance map) by its :func:`hover_targets`."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = hover_targets(d[key])
        return d
