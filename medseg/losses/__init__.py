"""Segmentation losses: MONAI's Dice family, focal Tversky, SPOCKMIP's MIP loss, the CellViT HoVer loss, nnU-Net deep
supervision and dual self-distillation, all applied to a network's
:class:`~medseg.networks.base.NetworkOutput` through :func:`build_loss`."""

from medseg.losses.deep_supervision import (
    DeepSupervisionLoss,
    LogitsLoss,
    nnunet_deep_supervision_weights,
)
from medseg.losses.dsd import DualSelfDistillationLoss, SideHead, kl_distillation
from medseg.losses.factory import FocalTverskyMIPLoss, build_loss, segmentation_loss
from medseg.losses.hover import HoVerLoss
from medseg.losses.mip import MIPLoss
from medseg.losses.tversky import FocalTverskyLoss

__all__ = [
    "DeepSupervisionLoss",
    "DualSelfDistillationLoss",
    "FocalTverskyLoss",
    "FocalTverskyMIPLoss",
    "HoVerLoss",
    "LogitsLoss",
    "MIPLoss",
    "SideHead",
    "build_loss",
    "kl_distillation",
    "nnunet_deep_supervision_weights",
    "segmentation_loss",
]
