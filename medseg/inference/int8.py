"""An int8 model of a package's network: NNCF post-training quantisation of its OpenVINO model.

:func:`quantize_package` reads the package's float32 OpenVINO model (the shipped IR under
``<package>/runtime/openvino/<tag>/``, verified against its stored reference, or a new conversion
by :func:`~medseg.inference.runtime.prepare_package`), quantises it with ``nncf.quantize`` on
calibration windows and writes the int8 model to ``<package>/runtime/openvino-int8/<tag>/``
(same tag, :func:`~medseg.inference.runtime.openvino_ir_tag`), where the ``openvino_int8``
runtime finds it. ``medseg quantize`` runs it on training cases of the model's fold and measures
the Dice change on the fold's validation cases (:mod:`medseg.commands.quantize`).

Calibration windows are exactly what inference feeds the network (:class:`~medseg.inference.
predictor.Predictor`): the image to the model grid (:class:`~medseg.preprocess.ModelGrid`: the
card's orientation and spacing in mm), each channel normalised with the card's scheme
(:func:`~medseg.preprocess.normalize_intensity`), padded with zeros to at least the patch size
(the sliding window's symmetric split), and cut into windows of the card's patch size on the
sliding-window grid at the card's overlap (:func:`~medseg.inference.engine.scan_interval`,
:func:`~medseg.inference.engine.window_slices`), each ``(1, C, *patch_size)`` float32 (divided by
its maximum where the card says ``window_max``).

Method: NNCF's default post-training quantisation for OpenVINO models (min-max range
statistics of activations on the calibration set, 8-bit per-channel symmetric weights,
FastBiasCorrection), with ``preset`` ``mixed`` (symmetric weights, asymmetric activations: the
default here, for the LeakyReLU networks) or ``performance`` (symmetric both, NNCF's default) for
the CPU target. On the hippocampus U-Net both kept Dice within 0.05 points of float32 and ran
2.5-2.8x faster per window on an AVX-512 VNNI CPU (``medseg quantize``). References: Kozlov et
al., "Neural Network Compression Framework for fast model inference", arXiv:2002.08679 (2020);
OpenVINO's "Basic Quantization Flow" guide (nncf.quantize, presets, subset_size of 300):
    https://docs.openvino.ai/2025/openvino-workflow/model-optimization-guide/quantizing-models-post-training/basic-quantization-flow.html

Privacy: NNCF reports usage through ``openvino_telemetry`` (Google Analytics) unless that module
is missing; :func:`import_nncf` makes it unimportable before NNCF is imported and replaces NNCF's
telemetry object with its own no-op stub in any case.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from medseg.io.image import Image
    from medseg.package import ModelCard, ModelPackage

log = logging.getLogger(__name__)

#: NNCF quantisation presets for the CPU (``nncf.QuantizationPreset``)
PRESETS = ("mixed", "performance")
#: calibration windows used at most (NNCF's own default subset size)
DEFAULT_SUBSET_SIZE = 300


@dataclass
class QuantizeResult:
    """What :func:`quantize_package` made.

    Attributes:
        path: the int8 ``model.xml`` (with ``model.bin`` and ``reference.npz`` beside it).
        images: calibration images read.
        windows: calibration windows given to NNCF.
        seconds: wall-clock seconds of ``nncf.quantize``.
        preset: ``mixed`` or ``performance``.
        shape: the model's input shape ``(1, C, *patch_size)``.
        float32_source: ``"shipped"`` (the package's IR, verified) or ``"converted"``.
        nncf_version, openvino_version: what made it.
    """

    path: Path
    images: int
    windows: int
    seconds: float
    preset: str
    shape: tuple[int, ...]
    float32_source: str
    nncf_version: str
    openvino_version: str


def import_nncf():
    """``nncf``, imported so that it sends no telemetry: ``openvino_telemetry`` is made
    unimportable first (:func:`~medseg.inference.runtime._block_openvino_telemetry`; NNCF then
    uses its no-op stub), and NNCF's telemetry object is replaced by that stub in any case (for
    a process where ``openvino_telemetry`` was imported before).

    Raises:
        ImportError: NNCF is not installed (``pip install medseg[int8]``).
    """
    from medseg.inference.runtime import _block_openvino_telemetry

    _block_openvino_telemetry()
    fresh = "nncf" not in sys.modules
    blocked = fresh and sys.modules.get("openvino_telemetry", False) is not None
    saved = sys.modules.get("openvino_telemetry")
    if blocked:  # loaded by someone else: hide it while NNCF is imported
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
    try:
        import nncf
        from nncf.telemetry import decorator, wrapper
    finally:
        if blocked:
            if saved is None:
                sys.modules.pop("openvino_telemetry", None)
            else:
                sys.modules["openvino_telemetry"] = saved
    stub = wrapper.NNCFTelemetryStub()
    wrapper.telemetry = decorator.telemetry = stub
    return nncf


def input_shape(card: ModelCard) -> tuple[int, ...]:
    """The CPU window shape the Predictor runs: ``(1, C, *patch_size)``."""
    return (1, int(card.network.config.get("in_channels", 1)), *(int(p) for p in card.patch_size))


def inference_windows(card: ModelCard, image: Image) -> Iterator[np.ndarray]:
    """Every window inference feeds the network for ``image`` (module docstring), in the sliding
    window's order, each a new float32 ``(1, C, *patch_size)`` array.

    Args:
        card: the model card (spacing in mm, orientation, normalisation, patch size, overlap).
        image: ``array`` ``(I, J, K)`` or ``(I, J, K, C)`` with its voxel -> RAS+ mm affine.

    Raises:
        ValueError: the image has not the card's number of channels.
    """
    from medseg.inference.engine import scan_interval, window_slices
    from medseg.preprocess import ModelGrid, normalize_intensity, window_max_normalize

    channels_in = int(card.network.config.get("in_channels", 1))
    array = np.asarray(image.array)
    channels = array[None] if array.ndim == 3 else np.moveaxis(array, 3, 0)
    if array.ndim not in (3, 4) or channels.shape[0] != channels_in:
        raise ValueError(f"image {tuple(array.shape)}: the model expects {channels_in} channel(s)")
    grid = ModelGrid(array.shape[:3], image.affine, card.spacing, card.orientation)
    model_input = grid.to_model(channels)
    for c in range(model_input.shape[0]):
        model_input[c] = normalize_intensity(model_input[c], card.normalization)
    roi = tuple(int(p) for p in card.patch_size)
    if len(roi) == 3:
        batch = model_input[None]  # (1, C, I, J, K)
    else:  # 2D model: the slices along the last axis are the batch
        batch = np.ascontiguousarray(model_input.transpose(3, 0, 1, 2))
    spatial = batch.shape[2:]
    if any(s < r for s, r in zip(spatial, roi)):  # the sliding window's zero padding
        widths = [(0, 0), (0, 0)] + [
            ((r - s) // 2, r - s - (r - s) // 2) if r > s else (0, 0) for s, r in zip(spatial, roi)
        ]
        batch = np.pad(batch, widths, mode="constant", constant_values=0.0)
    size = batch.shape[2:]
    slices = window_slices(size, roi, scan_interval(size, roi, (float(card.overlap),) * len(roi)))
    for item in batch:
        for window in slices:
            x = np.ascontiguousarray(item[(slice(None), *window)][None], dtype=np.float32)
            yield window_max_normalize(x) if card.normalization.window_max else x


def calibration_windows(
    card: ModelCard, images: Sequence[Image | str | os.PathLike], subset_size: int = DEFAULT_SUBSET_SIZE
) -> list[np.ndarray]:
    """At most ``subset_size`` inference windows (:func:`inference_windows`) spread evenly over
    ``images`` (about ``subset_size / len(images)`` evenly spaced windows of each), so that host
    memory holds only those. Paths are read with :func:`medseg.io.read_image`.

    Raises:
        ValueError: no images, or an image with the wrong number of channels.
        medseg.errors.MedsegError: an unreadable image file.
    """
    if not images:
        raise ValueError("quantisation needs at least one calibration image")
    subset_size = max(int(subset_size), 1)
    per_image = math.ceil(subset_size / len(images))
    windows: list[np.ndarray] = []
    for source in images:
        if isinstance(source, (str, os.PathLike)):
            from medseg.io import read_image

            source = read_image(source)
        found = list(inference_windows(card, source))
        keep = sorted({int(round(i)) for i in np.linspace(0, len(found) - 1, min(per_image, len(found)))})
        windows += [found[i] for i in keep]
    if len(windows) > subset_size:
        windows = [windows[int(round(i))] for i in np.linspace(0, len(windows) - 1, subset_size)]
    return windows


def _float32_model(package: ModelPackage, shape: tuple[int, ...]):
    """``(ov.Model, source)``: the package's shipped float32 IR for ``shape`` if it verifies against
    its stored reference (or the network), else a new verified conversion written into the package
    (:func:`~medseg.inference.runtime.prepare_package`)."""
    from medseg.inference.runtime import _OpenVINOForward, prepare_package

    forward = _OpenVINOForward(lambda: package.load_network("cpu"), package.check_weights(), package.runtime_dir)
    path = forward._shipped_path(shape)
    if forward._read_verified(path, shape) is not None:
        return forward.core.read_model(str(path)), "shipped"
    written = [p for p in prepare_package(package) if p.parent.name == path.parent.name]
    return forward.core.read_model(str(written[0])), "converted"


@contextmanager
def _nncf_threads(threads: int | None):
    """NNCF compiles its statistics model with a new ``ov.Core()`` on every core; with
    ``threads``, its engine's cores are limited to that many threads while quantising."""
    try:
        from nncf.openvino import engine
    except ImportError:  # pragma: no cover - another NNCF layout
        yield
        return
    if not threads or not hasattr(engine, "ov"):
        yield
        return
    import openvino as ov

    class _Threaded:
        def __getattr__(self, name: str) -> Any:
            return getattr(ov, name)

        @staticmethod
        def Core() -> Any:  # noqa: N802 - openvino's name
            core = ov.Core()
            core.set_property("CPU", {"INFERENCE_NUM_THREADS": int(threads)})
            return core

    original = engine.ov
    engine.ov = _Threaded()
    try:
        yield
    finally:
        engine.ov = original


