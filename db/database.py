"""Connections: one thin wrapper over ``databases`` for SQLite (default) and MySQL/MariaDB.

``databases`` returns ``lastrowid`` from ``execute``, not the affected row count, so the
conditional updates that guard stock read the count back on the same connection inside their
transaction (``changes()`` / ``ROW_COUNT()``): see :meth:`Database.affected_rows`.

SQLite allows one writer at a time and fails a deferred transaction that must upgrade to a write
lock while another writer holds it; an in-process lock serialises write transactions so the
embedded default never sees "database is locked" (MySQL gets real concurrent transactions).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import databases
import sqlalchemy as sa

from watchbuy.settings import ConfigError


def now() -> float:
    return time.time()


def normalise_url(url: str) -> str:
    if url.startswith("sqlite+aiosqlite://"):
        return "sqlite://" + url[len("sqlite+aiosqlite://"):]
    if url.startswith("mysql://"):
        return "mysql+aiomysql://" + url[len("mysql://"):]
    return url


class _SQLiteConnection(sqlite3.Connection):
    """``databases`` opens a new SQLite connection for every statement outside a transaction,
    and these pragmas hold per connection: set on one in :meth:`Database.connect` only, foreign
    keys went unchecked everywhere else."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.execute("PRAGMA foreign_keys=ON")
        self.execute("PRAGMA busy_timeout=5000")


class Database:
    def __init__(self, url: str) -> None:
        url = normalise_url(url)
        if url.startswith("sqlite://"):
            self.dialect_name = "sqlite"
        elif url.startswith("mysql+aiomysql://"):
            self.dialect_name = "mysql"
        else:
            raise ConfigError(
                "WATCHBUY_DATABASE_URL: use sqlite:///path or mysql+aiomysql://user:pass@host/db"
            )
        self.url = url
        options = {"min_size": 1, "max_size": 20} if self.dialect_name == "mysql" else \
            {"factory": _SQLiteConnection}
        self._db = databases.Database(url, **options)
        self._write_lock = asyncio.Lock() if self.dialect_name == "sqlite" else None

    @property
    def dialect(self) -> sa.engine.Dialect:
        if self.dialect_name == "sqlite":
            from sqlalchemy.dialects import sqlite

            return sqlite.dialect()
        from sqlalchemy.dialects import mysql

        return mysql.dialect()

    async def connect(self) -> None:
        if self.dialect_name == "sqlite":
            path = self.url.split("sqlite:///", 1)[-1].split("?", 1)[0]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        await self._db.connect()
        if self.dialect_name == "sqlite":
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA foreign_keys=ON")
            await self._db.execute("PRAGMA busy_timeout=5000")

    async def disconnect(self) -> None:
        await self._db.disconnect()

    # -- queries ----------------------------------------------------------------------------
    async def fetch_one(self, query, values: dict | None = None):
        return await self._db.fetch_one(query, values)

    async def fetch_all(self, query, values: dict | None = None) -> list:
        return await self._db.fetch_all(query, values)

    async def fetch_val(self, query, values: dict | None = None):
        return await self._db.fetch_val(query, values)

    async def execute(self, query, values: dict | None = None):
        """Runs a statement; returns the new row id for inserts."""
        return await self._db.execute(query, values)

    async def affected_rows(self) -> int:
        """Rows changed by the previous statement on this task's connection."""
        sql = "SELECT changes()" if self.dialect_name == "sqlite" else "SELECT ROW_COUNT()"
        return int(await self._db.fetch_val(sql))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """A write transaction (every write goes through one: the seed's rule)."""
        if self._write_lock is None:
            async with self._db.transaction():
                yield
            return
        async with self._write_lock:
            async with self._db.transaction():
                yield

    def compile_ddl(self, element) -> str:
        return str(element.compile(dialect=self.dialect))
