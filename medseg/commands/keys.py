"""``medseg keys create|list|revoke``: the service's API keys (stored hashed in the job store)."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("keys", help="create, list or revoke service API keys")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a key and print it (shown once)")
    create.add_argument("--role", required=True, choices=("read", "submit", "admin"))
    create.add_argument("--name", default="", help="a label for the key (who uses it)")
    listing = actions.add_parser("list", help="list keys (ids, roles; never the keys)")
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    for sub in (create, listing, revoke):
        sub.add_argument("--data-dir", type=Path, help="the service's data dir")
        sub.add_argument("--database-url", help="the service's job store URL")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medseg.errors import ConfigError
    from service.auth import create_key, list_keys, revoke_key
    from service.config import Settings
    from service.store import Store

    settings = Settings.load({"data_dir": args.data_dir, "database_url": args.database_url})
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.db_url)
    try:
        if args.action == "create":
            key, row = create_key(store, args.role, args.name)
            print(key)
            return 0
        if args.action == "list":
            print(f"{'id':<14}{'role':<8}{'created (UTC)':<22}{'revoked':<22}name")
            for row in list_keys(store):
                print(
                    f"{row.id:<14}{row.role:<8}{_time(row.created_at):<22}{_time(row.revoked_at) or '-':<22}{row.name}"
                )
            return 0
        if not revoke_key(store, args.key_id):
            raise ConfigError(f"no active key with id '{args.key_id}'")
        print(f"revoked {args.key_id}")
        return 0
    finally:
        store.dispose()


def _time(value: float | None) -> str:
    if value is None:
        return ""
    return datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
