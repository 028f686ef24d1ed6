"""TransUNet (2D): R50-ViT-B/16 hybrid encoder with a cascaded upsampler (CUP) decoder.

Chen et al., "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation",
arXiv:2102.04306, 2021. Built from the architecture reference (docs/architectures.md section 1) on
MONAI blocks (``SABlock``, ``MLPBlock``, ``Convolution``); no upstream code is copied.

Encoder (input ``(B, C, H, W)``, H and W divisible by 16):

- BiT-style ResNet-50 v2 truncated to 3 stages, units ``(3, 4, 9)``, width 64: weight-standardised
  convolutions (:class:`StdConv2d`), ``GroupNorm(32, eps=1e-6)``. Root: 7x7 stride-2 conv + GN + ReLU
  (H/2, 64 ch), 3x3 stride-2 max-pool **without padding** (so H/4 - 1 pixels; the skip copy is
  zero-padded on the bottom/right back to H/4, as upstream), then stages of 256 ch (H/4), 512 ch
  (H/8, stride 2) and 1024 ch (H/16, stride 2).
- Hybrid patch embedding: 1x1 conv 1024 -> 768 on the H/16 map (= 16x16 px patches), learned
  position embedding for ``(img_size/16)**2`` tokens (bilinearly resized for other input sizes),
  no class token, dropout.
- ViT-B: 12 pre-LN blocks (LayerNorm eps 1e-6), 12 heads, MLP 3072 (GELU), final LayerNorm.

Decoder (CUP): tokens -> ``(B, 768, H/16, W/16)`` -> ``conv_more`` 3x3 768 -> 512 + BN + ReLU; four
blocks each bilinear x2 (align_corners=True) -> concat skip -> 2 x (3x3 conv + BN + ReLU), out
channels ``(256, 128, 64, 16)``, skips ``(512, 256, 64, 0)`` ch (``n_skip=3``); head 3x3 conv
16 -> K at full resolution.

A one-channel input is repeated to three channels (so ImageNet weights fit the root conv), as
upstream. Reference (224x224, in 1, 9 classes): 105,277,081 parameters.

Taps (:class:`~medseg.networks.base.NetworkOutput`), for input ``H x W``:

- ``decoder`` (coarsest first): ``conv_more`` output (512 ch, H/16) then the four CUP block outputs
  (256 ch H/8, 128 ch H/4, 64 ch H/2, 16 ch H).
- ``encoder`` (finest first): root (64 ch, H/2), stage 1 (256 ch, H/4, padded), stage 2 (512 ch,
  H/8), stage 3 (1024 ch, H/16), ViT output reshaped to a map (768 ch, H/16).
- ``deep_supervision``: none (TransUNet has no native deep-supervision heads).

Pretrained weights: :meth:`TransUNet.load_pretrained` reads Google's ImageNet-21k
``R50+ViT-B_16.npz`` (JAX/Flax key names, HWIO conv kernels); :func:`transunet_to_npz` is the
inverse mapping (used to write files in that format).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock, SABlock
from monai.networks.blocks.convolutions import Convolution
from torch import nn

from medseg.errors import ConfigError, PretrainedWeightsError
from medseg.networks.base import NetworkOutput, SegmentationNetwork
from medseg.networks.pretrained import load_state_dict_report
from medseg.networks.registry import register_network

GN_EPS = 1e-6
LN_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# Shared ViT pieces (also used by the 3D TransUNet)
# --------------------------------------------------------------------------------------------
class ViTBlock(nn.Module):
    """Pre-LN transformer encoder block (Dosovitskiy et al., ICLR 2021) on MONAI's SABlock/MLPBlock.

    ``x + g1 * attn(LN(x))`` then ``x + g2 * mlp(LN(x))``, where ``g1``/``g2`` are LayerScale
    vectors (Touvron et al., "Going deeper with image transformers", ICCV 2021) when
    ``layer_scale`` is given, else 1. Attention/projection dropout ``attention_dropout_rate``; MLP
    dropout ``dropout_rate``. Shapes: ``(B, N, hidden_size)`` -> same.
    """

    def __init__(self, hidden_size: int, mlp_dim: int, num_heads: int, dropout_rate: float = 0.0,
                 attention_dropout_rate: float = 0.0, layer_scale: float | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=LN_EPS)
        self.attn = SABlock(hidden_size, num_heads, attention_dropout_rate, qkv_bias=True,
                            use_flash_attention=True)
        self.norm2 = nn.LayerNorm(hidden_size, eps=LN_EPS)
        self.mlp = MLPBlock(hidden_size, mlp_dim, dropout_rate)
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((hidden_size,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((hidden_size,), float(layer_scale)))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.norm1(x))
        x = x + (y if self.gamma1 is None else self.gamma1 * y)
        y = self.mlp(self.norm2(x))
        return x + (y if self.gamma2 is None else self.gamma2 * y)


class ViTEncoder(nn.Module):
    """Stack of :class:`ViTBlock` plus the final LayerNorm. ``(B, N, D)`` -> ``(B, N, D)``."""

    def __init__(self, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12, mlp_dim: int = 3072,
                 dropout_rate: float = 0.1, attention_dropout_rate: float = 0.0, layer_scale: float | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(
            ViTBlock(hidden_size, mlp_dim, num_heads, dropout_rate, attention_dropout_rate, layer_scale)
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def resize_position_embedding(pos: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """Resize a learned position embedding ``(1, prod(old_grid), D)`` to ``(1, prod(new_grid), D)``.

    Linear interpolation over the token grid (bilinear in 2D, trilinear in 3D, align_corners=False),
    as for ViT fine-tuning at a new resolution (Dosovitskiy et al. 2021, section 3.2).
    """
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    if old_grid == new_grid:
        return pos
    dim = pos.shape[-1]
    grid = pos.reshape(1, *old_grid, dim).movedim(-1, 1)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(old_grid)]
    grid = F.interpolate(grid.float(), size=new_grid, mode=mode, align_corners=False).to(pos.dtype)
    return grid.movedim(1, -1).reshape(1, -1, dim)


# --------------------------------------------------------------------------------------------
# BiT ResNet-50 v2 (3 stages) with weight standardisation and GroupNorm
# --------------------------------------------------------------------------------------------
class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (Qiao et al., arXiv:1903.10520; Kolesnikov et al., BiT).

    The kernel of each output channel is normalised to zero mean and unit variance (population
    variance, eps 1e-5) before the convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        weight = (self.weight - mean) / torch.sqrt(var + 1e-5)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BottleneckUnit(nn.Module):
    """BiT bottleneck unit: 1x1 -> GN -> ReLU -> 3x3 (stride) -> GN -> ReLU -> 1x1 -> GN, plus the
    identity or a projection (1x1 StdConv + ``GroupNorm(cout, cout)``), ReLU after the sum.
    ``(B, cin, H, W)`` -> ``(B, cout, H/stride, W/stride)``."""

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1):
        super().__init__()
        self.conv1 = StdConv2d(cin, cmid, 1, bias=False)
        self.gn1 = nn.GroupNorm(32, cmid, eps=GN_EPS)
        self.conv2 = StdConv2d(cmid, cmid, 3, stride=stride, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(32, cmid, eps=GN_EPS)
        self.conv3 = StdConv2d(cmid, cout, 1, bias=False)
        self.gn3 = nn.GroupNorm(32, cout, eps=GN_EPS)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.conv_proj = StdConv2d(cin, cout, 1, stride=stride, bias=False)
            self.gn_proj = nn.GroupNorm(cout, cout)
        else:
            self.conv_proj = self.gn_proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.conv_proj is None else self.gn_proj(self.conv_proj(x))
        y = self.relu(self.gn1(self.conv1(x)))
        y = self.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return self.relu(residual + y)


class ResNetV2Encoder(nn.Module):
    """The CNN half of the R50-ViT hybrid: root + ``len(units)`` stages (BiT ResNet-50 v2 layout).

    Stage ``s`` (0-based) outputs ``4 * width * 2**s`` channels; stage 0 keeps the H/4 resolution
    of the max-pool, later stages halve it. ``(B, C, H, W)`` -> list of features finest first:
    root (H/2), stage 0 (H/4, zero-padded from H/4 - 1), stage 1 (H/8), ... .
    """

    def __init__(self, in_channels: int = 3, units: Sequence[int] = (3, 4, 9), width: int = 64):
        super().__init__()
        self.root_conv = StdConv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.root_gn = nn.GroupNorm(32, width, eps=GN_EPS)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0)
        self.stages = nn.ModuleList()
        cin = width
        for s, n in enumerate(units):
            cout, cmid = 4 * width * 2 ** s, width * 2 ** s
            self.stages.append(nn.ModuleList(
                BottleneckUnit(cin if u == 0 else cout, cout, cmid, stride=2 if (u == 0 and s > 0) else 1)
                for u in range(n)))
            cin = cout
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = x.shape[-2:]
        root = F.relu(self.root_gn(self.root_conv(x)))
        features = [root]
        y = self.pool(root)
        for s, stage in enumerate(self.stages):
            for unit in stage:
                y = unit(y)
            expected = [d // (4 * 2 ** s) for d in size]
            pad = [expected[1] - y.shape[-1], expected[0] - y.shape[-2]]
            # upstream quirk: the pad-0 max-pool loses a row/column; only the skip copy is padded
            features.append(F.pad(y, (0, pad[0], 0, pad[1])) if any(pad) else y)
        return features


# --------------------------------------------------------------------------------------------
# TransUNet
# --------------------------------------------------------------------------------------------
def _conv_bn_relu(cin: int, cout: int) -> Convolution:
    return Convolution(2, cin, cout, kernel_size=3, act="relu", norm="batch", bias=False)


class CUPBlock(nn.Module):
    """Cascaded-upsampler block: bilinear x2 (align_corners) -> concat skip -> 2 x (conv3x3+BN+ReLU)."""

    def __init__(self, cin: int, cout: int, skip: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv1 = _conv_bn_relu(cin + skip, cout)
        self.conv2 = _conv_bn_relu(cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class TransUNet(SegmentationNetwork):
    """TransUNet R50-ViT hybrid (2D). See the module docstring for the layout and taps.

    Args:
        spatial_dims: must be 2.
        in_channels: input channels; 1 is repeated to 3 (upstream behaviour), so the root conv has
            3 input channels for 1 or 3, else ``in_channels``.
        out_channels: classes K (background included).
        img_size: reference input size (pixels); sizes the position embedding to
            ``(img_size/16)**2`` tokens. Other input sizes work (interpolated position embedding).
        resnet_units, resnet_width: BiT ResNet stages (``(3, 4, 9)``, 64 for R50).
        hidden_size, num_layers, num_heads, mlp_dim: ViT (ViT-B: 768, 12, 12, 3072).
        dropout_rate: embedding and MLP dropout (0.1); attention_dropout_rate: attention (0).
        head_channels: ``conv_more`` output channels (512).
        decoder_channels: CUP block outputs (``(256, 128, 64, 16)``).
        n_skip: number of CNN skips used, from the coarsest (3: H/8, H/4, H/2).
        freeze_encoder: set ``requires_grad=False`` on the ResNet, the patch/position embedding
            and the ViT (fine-tune only the decoder).

    Shapes: ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``, H, W divisible by 16.

    Raises:
        ConfigError: inconsistent configuration.
        InputShapeError: wrong input channels/dimensions/sizes (at call time).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 9, img_size: int = 224,
                 resnet_units: Sequence[int] = (3, 4, 9), resnet_width: int = 64, hidden_size: int = 768,
                 num_layers: int = 12, num_heads: int = 12, mlp_dim: int = 3072, dropout_rate: float = 0.1,
                 attention_dropout_rate: float = 0.0, head_channels: int = 512,
                 decoder_channels: Sequence[int] = (256, 128, 64, 16), n_skip: int = 3, freeze_encoder: bool = False):
        super().__init__()
        if spatial_dims != 2:
            raise ConfigError(f"transunet is 2D (spatial_dims=2), got spatial_dims={spatial_dims}")
        if len(resnet_units) != 3 or len(decoder_channels) != 4 or not 0 <= n_skip <= 3:
            raise ConfigError("transunet needs 3 resnet stages, 4 decoder channels and n_skip in 0..3")
        if img_size % 16:
            raise ConfigError(f"transunet img_size must be divisible by 16, got {img_size}")
        self.spatial_dims, self.in_channels, self.out_channels = 2, in_channels, out_channels
        self.input_divisor = (16, 16)
        self.grid = (img_size // 16, img_size // 16)
        self.repeat_input = in_channels == 1
        self.resnet = ResNetV2Encoder(3 if in_channels == 1 else in_channels, resnet_units, resnet_width)
        self.patch_embed = nn.Conv2d(self.resnet.out_channels, hidden_size, kernel_size=1)
        self.pos_embedding = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], hidden_size))
        self.embed_dropout = nn.Dropout(dropout_rate)
        self.vit = ViTEncoder(hidden_size, num_layers, num_heads, mlp_dim, dropout_rate, attention_dropout_rate)
        self.conv_more = _conv_bn_relu(hidden_size, head_channels)
        # CNN skips coarsest first: stage 1 (H/8), stage 0 (H/4), root (H/2); the last block has none
        skip_channels = [4 * resnet_width * 2, 4 * resnet_width, resnet_width, 0]
        skip_channels = [c if i < n_skip else 0 for i, c in enumerate(skip_channels)]
        self.n_skip = n_skip
        cins = [head_channels, *decoder_channels[:-1]]
        self.decoder_blocks = nn.ModuleList(
            CUPBlock(cin, cout, skip) for cin, cout, skip in zip(cins, decoder_channels, skip_channels))
        self.head = nn.Conv2d(decoder_channels[-1], out_channels, kernel_size=3, padding=1)
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        if freeze_encoder:
            for module in (self.resnet, self.patch_embed, self.vit):
                module.requires_grad_(False)
            self.pos_embedding.requires_grad_(False)

    def forward_features(self, x: torch.Tensor) -> NetworkOutput:
        if self.repeat_input:
            x = x.repeat(1, 3, 1, 1)
        cnn = self.resnet(x)  # root, stage0, stage1, stage2 (finest first)
        tokens = self.patch_embed(cnn[-1])
        grid = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        tokens = self.embed_dropout(tokens + resize_position_embedding(self.pos_embedding, self.grid, grid))
        tokens = self.vit(tokens)
        vit_map = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
        y = self.conv_more(vit_map)
        decoder = [y]
        skips = cnn[-2::-1]  # stage1 (H/8), stage0 (H/4), root (H/2)
        for i, block in enumerate(self.decoder_blocks):
            y = block(y, skips[i] if i < self.n_skip else None)
            decoder.append(y)
        return NetworkOutput(logits=self.head(y), decoder=decoder, encoder=[*cnn, vit_map])

    def load_pretrained(self, path: str | os.PathLike) -> dict[str, list[str]]:
        """Load Google's ImageNet-21k ``R50+ViT-B_16.npz`` (or any npz with the same key names).

        The ResNet, patch embedding, position embedding (class-token slot dropped, grid resized
        bilinearly if it differs) and ViT blocks are loaded; the decoder and head keep their
        initialisation (reported as missing). Keys not used (``cls``, ``head/*``, ``pre_logits/*``)
        are reported as unexpected.

        Raises:
            PretrainedWeightsError: the file cannot be read as npz, or a tensor's shape does not
                fit (e.g. ``in_channels`` other than 1 or 3 against an RGB root conv).
        """
        try:
            with np.load(path) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as error:
            raise PretrainedWeightsError(f"{os.fspath(path)}: not a readable npz file ({error})") from None
        state = transunet_state_from_npz(self, arrays)
        return load_state_dict_report(self, state, source=os.fspath(path))


