"""``medseg models``: list the installed model packages, and every registered network with its
reference configurations.

Model packages (:func:`package_rows`, found on :func:`medseg.package.model_search_path`): name,
version, the short sha256 of the weights, the training time (ISO 8601 UTC) and the folder, so two
packages with one name and version (a retraining) can be told apart.

For each network and reference label: the exact :func:`~medseg.networks.create_network` keyword
arguments and the parameter count, computed by building the network on PyTorch's ``meta`` device
(no memory is allocated, so even billion-parameter configurations are listed in seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# torch and medseg.networks are imported where they are used, so that `medseg --help` stays fast


def count_reference_parameters(name: str, config: dict[str, Any]) -> int:
    """Parameter count of ``create_network(name, **config)``, built on the ``meta`` device."""
    import torch

    from medseg.networks import count_parameters, create_network

    with torch.device("meta"):
        network = create_network(name, **config)
    return count_parameters(network)


def reference_rows(names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per (network, reference label): ``name``, ``reference``, ``config``, ``parameters``,
    ``description``; ``parameters`` is None and ``error`` is set if the network failed to build.

    Raises:
        ConfigError: a name in ``names`` is not registered.
    """
    from medseg.networks import list_networks, network_entry

    rows = []
    for name in names or list_networks():
        entry = network_entry(name)
        for label, config in entry.references.items():
            row: dict[str, Any] = {
                "name": name,
                "reference": label,
                "config": dict(config),
                "description": entry.description,
            }
            try:
                row["parameters"] = count_reference_parameters(name, config)
            except Exception as error:  # one broken builder must not hide the others
                row["parameters"] = None
                row["error"] = f"{type(error).__name__}: {' '.join(str(error).split())}"
            rows.append(row)
    return rows


def package_rows() -> list[dict[str, Any]]:
    """One row per model package folder on the search path (``$MEDSEG_MODEL_PATH``, then the
    bundled models), in search order: ``name``, ``version``, ``weights_sha256`` (64 hex),
    ``weights_sha256_short`` (12 hex), ``trained_at`` (ISO 8601 UTC, ``None`` for packages that
    predate it), ``hash_source`` (``metadata`` or ``computed`` from the weights file), ``path``,
    ``shadowed`` (an earlier folder has a package of the same name, which ``--model NAME``
    uses). A package that cannot be read gets ``error`` and ``None`` fields instead; never raises
    for one package.
    """
    from medseg.errors import MedsegError
    from medseg.package import ModelPackage, package_folders

    rows, seen = [], set()
    for folder in package_folders():
        row: dict[str, Any] = {
            "name": folder.name,
            "version": None,
            "weights_sha256": None,
            "weights_sha256_short": None,
            "trained_at": None,
            "hash_source": None,
            "path": str(folder),
            "shadowed": folder.name in seen,
        }
        seen.add(folder.name)
        try:
            package = ModelPackage(folder)
        except (MedsegError, OSError) as error:
            row["error"] = " ".join(str(error).split())
        else:
            card = package.card
            row.update(
                name=card.name,
                version=card.version,
                weights_sha256=card.weights_sha256,
                weights_sha256_short=card.weights_short,
                trained_at=card.trained_at,
                hash_source=package.hash_source,
            )
            if card.name != folder.name:
                row["folder_name"] = folder.name
        rows.append(row)
    return rows


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list installed model packages and registered networks",
        description="List the installed model packages (name, version, short weights sha256, "
        "training time, folder), then every registered network with its reference "
        "configurations (exact create_network keyword arguments) and parameter "
        "counts. With NETWORK names, only those networks.",
    )
    parser.add_argument("names", nargs="*", metavar="NETWORK", help="only these networks (default: all)")
    parser.add_argument("--packages", action="store_true", help="only the installed model packages")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list instead of a table: the networks' rows, or with --packages the packages' rows",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the table(s) (or JSON); exit 1 if some network failed to build or some package could
    not be read, else 0.

    Without NETWORK names and without ``--json``: the packages table, a blank line, the
    networks table. ``--packages``: the packages only. NETWORK names: those networks only.
    ``--json`` prints one list (networks, or packages with ``--packages``).
    """
    show_packages = args.packages or not (args.names or args.json)
    show_networks = not args.packages
    packages = package_rows() if show_packages else []
    rows = reference_rows(args.names or None) if show_networks else []
    if args.json:
        print(json.dumps(packages if args.packages else rows, indent=2, default=str))
    else:
        tables = [_package_table(packages)] if show_packages else []
        tables += [_table(rows)] if show_networks else []
        print("\n\n".join(tables))
    failed = [f"{r['name']}/{r['reference']}: {r['error']}" for r in rows if r["parameters"] is None]
    failed += [f"model package {r['path']}: {r['error']}" for r in packages if "error" in r]
    for line in failed:
        print(f"medseg models: error: {line}", file=sys.stderr)
    return 1 if failed else 0


def _package_table(rows: list[dict[str, Any]]) -> str:
    header = ("model", "version", "sha256", "trained_at", "path")
    if not rows:
        return "no model packages installed (search path: $MEDSEG_MODEL_PATH, bundled models)"
    body = [
        (
            r["name"],
            r["version"] or "error",
            r["weights_sha256_short"] or "-",
            r["trained_at"] or "-",
            r["path"] + (" (shadowed)" if r["shadowed"] else "") + (f" ({r['error']})" if "error" in r else ""),
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(4)]
    return "\n".join(
        "  ".join(f"{str(line[i]):<{widths[i]}}" for i in range(4)) + f"  {line[4]}" for line in [header, *body]
    )


def _table(rows: list[dict[str, Any]]) -> str:
    header = ("network", "reference", "parameters", "config")
    body = [
        (
            r["name"],
            r["reference"],
            "error" if r["parameters"] is None else f"{r['parameters']:,}",
            ", ".join(f"{k}={v!r}" for k, v in r["config"].items()),
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(3)]
    lines = []
    for line in [header, *body]:
        lines.append(f"{line[0]:<{widths[0]}}  {line[1]:<{widths[1]}}  {line[2]:>{widths[2]}}  {line[3]}")
    return "\n".join(lines)
