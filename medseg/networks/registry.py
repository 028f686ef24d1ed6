"""Network registry in the style of timm's ``create_model``.

Each network module decorates its :class:`~medseg.networks.base.SegmentationNetwork` class (or a
builder with explicit keyword parameters) with :func:`register_network`, giving the reference
configurations -- the named *variants* -- as the exact keyword arguments for
:func:`create_network`. ``medseg models`` lists them and the tests count parameters for them; a
variant is built by name with ``create_network("unet", variant="hippocampus")`` (like timm's
``create_model`` with a pretrained tag, but without any download), keyword arguments overriding
the variant's.

Keyword arguments are checked against the builder's signature before the call, so a misspelt
or unknown option is a :class:`~medseg.errors.ConfigError`, while a ``TypeError`` raised *inside* a
network constructor (a bug) propagates as such.

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

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from medseg.errors import ConfigError
from medseg.networks.base import check_network_contract


@dataclass
class NetworkEntry:
    """A registered builder and its reference configurations (variant label -> kwargs)."""

    name: str
    builder: Callable[..., nn.Module]
    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""

    @property
    def variants(self) -> list[str]:
        """The reference labels, usable as ``create_network(name, variant=label)``."""
        return list(self.references)

    def signature(self) -> inspect.Signature:
        """The builder's keyword parameters (a class: its ``__init__`` without ``self``)."""
        return inspect.signature(self.builder)

    def check_config(self, config: dict[str, Any]) -> None:
        """Raise :class:`ConfigError` unless ``builder(**config)`` binds to the signature (no unknown
        or missing keyword argument); nothing is built."""
        signature = self.signature()
        parameters = signature.parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            accepted = [
                n
                for n, p in parameters.items()
                if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            ]
            unknown = sorted(set(config) - set(accepted))
            if unknown:
                raise ConfigError(
                    f"network '{self.name}': unknown option{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(unknown)} (accepted: {', '.join(accepted)})"
                )
        try:
            signature.bind(**config)
        except TypeError as error:  # only the binding, not the builder, is run here
            raise ConfigError(f"network '{self.name}': {error}") from None


_REGISTRY: dict[str, NetworkEntry] = {}


def register_network(name: str, references: dict[str, dict[str, Any]] | None = None, description: str = ""):
    """Decorator registering a network class (or ``builder(**config) -> SegmentationNetwork``) under ``name``.

    ``references`` maps a variant label (e.g. ``"B"`` or ``"paper"``) to the complete keyword
    arguments of :func:`create_network` for that reference configuration (spatial_dims and channels
    included). Returns the decorated object unchanged.
    """

    def decorator(builder: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"network {name!r} registered twice")
        doc = description or (builder.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = NetworkEntry(name, builder, dict(references or {}), doc)
        return builder

    return decorator


def create_network(name: str, *, variant: str | None = None, pretrained: str | None = None, **config: Any) -> nn.Module:
    """Build network ``name`` with ``config`` (``spatial_dims``, ``in_channels``, ``out_channels``...).

    Args:
        variant: a registered reference label (``medseg models`` lists them); its keyword arguments
            are the starting point and ``config`` overrides them, e.g.
            ``create_network("stunet", variant="B", out_channels=14)``.
        pretrained: optional path to a local weight file in the upstream format; loaded by the
            network's ``load_pretrained``, which reports missing/unexpected keys and raises on shape
            mismatches.

    Raises:
        ConfigError: unknown network name or variant, or keyword arguments that do not fit the
            builder's signature (checked before building); networks also raise it for invalid values.
        TypeError: a bug inside a network constructor (not turned into a ConfigError), or a network
            that does not declare the :class:`~medseg.networks.base.SegmentationNetwork` contract.
    """
    entry = network_entry(name)
    if variant is not None:
        if variant not in entry.references:
            raise ConfigError(f"network '{name}': unknown variant '{variant}' (known: {', '.join(entry.variants)})")
        config = {**entry.references[variant], **config}
    entry.check_config(config)
    network = entry.builder(**config)
    check_network_contract(network)
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
