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
- ``openvino``: the network converted once per window shape by OpenVINO
  (``openvino.convert_model``) and compiled for the CPU in float32
  (``INFERENCE_PRECISION_HINT=f32``: never bf16, whatever the CPU offers), with fused
  convolution + normalisation + activation kernels. The converted model (OpenVINO IR) is cached
  under ``$MEDSEG_CACHE`` (default ``~/.cache/medseg``), keyed by the weights, the window shape
  and the OpenVINO version, so only the first run pays the conversion.
- ``auto``: ``openvino`` on the CPU (``channels_last`` if OpenVINO is missing); ``channels_last``
  plus float16 autocast on CUDA (set by the Predictor through the engine's ``half_precision``).

Measured on this project's 2-core AMD EPYC (AVX2), 3D U-Net (nnU-Net 3d_fullres), one 96^3
window, one thread, CPU seconds: eager 7.2, channels_last 6.3, compile 5.3, openvino 4.4 (see
``benchmarks/sliding_window.py`` for the end-to-end tables). ONNX Runtime (MLAS 3D convolutions)
was slower than eager on the same CPU and is not offered.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "eager", "channels_last", "compile", "openvino")


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
        batch_size: for ``compile`` and ``openvino``, the fixed window batch size that calls are
            padded to.
        device: where the network runs (``auto`` picks by it).
        cache_key: identifies the weights for the OpenVINO cache (e.g. a hash of the weight
            file); without it the cache is not used.

    Raises:
        ValueError: unknown runtime; ``openvino`` for a network not on the CPU.
        ImportError: ``openvino`` asked for and not installed.
    """

    def __init__(
        self,
        network: nn.Module,
        runtime: str = "auto",
        spatial_dims: int = 3,
        batch_size: int = 1,
        device: str | torch.device = "cpu",
        cache_key: str | None = None,
    ):
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
        device = torch.device(device)
        if runtime == "auto":
            runtime = "openvino" if device.type == "cpu" and openvino_available() else "channels_last"
        if runtime == "openvino" and device.type != "cpu":
            raise ValueError("the openvino runtime runs on the CPU only")
        self.name = runtime
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
        elif self.name == "openvino":
            self._forward = _OpenVINOForward(network, cache_key)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.memory_format is not None:
            x = x.contiguous(memory_format=self.memory_format)
        padded = self.name in ("compile", "openvino") and n < self.batch_size
        if padded:  # one compiled shape
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        try:
            out = self._forward(x)
        except ConversionMismatchError as error:
            log.warning("%s; running the network with the channels_last runtime instead", error)
            self._fall_back()
            out = self._forward(x)
        return out[:n] if padded else out

    def _fall_back(self) -> None:
        """Switch an ``openvino`` runtime that failed verification to ``channels_last``."""
        self.name = "channels_last"
        self.memory_format = _memory_format(self.spatial_dims)
        self.network = _swap_instance_norms(copy.deepcopy(self.network)).to(memory_format=self.memory_format)
        self._forward = self.network


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def cache_dir() -> Path:
    """``$MEDSEG_CACHE`` or ``~/.cache/medseg``."""
    return Path(os.environ.get("MEDSEG_CACHE") or Path.home() / ".cache" / "medseg")


class ConversionMismatchError(RuntimeError):
    """A converted model does not compute the network's function (checked on first use)."""


#: largest max |converted - eager| / range(eager) accepted when verifying a conversion
VERIFY_TOLERANCE = 1e-3


def _block_openvino_telemetry() -> None:
    """Keep ``openvino.convert_model`` from sending usage events to Google Analytics.

    OpenVINO's converter reports each conversion through ``openvino_telemetry`` unless the user
    opted out in a consent file, a network call the user never configured. Marking the module as
    unimportable (before OpenVINO is imported) makes the converter fall back to its own no-op
    ``openvino.tools.ovc.telemetry_stub``.
    """
    import sys

    if "openvino.tools.ovc.telemetry_utils" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
        sys.modules.setdefault("openvino_telemetry.backend", None)  # type: ignore[arg-type]
        return
    from openvino.tools.ovc import convert_impl, telemetry_stub, telemetry_utils  # already loaded

    telemetry_utils.tm = convert_impl.tm = telemetry_stub


class _OpenVINOForward:
    """``x (N, C, *window) -> logits`` through an OpenVINO CPU model compiled per input shape.

    Each shape is converted with a static input shape (dynamic shapes mis-convert some networks,
    e.g. Swin UNETR's padding logic) and verified once against the eager network on a seeded
    random input: max |openvino - eager| must be within :data:`VERIFY_TOLERANCE` of the eager
    output range, else :class:`ConversionMismatchError`. Verified conversions are cached.
    """

    def __init__(self, network: nn.Module, cache_key: str | None):
        _block_openvino_telemetry()
        import openvino as ov

        self.ov = ov
        self.network = network
        self.cache_key = cache_key
        self.core = ov.Core()
        self.compiled: dict[tuple[int, ...], Any] = {}

    def _cache_path(self, shape: tuple[int, ...]) -> Path | None:
        if not self.cache_key:
            return None
        tag = hashlib.sha256(f"{self.cache_key}|{shape}|{self.ov.__version__}".encode()).hexdigest()[:24]
        return cache_dir() / "openvino" / tag / "model.xml"

    def _compile(self, model):
        return self.core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "f32",  # never bf16/fp16, whatever the CPU supports
            },
        )

    def _convert_and_verify(self, shape: tuple[int, ...]):
        ov = self.ov
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about the networks' shape checks
            model = ov.convert_model(
                self.network, example_input=torch.zeros(shape), input=[ov.PartialShape(list(shape))]
            )
        compiled = self._compile(model)
        probe = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = self.network(probe).float()
        got = torch.from_numpy(np.array(compiled({0: probe.numpy()})[0]))
        span = float(expected.max() - expected.min()) or 1.0
        error = float((got - expected).abs().max()) / span if got.shape == expected.shape else float("inf")
        if not error <= VERIFY_TOLERANCE:
            raise ConversionMismatchError(
                f"OpenVINO conversion for input {shape} differs from the network "
                f"(max error {error:.1e} of the output range, shape {tuple(got.shape)})"
            )
        return model, compiled

    def _load(self, shape: tuple[int, ...]):
        path = self._cache_path(shape)
        if path is not None and path.is_file():
            return self._compile(self.core.read_model(str(path)))
        model, compiled = self._convert_and_verify(shape)
        if path is not None:
            tmp = None
            try:
                path.parent.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=path.parent.parent))
                self.ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
                os.replace(tmp, path.parent)
            except OSError as error:  # another process won the race, or a read-only home
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                log.debug("OpenVINO cache not written: %s", error)
        return compiled

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(int(s) for s in x.shape)
        compiled = self.compiled.get(shape)
        if compiled is None:
            compiled = self.compiled[shape] = self._load(shape)
        data = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        result = compiled({0: data})[0]
        return torch.from_numpy(np.array(result, copy=True))


def auto_sw_batch_size(
    runtime: Callable[[torch.Tensor], torch.Tensor],
    window: tuple[int, ...],
    in_channels: int,
    device: torch.device,
    num_windows: int,
    memory_fraction: float = 0.5,
    limit: int = 16,
) -> int:
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
