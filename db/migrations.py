"""Versioned migrations: ``watchbuy db upgrade`` applies the ones a database has not seen.

The schema's one source is :mod:`watchbuy.db.schema`; migration 1 creates its tables.  A later
schema change adds a migration here (ALTER/CREATE for what changed), so databases created at any
version reach the same shape.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import sqlalchemy as sa

from watchbuy.db import schema
from watchbuy.db.database import Database, now

log = logging.getLogger("watchbuy.db")

schema_version = sa.Table(
    "schema_version",
    sa.MetaData(),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.Double, nullable=False),
)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Database], Awaitable[None]]


async def create_tables(db: Database, metadata: sa.MetaData) -> None:
    for table in metadata.sorted_tables:
        ddl = db.compile_ddl(sa.schema.CreateTable(table, if_not_exists=True))
        if db.dialect_name == "mysql":
            ddl += " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
        await db.execute(ddl)
        for index in table.indexes:
            await db.execute(db.compile_ddl(sa.schema.CreateIndex(index, if_not_exists=True)))


async def column_names(db: Database, table: str) -> set[str]:
    """The columns a table has now: a migration adds only what a database lacks, because
    migration 1 creates the tables as :mod:`schema` is today (with the later columns)."""
    if db.dialect_name == "sqlite":
        rows = await db.fetch_all(f"PRAGMA table_info({table})")
        return {row[1] for row in rows}
    rows = await db.fetch_all(
        "SELECT COLUMN_NAME FROM information_schema.COLUMNS "
        "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :table", {"table": table})
    return {row[0] for row in rows}


async def add_missing_column(db: Database, column: sa.Column) -> bool:
    """ALTER TABLE … ADD COLUMN for a column of :mod:`schema` the database lacks."""
    table = column.table.name
    if column.name in await column_names(db, table):
        return False
    spec = db.compile_ddl(sa.schema.CreateColumn(column))
    await db.execute(f"ALTER TABLE {table} ADD COLUMN {spec}")
    return True


async def initial_schema(db: Database) -> None:
    await create_tables(db, schema.metadata)


async def money_bigint_and_test_orders(db: Database) -> None:
    # MySQL's INT stops at 2^31 - 1 minor units ($21 million); SQLite's INTEGER is 64-bit.
    if db.dialect_name == "mysql":
        for table, column in (("products", "price_minor"), ("orders", "total_minor"),
                              ("order_items", "unit_price_minor")):
            await db.execute(f"ALTER TABLE {table} MODIFY {column} BIGINT NOT NULL")
    if await add_missing_column(db, schema.orders.c.test_mode):
        # orders of the test-card form were never real money
        await db.execute("UPDATE orders SET test_mode = 1 WHERE payment_mode = 'test'")
    await add_missing_column(db, schema.orders.c.status_note)


async def shows_shipping_and_replays(db: Database) -> None:
    # the columns older tables lack, then the new tables and every index (CREATE … IF NOT
    # EXISTS; an index may be on a column just added)
    for column in (
        schema.users.c.announce_purchases, schema.users.c.avatar,
        schema.users.c.stripe_customer_id, schema.users.c.saved_payment_method,
        schema.users.c.saved_card_brand, schema.users.c.saved_card_last4,
        schema.products.c.physical, schema.products.c.sold,
        *(c for c in schema.orders.c if c.name.startswith("ship_")),
        schema.orders.c.shipped_at, schema.orders.c.carrier, schema.orders.c.tracking_number,
        schema.order_items.c.flash_sale_id, schema.order_items.c.shipped_at,
        schema.order_items.c.carrier, schema.order_items.c.tracking_number,
    ):
        await add_missing_column(db, column)
    await create_tables(db, schema.metadata)
    # added to recordings after migration 3 first ran on some databases (the table exists by now)
    await add_missing_column(db, schema.recordings.c.media_start_ms)


async def buy_now_request_keys(db: Database) -> None:
    await add_missing_column(db, schema.orders.c.request_key)
    for index in schema.orders.indexes:  # IF NOT EXISTS: the new unique index
        await db.execute(db.compile_ddl(sa.schema.CreateIndex(index, if_not_exists=True)))


MIGRATIONS: list[Migration] = [
    Migration(1, "initial schema: users, sessions, channels, products, cart, orders, chat",
              initial_schema),
    Migration(2, "money columns BIGINT; orders.test_mode and orders.status_note",
              money_bigint_and_test_orders),
    Migration(3, "addresses, shipping, flash sales, shows, follows, reminders, notifications, "
              "recordings, pins; one-tap payment and sold counts", shows_shipping_and_replays),
    Migration(4, "orders.request_key: one order per Buy-now press", buy_now_request_keys),
]


MIGRATION_ATTEMPTS = 3


async def current_version(db: Database) -> int:
    await create_tables(db, schema_version.metadata)
    version = await db.fetch_val(sa.select(sa.func.max(schema_version.c.version)))
    return int(version or 0)


async def upgrade(db: Database) -> list[int]:
    """Apply pending migrations in order; returns the versions applied."""
    applied = []
    version = await current_version(db)
    for migration in MIGRATIONS:
        if migration.version <= version:
            continue
        log.info("applying migration %d: %s", migration.version, migration.description)
        # Two site processes started together (two instances of a deploy) may both apply it:
        # every step is idempotent (IF NOT EXISTS, columns added only when missing), so the one
        # that loses a race on a step runs the steps again, and the one that loses the race on
        # the version row finds the migration recorded.
        for attempt in range(1, MIGRATION_ATTEMPTS + 1):
            try:
                await migration.apply(db)
                await db.execute(schema_version.insert().values(
                    version=migration.version, description=migration.description,
                    applied_at=now()))
            except Exception:
                if await current_version(db) >= migration.version:
                    break  # another process applied it
                if attempt == MIGRATION_ATTEMPTS:
                    raise
                log.info("migration %d: a step failed while another process migrates; running "
                         "it again", migration.version)
                continue
            applied.append(migration.version)
            break
    return applied


async def drop_all(db: Database) -> None:
    """Remove every table (tests on a shared MariaDB database start clean)."""
    for table in reversed(schema.metadata.sorted_tables):
        await db.execute(db.compile_ddl(sa.schema.DropTable(table, if_exists=True)))
    await db.execute(db.compile_ddl(sa.schema.DropTable(schema_version, if_exists=True)))
