"""A timm-compatible plain ViT and the ViT-Adapter around it, one level finer (CellVTA).

* :class:`VisionTransformer` -- Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, with
  LayerScale (Touvron et al., CaiT, ICCV 2021) as in DINOv2/UNI, on the shared
  :class:`~medseg.networks.blocks.ViTBlock`. Module and parameter names match timm's
  ``VisionTransformer`` (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
  ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``, ``norm``), so
  a timm/UNI state dict loads without renaming. Any input size divisible by the patch size works:
  the position embedding is resampled bicubically to the token grid (timm ``dynamic_img_size``,
  :func:`~medseg.networks.blocks.resample_abs_pos_embed`).
* :class:`ViTAdapter` -- Chen et al., "Vision Transformer Adapter for Dense Predictions", ICLR
  2023: a convolutional Spatial Prior Module, Injectors (ViT tokens query the spatial features
  through multi-scale deformable attention) and Extractors (spatial features query the ViT tokens)
  around ranges of ViT blocks (:class:`~medseg.networks.blocks.MultiScaleDeformableAttention`). As
  in CellVTA (Yang et al., "CellVTA: Enhancing Vision Foundation
  Models for Accurate Cell Segmentation and Classification", 2025) every level is one octave finer
  than in ViT-Adapter: outputs ``f1..f4`` at 1/2, 1/4, 1/8 and 1/16 of the input. The exact
  CellVTA Spatial Prior Module layout is taken from the project's architecture notes
  (rebuilt layout; unverified against the authors' checkpoint).

Written from the papers; no code from timm, ViT-Adapter or CellVTA is copied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath, trunc_normal_
from torch import nn

from medseg.networks.blocks import (
    MultiScaleDeformableAttention,
    ViTBlock,
    conv_bn_relu,
    grid_reference_points,
    init_linear_trunc_normal,
    resample_abs_pos_embed,
)

# ---------------------------------------------------------------------------------------------
# timm-compatible ViT
# ---------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` x ``patch_size`` patches -> tokens: ``(B, C, H, W)`` -> ``(B, H/p * W/p, D)``."""

    def __init__(self, patch_size: int = 16, in_channels: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """Plain ViT with a class token and LayerScale; timm state-dict names (see module docstring).

    Args:
        patch_size: patch size in pixels (16).
        in_channels: image channels (3 for RGB H&E).
        embed_dim, depth, num_heads, mlp_ratio: ViT-S/16 384/12/6/4, ViT-B/16 768/12/12/4,
            ViT-L/16 1024/24/16/4.
        layer_scale: LayerScale init value (1e-5 for UNI/DINOv2); ``None`` disables it.
        pretrain_img_size: image size the position embedding grid is stored for (224 -> 14x14).
        drop_path_rate: stochastic depth, linearly increasing to this value over the blocks.

    Used by :class:`ViTAdapter`, which runs the blocks itself; :meth:`forward` here returns the
    normalised tokens ``(B, 1 + N, D)`` for stand-alone use.
    """

    num_prefix_tokens = 1

    def __init__(
        self,
        patch_size: int = 16,
        in_channels: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        layer_scale: float | None = 1e-5,
        pretrain_img_size: int = 224,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.pretrain_grid = (pretrain_img_size // patch_size,) * 2
        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pretrain_grid[0] * self.pretrain_grid[1], embed_dim))
        rates = [drop_path_rate * i / (depth - 1) for i in range(depth)] if depth > 1 else [drop_path_rate]
        self.blocks = nn.ModuleList(
            ViTBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, layer_scale=layer_scale, drop_path=rate)
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if not self.pos_embed.is_meta:
            trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)
            self.apply(init_linear_trunc_normal)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """``(B, C, H, W)`` -> class token ``(B, 1, D)``, patch tokens ``(B, N, D)`` (position
        embedding added) and the token grid ``(H/p, W/p)``."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self.patch_embed(x)
        pos_embed = resample_abs_pos_embed(self.pos_embed, grid, self.pretrain_grid, self.num_prefix_tokens)
        cls = self.cls_token.expand(x.shape[0], -1, -1) + pos_embed[:, :1]
        return cls, tokens + pos_embed[:, 1:], grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls, tokens, _ = self.embed(x)
        x = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# ViT-Adapter, one level finer
# ---------------------------------------------------------------------------------------------


class SpatialPriorModule(nn.Module):
    """Convolutional stem giving the adapter its local spatial features.

    Layout (CellVTA, rebuilt): stem of 3 x [conv 3x3 + BN + ReLU] at ``channels``, then strided
    conv 3x3 + BN + ReLU to ``c1`` at 1/2 (``channels``), ``c2`` at 1/4 (``2 channels``), ``c3``
    at 1/8 and ``c4`` at 1/16 (both ``4 channels``); each projected 1x1 to ``embed_dim``.

    Shapes: ``(B, C_in, H, W)`` -> four maps ``(B, D, H/2^k, W/2^k)``, k = 1..4.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, embed_dim: int = 1024):
        super().__init__()
        self.stem = nn.Sequential(
            conv_bn_relu(2, in_channels, channels),
            conv_bn_relu(2, channels, channels),
            conv_bn_relu(2, channels, channels),
        )
        widths = (channels, channels, 2 * channels, 4 * channels, 4 * channels)
        self.convs = nn.ModuleList(conv_bn_relu(2, widths[i], widths[i + 1], stride=2) for i in range(4))
        self.projections = nn.ModuleList(nn.Conv2d(width, embed_dim, kernel_size=1) for width in widths[1:])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, maps = self.stem(x), []
        for conv, projection in zip(self.convs, self.projections):
            x = conv(x)
            maps.append(projection(x))
        return maps


