"""STU-Net: scalable and transferable residual U-Net (3D), sizes S / B / L / H.

Huang et al., "STU-Net: Scalable and Transferable Medical Image Segmentation Models Empowered by
Large-Scale Supervised Pre-training", arXiv 2304.06716, 2023 (uni-medical/STU-Net, nnU-Net 1.7.1
based). Built here on PyTorch/MONAI from the facts in docs/architectures.md section 5:

- 6 resolution stages (5 downsamplings), all kernels 3x3x3.
- :class:`BasicResBlock`: conv3x3x3 -> InstanceNorm(affine) -> LeakyReLU(0.01) -> conv3x3x3 ->
  InstanceNorm, plus a shortcut (a 1x1x1 conv with the block's stride and no norm, wherever the
  channels or the stride change), then LeakyReLU after the addition. Convolutions have bias.
- Encoder stage ``d``: the first block downsamples with a strided 3x3x3 conv (stride = pool
  stride ``d - 1``) and the strided 1x1x1 projection; then ``depth - 1`` plain blocks. Stage 0's
  first block projects the input channels with a 1x1x1 conv.
- Upsampling: weight-free nearest interpolation by the pool stride and a 1x1x1 conv
  ``C_{l+1} -> C_l`` (MONAI :class:`~monai.networks.blocks.UpSample`, ``nontrainable`` mode). A 1x1x1
  conv and nearest upsampling commute exactly, so the conv runs first, on the coarse grid.
- Decoder level: concat(upsampled, skip) ``2 C_l`` -> residual block with 1x1x1 projection ->
  ``depth - 1`` plain blocks.
- Weights start as nnU-Net's ``InitWeights_He(1e-2)`` (Kaiming normal, zero bias).
- A 1x1x1 segmentation head (with bias) at each of the 5 decoder levels; the finest is the
  final output, the others are the native deep-supervision outputs. nnU-Net v1
  (``nnUNetTrainerV2``) weights them ``1 / 2**i`` (finest first), masks the coarsest to 0 and
  normalises: ``[8/15, 4/15, 2/15, 1/15, 0]`` for ``[logits, ds_1, ds_2, ds_3, ds_4]``
  (:data:`NNUNET_DEEP_SUPERVISION_WEIGHTS`, as computed by
  :func:`medseg.losses.nnunet_deep_supervision_weights`).

Parameter counts (in 1, 105 classes, all 5 heads) equal the upstream README:
S 14,596,941 / B 58,262,669 / L 440,302,605 / H 1,457,326,221 (``tests/test_networks_stunet.py``).

Pretrained weights (:meth:`STUNet.load_pretrained`) are read from a local nnU-Net v1 checkpoint
(``torch.save({"state_dict": ..., ...})``, e.g. ``*.model``) with the upstream module names; see
:func:`upstream_to_medseg_key` for the assumed key layout.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.networks.blocks import UpSample
from torch import nn

from medseg.errors import ConfigError, InputShapeError
from medseg.networks.base import NetworkOutput, SegmentationNetwork
from medseg.networks.pretrained import state_dict_from_checkpoint
from medseg.networks.registry import register_network

#: Depth per stage and channels per stage (finest first) of the four published sizes.
STUNET_SIZES: dict[str, dict[str, tuple[int, ...]]] = {
    "S": dict(depths=(1,) * 6, channels=(16, 32, 64, 128, 256, 256)),
    "B": dict(depths=(1,) * 6, channels=(32, 64, 128, 256, 512, 512)),
    "L": dict(depths=(2,) * 6, channels=(64, 128, 256, 512, 1024, 1024)),
    "H": dict(depths=(3,) * 6, channels=(96, 192, 384, 768, 1536, 1536)),
}

#: nnU-Net v1 deep-supervision loss weights for ``[logits, *deep_supervision]`` (finest first) of
#: a 6-stage STU-Net: ``1 / 2**i``, coarsest masked to 0, normalised to sum 1.
NNUNET_DEEP_SUPERVISION_WEIGHTS: tuple[float, ...] = (8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0)


class BasicResBlock(nn.Module):
    """STU-Net residual block (no bottleneck), ``(B, C_in, *S) -> (B, C_out, *S / stride)``.

    conv3x3x3(stride) -> IN -> LeakyReLU -> conv3x3x3 -> IN, plus the identity or, with
    ``projection=True``, a 1x1x1 conv with the same stride (bias, no norm); LeakyReLU(0.01) after
    the addition.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int | Sequence[int] = 1,
        projection: bool = False,
        kernel_size: int = 3,
        negative_slope: float = 0.01,
    ):
        super().__init__()
        stride = tuple(stride) if isinstance(stride, Sequence) else (stride,) * 3
        if not projection and (in_channels != out_channels or any(s != 1 for s in stride)):
            raise ConfigError("BasicResBlock: channels or stride change without a projection")
        padding = kernel_size // 2
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size, padding=padding)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)
        self.projection = nn.Conv3d(in_channels, out_channels, 1, stride=stride) if projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        shortcut = self.projection(x) if self.projection is not None else x
        return self.act(y + shortcut)


