"""Loading pretrained weights from local files, with an honest report.

Missing and unexpected keys are reported (logged and returned); a shape mismatch raises
:class:`medseg.errors.PretrainedWeightsError`, because silently skipping a tensor would leave a
network half-initialised.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Mapping

import numpy as np

import torch
from torch import nn

from medseg.errors import PretrainedWeightsError

log = logging.getLogger(__name__)


def load_state_dict_report(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "") -> dict[str, list[str]]:
    """Copy ``state`` into ``module`` non-strictly; return ``{"missing": [...], "unexpected": [...]}``.

    Raises:
        PretrainedWeightsError: a tensor present in both has a different shape.
    """
    own = module.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs network {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise PretrainedWeightsError(f"{source}: shape mismatch for {len(mismatched)} tensors, first: {mismatched[0]}")
    result = module.load_state_dict(dict(state), strict=False)
    report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
    if report["missing"] or report["unexpected"]:
        log.warning("%s: %d missing and %d unexpected keys", source or "weights",
                    len(report["missing"]), len(report["unexpected"]))
    return report


def read_checkpoint(path: str | Path):
    """Read a local ``torch.save`` file with ``weights_only=True`` (no arbitrary code is run).

    nnU-Net v1 checkpoints also pickle numpy scalars in their training curves; those types are
    allow-listed.

    Raises:
        PretrainedWeightsError: the file is missing or not a readable torch checkpoint.
    """
    name = Path(path).name
    if not Path(path).is_file():
        raise PretrainedWeightsError(f"{name}: pretrained weight file not found")
    numpy_globals = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32)), type(np.dtype(np.int64))]
    try:
        numpy_globals.append(np._core.multiarray.scalar)  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        numpy_globals.append(np.core.multiarray.scalar)
    try:
        with torch.serialization.safe_globals(numpy_globals):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PretrainedWeightsError(f"{name}: cannot read as a torch checkpoint ({first})") from None
