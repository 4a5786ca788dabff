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


async def initial_schema(db: Database) -> None:
    await create_tables(db, schema.metadata)


MIGRATIONS: list[Migration] = [
    Migration(1, "initial schema: users, sessions, channels, products, cart, orders, chat",
              initial_schema),
]


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
        await migration.apply(db)
        await db.execute(schema_version.insert().values(
            version=migration.version, description=migration.description, applied_at=now()))
        applied.append(migration.version)
    return applied


async def drop_all(db: Database) -> None:
    """Remove every table (tests on a shared MariaDB database start clean)."""
    for table in reversed(schema.metadata.sorted_tables):
        await db.execute(db.compile_ddl(sa.schema.DropTable(table, if_exists=True)))
    await db.execute(db.compile_ddl(sa.schema.DropTable(schema_version, if_exists=True)))
