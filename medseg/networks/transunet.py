"""TransUNet (2D): R50-ViT-B/16 hybrid encoder with a cascaded upsampler (CUP) decoder.

Chen et al., "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation",
arXiv:2102.04306, 2021. Built from the architecture reference (docs/architectures.md
section 1) on the shared :class:`~medseg.networks.blocks.TokenBottleneck` (ViT blocks with timm
parameter names) and MONAI ``Convolution``; no upstream code is copied.

Encoder (input ``(B, C, H, W)``, H and W divisible by 16):

- BiT-style ResNet-50 v2 truncated to 3 stages, units ``(3, 4, 9)``, width 64: weight-standardised
  convolutions (:class:`StdConv2d`), ``GroupNorm(32, eps=1e-6)``. Root: 7x7 stride-2 conv + GN + ReLU
  (H/2, 64 ch), 3x3 stride-2 max-pool **without padding** (so H/4 - 1 pixels; the skip copy is
  zero-padded on the bottom/right back to H/4, as upstream), then stages of 256 ch (H/4), 512 ch
  (H/8, stride 2) and 1024 ch (H/16, stride 2).
- ``transformer`` (:class:`~medseg.networks.blocks.TokenBottleneck`): hybrid patch embedding, a 1x1
  conv 1024 -> 768 on the H/16 map (= 16x16 px patches), learned position embedding for
  ``(img_size/16)**2`` tokens (bilinearly resized for other input sizes), no class token, dropout;
  ViT-B: 12 pre-LN blocks (LayerNorm eps 1e-6), 12 heads, MLP 3072 (GELU), final LayerNorm.

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
- ``deep_supervision``: none (TransUNet has no native deep-supervision heads;
  ``deep_supervision_scales = ()``).

Pretrained weights: :meth:`TransUNet.load_pretrained` reads Google's ImageNet-21k
``R50+ViT-B_16.npz`` (JAX/Flax key names, HWIO conv kernels); :func:`transunet_to_npz` is the
inverse mapping (used to write files in that format).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import ConfigError
from medseg.networks.base import NetworkOutput, SegmentationNetwork
from medseg.networks.blocks import TokenBottleneck, conv_bn_relu, resample_abs_pos_embed
from medseg.networks.pretrained import (
    convert_npz,
    google_vit_npz_from_state,
    google_vit_state_from_npz,
    npz_arrays,
    to_npz,
    unused_arrays,
)
from medseg.networks.registry import register_network

GN_EPS = 1e-6
LN_EPS = 1e-6

REFERENCES = {
    "R50-ViT-B_16": dict(spatial_dims=2, in_channels=1, out_channels=9, img_size=224),
    "tiny": dict(
        spatial_dims=2,
        in_channels=1,
        out_channels=3,
        img_size=64,
        resnet_units=(1, 1, 1),
        resnet_width=32,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        mlp_dim=128,
        head_channels=64,
        decoder_channels=(32, 32, 16, 16),
    ),
}


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
            cout, cmid = 4 * width * 2**s, width * 2**s
            self.stages.append(
                nn.ModuleList(
                    BottleneckUnit(cin if u == 0 else cout, cout, cmid, stride=2 if (u == 0 and s > 0) else 1)
                    for u in range(n)
                )
            )
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
            expected = [d // (4 * 2**s) for d in size]
            pad = [expected[1] - y.shape[-1], expected[0] - y.shape[-2]]
            # upstream quirk: the pad-0 max-pool loses a row/column; only the skip copy is padded
            features.append(F.pad(y, (0, pad[0], 0, pad[1])) if any(pad) else y)
        return features


# --------------------------------------------------------------------------------------------
# TransUNet
# --------------------------------------------------------------------------------------------
class CUPBlock(nn.Module):
    """Cascaded-upsampler block: bilinear x2 (align_corners) -> concat skip -> 2 x (conv3x3+BN+ReLU)."""

    def __init__(self, cin: int, cout: int, skip: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv1 = conv_bn_relu(2, cin + skip, cout)
        self.conv2 = conv_bn_relu(2, cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


@register_network(
    "transunet", references=REFERENCES, description="TransUNet R50-ViT-B/16 hybrid encoder + cascaded upsampler (2D)"
)
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
        freeze_encoder: set ``requires_grad=False`` on the ResNet and the ``transformer`` (patch
            and position embedding, ViT) to fine-tune only the decoder.

    Shapes: ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``, H, W divisible by 16.

    Raises:
        ConfigError: inconsistent configuration.
        InputShapeError: wrong input channels/dimensions/sizes (at call time).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 9,
        img_size: int = 224,
        resnet_units: Sequence[int] = (3, 4, 9),
        resnet_width: int = 64,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        head_channels: int = 512,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        n_skip: int = 3,
        freeze_encoder: bool = False,
    ):
        super().__init__()
        if spatial_dims != 2:
            raise ConfigError(f"transunet is 2D (spatial_dims=2), got spatial_dims={spatial_dims}")
        if len(resnet_units) != 3 or len(decoder_channels) != 4 or not 0 <= n_skip <= 3:
            raise ConfigError("transunet needs 3 resnet stages, 4 decoder channels and n_skip in 0..3")
        if img_size % 16:
            raise ConfigError(f"transunet img_size must be divisible by 16, got {img_size}")
        self.spatial_dims, self.in_channels, self.out_channels = 2, in_channels, out_channels
        self.input_divisor = (16, 16)
        self.deep_supervision_scales = ()
        self.grid = (img_size // 16, img_size // 16)
        self.repeat_input = in_channels == 1
        self.resnet = ResNetV2Encoder(3 if in_channels == 1 else in_channels, resnet_units, resnet_width)
        try:
            self.transformer = TokenBottleneck(
                2,
                self.resnet.out_channels,
                self.grid,
                hidden_size,
                num_layers,
                num_heads,
                mlp_dim,
                dropout_rate,
                attention_dropout_rate,
                norm_eps=LN_EPS,
            )
        except ValueError as error:
            raise ConfigError(f"transunet: {error}") from None
        self.conv_more = conv_bn_relu(2, hidden_size, head_channels)
        # CNN skips coarsest first: stage 1 (H/8), stage 0 (H/4), root (H/2); the last block has none
        skip_channels = [4 * resnet_width * 2, 4 * resnet_width, resnet_width, 0]
        skip_channels = [c if i < n_skip else 0 for i, c in enumerate(skip_channels)]
        self.n_skip = n_skip
        cins = [head_channels, *decoder_channels[:-1]]
        self.decoder_blocks = nn.ModuleList(
            CUPBlock(cin, cout, skip) for cin, cout, skip in zip(cins, decoder_channels, skip_channels)
        )
        self.head = nn.Conv2d(decoder_channels[-1], out_channels, kernel_size=3, padding=1)
        if freeze_encoder:
            self.resnet.requires_grad_(False)
            self.transformer.requires_grad_(False)

    def forward_features(self, x: torch.Tensor) -> NetworkOutput:
        if self.repeat_input:
            x = x.repeat(1, 3, 1, 1)
        cnn = self.resnet(x)  # root, stage0, stage1, stage2 (finest first)
        vit_map = self.transformer(cnn[-1])  # (B, hidden, H/16, W/16)
        y = self.conv_more(vit_map)
        decoder = [y]
        skips = cnn[-2::-1]  # stage1 (H/8), stage0 (H/4), root (H/2)
        for i, block in enumerate(self.decoder_blocks):
            y = block(y, skips[i] if i < self.n_skip else None)
            decoder.append(y)
        return NetworkOutput(logits=self.head(y), decoder=decoder, encoder=[*cnn, vit_map])

    def pretrained_state_dict(self, checkpoint: Any, source: str, **options: Any) -> dict[str, torch.Tensor]:
        """Google's ImageNet-21k ``R50+ViT-B_16.npz`` (or any npz with the same key names), read by
        :meth:`load_pretrained`.

        The ResNet, patch embedding, position embedding (class-token slot dropped, grid resized
        bilinearly if it differs) and ViT blocks are loaded; the decoder and head keep their
        initialisation (reported as missing). Keys not used (``cls``, ``head/*``, ``pre_logits/*``)
        are reported as unexpected.

        Raises:
            PretrainedWeightsError: not an npz (raised here), or a tensor's shape does not fit, e.g.
                ``in_channels`` other than 1 or 3 against an RGB root conv (raised by the loader).
        """
        if options:
            raise TypeError(f"TransUNet.load_pretrained: unknown options {sorted(options)}")
        return transunet_state_from_npz(self, npz_arrays(checkpoint, source))


# --------------------------------------------------------------------------------------------
# Google npz (JAX/Flax) <-> torch mapping
# --------------------------------------------------------------------------------------------
def _resnet_keys(net: TransUNet) -> list[tuple[str, str, str]]:
    """(npz key, torch key, kind) of the BiT ResNet and the hybrid patch embedding."""
    keys = [
        ("conv_root/kernel", "resnet.root_conv.weight", "conv"),
        ("gn_root/scale", "resnet.root_gn.weight", "vec"),
        ("gn_root/bias", "resnet.root_gn.bias", "vec"),
    ]
    for s, stage in enumerate(net.resnet.stages):
        for u, unit in enumerate(stage):
            src, dst = f"block{s + 1}/unit{u + 1}", f"resnet.stages.{s}.{u}"
            names = ["1", "2", "3"] + (["_proj"] if unit.conv_proj is not None else [])
            for n in names:
                keys.append((f"{src}/conv{n}/kernel", f"{dst}.conv{n}.weight", "conv"))
                keys.append((f"{src}/gn{n}/scale", f"{dst}.gn{n}.weight", "vec"))
                keys.append((f"{src}/gn{n}/bias", f"{dst}.gn{n}.bias", "vec"))
    keys += [
        ("embedding/kernel", "transformer.patch_embed.weight", "conv"),
        ("embedding/bias", "transformer.patch_embed.bias", "vec"),
    ]
    return keys


POS_EMBED_KEY = "Transformer/posembed_input/pos_embedding"


def transunet_state_from_npz(net: TransUNet, arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map an ``R50+ViT-B_16.npz`` dict of arrays to a state dict for ``net``.

    Keys that map to nothing stay in the result under their npz name (so that
    :func:`~medseg.networks.pretrained.load_state_dict_report` lists them as unexpected).
    """
    used: set[str] = set()
    state = convert_npz(arrays, _resnet_keys(net), used)
    state.update(google_vit_state_from_npz(arrays, len(net.transformer.blocks), "transformer", used))
    if POS_EMBED_KEY in arrays:
        pos = torch.from_numpy(arrays[POS_EMBED_KEY].copy())
        tokens = pos.shape[1]
        side = math.isqrt(tokens)
        if side * side != tokens:  # classification checkpoints carry a class-token slot first
            pos, side = pos[:, 1:], math.isqrt(tokens - 1)
        if side * side == pos.shape[1]:
            pos = resample_abs_pos_embed(
                pos, net.grid, (side, side), num_prefix_tokens=0, interpolation="bilinear", antialias=False
            )
        state["transformer.pos_embed"] = pos
        used.add(POS_EMBED_KEY)
    state.update(unused_arrays(arrays, used))
    return state


def transunet_to_npz(net: TransUNet) -> dict[str, np.ndarray]:
    """Inverse of :func:`transunet_state_from_npz`: ``net``'s encoder as Google npz arrays.

    Position embedding written as ``(1, 1 + N, D)`` with a zero class-token slot, like the
    ImageNet-21k classification checkpoints. ``np.savez(path, **transunet_to_npz(net))`` writes a
    file :meth:`TransUNet.load_pretrained` reads.
    """
    state = net.state_dict()
    arrays = to_npz(state, _resnet_keys(net))
    arrays.update(
        google_vit_npz_from_state(state, len(net.transformer.blocks), net.transformer.num_heads, "transformer")
    )
    pos = state["transformer.pos_embed"].detach().cpu().float().numpy()
    arrays[POS_EMBED_KEY] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
    return arrays
