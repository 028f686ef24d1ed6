"""``medseg models``: list every registered network and its reference configurations.

For each network and reference label: the exact :func:`~medseg.networks.create_network` keyword
arguments and the parameter count, computed by building the network on PyTorch's ``meta`` device
(no memory is allocated, so even billion-parameter configurations are listed in seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from medseg.networks import (
    count_parameters,
    create_network,
    list_networks,
    network_entry,
)


def count_reference_parameters(name: str, config: dict[str, Any]) -> int:
    """Parameter count of ``create_network(name, **config)``, built on the ``meta`` device."""
    with torch.device("meta"):
        network = create_network(name, **config)
    return count_parameters(network)


def reference_rows(names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per (network, reference label): ``name``, ``reference``, ``config``, ``parameters``,
    ``description``; ``parameters`` is None and ``error`` is set if the network failed to build.

    Raises:
        ConfigError: a name in ``names`` is not registered.
    """
    rows = []
    for name in names or list_networks():
        entry = network_entry(name)
        for label, config in entry.references.items():
            row: dict[str, Any] = {"name": name, "reference": label, "config": dict(config),
                                   "description": entry.description}
            try:
                row["parameters"] = count_reference_parameters(name, config)
            except Exception as error:  # one broken builder must not hide the others
                row["parameters"] = None
                row["error"] = f"{type(error).__name__}: {' '.join(str(error).split())}"
            rows.append(row)
    return rows


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models", help="list registered networks, reference configs and parameter counts",
        description="List every registered network with its reference configurations "
                    "(exact create_network keyword arguments) and parameter counts.")
    parser.add_argument("names", nargs="*", metavar="NETWORK", help="only these networks (default: all)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the table (or JSON); exit 1 if some network failed to build, else 0."""
    rows = reference_rows(args.names or None)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(_table(rows))
    failed = [f"{r['name']}/{r['reference']}: {r['error']}" for r in rows if r["parameters"] is None]
    for line in failed:
        print(f"medseg models: error: {line}", file=sys.stderr)
    return 1 if failed else 0


def _table(rows: list[dict[str, Any]]) -> str:
    header = ("network", "reference", "parameters", "config")
    body = [(r["name"], r["reference"], "error" if r["parameters"] is None else f"{r['parameters']:,}",
             ", ".join(f"{k}={v!r}" for k, v in r["config"].items())) for r in rows]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(3)]
    lines = []
    for line in [header, *body]:
        lines.append(f"{line[0]:<{widths[0]}}  {line[1]:<{widths[1]}}  {line[2]:>{widths[2]}}  {line[3]}")
    return "\n".join(lines)
