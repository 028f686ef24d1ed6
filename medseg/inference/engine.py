"""Sliding-window inference: MONAI's function, with less overhead and bounded memory.

:func:`sliding_window_inference` takes the arguments of
:func:`monai.inferers.sliding_window_inference` and returns the same result (same window grid as
:func:`monai.data.utils.dense_patch_slices`, same importance map as
:func:`monai.data.utils.compute_importance_map`, same padding and cropping; both checked against
MONAI in ``tests/test_inference_engine.py``), but

- takes NumPy arrays as well as tensors: with a NumPy input and a NumPy predictor (the OpenVINO
  runtime) the whole call runs without importing PyTorch or MONAI, which is most of the start-up
  time of a short ``medseg predict`` process (``import torch`` 2 s, ``import monai`` 1.6 s more
  on this project's 2-core CPU),
- runs a PyTorch predictor under :func:`torch.inference_mode` (optionally under float16 autocast
  on CUDA),
- caches the importance map between calls,
- accumulates window outputs in place into preallocated buffers,
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
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "sliding_window_inference",
    "MirrorEnsemble",
    "scan_interval",
    "stitching_bytes",
    "importance_map",
    "window_slices",
]

ProgressCallback = Callable[[int, int], None]

#: ``padding_mode`` (MONAI's PyTorch names) -> ``numpy.pad`` mode
_NUMPY_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
BLEND_MODES = ("constant", "gaussian")


def _is_tensor(x: Any) -> bool:
    """Whether ``x`` is a PyTorch tensor, without importing PyTorch."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _tuple_rep(value: Any, n: int) -> tuple:
    """``value`` repeated ``n`` times, or a sequence of length ``n`` as a tuple (MONAI's
    ``ensure_tuple_rep``). Raises ValueError for another length."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | np.ndarray):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"Sequence must have length {n}, got {len(value)}.")
    return value


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


def _valid_patch_size(image_size: Sequence[int], patch_size: Sequence[int]) -> tuple[int, ...]:
    """The window clipped to the image; a 0/None entry means the whole axis (MONAI's rule)."""
    return tuple(min(int(size), int(p or size)) for size, p in zip(image_size, patch_size))


def window_slices(
    image_size: Sequence[int], roi_size: Sequence[int], interval: Sequence[int]
) -> list[tuple[slice, ...]]:
    """Every window of ``roi_size`` (voxels) on ``image_size`` at step ``interval``, the last one
    per axis moved back inside the image, in C order over the axes: the grid of MONAI's
    ``dense_patch_slices``."""
    patch = _valid_patch_size(image_size, roi_size)
    starts = []
    for size, p, step in zip(image_size, patch, interval):
        count = 1
        if step:
            count = next((d + 1 for d in range(math.ceil(size / step)) if d * step + p >= size), 1)
        starts.append([i * step - max(i * step + p - size, 0) for i in range(count)])
    return [tuple(slice(s, s + p) for s, p in zip(corner, patch)) for corner in itertools.product(*starts)]


@functools.lru_cache(maxsize=16)
def _cached_importance_map(patch_size: tuple[int, ...], mode: str, sigma_scale: tuple[float, ...]) -> np.ndarray:
    if mode == "constant":
        weight = np.ones(patch_size, dtype=np.float32)
    else:
        weight = None
        for size, scale in zip(patch_size, sigma_scale):
            x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)
            x = np.exp(x**2 / np.float32(-2 * (size * scale) ** 2))  # 1D Gaussian, float32 as MONAI
            weight = x if weight is None else weight[..., None] * x
    weight = np.maximum(weight, max(float(weight.min()), 1e-3)).astype(np.float32)
    weight.flags.writeable = False
    return weight


