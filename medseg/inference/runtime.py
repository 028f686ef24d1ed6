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
  convolution + normalisation + activation kernels. The converted model (OpenVINO IR) is keyed
  by the weights' sha256, the window shape and the OpenVINO version (:func:`openvino_ir_tag`) and
  looked up first in the model package (``runtime/openvino/<tag>/``, written at export by
  :func:`prepare_openvino`, shipped with the bundled models), then in the cache under
  ``$MEDSEG_CACHE`` (default ``~/.cache/medseg``), where a conversion made on first use is kept.
  A stored IR is never trusted: before first use in a process it is compiled and checked against
  the eager network on a seeded probe (as a fresh conversion is); a stale, foreign or damaged one
  is converted again. The IR does not depend on the CPU: OpenVINO compiles it for the CPU at
  hand when it is loaded (about a second), so one shipped IR serves every machine.
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
        shipped_dir: a read-only folder of converted models shipped with the package
            (``<package>/runtime/openvino``), searched before the cache.

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
        shipped_dir: Path | None = None,
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
            self._forward = _OpenVINOForward(network, cache_key, shipped_dir)

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


def openvino_ir_tag(weights_key: str, shape: tuple[int, ...], version: str) -> str:
    """Folder name of a converted model: 24 hex digits of sha256 over the weights' key (their
    sha256), the input shape ``(N, C, *window)`` and the OpenVINO version string."""
    return hashlib.sha256(f"{weights_key}|{tuple(int(s) for s in shape)}|{version}".encode()).hexdigest()[:24]


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

    def __init__(self, network: nn.Module, cache_key: str | None, shipped_dir: Path | None = None):
        _block_openvino_telemetry()
        import openvino as ov

        self.ov = ov
        self.network = network
        self.cache_key = cache_key
        self.shipped_dir = shipped_dir
        self.core = ov.Core()
        self.compiled: dict[tuple[int, ...], Any] = {}
        #: where each shape's compiled model came from: "shipped", "cache" or "converted"
        self.sources: dict[tuple[int, ...], str] = {}

    def _cache_path(self, shape: tuple[int, ...]) -> Path | None:
        if not self.cache_key:
            return None
        return cache_dir() / "openvino" / openvino_ir_tag(self.cache_key, shape, self.ov.__version__) / "model.xml"

    def _shipped_path(self, shape: tuple[int, ...]) -> Path | None:
        if not self.cache_key or self.shipped_dir is None:
            return None
        return self.shipped_dir / openvino_ir_tag(self.cache_key, shape, self.ov.__version__) / "model.xml"

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

    def _error(self, compiled, shape: tuple[int, ...]) -> float:
        """max |compiled - eager| / range(eager) on a seeded random input of ``shape``."""
        probe = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = self.network(probe).float()
        got = torch.from_numpy(np.array(compiled({0: probe.numpy()})[0]))
        span = float(expected.max() - expected.min()) or 1.0
        return float((got - expected).abs().max()) / span if got.shape == expected.shape else float("inf")

    def convert(self, shape: tuple[int, ...]):
        """Convert the network for input ``shape`` and verify it; returns ``(model, compiled)``.

        Raises:
            ConversionMismatchError: the conversion does not compute the network's function.
        """
        ov = self.ov
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about the networks' shape checks
            model = ov.convert_model(
                self.network, example_input=torch.zeros(shape), input=[ov.PartialShape(list(shape))]
            )
        compiled = self._compile(model)
        error = self._error(compiled, shape)
        if not error <= VERIFY_TOLERANCE:
            raise ConversionMismatchError(
                f"OpenVINO conversion for input {shape} differs from the network "
                f"(max error {error:.1e} of the output range)"
            )
        return model, compiled

    def _read_verified(self, path: Path | None, shape: tuple[int, ...]):
        """The compiled model stored at ``path`` if it computes the network's function, else None."""
        if path is None or not path.is_file():
            return None
        try:
            compiled = self._compile(self.core.read_model(str(path)))
            error = self._error(compiled, shape)
        except Exception as error:  # a damaged or truncated IR: OpenVINO raises RuntimeError
            log.warning("stored OpenVINO model %s unreadable (%s): converting again", path.parent.name, error)
            return None
        if error <= VERIFY_TOLERANCE:
            return compiled
        log.warning(
            "stored OpenVINO model %s does not compute this network (max error %.1e): converting again",
            path.parent.name,
            error,
        )
        return None

    def _load(self, shape: tuple[int, ...]):
        for source, path in (("shipped", self._shipped_path(shape)), ("cache", self._cache_path(shape))):
            compiled = self._read_verified(path, shape)
            if compiled is not None:
                self.sources[shape] = source
                return compiled
        model, compiled = self.convert(shape)
        self.sources[shape] = "converted"
        path = self._cache_path(shape)
        if path is not None:
            try:
                save_openvino_model(self.ov, model, path.parent)
            except OSError as error:  # a read-only home
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


def save_openvino_model(ov, model, folder: Path) -> Path:
    """Write ``model`` as ``folder/model.xml`` + ``.bin`` (float32 weights) atomically: into a
    temporary sibling folder renamed onto ``folder`` (an existing one is replaced)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / "model.xml"


def prepare_openvino(network: nn.Module, weights_key: str, shapes: list[tuple[int, ...]], folder: Path) -> list[Path]:
    """Convert ``network`` for each input shape ``(N, C, *window)``, verify each conversion and
    write it under ``folder/<tag>/`` (:func:`openvino_ir_tag`), so that a Predictor finds it
    instead of converting on first use (model export, bundled models).

    Raises:
        ImportError: OpenVINO is not installed.
        ConversionMismatchError: a conversion does not compute the network's function.
    """
    forward = _OpenVINOForward(network.eval(), weights_key)
    written = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        model, _ = forward.convert(shape)
        written.append(
            save_openvino_model(forward.ov, model, folder / openvino_ir_tag(weights_key, shape, forward.ov.__version__))
        )
    return written


def prepare_package(package) -> list[Path]:
    """Ship a package's OpenVINO model: convert its network for the CPU window shape the
    Predictor uses (``(1, C, *patch_size)``: one window per call on the CPU) into
    ``<package>/runtime/openvino/`` (:func:`prepare_openvino`). Returns the written ``model.xml``
    paths; nothing for nuclei packages (they run eagerly).

    Raises:
        ImportError, ConversionMismatchError: see :func:`prepare_openvino`.
    """
    card = package.card
    if card.task != "segmentation":
        return []
    channels = int(card.network.config.get("in_channels", 1))
    shape = (1, channels, *(int(p) for p in card.patch_size))
    return prepare_openvino(package.load_network("cpu"), package.weights_sha256, [shape], package.runtime_dir)


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