class ConvFFN(nn.Module):
    """Feed-forward with a depthwise 3x3 conv on each scale's token map (ViT-Adapter).

    ``(B, N, D)`` tokens of several maps flattened and concatenated -> ``(B, N, D)``.
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        x = self.fc1(x)
        batch, _, channels = x.shape
        parts = []
        for part, (height, width) in zip(x.split([h * w for h, w in spatial_shapes], dim=1), spatial_shapes):
            part = self.dwconv(part.transpose(1, 2).reshape(batch, channels, height, width))
            parts.append(part.flatten(2).transpose(1, 2))
        x = self.drop(self.act(torch.cat(parts, dim=1)))
        return self.drop(self.fc2(x))


class Injector(nn.Module):
    """ViT tokens query the spatial features: ``x + gamma * MSDeformAttn(norm(x), norm(c))``."""

    def __init__(self, dim: int, n_levels: int, n_heads: int, n_points: int, ratio: float, init_values: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleDeformableAttention(dim, n_levels, n_heads, n_points, ratio)
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, query, reference_points, features, spatial_shapes):
        return query + self.gamma * self.attn(
            self.query_norm(query), reference_points, self.feat_norm(features), spatial_shapes
        )


class Extractor(nn.Module):
    """Spatial features query the ViT tokens (1 level), then a residual :class:`ConvFFN`."""

    def __init__(self, dim: int, n_heads: int, n_points: int, ratio: float, cffn_ratio: float, drop_path: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleDeformableAttention(dim, 1, n_heads, n_points, ratio)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, query, reference_points, features, vit_shape, query_shapes):
        query = query + self.attn(self.query_norm(query), reference_points, self.feat_norm(features), [vit_shape])
        return query + self.drop_path(self.ffn(self.ffn_norm(query), query_shapes))


class InteractionBlock(nn.Module):
    """Injector, a range of ViT blocks (run by :class:`ViTAdapter`), Extractor (+ extra extractors)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_points: int,
        ratio: float,
        init_values: float,
        cffn_ratio: float,
        drop_path: float,
        extra_extractors: int = 0,
    ):
        super().__init__()
        self.injector = Injector(dim, 3, n_heads, n_points, ratio, init_values)
        self.extractor = Extractor(dim, n_heads, n_points, ratio, cffn_ratio, drop_path)
        self.extra_extractors = nn.ModuleList(
            Extractor(dim, n_heads, n_points, ratio, cffn_ratio, drop_path) for _ in range(extra_extractors)
        )

    def extract(self, c, reference_points, tokens, vit_shape, c_shapes):
        for extractor in [self.extractor, *self.extra_extractors]:
            c = extractor(c, reference_points, tokens, vit_shape, c_shapes)
        return c


