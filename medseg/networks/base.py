"""The uniform interface every medseg network implements.

``network(x)`` returns the final logits ``(B, K, *spatial)`` and is what inference calls.
``network(x, features=True)`` returns a :class:`NetworkOutput` with, besides the logits, the
decoder outputs at each scale, the encoder features, and any native deep-supervision logits.
Deep supervision and dual self-distillation (:mod:`medseg.losses`) attach to any network through
this, with no per-network code in the loss. Calling through ``forward`` (not a second method)
keeps it compatible with ``DistributedDataParallel``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from medseg.errors import InputShapeError


@dataclass
class NetworkOutput:
    """Everything a U-shaped network computed for one input ``(B, C_in, *spatial)``.

    Attributes:
        logits: ``(B, K, *spatial)`` final class logits at input resolution.
        decoder: decoder stage outputs, **coarsest first** (the bottleneck-side decoder stage first,
            the last decoder stage before the output head last); each ``(B, C_s, *spatial / r_s)``.
        encoder: encoder stage features, **finest first** (the first, full- or half-resolution
            stage first, the bottleneck last); each ``(B, C_s, *spatial / r_s)``.
        deep_supervision: native deep-supervision logits from the network's own heads, **finest
            first, excluding** ``logits``; each ``(B, K, *spatial / r_s)``. Empty for networks
            without native heads.
    """

    logits: torch.Tensor
    decoder: list[torch.Tensor] = field(default_factory=list)
    encoder: list[torch.Tensor] = field(default_factory=list)
    deep_supervision: list[torch.Tensor] = field(default_factory=list)


class SegmentationNetwork(nn.Module):
    """Base class: implement :meth:`forward_features`; ``forward`` and input checks come free.

    Subclasses set ``spatial_dims``, ``in_channels``, ``out_channels`` and ``input_divisor`` (the
    factor every spatial input size must be a multiple of, per axis).
    """

    spatial_dims: int
    in_channels: int
    out_channels: int
    input_divisor: tuple[int, ...]

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor | NetworkOutput:
        """``(B, C_in, *spatial)`` -> logits ``(B, K, *spatial)``, or a :class:`NetworkOutput`."""
        self.check_input(x)
        output = self.forward_features(x)
        return output if features else output.logits

    def forward_features(self, x: torch.Tensor) -> NetworkOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`InputShapeError` unless ``x`` is ``(B, in_channels, *spatial)`` with
        ``spatial_dims`` axes each divisible by ``input_divisor``."""
        if x.ndim != self.spatial_dims + 2:
            raise InputShapeError(
                f"{type(self).__name__} expects (B, C, {', '.join('HWD'[:self.spatial_dims])}) input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise InputShapeError(f"{type(self).__name__} expects {self.in_channels} input channels, got {x.shape[1]}")
        divisor = _per_axis(self.input_divisor, self.spatial_dims)
        bad = [s for s, d in zip(x.shape[2:], divisor) if s % d]
        if bad:
            raise InputShapeError(
                f"{type(self).__name__} needs spatial sizes divisible by {divisor}, got {tuple(x.shape[2:])}")


def _per_axis(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, Sequence) else (int(value),) * dims


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on the ``meta`` device: nothing is allocated)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
