"""The ``channels_last`` runtime's network copy: channels-last memory format (NDHWC / NHWC), the
layout oneDNN (CPU) and cuDNN (GPU) convolutions are fastest in, with every ``InstanceNorm``
(no running statistics) replaced by the identical ``group_norm`` with one group per channel, whose
kernel works on channels-last tensors without layout copies."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class GroupInstanceNorm(nn.Module):
    """``InstanceNorm{1,2,3}d(affine=True, track_running_stats=False)`` computed as
    ``F.group_norm`` with ``num_groups = C`` (the same function: per-sample, per-channel mean and
    biased variance over the spatial axes); keeps the original parameters."""

    def __init__(self, norm: nn.modules.instancenorm._InstanceNorm):
        super().__init__()
        self.num_features = norm.num_features
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)


def swap_instance_norms(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """Replace instance norms in place; shared submodules (MONAI's DynUNet reuses blocks in two
    containers) are replaced once."""
    memo = {} if memo is None else memo
    for name, child in module.named_children():
        if isinstance(child, nn.modules.instancenorm._InstanceNorm) and not child.track_running_stats:
            if id(child) not in memo:
                memo[id(child)] = GroupInstanceNorm(child) if child.affine else _PlainGroupNorm(child)
            setattr(module, name, memo[id(child)])
        elif not isinstance(child, (GroupInstanceNorm, _PlainGroupNorm)):
            swap_instance_norms(child, memo)
    return module


class _PlainGroupNorm(nn.Module):
    def __init__(self, norm: nn.modules.instancenorm._InstanceNorm):
        super().__init__()
        self.eps = norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, x.shape[1], None, None, self.eps)


def memory_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def channels_last_copy(network: nn.Module, spatial_dims: int) -> nn.Module:
    """A copy of ``network`` with group-norm instance norms, in channels-last memory format."""
    return swap_instance_norms(copy.deepcopy(network)).to(memory_format=memory_format(spatial_dims))
