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
import os
import pkgutil
import sys
from collections.abc import MutableMapping

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


#: runtime settings the CLI applies at start-up unless the user set them (:func:`configure_runtime`)
RUNTIME_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def configure_runtime(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Apply :data:`RUNTIME_DEFAULTS` to ``environ`` (default ``os.environ``) where unset; returns
    what was set. Must run before PyTorch is imported: its OpenMP runtime (GNU libgomp) reads
    ``OMP_WAIT_POLICY`` once, when it loads. A value the user set, even an empty one, is kept.

    ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep at once instead of spin-waiting (libgomp
    spins ~300k iterations by default, for ever with ``ACTIVE``). PyTorch's eager CPU kernels fork
    and join an OpenMP team per operator, so on a machine whose cores are not all free the
    spinning threads take time from the one doing the work, and from everything else running.
    Measured with ``benchmarks/threads.py`` (hippocampus model, 5 cases, median seconds per case
    and process CPU seconds per case; 2-core AMD EPYC with a 1-thread training run on one core
    and other jobs, load average 3.5-4; "contended": plus a Python busy loop):

    ==============================  ======  =========  =========  =============
    configuration                   quiet   contended  quiet CPU  contended CPU
    ==============================  ======  =========  =========  =============
    eager, 2 threads, unset         2.17    2.76       2.24       2.33
    eager, 2 threads, PASSIVE       0.80    0.99       0.66       0.81
    eager, 2 threads, ACTIVE        5.28    3.61       4.49       2.60
    openvino, 2 threads, unset      0.50    0.96       0.39       0.38
    openvino, 2 threads, PASSIVE    0.50    1.02       0.39       0.39
    ==============================  ======  =========  =========  =============

    Eager PyTorch (``--runtime eager``/``channels_last``, training) is 2.7x (quiet) and 2.8x
    (contended) faster with ``PASSIVE`` and uses a third of the CPU time; two earlier runs gave
    1.6-3.4 s unset against 0.82 s PASSIVE quiet, 6.8-7.8 s against 1.3-1.4 s contended. The
    default CPU runtime, OpenVINO, schedules with oneTBB and a Predictor on a shipped OpenVINO
    model loads no PyTorch, so no OpenMP runtime: the setting changes nothing there (the rows
    differ by noise). At one thread no OpenMP team is formed and it changes nothing either.
    """
    environ = os.environ if environ is None else environ
    applied = {}
    for name, value in RUNTIME_DEFAULTS.items():
        if name not in environ:
            environ[name] = applied[name] = value
    return applied


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
    ``--version`` and argparse's usage errors (exit 2) return their code too.

    First applies :data:`RUNTIME_DEFAULTS` (:func:`configure_runtime`), before any command
    imports PyTorch; in a process that already imported it they have no effect on it."""
    configure_runtime()
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
