"""``medseg models``: list the installed model packages, and every registered network with its
reference configurations.

Model packages (:func:`package_rows`, found on :func:`medseg.package.model_search_path`): name,
version, the short sha256 of the weights, the training time (ISO 8601 UTC) and the folder, so two
packages with one name and version (a retraining) can be told apart.

For each network and reference label: the exact :func:`~medseg.networks.create_network` keyword
arguments and the parameter count, computed by building the network on PyTorch's ``meta`` device
(no memory is allocated, so even billion-parameter configurations are listed in seconds).

``medseg models install PACKAGE [--name NAME] [--fp16 | --fp32] [--dest DIR] [--force]`` installs
a copy of a trained package (e.g. ``runs/hippocampus_swin_unetr/model``) as ``DIR/NAME`` (default
the bundled models, ``medseg/models``), with float16 weights when asked, and ships the OpenVINO
model of the copy's weights in it (:func:`medseg.package.install_package`). argparse cannot give
one command both NETWORK positionals and sub-commands, so ``install`` as the first word after
``models`` is handed to its own parser (:class:`_ModelsParser`); every other form of ``medseg
models`` is parsed as before.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
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


#: the first word after ``models`` that selects ``medseg models install``
INSTALL = "install"


class _ModelsParser(argparse.ArgumentParser):
    """``medseg models``'s parser: arguments starting with ``install`` go to the install parser."""

    install_parser: argparse.ArgumentParser

    def parse_known_args(self, args=None, namespace=None):
        if args and args[0] == INSTALL:
            return self.install_parser.parse_known_args(args[1:], namespace)
        return super().parse_known_args(args, namespace)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list installed model packages and registered networks; install a package",
        description="List the installed model packages (name, version, short weights sha256, "
        "training time, folder), then every registered network with its reference "
        "configurations (exact create_network keyword arguments) and parameter "
        "counts. With NETWORK names, only those networks.",
        epilog="medseg models install PACKAGE [--name NAME] [--fp16] [--dest DIR] [--force]: install a copy "
        "of a model package (see medseg models install --help).",
    )
    parser.__class__ = _ModelsParser
    parser.install_parser = _install_parser(parser.prog)
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
    if INSTALL in args.names:
        from medseg.errors import ConfigError

        raise ConfigError("'install' must come right after 'models': medseg models install PACKAGE ...")
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


def _install_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{prog} {INSTALL}",
        description="Install a copy of a model package (e.g. runs/hippocampus_swin_unetr/model) as "
        "DEST/NAME: written to a temporary folder and renamed into place, never over an existing "
        "folder unless --force. The copy's card gets the sha256 of its weights file and the weights' "
        "storage dtype; its OpenVINO model is made from the copy's weights (converted runtimes of the "
        "source are not copied).",
    )
    parser.add_argument("package", metavar="PACKAGE", help="model package folder (or the name of an installed one)")
    parser.add_argument("--name", default=None, help="folder name of the copy (default: the card's name)")
    dtype = parser.add_mutually_exclusive_group()
    dtype.add_argument(
        "--fp16",
        dest="weights_dtype",
        action="store_const",
        const="float16",
        default=None,
        help="store the weights in float16 (half the size; loaded as float32) (default: as the source stores them)",
    )
    dtype.add_argument("--fp32", dest="weights_dtype", action="store_const", const="float32", help="store float32")
    parser.add_argument(
        "--dest", type=Path, default=None, help="folder of model packages (default: the bundled models, medseg/models)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing package DEST/NAME")
    parser.add_argument(
        "--no-openvino", action="store_true", help="ship no OpenVINO model (the Predictor converts on first use)"
    )
    parser.add_argument("--json", action="store_true", help="print the installed package's row as JSON")
    parser.set_defaults(func=run_install)
    return parser


def run_install(args: argparse.Namespace) -> int:
    """Install the copy (:func:`medseg.package.install_package`) and print what was written:
    folder, identity, weights dtype and size against the source's, the OpenVINO model. Exit 0; 2 on
    bad input (not a package, destination exists, bad name)."""
    from medseg.package import BUNDLED_MODELS, WEIGHTS, ModelPackage, install_package, resolve_model

    source = ModelPackage(args.package) if Path(args.package).exists() else resolve_model(args.package)
    package = install_package(
        source,
        args.name,
        args.dest or BUNDLED_MODELS,
        args.weights_dtype,
        force=args.force,
        openvino=not args.no_openvino,
    )
    row = {
        "name": package.path.name,
        "identity": package.card.identity,
        "path": str(package.path),
        "source": str(source.path),
        "weights_dtype": package.card.weights_dtype,
        "weights_sha256": package.weights_sha256,
        "weights_mb": round((package.path / WEIGHTS).stat().st_size / 1e6, 2),
        "source_weights_dtype": source.card.weights_dtype,
        "source_weights_mb": round((source.path / WEIGHTS).stat().st_size / 1e6, 2),
        "package_mb": round(_folder_bytes(package.path) / 1e6, 2),
        "openvino": _runtime_state(package),
    }
    if args.json:
        print(json.dumps(row, indent=2))
    else:
        print(
            f"installed {row['identity']} as {row['path']}\n"
            f"  weights  {row['weights_dtype']}, {row['weights_mb']:.2f} MB "
            f"(source {row['source_weights_dtype']}, {row['source_weights_mb']:.2f} MB: {row['source']})\n"
            f"  package  {row['package_mb']:.2f} MB\n"
            f"  openvino {row['openvino']}"
        )
    return 0


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _runtime_state(package) -> str:
    """What the copy ships of the OpenVINO runtime: the model folder, a failed conversion's
    reason, or none."""
    folders = sorted(p for p in package.runtime_dir.glob("*") if p.is_dir()) if package.runtime_dir.is_dir() else []
    for folder in folders:
        if (folder / "model.xml").is_file():
            return f"runtime/openvino/{folder.name}"
    for folder in folders:
        if (folder / "failed.json").is_file():
            try:
                reason = json.loads((folder / "failed.json").read_text())["reason"]
            except (OSError, ValueError, KeyError):
                reason = "conversion failed"
            return f"none (conversion failed: {reason}; the Predictor runs the network eagerly)"
    return "none (converted on first use)"


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
