"""The one checkpoint reader of medseg networks, and the upstream weight-format conversions.

:meth:`medseg.networks.base.SegmentationNetwork.load_pretrained` is the only entry point: it reads
the local file with :func:`read_checkpoint`, lets the network convert it
(``pretrained_state_dict``; most use :func:`state_dict_from_checkpoint`) and copies it in with
:func:`load_state_dict_report`. Nothing here downloads anything.

Missing and unexpected keys are reported (logged and returned); a shape mismatch raises
:class:`medseg.errors.PretrainedWeightsError`, because silently skipping a tensor would leave a
network half-initialised.

Formats read by :func:`read_checkpoint`:

- ``torch.save`` files (``.pt``, ``.pth``, ``.bin``, nnU-Net ``.model``), always with
  ``weights_only=True`` (no arbitrary code is run); nnU-Net v1 checkpoints also pickle numpy scalars
  in their training curves, and those types are allow-listed;
- NumPy ``.npz`` archives (Google's JAX/Flax ViT and R50+ViT checkpoints), ``allow_pickle=False``.

Conversions: :func:`google_vit_state_from_npz` / :func:`google_vit_npz_from_state` map Google's ViT
npz names onto :class:`medseg.networks.blocks.ViTBlock` stacks; :func:`convert_npz` applies a
(npz key, torch key, kind) table for the rest (e.g. TransUNet's BiT ResNet).
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.errors import PretrainedWeightsError

log = logging.getLogger(__name__)

#: wrapper keys around a state dict, unwrapped in this order (nnU-Net v1 / Lightning, timm/MAE, nnU-Net v2)
STATE_DICT_WRAPPERS = ("state_dict", "model", "network_weights")


def load_state_dict_report(
    module: nn.Module, state: Mapping[str, torch.Tensor], source: str = ""
) -> dict[str, list[str]]:
    """Copy ``state`` into ``module`` non-strictly; return ``{"missing": [...], "unexpected": [...]}``.

    Raises:
        PretrainedWeightsError: a tensor present in both has a different shape.
    """
    own = module.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs network {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise PretrainedWeightsError(f"{source}: shape mismatch for {len(mismatched)} tensors, first: {mismatched[0]}")
    result = module.load_state_dict(dict(state), strict=False)
    report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
    if report["missing"] or report["unexpected"]:
        log.warning(
            "%s: %d missing and %d unexpected keys",
            source or "weights",
            len(report["missing"]),
            len(report["unexpected"]),
        )
    return report


def _is_npz(path: Path) -> bool:
    if path.suffix.lower() == ".npz":
        return True
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    # torch.save archives hold "<name>/data.pkl"; npz archives only "*.npy" members
    return bool(names) and all(n.endswith(".npy") for n in names)


def read_checkpoint(path: str | Path) -> Any:
    """Read a local checkpoint: a ``torch.save`` object or, for an ``.npz``, ``{name: np.ndarray}``.

    Raises:
        PretrainedWeightsError: the file is missing or cannot be read (the message names the file,
            not its directory).
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise PretrainedWeightsError(f"{name}: pretrained weight file not found")
    if _is_npz(path):
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except Exception as error:  # numpy raises OSError, ValueError, BadZipFile, ... for foreign files
            raise PretrainedWeightsError(f"{name}: not a readable npz file ({_first_line(error)})") from None
    numpy_globals = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32)), type(np.dtype(np.int64))]
    try:
        numpy_globals.append(np._core.multiarray.scalar)  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        numpy_globals.append(np.core.multiarray.scalar)
    try:
        with torch.serialization.safe_globals(numpy_globals):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for foreign files
        raise PretrainedWeightsError(f"{name}: cannot read as a torch checkpoint ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def state_dict_from_checkpoint(
    checkpoint: Any, source: str, strip_module: bool = True, wrappers: Sequence[str] = STATE_DICT_WRAPPERS
) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint read by :func:`read_checkpoint`.

    Unwraps ``{"state_dict": ...}``, ``{"model": ...}`` and ``{"network_weights": ...}`` (nested,
    in that order) and, with ``strip_module``, drops a ``module.`` (DataParallel/DDP) prefix.

    Raises:
        PretrainedWeightsError: no non-empty mapping of tensors was found (e.g. an npz, a list).
    """
    state = checkpoint
    while isinstance(state, Mapping):
        inner = next((state[w] for w in wrappers if isinstance(state.get(w), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(
            f"{source}: no state dict of tensors in the checkpoint (looked for a bare state dict or one under "
            f"{', '.join(repr(w) for w in wrappers)})"
        )
    if strip_module:
        return {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def npz_arrays(checkpoint: Any, source: str) -> dict[str, np.ndarray]:
    """``checkpoint`` as the ``{name: array}`` of an ``.npz`` file.

    Raises:
        PretrainedWeightsError: it is not (e.g. a torch checkpoint was given).
    """
    if isinstance(checkpoint, Mapping) and checkpoint and all(isinstance(v, np.ndarray) for v in checkpoint.values()):
        return dict(checkpoint)
    raise PretrainedWeightsError(f"{source}: expected an .npz of arrays (Google JAX/Flax ViT format)")


# --------------------------------------------------------------------------------------------
# Google JAX/Flax npz <-> torch
# --------------------------------------------------------------------------------------------
#: a conversion table row: (npz key, torch key, kind) with kind "conv" (HWIO <-> OIHW),
#: "linear" ((in, out) <-> (out, in)) or "vec" (flattened)
KeyTable = Sequence[tuple[str, str, str]]


def conv_from_hwio(a: np.ndarray) -> torch.Tensor:
    """JAX conv kernel ``(H, W, I, O)`` -> torch ``(O, I, H, W)``."""
    return torch.from_numpy(np.ascontiguousarray(a.transpose(3, 2, 0, 1)))


def conv_to_hwio(t: torch.Tensor) -> np.ndarray:
    """Torch conv weight ``(O, I, H, W)`` -> JAX ``(H, W, I, O)``."""
    return np.ascontiguousarray(t.detach().cpu().float().numpy().transpose(2, 3, 1, 0))


def convert_npz(arrays: Mapping[str, np.ndarray], keys: KeyTable, used: set[str]) -> dict[str, torch.Tensor]:
    """Apply a (npz key, torch key, kind) table to npz ``arrays``; keys found are added to ``used``."""
    state = {}
    for src, dst, kind in keys:
        if src not in arrays:
            continue
        a = arrays[src]
        state[dst] = (
            conv_from_hwio(a)
            if kind == "conv"
            else torch.from_numpy(a.T.copy())
            if kind == "linear"
            else torch.from_numpy(a.reshape(-1).copy())
        )
        used.add(src)
    return state


def to_npz(state: Mapping[str, torch.Tensor], keys: KeyTable) -> dict[str, np.ndarray]:
    """Inverse of :func:`convert_npz` for the rows of ``keys``."""
    arrays = {}
    for src, dst, kind in keys:
        t = state[dst].detach().cpu().float()
        arrays[src] = (
            conv_to_hwio(t)
            if kind == "conv"
            else np.ascontiguousarray(t.numpy().T)
            if kind == "linear"
            else t.numpy().copy()
        )
    return arrays


GOOGLE_VIT_ATTENTION = "MultiHeadDotProductAttention_1"


def google_vit_keys(num_layers: int, prefix: str) -> list[tuple[str, str, str]]:
    """(npz key, torch key, kind) rows of the block LayerNorms and MLPs and the final
    ``encoder_norm`` of Google's ViT npz, for ``num_layers`` :class:`~medseg.networks.blocks.ViTBlock`
    at ``{prefix}.blocks.{i}`` and the final LayerNorm at ``{prefix}.norm``."""
    keys = [
        ("Transformer/encoder_norm/scale", f"{prefix}.norm.weight", "vec"),
        ("Transformer/encoder_norm/bias", f"{prefix}.norm.bias", "vec"),
    ]
    for i in range(num_layers):
        src, dst = f"Transformer/encoderblock_{i}", f"{prefix}.blocks.{i}"
        for jax_name, name in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            keys += [
                (f"{src}/{jax_name}/scale", f"{dst}.{name}.weight", "vec"),
                (f"{src}/{jax_name}/bias", f"{dst}.{name}.bias", "vec"),
            ]
        for jax_name, name in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            keys += [
                (f"{src}/MlpBlock_3/{jax_name}/kernel", f"{dst}.mlp.{name}.weight", "linear"),
                (f"{src}/MlpBlock_3/{jax_name}/bias", f"{dst}.mlp.{name}.bias", "vec"),
            ]
    return keys


def google_vit_state_from_npz(
    arrays: Mapping[str, np.ndarray], num_layers: int, prefix: str, used: set[str]
) -> dict[str, torch.Tensor]:
    """The ViT blocks and final norm of a Google ViT npz as ``{prefix}.*`` state-dict entries.

    Attention: the npz ``query``/``key``/``value`` kernels ``(D, heads, d)`` and biases
    ``(heads, d)`` are fused into ``attn.qkv`` (rows ``[q | k | v]``, each heads-major, the layout
    :class:`~medseg.networks.blocks.Attention` splits), ``out`` ``(heads, d, D)`` into ``attn.proj``.
    Dense kernels ``(in, out)`` are transposed. npz keys consumed are added to ``used``.
    """
    state = convert_npz(arrays, google_vit_keys(num_layers, prefix), used)
    for i in range(num_layers):
        src, dst = f"Transformer/encoderblock_{i}/{GOOGLE_VIT_ATTENTION}", f"{prefix}.blocks.{i}.attn"
        qkv = [f"{src}/{n}/kernel" for n in ("query", "key", "value")]
        if all(k in arrays for k in qkv):
            state[f"{dst}.qkv.weight"] = torch.cat(
                [torch.from_numpy(arrays[k].reshape(arrays[k].shape[0], -1).T.copy()) for k in qkv]
            )
            used.update(qkv)
        bias = [f"{src}/{n}/bias" for n in ("query", "key", "value")]
        if all(k in arrays for k in bias):
            state[f"{dst}.qkv.bias"] = torch.cat([torch.from_numpy(arrays[k].reshape(-1).copy()) for k in bias])
            used.update(bias)
        if f"{src}/out/kernel" in arrays:
            out = arrays[f"{src}/out/kernel"]
            state[f"{dst}.proj.weight"] = torch.from_numpy(out.reshape(-1, out.shape[-1]).T.copy())
            used.add(f"{src}/out/kernel")
        if f"{src}/out/bias" in arrays:
            state[f"{dst}.proj.bias"] = torch.from_numpy(arrays[f"{src}/out/bias"].copy())
            used.add(f"{src}/out/bias")
    return state


def google_vit_npz_from_state(
    state: Mapping[str, torch.Tensor], num_layers: int, num_heads: int, prefix: str
) -> dict[str, np.ndarray]:
    """Inverse of :func:`google_vit_state_from_npz` (to write files in Google's format)."""
    arrays = to_npz(state, google_vit_keys(num_layers, prefix))
    for i in range(num_layers):
        src, dst = f"{prefix}.blocks.{i}.attn", f"Transformer/encoderblock_{i}/{GOOGLE_VIT_ATTENTION}"
        weight = state[f"{src}.qkv.weight"].detach().cpu().float().numpy()
        bias = state[f"{src}.qkv.bias"].detach().cpu().float().numpy()
        dim = weight.shape[1]
        for j, n in enumerate(("query", "key", "value")):
            rows = weight[j * dim : (j + 1) * dim]
            arrays[f"{dst}/{n}/kernel"] = np.ascontiguousarray(rows.T.reshape(dim, num_heads, -1))
            arrays[f"{dst}/{n}/bias"] = bias[j * dim : (j + 1) * dim].reshape(num_heads, -1).copy()
        out = state[f"{src}.proj.weight"].detach().cpu().float().numpy()
        arrays[f"{dst}/out/kernel"] = np.ascontiguousarray(out.T.reshape(num_heads, -1, dim))
        arrays[f"{dst}/out/bias"] = state[f"{src}.proj.bias"].detach().cpu().float().numpy().copy()
    return arrays


def unused_arrays(arrays: Mapping[str, np.ndarray], used: Iterable[str]) -> dict[str, torch.Tensor]:
    """npz entries not consumed, under their npz names (so the report lists them as unexpected)."""
    used = set(used)
    return {k: torch.from_numpy(np.asarray(v).copy()) for k, v in arrays.items() if k not in used}