def importance_map(
    patch_size: Sequence[int], mode: str = "constant", sigma_scale: Sequence[float] | float = 0.125
) -> np.ndarray:
    """MONAI's window weight map ``patch_size`` as a read-only float32 array, cached per (size,
    mode, sigma): 1 everywhere (``constant``) or a Gaussian with sigma = ``sigma_scale * size``
    per axis, clamped to at least ``max(min, 1e-3)`` (``gaussian``).

    Raises:
        ValueError: unknown ``mode``.
    """
    mode = str(getattr(mode, "value", mode))
    if mode not in BLEND_MODES:
        raise ValueError(f"Unsupported mode: {mode}, available options are {list(BLEND_MODES)}.")
    patch = tuple(int(p) for p in patch_size)
    sigma = tuple(float(s) for s in _tuple_rep(sigma_scale, len(patch)))
    return _cached_importance_map(patch, mode, sigma)


def stitching_bytes(
    image_size: Sequence[int], classes: int, batch_size: int = 1, accumulator_dtype: Any = "float32"
) -> int:
    """Bytes the stitched output and its weight map take on the output device
    (``accumulator_dtype``: a NumPy or PyTorch dtype, or its name)."""
    voxels = math.prod(int(s) for s in image_size)
    itemsize = _numpy_dtype(accumulator_dtype).itemsize
    return batch_size * classes * voxels * itemsize + voxels * 4


def _numpy_dtype(dtype: Any) -> np.dtype:
    """The NumPy dtype of a NumPy or PyTorch dtype (``torch.float16`` -> ``float16``)."""
    if _is_tensor_dtype(dtype):
        return np.dtype(str(dtype).removeprefix("torch."))
    return np.dtype(dtype)


