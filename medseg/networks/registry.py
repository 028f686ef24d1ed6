"""Network registry in the style of timm's ``create_model``.

Each network module decorates a builder with :func:`register_network`, giving the reference
configurations (exact keyword arguments for :func:`create_network`) that ``medseg models`` lists
and that the tests count parameters for.

Conventions for ``references`` (checked by ``tests/test_networks_common.py`` for every network):

- Every network registers a reference labelled ``"tiny"``: a configuration small enough for CPU
  unit tests (at most a few M parameters). It is for tests only, never a model to train. The
  tests run it, batch 2, on the smallest multiple of ``input_divisor`` that is at least
  ``max(2 * input_divisor, 32)`` per axis, with the last axis one ``input_divisor`` longer, in
  training and eval mode and under ``torch.autocast("cpu", dtype=torch.bfloat16)``.
- Builders that can freeze a pretrained encoder take ``freeze_encoder: bool``; the tests then check
  that the frozen parameters get no gradient and all others do.
- Every network builds on the ``meta`` device (``with torch.device("meta"): create_network(...)``),
  which is how ``medseg models`` counts parameters without allocating them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from medseg.errors import ConfigError


@dataclass
class NetworkEntry:
    """A registered builder and its reference configurations (name -> kwargs)."""

    name: str
    builder: Callable[..., nn.Module]
    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, NetworkEntry] = {}


def register_network(name: str, references: dict[str, dict[str, Any]] | None = None, description: str = ""):
    """Decorator registering ``builder(**config) -> nn.Module`` under ``name``.

    ``references`` maps a label (e.g. ``"B"`` or ``"paper"``) to the complete keyword arguments of
    :func:`create_network` for that reference configuration (spatial_dims and channels included).
    """

    def decorator(builder: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"network {name!r} registered twice")
        doc = description or (builder.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = NetworkEntry(name, builder, dict(references or {}), doc)
        return builder

    return decorator


def create_network(name: str, *, pretrained: str | None = None, **config: Any) -> nn.Module:
    """Build network ``name`` with ``config`` (``spatial_dims``, ``in_channels``, ``out_channels``...).

    Args:
        pretrained: optional path to a weight file in the upstream format; loaded by the network's
            ``load_pretrained`` method, which reports missing/unexpected keys and raises on shape
            mismatches.

    Raises:
        ConfigError: unknown network name or invalid keyword arguments.
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ConfigError(f"unknown network '{name}' (known: {', '.join(list_networks())})")
    try:
        network = entry.builder(**config)
    except TypeError as error:
        raise ConfigError(f"network '{name}': {error}") from None
    if pretrained is not None:
        network.load_pretrained(pretrained)
    return network


def list_networks() -> list[str]:
    """Registered network names, sorted."""
    return sorted(_REGISTRY)


def network_entry(name: str) -> NetworkEntry:
    """The registry entry of ``name`` (raises :class:`ConfigError` if unknown)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown network '{name}' (known: {', '.join(list_networks())})")
    return _REGISTRY[name]
