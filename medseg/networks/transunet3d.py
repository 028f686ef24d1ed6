"""3D TransUNet, encoder-only variant: an nnU-Net-style U-Net with a ViT on the bottleneck.

Chen et al., "3D TransUNet: Advancing Medical Image Segmentation through Vision Transformers",
arXiv:2310.07781, 2023 (docs/architectures.md section 1, "3D TransUNet"). Built on
:class:`medseg.networks.unet.UNet` (MONAI ``DynUNet`` blocks) and the transformer bottleneck shared
with the 2D TransUNet (:class:`~medseg.networks.blocks.TokenBottleneck`); no upstream code is
copied. The Mask2Former-style transformer
decoder variant of the paper is not implemented.

Layout for an input ``(B, C, *S)`` (S divisible by the product of the strides, 32 by default):

- CNN encoder: nnU-Net generic U-Net stages, 2 x (conv 3^d + InstanceNorm + LeakyReLU) each,
  channels ``(32, 64, 128, 256, 320, 320)`` (base 32, doubling, capped at 320), stride-2 conv
  downsampling, bottleneck at S/32.
- ``transformer`` on the bottleneck (:class:`~medseg.networks.blocks.TokenBottleneck`): every
  bottleneck voxel is a token (1x1x1 conv patch embedding 320 -> 768), learned position embedding
  sized for ``img_size`` (resized trilinearly for other input sizes), 12 pre-LN blocks (12 heads,
  MLP 3072) with LayerScale initialised to 1e-5, final LayerNorm; then ``conv_more`` 1x1x1
  768 -> 320 back onto the CNN path.
- Decoder: the U-Net's transposed-conv decoder with skips; 1x1 head; native deep-supervision heads
  on the decoder stages S/2 .. S/16 (``deep_supervision=4``, like nnU-Net's 5 segmentation outputs;
  ``deep_supervision_scales`` as :class:`~medseg.networks.unet.UNet`'s).

Reference (``paper_encoder``): in 1, out 14 (BTCV), ``img_size=(128, 128, 128)`` (the paper's
BraTS crop and nnU-Net's usual 3D patch ceiling; 4^3 = 64 bottleneck tokens): **116,816,806**
parameters (CNN U-Net with 4 deep-supervision heads 31,200,614; ViT incl. patch/position embedding
and ``conv_more`` 85,616,192). The paper states no count for this variant (none verified).
The count depends on ``img_size`` only through the position embedding (768 per token).

Taps (:class:`~medseg.networks.base.NetworkOutput`):

- ``encoder`` (finest first): the 6 CNN stage outputs (S .. S/32, bottleneck last but one) and the
  ViT output as a map (768 ch, S/32) last.
- ``decoder`` (coarsest first): ``conv_more`` output (320 ch, S/32), then the 5 decoder stages
  (S/16 .. S).
- ``deep_supervision`` (finest first): logits at S/2, S/4, S/8, S/16.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medseg.errors import ConfigError
from medseg.networks.base import NetworkOutput, SegmentationNetwork
from medseg.networks.blocks import TokenBottleneck
from medseg.networks.pretrained import google_vit_state_from_npz, npz_arrays, unused_arrays
from medseg.networks.registry import register_network
from medseg.networks.unet import UNet

REFERENCES = {
    "paper_encoder": dict(spatial_dims=3, in_channels=1, out_channels=14, img_size=(128, 128, 128)),
    "tiny": dict(
        spatial_dims=3,
        in_channels=1,
        out_channels=3,
        img_size=(32, 32, 32),
        filters=(8, 16, 32, 32),
        deep_supervision=2,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        mlp_dim=64,
    ),
}


@register_network(
    "transunet3d",
    references=REFERENCES,
    description="3D TransUNet (encoder-only): nnU-Net U-Net with a ViT-B bottleneck, LayerScale, deep supervision",
)
class TransUNet3D(SegmentationNetwork):
    """3D TransUNet (encoder-only variant). See the module docstring for the layout and taps.

    Args:
        spatial_dims: 3 (2 also works: the same design on 2D U-Net stages).
        in_channels, out_channels: input channels and classes K.
        img_size: reference patch size; sizes the position embedding to ``img_size / divisor``
            tokens per axis.
        filters, strides, kernel_sizes: U-Net stages as in :class:`~medseg.networks.unet.UNet`.
        deep_supervision: number of native deep-supervision heads (1 .. stages - 2).
        hidden_size, num_layers, num_heads, mlp_dim: the bottleneck ViT (768, 12, 12, 3072).
        layer_scale: LayerScale initial value (1e-5); None disables LayerScale.
        dropout_rate, attention_dropout_rate: ViT embedding/MLP and attention dropout.
        freeze_encoder: ``requires_grad=False`` on the ``transformer`` (ViT and its patch/position
            embedding), e.g. to keep ImageNet ViT weights fixed while the CNN trains.

    Shapes: ``(B, in_channels, *S)`` -> ``(B, out_channels, *S)``.

    Raises:
        ConfigError: inconsistent configuration (img_size not divisible by the strides...).
        InputShapeError: wrong input channels/dimensions/sizes (at call time).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 14,
        img_size: Sequence[int] | int = (128, 128, 128),
        filters: Sequence[int] = (32, 64, 128, 256, 320, 320),
        strides: Sequence[int | Sequence[int]] | None = None,
        kernel_sizes: Sequence[int | Sequence[int]] | None = None,
        deep_supervision: int = 4,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        layer_scale: float | None = 1e-5,
        dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        freeze_encoder: bool = False,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError(f"transunet3d: spatial_dims must be 2 or 3, got {spatial_dims}")
        try:
            self.unet = UNet(
                spatial_dims,
                in_channels,
                out_channels,
                filters=filters,
                strides=strides,
                kernel_sizes=kernel_sizes,
                deep_supervision=deep_supervision,
            )
        except ValueError as error:
            raise ConfigError(f"transunet3d: {error}") from None
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.input_divisor = self.unet.input_divisor
        self.deep_supervision_scales = self.unet.deep_supervision_scales
        img_size = (img_size,) * spatial_dims if isinstance(img_size, int) else tuple(img_size)
        if len(img_size) != spatial_dims or any(s % d for s, d in zip(img_size, self.input_divisor)):
            raise ConfigError(
                f"transunet3d: img_size {img_size} must have {spatial_dims} sizes divisible by {self.input_divisor}"
            )
        self.grid = tuple(s // d for s, d in zip(img_size, self.input_divisor))
        try:
            self.transformer = TokenBottleneck(
                spatial_dims,
                filters[-1],
                self.grid,
                hidden_size,
                num_layers,
                num_heads,
                mlp_dim,
                dropout_rate,
                attention_dropout_rate,
                layer_scale=layer_scale,
            )
        except ValueError as error:
            raise ConfigError(f"transunet3d: {error}") from None
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.conv_more = conv(hidden_size, filters[-1], kernel_size=1)
        if freeze_encoder:
            self.transformer.requires_grad_(False)

    def forward_features(self, x: torch.Tensor) -> NetworkOutput:
        net = self.unet.net
        encoder = [net.input_block(x)]
        for down in net.downsamples:
            encoder.append(down(encoder[-1]))
        encoder.append(net.bottleneck(encoder[-1]))
        vit_map = self.transformer(encoder[-1])  # (B, hidden, *S/32)
        y = self.conv_more(vit_map)
        decoder = [y]
        for up, skip in zip(net.upsamples, reversed(encoder[:-1])):
            y = up(y, skip)
            decoder.append(y)
        logits = net.output_block(y)
        heads = [head(decoder[-2 - i]) for i, head in enumerate(net.deep_supervision_heads)]
        return NetworkOutput(logits=logits, decoder=decoder, encoder=[*encoder, vit_map], deep_supervision=heads)

    def pretrained_state_dict(self, checkpoint: Any, source: str, **options: Any) -> dict[str, torch.Tensor]:
        """The bottleneck ViT from a Google ViT npz (e.g. ImageNet-21k ``ViT-B_16.npz`` or
        ``R50+ViT-B_16.npz``), read by :meth:`load_pretrained`: the transformer blocks and the final
        LayerNorm.

        The 2D patch-embedding kernel and position embedding do not fit a 1x1x1 embedding of the
        CNN bottleneck and are reported as unexpected, as are the classifier keys; the CNN, the
        embedding, LayerScale and ``conv_more`` keep their initialisation (reported as missing).

        Raises:
            PretrainedWeightsError: not an npz, or a ViT tensor of another width (from the loader).
        """
        if options:
            raise TypeError(f"TransUNet3D.load_pretrained: unknown options {sorted(options)}")
        arrays = npz_arrays(checkpoint, source)
        used: set[str] = set()
        state = google_vit_state_from_npz(arrays, len(self.transformer.blocks), "transformer", used)
        state.update(unused_arrays(arrays, used))
        return state
