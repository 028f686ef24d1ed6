"""Nuclei in a tile of any size: the one inference path of ``medseg predict --model nuclei``, the
trainer's validation and the benchmarks.

Steps, for a :class:`~medseg.io.tile.Tile` ``(H, W, 3)``:

1. resample to the model's pixel size (``card.mpp``; the tile's own ``mpp``, or the model's when
   the tile states none), bilinear and antialiased;
2. normalise (``card.normalization``, CellViT's ``rgb``);
3. sliding window (:func:`medseg.inference.engine.sliding_window_inference`, the engine the
   volumes use) over the whole tile with the card's window and overlap and Gaussian blending of
   the NP logits and HV maps (:class:`~medseg.networks.hover.HoVerHead`), which a package's
   predictor runs through :class:`~medseg.inference.runtime.NetworkRuntime` (``auto``: the
   package's shipped OpenVINO model on the CPU, verified before use, with a fallback and its
   reason where conversion fails); :meth:`NucleiPredictor.from_network` (training validation)
   runs the network eagerly;
4. one watershed over the whole stitched map (:func:`~medseg.nuclei.postprocess.instances_from_hover`),
   so nuclei on window borders are whole and counted once;
5. the instance map back on the tile's pixel grid (nearest neighbour) when step 1 resampled.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from medseg.errors import InputShapeError
from medseg.inference.engine import sliding_window_inference
from medseg.inference.runtime import NUMPY_RUNTIMES, NetworkRuntime, openvino_available
from medseg.io.tile import Tile
from medseg.networks.hover import HoVerHead
from medseg.nuclei.postprocess import instances_from_hover
from medseg.nuclei.transforms import resample_tile, rgb_normalize
from medseg.package import ModelCard, ModelPackage, resolve_model


@dataclass
class NucleiPrediction:
    """What :meth:`NucleiPredictor.predict` found in one tile.

    Attributes:
        instances: ``(H, W)`` int32 instance map on the tile's pixel grid (0 background, 1..N).
        mpp: the tile's pixel size used (um/px): its own, or the model's when it stated none.
        mpp_source: ``"file"``, ``"given"`` or ``"assumed"`` (the model's, the tile stated none).
        seconds: time per step (``resample``, ``network``, ``watershed``, ``total``).
        runtime: the runtime that ran the network (``eager`` for :meth:`NucleiPredictor.from_network`).
        runtime_fallback: why it is not the runtime asked for (a failed OpenVINO conversion), or ``None``.
    """

    instances: np.ndarray
    mpp: float
    mpp_source: str
    seconds: dict[str, float] = field(default_factory=dict)
    runtime: str = "eager"
    runtime_fallback: str | None = None

    @property
    def count(self) -> int:
        """Number of nuclei."""
        return int(self.instances.max()) if self.instances.size else 0


class NucleiPredictor:
    """A nuclei model ready to segment tiles (module docstring for the steps).

    Args:
        package: a nuclei model package, its name (``"nuclei"``) or path.
        device: torch device of the network.
        sw_batch_size: windows per network call (default: 1 for OpenVINO, whose CPU model is
            compiled, and shipped, for one window; 4 otherwise).
        overlap: window overlap (default: the card's).
        tta: mirroring test-time augmentation (4 passes).
        runtime: one of :data:`medseg.inference.runtime.RUNTIMES` (``auto``: ``openvino`` on the
            CPU, ``channels_last`` on CUDA).

    Raises:
        ModelNotFoundError, UnreadableFileError: the package cannot be resolved or read.
        ValueError: the package is not a nuclei model.
    """

    def __init__(
        self,
        package: ModelPackage | str | os.PathLike,
        device: str | torch.device = "cpu",
        sw_batch_size: int | None = None,
        overlap: float | None = None,
        tta: bool = False,
        runtime: str = "auto",
    ):
        self.package = package if isinstance(package, ModelPackage) else resolve_model(package)
        if self.package.card.task != "nuclei":
            raise ValueError(f"model {self.package.card.name} is a {self.package.card.task} model, not a nuclei model")
        package = self.package
        if runtime == "auto":  # NetworkRuntime's choice, known here for the window batch
            on_cpu = torch.device(device).type == "cpu"
            runtime = "openvino" if on_cpu and openvino_available() else "channels_last"
        batch = int(sw_batch_size or (1 if runtime in NUMPY_RUNTIMES else 4))
        self._runtime = NetworkRuntime(
            None,
            runtime,
            spatial_dims=2,
            batch_size=batch,
            device=device,
            cache_key=package.check_weights(),
            shipped_dir=package.runtime_dir,
            load_network=lambda: HoVerHead(package.load_network(device)).eval(),
            package_path=package.path,
        )
        self._configure(package.card, None, device, batch, overlap, tta)

    @classmethod
    def from_network(
        cls, network: torch.nn.Module, card: ModelCard, device: str | torch.device = "cpu", sw_batch_size: int = 4
    ) -> NucleiPredictor:
        """A predictor for a network in memory (training validation): the same steps as a package."""
        self = cls.__new__(cls)
        self.package = None
        self._runtime = None
        self._configure(card, network, device, sw_batch_size, None, False)
        return self

    def _configure(self, card, network, device, sw_batch_size, overlap, tta) -> None:
        self.tta = bool(tta)
        self.card = card
        self.device = torch.device(device)
        self._head = HoVerHead(network).eval() if network is not None else None
        self.sw_batch_size = int(sw_batch_size)
        self.overlap = card.overlap if overlap is None else float(overlap)
        self.patch_size = tuple(int(p) for p in card.patch_size)

    @property
    def head(self) -> torch.nn.Module:
        """The eager inference module (:class:`HoVerHead`), built on first access for a package."""
        return self._head if self._runtime is None else self._runtime.network

    @property
    def runtime(self) -> str:
        """The runtime that runs the network (it may change on first use, by a fallback)."""
        return "eager" if self._runtime is None else self._runtime.name

    @property
    def runtime_fallback(self) -> str | None:
        """Why the runtime is not the one asked for, or ``None``."""
        return None if self._runtime is None else self._runtime.fallback_reason

    def hover_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Stitched NP logits and HV maps ``(1, 4, H, W)`` of a normalised image ``(1, 3, H, W)``
        on the model grid (mirroring TTA when on)."""

        network = self._head if self._runtime is None else self._runtime

        def window_pass(image: torch.Tensor) -> torch.Tensor:
            return sliding_window_inference(
                image, self.patch_size, self.sw_batch_size, network, overlap=self.overlap, mode="gaussian"
            ).float()

        if not self.tta:
            return window_pass(x)
        total = torch.zeros(0)
        for dims in ((), (3,), (2,), (2, 3)):
            out = window_pass(x.flip(dims)).flip(dims) if dims else window_pass(x)
            if 3 in dims:  # mirrored left-right: the horizontal map changes sign
                out[:, 2] = -out[:, 2]
            if 2 in dims:  # mirrored top-bottom: the vertical map changes sign
                out[:, 3] = -out[:, 3]
            total = out if total.numel() == 0 else total + out
        return total / 4

    @torch.inference_mode()
    def predict(self, tile: Tile, mpp: float | None = None) -> NucleiPrediction:
        """Segment the nuclei of ``tile``; ``mpp`` (um/px) overrides the tile's.

        Raises:
            InputShapeError: a tile smaller than 16 x 16 pixels.
        """
        t0 = time.perf_counter()
        if min(tile.shape[:2]) < 16:
            raise InputShapeError(f"{tile.name}: {tile.shape[1]}x{tile.shape[0]} pixels is too small for nuclei")
        source = "given" if mpp else "file" if tile.mpp else "assumed"
        used_mpp = float(mpp or tile.mpp or self.card.mpp)
        image = torch.from_numpy(np.ascontiguousarray(tile.array.transpose(2, 0, 1)))
        image, _ = resample_tile(image, None, used_mpp, self.card.mpp)
        x = rgb_normalize(image)[None].to(self.device)
        t1 = time.perf_counter()
        out = self.hover_maps(x)[0]
        t2 = time.perf_counter()
        instances = instances_from_hover(out[:2].cpu(), out[2:].cpu(), self.card.mpp)
        if instances.shape != tile.shape[:2]:
            grid = torch.from_numpy(instances)[None, None].float()
            instances = F.interpolate(grid, size=tile.shape[:2], mode="nearest-exact")[0, 0].numpy().astype(np.int32)
        t3 = time.perf_counter()
        seconds = {"resample": t1 - t0, "network": t2 - t1, "watershed": t3 - t2, "total": t3 - t0}
        seconds = {k: round(v, 3) for k, v in seconds.items()}
        return NucleiPrediction(instances, used_mpp, source, seconds, self.runtime, self.runtime_fallback)
