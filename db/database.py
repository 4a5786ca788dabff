"""Connections: one thin wrapper over ``databases`` for SQLite (default) and MySQL/MariaDB.

``databases`` returns ``lastrowid`` from ``execute``, not the affected row count, so the
conditional updates that guard stock read the count back on the same connection inside their
transaction (``changes()`` / ``ROW_COUNT()``): see :meth:`Database.affected_rows`.

SQLite allows one writer at a time and fails a deferred transaction that must upgrade to a write
lock while another writer holds it; an in-process lock serialises write transactions so the
embedded default never sees "database is locked" (MySQL gets real concurrent transactions).
A write transaction on SQLite runs on the event loop's own long-lived connection
(:class:`_SQLiteWriter`) when the write lock is free, every statement at once with no trip to a
worker thread; when another connection holds the lock it runs through ``databases`` on a worker
thread, which waits for it.

Reads outside a transaction on SQLite go to a long-lived read-only connection
(:class:`_SQLiteReader`) instead of ``databases``' connection per statement: that opened an
aiosqlite connection and an OS thread, and ran its pragmas, for every read, and was most of a
page's cost.  Each read runs whole (execute, fetch, close) before the next starts, so it takes
a fresh WAL snapshot and sees every write committed before it.  Reads inside a transaction
stay on the transaction's connection (they must see its writes).

Every statement is compiled once per shape (:class:`_CompileCache`, in the connections
``databases`` makes for reads and writes on both databases, and on the SQLite read connection),
and a text statement once per SQL string (:class:`_TextCache`): the site's hot queries are text
(``queries.compiled``), which on MariaDB runs straight on the task's aiomysql connection.

MariaDB may still pick a transaction as a deadlock victim (1213) or give up waiting for a row
lock (1205) when shoppers write at the same moment; InnoDB has then rolled the whole transaction
back, so :meth:`Database.run_transaction` runs it again from the start, a bounded number of
times with a short jittered pause.  Every write path in :mod:`watchbuy.db.queries` goes through
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import databases
import pymysql.err
import sqlalchemy as sa
from databases.backends.common.records import Record, Row, create_column_maps
from databases.backends.mysql import CompilationContext as MySQLCompilationContext
from databases.backends.mysql import MySQLConnection
from databases.backends.sqlite import CompilationContext, SQLiteConnection, SQLitePool
from sqlalchemy.engine.cursor import CursorResultMetaData
from sqlalchemy.sql.ddl import DDLElement

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
BUSY_TIMEOUT_MS = 5000  # how long an SQLite statement waits for another process's lock
COMPILED_CACHE_SIZE = 500  # statement shapes kept compiled per kind of connection (the site has ~200)
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
        self.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


# True inside Database.transaction() in this task: its reads must use the transaction's own
# connection (``databases`` keeps one per task), not the shared read connection.
_in_transaction: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "watchbuy_db_in_transaction", default=False)
# Set inside a transaction that runs on the loop's write connection (:class:`_SQLiteWriter`):
# its statements go there, run at once, without a trip to a worker thread.
_loop_writer: contextvars.ContextVar[_SQLiteWriter | None] = contextvars.ContextVar(
    "watchbuy_db_loop_writer", default=None)


def _result_context(dialect: sa.engine.Dialect, compiled) -> Any:
    """An execution context holding a compiled statement's result columns, as ``databases``
    makes one per statement: what its record classes read the columns of a row through."""
    context = dialect.execution_ctx_cls()
    context.dialect = dialect
    context.result_column_struct = (
        compiled._result_columns, compiled._ordered_columns,
        compiled._textual_ordered_columns, compiled._ad_hoc_textual,
        compiled._loose_column_name_matching)
    return context


class _CompileCache:
    """``databases``' compile of a statement, kept per statement shape (SQLAlchemy's cache
    key): ``databases`` compiles every SQLAlchemy statement it runs, every time, and that was
    the largest cost of a page's reads once the connection stayed open (and of a checkout's
    writes).  The values of each
    statement are taken from its cache key, as SQLAlchemy's own compiled cache does; what
    cannot be cached that way (no cache key, IN lists rendered per length, values set with
    ``.params()``) goes to ``databases``' own compile.  Returns what that compile returns."""

    def __init__(self, dialect: sa.engine.Dialect, fallback: Callable, context_class: type,
                 positional: bool) -> None:
        self._dialect = dialect
        self._fallback = fallback
        self._context_class = context_class
        self._positional = positional  # SQLite's qmark arguments, else MySQL's named ones
        self._kept: dict[object, tuple] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def compile(self, statement) -> tuple:
        cache_key = statement._generate_cache_key()
        if cache_key is None or any(p.expanding for p in cache_key.bindparams):
            return self._fallback(statement)
        found = self._kept.get(cache_key.key)
        if found is None:
            compiled = statement.compile(dialect=self._dialect, cache_key=cache_key,
                                         compile_kwargs={"render_postcompile": True})
            context = _result_context(self._dialect, compiled)
            if len(self._kept) >= COMPILED_CACHE_SIZE:
                self._kept.pop(next(iter(self._kept)))  # the oldest shape
            found = self._kept[cache_key.key] = (compiled, self._context_class(context))
        compiled, context = found
        try:
            params = compiled.construct_params(extracted_parameters=cache_key.bindparams)
        except sa.exc.InvalidRequestError:
            return self._fallback(statement)  # values set with .params()
        processors = compiled._bind_processors
        if self._positional:
            args: list | dict = [processors[key](params[key]) if key in processors
                                 else params[key] for key in compiled.positiontup]
        else:
            args = {key: processors[key](value) if key in processors else value
                    for key, value in params.items()}
        return compiled.string, args, compiled._result_columns, context


