"""Segmentation networks behind one interface (:class:`SegmentationNetwork`) and one registry.

Importing this package registers every network module listed below. Shared building blocks live
in :mod:`medseg.networks.blocks`, the one checkpoint reader in :mod:`medseg.networks.pretrained`.

Import graph (no cycles): ``pretrained`` <- ``base`` <- ``registry``; ``blocks`` import only torch,
MONAI and each other; network modules import ``base``, ``registry``, ``blocks`` and ``pretrained``
(``transunet3d`` also ``unet``, ``cellvta`` also ``vit_adapter``); :mod:`medseg.losses` imports
``base`` only.
"""

from medseg.networks.base import NetworkOutput, SegmentationNetwork, check_network_contract, count_parameters
from medseg.networks.registry import create_network, list_networks, network_entry, register_network

# network modules register themselves on import
from medseg.networks import unet  # noqa: E402,F401
from medseg.networks import transunet3d  # noqa: E402,F401
from medseg.networks import swin_unetr  # noqa: E402,F401
from medseg.networks import transunet  # noqa: E402,F401
from medseg.networks import stunet  # noqa: E402,F401
from medseg.networks import dformer  # noqa: E402,F401
from medseg.networks import cellvta  # noqa: E402,F401

__all__ = [
    "NetworkOutput", "SegmentationNetwork", "check_network_contract", "count_parameters",
    "create_network", "list_networks", "network_entry", "register_network",
]
