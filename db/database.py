"""Connections: one thin wrapper over ``databases`` for SQLite (default) and MySQL/MariaDB.

``databases`` returns ``lastrowid`` from ``execute``, not the affected row count, so the
conditional updates that guard stock read the count back on the same connection inside their
transaction (``changes()`` / ``ROW_COUNT()``): see :meth:`Database.affected_rows`.

SQLite allows one writer at a time and fails a deferred transaction that must upgrade to a write
lock while another writer holds it; an in-process lock serialises write transactions so the
embedded default never sees "database is locked" (MySQL gets real concurrent transactions).

MariaDB may still pick a transaction as a deadlock victim (1213) or give up waiting for a row
lock (1205) when shoppers write at the same moment; InnoDB has then rolled the whole transaction
back, so :meth:`Database.run_transaction` runs it again from the start, a bounded number of
times with a short jittered pause.  Every write path in :mod:`watchbuy.db.queries` goes through
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import databases
import pymysql.err
import sqlalchemy as sa

from watchbuy.logs import LogLimiter
from watchbuy.settings import ConfigError

log = logging.getLogger("watchbuy.db")

T = TypeVar("T")

# MySQL/MariaDB error numbers after which InnoDB has rolled the transaction back (1213) or the
# statement gave up on a row lock (1205): the same transaction run again normally succeeds.
ER_LOCK_DEADLOCK = 1213
ER_LOCK_WAIT_TIMEOUT = 1205
ER_DUP_ENTRY = 1062
TRANSACTION_ATTEMPTS = 3  # one run plus two re-runs: enough for a crowd, bounded for a bug
RETRY_BACKOFF = 0.02  # seconds before the first re-run; doubles after each, jittered +-50 %


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


def is_lock_conflict(exc: BaseException) -> bool:
    """A deadlock or lock-wait timeout (MySQL), or SQLite's "database is locked" (another
    process held the write lock past busy_timeout): the transaction may simply be run again."""
    if isinstance(exc, pymysql.err.MySQLError):
        return bool(exc.args) and exc.args[0] in (ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT)
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
    return False


def is_duplicate_key(exc: BaseException) -> bool:
    """The driver's unique-constraint refusal: aiomysql raises PyMySQL's IntegrityError 1062,
    aiosqlite raises sqlite3's IntegrityError with a UNIQUE/PRIMARY KEY constraint code."""
    if isinstance(exc, pymysql.err.IntegrityError):
        return bool(exc.args) and exc.args[0] == ER_DUP_ENTRY
    if isinstance(exc, sqlite3.IntegrityError):
        return getattr(exc, "sqlite_errorcode", None) in (
            sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY)
    return False


class Database:
    def __init__(self, url: str, transaction_attempts: int = TRANSACTION_ATTEMPTS,
                 retry_backoff: float = RETRY_BACKOFF) -> None:
        if transaction_attempts < 1:
            raise ConfigError("transaction_attempts: at least 1")
        self.transaction_attempts = transaction_attempts
        self.retry_backoff = retry_backoff
        self.retries = 0  # transactions run again after a lock conflict (for tests and stats)
        self._retry_log = LogLimiter(log)
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
        """One transaction, run once (writes use :meth:`run_transaction`, which re-runs it on a
        lock conflict).  Writes always run in a transaction so that the conditional updates and
        their affected-row checks see the same state and roll back together."""
        if self._write_lock is None:
            async with self._db.transaction():
                yield
            return
        async with self._write_lock:
            async with self._db.transaction():
                yield

    async def run_transaction(self, work: Callable[[], Awaitable[T]]) -> T:
        """``await work()`` inside a transaction, run again from the start (at most
        ``transaction_attempts`` runs in all) when it loses a lock conflict; other errors and
        the last conflict propagate.  ``work`` must do nothing but database statements (no
        messages sent, nothing kept outside), because a failed run may be repeated."""
        for attempt in range(1, self.transaction_attempts + 1):
            try:
                async with self.transaction():
                    return await work()
            except Exception as exc:
                if attempt == self.transaction_attempts or not is_lock_conflict(exc):
                    raise
                self.retries += 1
                self._retry_log.log(logging.WARNING, "database: lock conflict (%s), running "
                                    "the transaction again (attempt %d of %d)", exc.args[:1],
                                    attempt + 1, self.transaction_attempts)
                # jittered so that the transactions that collided do not collide again
                await asyncio.sleep(self.retry_backoff * 2 ** (attempt - 1)
                                    * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")  # the loop returns or raises

    def compile_ddl(self, element) -> str:
        return str(element.compile(dialect=self.dialect))
