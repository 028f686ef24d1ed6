"""nnU-Net-style plain / residual U-Net baseline, 2D or 3D, on MONAI's ``DynUNet``.

Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical image
segmentation", Nature Methods 18, 2021. Conv blocks are 2x(conv 3^d + InstanceNorm + LeakyReLU
0.01) (or residual blocks), strided-conv downsampling, transposed-conv upsampling, 1x1 output head
and 1x1 deep-supervision heads on the decoder stages. We reuse MONAI's ``DynUNet`` modules and only
replace its forward so the decoder/encoder features are exposed through :class:`NetworkOutput`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets import DynUNet

from medseg.networks.base import NetworkOutput, SegmentationNetwork
from medseg.networks.registry import register_network

REFERENCES = {
    "3d_fullres": dict(spatial_dims=3, in_channels=1, out_channels=3, filters=(32, 64, 128, 256, 320, 320)),
    "3d_resenc": dict(
        spatial_dims=3, in_channels=1, out_channels=3, filters=(32, 64, 128, 256, 320, 320), res_block=True
    ),
    "2d": dict(spatial_dims=2, in_channels=1, out_channels=3, filters=(32, 64, 128, 256, 512, 512, 512)),
    "hippocampus": dict(
        spatial_dims=3,
        in_channels=1,
        out_channels=3,
        filters=(16, 32, 64, 128),
        strides=(1, 2, 2, 2),
        deep_supervision=2,
    ),
    "tiny": dict(spatial_dims=3, in_channels=1, out_channels=2, filters=(8, 16, 32), deep_supervision=1),
}


def per_axis_strides(strides: Sequence[int | Sequence[int]], spatial_dims: int) -> list[tuple[int, ...]]:
    """Each stride as a ``spatial_dims``-tuple."""
    return [(int(s),) * spatial_dims if isinstance(s, int) else tuple(int(v) for v in s) for s in strides]


def unet_deep_supervision_scales(
    strides: Sequence[int | Sequence[int]], spatial_dims: int, heads: int
) -> tuple[tuple[float, ...], ...]:
    """Scales of DynUNet's heads, finest first: head ``i`` sits on the decoder stage at
    ``1 / prod(strides[:i + 2])`` of the input, per axis."""
    axes = per_axis_strides(strides, spatial_dims)
    return tuple(tuple(1.0 / math.prod(s[a] for s in axes[: i + 2]) for a in range(spatial_dims)) for i in range(heads))


@register_network(
    "unet", references=REFERENCES, description="nnU-Net-style plain/residual U-Net (MONAI DynUNet), 2D/3D"
)
class UNet(SegmentationNetwork):
    """nnU-Net-style U-Net.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: input channels and classes (background included).
        filters: channels per resolution stage, finest first (nnU-Net: 32 doubling, capped at 320).
        strides: per-stage downsampling strides (first is the stem, usually 1); default 1 then 2s.
            Any input size divisible by the product of the strides per axis is accepted.
        kernel_sizes: per-stage kernel sizes; default 3 everywhere.
        res_block: residual encoder blocks (nnU-Net ResEnc style) instead of plain conv blocks.
        deep_supervision: number of native deep-supervision heads (0 .. stages-2), finest first;
            head ``i`` at ``1 / prod(strides[:i + 2])`` of the input (``deep_supervision_scales``).
        norm_name: MONAI norm spec, instance norm by default.

    Shapes: ``(B, in_channels, *spatial)`` -> ``(B, out_channels, *spatial)``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        filters: Sequence[int] = (32, 64, 128, 256, 320, 320),
        strides: Sequence[int | Sequence[int]] | None = None,
        kernel_sizes: Sequence[int | Sequence[int]] | None = None,
        res_block: bool = False,
        deep_supervision: int = 0,
        norm_name: str | tuple = ("INSTANCE", {"affine": True}),
        dropout: float | None = None,
    ):
        super().__init__()
        stages = len(filters)
        strides = list(strides) if strides is not None else [1] + [2] * (stages - 1)
        kernel_sizes = list(kernel_sizes) if kernel_sizes is not None else [3] * stages
        if not len(strides) == len(kernel_sizes) == stages:
            raise ValueError("filters, strides and kernel_sizes need one entry per stage")
        if not 0 <= deep_supervision <= stages - 2:
            raise ValueError(f"deep_supervision must be in 0..{stages - 2}")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.input_divisor = tuple(
            math.prod(s[a] for s in per_axis_strides(strides, spatial_dims)) for a in range(spatial_dims)
        )
        self.deep_supervision_scales = unet_deep_supervision_scales(strides, spatial_dims, deep_supervision)
        self.net = DynUNet(
            spatial_dims,
            in_channels,
            out_channels,
            kernel_size=kernel_sizes,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=list(filters),
            dropout=dropout,
            norm_name=norm_name,
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            deep_supervision=deep_supervision > 0,
            deep_supr_num=max(deep_supervision, 1),
            res_block=res_block,
            trans_bias=False,
        )
        if deep_supervision == 0:  # DynUNet has no heads attribute then; keep forward_features uniform
            self.net.deep_supervision_heads = torch.nn.ModuleList()

    def forward_features(self, x: torch.Tensor) -> NetworkOutput:
        net = self.net
        encoder = [net.input_block(x)]
        for down in net.downsamples:
            encoder.append(down(encoder[-1]))
        encoder.append(net.bottleneck(encoder[-1]))
        decoder, y = [], encoder[-1]
        for up, skip in zip(net.upsamples, reversed(encoder[:-1])):
            y = up(y, skip)
            decoder.append(y)
        logits = net.output_block(y)
        # head i sits on the decoder stage at 1 / prod(strides[:i + 2]), finest first
        heads = [head(decoder[-2 - i]) for i, head in enumerate(net.deep_supervision_heads)]
        return NetworkOutput(logits=logits, decoder=decoder, encoder=encoder, deep_supervision=heads)

    def pretrained_state_dict(self, checkpoint: Any, source: str, **options: Any) -> Mapping[str, torch.Tensor]:
        """A medseg UNet or bare MONAI ``DynUNet`` state dict (keys without ``net.`` get it)."""
        state = super().pretrained_state_dict(checkpoint, source, **options)
        return {k if k.startswith("net.") else f"net.{k}": v for k, v in state.items()}