# --------------------------------------------------------------------------------------------
# Google npz (JAX/Flax) <-> torch mapping
# --------------------------------------------------------------------------------------------
def _conv_from_hwio(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(3, 2, 0, 1)))


def _conv_to_hwio(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().float().numpy().transpose(2, 3, 1, 0))


def _vector_keys(net: TransUNet) -> list[tuple[str, str, str]]:
    """(npz key, torch key, kind) for everything but attention qkv and the position embedding."""
    keys = [("conv_root/kernel", "resnet.root_conv.weight", "conv"),
            ("gn_root/scale", "resnet.root_gn.weight", "vec"), ("gn_root/bias", "resnet.root_gn.bias", "vec")]
    for s, stage in enumerate(net.resnet.stages):
        for u, unit in enumerate(stage):
            src, dst = f"block{s + 1}/unit{u + 1}", f"resnet.stages.{s}.{u}"
            names = ["1", "2", "3"] + (["_proj"] if unit.conv_proj is not None else [])
            for n in names:
                keys.append((f"{src}/conv{n}/kernel", f"{dst}.conv{n}.weight", "conv"))
                keys.append((f"{src}/gn{n}/scale", f"{dst}.gn{n}.weight", "vec"))
                keys.append((f"{src}/gn{n}/bias", f"{dst}.gn{n}.bias", "vec"))
    keys += [("embedding/kernel", "patch_embed.weight", "conv"), ("embedding/bias", "patch_embed.bias", "vec"),
             ("Transformer/encoder_norm/scale", "vit.norm.weight", "vec"),
             ("Transformer/encoder_norm/bias", "vit.norm.bias", "vec")]
    keys += vit_block_keys(len(net.vit.blocks))
    return keys