def quantize_package(
    package: ModelPackage,
    calibration_images: Sequence[Image | str | os.PathLike],
    subset_size: int = DEFAULT_SUBSET_SIZE,
    preset: str = "mixed",
) -> QuantizeResult:
    """Quantise ``package``'s OpenVINO model to int8 and write it into the package.

    Args:
        package: a segmentation :class:`~medseg.package.ModelPackage` (written into:
            ``runtime/openvino-int8/<tag>/model.xml`` + ``model.bin`` + ``reference.npz``,
            atomically, replacing an earlier one; and ``runtime/openvino/<tag>/`` when its float32
            IR had to be converted).
        calibration_images: images (:class:`~medseg.io.image.Image`, ``array`` ``(I, J, K[, C])``
            in the modality's units, e.g. MR intensities or HU, with a voxel -> RAS+ mm affine)
            or paths :func:`medseg.io.read_image` reads: TRAINING cases, never the cases the Dice
            change is measured on.
        subset_size: calibration windows ``(1, C, *patch_size)`` at most (:func:`calibration_windows`).
        preset: ``mixed`` (asymmetric activations) or ``performance`` (symmetric).

    Returns:
        :class:`QuantizeResult`. The stored reference is the int8 model's output on the seeded
        probe (:func:`~medseg.inference.runtime.probe`), bound to the weights' sha256, the input
        shape and the int8 files' sha256, so the ``openvino_int8`` runtime refuses a changed or
        damaged model.

    Raises:
        ImportError: NNCF or OpenVINO is not installed.
        ValueError: a nuclei package, a package holding folds, an unknown ``preset``, no
            calibration image, or an image with the wrong number of channels.
        medseg.errors.UnreadableFileError: the weights do not match the card.
        ConversionMismatchError: the float32 conversion does not compute the network's function.
        Int8ModelError: the written int8 model does not read back.
    """
    from medseg.inference.runtime import _OpenVINOInt8Forward, cpu_threads, openvino_ir_tag, probe, save_openvino_model

    card = package.card
    if card.task != "segmentation":
        raise ValueError(f"{package.path.name}: only segmentation packages are quantised (task {card.task})")
    if card.folds:
        raise ValueError(f"{package.path.name}: a cross-validation ensemble; quantise each fold's package instead")
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: choose from {', '.join(PRESETS)}")
    nncf = import_nncf()
    import openvino as ov

    shape = input_shape(card)
    key = package.check_weights()
    model, source = _float32_model(package, shape)
    windows = calibration_windows(card, calibration_images, subset_size)
    start = time.perf_counter()
    with _nncf_threads(cpu_threads()):
        quantized = nncf.quantize(
            model,
            nncf.Dataset(windows),
            preset=nncf.QuantizationPreset.MIXED if preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE,
            target_device=nncf.TargetDevice.CPU,
            subset_size=len(windows),
        )
    seconds = time.perf_counter() - start
    reader = _OpenVINOInt8Forward(lambda: package.load_network("cpu"), key, package.runtime_dir)
    output = reader._run(reader._compile(quantized), probe(shape))
    folder = package.int8_runtime_dir / openvino_ir_tag(key, shape, ov.__version__)
    path = save_openvino_model(ov, quantized, folder, (key, shape, output))
    reader._load(shape)  # reads back and verifies, else Int8ModelError
    return QuantizeResult(
        path=path,
        images=len(calibration_images),
        windows=len(windows),
        seconds=round(seconds, 2),
        preset=preset,
        shape=shape,
        float32_source=source,
        nncf_version=nncf.__version__,
        openvino_version=ov.__version__.split("-")[0],
    )