# Values a text statement may carry on the fast path: what both drivers take as they are (a
# datetime, a Decimal... go through databases, whose bind types convert them).
_PLAIN_VALUES = (int, float, str, bytes, type(None))


class _TextCache:
    """The driver's SQL and parameter order of each text statement (the site's hot queries
    are text compiled once, see ``queries.compiled``), kept per SQL string: ``databases`` made
    a ``sa.text`` of it and compiled it again on every call (a regular expression over the
    text, then SQLAlchemy's compiler), more CPU than the driver's own work on MariaDB."""

    def __init__(self, dialect: sa.engine.Dialect, context_class: type,
                 positional: bool) -> None:
        self._dialect = dialect
        self._context_class = context_class
        self._positional = positional  # SQLite's qmark arguments, else MySQL's pyformat dict
        self._kept: dict[str, tuple] = {}

    def prepare(self, sql: str, values: dict | None) -> tuple | None:
        """(driver SQL, arguments, result columns, context), or None for databases' path."""
        values = values or {}
        for value in values.values():
            if type(value) not in _PLAIN_VALUES:  # bool too: its bind type converts it
                return None
        found = self._kept.get(sql)
        if found is None:
            compiled = sa.text(sql).compile(dialect=self._dialect)
            context = _result_context(self._dialect, compiled)
            if len(self._kept) >= COMPILED_CACHE_SIZE:
                self._kept.pop(next(iter(self._kept)))
            names = tuple(compiled.positiontup or ()) if self._positional else None
            found = self._kept[sql] = (compiled.string, names, compiled._result_columns,
                                       self._context_class(context))
        string, names, result_columns, context = found
        try:
            args = [values[name] for name in names] if names is not None else \
                {name: values[name] for name in values}
        except KeyError:
            return None  # a parameter without a value: databases' own error
        return string, args, result_columns, context


def _records(dialect: sa.engine.Dialect, result_columns, context, description,
             rows: list) -> list[Record]:
    """Rows as ``databases``' backends make them (the same record classes)."""
    if not rows:
        return []
    column_maps = create_column_maps(result_columns)
    metadata = CursorResultMetaData(context, description)
    return [Record(Row(metadata, metadata._processors, metadata._keymap, row),
                   result_columns, dialect, column_maps) for row in rows]


class _CompiledOnce:
    """Mixin for ``databases``' connections: statements compiled once per shape (DDL as
    ``databases`` does it)."""

    cache: _CompileCache  # set on the subclass made per Database (see Database.__init__)

    def _compile(self, query) -> tuple:
        if isinstance(query, DDLElement):
            return super()._compile(query)
        return self.cache.compile(query)


class _CachedMySQLConnection(_CompiledOnce, MySQLConnection):
    """``databases``' MySQL connection with its statements (reads and writes: a checkout's
    are mostly writes) compiled once per shape."""


class _CachedSQLiteConnection(_CompiledOnce, SQLiteConnection):
    """``databases``' SQLite connection (a transaction's: writes, and reads inside one) with
    its statements compiled once per shape, as the read connection's are."""


