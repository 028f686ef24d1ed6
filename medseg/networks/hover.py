"""The HoVer output contract of nuclei networks: a nuclear-pixel (NP) map and horizontal/vertical
(HV) distance maps, as HoVer-Net (Graham et al., "HoVer-Net: Simultaneous segmentation and
classification of nuclei in multi-tissue histology images", Medical Image Analysis 58, 2019)
predicts them.

Two kinds of network carry it:

- networks with dedicated NP/HV branches (``hover_branches = True``), whose :class:`~medseg.networks.base.NetworkOutput`
  has ``nuclei_probability_logits`` ``(B, 2, H, W)`` and ``horizontal_vertical`` ``(B, 2, H, W)``
  (:class:`~medseg.networks.cellvta.CellVTA`);
- plain U-shaped networks built with ``out_channels = 4``: channels 0-1 are the NP logits
  (background, nucleus), channels 2-3 the HV maps (horizontal, vertical; in [-1, 1] after training).

:func:`~medseg.networks.base.hover_outputs` (part of the base contract, so losses can use it)
reads either; :class:`HoVerHead` turns either into one ``(B, 4, H, W)`` tensor
for the sliding-window engine, so the stitched NP logits and HV maps are blended window by window
like any segmentation logits.
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.networks.base import HOVER_CHANNELS, hover_outputs

__all__ = ["HOVER_CHANNELS", "HoVerHead", "hover_outputs"]


class HoVerHead(nn.Module):
    """``network`` as an inference module: ``(B, C, H, W)`` -> ``(B, 4, H, W)`` = NP logits and
    HV maps, stacked (see :func:`hover_outputs`)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.branches = bool(getattr(network, "hover_branches", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.network(x, features=True) if self.branches else self.network(x)
        np_logits, hv = hover_outputs(output)
        return torch.cat([np_logits, hv], dim=1)
