"""Small convolution helpers shared by the 2D networks (TransUNet decoder, ViT-Adapter stem)."""

from __future__ import annotations

from monai.networks.blocks import Convolution


def conv_bn_relu(
    spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1, kernel_size: int = 3
) -> Convolution:
    """``kernel_size`` conv (no bias, "same" padding, ``stride``) -> BatchNorm -> ReLU (MONAI
    :class:`~monai.networks.blocks.Convolution`; parameters ``conv.weight``, ``adn.N.*``).

    Shapes: ``(B, in_channels, *S)`` -> ``(B, out_channels, *S / stride)``.
    """
    return Convolution(
        spatial_dims,
        in_channels,
        out_channels,
        strides=stride,
        kernel_size=kernel_size,
        act="RELU",
        norm="BATCH",
        bias=False,
        adn_ordering="NA",
    )
