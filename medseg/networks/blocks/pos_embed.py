"""Resampling a learned absolute position embedding to another token grid (1D, 2D or 3D).

ViT fine-tuning at a new resolution interpolates the pre-trained position embeddings over the
token grid (Dosovitskiy et al., ICLR 2021, section 3.2, "Fine-tuning and higher resolution").
The signature and defaults follow ``timm.layers.resample_abs_pos_embed`` (bicubic, antialiased,
one prefix/class token), extended to 1D and 3D grids (see :mod:`medseg.networks.blocks.vit` for why
timm itself is not imported).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


def resample_abs_pos_embed(
    posemb: torch.Tensor,
    new_size: Sequence[int],
    old_size: Sequence[int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample ``posemb`` ``(1, prefix + prod(old_size), D)`` to ``(1, prefix + prod(new_size), D)``.

    Args:
        posemb: position embedding; the first ``num_prefix_tokens`` entries (class/register tokens)
            are kept unchanged, the rest are the grid, row-major.
        new_size: target token grid, 1 to 3 axes.
        old_size: stored token grid; default: a square (or cubic, for a 3-axis ``new_size``) grid
            inferred from the token count.
        num_prefix_tokens: prefix entries that are not part of the grid (1 for a class token, 0 for
            TransUNet's grid-only embedding).
        interpolation: ``"bicubic"`` (2D only), ``"nearest"``, or ``"linear"`` (= linear, bilinear or
            trilinear by the number of axes; ``"bilinear"`` and ``"trilinear"`` are accepted for any
            number of axes and mean the same). ``align_corners=False``.
        antialias: antialias when downsampling (bilinear/bicubic in 2D only, as PyTorch).

    Returns:
        The resampled embedding, in ``posemb``'s dtype (interpolated in float32); ``posemb`` itself
        when the grid is unchanged.

    Raises:
        ValueError: the token count does not match ``old_size`` (or, without ``old_size``, is not a
            square/cubic number of grid tokens), or the interpolation does not fit the axes.
    """
    new_size = tuple(int(s) for s in new_size)
    dims = len(new_size)
    if dims not in _LINEAR:
        raise ValueError(f"position-embedding grids have 1 to 3 axes, got {new_size}")
    grid_tokens = posemb.shape[1] - num_prefix_tokens
    if old_size is None:
        side = round(grid_tokens ** (1.0 / dims))
        if side**dims != grid_tokens:
            raise ValueError(
                f"position embedding with {grid_tokens} grid tokens is not a {'square' if dims == 2 else 'cubic'}"
                f" grid; give old_size"
            )
        old_size = (side,) * dims
    old_size = tuple(int(s) for s in old_size)
    if len(old_size) != dims or math.prod(old_size) != grid_tokens:
        raise ValueError(f"position embedding with {grid_tokens} grid tokens does not fit the grid {old_size}")
    if old_size == new_size:
        return posemb
    mode = _LINEAR[dims] if interpolation in ("linear", "bilinear", "trilinear") else interpolation
    if mode == "bicubic" and dims != 2:
        raise ValueError("bicubic position-embedding resampling needs a 2D grid")
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = posemb.shape[-1]
    grid = grid.reshape(1, *old_size, dim).movedim(-1, 1).float()
    options = {} if mode == "nearest" else {"align_corners": False}
    if dims == 2 and mode in ("bilinear", "bicubic"):
        options["antialias"] = antialias
    grid = F.interpolate(grid, size=new_size, mode=mode, **options)
    grid = grid.movedim(1, -1).reshape(1, math.prod(new_size), dim).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid
