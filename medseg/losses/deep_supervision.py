"""Losses over a :class:`~medseg.networks.base.NetworkOutput`, with nnU-Net deep supervision.

Isensee et al., nnU-Net (Nature Methods 2021), ``nnUNetTrainer._build_loss``: the loss of each
deep-supervision output ``i`` (0 = full resolution) is weighted ``1 / 2**i``, the lowest resolution
output is masked (weight 0) and the weights are normalised to sum to 1; targets are downsampled
with nearest-neighbour interpolation. The weighting and target resizing are MONAI's
:class:`monai.losses.DeepSupervisionLoss`; only the weights are nnU-Net's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss as MonaiDeepSupervisionLoss
from torch import nn

from medseg.networks.base import NetworkOutput


def nnunet_deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net's scale weights for ``num_outputs`` outputs, finest first.

    ``[1, 1/2, 1/4, ...]`` with the last (coarsest) set to 0, normalised; e.g. 5 outputs ->
    ``[8/15, 4/15, 2/15, 1/15, 0]`` (STU-Net) and 1 output -> ``[1]``.
    """
    weights = [1.0 / 2**i for i in range(num_outputs)]
    if num_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


class LogitsLoss(nn.Module):
    """Apply a ``loss(logits, target)`` to ``output.logits`` only.

    ``forward(output, target)``: ``output`` a :class:`NetworkOutput` (or a logits tensor
    ``(B, K, *spatial)``), target a label map ``(B, 1, *spatial)``; returns a scalar.
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(
        self,
        output: NetworkOutput | torch.Tensor,
        target: torch.Tensor,
        target_mip: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        logits = output.logits if isinstance(output, NetworkOutput) else output
        return self.loss(logits, target) if target_mip is None else self.loss(logits, target, target_mip)


#: spatial dim (of ``(B, C, H, W, D)``) each MIP axis projects over (as :data:`medseg.losses.mip.AXES`)
_MIP_DIMS = {"x": 2, "y": 3, "z": 4}


def resize_target_mip(target_mip: Mapping[str, torch.Tensor], spatial: Sequence[int]) -> dict[str, torch.Tensor]:
    """The whole-volume MIP targets ``{axis: (B, C, *plane)}`` resized (nearest-exact, as MONAI
    resizes the 3D target) to the plane of an output of spatial size ``spatial`` ``(H, W, D)``
    without the projected axis, e.g. ``"z"`` -> ``(H, W)``."""
    resized = {}
    for axis, mip in target_mip.items():
        plane = tuple(int(s) for i, s in enumerate(spatial) if i != _MIP_DIMS[axis] - 2)
        mip = mip.float()
        resized[axis] = mip if tuple(mip.shape[2:]) == plane else F.interpolate(mip, size=plane, mode="nearest-exact")
    return resized


class DeepSupervisionLoss(nn.Module):
    """``sum_i w_i loss(logits_i, nearest_downsample(target))`` over ``[output.logits, *output.deep_supervision]``.

    Args:
        loss: ``loss(logits, target) -> scalar``, e.g. :class:`monai.losses.DiceCELoss`.
        weights: per-output weights, finest first; default :func:`nnunet_deep_supervision_weights`
            for the number of outputs the network returns.
        num_outputs: if given, the number of outputs (logits + heads) the network declares
            (:func:`medseg.losses.build_loss` passes ``1 + len(network.deep_supervision_scales)``);
            any other number at call time raises ``ValueError``.

    ``forward(output, target)``: ``output.logits`` ``(B, K, *spatial)`` and
    ``output.deep_supervision`` ``[(B, K, *spatial / r_i)]`` finest first; target ``(B, 1, *spatial)``;
    optional ``target_mip`` ``{axis: (B, 1, *plane)}`` (SPOCKMIP: the whole label volume's projection
    cropped to the patch window, :class:`medseg.data.transforms.WholeVolumeMIPd`), resized for each
    coarser head by :func:`resize_target_mip` and passed as ``loss(logits_i, target_i, target_mip_i)``.
    A network without native deep-supervision heads gets the plain loss on its logits.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None, num_outputs: int | None = None):
        super().__init__()
        self.loss = loss
        self.weights = list(weights) if weights is not None else None
        self.num_outputs = num_outputs

    def forward(
        self, output: NetworkOutput, target: torch.Tensor, target_mip: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        outputs = [output.logits, *output.deep_supervision]
        if self.num_outputs is not None and len(outputs) != self.num_outputs:
            raise ValueError(
                f"deep supervision expects {self.num_outputs} outputs (logits + heads), got {len(outputs)}; "
                "was the network called with features=True in training mode?"
            )
        weights = self.weights or nnunet_deep_supervision_weights(len(outputs))
        if len(weights) < len(outputs):
            raise ValueError(f"{len(outputs)} deep-supervision outputs but only {len(weights)} weights")
        wrapped = MonaiDeepSupervisionLoss(self.loss, weights=weights[: len(outputs)])
        if target_mip is None:
            return wrapped(outputs, target.float())
        # MONAI's loop (same weights, same nearest-exact target resizing), with the MIP targets
        total = torch.zeros((), dtype=torch.float32, device=target.device)
        for weight, logits in zip(weights, outputs):
            level_target = target.float()
            if logits.shape[2:] != level_target.shape[2:]:
                level_target = F.interpolate(level_target, size=logits.shape[2:], mode=wrapped.interp_mode)
            level_mip = resize_target_mip(target_mip, logits.shape[2:])
            total = total + weight * self.loss(logits.float(), level_target, level_mip)
        return total
