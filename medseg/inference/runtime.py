"""How the network runs: the same function, computed faster.

Runtimes (``Predictor(runtime=...)``):

- ``eager``: the network as built (PyTorch eager).
- ``channels_last``: a copy of the network in channels-last memory format (NDHWC / NHWC), the
  layout oneDNN (CPU) and cuDNN (GPU) convolutions are fastest in, with every
  ``InstanceNorm`` (affine, no running statistics) replaced by the identical ``group_norm`` with
  one group per channel, whose kernel works on channels-last tensors without layout copies.
- ``compile``: ``torch.compile`` (Inductor, with weight freezing), fusing normalisation and
  activation kernels; compiled once per input shape, so window batches are padded to a fixed
  size. Compilation takes about a minute on a CPU (cached across processes by Inductor).
- ``auto``: ``channels_last`` (CPU and CUDA), plus float16 autocast on CUDA (set by the
  Predictor through the engine's ``half_precision``).

ONNX Runtime was measured on this project's CPU for the 3D U-Net (MLAS 3D convolutions) and was
slower than PyTorch eager, so it is not offered.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "eager", "channels_last", "compile")


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


def _swap_instance_norms(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """Replace instance norms in place; shared submodules (MONAI's DynUNet reuses blocks in two
    containers) are replaced once."""
    memo = {} if memo is None else memo
    for name, child in module.named_children():
        if isinstance(child, nn.modules.instancenorm._InstanceNorm) and not child.track_running_stats:
            if id(child) not in memo:
                memo[id(child)] = GroupInstanceNorm(child) if child.affine else _PlainGroupNorm(child)
            setattr(module, name, memo[id(child)])
        elif not isinstance(child, (GroupInstanceNorm, _PlainGroupNorm)):
            _swap_instance_norms(child, memo)
    return module


class _PlainGroupNorm(nn.Module):
    def __init__(self, norm: nn.modules.instancenorm._InstanceNorm):
        super().__init__()
        self.eps = norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, x.shape[1], None, None, self.eps)


def _memory_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


class NetworkRuntime:
    """A callable ``x (N, C, *spatial) -> logits (N, K, *spatial)`` running ``network`` with one of
    :data:`RUNTIMES`.

    Args:
        network: the network in eval mode, on ``device``; it is not modified (runtimes that
            change it work on a copy).
        runtime: one of :data:`RUNTIMES`.
        spatial_dims: 2 or 3.
        batch_size: for ``compile``, the fixed window batch size that calls are padded to.

    Raises:
        ValueError: unknown runtime.
    """

    def __init__(self, network: nn.Module, runtime: str = "auto", spatial_dims: int = 3,
                 batch_size: int = 1):
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
        self.name = "channels_last" if runtime == "auto" else runtime
        self.spatial_dims = spatial_dims
        self.batch_size = max(int(batch_size), 1)
        self.memory_format = None
        network = network.eval()
        if self.name in ("channels_last", "compile"):
            network = _swap_instance_norms(copy.deepcopy(network))
            self.memory_format = _memory_format(spatial_dims)
            network = network.to(memory_format=self.memory_format)
        self.network = network
        self._forward: Callable[[torch.Tensor], torch.Tensor] = network
        if self.name == "compile":
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # constant-fold and prepack weights (inference only)
            self._forward = torch.compile(network, dynamic=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.memory_format is not None:
            x = x.contiguous(memory_format=self.memory_format)
        if self.name == "compile" and n < self.batch_size:  # one compiled shape
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
            return self._forward(x)[:n]
        return self._forward(x)


def auto_sw_batch_size(runtime: Callable[[torch.Tensor], torch.Tensor], window: tuple[int, ...],
                       in_channels: int, device: torch.device, num_windows: int,
                       memory_fraction: float = 0.5, limit: int = 16) -> int:
    """Windows per network call.

    On the CPU, 1: oneDNN already parallelises one window over all cores, and larger batches
    only raise peak memory. On CUDA, as many windows as fit in ``memory_fraction`` of the free
    GPU memory, from the peak memory of one window measured by a trial call (at most ``limit``
    and the number of windows).
    """
    if device.type != "cuda":
        return 1
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        runtime(torch.zeros((1, in_channels, *window), device=device))
    torch.cuda.synchronize(device)
    per_window = max(torch.cuda.max_memory_allocated(device) - before, 1)
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(free * memory_fraction // per_window)
    return max(1, min(fits, limit, num_windows))