class ViTAdapter(nn.Module):
    """ViT + adapter producing four feature maps and the class token.

    Args:
        vit: the (usually frozen, pretrained) :class:`VisionTransformer`.
        in_channels: image channels.
        spm_channels: Spatial Prior Module width (64).
        deform_heads, deform_points, deform_ratio: multi-scale deformable attention (8, 4, 0.5).
        injector_init: Injector ``gamma`` init (1e-5).
        cffn_ratio: ConvFFN hidden width / D (0.25).
        interaction_indexes: inclusive ViT block ranges of the interaction blocks; default: the
            blocks split into 4 equal ranges (ViT-L: [0-5], [6-11], [12-17], [18-23]).
        extra_extractors: extra extractors in the last interaction block (2).
        drop_path_rate: stochastic depth of the extractors' ConvFFN (0.4).

    Shapes: ``(B, C, H, W)`` with ``H, W`` divisible by 16 ->
        ``[f1 (B, D, H/2, W/2), f2 (.., H/4, W/4), f3 (.., H/8, W/8), f4 (.., H/16, W/16)]`` and
        the normalised class token ``(B, D)``, where
        ``f1 = BN(ConvT2x2(c2) + c1 + up8(x1))``, ``f2 = BN(c2 + up4(x2))``,
        ``f3 = BN(c3 + up2(x3))``, ``f4 = BN(c4 + x4)`` (``x_i`` = ViT tokens after interaction
        ``i``, ``c_k`` = adapter features, ``up`` = bilinear).
    """

    def __init__(
        self,
        vit: VisionTransformer,
        in_channels: int = 3,
        spm_channels: int = 64,
        deform_heads: int = 8,
        deform_points: int = 4,
        deform_ratio: float = 0.5,
        injector_init: float = 1e-5,
        cffn_ratio: float = 0.25,
        interaction_indexes: Sequence[Sequence[int]] | None = None,
        extra_extractors: int = 2,
        drop_path_rate: float = 0.4,
    ):
        super().__init__()
        dim, depth = vit.embed_dim, len(vit.blocks)
        if interaction_indexes is None:
            if depth % 4:
                raise ValueError(
                    f"ViT depth {depth} does not split into 4 interaction blocks; give interaction_indexes"
                )
            interaction_indexes = [(i * depth // 4, (i + 1) * depth // 4 - 1) for i in range(4)]
        self.interaction_indexes = [tuple(int(i) for i in pair) for pair in interaction_indexes]
        self.vit = vit
        self.spm = SpatialPriorModule(in_channels, spm_channels, dim)
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        last = len(self.interaction_indexes) - 1
        self.interactions = nn.ModuleList(
            InteractionBlock(
                dim,
                deform_heads,
                deform_points,
                deform_ratio,
                injector_init,
                cffn_ratio,
                drop_path_rate,
                extra_extractors if i == last else 0,
            )
            for i in range(len(self.interaction_indexes))
        )
        self.up = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.norms = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(4))
        if not self.level_embed.is_meta:
            for module in [self.spm, self.interactions, self.up, self.norms]:
                module.apply(_init_adapter)
            for module in self.interactions.modules():
                if isinstance(module, MultiScaleDeformableAttention):
                    module.reset_parameters()
            nn.init.normal_(self.level_embed)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        batch = x.shape[0]
        c1, c2, c3, c4 = self.spm(x)
        c_shapes = [tuple(c.shape[-2:]) for c in (c2, c3, c4)]
        c = torch.cat([m.flatten(2).transpose(1, 2) + self.level_embed[i] for i, m in enumerate((c2, c3, c4))], dim=1)
        cls, tokens, vit_shape = self.vit.embed(x)
        vit_queries = grid_reference_points([vit_shape], x.device, x.dtype)
        c_queries = grid_reference_points(c_shapes, x.device, x.dtype)
        vit_maps = []
        for (first, last), interaction in zip(self.interaction_indexes, self.interactions):
            tokens = interaction.injector(tokens, vit_queries, c, c_shapes)
            sequence = torch.cat([cls, tokens], dim=1)
            for block in self.vit.blocks[first : last + 1]:
                sequence = block(sequence)
            cls, tokens = sequence[:, :1], sequence[:, 1:]
            c = interaction.extract(c, c_queries, tokens, vit_shape, c_shapes)
            vit_maps.append(tokens.transpose(1, 2).reshape(batch, -1, *vit_shape))
        c2, c3, c4 = (
            part.transpose(1, 2).reshape(batch, -1, *shape)
            for part, shape in zip(c.split([h * w for h, w in c_shapes], dim=1), c_shapes)
        )
        c1 = self.up(c2) + c1
        features = []
        for norm, level_map, vit_map in zip(self.norms, (c1, c2, c3, c4), vit_maps):
            if vit_map.shape[-2:] != level_map.shape[-2:]:
                vit_map = F.interpolate(vit_map, size=level_map.shape[-2:], mode="bilinear", align_corners=False)
            features.append(norm(level_map + vit_map))
        return features, self.vit.norm(cls)[:, 0]


def _init_adapter(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        init_linear_trunc_normal(module)
    elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
