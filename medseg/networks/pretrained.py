"""Loading pretrained weights from local files, with an honest report.

Missing and unexpected keys are reported (logged and returned); a shape mismatch raises
:class:`medseg.errors.PretrainedWeightsError`, because silently skipping a tensor would leave a
network half-initialised.
"""

from __future__ import annotations

import logging
from typing import Mapping

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
