"""The CellViT / CellVTA nuclei loss on HoVer outputs (NP and HV maps).

Hörst et al., "CellViT: Vision transformers for precise cell segmentation and classification",
Medical Image Analysis 94, 2024, and CellVTA (its PanNuke/CoNIC configs), after HoVer-Net (Graham
et al., Medical Image Analysis 58, 2019):

- NP (nuclear pixels, 2-class softmax): ``w_ftl FocalTversky(alpha 0.7 FN, beta 0.3 FP, gamma 4/3)
  + w_dice Dice`` (1 and 1);
- HV (horizontal / vertical distances to the nucleus centroid, each in [-1, 1]):
  ``w_mse MSE + w_msge MSGE`` (2.5 and 8), where MSGE is the mean squared error of the Sobel
  gradients (horizontal gradient of the H map, vertical gradient of the V map) over nuclear pixels
  only, exactly as HoVer-Net and :class:`monai.apps.pathology.losses.HoVerNetLoss` compute it
  (MONAI's ``SobelGradients``, kernel 5).

The nuclear-type (NT) and tissue terms are not used: MoNuSeg has no type labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.transforms import SobelGradients
from torch import nn

from medseg.losses.tversky import FocalTverskyLoss
from medseg.networks.base import NetworkOutput, hover_outputs


class HoVerLoss(nn.Module):
    """``loss(output, target)`` for HoVer networks (see :mod:`medseg.networks.hover`).

    Args:
        ftl_weight, dice_weight: NP focal Tversky and Dice weights (CellViT 1, 1).
        mse_weight, msge_weight: HV MSE and MSGE weights (CellViT 2.5, 8).
        alpha, beta, gamma: focal Tversky (false negatives 0.7, false positives 0.3, exponent 4/3).

    Shapes: ``output`` a :class:`NetworkOutput` (or stacked ``(B, 4, H, W)`` tensor);
    ``target`` ``(B, 3, H, W)``: channel 0 the nuclear-pixel mask (0/1), channels 1-2 the H and V
    maps (:func:`medseg.nuclei.targets.hover_targets`). Returns a scalar.
    """

    def __init__(
        self,
        ftl_weight: float = 1.0,
        dice_weight: float = 1.0,
        mse_weight: float = 2.5,
        msge_weight: float = 8.0,
        alpha: float = 0.7,
        beta: float = 0.3,
        gamma: float = 4.0 / 3.0,
    ):
        super().__init__()
        self.weights = (ftl_weight, dice_weight, mse_weight, msge_weight)
        self.ftl = FocalTverskyLoss(alpha=alpha, beta=beta, gamma=gamma, activation="softmax", to_onehot_y=True)
        self.dice = DiceLoss(softmax=True, to_onehot_y=True, batch=True)
        self.sobel_h = SobelGradients(kernel_size=5, spatial_axes=1)  # d/dx (columns) of the H map
        self.sobel_v = SobelGradients(kernel_size=5, spatial_axes=0)  # d/dy (rows) of the V map

    def _gradients(self, hv: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.sobel_h(hv[:, 0]), self.sobel_v(hv[:, 1])], dim=1)

    def terms(self, output: NetworkOutput | torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The four unweighted terms ``{"ftl", "dice", "mse", "msge"}``."""
        np_logits, hv = hover_outputs(output)
        np_logits, hv = np_logits.float(), hv.float()
        mask, hv_target = target[:, :1], target[:, 1:3].float()
        focus = mask.float()
        error = self._gradients(hv) - self._gradients(hv_target)
        return {
            "ftl": self.ftl(np_logits, mask),
            "dice": self.dice(np_logits, mask),
            "mse": F.mse_loss(hv, hv_target),
            "msge": (focus * error.square()).sum() / (2 * focus.sum() + 1e-8),
        }

    def forward(self, output: NetworkOutput | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms = self.terms(output, target)
        return sum(w * t for w, t in zip(self.weights, terms.values()))
