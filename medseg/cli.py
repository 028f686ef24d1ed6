"""The ``medseg`` command line.

Each sub-command lives in its own module under :mod:`medseg.commands` and exposes
``register(subparsers)``, which adds a parser whose ``func`` default is called with the parsed
arguments and returns an exit code. Any :class:`medseg.errors.MedsegError` becomes a single line on
stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from medseg import __version__
from medseg.errors import MedsegError


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every sub-command in :mod:`medseg.commands`."""
    import medseg.commands as commands

    parser = argparse.ArgumentParser(prog="medseg", description="Medical image segmentation.")
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"medseg.commands.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (0 ok, 1 partial failure, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except MedsegError as error:
        print(f"medseg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
