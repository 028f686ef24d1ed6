"""Build a training loss by name: the one place configs turn into loss modules.

Every loss built here is called as ``loss(output, target)`` with ``output`` the
:class:`~medseg.networks.base.NetworkOutput` of ``network(x, features=True)`` and ``target`` a label
map ``(B, 1, *spatial)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss
from torch import nn

from medseg.errors import ConfigError
from medseg.losses.deep_supervision import DeepSupervisionLoss, LogitsLoss, nnunet_deep_supervision_weights
from medseg.losses.dsd import DualSelfDistillationLoss
from medseg.losses.hover import HoVerLoss
from medseg.losses.mip import MIPLoss
from medseg.losses.tversky import FocalTverskyLoss


class FocalTverskyMIPLoss(nn.Module):
    """SPOCKMIP's per-level loss: ``w_ftl FTL(p, y) + w_mip MIP(p, y)`` (0.7 / 0.3).

    Shapes: logits ``(B, K, H, W, D)``, target ``(B, 1, H, W, D)``; see :class:`MIPLoss` for
    ``axis``, ``activation`` and ``target_mip``.
    """

    def __init__(
        self,
        ftl_weight: float = 0.7,
        mip_weight: float = 0.3,
        axis: str = "z",
        activation: str = "softmax",
        include_background: bool = False,
        **ftl: Any,
    ):
        super().__init__()
        self.ftl_weight, self.mip_weight = ftl_weight, mip_weight
        self.ftl = FocalTverskyLoss(
            activation=activation, include_background=include_background, to_onehot_y=activation == "softmax", **ftl
        )
        self.mip = MIPLoss(axis=axis, activation=activation, include_background=include_background, **ftl)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, target_mip: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.ftl.tversky.to_onehot_y is False:
            target = (target > 0).float() if logits.shape[1] == 1 else target
        return self.ftl_weight * self.ftl(logits, target) + self.mip_weight * self.mip(logits, target, target_mip)


def segmentation_loss(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """``loss(logits, target)`` by name: ``dice``, ``dice_ce``, ``dice_focal`` (MONAI; softmax over
    ``num_classes`` channels with one-hot targets, or sigmoid for one channel), ``focal_tversky``,
    ``mip`` or ``ftl_mip`` (SPOCKMIP). ``kwargs`` go to the loss class.

    Raises:
        ConfigError: unknown name or keyword.
    """
    binary = num_classes == 1
    activation = {"sigmoid": True} if binary else {"softmax": True, "to_onehot_y": True}
    builders = {
        "dice": lambda: DiceLoss(**{**activation, **kwargs}),
        "dice_ce": lambda: DiceCELoss(**{**activation, **kwargs}),
        "dice_focal": lambda: DiceFocalLoss(**{**activation, **kwargs}),
        "focal_tversky": lambda: FocalTverskyLoss(
            **{"activation": "sigmoid" if binary else "softmax", "to_onehot_y": not binary, **kwargs}
        ),
        "mip": lambda: MIPLoss(**{"activation": "sigmoid" if binary else "softmax", **kwargs}),
        "ftl_mip": lambda: FocalTverskyMIPLoss(**{"activation": "sigmoid" if binary else "softmax", **kwargs}),
    }
    if name not in builders:
        raise ConfigError(f"loss.name: unknown loss '{name}' (known: {', '.join(builders)})")
    try:
        return builders[name]()
    except TypeError as error:
        raise ConfigError(f"loss.kwargs: {error}") from None


def deep_supervision_heads(network: nn.Module) -> int:
    """The number of native deep-supervision heads ``network`` declares
    (``len(network.deep_supervision_scales)``, see :class:`~medseg.networks.base.SegmentationNetwork`).

    Raises:
        TypeError: the network does not declare ``deep_supervision_scales`` (a bug in the network).
    """
    scales = getattr(network, "deep_supervision_scales", None)
    if scales is None:
        raise TypeError(
            f"{type(network).__name__} does not declare deep_supervision_scales (the SegmentationNetwork contract)"
        )
    return len(scales)


def build_loss(
    name: str,
    network: nn.Module,
    patch_size: Sequence[int],
    kwargs: dict[str, Any] | None = None,
    deep_supervision: bool = True,
    deep_supervision_weights: Sequence[float] | None = None,
    dsd: dict[str, Any] | None = None,
) -> nn.Module:
    """The training loss for ``network``: ``loss(output: NetworkOutput, target) -> scalar``.

    - ``dsd`` given (a dict of :class:`DualSelfDistillationLoss` options, possibly empty): dual
      self-distillation around the segmentation loss; its side heads are parameters to train.
    - else, when the network declares ``N > 0`` native heads (``deep_supervision_scales``) and
      ``deep_supervision`` is on: :class:`DeepSupervisionLoss` over the ``N + 1`` outputs with
      nnU-Net's weights (:func:`nnunet_deep_supervision_weights`) or ``deep_supervision_weights``;
    - else the loss on the final logits (:class:`LogitsLoss`), e.g. for every network with 0 heads;
    - ``name == "hover"``: :class:`~medseg.losses.hover.HoVerLoss` on the NP/HV outputs of a nuclei
      network (target ``(B, 3, H, W)``: nuclear mask, H and V maps).

    Raises:
        ConfigError: unknown loss/keyword, or ``deep_supervision_weights`` whose length is not
            ``N + 1``.
    """
    if name == "hover":  # NP/HV maps of a nuclei network (their own terms, no deep supervision)
        try:
            return HoVerLoss(**(kwargs or {}))
        except TypeError as error:
            raise ConfigError(f"loss.kwargs: {error}") from None
    seg = segmentation_loss(name, int(network.out_channels), **(kwargs or {}))
    heads = deep_supervision_heads(network)
    if dsd is not None:
        try:
            return DualSelfDistillationLoss(network, seg, patch_size, **dsd)
        except TypeError as error:
            raise ConfigError(f"loss.dsd: {error}") from None
    if deep_supervision and heads > 0:
        weights = (
            list(deep_supervision_weights)
            if deep_supervision_weights is not None
            else nnunet_deep_supervision_weights(heads + 1)
        )
        if len(weights) != heads + 1:
            raise ConfigError(
                f"loss.deep_supervision_weights: {len(weights)} weights, but {type(network).__name__} "
                f"gives {heads + 1} outputs (logits + {heads} deep-supervision heads), finest first"
            )
        return DeepSupervisionLoss(seg, weights, num_outputs=heads + 1)
    return LogitsLoss(seg)
