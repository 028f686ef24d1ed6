"""The uniform interface every medseg network implements.

``network(x)`` returns the final logits ``(B, K, *spatial)`` and is what inference calls.
``network(x, features=True)`` returns a :class:`NetworkOutput` with, besides the logits, the
decoder outputs at each scale, the encoder features, and any native deep-supervision logits.
Deep supervision and dual self-distillation (:mod:`medseg.losses`) attach to any network through
this, with no per-network code in the loss. Calling through ``forward`` (not a second method)
keeps it compatible with ``DistributedDataParallel``.

The contract every network declares (checked by :func:`check_network_contract`, which
:func:`~medseg.networks.registry.create_network` runs on every network it builds):

- ``spatial_dims``, ``in_channels``, ``out_channels``, ``input_divisor`` (see
  :class:`SegmentationNetwork`);
- ``deep_supervision_scales``: one entry per native deep-supervision head, **finest first**, each the
  head's output size relative to the input per spatial axis, e.g. ``((0.5, 0.5, 0.5),
  (0.25, 0.25, 0.25))``; ``()`` for a network without heads. In training mode
  ``forward(x, features=True).deep_supervision`` then holds exactly these heads, so the loss sees
  ``1 + len(deep_supervision_scales)`` outputs (:func:`medseg.losses.build_loss` wraps the
  segmentation loss in nnU-Net-weighted deep supervision exactly when there are heads);
- ``load_pretrained(path, **options)``: the one checkpoint reader
  (:func:`medseg.networks.pretrained.read_checkpoint`), then the network's conversion hook
  :meth:`SegmentationNetwork.pretrained_state_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.errors import InputShapeError
from medseg.networks.pretrained import load_state_dict_report, read_checkpoint, state_dict_from_checkpoint


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
    """Base class: implement :meth:`forward_features`; ``forward``, input checks and
    :meth:`load_pretrained` come free.

    Subclasses set, per instance (usually in ``__init__``):

    Attributes:
        spatial_dims: 2 or 3.
        in_channels: input channels ``C_in``.
        out_channels: classes ``K`` of ``logits``.
        input_divisor: the factor every spatial input size must be a multiple of, per axis.
        deep_supervision_scales: native deep-supervision heads, finest first: per head, its output
            size / input size per spatial axis (``()`` = no heads). Must match what
            :meth:`forward_features` returns in ``deep_supervision`` in training mode.
        pretrained_target: dotted name of the submodule :meth:`load_pretrained` fills (``""`` = the
            whole network); the keys of :meth:`pretrained_state_dict` and the report are relative
            to it.
    """

    spatial_dims: int
    in_channels: int
    out_channels: int
    input_divisor: tuple[int, ...]
    deep_supervision_scales: tuple[tuple[float, ...], ...]
    pretrained_target: str = ""
    #: the network has its own NP/HV branches (:mod:`medseg.networks.hover`)
    hover_branches: bool = False

    @property
    def num_deep_supervision_heads(self) -> int:
        """``len(deep_supervision_scales)``: outputs for the loss = 1 + this."""
        return len(self.deep_supervision_scales)

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor | NetworkOutput:
        """``(B, C_in, *spatial)`` -> logits ``(B, K, *spatial)``, or a :class:`NetworkOutput`.

        Raises:
            InputShapeError: see :meth:`check_input`.
            RuntimeError: in training mode with ``features=True``, the deep-supervision outputs do not
                match ``deep_supervision_scales`` (a bug in the network, not in the input).
        """
        self.check_input(x)
        output = self.forward_features(x)
        if features and self.training:
            self._check_deep_supervision(output, tuple(x.shape[2:]))
        return output if features else output.logits

    def _check_deep_supervision(self, output: NetworkOutput, size: tuple[int, ...]) -> None:
        expected = [tuple(round(s * r) for s, r in zip(size, scale)) for scale in self.deep_supervision_scales]
        got = [tuple(t.shape[2:]) for t in output.deep_supervision]
        if got != expected:
            raise RuntimeError(
                f"{type(self).__name__} declares deep-supervision outputs {expected} for input {size}, "
                f"but returned {got}"
            )

    def forward_features(self, x: torch.Tensor) -> NetworkOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_pretrained(self, path: str | Path, **options: Any) -> dict[str, list[str]]:
        """Load weights from a local file (never downloads); the same reader for every network.

        :func:`~medseg.networks.pretrained.read_checkpoint` reads the file (``torch.save`` object
        with ``weights_only=True``, or an ``.npz``), :meth:`pretrained_state_dict` converts it (with
        the network-specific ``options``), and
        :func:`~medseg.networks.pretrained.load_state_dict_report` copies it into
        ``pretrained_target``.

        Returns:
            ``{"missing": [...], "unexpected": [...]}`` keys (also logged).

        Raises:
            PretrainedWeightsError: unreadable file, a checkpoint of the wrong kind, or a tensor
                whose shape differs from the network's.
        """
        source = Path(path).name
        state = self.pretrained_state_dict(read_checkpoint(path), source=source, **options)
        target = self.get_submodule(self.pretrained_target) if self.pretrained_target else self
        return load_state_dict_report(target, state, source=source)

    def pretrained_state_dict(self, checkpoint: Any, source: str, **options: Any) -> Mapping[str, torch.Tensor]:
        """Convert what :func:`~medseg.networks.pretrained.read_checkpoint` returned into a state
        dict for ``pretrained_target``. Default: a medseg state dict (``torch.save(net.state_dict())``,
        optionally under ``"state_dict"``/``"model"``, ``module.`` prefix dropped); networks with
        upstream formats override this.

        Raises:
            PretrainedWeightsError: not a checkpoint this network understands.
            TypeError: an unknown option.
        """
        if options:
            raise TypeError(f"{type(self).__name__}.load_pretrained: unknown options {sorted(options)}")
        return state_dict_from_checkpoint(checkpoint, source)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`InputShapeError` unless ``x`` is ``(B, in_channels, *spatial)`` with
        ``spatial_dims`` axes each divisible by ``input_divisor``."""
        if x.ndim != self.spatial_dims + 2:
            raise InputShapeError(
                f"{type(self).__name__} expects (B, C, {', '.join('HWD'[: self.spatial_dims])}) input, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise InputShapeError(f"{type(self).__name__} expects {self.in_channels} input channels, got {x.shape[1]}")
        divisor = _per_axis(self.input_divisor, self.spatial_dims)
        bad = [s for s, d in zip(x.shape[2:], divisor) if s % d]
        if bad:
            raise InputShapeError(
                f"{type(self).__name__} needs spatial sizes divisible by {divisor}, got {tuple(x.shape[2:])}"
            )


def _per_axis(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, Sequence) else (int(value),) * dims


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on the ``meta`` device: nothing is allocated)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def check_network_contract(network: nn.Module) -> None:
    """Raise ``TypeError`` unless ``network`` declares the :class:`SegmentationNetwork` contract:
    ``spatial_dims``, ``in_channels``, ``out_channels``, ``input_divisor`` and
    ``deep_supervision_scales`` (a tuple of per-axis positive scales below or at 1, finest first).
    A programming error in a network, so not a ``ConfigError``."""
    name = type(network).__name__
    if not isinstance(network, SegmentationNetwork):
        raise TypeError(f"{name} is not a SegmentationNetwork")
    missing = [
        a
        for a in ("spatial_dims", "in_channels", "out_channels", "input_divisor", "deep_supervision_scales")
        if not hasattr(network, a)
    ]
    if missing:
        raise TypeError(f"{name} does not declare {', '.join(missing)}")
    scales = network.deep_supervision_scales
    if not isinstance(scales, tuple) or not all(
        isinstance(s, tuple) and len(s) == network.spatial_dims and all(0 < r <= 1 for r in s) for s in scales
    ):
        raise TypeError(
            f"{name}.deep_supervision_scales must be a tuple of {network.spatial_dims}-tuples of scales "
            f"in (0, 1], got {scales!r}"
        )
    volumes = [math.prod(s) for s in scales]
    if volumes != sorted(volumes, reverse=True):
        raise TypeError(f"{name}.deep_supervision_scales must be finest first, got {scales!r}")


#: channels of the stacked HoVer output: NP logits (background, nucleus), then HV (x, y)
HOVER_CHANNELS = 4


def hover_outputs(output: NetworkOutput | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(np_logits (B, 2, H, W), hv (B, 2, H, W))`` from a network's output.

    Raises:
        ValueError: the output has neither NP/HV branches nor 4 channels.
    """
    np_logits = getattr(output, "nuclei_probability_logits", None)
    hv = getattr(output, "horizontal_vertical", None)
    if np_logits is not None and hv is not None:
        return np_logits, hv
    logits = output.logits if isinstance(output, NetworkOutput) else output
    if logits.shape[1] != HOVER_CHANNELS:
        raise ValueError(
            f"a HoVer network needs NP/HV branches or {HOVER_CHANNELS} output channels "
            f"(2 NP logits + 2 HV maps), got {logits.shape[1]}"
        )
    return logits[:, :2], logits[:, 2:]
