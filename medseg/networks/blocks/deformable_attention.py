"""Multi-scale deformable attention in pure PyTorch (``grid_sample``), no custom CUDA op.

Zhu et al., "Deformable DETR: Deformable Transformers for End-to-End Object Detection", ICLR 2021,
Eq. (3): every query attends to ``n_points`` sampling locations per head and per feature level,
placed at learned offsets around its reference point, and sums the bilinearly sampled values with
softmax-normalised learned weights:

    MSDeformAttn(z_q, p_q, {x_l}) = sum_m W_m [ sum_l sum_k A_mlqk * W'_m x_l(phi_l(p_q) + dp_mlqk) ]

The authors ship a CUDA kernel; :func:`multi_scale_deformable_attention` computes the same sum with
one ``torch.nn.functional.grid_sample`` call per level (bilinear, zero padding,
``align_corners=False``), so it runs on CPU, CUDA and MPS and is differentiable everywhere. Value
projection to ``ratio * d_model`` channels follows ViT-Adapter (Chen et al., ICLR 2023).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinearly sampled values (the core of Deformable DETR's attention).

    Args:
        value: ``(B, S, M, D)`` per-head values of all levels, flattened row-major per level and
            concatenated (``S = sum(H_l * W_l)``), ``M`` heads of ``D`` channels.
        spatial_shapes: ``[(H_l, W_l), ...]`` of the ``L`` levels, in the order of ``value``.
        sampling_locations: ``(B, Q, M, L, P, 2)`` sampling points as ``(x, y)`` normalised to
            ``[0, 1]`` over each level's extent (0 = left/top edge, 1 = right/bottom edge).
        attention_weights: ``(B, Q, M, L, P)`` weights (already softmax-normalised over ``L * P``).

    Returns:
        ``(B, Q, M * D)``. Points outside a level contribute zero (zero padding).
    """
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    if sum(sizes) != value.shape[1]:
        raise ValueError(f"value has {value.shape[1]} tokens but spatial_shapes sum to {sum(sizes)}")
    # sample in the wider of the two dtypes (bf16 sampling positions would be off by ~0.1 px)
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    value, attention_weights = value.to(dtype), attention_weights.to(dtype)
    grids = 2.0 * sampling_locations.to(dtype) - 1.0  # grid_sample wants [-1, 1]
    sampled = []
    for level, (tokens, (height, width)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes)):
        # (B, H*W, M, D) -> (B*M, D, H, W)
        level_value = tokens.permute(0, 2, 3, 1).reshape(batch * heads, channels, int(height), int(width))
        # (B, Q, M, P, 2) -> (B*M, Q, P, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B*M, D, Q, P)
    # (B, Q, M, L, P) -> (B*M, 1, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (B*M, D, Q)
    return output.view(batch, heads * channels, queries).transpose(1, 2).contiguous()


def grid_reference_points(
    spatial_shapes: Sequence[tuple[int, int]], device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Pixel centres of every level, normalised to ``[0, 1]`` as ``(x, y)``: ``(1, sum(H*W), 1, 2)``.

    Used as the reference point of each query token (one per position, shared by all levels).
    """
    points = []
    for height, width in spatial_shapes:
        y, x = torch.meshgrid(
            (torch.arange(int(height), device=device, dtype=dtype) + 0.5) / int(height),
            (torch.arange(int(width), device=device, dtype=dtype) + 0.5) / int(width),
            indexing="ij",
        )
        points.append(torch.stack((x.reshape(-1), y.reshape(-1)), dim=-1))
    return torch.cat(points, dim=0)[None, :, None]


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR, with ViT-Adapter's value ratio).

    Args:
        d_model: query and input channels ``C``.
        n_levels: number of feature levels ``L`` the queries sample from.
        n_heads: attention heads ``M``; ``int(d_model * ratio)`` must be divisible by it.
        n_points: sampling points ``P`` per head and level.
        ratio: value channels = ``int(d_model * ratio)`` (0.5 in ViT-Adapter/CellVTA).

    Shapes:
        ``query (B, Q, C)``, ``reference_points (B or 1, Q, 1 or L, 2)`` normalised ``(x, y)``,
        ``features (B, S, C)`` with ``S = sum(H_l * W_l)`` -> ``(B, Q, C)``.

    Initialisation follows the paper: zero offset weights with biases spreading each head's points
    radially (head ``m`` at angle ``2 pi m / M``, point ``k`` at distance ``k + 1`` pixels), zero
    attention-weight projection (uniform weights), Xavier value/output projections.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, ratio: float = 1.0):
        super().__init__()
        value_channels = int(d_model * ratio)
        if value_channels % n_heads:
            raise ValueError(f"value channels {value_channels} not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, value_channels)
        self.output_proj = nn.Linear(value_channels, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.sampling_offsets.weight.is_meta:
            return
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        features: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        batch, queries, _ = query.shape
        if len(spatial_shapes) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} levels, got {len(spatial_shapes)}")
        value = self.value_proj(features).view(batch, features.shape[1], self.n_heads, -1)
        offsets = self.sampling_offsets(query).view(batch, queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(batch, queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(batch, queries, self.n_heads, self.n_levels, self.n_points)
        # offsets are in pixels of each level: normalise by (W_l, H_l)
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        output = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        return self.output_proj(output)
