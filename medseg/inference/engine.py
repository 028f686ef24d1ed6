"""Sliding-window inference: MONAI's function, with less overhead and bounded memory.

:func:`sliding_window_inference` takes the arguments of
:func:`monai.inferers.sliding_window_inference` and returns the same result (same window grid from
:func:`monai.data.utils.dense_patch_slices`, same importance map from
:func:`monai.data.utils.compute_importance_map`, same padding and cropping), but

- runs the predictor under :func:`torch.inference_mode` (optionally under float16 autocast on
  CUDA),
- caches the importance map between calls and computes it once per call otherwise,
- accumulates window outputs in place (``addcmul_``) into preallocated buffers, with no per-window
  temporaries when the windows run where the output lives,
- keeps the stitched output on ``device`` (e.g. the CPU) while windows run on ``sw_device`` (e.g.
  a GPU), copying each weighted window batch through pinned memory asynchronously so that the
  GPU computes the next batch while the CPU accumulates the last one,
- can accumulate in float16 (``accumulator_dtype``) to halve host memory for many classes.

Peak host memory of the stitching is ``B * K * prod(image_size) * itemsize`` for the output plus
``prod(image_size) * 4`` bytes for the weight (count) map: one class-sized buffer, never two.
For a 512 x 512 x 300 CT with K = 100 classes that is 31.5 GB in float32 or 15.7 GB in float16,
plus 0.31 GB for the weight map (see ``benchmarks/sliding_window.py --memory`` for a measurement
at reduced size and :func:`stitching_bytes` for the formula).

:class:`MirrorEnsemble` adds mirroring test-time augmentation and averaging over several networks
(cross-validation folds) as one predictor, so the engine itself stays a pure function of its
predictor.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.meta_tensor import MetaTensor
from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size
from monai.utils import (
    BlendMode,
    PytorchPadMode,
    convert_to_dst_type,
    ensure_tuple,
    ensure_tuple_rep,
    fall_back_tuple,
    look_up_option,
)

__all__ = ["sliding_window_inference", "MirrorEnsemble", "scan_interval", "stitching_bytes", "importance_map"]

ProgressCallback = Callable[[int, int], None]


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: Sequence[float]) -> tuple[int, ...]:
    """Window step per axis (voxels): ``int(roi * (1 - overlap))`` (at least 1), or ``roi`` when the
    window covers the axis — exactly MONAI's rule."""
    steps = []
    for size, roi, o in zip(image_size, roi_size, overlap):
        if roi == size:
            steps.append(int(roi))
        else:
            steps.append(max(int(roi * (1 - o)), 1))
    return tuple(steps)


@functools.lru_cache(maxsize=16)
def _cached_importance_map(
    patch_size: tuple[int, ...], mode: str, sigma_scale: tuple[float, ...], device: str, dtype: torch.dtype
) -> torch.Tensor:
    return compute_importance_map(patch_size, mode=mode, sigma_scale=sigma_scale, device=device, dtype=dtype)


