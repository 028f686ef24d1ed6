"""``medseg worker``: a Celery worker process that runs service jobs taken from a broker.

The scale-out half of ``medseg serve --broker URL --workers 0``: API replicas store jobs and
publish their ids; workers (any number, on any machine sharing the job store and the data dir)
claim and run them. Every setting can also come from a ``MEDSEG_SERVICE_<NAME>`` variable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("worker", help="run service jobs from a broker (Celery)")
    parser.add_argument(
        "--broker", dest="broker_url", help="Celery broker URL, e.g. redis://host:6379/0 or amqp://user:pass@host//"
    )
    parser.add_argument("--database-url", help="SQLAlchemy URL of the shared job store")
    parser.add_argument("--data-dir", type=Path, help="the shared data dir (jobs' files)")
    parser.add_argument(
        "--concurrency", type=int, dest="worker_concurrency", help="jobs run at once by this process (default 1)"
    )
    parser.add_argument("--device", help="torch device for inference (default cpu)")
    parser.add_argument("--queue", dest="broker_queue", help="Celery queue name (default medseg)")
    parser.add_argument("--node-id", help="this process's name in the job store (default host name)")
    parser.add_argument("--pacs-url", help="DICOMweb root to push finished SEGs to (STOW-RS)")
    parser.add_argument("--loglevel", default="INFO", help="Celery log level (default INFO)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service import logs
    from service.broker import run_worker
    from service.config import Settings

    overrides = {
        name: getattr(args, name, None)
        for name in (
            "broker_url",
            "database_url",
            "data_dir",
            "worker_concurrency",
            "device",
            "broker_queue",
            "node_id",
            "pacs_url",
        )
    }
    settings = Settings.load(overrides)
    if not settings.broker_url:
        raise ConfigError("medseg worker needs --broker URL (or MEDSEG_SERVICE_BROKER_URL)")
    logs.configure()
    return run_worker(settings, loglevel=args.loglevel)