def vit_block_keys(num_layers: int, prefix: str = "vit") -> list[tuple[str, str, str]]:
    """(npz key, torch key, kind) of the ViT block LayerNorms and MLP for Google's ViT npz names."""
    keys = []
    for i in range(num_layers):
        src, dst = f"Transformer/encoderblock_{i}", f"{prefix}.blocks.{i}"
        for jax_name, name in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            keys += [(f"{src}/{jax_name}/scale", f"{dst}.{name}.weight", "vec"),
                     (f"{src}/{jax_name}/bias", f"{dst}.{name}.bias", "vec")]
        for jax_name, name in (("Dense_0", "linear1"), ("Dense_1", "linear2")):
            keys += [(f"{src}/MlpBlock_3/{jax_name}/kernel", f"{dst}.mlp.{name}.weight", "linear"),
                     (f"{src}/MlpBlock_3/{jax_name}/bias", f"{dst}.mlp.{name}.bias", "vec")]
    return keys


ATTENTION = "MultiHeadDotProductAttention_1"


def vit_attention_from_npz(arrays: Mapping[str, np.ndarray], num_layers: int, prefix: str = "vit",
                           used: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Fuse the npz ``query``/``key``/``value`` kernels ``(D, heads, d)`` and biases ``(heads, d)``
    into MONAI SABlock's ``qkv`` Linear (rows ``[q | k | v]``, each heads-major), and ``out``
    ``(heads, d, D)`` into ``out_proj``. npz keys consumed are added to ``used``."""
    used = set() if used is None else used
    state = {}
    for i in range(num_layers):
        src, dst = f"Transformer/encoderblock_{i}/{ATTENTION}", f"{prefix}.blocks.{i}.attn"
        qkv = [f"{src}/{n}/kernel" for n in ("query", "key", "value")]
        if all(k in arrays for k in qkv):
            state[f"{dst}.qkv.weight"] = torch.cat(
                [torch.from_numpy(arrays[k].reshape(arrays[k].shape[0], -1).T.copy()) for k in qkv])
            used.update(qkv)
        bias = [f"{src}/{n}/bias" for n in ("query", "key", "value")]
        if all(k in arrays for k in bias):
            state[f"{dst}.qkv.bias"] = torch.cat([torch.from_numpy(arrays[k].reshape(-1).copy()) for k in bias])
            used.update(bias)
        if f"{src}/out/kernel" in arrays:
            out = arrays[f"{src}/out/kernel"]
            state[f"{dst}.out_proj.weight"] = torch.from_numpy(out.reshape(-1, out.shape[-1]).T.copy())
            used.add(f"{src}/out/kernel")
        if f"{src}/out/bias" in arrays:
            state[f"{dst}.out_proj.bias"] = torch.from_numpy(arrays[f"{src}/out/bias"].copy())
            used.add(f"{src}/out/bias")
    return state


def vit_attention_to_npz(state: Mapping[str, torch.Tensor], num_layers: int, num_heads: int,
                         prefix: str = "vit") -> dict[str, np.ndarray]:
    """Inverse of :func:`vit_attention_from_npz`."""
    arrays = {}
    for i in range(num_layers):
        src, dst = f"{prefix}.blocks.{i}.attn", f"Transformer/encoderblock_{i}/{ATTENTION}"
        weight = state[f"{src}.qkv.weight"].detach().cpu().float().numpy()
        bias = state[f"{src}.qkv.bias"].detach().cpu().float().numpy()
        dim = weight.shape[1]
        for j, n in enumerate(("query", "key", "value")):
            rows = weight[j * dim:(j + 1) * dim]
            arrays[f"{dst}/{n}/kernel"] = np.ascontiguousarray(rows.T.reshape(dim, num_heads, -1))
            arrays[f"{dst}/{n}/bias"] = bias[j * dim:(j + 1) * dim].reshape(num_heads, -1).copy()
        out = state[f"{src}.out_proj.weight"].detach().cpu().float().numpy()
        arrays[f"{dst}/out/kernel"] = np.ascontiguousarray(out.T.reshape(num_heads, -1, dim))
        arrays[f"{dst}/out/bias"] = state[f"{src}.out_proj.bias"].detach().cpu().float().numpy().copy()
    return arrays


def convert_npz(arrays: Mapping[str, np.ndarray], keys: Sequence[tuple[str, str, str]],
                used: set[str]) -> dict[str, torch.Tensor]:
    """Apply a (npz key, torch key, kind) table: ``conv`` HWIO -> OIHW, ``linear`` (in, out) ->
    (out, in), ``vec`` flattened. Keys found are added to ``used``."""
    state = {}
    for src, dst, kind in keys:
        if src not in arrays:
            continue
        a = arrays[src]
        state[dst] = (_conv_from_hwio(a) if kind == "conv" else torch.from_numpy(a.T.copy()) if kind == "linear"
                      else torch.from_numpy(a.reshape(-1).copy()))
        used.add(src)
    return state


def transunet_state_from_npz(net: TransUNet, arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map an ``R50+ViT-B_16.npz`` dict of arrays to a state dict for ``net``.

    Keys that map to nothing stay in the result under their npz name (so that
    :func:`load_state_dict_report` lists them as unexpected).
    """
    used: set[str] = set()
    state = convert_npz(arrays, _vector_keys(net), used)
    state.update(vit_attention_from_npz(arrays, len(net.vit.blocks), used=used))
    pos_key = "Transformer/posembed_input/pos_embedding"
    if pos_key in arrays:
        pos = torch.from_numpy(arrays[pos_key].copy())
        tokens = pos.shape[1]
        side = math.isqrt(tokens)
        if side * side != tokens:  # classification checkpoints carry a class-token slot first
            pos, side = pos[:, 1:], math.isqrt(tokens - 1)
        if side * side == pos.shape[1]:
            pos = resize_position_embedding(pos, (side, side), net.grid)
        state["pos_embedding"] = pos
        used.add(pos_key)
    state.update({k: torch.from_numpy(np.asarray(v).copy()) for k, v in arrays.items() if k not in used})
    return state


def transunet_to_npz(net: TransUNet) -> dict[str, np.ndarray]:
    """Inverse of :func:`transunet_state_from_npz`: ``net``'s encoder as Google npz arrays.

    Position embedding written as ``(1, 1 + N, D)`` with a zero class-token slot, like the
    ImageNet-21k classification checkpoints. ``np.savez(path, **transunet_to_npz(net))`` writes a
    file :meth:`TransUNet.load_pretrained` reads.
    """
    state = net.state_dict()
    arrays = {}
    for src, dst, kind in _vector_keys(net):
        t = state[dst].detach().cpu().float()
        arrays[src] = (_conv_to_hwio(t) if kind == "conv" else np.ascontiguousarray(t.numpy().T)
                       if kind == "linear" else t.numpy().copy())
    arrays.update(vit_attention_to_npz(state, len(net.vit.blocks), net.vit.blocks[0].attn.num_heads))
    pos = state["pos_embedding"].detach().cpu().float().numpy()
    arrays["Transformer/posembed_input/pos_embedding"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
    return arrays


@register_network(
    "transunet",
    references={
        "R50-ViT-B_16": dict(spatial_dims=2, in_channels=1, out_channels=9, img_size=224),
        "tiny": dict(spatial_dims=2, in_channels=1, out_channels=3, img_size=64, resnet_units=(1, 1, 1),
                     resnet_width=32, hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128,
                     head_channels=64, decoder_channels=(32, 32, 16, 16)),
    },
    description="TransUNet R50-ViT-B/16 hybrid encoder + cascaded upsampler (2D)",
)
def transunet(**config) -> TransUNet:
    """TransUNet R50-ViT-B/16 hybrid encoder + cascaded upsampler (2D)."""
    return TransUNet(**config)