def importance_map(
    patch_size: Sequence[int],
    mode: str = "constant",
    sigma_scale: Sequence[float] | float = 0.125,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """MONAI's window weight map ``patch_size`` (Gaussian: sigma = ``sigma_scale * size``, clamped
    to at least 1e-3 of its peak), cached per (size, mode, sigma, device, dtype). Read-only."""
    mode = look_up_option(mode, BlendMode).value
    patch = tuple(int(p) for p in patch_size)
    sigma = tuple(float(s) for s in ensure_tuple_rep(sigma_scale, len(patch)))
    return _cached_importance_map(patch, mode, sigma, str(torch.device(device)), dtype)


def stitching_bytes(
    image_size: Sequence[int], classes: int, batch_size: int = 1, accumulator_dtype: torch.dtype = torch.float32
) -> int:
    """Bytes the stitched output and its weight map take on the output device."""
    voxels = math.prod(int(s) for s in image_size)
    itemsize = torch.empty((), dtype=accumulator_dtype).element_size()
    return batch_size * classes * voxels * itemsize + voxels * 4


def _flatten(output: Any) -> tuple[list[Any] | None, tuple[torch.Tensor, ...]]:
    if isinstance(output, torch.Tensor):
        return None, (output,)
    if isinstance(output, Mapping):
        keys = sorted(output.keys())
        return keys, tuple(output[k] for k in keys)
    return None, tuple(ensure_tuple(output))


def _pack(outputs: list[torch.Tensor], keys: list[Any] | None) -> Any:
    if keys is not None:
        return dict(zip(keys, outputs))
    if len(outputs) == 1:
        return outputs[0]
    return tuple(outputs)


class _Stitcher:
    """Preallocated accumulator and weight map for one output of the predictor."""

    def __init__(
        self,
        batch_size: int,
        channels: int,
        image_size: Sequence[int],
        roi_size: Sequence[int],
        out_window: Sequence[int],
        slices: list[tuple[slice, ...]],
        weight: torch.Tensor,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.zoom = None
        if tuple(out_window) != tuple(roi_size):
            self.zoom = [o / float(r) for o, r in zip(out_window, roi_size)]
            weight = F.interpolate(weight[None, None], size=tuple(out_window), mode="nearest-exact")[0, 0]
        out_size = [int(s * z) for s, z in zip(image_size, self.zoom)] if self.zoom else list(image_size)
        self.output = torch.zeros([batch_size, channels, *out_size], dtype=dtype, device=device)
        self.weight_sw = weight  # on the window device, (*out_window)
        weight_out = weight.to(device=device, dtype=torch.float32)
        self.count = torch.zeros([1, 1, *out_size], dtype=torch.float32, device=device)
        self.slices = [self.scale(s) for s in slices]
        for s in self.slices:
            self.count[(0, 0, *s)] += weight_out

    def scale(self, window: tuple[slice, ...]) -> tuple[slice, ...]:
        if self.zoom is None:
            return tuple(window)
        return tuple(slice(int(s.start * z), int(s.stop * z)) for s, z in zip(window, self.zoom))

    def add_weighted(self, values: torch.Tensor, windows: list[tuple[int, int]]) -> None:
        """``values`` (N, K, *window) unweighted, on the output device: out += values * weight.
        A lower-precision accumulator gets the window cast first (no promoted temporaries)."""
        dtype = self.output.dtype
        weight = self.weight_sw.to(device=values.device, dtype=dtype)
        for value, (b, w) in zip(values, windows):
            self.output[(b, slice(None), *self.slices[w])].addcmul_(value.to(dtype), weight)

    def add(self, values: torch.Tensor, windows: list[tuple[int, int]]) -> None:
        """``values`` (N, K, *window) already weighted, on the output device: out += values."""
        for value, (b, w) in zip(values, windows):
            self.output[(b, slice(None), *self.slices[w])].add_(value)

    def finish(self) -> torch.Tensor:
        if self.output.dtype == self.count.dtype:
            self.output.div_(self.count)
        else:  # one channel at a time: no full-size temporary in the promoted dtype
            reciprocal = self.count[0].reciprocal()
            for c in range(self.output.shape[1]):
                self.output[:, c].mul_(reciprocal)
        return self.output


def sliding_window_inference(
    inputs: torch.Tensor,
    roi_size: Sequence[int] | int,
    sw_batch_size: int,
    predictor: Callable[..., Any],
    overlap: Sequence[float] | float = 0.25,
    mode: BlendMode | str = BlendMode.CONSTANT,
    sigma_scale: Sequence[float] | float = 0.125,
    padding_mode: PytorchPadMode | str = PytorchPadMode.CONSTANT,
    cval: float = 0.0,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool | ProgressCallback = False,
    roi_weight_map: torch.Tensor | None = None,
    process_fn: Callable | None = None,
    buffer_steps: int | None = None,
    buffer_dim: int = -1,
    with_coord: bool = False,
    *args: Any,
    accumulator_dtype: torch.dtype | None = None,
    half_precision: bool = False,
    **kwargs: Any,
) -> Any:
    """Sliding-window inference of ``predictor`` over ``inputs``; MONAI's arguments and result.

    Args:
        inputs: ``(B, C, H, W[, D])`` tensor or MetaTensor (meta is carried to the output).
        roi_size: window size per spatial axis (non-positive or ``None`` entries: whole axis).
        sw_batch_size: windows per predictor call.
        predictor: ``predictor(windows, *args, **kwargs)`` with ``windows`` ``(N, C, *roi_size)``,
            returning a tensor ``(N, K, *out_window)``, a tuple of them or a dict of them; output
            windows may have another resolution than input windows (``out_window / roi_size``
            must then give integer output coordinates, as in MONAI).
        overlap: fraction of overlap between neighbouring windows per axis, in ``[0, 1)``.
        mode: ``"constant"`` or ``"gaussian"`` blending.
        sigma_scale: Gaussian sigma per axis as a fraction of the window size.
        padding_mode, cval: how inputs smaller than the window are padded (then cropped back).
        sw_device: device the windows are computed on (default: the inputs' device).
        device: device of the stitched output (default: the inputs' device). With a CUDA
            ``sw_device`` and a CPU ``device`` the host accumulates while the GPU computes.
        progress: ``True`` for a tqdm bar, or ``callback(windows_done, windows_total)``.
        roi_weight_map: precomputed weight map ``roi_size`` (used when the window fits the image).
        process_fn, buffer_steps, buffer_dim: MONAI's per-window post-processing and on-device
            buffering; when given, the call is delegated to MONAI's implementation unchanged.
        with_coord: call ``predictor(windows, window_slices, *args, **kwargs)`` (MONAI's slices:
            ``[batch slice, channel slice, *spatial slices]`` per window).
        accumulator_dtype: dtype of the stitched output (default: the inputs' dtype); float16
            halves host memory for many classes at ~1e-3 relative precision.
        half_precision: run the predictor under float16 autocast when ``sw_device`` is CUDA
            (ignored on CPU, where float16 convolutions are slow).

    Returns:
        The stitched predictor output ``(B, K, *spatial)`` (tensor, tuple or dict like the
        predictor's), on ``device``, in ``accumulator_dtype``.

    Raises:
        ValueError: inputs do not have ``len(roi_size) + 2`` dimensions, or overlap outside [0, 1).
    """
    if process_fn is not None or (buffer_steps is not None and buffer_steps > 0):
        from monai.inferers import sliding_window_inference as monai_sliding_window_inference

        with torch.inference_mode():
            return monai_sliding_window_inference(
                inputs,
                roi_size,
                sw_batch_size,
                predictor,
                overlap,
                mode,
                sigma_scale,
                padding_mode,
                cval,
                sw_device,
                device,
                bool(progress),
                roi_weight_map,
                process_fn,
                buffer_steps,
                buffer_dim,
                with_coord,
                *args,
                **kwargs,
            )

    num_spatial_dims = inputs.ndim - 2
    if isinstance(roi_size, Sequence) and len(roi_size) != num_spatial_dims:
        raise ValueError(
            f"inputs must have {len(roi_size) + 2} dimensions for a {len(roi_size)}D "
            f"roi_size (B, C, *spatial), got shape {tuple(inputs.shape)}"
        )
    overlap = ensure_tuple_rep(overlap, num_spatial_dims)
    if any(o < 0 or o >= 1 for o in overlap):
        raise ValueError(f"overlap must be >= 0 and < 1, got {overlap}")
    compute_dtype = inputs.dtype
    accumulator_dtype = accumulator_dtype or compute_dtype
    batch_size, _, *image_size_ = inputs.shape
    device = torch.device(device) if device is not None else inputs.device
    sw_device = torch.device(sw_device) if sw_device is not None else inputs.device
    condition = kwargs.pop("condition", None)

    meta_template = None
    if isinstance(inputs, MetaTensor):
        meta_template = MetaTensor([]).copy_meta_from(inputs, copy_attr=False)
        inputs = inputs.as_tensor()
    roi_size = fall_back_tuple(roi_size, image_size_)

    # pad inputs smaller than the window (MONAI's symmetric split)
    image_size = tuple(max(image_size_[i], roi_size[i]) for i in range(num_spatial_dims))
    pad_size: list[int] = []
    for k in range(inputs.ndim - 1, 1, -1):
        diff = max(roi_size[k - 2] - inputs.shape[k], 0)
        pad_size.extend([diff // 2, diff - diff // 2])
    if any(pad_size):
        pad_mode = look_up_option(padding_mode, PytorchPadMode)
        inputs = F.pad(inputs, pad=pad_size, mode=pad_mode, value=cval)
        if condition is not None:
            condition = F.pad(condition, pad=pad_size, mode=pad_mode, value=cval)

    interval = scan_interval(image_size, roi_size, overlap)
    slices = dense_patch_slices(image_size, roi_size, interval)
    num_win = len(slices)
    total = num_win * batch_size

    valid_patch_size = get_valid_patch_size(image_size, roi_size)
    if valid_patch_size == tuple(roi_size) and roi_weight_map is not None:
        weight = torch.as_tensor(roi_weight_map).to(device=sw_device, dtype=compute_dtype)
        weight = weight.reshape(weight.shape[-num_spatial_dims:])
    else:
        weight = importance_map(valid_patch_size, mode, sigma_scale, sw_device, compute_dtype)

    on_cuda = sw_device.type == "cuda"
    pin = on_cuda and device.type == "cpu"
    autocast = torch.autocast("cuda", dtype=torch.float16) if half_precision and on_cuda else _nullcontext()
    bar = None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="window")
    callback = progress if callable(progress) else None

    stitchers: list[_Stitcher] = []
    keys: list[Any] | None = None
    pending: collections.deque = collections.deque()  # (windows, host tensors, cuda event)

    def flush(depth: int) -> None:
        while len(pending) > depth:
            windows, values, event = pending.popleft()
            if event is not None:
                event.synchronize()
            for stitcher, value in zip(stitchers, values):
                stitcher.add(value, windows)

    done = 0
    with torch.inference_mode():
        for start in range(0, total, sw_batch_size):
            indices = range(start, min(start + sw_batch_size, total))
            windows = [(idx // num_win, idx % num_win) for idx in indices]
            spans = [[slice(b, b + 1), slice(None), *slices[w]] for b, w in windows]
            window_data = _gather(inputs, spans, sw_device, pin)
            if condition is not None:
                kwargs["condition"] = _gather(condition, spans, sw_device, pin)
            with autocast:
                output = (
                    predictor(window_data, spans, *args, **kwargs)
                    if with_coord
                    else predictor(window_data, *args, **kwargs)
                )
            keys, outputs = _flatten(output)
            if not stitchers:  # normal tensors, so callers may modify the result in place
                with torch.inference_mode(False):
                    for out in outputs:
                        stitchers.append(
                            _Stitcher(
                                batch_size,
                                out.shape[1],
                                image_size,
                                roi_size,
                                out.shape[2:],
                                slices,
                                weight,
                                device,
                                accumulator_dtype,
                            )
                        )
            if all(out.device == device for out in outputs):
                for stitcher, out in zip(stitchers, outputs):
                    stitcher.add_weighted(out, windows)
            else:  # weight on the window device, copy asynchronously, accumulate later
                host = []
                for stitcher, out in zip(stitchers, outputs):
                    weighted = out * stitcher.weight_sw
                    staging = torch.empty(weighted.shape, dtype=weighted.dtype, device=device, pin_memory=pin)
                    staging.copy_(weighted, non_blocking=pin)
                    host.append(staging)
                event = None
                if on_cuda:
                    event = torch.cuda.Event()
                    event.record()
                pending.append((windows, host, event))
                flush(depth=1)  # accumulate the previous batch while this one computes
            done += len(windows)
            if bar is not None:
                bar.update(len(windows))
            if callback is not None:
                callback(done, total)
        flush(depth=0)
    if bar is not None:
        bar.close()

    results = [stitcher.finish() for stitcher in stitchers]
    if any(pad_size):
        for i, result in enumerate(results):
            zoom = [s / r for s, r in zip(result.shape[2:], roi_size)]
            crop = []
            for sp in range(num_spatial_dims):
                axis = num_spatial_dims - sp - 1
                crop.insert(
                    0,
                    slice(
                        int(round(pad_size[sp * 2] * zoom[axis])),
                        int(round((pad_size[sp * 2] + image_size_[axis]) * zoom[axis])),
                    ),
                )
            results[i] = result[(slice(None), slice(None), *crop)]
    final = _pack(results, keys)
    if meta_template is not None:
        final = convert_to_dst_type(final, meta_template, device=device)[0]
    return final


def _gather(source: torch.Tensor, spans: list[list[slice]], device: torch.device, pin: bool) -> torch.Tensor:
    """Windows ``spans`` of ``source`` stacked on the batch axis, moved to ``device``."""
    if len(spans) == 1:
        data = source[tuple(spans[0])]
    else:
        data = torch.cat([source[tuple(span)] for span in spans])
    if data.device == device:
        return data
    if pin:
        data = data.pin_memory()
    return data.to(device, non_blocking=pin)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class MirrorEnsemble:
    """One predictor averaging several networks (folds) and mirrored inputs (test-time
    augmentation), as nnU-Net does per window (Isensee et al., Nature Methods 18, 2021).

    ``MirrorEnsemble(networks, mirror_axes=(0, 1, 2))(x)`` with ``x`` ``(N, C, *spatial)``
    returns the mean over networks and over every subset of ``mirror_axes`` (spatial axes,
    0-based) of ``flip(network(flip(x)))`` — ``len(networks) * 2**len(mirror_axes)`` passes.
    Outputs must be tensors ``(N, K, *spatial)`` of the input's spatial size.

    Args:
        networks: callables ``x -> logits``, e.g. the networks of several folds.
        mirror_axes: spatial axes to mirror; empty for no test-time augmentation.
        softmax: average softmax probabilities instead of raw outputs.
    """

    def __init__(
        self,
        networks: Sequence[Callable[[torch.Tensor], torch.Tensor]],
        mirror_axes: Sequence[int] = (),
        softmax: bool = False,
    ):
        if not networks:
            raise ValueError("MirrorEnsemble needs at least one network")
        self.networks = list(networks)
        axes = sorted(set(int(a) for a in mirror_axes))
        self.flips = [combo for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]
        self.softmax = softmax

    @property
    def passes(self) -> int:
        """Network evaluations per window batch."""
        return len(self.networks) * len(self.flips)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for network in self.networks:
            for flip in self.flips:
                dims = [a + 2 for a in flip]
                y = network(torch.flip(x, dims) if dims else x)
                if self.softmax:
                    y = torch.softmax(y.float(), dim=1)
                if dims:
                    y = torch.flip(y, dims)
                total = y.float() if total is None else total.add_(y)
        return total.div_(self.passes) if self.passes > 1 else total


def grid_windows(image_size: Sequence[int], roi_size: Sequence[int], overlap: Sequence[float] | float) -> int:
    """Number of windows MONAI's grid places on ``image_size`` (after padding to ``roi_size``)."""
    size = tuple(max(int(s), int(r)) for s, r in zip(image_size, roi_size))
    overlap = ensure_tuple_rep(overlap, len(size))
    interval = scan_interval(size, roi_size, overlap)
    counts = []
    for s, r, i in zip(size, get_valid_patch_size(size, roi_size), interval):
        n = 1
        while (n - 1) * i + r < s:
            n += 1
        counts.append(n)
    return int(np.prod(counts))
