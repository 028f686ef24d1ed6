"""Dual self-distillation (DSD) for any U-shaped :class:`~medseg.networks.base.SegmentationNetwork`.

Banerjee, Chatterjee et al., "Dual Self-Distillation of U-shaped Networks for 3D Medical Image
Segmentation", arXiv 2306.03271 (ISBI 2024); reference code soumbane/DualSelfDistillation.

Every decoder and encoder feature map of ``network(x, features=True)`` gets a side head (a 1x1
conv to the K classes, MONAI ``UnetOutBlock``, then upsampling to the input size: a 2x transposed
convolution applied ``log2(scale)`` times with shared weights as upstream's "DeepUp", a 1x1
transposed convolution at scale 1, or trilinear interpolation). The loss is::

    sum_{s in main, decoders} seg_loss(s, y)                                  # deep supervision
  + alpha T^2 [ sum_{d in decoders[:-1]} KL(softmax(dec_last / T) || softmax(d / T))
              + sum_{e in encoders[:-1]} KL(softmax(enc_last / T) || softmax(e / T)) ]

with the deepest decoder (``decoder[-1]``, the finest, last before the output head) and the
deepest encoder (``encoder[-1]``, the bottleneck) as teachers, T = 3, alpha = 1. KL is pixel-wise:
summed over classes, averaged over batch and voxels. As upstream, the teachers are not detached
(gradient flows into them); ``detach_teacher=True`` switches that off.

The module owns its side heads (train them with the network: pass ``dsd.parameters()`` to the
optimizer) and learns channel counts and strides from one dry forward, so no network needs
per-network code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock
from torch import nn

from medseg.errors import ConfigError
from medseg.networks.base import NetworkOutput


class SideHead(nn.Module):
    """1x1 conv ``(B, C, *s)`` -> ``(B, K, *s)`` then upsampling by ``scale`` per axis to ``(B, K, *s * scale)``.

    ``mode="deconv"`` needs power-of-two scales: one ``ConvTranspose`` with kernel = stride = 2 is
    applied ``log2(scale)`` times (shared weights; an axis already at full size gets stride 1 in
    the steps where others still grow); scale 1 everywhere gets a 1x1 transposed conv.
    ``mode="trilinear"`` interpolates (bilinear in 2D) to the requested size.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        scale: Sequence[int],
        mode: Literal["deconv", "trilinear"] = "deconv",
    ):
        super().__init__()
        self.mode = mode
        self.out = UnetOutBlock(spatial_dims, in_channels, num_classes)
        self.steps: list[str] = []
        self.up = nn.ModuleDict()
        if mode == "deconv":
            exponents = []
            for s in scale:
                e = round(math.log2(s)) if s >= 1 else -1
                if e < 0 or 2**e != s:
                    raise ConfigError(
                        f"DSD deconv side heads need power-of-two scales, got {tuple(scale)}; use upsample: trilinear"
                    )
                exponents.append(e)
            conv = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
            for step in range(max(max(exponents), 1)):
                stride = tuple(2 if step < e else 1 for e in exponents)
                key = "x".join(map(str, stride))
                if key not in self.up:
                    self.up[key] = conv(num_classes, num_classes, kernel_size=stride, stride=stride)
                self.steps.append(key)
        elif mode != "trilinear":
            raise ConfigError(f"DSD upsample must be deconv or trilinear, got {mode!r}")

    def forward(self, feature: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        y = self.out(feature)
        for key in self.steps:
            y = self.up[key](y)
        if tuple(y.shape[2:]) != tuple(size):
            y = F.interpolate(y, size=tuple(size), mode="trilinear" if y.ndim == 5 else "bilinear", align_corners=False)
        return y


def kl_distillation(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """Pixel-wise ``KL(softmax(teacher/T) || softmax(student/T))``, summed over classes and averaged over
    batch and voxels. Shapes: both ``(B, K, *spatial)``. Not multiplied by ``T**2``."""
    log_p_teacher = F.log_softmax(teacher.float() / temperature, 1)
    log_p_student = F.log_softmax(student.float() / temperature, 1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(1).mean()


class DualSelfDistillationLoss(nn.Module):
    """DSD loss with its own side heads, built for ``network`` by a dry forward.

    Args:
        network: a :class:`SegmentationNetwork` (``network(x, features=True)`` -> ``NetworkOutput``).
        seg_loss: ``loss(logits, target)``, upstream DiceCE (softmax, one-hot, background included).
        patch_size: spatial input size used for the dry forward (and training).
        temperature: T (3). alpha: weight of the KL terms (1).
        detach_teacher: stop the gradient through the teachers (upstream: False).
        upsample: ``"deconv"`` (upstream default) or ``"trilinear"``.

    ``forward(output, target)``: ``output`` from ``network(x, features=True)``, target ``(B, 1, *spatial)``
    label map; returns a scalar. Raises :class:`ConfigError` if the network exposes fewer than two
    decoder or encoder feature maps, or a feature size does not divide the input size.
    """

    def __init__(
        self,
        network: nn.Module,
        seg_loss: nn.Module,
        patch_size: Sequence[int],
        temperature: float = 3.0,
        alpha: float = 1.0,
        detach_teacher: bool = False,
        upsample: Literal["deconv", "trilinear"] = "deconv",
    ):
        super().__init__()
        self.seg_loss = seg_loss
        self.temperature, self.alpha, self.detach_teacher = temperature, alpha, detach_teacher
        spatial_dims = len(patch_size)
        num_classes = int(network.out_channels)
        probe = _dry_forward(network, patch_size)
        if len(probe.decoder) < 2 or len(probe.encoder) < 2:
            raise ConfigError(
                f"DSD needs >= 2 decoder and encoder feature maps; {type(network).__name__} "
                f"exposes {len(probe.decoder)} and {len(probe.encoder)}"
            )

        def heads(features: list[torch.Tensor]) -> nn.ModuleList:
            modules = []
            for f in features:
                scale = [p // s for p, s in zip(patch_size, f.shape[2:])]
                if any(p % s for p, s in zip(patch_size, f.shape[2:])):
                    raise ConfigError(
                        f"DSD: feature size {tuple(f.shape[2:])} does not divide patch {tuple(patch_size)}"
                    )
                modules.append(SideHead(spatial_dims, f.shape[1], num_classes, scale, upsample))
            return nn.ModuleList(modules)

        self.decoder_heads = heads(probe.decoder)
        self.encoder_heads = heads(probe.encoder)

    def side_logits(self, output: NetworkOutput, size: Sequence[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Decoder and encoder side-head logits, each ``(B, K, *size)``, in the network's list order."""
        decoder = [head(f, size) for head, f in zip(self.decoder_heads, output.decoder)]
        encoder = [head(f, size) for head, f in zip(self.encoder_heads, output.encoder)]
        return decoder, encoder

    def forward(self, output: NetworkOutput, target: torch.Tensor) -> torch.Tensor:
        size = output.logits.shape[2:]
        decoder, encoder = self.side_logits(output, size)
        loss = self.seg_loss(output.logits, target)
        for logits in decoder:
            loss = loss + self.seg_loss(logits, target)
        loss = loss + self.alpha * self.temperature**2 * self.distillation(decoder, encoder)
        return loss

    def distillation(self, decoder: list[torch.Tensor], encoder: list[torch.Tensor]) -> torch.Tensor:
        """Sum of the KL terms (without ``alpha T^2``): deepest decoder -> other decoders, bottleneck ->
        other encoder stages."""
        total = decoder[-1].new_zeros((), dtype=torch.float32)
        for maps in (decoder, encoder):
            teacher = maps[-1].detach() if self.detach_teacher else maps[-1]
            for student in maps[:-1]:
                total = total + kl_distillation(teacher, student, self.temperature)
        return total


@torch.no_grad()
def _dry_forward(network: nn.Module, patch_size: Sequence[int]) -> NetworkOutput:
    parameter = next(network.parameters())
    x = torch.zeros(1, int(network.in_channels), *patch_size, device=parameter.device, dtype=parameter.dtype)
    was_training = network.training
    network.eval()  # keep normalisation running statistics untouched
    try:
        return network(x, features=True)
    finally:
        network.train(was_training)
