"""The ``medseg`` command line.

Each sub-command lives in its own module under :mod:`medseg.commands` and exposes
``register(subparsers)``, which adds a parser whose ``func`` default is called with the parsed
arguments and returns an exit code. Any :class:`medseg.errors.MedsegError` becomes a single line on
stderr and exit code 2, with no traceback; so does an argparse usage error, and :func:`main` returns
the code instead of raising :class:`SystemExit` (see :data:`EXIT_CODES`).

Command modules import nothing heavy (torch, MONAI, numpy, SimpleITK, nibabel...) at module level:
building the parser imports every one of them, and ``medseg --help`` must stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from medseg import __version__
from medseg.errors import MedsegError

EXIT_CODES = """\
exit status (every command):
  0    success
  1    some of the work failed: a series or input of a batch could not be processed (predict,
       info; per-series errors on stderr), no series fitted the model (predict), a network did
       not build (models)
  2    usage error or bad input: unknown option or command, missing argument, unreadable or
       unsafe file, unknown model, invalid config (a message on stderr, no traceback)
  130  interrupted (Ctrl-C)"""


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every sub-command in :mod:`medseg.commands`."""
    import medseg.commands as commands

    parser = argparse.ArgumentParser(
        prog="medseg",
        description="Medical image segmentation.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"medseg.commands.{info.name}")
        module.register(subparsers)
    return parser


def _exit_code(exit: SystemExit) -> int:
    """The process exit code a :class:`SystemExit` stands for (as the interpreter would use it)."""
    if exit.code is None:
        return 0
    if isinstance(exit.code, int):
        return exit.code
    print(exit.code, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (:data:`EXIT_CODES`: 0 ok, 1 part of a batch
    failed, 2 usage error or bad input). Never raises :class:`SystemExit`: ``--help``,
    ``--version`` and argparse's usage errors (exit 2) return their code too."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return _exit_code(exit)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except SystemExit as exit:  # e.g. a command's own argparse parser (train's trailing options)
        return _exit_code(exit)
    except MedsegError as error:
        print(f"medseg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