def _is_tensor_dtype(dtype: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(dtype, torch.dtype)


def _flatten(output: Any) -> tuple[list[Any] | None, tuple[Any, ...]]:
    if isinstance(output, np.ndarray) or _is_tensor(output):
        return None, (output,)
    if isinstance(output, Mapping):
        keys = sorted(output.keys())
        return keys, tuple(output[k] for k in keys)
    return None, tuple(output) if isinstance(output, (list, tuple)) else (output,)


def _pack(outputs: list[Any], keys: list[Any] | None) -> Any:
    if keys is not None:
        return dict(zip(keys, outputs))
    if len(outputs) == 1:
        return outputs[0]
    return tuple(outputs)


class _Stitcher:
    """Preallocated accumulator and weight map for one output of the predictor (NumPy arrays for
    a NumPy predictor, else tensors on ``device``)."""

    def __init__(
        self,
        batch_size: int,
        channels: int,
        image_size: Sequence[int],
        roi_size: Sequence[int],
        out_window: Sequence[int],
        slices: list[tuple[slice, ...]],
        weight: Any,
        device: Any,
        dtype: Any,
    ):
        self.zoom = None
        self.numpy = isinstance(weight, np.ndarray)
        if tuple(out_window) != tuple(roi_size):
            if self.numpy:
                raise ValueError(
                    f"a NumPy predictor must return windows of the input window's size {tuple(roi_size)}, "
                    f"got {tuple(out_window)}"
                )
            import torch.nn.functional as F

            self.zoom = [o / float(r) for o, r in zip(out_window, roi_size)]
            weight = F.interpolate(weight[None, None], size=tuple(out_window), mode="nearest-exact")[0, 0]
        out_size = [int(s * z) for s, z in zip(image_size, self.zoom)] if self.zoom else list(image_size)
        self.slices = [self.scale(s) for s in slices]
        self.weight_sw = weight  # on the window device, (*out_window)
        if self.numpy:
            self.output = np.zeros([batch_size, channels, *out_size], dtype=dtype)
            self.count = np.zeros([1, 1, *out_size], dtype=np.float32)
            weight_out = weight
        else:
            import torch

            self.output = torch.zeros([batch_size, channels, *out_size], dtype=dtype, device=device)
            self.count = torch.zeros([1, 1, *out_size], dtype=torch.float32, device=device)
            weight_out = weight.to(device=device, dtype=torch.float32)
        for s in self.slices:
            self.count[(0, 0, *s)] += weight_out

    def scale(self, window: tuple[slice, ...]) -> tuple[slice, ...]:
        if self.zoom is None:
            return tuple(window)
        return tuple(slice(int(s.start * z), int(s.stop * z)) for s, z in zip(window, self.zoom))

    def add_weighted(self, values: Any, windows: list[tuple[int, int]]) -> None:
        """``values`` (N, K, *window) unweighted, on the output device: out += values * weight.
        A lower-precision accumulator gets the window cast first (no promoted temporaries)."""
        dtype = self.output.dtype
        if self.numpy:
            weight = self.weight_sw.astype(dtype, copy=False)
            for value, (b, w) in zip(values, windows):
                self.output[(b, slice(None), *self.slices[w])] += value.astype(dtype, copy=False) * weight
            return
        weight = self.weight_sw.to(device=values.device, dtype=dtype)
        for value, (b, w) in zip(values, windows):
            self.output[(b, slice(None), *self.slices[w])].addcmul_(value.to(dtype), weight)

    def add(self, values: Any, windows: list[tuple[int, int]]) -> None:
        """``values`` (N, K, *window) already weighted, on the output device: out += values."""
        for value, (b, w) in zip(values, windows):
            view = self.output[(b, slice(None), *self.slices[w])]
            if self.numpy:
                view += value
            else:
                view.add_(value)

    def finish(self) -> Any:
        if self.output.dtype == self.count.dtype:
            self.output /= self.count
            return self.output
        reciprocal = 1.0 / self.count[0]  # one channel at a time: no full-size promoted temporary
        for c in range(self.output.shape[1]):
            if self.numpy:
                self.output[:, c] *= reciprocal
            else:
                self.output[:, c].mul_(reciprocal)
        return self.output


def sliding_window_inference(
    inputs: Any,
    roi_size: Sequence[int] | int,
    sw_batch_size: int,
    predictor: Callable[..., Any],
    overlap: Sequence[float] | float = 0.25,
    mode: str = "constant",
    sigma_scale: Sequence[float] | float = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
    sw_device: Any = None,
    device: Any = None,
    progress: bool | ProgressCallback = False,
    roi_weight_map: Any = None,
    process_fn: Callable | None = None,
    buffer_steps: int | None = None,
    buffer_dim: int = -1,
    with_coord: bool = False,
    *args: Any,
    accumulator_dtype: Any = None,
    half_precision: bool = False,
    **kwargs: Any,
) -> Any:
    """Sliding-window inference of ``predictor`` over ``inputs``; MONAI's arguments and result.

    Args:
        inputs: ``(B, C, H, W[, D])`` NumPy array, tensor or MetaTensor (meta is carried to the
            output). A NumPy input goes to ``predictor`` as NumPy windows, which must come back
            as NumPy arrays of the window's size; PyTorch is then never imported.
        roi_size: window size per spatial axis (non-positive or ``None`` entries: whole axis).
        sw_batch_size: windows per predictor call.
        predictor: ``predictor(windows, *args, **kwargs)`` with ``windows`` ``(N, C, *roi_size)``,
            returning an array ``(N, K, *out_window)``, a tuple of them or a dict of them; tensor
            output windows may have another resolution than input windows (``out_window /
            roi_size`` must then give integer output coordinates, as in MONAI).
        overlap: fraction of overlap between neighbouring windows per axis, in ``[0, 1)``.
        mode: ``"constant"`` or ``"gaussian"`` blending.
        sigma_scale: Gaussian sigma per axis as a fraction of the window size.
        padding_mode, cval: how inputs smaller than the window are padded (then cropped back):
            ``constant`` (``cval``), ``reflect``, ``replicate`` or ``circular``.
        sw_device: device the windows are computed on (default: the inputs' device; tensors only).
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
        The stitched predictor output ``(B, K, *spatial)`` (array, tuple or dict like the
        predictor's), on ``device``, in ``accumulator_dtype``; NumPy for a NumPy input.

    Raises:
        ValueError: inputs do not have ``len(roi_size) + 2`` dimensions, overlap outside [0, 1),
            an unknown ``mode`` or ``padding_mode``.
    """
    numpy = isinstance(inputs, np.ndarray)
    if process_fn is not None or (buffer_steps is not None and buffer_steps > 0):
        import torch
        from monai.inferers import sliding_window_inference as monai_sliding_window_inference

        with torch.inference_mode():
            return monai_sliding_window_inference(
                torch.as_tensor(inputs) if numpy else inputs,
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
    overlap = _tuple_rep(overlap, num_spatial_dims)
    if any(o < 0 or o >= 1 for o in overlap):
        raise ValueError(f"overlap must be >= 0 and < 1, got {overlap}")
    padding_mode = str(getattr(padding_mode, "value", padding_mode))
    if padding_mode not in _NUMPY_PAD_MODES:
        raise ValueError(f"Unsupported padding_mode: {padding_mode}, available options are {list(_NUMPY_PAD_MODES)}.")
    batch_size, _, *image_size_ = inputs.shape
    condition = kwargs.pop("condition", None)
    roi_size = tuple(
        int(r) if r and r > 0 else int(s) for r, s in zip(_tuple_rep(roi_size, num_spatial_dims), image_size_)
    )

    # pad inputs smaller than the window (MONAI's symmetric split)
    image_size = tuple(max(image_size_[i], roi_size[i]) for i in range(num_spatial_dims))
    pad_size: list[int] = []  # PyTorch order: last axis first, (before, after) per axis
    for k in range(inputs.ndim - 1, 1, -1):
        diff = max(roi_size[k - 2] - inputs.shape[k], 0)
        pad_size.extend([diff // 2, diff - diff // 2])
    interval = scan_interval(image_size, roi_size, overlap)
    slices = window_slices(image_size, roi_size, interval)
    num_win = len(slices)
    total = num_win * batch_size
    valid_patch_size = _valid_patch_size(image_size, roi_size)
    if valid_patch_size == tuple(roi_size) and roi_weight_map is not None:
        weight = roi_weight_map
    else:
        weight = importance_map(valid_patch_size, mode, sigma_scale)

    if numpy:
        if any(pad_size):
            widths = [(0, 0), (0, 0)] + [(pad_size[2 * i], pad_size[2 * i + 1]) for i in range(num_spatial_dims)][::-1]
            extra = {"constant_values": cval} if padding_mode == "constant" else {}
            inputs = np.pad(inputs, widths, mode=_NUMPY_PAD_MODES[padding_mode], **extra)
            if condition is not None:
                condition = np.pad(condition, widths, mode=_NUMPY_PAD_MODES[padding_mode], **extra)
        weight = np.asarray(weight, dtype=inputs.dtype).reshape(weight.shape[-num_spatial_dims:])
        accumulator = _numpy_dtype(accumulator_dtype or inputs.dtype)
        results, keys = _run_windows(
            inputs, condition, slices, batch_size, sw_batch_size, predictor, with_coord, args, kwargs,
            progress, total, lambda out: _Stitcher(
                batch_size, out.shape[1], image_size, roi_size, out.shape[2:], slices, weight, None, accumulator
            ),
        )  # fmt: skip
        meta_template = None
    else:
        results, keys, meta_template = _torch_windows(
            inputs, condition, slices, batch_size, sw_batch_size, predictor, with_coord, args, kwargs, progress,
            total, pad_size, padding_mode, cval, weight, image_size, roi_size, sw_device, device, accumulator_dtype,
            half_precision,
        )  # fmt: skip

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
        from monai.utils import convert_to_dst_type

        final = convert_to_dst_type(final, meta_template, device=device)[0]
    return final


def _run_windows(
    inputs, condition, slices, batch_size, sw_batch_size, predictor, with_coord, args, kwargs, progress, total,
    make_stitcher, gather=None, after_call=None, context=None,
):  # fmt: skip
    """The window loop: gather ``sw_batch_size`` windows, run ``predictor``, hand each output to
    its stitcher (made by ``make_stitcher(first output)``); returns ``(finished outputs, keys)``.

    ``gather(source, spans)`` stacks windows (default: NumPy concatenation); ``after_call(stitchers,
    outputs, windows)`` accumulates (default: ``add_weighted``); ``context()`` wraps each call."""
    num_win = len(slices)
    bar = None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="window")
    callback = progress if callable(progress) else None
    gather = gather or (lambda source, spans: np.concatenate([source[tuple(span)] for span in spans]))
    stitchers: list[_Stitcher] = []
    keys: list[Any] | None = None
    done = 0
    for start in range(0, total, sw_batch_size):
        indices = range(start, min(start + sw_batch_size, total))
        windows = [(idx // num_win, idx % num_win) for idx in indices]
        spans = [[slice(b, b + 1), slice(None), *slices[w]] for b, w in windows]
        window_data = gather(inputs, spans)
        if condition is not None:
            kwargs["condition"] = gather(condition, spans)
        with context() if context is not None else _nullcontext():
            output = (
                predictor(window_data, spans, *args, **kwargs)
                if with_coord
                else predictor(window_data, *args, **kwargs)
            )
        keys, outputs = _flatten(output)
        if not stitchers:
            stitchers = [make_stitcher(out) for out in outputs]
        if after_call is not None:
            after_call(stitchers, outputs, windows)
        else:
            for stitcher, out in zip(stitchers, outputs):
                stitcher.add_weighted(out, windows)
        done += len(windows)
        if bar is not None:
            bar.update(len(windows))
        if callback is not None:
            callback(done, total)
    if after_call is not None:
        after_call(stitchers, None, None)  # flush
    if bar is not None:
        bar.close()
    return [stitcher.finish() for stitcher in stitchers], keys


def _torch_windows(
    inputs, condition, slices, batch_size, sw_batch_size, predictor, with_coord, args, kwargs, progress, total,
    pad_size, padding_mode, cval, weight, image_size, roi_size, sw_device, device, accumulator_dtype, half_precision,
):  # fmt: skip
    """:func:`_run_windows` for tensor inputs: padding, devices, pinned asynchronous copies,
    autocast and MetaTensor handling. Returns ``(outputs, keys, meta template or None)``."""
    import torch
    import torch.nn.functional as F

    compute_dtype = inputs.dtype
    accumulator_dtype = accumulator_dtype or compute_dtype
    if not isinstance(accumulator_dtype, torch.dtype):
        accumulator_dtype = getattr(torch, np.dtype(accumulator_dtype).name)
    device = torch.device(device) if device is not None else inputs.device
    sw_device = torch.device(sw_device) if sw_device is not None else inputs.device
    meta_template = None
    meta_tensor = getattr(sys.modules.get("monai.data.meta_tensor"), "MetaTensor", None)
    if meta_tensor is not None and isinstance(inputs, meta_tensor):
        meta_template = meta_tensor([]).copy_meta_from(inputs, copy_attr=False)
        inputs = inputs.as_tensor()
    if any(pad_size):
        inputs = F.pad(inputs, pad=pad_size, mode=padding_mode, value=cval)
        if condition is not None:
            condition = F.pad(condition, pad=pad_size, mode=padding_mode, value=cval)
    weight = torch.tensor(weight) if isinstance(weight, np.ndarray) else torch.as_tensor(weight)
    weight = weight.to(device=sw_device, dtype=compute_dtype).reshape(weight.shape[-len(roi_size) :])

    on_cuda = sw_device.type == "cuda"
    pin = on_cuda and device.type == "cpu"
    pending: collections.deque = collections.deque()  # (windows, host tensors, cuda event)

    def flush(stitchers, depth: int) -> None:
        while len(pending) > depth:
            windows, values, event = pending.popleft()
            if event is not None:
                event.synchronize()
            for stitcher, value in zip(stitchers, values):
                stitcher.add(value, windows)

    def accumulate(stitchers, outputs, windows) -> None:
        if outputs is None:
            flush(stitchers, depth=0)
        elif all(out.device == device for out in outputs):
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
            flush(stitchers, depth=1)  # accumulate the previous batch while this one computes

    def make_stitcher(out):  # normal tensors, so callers may modify the result in place
        with torch.inference_mode(False):
            return _Stitcher(
                batch_size, out.shape[1], image_size, roi_size, out.shape[2:], slices, weight, device, accumulator_dtype
            )

    def context():
        if half_precision and on_cuda:
            return torch.autocast("cuda", dtype=torch.float16)
        return _nullcontext()

    with torch.inference_mode():
        results, keys = _run_windows(
            inputs, condition, slices, batch_size, sw_batch_size, predictor, with_coord, args, kwargs, progress,
            total, make_stitcher, lambda source, spans: _gather(source, spans, sw_device, pin), accumulate, context,
        )  # fmt: skip
    return results, keys, meta_template


def _gather(source: Any, spans: list[list[slice]], device: Any, pin: bool) -> Any:
    """Windows ``spans`` of ``source`` stacked on the batch axis, moved to ``device``."""
    import torch

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

    ``MirrorEnsemble(networks, mirror_axes=(0, 1, 2))(x)`` with ``x`` ``(N, C, *spatial)`` (a
    NumPy array or a tensor; the networks take and return the same kind) returns the mean over
    networks and over every subset of ``mirror_axes`` (spatial axes, 0-based) of
    ``flip(network(flip(x)))`` — ``len(networks) * 2**len(mirror_axes)`` passes, in float32.
    Outputs must be ``(N, K, *spatial)`` of the input's spatial size.

    Args:
        networks: callables ``x -> logits``, e.g. the networks of several folds.
        mirror_axes: spatial axes to mirror; empty for no test-time augmentation.
        softmax: average softmax probabilities instead of raw outputs.

    Raises:
        ValueError: no network.
    """

    def __init__(
        self, networks: Sequence[Callable[[Any], Any]], mirror_axes: Sequence[int] = (), softmax: bool = False
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

    def __call__(self, x: Any) -> Any:
        numpy = isinstance(x, np.ndarray)
        if numpy:
            flip = np.flip
        else:
            import torch

            flip = torch.flip
        total = None
        for network in self.networks:
            for axes in self.flips:
                dims = [a + 2 for a in axes]
                y = network(flip(x, dims) if dims else x)
                y = y.astype(np.float32, copy=False) if numpy else y.float()
                if self.softmax:
                    y = _softmax(y, numpy)
                if dims:
                    y = flip(y, dims)
                if total is None:
                    total = y.copy() if numpy and y.base is not None else y
                else:
                    total += y
        if self.passes > 1:
            total /= self.passes
        return total


def _softmax(y: Any, numpy: bool) -> Any:
    """Softmax over axis 1 of ``(N, K, *spatial)`` (a new array)."""
    if not numpy:
        import torch

        return torch.softmax(y, dim=1)
    e = np.exp(y - y.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def grid_windows(image_size: Sequence[int], roi_size: Sequence[int], overlap: Sequence[float] | float) -> int:
    """Number of windows MONAI's grid places on ``image_size`` (after padding to ``roi_size``)."""
    size = tuple(max(int(s), int(r)) for s, r in zip(image_size, roi_size))
    overlap = _tuple_rep(overlap, len(size))
    interval = scan_interval(size, roi_size, overlap)
    counts = []
    for s, r, i in zip(size, _valid_patch_size(size, roi_size), interval):
        n = 1
        while (n - 1) * i + r < s:
            n += 1
        counts.append(n)
    return int(np.prod(counts))
