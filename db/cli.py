"""``watchbuy db upgrade``: create or migrate the database named by WATCHBUY_DATABASE_URL."""

from __future__ import annotations

import argparse
import asyncio
import sys
from urllib.parse import urlsplit

from watchbuy.settings import ConfigError


def run_upgrade(args: argparse.Namespace) -> int:
    from watchbuy.db.database import Database
    from watchbuy.db.migrations import upgrade
    from watchbuy.site.config import load_site_settings

    settings = load_site_settings(database_url=args.database_url)

    async def main() -> list[int]:
        db = Database(settings.database_url)
        await db.connect()
        try:
            return await upgrade(db)
        finally:
            await db.disconnect()

    try:
        applied = asyncio.run(main())
    except ConfigError:
        raise
    except Exception as exc:
        # An unreachable server, an unknown database, a bad port: one line, not a traceback,
        # as every command reports what the operator must fix.
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        print(f"watchbuy: cannot upgrade the database at {redacted(settings.database_url)}: "
              f"{reason}", file=sys.stderr)
        return 1
    print(f"database is up to date (applied: {', '.join(map(str, applied)) or 'nothing'})")
    return 0


def redacted(url: str) -> str:
    """The URL without its password (error messages end up in logs)."""
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()
    except ValueError:
        return url.split("://", 1)[0] + "://…"
    return url


def register(subparsers) -> None:
    db = subparsers.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_sub.add_parser("upgrade", help="apply pending migrations")
    upgrade.add_argument("--database-url", help="overrides WATCHBUY_DATABASE_URL")
    upgrade.set_defaults(run=run_upgrade)
