"""Segmentation networks behind one interface (:class:`SegmentationNetwork`) and one registry.

Importing this package registers every network module listed below. Shared building blocks live
in :mod:`medseg.networks.blocks`, the one checkpoint reader in :mod:`medseg.networks.pretrained`.

Import graph (no cycles): ``pretrained`` <- ``base`` <- ``registry``; ``blocks`` import only torch,
MONAI and each other; network modules import ``base``, ``registry``, ``blocks`` and ``pretrained``
(``transunet3d`` also ``unet``, ``cellvta`` also ``vit_adapter``); :mod:`medseg.losses` imports
``base`` only.
"""

# network modules register themselves on import
from medseg.networks import (
    cellvta,  # noqa: E402,F401
    dformer,  # noqa: E402,F401
    stunet,  # noqa: E402,F401
    swin_unetr,  # noqa: E402,F401
    transunet,  # noqa: E402,F401
    transunet3d,  # noqa: E402,F401
    unet,  # noqa: E402,F401
)
from medseg.networks.base import NetworkOutput, SegmentationNetwork, check_network_contract, count_parameters
from medseg.networks.registry import create_network, list_networks, network_entry, register_network

__all__ = [
    "NetworkOutput",
    "SegmentationNetwork",
    "check_network_contract",
    "count_parameters",
    "create_network",
    "list_networks",
    "network_entry",
    "register_network",
]
