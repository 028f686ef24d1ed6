"""The transformer bottleneck of the TransUNet family: a CNN feature map through a ViT and back.

Chen et al., "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation",
arXiv:2102.04306, 2021, section 3.1-3.2 (hybrid CNN-Transformer encoder: "patch embedding applied to
1x1 patches extracted from the CNN feature map"), and its 3D follow-up, Chen et al., "3D TransUNet",
arXiv:2310.07781, 2023 (the same on the bottleneck of an nnU-Net, with LayerScale). Facts per
network: docs/architectures.md section 1.

Layout, for a feature map ``(B, C, *G)`` (``G`` the token grid, 2 or 3 axes):

1. ``patch_embed``: 1x1 (x1) convolution ``C -> D``, every grid position one token ``(B, prod(G), D)``;
2. ``+ pos_embed`` (learned, ``(1, prod(grid), D)`` for the reference ``grid``, truncated-normal
   std 0.02, linearly resampled when the input grid differs), then dropout ``pos_drop``;
3. ``blocks``: ``num_layers`` pre-LN :class:`~medseg.networks.blocks.vit.ViTBlock` (timm names);
4. ``norm``: final LayerNorm; tokens reshaped back to a map ``(B, D, *G)``.

No class token. Google ViT ``.npz`` weights map onto ``blocks`` / ``norm`` with
:func:`medseg.networks.pretrained.google_vit_state_from_npz`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from medseg.networks.blocks.pos_embed import resample_abs_pos_embed
from medseg.networks.blocks.vit import ViTBlock


class TokenBottleneck(nn.Module):
    """1x1 patch embedding + learned position embedding + ViT blocks + final LayerNorm, map in, map out.

    Args:
        spatial_dims: 2 or 3 (axes of the feature map).
        in_channels: channels ``C`` of the CNN feature map.
        grid: reference token grid (the feature-map size at the reference input size); sizes
            ``pos_embed``.
        hidden_size, num_layers, num_heads, mlp_dim: the ViT (ViT-B: 768, 12, 12, 3072).
        dropout_rate: embedding and MLP dropout (TransUNet 0.1).
        attention_dropout_rate: attention-weight and attention-projection dropout (0).
        layer_scale: LayerScale init (3D TransUNet 1e-5); ``None`` disables it.
        norm_eps: LayerNorm epsilon (1e-6).

    Shapes: ``(B, in_channels, *G)`` -> ``(B, hidden_size, *G)`` for any grid ``G`` with
    ``spatial_dims`` axes.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        grid: Sequence[int],
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        layer_scale: float | None = None,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if spatial_dims not in (2, 3) or len(grid) != spatial_dims:
            raise ValueError(f"TokenBottleneck: grid {tuple(grid)} must have spatial_dims (2 or 3) axes")
        self.grid = tuple(int(g) for g in grid)
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.patch_embed = conv(in_channels, hidden_size, kernel_size=1)
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid), hidden_size))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(dropout_rate)
        self.blocks = nn.ModuleList(
            ViTBlock(
                hidden_size,
                num_heads,
                mlp_dim=mlp_dim,
                qkv_bias=True,
                layer_scale=layer_scale,
                mlp_drop=dropout_rate,
                attn_drop=attention_dropout_rate,
                proj_drop=attention_dropout_rate,
                norm_eps=norm_eps,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=norm_eps)

    @property
    def num_heads(self) -> int:
        return self.blocks[0].attn.num_heads if len(self.blocks) else 0

    def position_embedding(self, grid: Sequence[int]) -> torch.Tensor:
        """``pos_embed`` resampled (linear/bilinear/trilinear, no antialiasing) to ``grid``."""
        return resample_abs_pos_embed(
            self.pos_embed, grid, self.grid, num_prefix_tokens=0, interpolation="linear", antialias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        grid = tuple(tokens.shape[2:])
        tokens = self.pos_drop(tokens.flatten(2).transpose(1, 2) + self.position_embedding(grid))
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
