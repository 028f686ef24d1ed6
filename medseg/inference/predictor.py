"""The Predictor: a model package applied to an image, label map back on the image's own grid.

Steps (one implementation each, shared with training where training has them):

1. the image ``(I, J, K[, C])`` to the model grid: :class:`medseg.preprocess.ModelGrid` (MONAI
   ``Orientation`` to the card's orientation, MONAI ``Spacing`` to the card's spacing, bilinear);
2. intensity normalisation: :func:`medseg.preprocess.normalize_intensity` per channel with the
   card's scheme (and, where the card says ``window_max``, each window divided by its maximum as
   it enters the network, as training did per patch);
3. logits by :func:`medseg.inference.engine.sliding_window_inference` (Gaussian blending, the
   card's patch size and overlap), with mirroring test-time augmentation and several folds
   averaged per window (:class:`~medseg.inference.engine.MirrorEnsemble`), the network run by a
   :class:`~medseg.inference.runtime.NetworkRuntime`;
4. softmax in place, then the probabilities resampled back onto the input grid (MONAI
   ``SpatialResample``, bilinear) a few channels at a time while a running maximum keeps the
   argmax — so host memory holds one ``K x model voxels`` buffer, never a second one on the
   input grid;
5. post-processing (:func:`medseg.inference.postprocess.clean_label_map`) and per-label
   statistics (:func:`medseg.inference.statistics.label_statistics`).

Host memory for K classes, ``V`` model-grid voxels and ``U`` input voxels: the stitched logits
``K * V * 4`` bytes (2 with a float16 ``accumulator_dtype``) plus a ``V * 4`` weight map, turned
into probabilities in place; then ``8 * U * 4`` for a chunk of resampled channels and ``U * 5`` for
the running maximum and argmax. A 512 x 512 x 300 CT (``U = V`` = 78.6 M voxels) with 100 classes:
31.5 GB (float32) or 15.7 GB (float16) of logits + 0.3 GB weights + 2.9 GB, never a second
``K x voxels`` buffer (MONAI's softmax + ``Invertd`` chain holds two or three).

The label map's affine is the input affine (a copy, bit for bit), its shape the input shape.
Channel ``c`` of the network is label ``labels[c - 1]`` of the card sorted by id (channel 0 is
background).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import InputShapeError, ModalityMismatchError
from medseg.inference.budget import check_work, window_count
from medseg.inference.engine import MirrorEnsemble, grid_windows, sliding_window_inference
from medseg.inference.matching import modality_mismatch
from medseg.inference.postprocess import clean_label_map
from medseg.inference.runtime import NetworkRuntime, auto_sw_batch_size, set_cpu_threads
from medseg.inference.statistics import label_statistics
from medseg.io.image import Image
from medseg.package import ModelCard, ModelPackage, resolve_model
from medseg.preprocess import ModelGrid, normalize_intensity, window_max_normalize

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: probability channels resampled per step of the inverse resampling
CHANNEL_CHUNK = 8


@dataclass
class Prediction:
    """What :meth:`Predictor.predict` returns.

    Attributes:
        label_map: integer label map on the input image's grid (same shape, same affine).
        statistics: per label of the card: ``id``, ``name``, ``voxels``, ``volume_ml``,
            ``mean_intensity`` (input units, e.g. HU).
        timings: seconds per step (``preprocess``, ``inference``, ``resample``, ``postprocess``,
            ``statistics``, ``total``).
        probabilities: ``(K, I, J, K)`` float32 on the input grid when asked for, else ``None``.
        settings: what was run (runtime, device, window batch size, overlap, windows, ``passes``
            = ``folds`` x ``mirror_passes`` network evaluations per window, ``tta``).
    """

    label_map: Image
    statistics: list[dict]
    timings: dict[str, float]
    probabilities: np.ndarray | None = None
    settings: dict[str, Any] = field(default_factory=dict)


class Predictor:
    """A model package ready to segment images.

    Args:
        package: a :class:`~medseg.package.ModelPackage`, or a name/path for
            :func:`~medseg.package.resolve_model`.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        tta: mirroring test-time augmentation over ``mirror_axes`` (2**n passes per window);
            ``None`` (default): the card's ``tta_default`` (on for cross-validation ensembles).
        overlap: window overlap in ``[0, 1)`` (default: the card's).
        sw_batch_size: windows per network call (default: automatic, see
            :func:`~medseg.inference.runtime.auto_sw_batch_size`).
        runtime: see :mod:`medseg.inference.runtime` (default ``"auto"``; on the CPU ``auto`` is
            ``openvino_int8`` only where the card enables it, :func:`int8_enabled`).
        mirror_axes: spatial axes mirrored for TTA (default: all).
        folds: further packages (names or paths) of the same card whose networks are averaged
            with this one (cross-validation folds), after the folds the package itself holds
            (:attr:`~medseg.package.ModelCard.folds`, loaded automatically).
        accumulator_dtype: dtype of the stitched logits, NumPy or PyTorch (float16 halves host memory).
        half_precision: float16 autocast on CUDA (default: on for CUDA).
        threads: CPU threads for PyTorch (default: leave PyTorch's setting).
        max_windows: most network evaluations (windows x mirror passes x folds) one prediction
            may need (:func:`~medseg.inference.budget.planned_windows`); ``None``: no limit.

    Raises:
        ModelNotFoundError, UnreadableFileError: the package (or a fold it holds) cannot be
            resolved or read.
        ValueError: a fold's card does not match (labels, classes, spacing, patch size).
    """

    def __init__(
        self,
        package: ModelPackage | str | os.PathLike,
        device: Any = "cpu",
        tta: bool | None = None,
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        runtime: str = "auto",
        mirror_axes: Sequence[int] | None = None,
        folds: Sequence[ModelPackage | str | os.PathLike] = (),
        accumulator_dtype: Any = None,
        half_precision: bool | None = None,
        threads: int | None = None,
        max_windows: int | None = None,
    ):
        self.package = package if isinstance(package, ModelPackage) else resolve_model(package)
        if threads:
            set_cpu_threads(int(threads))
        packages = [self.package, *self.package.fold_packages()]
        packages += [f if isinstance(f, ModelPackage) else resolve_model(f) for f in folds]
        self._configure(self.package.card, device, overlap, max_windows)
        for other in packages[1:]:
            self._check_fold(other)
        self.accumulator_dtype = accumulator_dtype
        self.half_precision = self.device_type == "cuda" if half_precision is None else half_precision
        if runtime == "auto" and self.device_type == "cpu" and int8_enabled(packages):
            runtime = "openvino_int8"
        self._set_networks(
            [(None, _loader(p, self.device), p.check_weights(), p) for p in packages],
            runtime,
            self.package.card.tta_default if tta is None else bool(tta),
            mirror_axes,
            sw_batch_size,
        )

    @classmethod
    def from_network(
        cls,
        network: torch.nn.Module,
        card: ModelCard,
        device: Any = "cpu",
        tta: bool | None = None,
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        mirror_axes: Sequence[int] | None = None,
        max_windows: int | None = None,
    ) -> Predictor:
        """A Predictor for a network in memory (e.g. during training), no package on disk needed.

        Exactly the steps of a packaged model (model grid, normalisation, sliding window,
        inverse to the input grid, post-processing, statistics), so a model card's validation
        metrics are what users of the exported package get. The network runs eagerly (its
        weights may change between calls, so nothing is converted or cached); put it in eval
        mode first.

        Args:
            network: the network, on ``device``.
            card: what :meth:`predict` needs of a model card (network config, labels, spacing in
                mm, orientation, normalisation, patch size, overlap, post-processing).
            tta: mirroring TTA; ``None``: the card's ``tta_default``. The card's ``folds`` are
                ignored (one network).
        """
        self = cls.__new__(cls)
        self.package = None
        self._configure(card, device, overlap, max_windows)
        self.accumulator_dtype = None
        self.half_precision = False
        tta = card.tta_default if tta is None else bool(tta)
        self._set_networks([(network, None, None, None)], "eager", tta, mirror_axes, sw_batch_size)
        return self

    def _configure(self, card: ModelCard, device: Any, overlap: float | None, max_windows: int | None) -> None:
        self.card = card
        self.device = str(device)
        self.device_type = self.device.split(":")[0]
        self.spatial_dims = len(self.card.patch_size)
        self.overlap = float(self.card.overlap if overlap is None else overlap)
        self.max_windows = max_windows
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        self.in_channels = int(self.card.network.config.get("in_channels", 1))
        self.labels = sorted(self.card.labels, key=lambda label: label.id)
        # one output channel: a sigmoid binary model (SPOCKMIP), foreground where p > 0.5
        if self.card.num_classes != len(self.labels) + 1 and not (self.card.num_classes == 1 and len(self.labels) == 1):
            raise ValueError(
                f"model {self.card.name}: {self.card.num_classes} output channels but {len(self.labels)} labels"
            )
        self.label_lut = np.array(
            [0] + [label.id for label in self.labels], dtype=np.uint8 if self.labels[-1].id < 256 else np.uint16
        )

    def _set_networks(
        self,
        networks: list[
            tuple[torch.nn.Module | None, Callable[[], torch.nn.Module] | None, str | None, ModelPackage | None]
        ],
        runtime: str,
        tta: bool,
        mirror_axes: Sequence[int] | None,
        sw_batch_size: int | None,
    ) -> None:
        batch = sw_batch_size or 1
        self.runtimes = [
            NetworkRuntime(
                network,
                runtime,
                self.spatial_dims,
                batch,
                device=self.device,
                cache_key=key,
                shipped_dir=package.runtime_dir if package else None,
                load_network=load,
                package_path=package.path if package else None,
            )
            for network, load, key, package in networks
        ]
        self.runtime = self.runtimes[0].name
        if tta:
            axes = tuple(range(self.spatial_dims)) if mirror_axes is None else tuple(mirror_axes)
        else:
            axes = ()
        self.network = MirrorEnsemble(self.runtimes, mirror_axes=axes)
        self.sw_batch_size = sw_batch_size

    def _check_fold(self, other: ModelPackage) -> None:
        a, b = self.card, other.card
        if (
            [l.id for l in a.labels] != [l.id for l in b.labels]
            or a.num_classes != b.num_classes
            or tuple(a.spacing) != tuple(b.spacing)
            or tuple(a.patch_size) != tuple(b.patch_size)
            or a.orientation != b.orientation
            or a.normalization != b.normalization
        ):
            raise ValueError(
                f"fold {other.path} does not match model {a.name} (labels, spacing, "
                "patch size, orientation and normalisation must be equal)"
            )

    # ----------------------------------------------------------------------------------------
    def check_image(self, image: Image) -> None:
        """Raise if the image cannot go through this model.

        Raises:
            ModalityMismatchError: the image's ``meta["modality"]`` is set and not the card's.
            InputShapeError: wrong number of channels (4th axis) or not a 3D grid.
        """
        reason = modality_mismatch(str(image.meta.get("modality") or ""), self.card)
        if reason:
            raise ModalityMismatchError(f"{_series_name(image)}: {reason}")
        channels = image.array.shape[3] if image.array.ndim == 4 else 1
        if image.array.ndim not in (3, 4) or channels != self.in_channels:
            raise InputShapeError(
                f"{_series_name(image)}: array {tuple(image.array.shape)} has {channels} channel(s), "
                f"model {self.card.name} expects {self.in_channels}"
            )

    def predict(
        self, image: Image, progress: Callable[[int, int], None] | None = None, return_probabilities: bool = False
    ) -> Prediction:
        """Segment ``image``.

        Args:
            image: ``array`` ``(I, J, K)`` (or ``(I, J, K, C)`` for multi-channel models) with its
                voxel -> RAS+ affine.
            progress: ``callback(windows_done, windows_total)`` while the windows run.
            return_probabilities: also return the ``(K, I, J, K)`` probabilities on the input grid
                (costs one more ``K x input voxels`` float32 buffer).

        Returns:
            :class:`Prediction` whose ``label_map`` has ``image``'s shape and affine exactly.

        ``progress`` is also called between the stages (with ``(0, windows)`` before the windows
        and ``(windows, windows)`` after), so a caller can cancel by raising from it.

        Raises:
            ModalityMismatchError, InputShapeError: see :meth:`check_image`.
            WorkBudgetError: more network evaluations than ``max_windows``.
        """
        self.check_image(image)
        grid = ModelGrid(image.shape, image.affine, self.card.spacing, self.card.orientation)
        windows = window_count(grid, self.card, self.overlap) * self.network.passes
        check_work(windows, self.max_windows, _series_name(image))
        tick = progress or (lambda done, total: None)
        timings: dict[str, float] = {}
        start = clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[name] = round(now - clock, 4)
            clock = now

        array = np.asarray(image.array)
        channels = array[None] if array.ndim == 3 else np.moveaxis(array, 3, 0)
        tick(0, windows)
        # a new array: normalisation below works in place and must never reach the caller's array
        model_input = grid.to_model(channels)
        for c in range(model_input.shape[0]):
            model_input[c] = normalize_intensity(model_input[c], self.card.normalization)
        lap("preprocess")
        tick(0, windows)

        logits, settings = self._logits(model_input, progress)
        lap("inference")
        tick(windows, windows)

        logits = _probabilities_(logits)
        labels, probabilities = self._argmax_on_input_grid(
            logits, grid, return_probabilities, lambda: tick(windows, windows)
        )
        del logits
        lap("resample")
        tick(windows, windows)

        labels = self.label_lut[labels]
        clean_label_map(labels, image.spacing, self.card.postprocessing)
        lap("postprocess")

        intensities = array if array.ndim == 3 else array[..., 0]
        statistics = label_statistics(labels, image.affine, self.labels, intensities)
        lap("statistics")
        timings["total"] = round(time.perf_counter() - start, 4)

        label_map = Image(
            array=labels,
            affine=image.affine.copy(),
            meta={k: v for k, v in image.meta.items()},
            dicom_source=image.dicom_source,
        )
        label_map.meta["label_map"] = True
        settings.update(
            model_grid={
                "shape": list(grid.model_shape),
                "spacing": [round(s, 6) for s in self.card.spacing],
                "resampled": grid.resampled,
            }
        )
        return Prediction(
            label_map=label_map, statistics=statistics, timings=timings, probabilities=probabilities, settings=settings
        )

    # ----------------------------------------------------------------------------------------
    def _logits(self, model_input: np.ndarray, progress: Callable[[int, int], None] | None) -> tuple[np.ndarray, dict]:
        """``(C, *model_shape)`` -> logits ``(K, *model_shape)`` on the CPU (NumPy). With NumPy-native
        runtimes only (OpenVINO) the windows stay NumPy arrays and PyTorch is not needed."""
        roi = tuple(int(p) for p in self.card.patch_size)
        if self.spatial_dims == 3:
            batch = model_input[None]  # (1, C, I, J, K)
        else:  # 2D model: the slices along the last axis are the batch
            batch = np.ascontiguousarray(model_input.transpose(3, 0, 1, 2))  # (K, C, I, J)
        windows = grid_windows(batch.shape[2:], roi, self.overlap) * batch.shape[0]
        sw_batch_size = self.sw_batch_size or auto_sw_batch_size(
            self.runtimes[0], roi, self.in_channels, self.device, windows
        )
        if not all(runtime.numpy_native for runtime in self.runtimes):
            import torch

            batch = torch.from_numpy(batch)
            if self.device_type == "cuda":
                batch = batch.pin_memory()
        network = self.network
        if self.card.normalization.window_max:
            network = lambda windows: self.network(window_max_normalize(windows))  # noqa: E731
        logits = sliding_window_inference(
            batch,
            roi,
            sw_batch_size,
            network,
            overlap=self.overlap,
            mode="gaussian",
            sw_device=self.device,
            device="cpu",
            progress=progress or False,
            accumulator_dtype=self.accumulator_dtype or np.float32,
            half_precision=self.half_precision,
        )
        if not isinstance(logits, np.ndarray):
            logits = logits.numpy()
        logits = logits[0] if self.spatial_dims == 3 else logits.transpose(1, 2, 3, 0)
        self.runtime = self.runtimes[0].name  # may have fallen back on first use
        settings = {
            "runtime": self.runtime,
            "runtime_fallback": self.runtimes[0].fallback_reason,
            "device": str(self.device),
            "sw_batch_size": sw_batch_size,
            "overlap": self.overlap,
            "windows": windows,
            "passes": self.network.passes,  # folds x mirror passes
            "folds": len(self.network.networks),
            "tta": len(self.network.flips) > 1,
            "mirror_passes": len(self.network.flips),
            "half_precision": self.half_precision and self.device_type == "cuda",
        }
        return logits, settings

    def _argmax_on_input_grid(
        self, probabilities: np.ndarray, grid: ModelGrid, keep: bool, tick: Callable[[], None] = lambda: None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Resample ``(K, *model_shape)`` probabilities to the input grid a few channels at a
        time, keeping a running argmax; returns class indices ``(I, J, K)`` (uint8/uint16)."""
        classes = probabilities.shape[0]
        index_dtype = np.uint8 if classes <= 256 else np.uint16
        if not grid.resampled:
            labels = probabilities.argmax(0).astype(index_dtype)
            kept = probabilities.astype(np.float32) if keep else None
        else:
            best = np.full(grid.oriented_shape, -1.0, dtype=np.float32)
            labels = np.zeros(grid.oriented_shape, dtype=index_dtype)
            kept = np.empty((classes, *grid.oriented_shape), dtype=np.float32) if keep else None
            for first in range(0, classes, CHANNEL_CHUNK):
                tick()
                chunk = grid.to_oriented(probabilities[first : first + CHANNEL_CHUNK].astype(np.float32))
                for offset, channel in enumerate(chunk):
                    better = channel > best
                    np.maximum(best, channel, out=best)
                    labels[better] = first + offset
                if kept is not None:
                    kept[first : first + chunk.shape[0]] = chunk
        labels_np = np.ascontiguousarray(grid.to_input(labels))
        if kept is not None:
            kept = np.ascontiguousarray(grid.to_input(kept))
        return labels_np, kept


def int8_enabled(packages: Sequence[ModelPackage]) -> bool:
    """Whether ``auto`` runs ``packages`` (a package and its folds) with ``openvino_int8``: the
    first card's ``int8.enabled`` (``medseg quantize`` measured the Dice change within 0.5
    points), for these weights, and every package ships its int8 model for the CPU window
    ``(1, C, *patch_size)``. Otherwise ``auto`` stays as it was (float32 ``openvino``)."""
    card = packages[0].card
    setting = card.int8
    if setting is None or not setting.enabled or setting.weights_sha256 != card.weights_sha256:
        return False
    from medseg.inference.runtime import int8_model_path, openvino_available

    if not openvino_available():
        return False
    shape = (1, int(card.network.config.get("in_channels", 1)), *(int(p) for p in card.patch_size))
    return all(int8_model_path(p.runtime_dir, p.weights_sha256, shape) is not None for p in packages)


def _loader(package: ModelPackage, device: str) -> Callable[[], torch.nn.Module]:
    """Builds the package's network when a runtime first needs it."""
    return lambda: package.load_network(device)


def _probabilities_(logits: np.ndarray) -> np.ndarray:
    """Class probabilities ``(K, *spatial)`` from logits: softmax in place for ``K > 1``; for one
    channel (a sigmoid binary model) ``[1 - p, p]`` with ``p = sigmoid(logit)``, so the argmax that
    follows is the threshold ``p > 0.5`` (ties go to background)."""
    if logits.shape[0] == 1:
        p = 1.0 / (1.0 + np.exp(-logits.astype(np.float32)))
        return np.concatenate([1.0 - p, p]).astype(logits.dtype)
    return _softmax_(logits)


def _softmax_(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 of ``(K, *spatial)`` in place (no second ``K x voxels`` buffer)."""
    logits -= logits.max(0, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(0, keepdims=True, dtype=np.float32).astype(logits.dtype)
    return logits


def _series_name(image: Image) -> str:
    """A name for messages: the series UID or the file name, never patient data."""
    uid = image.meta.get("series_uid")
    if uid:
        return f"series {uid}" if image.dicom_source else os.path.basename(str(uid))
    source = image.meta.get("source")
    return os.path.basename(str(source)) if source else "image"
