"""Building blocks shared by several medseg networks, one implementation each.

- :mod:`~medseg.networks.blocks.vit`: the pre-LN transformer block (:class:`ViTBlock`, with its
  :class:`Attention`, :class:`Mlp`, :class:`LayerScale`), timm parameter names;
- :mod:`~medseg.networks.blocks.pos_embed`: :func:`resample_abs_pos_embed` (1D/2D/3D grids);
- :mod:`~medseg.networks.blocks.token_bottleneck`: :class:`TokenBottleneck`, the CNN-map -> ViT ->
  map bottleneck of TransUNet 2D and 3D;
- :mod:`~medseg.networks.blocks.deformable_attention`: multi-scale deformable attention
  (Deformable DETR) in pure PyTorch;
- :mod:`~medseg.networks.blocks.conv`: conv + BN + ReLU.

Blocks import only torch, MONAI and each other, never a network module, the registry or the
checkpoint reader.
"""

from medseg.networks.blocks.conv import conv_bn_relu
from medseg.networks.blocks.deformable_attention import (
    MultiScaleDeformableAttention,
    grid_reference_points,
    multi_scale_deformable_attention,
)
from medseg.networks.blocks.pos_embed import resample_abs_pos_embed
from medseg.networks.blocks.token_bottleneck import TokenBottleneck
from medseg.networks.blocks.vit import Attention, LayerScale, Mlp, ViTBlock, init_linear_trunc_normal

__all__ = [
    "Attention",
    "LayerScale",
    "Mlp",
    "MultiScaleDeformableAttention",
    "TokenBottleneck",
    "ViTBlock",
    "conv_bn_relu",
    "grid_reference_points",
    "init_linear_trunc_normal",
    "multi_scale_deformable_attention",
    "resample_abs_pos_embed",
]
