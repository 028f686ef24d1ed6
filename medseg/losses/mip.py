"""Maximum-intensity-projection (MIP) loss of SPOCKMIP.

Radhakrishna, Chatterjee et al., "SPOCKMIP: Segmentation of Vessels in MRAs with Enhanced
Continuity using Maximum Intensity Projection as Loss", arXiv 2407.08655. The predicted
probabilities are projected by their maximum along one spatial axis and compared with the
projection of the label by the focal Tversky loss; the paper's "multi" variant sums the x, y and
z terms. Upstream's axis bookkeeping after ``movedim`` is inconsistent; this implements the intent.

Axis naming. Tensors are ``(B, C, H, W, D)``, whose spatial axes are the image array axes
``(i, j, k)`` of :class:`medseg.io.image.Image`. For an image in RAS orientation (as training
data is, after ``Orientationd("RAS")``) they run along world ``x`` (left -> right), ``y``
(posterior -> anterior) and ``z`` (inferior -> superior), so ``"x"`` projects over ``H`` (dim 2),
``"y"`` over ``W`` (dim 3) and ``"z"`` over ``D`` (dim 4) — an axial MIP for ``"z"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from monai.networks.utils import one_hot
from torch import nn

from medseg.losses.tversky import FocalTverskyLoss

AXES = {"x": 2, "y": 3, "z": 4}


class MIPLoss(nn.Module):
    """Focal Tversky loss between MIPs of the predicted probabilities and of the label.

    Args:
        axis: ``"x"``, ``"y"``, ``"z"`` (default, upstream's single-axis setting) or ``"multi"``
            (sum of the three terms).
        activation: ``"sigmoid"`` (binary, one output channel, as upstream) or ``"softmax"``
            (multi-class: each class's probability is projected separately).
        include_background: keep the background channel in the multi-class case (its MIP is
            nearly all ones, so it is off by default).
        alpha, beta, gamma, smooth: focal Tversky parameters (0.7, 0.3, 0.75, 1 as in SPOCKMIP).

    ``forward(logits, target, target_mip=None)``:
        logits: ``(B, K, H, W, D)``.
        target: label map ``(B, 1, H, W, D)`` (class ids; for sigmoid any value > 0 is foreground).
        target_mip: optional projection target instead of the projection of ``target`` — upstream's
            MIP of the *whole* label volume cropped to the patch's in-plane window. One tensor
            ``(B, 1 or K, *spatial without the projected axis)`` for a single axis, or a mapping
            ``{"x": ..., "y": ..., "z": ...}`` for ``"multi"``; values are class ids when it has one
            channel (and K > 1), otherwise binary per channel.

    Returns a scalar.

    Raises:
        ValueError: unknown axis or activation, 4-D (2D) input, or a target_mip of the wrong shape.
    """

    def __init__(
        self,
        axis: Literal["x", "y", "z", "multi"] = "z",
        activation: Literal["sigmoid", "softmax"] = "softmax",
        include_background: bool = False,
        alpha: float = 0.7,
        beta: float = 0.3,
        gamma: float = 0.75,
        smooth: float = 1.0,
    ):
        super().__init__()
        if axis not in (*AXES, "multi"):
            raise ValueError(f"MIP axis must be x, y, z or multi, got {axis!r}")
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"MIP activation must be sigmoid or softmax, got {activation!r}")
        self.axes = list(AXES) if axis == "multi" else [axis]
        self.activation = activation
        self.include_background = include_background
        self.ftl = FocalTverskyLoss(
            alpha, beta, gamma, smooth, activation=None, include_background=True, to_onehot_y=False, batch=True
        )

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        target_mip: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if logits.ndim != 5:
            raise ValueError(f"MIP loss needs (B, C, H, W, D) input, got shape {tuple(logits.shape)}")
        classes = logits.shape[1]
        if self.activation == "sigmoid":
            probs = torch.sigmoid(logits.float())
            onehot = (target > 0).float() if target.shape[1] == 1 and classes == 1 else target.float()
        else:
            probs = torch.softmax(logits.float(), 1)
            onehot = one_hot(target.long(), classes) if target.shape[1] == 1 else target.float()
        total = logits.new_zeros(())
        for name in self.axes:
            dim = AXES[name]
            pred_mip = probs.amax(dim)
            if target_mip is None:
                true_mip = onehot.amax(dim)
            else:
                true_mip = target_mip[name] if isinstance(target_mip, Mapping) else target_mip
                true_mip = self._as_channels(true_mip.to(logits.device), classes)
                if true_mip.shape != pred_mip.shape:
                    raise ValueError(
                        f"target_mip for axis {name} has shape {tuple(true_mip.shape)}, "
                        f"expected {tuple(pred_mip.shape)}"
                    )
            if self.activation == "softmax" and not self.include_background:
                pred_mip, true_mip = pred_mip[:, 1:], true_mip[:, 1:]
            total = total + self.ftl(pred_mip, true_mip)
        return total

    def _as_channels(self, mip: torch.Tensor, classes: int) -> torch.Tensor:
        if mip.shape[1] == classes:
            return mip.float()
        if self.activation == "softmax":
            return one_hot(mip.long(), classes)
        return (mip > 0).float()