class _TrackedSQLitePool(SQLitePool):
    """``databases``' SQLite "pool" (a new aiosqlite connection per use), remembering the
    connections it opened until they are closed.  A task cancelled while it held one (a request
    cut off at shutdown) never closes it; aiosqlite then stops its thread when the connection is
    garbage-collected, often after the event loop closed, and the thread fails with "Event loop
    is closed".  :meth:`Database.disconnect` closes the ones left, while the loop still runs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.open: set[aiosqlite.Connection] = set()

    async def acquire(self) -> aiosqlite.Connection:
        connection = aiosqlite.connect(database=self._database, isolation_level=None,
                                       **self._options)
        self.open.add(connection)  # before it connects: a cancel may come in the middle
        await connection.__aenter__()
        return connection

    async def release(self, connection: aiosqlite.Connection) -> None:
        await connection.__aexit__(None, None, None)
        self.open.discard(connection)

    async def close_left(self) -> None:
        for connection in list(self.open):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)
            self.open.discard(connection)


class _SQLiteReader:
    """Reads on long-lived read-only SQLite connections, one statement at a time.

    A read runs on the event loop's own thread, on a connection that never waits for a lock
    (``busy_timeout`` 0): in WAL mode a reader does not wait for writers, and an indexed read
    of a page's rows takes tens of microseconds, less than handing it to a thread and back
    (measured on the page queries: 38-231 us of CPU per read, against 112-603 us through a
    worker thread).  In the rare
    case SQLite answers "busy" (another process checkpointing, recovering the WAL index), the
    read is run again on a second connection on a worker thread that waits as long as writes
    do, so the loop itself never waits for a lock.

    Statements are compiled and their rows made into ``databases`` records exactly as
    ``databases``' own SQLite backend does (its compiler and record classes are reused), so a
    read returns the same values either way; only the connection handling differs."""

    def __init__(self, path: str, dialect: sa.engine.Dialect) -> None:
        self._path = path
        self._fast: sqlite3.Connection | None = None  # the loop's; never waits
        self._waiting: sqlite3.Connection | None = None  # the worker thread's; waits
        self._dialect = dialect
        # compiles like databases' backend (its _compile needs no open connection), kept
        self._compiled = _CompileCache(
            dialect, SQLiteConnection(None, dialect)._compile,  # type: ignore[arg-type]
            CompilationContext, positional=True)
        self._texts = _TextCache(dialect, CompilationContext, positional=True)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="watchbuy-sqlite-read")
        self.waited = 0  # reads that found the database busy and ran on the worker thread

    def _open(self, busy_timeout_ms: int) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, factory=_SQLiteConnection)
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        conn.execute("PRAGMA query_only=ON")  # a write sent here by mistake fails loudly
        return conn

    @staticmethod
    def _run(conn: sqlite3.Connection, sql: str, args: list, one: bool) -> tuple:
        cursor = conn.execute(sql, args)
        try:
            rows = cursor.fetchmany(1) if one else cursor.fetchall()
            return cursor.description, rows
        finally:
            cursor.close()  # ends the statement: the next read takes a fresh snapshot

    def _run_waiting(self, sql: str, args: list, one: bool) -> tuple:
        if self._waiting is None:  # opened on the worker thread, which alone uses it
            self._waiting = self._open(BUSY_TIMEOUT_MS)
        return self._run(self._waiting, sql, args, one)

    def prepare(self, query, values: dict | None) -> tuple:
        """(driver SQL, arguments, result columns, context), compiled as ``databases``'
        SQLite backend compiles it, once per text or statement shape (the write connection's
        statements too: :class:`_SQLiteWriter`)."""
        prepared = self._texts.prepare(query, values) if isinstance(query, str) else None
        if prepared is None:
            prepared = self._compiled.compile(
                databases.core.Connection._build_query(query, values))
        return prepared

    async def fetch(self, query, values: dict | None, one: bool) -> list[Record]:
        sql, args, result_columns, context = self.prepare(query, values)
        if self._fast is None:
            self._fast = self._open(0)
        try:
            description, rows = self._run(self._fast, sql, args, one)
        except sqlite3.OperationalError as exc:
            if not is_lock_conflict(exc):
                raise
            self.waited += 1
            description, rows = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run_waiting, sql, args, one)
        return _records(self._dialect, result_columns, context, description, rows)

    def _close_waiting(self) -> None:
        if self._waiting is not None:
            self._waiting.close()
            self._waiting = None

    async def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_waiting)
        self._executor.shutdown(wait=True)


class _SQLiteWriter:
    """Write transactions on the event loop's own thread, on one long-lived connection.

    Through ``databases`` every statement of a transaction (and its BEGIN, COMMIT, the
    connection's opening and closing) was a trip to the connection's worker thread and back,
    and each trip waited for the event loop's next turn.  In a Buy-now rush the loop is busy
    with the crowd, a turn took milliseconds, and SQLite's one writer kept its lock through a
    buyer's dozen trips: 300 buyers one after the other took seconds (bench/RESULTS.md, "Issue
    15: the rush on SQLite").  Here a transaction starts with ``BEGIN IMMEDIATE`` on a
    connection that never waits for a lock (``busy_timeout`` 0): either it has the write lock
    at once, and every statement after it runs on the loop in microseconds with no lock left
    to wait for (in WAL mode readers never block the writer), so the whole transaction takes
    one turn of the loop; or another connection holds the lock (another process, a statement
    run outside a transaction) and :meth:`begin` says so, and the transaction runs through
    ``databases`` on a worker thread instead, which waits for the lock as before.  The COMMIT
    runs on the loop too, with its fsync (``synchronous`` stays FULL: a paid order survives a
    power cut); measured at 0.26 ms median on this machine's disk.

    Only one transaction at a time uses the connection (the caller holds the in-process write
    lock), and its statements are compiled and their rows made exactly as the read
    connection's (:meth:`_SQLiteReader.prepare`), so a transaction returns the same values
    on either path."""

    def __init__(self, path: str, reader: _SQLiteReader, dialect: sa.engine.Dialect) -> None:
        self._path = path
        self._reader = reader
        self._dialect = dialect
        self._conn: sqlite3.Connection | None = None
        self.passed = 0  # transactions that found the write lock held and ran on a thread

    def begin(self) -> bool:
        """True: a transaction is open here with the write lock held; False: another
        connection holds the lock (nothing is open here)."""
        if self._conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, factory=_SQLiteConnection)
            conn.execute("PRAGMA busy_timeout=0")  # the loop never waits for a lock
            self._conn = conn
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not is_lock_conflict(exc):
                raise
            self.passed += 1
            return False
        return True

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or not self._conn.in_transaction:
            raise RuntimeError("a statement of a loop transaction ran outside it")
        return self._conn

    def fetch(self, query, values: dict | None, one: bool) -> list[Record]:
        sql, args, result_columns, context = self._reader.prepare(query, values)
        description, rows = _SQLiteReader._run(self._connection(), sql, args, one)
        return _records(self._dialect, result_columns, context, description, rows)

    def execute(self, query, values: dict | None) -> int:
        """The new row's id after an INSERT (what ``databases`` returns), else the rows
        changed (``databases`` returned the connection's last inserted id, if any, there;
        nothing reads it)."""
        sql, args, _, _ = self._reader.prepare(query, values)
        cursor = self._connection().execute(sql, args)
        try:
            inserted = sql.lstrip()[:7].upper() in ("INSERT ", "REPLACE")
            return cursor.lastrowid if inserted else cursor.rowcount
        finally:
            cursor.close()

    def changes(self) -> int:
        """Rows changed by the previous statement (SQLite's ``changes()``)."""
        return int(self._connection().execute("SELECT changes()").fetchone()[0])

    def commit(self) -> None:
        conn = self._connection()
        try:
            conn.execute("COMMIT")
        except BaseException:
            self.rollback()  # a failed COMMIT leaves the transaction open: nothing is kept
            raise

    def rollback(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def close(self) -> None:
        if self._conn is not None:
            self.rollback()
            self._conn.close()
            self._conn = None


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
        if self.dialect_name == "mysql":
            backend = self._db._backend
            cache = _CompileCache(backend._dialect, MySQLConnection(backend, backend._dialect)
                                  ._compile, MySQLCompilationContext, positional=False)
            connection_class = type("CachedMySQLConnection", (_CachedMySQLConnection,),
                                    {"cache": cache})
            # every connection databases makes for this database compiles through the cache
            backend.connection = lambda: connection_class(backend, backend._dialect)
            self._texts: _TextCache | None = _TextCache(backend._dialect, MySQLCompilationContext,
                                                        positional=False)
        else:
            self._texts = None  # SQLite's reads have their own (_SQLiteReader)
        self._write_lock = asyncio.Lock() if self.dialect_name == "sqlite" else None
        self._sqlite_pool: _TrackedSQLitePool | None = None
        if self.dialect_name == "sqlite":
            backend = self._db._backend
            self._sqlite_pool = backend._pool = _TrackedSQLitePool(backend._database_url,
                                                                    **options)
            cache = _CompileCache(backend._dialect, SQLiteConnection(backend._pool, backend._dialect)
                                  ._compile, CompilationContext, positional=True)
            sqlite_class = type("CachedSQLiteConnection", (_CachedSQLiteConnection,),
                                {"cache": cache})
            backend.connection = lambda: sqlite_class(backend._pool, backend._dialect)
        self._reader: _SQLiteReader | None = None
        self._writer: _SQLiteWriter | None = None

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
            await self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            database = self._db.url.database
            # an in-memory database exists per connection: a separate reader would see another
            if database and database != ":memory:" and not self._db.url.options:
                self._reader = _SQLiteReader(database, self._db._backend._dialect)
                self._writer = _SQLiteWriter(database, self._reader, self._db._backend._dialect)

    async def disconnect(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.close()
        await self._db.disconnect()
        if self._sqlite_pool is not None:
            await self._sqlite_pool.close_left()

    # -- queries ----------------------------------------------------------------------------
    async def _mysql_text(self, prepared: tuple, mode: str):
        """A text statement straight on the aiomysql connection ``databases`` gives this task
        (the transaction's own inside one), under the same per-connection lock its calls
        take; rows become the same records.  ``mode``: "one", "all" or "execute"."""
        sql, args, result_columns, context = prepared
        async with self._db.connection() as connection:
            async with connection._query_lock:
                cursor = await connection.raw_connection.cursor()
                try:
                    await cursor.execute(sql, args)
                    if mode == "execute":  # what databases' execute returns
                        return cursor.rowcount if cursor.lastrowid == 0 else cursor.lastrowid
                    rows = [await cursor.fetchone()] if mode == "one" else \
                        await cursor.fetchall()
                    if rows and rows[0] is None:
                        rows = []
                    description = cursor.description
                finally:
                    await cursor.close()
        return _records(self._db._backend._dialect, result_columns, context, description,
                        list(rows))

    def _prepared(self, query, values: dict | None) -> tuple | None:
        if self._texts is None or not isinstance(query, str):
            return None
        return self._texts.prepare(query, values)

    async def fetch_one(self, query, values: dict | None = None):
        if (writer := _loop_writer.get()) is not None:
            rows = writer.fetch(query, values, one=True)
            return rows[0] if rows else None
        if self._reader is not None and not _in_transaction.get():
            rows = await self._reader.fetch(query, values, one=True)
            return rows[0] if rows else None
        if (prepared := self._prepared(query, values)) is not None:
            rows = await self._mysql_text(prepared, "one")
            return rows[0] if rows else None
        return await self._db.fetch_one(query, values)

    async def fetch_all(self, query, values: dict | None = None) -> list:
        if (writer := _loop_writer.get()) is not None:
            return writer.fetch(query, values, one=False)
        if self._reader is not None and not _in_transaction.get():
            return await self._reader.fetch(query, values, one=False)
        if (prepared := self._prepared(query, values)) is not None:
            return await self._mysql_text(prepared, "all")
        return await self._db.fetch_all(query, values)

    async def fetch_val(self, query, values: dict | None = None):
        if (writer := _loop_writer.get()) is not None:
            rows = writer.fetch(query, values, one=True)
            return rows[0][0] if rows else None
        if self._reader is not None and not _in_transaction.get():
            rows = await self._reader.fetch(query, values, one=True)
            return rows[0][0] if rows else None
        if (prepared := self._prepared(query, values)) is not None:
            rows = await self._mysql_text(prepared, "one")
            return rows[0][0] if rows else None
        return await self._db.fetch_val(query, values)

    async def execute(self, query, values: dict | None = None):
        """Runs a statement; returns the new row id for inserts."""
        if (writer := _loop_writer.get()) is not None:
            return writer.execute(query, values)
        if (prepared := self._prepared(query, values)) is not None:
            return await self._mysql_text(prepared, "execute")
        return await self._db.execute(query, values)

    async def affected_rows(self) -> int:
        """Rows changed by the previous statement on this task's connection."""
        if (writer := _loop_writer.get()) is not None:
            return writer.changes()
        if self.dialect_name == "sqlite":
            return int(await self._db.fetch_val("SELECT changes()"))
        return int(await self.fetch_val("SELECT ROW_COUNT()"))  # this task's connection

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """One transaction, run once (writes use :meth:`run_transaction`, which re-runs it on a
        lock conflict).  Writes always run in a transaction so that the conditional updates and
        their affected-row checks see the same state and roll back together.  On SQLite it
        runs on the loop's write connection when the write lock is free (decided before the
        body runs, so the body runs once either way), else through ``databases``."""
        marked = _in_transaction.set(True)
        try:
            if self._write_lock is None:
                async with self._db.transaction():
                    yield
                return
            async with self._write_lock:
                writer = self._writer
                if writer is not None and writer.begin():
                    on_loop = _loop_writer.set(writer)
                    try:
                        yield
                    except BaseException:
                        writer.rollback()
                        raise
                    finally:
                        _loop_writer.reset(on_loop)
                    writer.commit()
                    return
                # the write lock is another connection's: wait for it on a worker thread
                async with self._db.transaction():
                    yield
        finally:
            _in_transaction.reset(marked)

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
