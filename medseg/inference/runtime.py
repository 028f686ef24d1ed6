"""How the network runs: the same function, computed faster.

Runtimes (``Predictor(runtime=...)``):

- ``eager``: the network as built (PyTorch eager).
- ``channels_last``: a copy of the network in channels-last memory format (NDHWC / NHWC) with
  group-norm instance norms (:mod:`medseg.inference.channels_last`).
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
  A stored IR is never trusted: before first use in a process it is compiled and checked on a
  seeded probe against the eager network's output, which was stored beside it at conversion
  (``reference.npz``, bound to the weights' sha256 and to the IR files' sha256), or against the
  eager network itself when that reference is missing or does not match; a stale, foreign or
  damaged IR is converted again. So a package that ships its IR runs without building the
  network, and NumPy in, NumPy out, without importing PyTorch at all. The IR does not depend on
  the CPU: OpenVINO compiles it for the CPU at hand when it is loaded (about 0.2 s here), so one
  shipped IR serves every machine.
- ``openvino_int8``: an int8 model of the network (NNCF post-training quantisation, made by
  ``medseg quantize``, :mod:`medseg.inference.int8`) shipped in the package under
  ``runtime/openvino-int8/<tag>/`` (:data:`INT8_DIR`, same tag as the float32 model), never made
  on the fly. It is bound to the weights and its model files by the int8 output stored beside it
  (:data:`REFERENCE`); a missing, changed or damaged int8 model is not used: the runtime falls
  back to ``openvino`` (float32) with a warning and ``fallback_reason``. Its Dice change is
  measured on the validation fold and stated in the card (:class:`medseg.package.Int8Runtime`).
- ``auto``: ``openvino`` on the CPU (``channels_last`` if OpenVINO is missing); ``channels_last``
  plus float16 autocast on CUDA (set by the Predictor through the engine's ``half_precision``).

Measured on this project's 2-core AMD EPYC (AVX2), 3D U-Net (nnU-Net 3d_fullres), one 96^3
window, one thread, CPU seconds: eager 7.2, channels_last 6.3, compile 5.3, openvino 4.4 (see
``benchmarks/sliding_window.py`` for the end-to-end tables). ONNX Runtime (MLAS 3D convolutions)
was slower than eager on the same CPU and is not offered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "eager", "channels_last", "compile", "openvino", "openvino_int8")

#: NumPy-native runtimes: they take and return NumPy arrays, so a Predictor using only them never
#: imports PyTorch when its network need not be built (a verified stored OpenVINO model)
NUMPY_RUNTIMES = ("openvino", "openvino_int8")


class NetworkRuntime:
    """A callable ``x (N, C, *spatial) -> logits (N, K, *spatial)`` running a network with one of
    :data:`RUNTIMES`; ``x`` is a NumPy array or a tensor and the logits come back as the same kind.

    Args:
        network: the network in eval mode, on ``device``; it is not modified (runtimes that
            change it work on a copy). ``None`` with ``load_network``.
        runtime: one of :data:`RUNTIMES`.
        spatial_dims: 2 or 3.
        batch_size: for ``compile`` and ``openvino``, the fixed window batch size that calls are
            padded to.
        device: where the network runs (``auto`` picks by it): ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        cache_key: identifies the weights for the OpenVINO cache (e.g. a hash of the weight
            file); without it the cache is not used.
        shipped_dir: a read-only folder of converted models shipped with the package
            (``<package>/runtime/openvino``), searched before the cache; ``openvino_int8`` reads
            its int8 models from the sibling :data:`INT8_DIR`.
        load_network: builds the network when it is first needed, instead of ``network``: the
            ``openvino`` runtime with a verified stored model never needs it (nor PyTorch).
        package_path: the model package the network comes from: a conversion on first use then
            runs in a child process (:func:`convert_package`), so that a converter crash becomes
            a fallback with its reason instead of killing this process.

    Raises:
        ValueError: unknown runtime; ``openvino(_int8)`` for a network not on the CPU; neither
            ``network`` nor ``load_network``.
        ImportError: ``openvino`` asked for and not installed.
    """

    def __init__(
        self,
        network: nn.Module | None,
        runtime: str = "auto",
        spatial_dims: int = 3,
        batch_size: int = 1,
        device: Any = "cpu",
        cache_key: str | None = None,
        shipped_dir: Path | None = None,
        load_network: Callable[[], nn.Module] | None = None,
        package_path: Path | None = None,
    ):
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
        if network is None and load_network is None:
            raise ValueError("NetworkRuntime needs a network or load_network")
        on_cpu = str(device).split(":")[0] == "cpu"
        if runtime == "auto":
            runtime = "openvino" if on_cpu and openvino_available() else "channels_last"
        if runtime in ("openvino", "openvino_int8") and not on_cpu:
            raise ValueError(f"the {runtime} runtime runs on the CPU only")
        self.name = runtime
        self.spatial_dims = spatial_dims
        self.batch_size = max(int(batch_size), 1)
        self.memory_format = None
        self._network = network.eval() if network is not None else None
        self._load_network = load_network
        #: why the runtime is not the one asked for (e.g. an OpenVINO conversion that failed
        #: verification and fell back to ``channels_last``); ``None`` when it is
        self.fallback_reason: str | None = None
        if self.name == "openvino":
            self._forward: Callable[[Any], Any] = _OpenVINOForward(
                self._network if self._network is not None else self._get_network,
                cache_key,
                shipped_dir,
                package_path,
            )
        elif self.name == "openvino_int8":
            self._forward = _OpenVINOInt8Forward(
                self._network if self._network is not None else self._get_network,
                cache_key,
                shipped_dir,
                package_path,
            )
        else:
            self._use_torch_runtime(self.name)

    def _get_network(self) -> nn.Module:
        if self._network is None:
            self._network = self._load_network().eval()
        return self._network

    @property
    def network(self) -> nn.Module:
        """The (original) network, built on first access when a loader was given."""
        return self._get_network()

    @property
    def numpy_native(self) -> bool:
        """Whether calls with NumPy arrays run without PyTorch (the ``openvino(_int8)`` runtimes)."""
        return self.name in NUMPY_RUNTIMES

    def _use_torch_runtime(self, name: str) -> None:
        import torch

        if _threads:  # set_cpu_threads may have run before PyTorch was loaded
            torch.set_num_threads(_threads)
        network = self._get_network()
        self.name = name
        if name in ("channels_last", "compile"):
            from medseg.inference.channels_last import channels_last_copy, memory_format

            network = channels_last_copy(network, self.spatial_dims)
            self.memory_format = memory_format(self.spatial_dims)
        self._forward = network
        if name == "compile":
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # constant-fold and prepack weights (inference only)
            self._forward = torch.compile(network, dynamic=False)

    def __call__(self, x: Any) -> Any:
        n = x.shape[0]
        padded = self.name in ("compile", "openvino", "openvino_int8") and n < self.batch_size
        if padded:  # one compiled shape
            x = _pad_batch(x, self.batch_size)
        try:
            out = self._call(x)
        except ConversionMismatchError as error:
            log.warning("%s; running the network with the channels_last runtime instead", error)
            self.fallback_reason = str(error)
            self._use_torch_runtime("channels_last")
            out = self._call(x)
        return out[:n] if padded else out

    def _call(self, x: Any) -> Any:
        if self.name == "openvino_int8":
            try:
                return self._forward(x)
            except Int8ModelError as error:  # never silently: a warning and the reason in reports
                log.warning("%s; running the float32 openvino runtime instead", error)
                self.fallback_reason = str(error)
                self.name, self._forward = "openvino", self._forward.float32()
        if self.name in NUMPY_RUNTIMES:
            return self._forward(x)
        import torch

        numpy = isinstance(x, np.ndarray)
        tensor = torch.from_numpy(np.ascontiguousarray(x)) if numpy else x
        if self.memory_format is not None:
            tensor = tensor.contiguous(memory_format=self.memory_format)
        with torch.inference_mode():
            out = self._forward(tensor)
        return out.float().numpy() if numpy else out


def _pad_batch(x: Any, size: int) -> Any:
    """``x`` ``(n, ...)`` with zero windows appended to ``size`` along the batch axis."""
    if isinstance(x, np.ndarray):
        return np.concatenate([x, np.zeros((size - x.shape[0], *x.shape[1:]), dtype=x.dtype)])
    import torch

    return torch.cat([x, x.new_zeros((size - x.shape[0], *x.shape[1:]))])


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


_threads: int | None = None


def set_cpu_threads(threads: int) -> None:
    """CPU threads for every runtime of this process: OpenVINO's (:func:`cpu_threads`) and, where
    PyTorch is loaded, ``torch.set_num_threads``."""
    global _threads
    _threads = max(int(threads), 1)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(_threads)


def cpu_threads() -> int | None:
    """Threads for the OpenVINO CPU plugin: :func:`set_cpu_threads`'s value, else PyTorch's
    setting where PyTorch is loaded, else ``$OMP_NUM_THREADS``, else ``None`` (OpenVINO's
    default: the physical cores, as PyTorch's)."""
    if _threads:
        return _threads
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


class ConversionMismatchError(RuntimeError):
    """A converted model does not compute the network's function (checked on first use)."""


#: largest max |converted - eager| / range(eager) accepted when verifying a conversion
VERIFY_TOLERANCE = 1e-3
#: the eager network's output on the seeded probe, stored beside a converted model
REFERENCE = "reference.npz"


def _block_openvino_telemetry() -> None:
    """Keep ``openvino.convert_model`` from sending usage events to Google Analytics.

    OpenVINO's converter reports each conversion through ``openvino_telemetry`` unless the user
    opted out in a consent file, a network call the user never configured. Marking the module as
    unimportable (before OpenVINO is imported) makes the converter fall back to its own no-op
    ``openvino.tools.ovc.telemetry_stub``.
    """
    if "openvino.tools.ovc.telemetry_utils" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
        sys.modules.setdefault("openvino_telemetry.backend", None)  # type: ignore[arg-type]
        return
    from openvino.tools.ovc import convert_impl, telemetry_stub, telemetry_utils  # already loaded

    telemetry_utils.tm = convert_impl.tm = telemetry_stub


def probe(shape: tuple[int, ...]) -> np.ndarray:
    """The seeded verification input ``shape`` (standard normal, float32)."""
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| / range(expected); infinite for another shape."""
    if got.shape != expected.shape:
        return float("inf")
    span = float(expected.max() - expected.min()) or 1.0
    return float(np.abs(got.astype(np.float32) - expected).max()) / span


def _files_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ("model.xml", "model.bin"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


class _OpenVINOForward:
    """``x (N, C, *window) -> logits`` (NumPy, or tensors for tensors) through an OpenVINO CPU
    model compiled per input shape.

    Each shape is converted with a static input shape (dynamic shapes mis-convert some networks,
    e.g. Swin UNETR's padding logic) and verified once against the eager network on a seeded
    input (:func:`probe`): max |openvino - eager| must be within :data:`VERIFY_TOLERANCE` of the
    eager output range, else :class:`ConversionMismatchError`. The eager output is stored with
    the converted model (:data:`REFERENCE`, with the weights' key and the sha256 of the model
    files), so a stored model is verified later against it without building the network or
    importing PyTorch. A stored model without a matching reference (other weights, shape or
    model files), or any stored model when the network is already built, is verified against
    the eager network.

    Args:
        network: the network, or a function that builds it (called only when needed).
        cache_key: the weights' sha256; without it nothing is stored or looked up.
        shipped_dir: the package's folder of converted models (read-only).
        package_path: the package the network comes from; conversions then run in a child
            process (:func:`convert_package`) and a failed one is remembered (:data:`FAILED`).
    """

    def __init__(
        self,
        network: nn.Module | Callable[[], nn.Module],
        cache_key: str | None,
        shipped_dir: Path | None = None,
        package_path: Path | None = None,
    ):
        _block_openvino_telemetry()
        import openvino as ov

        self.ov = ov
        self._network = network if _is_module(network) else None
        self._load_network = None if self._network is not None else network
        self.cache_key = cache_key
        self.shipped_dir = shipped_dir
        self.package_path = package_path
        #: extra CPU plugin settings of this conversion (:data:`COMPILE_OPTIONS`)
        self.options: dict[str, Any] = {}
        self.core = ov.Core()
        self.compiled: dict[tuple[int, ...], Any] = {}
        #: where each shape's compiled model came from: "shipped", "cache" or "converted"
        self.sources: dict[tuple[int, ...], str] = {}
        #: how each stored model was verified: "reference" (stored eager output) or "network"
        self.verified_by: dict[tuple[int, ...], str] = {}

    @property
    def network(self) -> nn.Module:
        if self._network is None:
            self._network = self._load_network()
        return self._network

    def _cache_path(self, shape: tuple[int, ...]) -> Path | None:
        if not self.cache_key:
            return None
        return cache_dir() / "openvino" / openvino_ir_tag(self.cache_key, shape, self.ov.__version__) / "model.xml"

    def _shipped_path(self, shape: tuple[int, ...]) -> Path | None:
        if not self.cache_key or self.shipped_dir is None:
            return None
        return self.shipped_dir / openvino_ir_tag(self.cache_key, shape, self.ov.__version__) / "model.xml"

    def _compile(self, model, options: dict[str, Any] | None = None):
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",  # never bf16/fp16, whatever the CPU supports
            # no pinning to cores: on a shared machine a pinned thread waits for its busy core
            # (benchmarks/threads.py: 0.73 against 0.86-1.02 s per case beside a competing process)
            "ENABLE_CPU_PINNING": False,
        }
        threads = cpu_threads()
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        return self.core.compile_model(model, "CPU", {**config, **(options or self.options)})

    def _eager(self, shape: tuple[int, ...]) -> np.ndarray:
        """The eager network's output on :func:`probe` of ``shape``."""
        import torch

        with torch.inference_mode():
            return self.network(torch.from_numpy(probe(shape))).float().numpy()

    def _run(self, compiled, x: np.ndarray) -> np.ndarray:
        return np.array(compiled({0: x})[0], copy=True)

    def convert(self, shape: tuple[int, ...]):
        """Convert the network for input ``shape`` and verify it; returns ``(model, compiled,
        eager output on the probe)``.

        Raises:
            ConversionMismatchError: the conversion does not compute the network's function.
        """
        import torch

        ov = self.ov
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about the networks' shape checks
            model = ov.convert_model(
                self.network, example_input=torch.zeros(shape), input=[ov.PartialShape(list(shape))]
            )
        compiled = self._compile(model)
        expected = self._eager(shape)
        error = _relative_error(self._run(compiled, probe(shape)), expected)
        if not error <= VERIFY_TOLERANCE:
            raise ConversionMismatchError(
                f"OpenVINO conversion for input {shape} differs from the network "
                f"(max error {error:.1e} of the output range)"
            )
        return model, compiled, expected

    def _reference(self, folder: Path, shape: tuple[int, ...]) -> np.ndarray | None:
        """The stored eager output for this model folder, if it belongs to these weights, this
        shape and exactly these model files."""
        path = folder / REFERENCE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                meta = json.loads(str(stored["meta"]))
                output = np.array(stored["output"], dtype=np.float32)
            if (
                meta.get("weights") != self.cache_key
                or tuple(meta.get("shape", ())) != tuple(shape)
                or meta.get("model_sha256") != _files_sha256(folder)
            ):
                return None
            return output
        except (OSError, ValueError, KeyError) as error:
            log.debug("reference %s unreadable: %s", path, error)
            return None

    def _read_verified(self, path: Path | None, shape: tuple[int, ...]):
        """The compiled model stored at ``path`` if it computes the network's function, else None."""
        if path is None or not path.is_file():
            return None
        try:
            compiled = self._compile(self.core.read_model(str(path)), _compile_options(path.parent))
            got = self._run(compiled, probe(shape))
        except Exception as error:  # a damaged or truncated IR: OpenVINO raises RuntimeError
            log.warning("stored OpenVINO model %s unreadable (%s): converting again", path.parent.name, error)
            return None
        # a network at hand is the ground truth; the stored reference stands in for it when
        # the network has not been built (it was computed from these weights at conversion)
        reference = self._reference(path.parent, shape) if self._network is None else None
        by = "reference" if reference is not None else "network"
        error = _relative_error(got, reference if reference is not None else self._eager(shape))
        if error <= VERIFY_TOLERANCE:
            self.verified_by[shape] = by
            return compiled
        log.warning(
            "stored OpenVINO model %s does not compute this network (max error %.1e): converting again",
            path.parent.name,
            error,
        )
        return None

    def _load(self, shape: tuple[int, ...]):
        stored = (("shipped", self._shipped_path(shape)), ("cache", self._cache_path(shape)))
        for source, path in stored:
            compiled = self._read_verified(path, shape)
            if compiled is not None:
                self.sources[shape] = source
                return compiled
        for _, path in stored:  # a conversion that failed before (same weights, shape, version)
            if path is not None and (path.parent / FAILED).is_file():
                raise ConversionFailedError(_failure_reason(path.parent / FAILED))
        cached = self._cache_path(shape)
        if self.package_path is not None and cached is not None:
            convert_package(self.package_path, shape, cached.parent)  # raises ConversionFailedError
            compiled = self._read_verified(cached, shape)
            if compiled is None:
                raise ConversionFailedError(f"OpenVINO conversion for input {shape} could not be verified")
            self.sources[shape] = "converted"
            return compiled
        model, compiled, expected = self.convert(shape)
        self.sources[shape] = "converted"
        path = self._cache_path(shape)
        if path is not None:
            try:
                save_openvino_model(self.ov, model, path.parent, (self.cache_key, shape, expected))
            except OSError as error:  # a read-only home
                log.debug("OpenVINO cache not written: %s", error)
        return compiled

    def __call__(self, x: Any) -> Any:
        shape = tuple(int(s) for s in x.shape)
        compiled = self.compiled.get(shape)
        if compiled is None:
            compiled = self.compiled[shape] = self._load(shape)
        if isinstance(x, np.ndarray):
            return self._run(compiled, np.ascontiguousarray(x, dtype=np.float32))
        import torch

        return torch.from_numpy(self._run(compiled, np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)))


#: the package's folder of int8 models, beside its float32 ``runtime/openvino``
INT8_DIR = "openvino-int8"
#: largest max |int8 - stored int8 output| / range on the probe accepted when loading an int8
#: model: int8 kernels differ with the CPU and thread count (1 vs 2 threads: 3e-2 on the
#: hippocampus U-Net here), so this only checks that the model runs and computes about what it
#: did at quantisation; any changed byte of the model files is caught by their sha256
INT8_VERIFY_TOLERANCE = 0.1


class Int8ModelError(RuntimeError):
    """The package has no usable int8 model (none for this input shape and OpenVINO version, or
    one changed or damaged after quantisation)."""


def int8_model_path(shipped_dir: Path | None, weights_key: str | None, shape: tuple[int, ...]) -> Path | None:
    """``<package>/runtime/openvino-int8/<tag>/model.xml`` for the weights' sha256 and input
    ``shape`` ``(N, C, *window)`` if it exists (not verified), else ``None``. ``shipped_dir`` is
    the package's float32 folder (:attr:`medseg.package.ModelPackage.runtime_dir`).

    Raises:
        ImportError: OpenVINO is not installed.
    """
    if shipped_dir is None or not weights_key:
        return None
    import openvino as ov

    path = Path(shipped_dir).parent / INT8_DIR / openvino_ir_tag(weights_key, shape, ov.__version__) / "model.xml"
    return path if path.is_file() else None


class _OpenVINOInt8Forward(_OpenVINOForward):
    """``x -> logits`` through the package's int8 model for ``x``'s shape (:data:`INT8_DIR`),
    never converted or quantised here. Before first use the model files must match the sha256
    in their stored reference (made at quantisation, with the weights' key and shape) and the
    compiled model's output on :func:`probe` must be within :data:`INT8_VERIFY_TOLERANCE` of the
    stored output; otherwise :class:`Int8ModelError` (:class:`NetworkRuntime` then falls back to
    :meth:`float32`)."""

    def _load(self, shape: tuple[int, ...]):
        path = int8_model_path(self.shipped_dir, self.cache_key, shape)
        if path is None:
            raise Int8ModelError(
                f"the model package has no int8 OpenVINO model for input {shape} and OpenVINO "
                f"{self.ov.__version__.split('-')[0]} (make one with `medseg quantize`)"
            )
        reference = self._reference(path.parent, shape)
        if reference is None:
            raise Int8ModelError(
                f"int8 OpenVINO model {path.parent.name} does not match its stored reference "
                "(changed or damaged after quantisation, or made for other weights)"
            )
        try:
            compiled = self._compile(self.core.read_model(str(path)))
            error = _relative_error(self._run(compiled, probe(shape)), reference)
        except Exception as failure:  # an unreadable IR: OpenVINO raises RuntimeError
            raise Int8ModelError(f"int8 OpenVINO model {path.parent.name} unreadable ({failure})") from None
        if not error <= INT8_VERIFY_TOLERANCE:
            raise Int8ModelError(
                f"int8 OpenVINO model {path.parent.name} does not compute its stored output "
                f"(max error {error:.1e} of the output range)"
            )
        self.sources[shape] = "shipped"
        self.verified_by[shape] = "reference"
        return compiled

    def float32(self) -> _OpenVINOForward:
        """The float32 ``openvino`` forward of the same network, weights and package."""
        network = self._network if self._network is not None else self._load_network
        return _OpenVINOForward(network, self.cache_key, self.shipped_dir, self.package_path)


def _is_module(network: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(network, torch.nn.Module)


def save_openvino_model(
    ov,
    model,
    folder: Path,
    reference: tuple[str, tuple[int, ...], np.ndarray] | None = None,
    compress_to_fp16: bool = False,
    options: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as ``folder/model.xml`` + ``.bin`` (float32 weights, or float16 with
    ``compress_to_fp16``: lossless for a network whose weights are stored in float16) atomically:
    into a temporary sibling folder renamed onto ``folder`` (an existing one is replaced). With
    ``reference`` = ``(weights key, input shape, eager output on the probe)``, also
    :data:`REFERENCE`, bound to the written model files by their sha256; with ``options``, the
    CPU plugin settings it must be compiled with (:data:`COMPILE_OPTIONS`)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=compress_to_fp16)
        if options:
            (tmp / COMPILE_OPTIONS).write_text(json.dumps(options))
        if reference is not None:
            key, shape, output = reference
            meta = {"weights": key, "shape": [int(s) for s in shape], "model_sha256": _files_sha256(tmp)}
            with open(tmp / REFERENCE, "wb") as handle:
                np.savez(handle, output=np.asarray(output, dtype=np.float32), meta=np.array(json.dumps(meta)))
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / "model.xml"


def prepare_openvino(network: nn.Module, weights_key: str, shapes: list[tuple[int, ...]], folder: Path) -> list[Path]:
    """Convert ``network`` for each input shape ``(N, C, *window)``, verify each conversion and
    write it under ``folder/<tag>/`` (:func:`openvino_ir_tag`) with its reference output, so that
    a Predictor finds it instead of converting on first use (model export, bundled models) and
    verifies it without building the network.

    Raises:
        ImportError: OpenVINO is not installed.
        ConversionMismatchError: a conversion does not compute the network's function.
    """
    forward = _OpenVINOForward(network.eval(), weights_key)
    written = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        model, _, expected = forward.convert(shape)
        tag = openvino_ir_tag(weights_key, shape, forward.ov.__version__)
        written.append(save_openvino_model(forward.ov, model, folder / tag, (weights_key, shape, expected)))
    return written


def prepare_package(package) -> list[Path]:
    """Ship a package's OpenVINO model: convert its network for the CPU window shape the
    Predictor uses (``(1, C, *patch_size)``: one window per call on the CPU) into
    ``<package>/runtime/openvino/<tag>/`` in a child process (:func:`convert_package`). Returns
    the written ``model.xml`` paths. A nuclei package converts its inference module
    (:func:`conversion_network`: NP logits + HV maps) for ``(1, 3, *patch_size)`` RGB windows.

    Raises:
        ImportError: OpenVINO is not installed.
        ConversionFailedError: the conversion crashed or does not compute the network's
            function; the reason is kept in ``<tag>/failed.json``, so the Predictor runs the
            network eagerly with that reason instead of trying again.
    """
    import openvino

    card = package.card
    if card.task not in ("segmentation", "nuclei"):
        return []
    channels = 3 if card.task == "nuclei" else int(card.network.config.get("in_channels", 1))
    shape = (1, channels, *(int(p) for p in card.patch_size))
    folder = package.runtime_dir / openvino_ir_tag(package.check_weights(), shape, openvino.__version__)
    convert_package(package.path, shape, folder)
    return [folder / "model.xml"]


class ConversionFailedError(ConversionMismatchError):
    """An OpenVINO conversion failed (crashed, raised or did not verify); the runtime falls back."""


#: marker left in a converted model's folder when its conversion failed: ``{"reason": ...}``
FAILED = "failed.json"


def _failure_reason(path: Path) -> str:
    try:
        return str(json.loads(path.read_text())["reason"])
    except (OSError, ValueError, KeyError):
        return "an earlier OpenVINO conversion failed"


def convert_package(package_path: Path, shape: tuple[int, ...], folder: Path, timeout: float = 3600) -> Path:
    """Convert a package's network for input ``shape`` into ``folder`` (model, reference output)
    in a child process, so that a crash of OpenVINO's converter or CPU plugin (seen here: a
    segmentation fault compiling the 2D TransUNet in float32) cannot take the caller down.

    Raises:
        ConversionFailedError: the child crashed, timed out or reported a mismatch; the reason is
            also written to ``folder/failed.json`` (replacing the folder), where
            :class:`NetworkRuntime` finds it and falls back without trying again.
    """
    import signal
    import subprocess

    code = "import sys; from medseg.inference.runtime import _convert_main; sys.exit(_convert_main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, str(package_path), json.dumps([int(s) for s in shape]), str(folder)]
    for options in ({}, SAFE_COMPILE_OPTIONS):  # a crash is retried once with the safer settings
        try:
            result = subprocess.run(
                [*argv, json.dumps(options)], capture_output=True, text=True, timeout=timeout, check=False
            )
            status, stderr = result.returncode, result.stderr
        except subprocess.TimeoutExpired:
            status, stderr = None, ""
        if status == 0 and (folder / "model.xml").is_file():
            return folder / "model.xml"
        if status is None or status >= 0:
            break
    if status is None:
        reason = f"OpenVINO conversion for input {tuple(shape)} timed out after {timeout:.0f} s"
    elif status < 0:
        name = signal.Signals(-status).name if -status in signal.Signals._value2member_map_ else str(-status)
        reason = f"OpenVINO conversion for input {tuple(shape)} crashed ({name})"
    else:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"OpenVINO conversion for input {tuple(shape)} failed (exit {status})"
    _write_failure(folder, reason)
    raise ConversionFailedError(reason)


def _write_failure(folder: Path, reason: str) -> None:
    try:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / FAILED).write_text(json.dumps({"reason": reason}))
    except OSError as error:  # a read-only package or cache
        log.debug("conversion failure not recorded: %s", error)


def conversion_network(package, device: Any = "cpu") -> nn.Module:
    """The module a package's Predictor calls per window, which is what gets converted: the
    network itself, or for a nuclei package :class:`~medseg.networks.hover.HoVerHead` around it
    (``(B, 3, H, W) -> (B, 4, H, W)``, NP logits + HV maps, as :class:`medseg.nuclei.NucleiPredictor`
    calls it)."""
    network = package.load_network(device)
    if package.card.task == "nuclei":
        from medseg.networks.hover import HoVerHead

        network = HoVerHead(network)
    return network.eval()


def _convert_main(argv: list[str]) -> int:
    """The child of :func:`convert_package`: ``PACKAGE SHAPE_JSON FOLDER``. Exit 0 when converted
    and verified; 3 with the reason on stderr when the conversion does not compute the network."""
    from medseg.package import ModelPackage

    package = ModelPackage(argv[0])
    shape = tuple(int(s) for s in json.loads(argv[1]))
    forward = _OpenVINOForward(conversion_network(package, "cpu"), package.check_weights())
    forward.options = json.loads(argv[3]) if len(argv) > 3 else {}
    try:
        model, _, expected = forward.convert(shape)
    except ConversionMismatchError as error:
        print(error, file=sys.stderr)
        return 3
    folder, reference = Path(argv[2]), (forward.cache_key, shape, expected)
    # float16 weights (medseg models install --fp16) make a float16 IR lossless: half the package
    half = package.card.weights_dtype == "float16"
    options = forward.options
    path = save_openvino_model(forward.ov, model, folder, reference, compress_to_fp16=half, options=options)
    if half and forward._read_verified(path, shape) is None:  # another constant was not float16-exact
        save_openvino_model(forward.ov, model, folder, reference, options=options)
    return 0


#: CPU plugin settings a conversion is retried with when compiling crashed: no "snippets" (the
#: plugin's JIT-fused subgraphs). The 2D TransUNet's float32 compile ends in SIGSEGV on this AVX-512
#: CPU with them and runs with this (same float32 arithmetic, verified like any conversion).
SAFE_COMPILE_OPTIONS = {"SNIPPETS_MODE": "DISABLE"}
#: a converted model's CPU plugin settings beyond the defaults, stored beside it
COMPILE_OPTIONS = "compile.json"


def _compile_options(folder: Path) -> dict[str, Any]:
    """The extra CPU plugin settings stored with a converted model (only known safe ones)."""
    try:
        options = json.loads((folder / COMPILE_OPTIONS).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in options.items() if SAFE_COMPILE_OPTIONS.get(k) == v} if isinstance(options, dict) else {}


def auto_sw_batch_size(
    runtime: Callable[[Any], Any],
    window: tuple[int, ...],
    in_channels: int,
    device: Any,
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
    if str(device).split(":")[0] != "cuda":
        return 1
    import torch

    device = torch.device(device)
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
