"""``watchbuy db upgrade``: create or migrate the database named by WATCHBUY_DATABASE_URL."""

from __future__ import annotations

import argparse
import asyncio


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

    applied = asyncio.run(main())
    print(f"database is up to date (applied: {', '.join(map(str, applied)) or 'nothing'})")
    return 0


def register(subparsers) -> None:
    db = subparsers.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_sub.add_parser("upgrade", help="apply pending migrations")
    upgrade.add_argument("--database-url", help="overrides WATCHBUY_DATABASE_URL")
    upgrade.set_defaults(run=run_upgrade)
