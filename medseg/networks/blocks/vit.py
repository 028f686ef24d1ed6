"""The one pre-norm transformer (ViT) block of medseg, with timm's module and parameter names.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021 (pre-LN encoder block, section 3.1, Eq. 2-3), with optional LayerScale (Touvron et al.,
"Going deeper with Image Transformers" (CaiT), ICCV 2021, section 2.1) and stochastic depth.

Parameter names are timm's ``VisionTransformer`` block names --
``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1.gamma``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``,
``ls2.gamma`` -- so timm / DINOv2 / UNI state dicts load without renaming, and the parameter count of
a block is the same as timm's (qkv bias, projection bias, MLP biases, two LayerNorms, optional two
LayerScale vectors): ``4 D^2 + 4 D + 2 D M + M + D + 4 D (+ 2 D)`` for width ``D`` and MLP ``M``.

Why not ``timm.layers`` itself: timm 1.0.31 imports torchvision when the package is imported
(``timm.layers.create_norm`` imports ``torchvision.ops.misc``), so it needs a torchvision built for
the installed torch. The only torchvision 0.28.0 wheel available for torch 2.13.0 here is the
PyPI Linux build, which is a CUDA build: importing it next to ``torch 2.13.0+cpu`` fails with
``RuntimeError: operator torchvision::nms does not exist``. The pieces here are written from the
papers with the same names and semantics as ``timm.layers.Attention`` / ``Mlp`` / ``LayerScale`` /
``Block``, so a later switch to timm keeps every state dict and parameter count.

Users: TransUNet 2D/3D (through :class:`~medseg.networks.blocks.token_bottleneck.TokenBottleneck`),
D-Former (grouped attention, :class:`~medseg.networks.dformer.DilatedTransformerBlock`) and the
CellVTA ViT encoder (:class:`~medseg.networks.vit_adapter.VisionTransformer`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath, trunc_normal_
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm ``Attention`` names).

    ``qkv`` rows are ``[q | k | v]``, each split heads-major into ``num_heads`` x ``D / num_heads``.
    Computed with :func:`torch.nn.functional.scaled_dot_product_attention` (scale
    ``(D / num_heads) ** -0.5``).

    Args:
        dim: token width ``D``; divisible by ``num_heads``.
        num_heads: attention heads.
        qkv_bias: bias on ``qkv``.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection ``proj``.

    Shapes: ``x (B, N, D)`` and an optional ``attn_mask`` broadcastable to ``(B, heads, N, N)``
    (additive float, or boolean with True = attend) -> ``(B, N, D)``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = float(attn_drop)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, tokens, dim)))


class Mlp(nn.Module):
    """``fc1`` -> GELU -> dropout -> ``fc2`` -> dropout (timm ``Mlp`` names). ``(B, N, D)`` -> ``(B, N, D)``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel residual scale ``x * gamma`` (CaiT), ``gamma`` initialised to ``init_values``."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ViTBlock(nn.Module):
    """Pre-LN transformer block: ``x + dp(ls1(attn(norm1(x))))`` then ``x + dp(ls2(mlp(norm2(x))))``.

    Args:
        dim: token width ``D``.
        num_heads: attention heads.
        mlp_dim: MLP hidden width (default ``int(dim * mlp_ratio)``).
        mlp_ratio: MLP hidden width / ``dim`` when ``mlp_dim`` is not given (4).
        qkv_bias: bias on the ``qkv`` projection.
        layer_scale: LayerScale init value (e.g. 1e-5 for DINOv2/UNI and 3D TransUNet); ``None`` or 0
            disables it (``ls1``/``ls2`` are then identities without parameters).
        drop_path: stochastic-depth rate of both residual branches.
        mlp_drop: dropout inside the MLP (after the activation and after ``fc2``).
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the attention output projection. TransUNet keeps this apart from
            ``mlp_drop`` (attention dropout 0, MLP dropout 0.1), timm's ``Block`` ties them.
        norm_eps: LayerNorm epsilon (1e-6 for ViT/TransUNet/DINOv2, PyTorch's 1e-5 for Swin-style nets).

    Shapes: ``(B, N, D)`` (+ optional ``attn_mask``, see :class:`Attention`) -> ``(B, N, D)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layer_scale: float | None = None,
        drop_path: float = 0.0,
        mlp_drop: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        hidden = int(mlp_dim) if mlp_dim is not None else int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden, drop=mlp_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def mix_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The attention branch before LayerScale/drop-path: ``attn(norm1(x))``. Subclasses that
        attend within groups of tokens (D-Former) override this only."""
        return self.attn(self.norm1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.mix_tokens(x)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def init_linear_trunc_normal(module: nn.Module, std: float = 0.02) -> None:
    """ViT/Swin initialisation for ``module.apply``: truncated-normal (std 0.02) ``nn.Linear``
    weights and zero biases; other modules are left alone. No-op on the ``meta`` device."""
    if isinstance(module, nn.Linear) and not module.weight.is_meta:
        trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