def _init_he(module: nn.Module) -> None:
    """nnU-Net's ``InitWeights_He(1e-2)``: Kaiming-normal conv weights for LeakyReLU(0.01), zero bias."""
    if isinstance(module, nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _stage(in_channels: int, out_channels: int, depth: int, stride) -> nn.Sequential:
    """First block with 1x1x1 projection (and ``stride``), then ``depth - 1`` plain blocks."""
    blocks = [BasicResBlock(in_channels, out_channels, stride=stride, projection=True)]
    blocks += [BasicResBlock(out_channels, out_channels) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


def _per_axis_strides(pool_strides, stages: int) -> list[tuple[int, int, int]]:
    if pool_strides is None:
        pool_strides = [2] * (stages - 1)
    pool_strides = list(pool_strides)
    if len(pool_strides) != stages - 1:
        raise ConfigError(
            f"stunet: pool_strides needs {stages - 1} entries (one per downsampling), got {len(pool_strides)}"
        )
    result = []
    for stride in pool_strides:
        per_axis = (int(stride),) * 3 if isinstance(stride, int) else tuple(int(s) for s in stride)
        if len(per_axis) != 3 or any(s < 1 for s in per_axis):
            raise ConfigError(f"stunet: invalid pool stride {stride!r} (an int or 3 positive ints)")
        result.append(per_axis)
    return result


def _reference(size: str, out_channels: int = 105) -> dict:
    return dict(spatial_dims=3, in_channels=1, out_channels=out_channels, **STUNET_SIZES[size])


REFERENCES = {
    "S": _reference("S"),
    "B": _reference("B"),
    "L": _reference("L"),
    "H": _reference("H"),
    # small configuration used only by the tests
    # (the last stride 1 keeps a 2^3 bottleneck at 32^3 input; instance norm needs > 1 voxel)
    "tiny": dict(
        spatial_dims=3,
        in_channels=1,
        out_channels=3,
        channels=(4, 8, 8, 16, 16, 16),
        depths=(1, 2, 1, 1, 1, 1),
        pool_strides=(2, 2, 2, 2, 1),
    ),
}


@register_network(
    "stunet",
    references=REFERENCES,
    description="STU-Net S/B/L/H residual U-Net with nearest upsampling and deep supervision (3D)",
)
class STUNet(SegmentationNetwork):
    """STU-Net (3D residual U-Net with nearest-neighbour upsampling and native deep supervision).

    Args:
        spatial_dims: must be 3.
        in_channels, out_channels: input channels and classes (background included).
        channels: channels per resolution stage, finest first (6 for the published sizes, see
            :data:`STUNET_SIZES`).
        depths: residual blocks per stage (same length as ``channels``); the decoder level at the
            resolution of stage ``l`` has ``depths[l]`` blocks too.
        pool_strides: one downsampling stride per stage transition (``len(channels) - 1``
            entries), each an int or a per-axis triple; default 2 everywhere, as in nnU-Net plans
            for isotropic data (the upstream cuts plans to 5 strides or pads with ``[1, 1, 1]``).
        deep_supervision: compute the coarser heads' outputs in ``forward(x, features=True)`` (4 for
            6 stages; ``deep_supervision_scales`` gives their scales, ``()`` when False). The heads
            always exist, as upstream, so parameter counts and checkpoints match.

    Shapes: ``(B, in_channels, H, W, D) -> (B, out_channels, H, W, D)``; ``H, W, D`` must be
    divisible by the product of the pool strides on that axis (32 by default) and leave a
    bottleneck of more than one voxel (e.g. at least 64 on one axis with the default strides),
    else :class:`~medseg.errors.InputShapeError`. ``forward(x, features=True)`` gives a
    :class:`NetworkOutput` whose ``encoder`` holds the 6 stage outputs (finest first),
    ``decoder`` the 5 decoder levels (coarsest first) and ``deep_supervision`` the 4 coarser
    head outputs, finest first, at ``1 / prod(pool_strides[:i + 1])`` of the input for
    ``i = 0..3``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 105,
        channels: Sequence[int] = STUNET_SIZES["B"]["channels"],
        depths: Sequence[int] = STUNET_SIZES["B"]["depths"],
        pool_strides: Sequence[int | Sequence[int]] | None = None,
        deep_supervision: bool = True,
    ):
        super().__init__()
        if spatial_dims != 3:
            raise ConfigError("stunet: only spatial_dims=3 is implemented (STU-Net is a 3D network)")
        channels, depths = [int(c) for c in channels], [int(d) for d in depths]
        if len(channels) != len(depths) or len(channels) < 2:
            raise ConfigError("stunet: channels and depths need the same number (>= 2) of stages")
        if min(depths) < 1:
            raise ConfigError("stunet: every stage needs at least one block")
        strides = _per_axis_strides(pool_strides, len(channels))
        self.spatial_dims, self.in_channels, self.out_channels = 3, in_channels, out_channels
        self.pool_strides = strides
        divisor = [1, 1, 1]
        for stride in strides:
            divisor = [d * s for d, s in zip(divisor, stride)]
        self.input_divisor = tuple(divisor)
        self.deep_supervision = deep_supervision
        # head on decoder level at 1 / prod(strides[:i + 1]) for i = 0 .. stages - 3, finest first
        self.deep_supervision_scales = (
            tuple(
                tuple(1.0 / math.prod(s[a] for s in strides[: i + 1]) for a in range(3))
                for i in range(len(channels) - 2)
            )
            if deep_supervision
            else ()
        )

        self.encoder = nn.ModuleList([_stage(in_channels, channels[0], depths[0], 1)])
        for d in range(1, len(channels)):
            self.encoder.append(_stage(channels[d - 1], channels[d], depths[d], strides[d - 1]))
        # decoder level u sits at the resolution of encoder stage l = stages - 2 - u (coarsest first)
        levels = list(range(len(channels) - 2, -1, -1))
        self.upsamples = nn.ModuleList(
            [
                UpSample(
                    3,
                    channels[l + 1],
                    channels[l],
                    scale_factor=strides[l],
                    mode="nontrainable",
                    pre_conv=nn.Conv3d(channels[l + 1], channels[l], 1),
                    interp_mode="nearest",
                    align_corners=None,
                )
                for l in levels
            ]
        )
        self.decoder = nn.ModuleList([_stage(2 * channels[l], channels[l], depths[l], 1) for l in levels])
        self.heads = nn.ModuleList([nn.Conv3d(channels[l], out_channels, 1) for l in levels])
        self.apply(_init_he)

    def check_input(self, x: torch.Tensor) -> None:
        """:meth:`SegmentationNetwork.check_input`, and the bottleneck must keep more than one voxel
        (instance normalisation needs it).

        Raises:
            InputShapeError: wrong dimensions or channels, sizes not divisible by
                ``input_divisor``, or an input so small that the bottleneck is a single voxel.
        """
        super().check_input(x)
        bottleneck = [s // d for s, d in zip(x.shape[2:], self.input_divisor)]
        if np.prod(bottleneck) <= 1:
            raise InputShapeError(
                f"STUNet: input {tuple(x.shape[2:])} leaves a single-voxel bottleneck (strides {self.input_divisor}); "
                "instance normalisation needs a larger patch"
            )

    def forward_features(self, x: torch.Tensor) -> NetworkOutput:
        encoder = []
        for stage in self.encoder:
            x = stage(x)
            encoder.append(x)
        decoder = []
        for upsample, stage, skip in zip(self.upsamples, self.decoder, reversed(encoder[:-1])):
            x = stage(torch.cat((upsample(x), skip), dim=1))
            decoder.append(x)
        logits = self.heads[-1](decoder[-1])
        deep_supervision = []
        if self.deep_supervision:
            # heads[-2] on the second-finest level first
            deep_supervision = [head(feature) for head, feature in zip(self.heads[-2::-1], decoder[-2::-1])]
        return NetworkOutput(logits=logits, decoder=decoder, encoder=encoder, deep_supervision=deep_supervision)

    def pretrained_state_dict(
        self, checkpoint: Any, source: str, skip_heads: bool = False, **options: Any
    ) -> dict[str, torch.Tensor]:
        """An upstream STU-Net checkpoint (nnU-Net v1 ``{'state_dict': ...}``, e.g.
        ``model_final_checkpoint.model``, or a bare state dict), read by :meth:`load_pretrained`
        (``net.load_pretrained(path, skip_heads=True)``).

        Keys are renamed with :func:`upstream_to_medseg_key`; missing and unexpected keys are
        returned (and logged) by :func:`~medseg.networks.pretrained.load_state_dict_report`.

        Args:
            skip_heads: drop the checkpoint's segmentation heads (``seg_outputs``), e.g. to fine-tune
                the 105-class TotalSegmentator model for other classes; the heads are then reported
                as missing and keep their fresh initialisation.

        Raises:
            PretrainedWeightsError: no ``state_dict`` of tensors in the checkpoint (or, from the
                loader, a tensor whose shape differs from the network's).
        """
        if options:
            raise TypeError(f"STUNet.load_pretrained: unknown options {sorted(options)}")
        state = state_dict_from_checkpoint(checkpoint, source, strip_module=False)
        mapped = {}
        for key, value in state.items():
            new = upstream_to_medseg_key(key)
            if skip_heads and new.startswith("heads."):
                continue
            mapped[new] = value
        return mapped


#: (upstream pattern, medseg replacement) applied in order by :func:`upstream_to_medseg_key`.
_UPSTREAM_KEY_MAP = [
    (r"^module\.", ""),  # saved from DataParallel / DDP
    (r"^conv_blocks_context\.", "encoder."),
    (r"^conv_blocks_localization\.", "decoder."),
    (r"^upsample_layers\.(\d+)\.conv\.", r"upsamples.\1.preconv."),
    (r"^seg_outputs\.", "heads."),
    (r"\.conv3\.", ".projection."),
]


def upstream_to_medseg_key(key: str) -> str:
    """Rename one upstream STU-Net (nnU-Net 1.7.1 ``STUNet.py``) parameter name to ours.

    Assumed upstream layout (the upstream file was not available to check; built from the
    paper/README facts and nnU-Net v1 conventions):

    ===========================================================  =================================
    upstream                                                     medseg
    ===========================================================  =================================
    ``conv_blocks_context.{stage}.{block}.conv1|norm1|conv2|norm2``  ``encoder.{stage}.{block}.…``
    ``conv_blocks_context.{stage}.{block}.conv3`` (1x1 shortcut)  ``encoder.{stage}.{block}.projection``
    ``upsample_layers.{u}.conv`` (1x1 after nearest upsampling)  ``upsamples.{u}.preconv``
    ``conv_blocks_localization.{u}.{block}.…``                   ``decoder.{u}.{block}.…``
    ``seg_outputs.{u}``                                          ``heads.{u}``
    ===========================================================  =================================

    ``u`` counts decoder levels from the coarsest (as upstream ``forward`` does), so
    ``seg_outputs.4`` is the final full-resolution head. A ``module.`` prefix (DataParallel) is
    dropped.
    """
    for pattern, replacement in _UPSTREAM_KEY_MAP:
        key = re.sub(pattern, replacement, key)
    return key


def medseg_to_upstream_key(key: str) -> str:
    """Inverse of :func:`upstream_to_medseg_key` (to export weights in the upstream layout)."""
    for pattern, replacement in [
        (r"^encoder\.", "conv_blocks_context."),
        (r"^decoder\.", "conv_blocks_localization."),
        (r"^upsamples\.(\d+)\.preconv\.", r"upsample_layers.\1.conv."),
        (r"^heads\.", "seg_outputs."),
        (r"\.projection\.", ".conv3."),
    ]:
        key = re.sub(pattern, replacement, key)
    return key
