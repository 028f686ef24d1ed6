"""``medseg serve``: the PACS-adjacent REST service (FastAPI on uvicorn, workers in-process).

Listens on loopback unless ``--public`` is given. Every setting can also come from a
``MEDSEG_SERVICE_<NAME>`` environment variable (see :mod:`service.config`); flags win.
"""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

from medseg.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the REST / DICOMweb service")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--public", action="store_true", help="allow listening on a non-loopback address")
    parser.add_argument("--data-dir", type=Path, help="job store, uploads and results")
    parser.add_argument("--workers", type=int, help="in-process worker threads (default 1)")
    parser.add_argument("--database-url", help="SQLAlchemy URL (default SQLite in the data dir)")
    parser.add_argument("--default-model", help="model for requests that name none")
    parser.add_argument("--device", help="torch device for inference (default cpu)")
    parser.add_argument("--pacs-url", help="DICOMweb root to push finished SEGs to (STOW-RS)")
    parser.add_argument(
        "--stow-quiet",
        type=float,
        dest="stow_quiet_s",
        help="seconds without new instances before a STOW-RS series is complete",
    )
    parser.add_argument(
        "--cors-origin", action="append", dest="cors_origins", help="allowed browser origin (repeatable)"
    )
    parser.add_argument("--max-upload-mb", type=float, help="largest request body (MB)")
    parser.add_argument("--retention-hours", type=float, help="keep finished jobs' data this long")
    parser.add_argument(
        "--broker",
        dest="broker_url",
        help="Celery broker URL (redis://..., amqp://...): publish jobs to it for "
        "`medseg worker` processes (use with --workers 0 and a shared "
        "--database-url)",
    )
    parser.add_argument(
        "--node-id",
        help="this process's name in the job store (default host name; give each replica on one host its own)",
    )
    parser.set_defaults(func=run)


def check_host(host: str, public: bool) -> None:
    """Refuse a non-loopback address unless ``--public``.

    Raises:
        ConfigError: the address is not loopback and ``public`` is false.
    """
    if public:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"--host {host} is not a loopback address; add --public to listen on it")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from service import logs
    from service.app import create_app
    from service.config import Settings

    check_host(args.host, args.public)
    overrides = {
        "data_dir": args.data_dir,
        "workers": args.workers,
        "database_url": args.database_url,
        "default_model": args.default_model,
        "device": args.device,
        "pacs_url": args.pacs_url,
        "stow_quiet_s": args.stow_quiet_s,
        "cors_origins": args.cors_origins,
        "max_upload_bytes": int(args.max_upload_mb * 1024**2) if args.max_upload_mb else None,
        "retention_s": args.retention_hours * 3600 if args.retention_hours else None,
        "broker_url": getattr(args, "broker_url", None),
        "node_id": getattr(args, "node_id", None),
    }
    settings = Settings.load(overrides)
    logs.configure()
    app = create_app(settings)
    if settings.broker_url:
        from service import broker

        broker.install(app, settings)  # jobs go to the broker once the app has started
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
        server_header=False,
        **uvicorn_limits(settings),
    )
    return 0


def uvicorn_limits(settings) -> dict:
    """uvicorn options that bound what one client can hold (see :mod:`service.config`).

    - ``http``: uvicorn's h11 protocol with a deadline of ``header_timeout_s`` seconds for each
      request's line and headers (:mod:`service.http_limits`; uvicorn has none, so a client
      dribbling its headers would hold the connection forever);
    - ``limit_concurrency``: at most ``max_connections`` open connections / requests in
      progress, past which requests get 503;
    - ``timeout_keep_alive``: an idle keep-alive connection closes after
      ``keep_alive_timeout_s`` seconds;
    - ``h11_max_incomplete_event_size``: request line + headers of at most ``max_header_bytes``
      bytes (larger: 400);
    - ``ws="none"``: the service has no WebSocket routes, so upgrades are not offered.
    """
    from service.http_limits import h11_protocol

    return {
        "http": h11_protocol(settings.header_timeout_s),
        "ws": "none",
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }
