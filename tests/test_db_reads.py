"""Reads outside a transaction: on SQLite they use a long-lived read-only connection
(db/database.py ``_SQLiteReader``) with statements compiled once per shape.  What must hold: a
read sees every write committed before it, a transaction's reads see its own writes, the rows
are the very values ``databases`` returns, and a busy database never blocks the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sqlite3
import threading
import time

import databases
import pytest
import sqlalchemy as sa
from app_helpers import make_product, make_user, start_session

from watchbuy.db import queries
from watchbuy.db.database import Database, normalise_url
from watchbuy.db.migrations import upgrade
from watchbuy.db.schema import products, users
from watchbuy.site import security

pytest_plugins = ["site_fixtures"]


@pytest.fixture
async def db(db_url):
    database = Database(db_url)
    await database.connect()
    await upgrade(database)
    yield database
    await database.disconnect()


async def stock_of(db, product_id: int) -> int:
    return int(await db.fetch_val(sa.select(products.c.stock).where(products.c.id == product_id)))


async def test_a_read_sees_every_write_committed_before_it(db) -> None:
    host = await make_user(db, "Host", host=True)
    mug = await make_product(db, host, stock=1000)

    async def writer_then_reader(n: int) -> None:
        for _ in range(10):
            async def take() -> None:
                await db.execute(products.update().where(products.c.id == mug["id"])
                                 .values(stock=products.c.stock - 1))
            await db.run_transaction(take)
            # this task's own write, committed: every later read shows it
            seen = await stock_of(db, mug["id"])
            assert seen <= 1000 - 1

    await asyncio.gather(*(writer_then_reader(n) for n in range(8)))
    assert await stock_of(db, mug["id"]) == 1000 - 80
    for value in (7, 3, 11):
        await queries.update_product(db, host["id"], mug["id"], stock_delta=value - await
                                     stock_of(db, mug["id"]))
        assert await stock_of(db, mug["id"]) == value
        assert (await queries.product(db, mug["id"]))["stock"] == value


async def test_a_transaction_reads_its_own_writes_and_others_do_not(db) -> None:
    host = await make_user(db, "Host", host=True)
    mug = await make_product(db, host, stock=10)
    inside = asyncio.Event()
    release = asyncio.Event()

    async def work() -> int:
        await db.execute(products.update().where(products.c.id == mug["id"]).values(stock=4))
        seen = await stock_of(db, mug["id"])
        inside.set()
        await asyncio.wait_for(release.wait(), 10)
        return seen

    task = asyncio.ensure_future(db.run_transaction(work))
    await asyncio.wait_for(inside.wait(), 10)
    assert await stock_of(db, mug["id"]) == 10  # not committed yet
    release.set()
    assert await task == 4
    assert await stock_of(db, mug["id"]) == 4


async def test_reads_return_what_databases_returns(db) -> None:
    # Reads compile once per statement shape (SQLite: on the read connection; MariaDB: in the
    # connections databases makes), reusing databases' compiler and records: the same values
    # and types as plain databases, for statements of one shape with different values, text
    # statements, IN lists of different lengths and .params() values (never cached).
    plain = databases.Database(normalise_url(db.url))
    await plain.connect()
    try:
        host = await make_user(db, "Host", host=True)
        other = await make_user(db, "Other host", host=True)
        ids = [(await make_product(db, h, name=f"P{i}", price_minor=100 + i, stock=i))["id"]
               for i, h in enumerate([host, host, other, other, host])]
        session = await start_session(db, host)
        statements = [
            users.select().where(users.c.id == host["id"]),
            users.select().where(users.c.id == other["id"]),
            products.select().where(products.c.id.in_(ids[:2])),
            products.select().where(products.c.id.in_(ids)),
            products.select().where(products.c.host_id == other["id"],
                                    products.c.deleted == sa.false()).order_by(products.c.id),
            sa.select(sa.func.count()).select_from(products),
            # values given with .params(): not in the cache key, so compiled every time
            products.select().where(products.c.id == sa.bindparam("id")).params(id=ids[1]),
            products.select().where(products.c.id == sa.bindparam("id")).params(id=ids[2]),
        ]
        for statement in statements:
            mine = await db.fetch_all(statement)
            theirs = await plain.fetch_all(statement)
            assert mine
            assert [dict(r._mapping) for r in mine] == [dict(r._mapping) for r in theirs]
            assert [[type(v) for v in r._mapping.values()] for r in mine] == \
                [[type(v) for v in r._mapping.values()] for r in theirs]
        text = "SELECT name FROM products WHERE host_id = :host ORDER BY id"
        assert [r[0] for r in await db.fetch_all(text, {"host": other["id"]})] == ["P2", "P3"]
        assert await db.fetch_val(text, {"host": host["id"]}) == "P0"
        # text statements (the site's hot queries, compiled once: queries.compiled) run on the
        # driver without databases' per-call text compile: the same rows and types, outside a
        # transaction and inside one (MariaDB: on the transaction's connection)
        texts = [
            (queries.compiled(db, "session_user", queries._session_user_query),
             {"session_id": security.session_hash(session), "now": time.time()}),
            (text, {"host": other["id"]}),
            ("SELECT id, price_minor, name FROM products WHERE stock >= :least ORDER BY id",
             {"least": 2}),
        ]
        for sql, values in texts:
            theirs = [dict(r._mapping) for r in await plain.fetch_all(sql, values)]
            assert theirs
            outside = await db.fetch_all(sql, values)
            async with db.transaction():
                inside = await db.fetch_all(sql, values)
            for mine in (outside, inside):
                assert [dict(r._mapping) for r in mine] == theirs
                assert [[type(v) for v in r._mapping.values()] for r in mine] == \
                    [[type(v) for v in row.values()] for row in theirs]
        assert len(db._reader._texts._kept if db._reader else db._texts._kept) >= 3
        found = await queries.session_user(db, security.session_hash(session))
        assert found is not None and found[1]["is_host"] is True
        assert await queries.session_user(db, "no such session") is None
        rooms = await queries.list_rooms(db)
        assert {r["slug"] for r in rooms} == {host["channel"]["slug"], other["channel"]["slug"]}
        assert all(not r["is_live"] for r in rooms)
        # the shapes above were kept (not merely compiled every time)
        kept = db._reader._compiled if db._reader else db._db._backend.connection().cache
        assert len(kept) >= 4
    finally:
        await plain.disconnect()


async def test_a_busy_database_is_waited_for_off_the_event_loop(tmp_path) -> None:
    # Another process holds SQLite's exclusive lock (locking_mode=EXCLUSIVE after a write):
    # the loop's read connection, which never waits, gets "busy"; the read is run again on the
    # worker thread, which waits until the lock goes, while the loop keeps running.
    path = tmp_path / "busy.db"
    setup = Database(f"sqlite:///{path}")
    await setup.connect()
    await upgrade(setup)
    host = await make_user(setup, "Host", host=True)
    mug = await make_product(setup, host, stock=10)
    await setup.disconnect()
    db = Database(f"sqlite:///{path}")
    await db.connect()
    try:
        # no connection of ours is open now: the other one can take the exclusive lock
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("PRAGMA locking_mode=EXCLUSIVE")
        other.execute("BEGIN EXCLUSIVE")
        other.execute("UPDATE products SET stock = 3 WHERE id = ?", (mug["id"],))
        other.execute("COMMIT")  # committed, and the exclusive lock is kept

        def let_go() -> None:
            time.sleep(0.5)
            other.execute("PRAGMA locking_mode=NORMAL")
            other.execute("SELECT 1 FROM products").fetchall()  # releases the lock
            other.close()

        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.ensure_future(ticker())
        releaser = threading.Thread(target=let_go)
        releaser.start()
        try:
            assert await asyncio.wait_for(stock_of(db, mug["id"]), 10) == 3
        finally:
            ticking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticking
            releaser.join(10)
        assert db._reader.waited >= 1
        assert ticks >= 10  # the loop ran while the read waited
    finally:
        await db.disconnect()


async def test_the_read_connection_refuses_writes(tmp_path) -> None:
    db = Database(f"sqlite:///{tmp_path}/ro.db")
    await db.connect()
    try:
        await upgrade(db)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            await db.fetch_all("DELETE FROM products RETURNING id")
    finally:
        await db.disconnect()


def test_a_connection_left_open_is_closed_before_the_loop_is(tmp_path) -> None:
    # A task cut off while it held one of databases' SQLite connections never closes it;
    # without disconnect() closing it, aiosqlite stops its thread when the connection is
    # garbage-collected after the loop closed, and that thread fails ("Event loop is closed").
    failures: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: failures.append(args.exc_value)
    try:
        async def main() -> None:
            db = Database(f"sqlite:///{tmp_path}/left.db")
            await db.connect()
            await upgrade(db)
            left = db._db.connection()
            await left.__aenter__()  # acquired, then its task is gone: never released
            await left.execute("SELECT 1")
            await db.disconnect()

        asyncio.run(main())
        gc.collect()
        deadline = time.monotonic() + 5  # aiosqlite's worker threads finish their last job
        while time.monotonic() < deadline and any(
                "_connection_worker_thread" in t.name for t in threading.enumerate()):
            time.sleep(0.05)
    finally:
        threading.excepthook = previous
    assert not failures, failures


async def test_writes_compile_once_per_shape(db) -> None:
    # A transaction's statements (a checkout's inserts and conditional updates) are compiled
    # once per shape in the connections databases makes, like the reads: two products changed
    # with different values leave one kept shape, and each run's values are the ones applied.
    host = await make_user(db, "Host", host=True)
    cache = db._db._backend.connection().cache
    made = [(await make_product(db, host, name=name, stock=stock))["id"]
            for name, stock in (("A", 3), ("B", 7))]
    sizes = []
    for product_id, take in zip(made, (1, 5), strict=True):
        async with db.transaction():
            await db.execute(products.update().where(products.c.id == product_id,
                                                     products.c.stock >= take)
                             .values(stock=products.c.stock - take))
            assert await db.affected_rows() == 1
        sizes.append(len(cache))
    assert sizes[0] == sizes[1]  # the second run compiled nothing new
    assert [await stock_of(db, product_id) for product_id in made] == [2, 2]
