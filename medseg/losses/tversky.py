"""Focal Tversky loss, the one implementation shared by the segmentation and MIP terms.

Abraham & Khan, "A novel focal Tversky loss function with improved attention U-Net for lesion
segmentation", ISBI 2019; parameters as in SPOCKMIP (Radhakrishna et al., arXiv 2407.08655):
``TI = (TP + 1) / (TP + alpha FN + beta FP + 1)`` with alpha = 0.7 (false negatives), beta = 0.3
(false positives), computed over the flattened batch, and ``loss = (1 - TI) ** gamma`` with
gamma = 0.75. The Tversky index itself comes from :class:`monai.losses.TverskyLoss` (whose
``alpha`` weighs false *positives*, so the arguments are swapped when passed on).
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.losses import TverskyLoss
from torch import nn


class FocalTverskyLoss(nn.Module):
    """``mean_c (1 - TI_c) ** gamma`` over the classes ``c``.

    Args:
        alpha: weight of false negatives (SPOCKMIP 0.7).
        beta: weight of false positives (SPOCKMIP 0.3).
        gamma: focal exponent (SPOCKMIP 0.75; CellVTA uses 4/3).
        smooth: added to numerator and denominator (1).
        activation: ``"softmax"`` (multi-class logits), ``"sigmoid"`` (binary/multi-label logits) or
            ``None`` (the input already holds probabilities, e.g. a projection of them).
        include_background: keep channel 0 (ignored for single-channel input).
        to_onehot_y: the target is a label map ``(B, 1, *spatial)`` to be one-hot encoded; set
            ``False`` when the target already has one channel per input channel.
        batch: compute TP/FP/FN over the whole batch (SPOCKMIP) rather than per sample.

    Shapes: input ``(B, C, *spatial)``; target ``(B, 1, *spatial)`` label map or ``(B, C, *spatial)``
    one-hot/binary. Returns a scalar.
    """

    def __init__(
        self,
        alpha: float = 0.7,
        beta: float = 0.3,
        gamma: float = 0.75,
        smooth: float = 1.0,
        activation: Literal["softmax", "sigmoid"] | None = "softmax",
        include_background: bool = True,
        to_onehot_y: bool = True,
        batch: bool = True,
    ):
        super().__init__()
        self.gamma = gamma
        self.tversky = TverskyLoss(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=activation == "sigmoid",
            softmax=activation == "softmax",
            alpha=beta,
            beta=alpha,
            smooth_nr=smooth,
            smooth_dr=smooth,
            batch=batch,
            reduction="none",
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        one_minus_ti = self.tversky(input, target)  # (C,) with batch=True, else (B, C)
        # (1 - TI) >= 0; the clamp keeps the gradient of x ** 0.75 finite at a perfect match
        return one_minus_ti.clamp_min(1e-6).pow(self.gamma).mean()
