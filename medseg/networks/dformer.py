"""D-Former: a U-shaped dilated transformer for 3D medical image segmentation.

Wu et al., "D-Former: a U-shaped Dilated Transformer for 3D medical image segmentation", Neural
Computing and Applications 35, 2023 (online 2022); the only public code is kkk55596/D-Former
(``model.py``, no training code). Built here on PyTorch/MONAI from the facts in
docs/architectures.md section 3, not from the authors' code:

- Patch embedding: Conv3d with kernel = stride = ``patch_size`` (2, 4, 4), 1 -> 96 channels,
  then LayerNorm (MONAI :class:`~monai.networks.blocks.PatchEmbed`). Token grid = D/2 x H/4 x W/4.
- Encoder: 4 stages of dims 96/192/384/768, depths (2, 2, 6, 2), heads (3, 6, 12, 24), MLP ratio
  4, qkv bias. Each stage starts with a PEG (CPVT positional encoding generator: depthwise
  Conv3d 3x3x3 + residual); patch merging 2x2x2 (concat 8C -> LN -> Linear 8C -> 2C, MONAI
  :class:`~monai.networks.nets.swin_unetr.PatchMergingV2`) after stages 1-3; LN on the bottleneck.
- Dilated transformer blocks (the shared pre-LN :class:`~medseg.networks.blocks.ViTBlock`, attention
  within groups of tokens, no relative position bias, no shifted windows) alternate: even blocks
  use LS-MSA (local scope: non-overlapping groups of ``group_size``
  (2, 8, 8) = 128 contiguous tokens), odd blocks GS-MSA (global scope: groups of the same 128
  tokens taken with stride ``grid / group_size``, i.e. dilated over the whole volume). See
  :func:`group_tokens`.
- Decoder (symmetric, Swin-Unet-like): :class:`PatchExpand` (Linear C -> 4C without bias,
  rearranged to 2x2x2 voxels of C/2, LN), then per stage: concat the encoder skip, Linear 2C -> C,
  PEG, dilated blocks (depths 6, 2, 2), PatchExpand; LN at the end; a final expansion
  (Linear C -> 32C, rearranged to ``patch_size`` voxels of C, LN) to full resolution and a 1x1x1
  conv without bias to the classes.

Linear layers start as in Swin (truncated normal, std 0.02; zero bias); convolutions keep
PyTorch's default initialisation.

Reference configuration (``references["paper"]``): input 64 x 128 x 128, 1 channel, 9 classes:
44,649,312 parameters (backbone 44,353,344 + final expansion and head), docs: 44.35M / 44.65M.

Unverified (the paper text was not reachable; from the reference notes):

- the paper's input size (likely 64 x 128 x 128, nnFormer's Synapse protocol), its ~44M
  parameters / ~54 GFLOPs and its Synapse (~88.8 DSC) and ACDC (~92.3) results;
- the upstream output head is hard-coded to 14 classes (nnFormer's Synapse setup);
- whether the skips are the encoder stage outputs (used here, before merging) or the stage
  inputs (Swin-Unet); the parameter count is the same either way;
- the deep-supervision heads: "heads for 96/192/384, 50.55M with all of them" matches exactly
  two extra heads, on the 384- and 192-dim decoder stages, besides the final 96-dim head, so that
  is what ``deep_supervision=True`` adds (each: expansion Linear C -> 32C + LN, 1x1x1 conv), at 1/2
  and 1/4 of the input per axis (``deep_supervision_scales``);
- the padding rule: upstream pads GS-MSA grids to the stage's "interval" (8, 4, 2, 1); here every
  grid is padded to a multiple of ``group_size`` (identical at the reference size, where no
  stage needs padding), with -1e6 added to the attention logits of padded keys;
- the whole-volume rule: upstream uses full attention when a stage's in-plane size is smaller
  than the group; here when the grid is smaller than the group on any axis (identical at the
  reference size: only stage 4, 4^3 tokens, is global).

Input-size rule: each spatial size must be divisible by ``patch_size * 2**3`` = (16, 32, 32) per
axis (patch embedding, then three 2x2x2 mergings that the decoder undoes exactly); otherwise
:class:`~medseg.errors.InputShapeError`. Within a stage, any grid works (padding + masking).
Axis order: ``patch_size`` and ``group_size`` apply to the input axes in order; the reference puts
the coarse slice axis first, ``(B, C, D, H, W)``. For medseg's ``(B, C, H, W, D)`` arrays, pass
``patch_size=(4, 4, 2)`` and ``group_size=(8, 8, 2)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import PatchEmbed
from monai.networks.nets.swin_unetr import PatchMergingV2
from torch import nn

from medseg.errors import ConfigError
from medseg.networks.base import NetworkOutput, SegmentationNetwork
from medseg.networks.blocks import ViTBlock, init_linear_trunc_normal
from medseg.networks.pretrained import state_dict_from_checkpoint
from medseg.networks.registry import register_network

#: additive attention logit for padded keys (as upstream); exp(-1e6) == 0 in float32
MASK_VALUE = -1e6


def group_layout(grid: Sequence[int], group_size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Padded grid and GS-MSA dilation of a stage, or ``None`` when the whole volume is one group.

    Args:
        grid: token grid ``(D, H, W)`` of the stage.
        group_size: tokens per group and axis ``(G_d, G_h, G_w)``.

    Returns:
        ``(padded_grid, dilation)`` with ``padded_grid`` the grid rounded up to multiples of
        ``group_size`` and ``dilation = padded_grid / group_size`` (the stride between the members
        of one GS-MSA group, which is also the number of LS-MSA groups per axis); ``None`` when the
        grid is smaller than the group on some axis (full attention over the volume).
    """
    if any(n < g for n, g in zip(grid, group_size)):
        return None
    padded = tuple(math.ceil(n / g) * g for n, g in zip(grid, group_size))
    return padded, tuple(p // g for p, g in zip(padded, group_size))


def group_tokens(x: torch.Tensor, group_size: Sequence[int], dilated: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Partition a token map into attention groups with reshapes/permutes only.

    Args:
        x: ``(B, D, H, W, C)`` channel-last token map.
        group_size: ``(G_d, G_h, G_w)``.
        dilated: ``False`` for LS-MSA (contiguous groups), ``True`` for GS-MSA (group members
            ``dilation`` apart, see :func:`group_layout`).

    Returns:
        ``(groups, mask)``: ``groups`` is ``(B * n_groups, G_d * G_h * G_w, C)`` (or
        ``(B, D * H * W, C)`` when the whole volume is one group); ``mask`` is ``None`` without
        padding, else an additive key mask ``(B * n_groups, 1, 1, N)`` holding 0 for real and
        :data:`MASK_VALUE` for padded tokens (broadcast over heads and queries). Every group holds
        at least one real token. Undo with :func:`ungroup_tokens`.
    """
    b, *grid, c = x.shape
    layout = group_layout(grid, group_size)
    if layout is None:
        return x.reshape(b, -1, c), None
    padded, _ = layout
    pads = [p - n for p, n in zip(padded, grid)]
    mask = None
    if any(pads):
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        real = F.pad(x.new_ones(1, *grid, 1), (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        real = _partition(real, group_size, dilated).squeeze(-1)  # (n_groups, N)
        additive = torch.zeros_like(real).masked_fill(real == 0, MASK_VALUE)
        mask = additive.repeat(b, 1)[:, None, None, :]
    return _partition(x, group_size, dilated), mask


def ungroup_tokens(groups: torch.Tensor, grid: Sequence[int], group_size: Sequence[int], dilated: bool) -> torch.Tensor:
    """Inverse of :func:`group_tokens`: ``(B * n_groups, N, C)`` -> ``(B, D, H, W, C)`` (padding dropped)."""
    layout = group_layout(grid, group_size)
    c = groups.shape[-1]
    if layout is None:
        return groups.reshape(-1, *grid, c)
    padded, dilation = layout
    gd, gh, gw = group_size
    id_, ih, iw = dilation
    if dilated:  # (B, Id, Ih, Iw, Gd, Gh, Gw, C) -> (B, Gd, Id, Gh, Ih, Gw, Iw, C)
        x = groups.reshape(-1, id_, ih, iw, gd, gh, gw, c).permute(0, 4, 1, 5, 2, 6, 3, 7)
    else:  # (B, Id, Ih, Iw, Gd, Gh, Gw, C) -> (B, Id, Gd, Ih, Gh, Iw, Gw, C)
        x = groups.reshape(-1, id_, ih, iw, gd, gh, gw, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    x = x.reshape(-1, *padded, c)
    return x[:, : grid[0], : grid[1], : grid[2]]


def _partition(x: torch.Tensor, group_size: Sequence[int], dilated: bool) -> torch.Tensor:
    """``(B, Dp, Hp, Wp, C)`` (multiples of ``group_size``) -> ``(B * n_groups, N, C)``."""
    b, dp, hp, wp, c = x.shape
    gd, gh, gw = group_size
    id_, ih, iw = dp // gd, hp // gh, wp // gw
    if dilated:  # position = member * dilation + group offset
        x = x.reshape(b, gd, id_, gh, ih, gw, iw, c).permute(0, 2, 4, 6, 1, 3, 5, 7)
    else:  # position = group * group_size + member
        x = x.reshape(b, id_, gd, ih, gh, iw, gw, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b * id_ * ih * iw, gd * gh * gw, c)


class DilatedTransformerBlock(ViTBlock):
    """Pre-LN transformer block with LS-MSA (``dilated=False``) or GS-MSA (``dilated=True``).

    ``(B, D, H, W, C) -> (B, D, H, W, C)``: ``x + MSA(LN(x))`` within the groups of
    :func:`group_tokens`, then ``x + MLP(LN(x))`` (GELU, ratio ``mlp_ratio``). The shared
    :class:`~medseg.networks.blocks.ViTBlock` (LayerNorm eps 1e-5, no LayerScale) with grouped
    token mixing; padded keys are masked additively.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        group_size: Sequence[int],
        dilated: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path, norm_eps=1e-5)
        self.group_size, self.dilated = tuple(group_size), dilated

    def mix_tokens(self, x: torch.Tensor) -> torch.Tensor:
        grid = x.shape[1:4]
        groups, mask = group_tokens(self.norm1(x), self.group_size, self.dilated)
        if mask is not None:
            mask = mask.to(groups.dtype)
        return ungroup_tokens(self.attn(groups, attn_mask=mask), grid, self.group_size, self.dilated)


class DFormerStage(nn.Module):
    """PEG (depthwise Conv3d 3x3x3 + residual) then ``depth`` blocks alternating LS/GS-MSA.

    ``(B, D, H, W, C) -> (B, D, H, W, C)``.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        group_size: Sequence[int],
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: Sequence[float],
    ):
        super().__init__()
        self.peg = nn.Conv3d(dim, dim, 3, padding=1, groups=dim)
        self.blocks = nn.ModuleList(
            [
                DilatedTransformerBlock(
                    dim,
                    num_heads,
                    group_size,
                    dilated=i % 2 == 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=drop_path[i],
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel_first = x.permute(0, 4, 1, 2, 3)
        x = (channel_first + self.peg(channel_first)).permute(0, 2, 3, 4, 1)
        for block in self.blocks:
            x = block(x)
        return x


class PatchExpand(nn.Module):
    """Linear C -> prod(scale) * C_out (no bias), rearranged to ``scale`` voxels of C_out, LN.

    ``(B, D, H, W, C) -> (B, D * s_d, H * s_h, W * s_w, C_out)``; Swin-Unet (Cao et al., ECCV-W
    2022) patch expanding, in 3D.
    """

    def __init__(self, dim: int, out_dim: int, scale: Sequence[int] = (2, 2, 2)):
        super().__init__()
        self.scale, self.out_dim = tuple(scale), out_dim
        self.expand = nn.Linear(dim, math.prod(self.scale) * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, _ = x.shape
        sd, sh, sw = self.scale
        x = self.expand(x).reshape(b, d, h, w, sd, sh, sw, self.out_dim)
        x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d * sd, h * sh, w * sw, self.out_dim)
        return self.norm(x)


def _paper(**overrides) -> dict:
    config = dict(
        spatial_dims=3,
        in_channels=1,
        out_channels=9,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        patch_size=(2, 4, 4),
        group_size=(2, 8, 8),
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.0,
        deep_supervision=False,
    )
    return {**config, **overrides}


REFERENCES = {
    # input 64 x 128 x 128, Synapse-style 9 classes (8 organs + background): 44.65M
    "paper": _paper(),
    # with the deep-supervision heads: 50.55M
    "paper_ds": _paper(deep_supervision=True),
    # small configuration used only by the tests: at 32^3 input the token grid is 16 x 8 x 8,
    # so stage 1 pads 8 -> 9 (masking), stage 2 pads 4 -> 6, stages 3-4 are global
    "tiny": _paper(
        out_channels=3,
        embed_dim=8,
        depths=(2, 2, 2, 1),
        num_heads=(1, 2, 2, 4),
        group_size=(2, 3, 3),
        deep_supervision=True,
    ),
}

#: renames for medseg D-Former checkpoints written before the blocks moved to
#: :class:`~medseg.networks.blocks.ViTBlock` (MONAI SABlock/MLPBlock parameter names)
_LEGACY_KEYS = ((".attn.out_proj.", ".attn.proj."), (".mlp.linear1.", ".mlp.fc1."), (".mlp.linear2.", ".mlp.fc2."))


@register_network(
    "dformer", references=REFERENCES, description="D-Former: dilated transformer U-Net with LS/GS-MSA and PEG (3D)"
)
class DFormer(SegmentationNetwork):
    """D-Former (3D): dilated-transformer encoder-decoder with LS/GS-MSA and PEG.

    Args:
        spatial_dims: must be 3.
        in_channels, out_channels: input channels and classes (background included).
        embed_dim: channels of the first stage (doubling per stage).
        depths: dilated blocks per encoder stage; decoder stages mirror stages 3..1.
        num_heads: attention heads per stage.
        patch_size: patch-embedding kernel = stride per axis.
        group_size: tokens per attention group and axis.
        mlp_ratio: MLP hidden size / dim.
        qkv_bias: bias on the qkv projection.
        drop_path_rate: stochastic depth, rising linearly over the encoder blocks (decoder stages
            reuse their encoder stage's rates); 0 in the reference.
        deep_supervision: add the heads on the two coarser decoder stages (see the module notes).

    Shapes: ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)`` with ``D, H, W``
    divisible by ``patch_size * 8`` per axis, else :class:`~medseg.errors.InputShapeError`.
    ``forward(x, features=True)`` gives a :class:`NetworkOutput`: ``encoder`` = the 4 stage
    outputs ``(B, embed_dim * 2**s, grid / 2**s)``, finest first (the last after the bottleneck
    LN); ``decoder`` = the 3 decoder stage outputs (coarsest first; the finest after the final LN)
    and the full-resolution expansion ``(B, embed_dim, D, H, W)``; ``deep_supervision`` (with
    ``deep_supervision=True``) = ``(B, K, D/2, H/2, W/2)`` and ``(B, K, D/4, H/4, W/4)``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 9,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        patch_size: Sequence[int] = (2, 4, 4),
        group_size: Sequence[int] = (2, 8, 8),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        deep_supervision: bool = False,
    ):
        super().__init__()
        if spatial_dims != 3:
            raise ConfigError("dformer: only spatial_dims=3 is implemented (D-Former is a 3D network)")
        depths, num_heads = [int(d) for d in depths], [int(h) for h in num_heads]
        patch_size, group_size = tuple(int(p) for p in patch_size), tuple(int(g) for g in group_size)
        if len(depths) != len(num_heads) or len(depths) < 2:
            raise ConfigError("dformer: depths and num_heads need the same number (>= 2) of stages")
        if len(patch_size) != 3 or len(group_size) != 3:
            raise ConfigError("dformer: patch_size and group_size need 3 entries")
        dims = [embed_dim * 2**s for s in range(len(depths))]
        if any(d % h for d, h in zip(dims, num_heads)):
            raise ConfigError(f"dformer: stage dims {dims} must be divisible by num_heads {num_heads}")
        stages = len(depths)
        self.spatial_dims, self.in_channels, self.out_channels = 3, in_channels, out_channels
        self.input_divisor = tuple(p * 2 ** (stages - 1) for p in patch_size)
        self.deep_supervision = deep_supervision
        # heads on the decoder stages above the finest: 1/2, 1/4 ... of the input, finest first
        self.deep_supervision_scales = (
            tuple((1.0 / 2**s,) * 3 for s in range(1, stages - 1)) if deep_supervision else ()
        )
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear, as Swin
        stage_rates = [rates[sum(depths[:s]) : sum(depths[: s + 1])] for s in range(stages)]

        def stage(s: int) -> DFormerStage:
            return DFormerStage(dims[s], depths[s], num_heads[s], group_size, mlp_ratio, qkv_bias, stage_rates[s])

        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim, nn.LayerNorm, spatial_dims=3)
        self.encoder = nn.ModuleList([stage(s) for s in range(stages)])
        self.merges = nn.ModuleList([PatchMergingV2(dims[s], spatial_dims=3) for s in range(stages - 1)])
        self.encoder_norm = nn.LayerNorm(dims[-1])
        levels = list(range(stages - 2, -1, -1))  # decoder stages, coarsest first
        self.expands = nn.ModuleList([PatchExpand(dims[s + 1], dims[s]) for s in levels])
        self.skip_fusions = nn.ModuleList([nn.Linear(2 * dims[s], dims[s]) for s in levels])
        self.decoder = nn.ModuleList([stage(s) for s in levels])
        self.decoder_norm = nn.LayerNorm(dims[0])
        self.final_expand = PatchExpand(dims[0], dims[0], patch_size)
        self.head = nn.Conv3d(dims[0], out_channels, 1, bias=False)
        # deep supervision on the decoder stages above the finest (finest first)
        ds_levels = levels[-2::-1] if deep_supervision else []
        self.deep_supervision_expands = nn.ModuleList([PatchExpand(dims[s], dims[s], patch_size) for s in ds_levels])
        self.deep_supervision_heads = nn.ModuleList(
            [nn.Conv3d(dims[s], out_channels, 1, bias=False) for s in ds_levels]
        )
        self.apply(init_linear_trunc_normal)  # Swin/Swin-Unet: trunc-normal (std 0.02) Linear weights, zero biases

    def forward_features(self, x: torch.Tensor) -> NetworkOutput:
        x = self.patch_embed(x).permute(0, 2, 3, 4, 1)  # (B, D, H, W, C)
        skips = []
        for s, stage in enumerate(self.encoder):
            x = stage(x)
            if s < len(self.merges):
                skips.append(x)
                x = self.merges[s](x)
        x = self.encoder_norm(x)
        encoder = [*skips, x]
        decoder = []
        for expand, fuse, stage, skip in zip(self.expands, self.skip_fusions, self.decoder, reversed(skips)):
            x = stage(fuse(torch.cat((expand(x), skip), dim=-1)))
            decoder.append(x)
        decoder[-1] = x = self.decoder_norm(x)
        full = self.final_expand(x)
        logits = self.head(full.permute(0, 4, 1, 2, 3))
        # finest first: decoder[-2] (second finest) first
        deep_supervision = [
            head(expand(feature).permute(0, 4, 1, 2, 3))
            for expand, head, feature in zip(
                self.deep_supervision_expands, self.deep_supervision_heads, decoder[-2::-1]
            )
        ]
        maps = [f.permute(0, 4, 1, 2, 3) for f in [*decoder, full]]
        return NetworkOutput(
            logits=logits,
            decoder=maps,
            encoder=[f.permute(0, 4, 1, 2, 3) for f in encoder],
            deep_supervision=deep_supervision,
        )

    def pretrained_state_dict(self, checkpoint: Any, source: str, **options: Any) -> dict[str, torch.Tensor]:
        """A medseg D-Former state dict (``torch.save(net.state_dict())``, a bundle's
        ``models/model.pt``, or ``{'state_dict': ...}``), read by :meth:`load_pretrained`; no
        upstream D-Former weights were published. Checkpoints with the older MONAI block names
        (``attn.out_proj``, ``mlp.linear1/2``) are renamed.

        Raises:
            PretrainedWeightsError: no tensors (or, from the loader, a shape mismatch).
        """
        if options:
            raise TypeError(f"DFormer.load_pretrained: unknown options {sorted(options)}")
        state = state_dict_from_checkpoint(checkpoint, source)
        for old, new in _LEGACY_KEYS:
            state = {k.replace(old, new): v for k, v in state.items()}
        return state
