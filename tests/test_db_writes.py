"""Write transactions on SQLite run on the event loop's own connection (db/database.py
``_SQLiteWriter``) when the write lock is free, and through ``databases`` on a worker thread
when another connection holds it.  What must hold: a transaction on the loop runs in one turn
of it (no trip to a thread per statement), sees its own writes, keeps nothing when it fails
(in its body, when cancelled, or at COMMIT), leaves the connection ready for the next one, and a
write lock held elsewhere is waited for off the loop with every write still exact."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

import pytest
import sqlalchemy as sa
from app_helpers import make_product, make_user

from watchbuy.db.database import Database
from watchbuy.db.migrations import upgrade
from watchbuy.db.schema import cart_items, products

pytest_plugins = ["site_fixtures"]


@pytest.fixture
async def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path}/writes.db")
    await database.connect()
    await upgrade(database)
    yield database
    await database.disconnect()


class LoopTurns:
    """Counts turns of the event loop (a callback that schedules itself again)."""

    def __init__(self) -> None:
        self.turns = 0
        self._handle: asyncio.Handle | None = None

    def _tick(self) -> None:
        self.turns += 1
        self._handle = asyncio.get_running_loop().call_soon(self._tick)

    def __enter__(self) -> LoopTurns:
        self._handle = asyncio.get_running_loop().call_soon(self._tick)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.cancel()


async def stock_of(db, product_id: int) -> int:
    return int(await db.fetch_val(sa.select(products.c.stock).where(products.c.id == product_id)))


async def cart_rows(db) -> int:
    return int(await db.fetch_val(sa.select(sa.func.count()).select_from(cart_items)))


async def test_a_transaction_runs_whole_in_one_turn_of_the_loop(db) -> None:
    host = await make_user(db, "Host", host=True)
    shopper = await make_user(db, "Sue")
    mug = await make_product(db, host, stock=5)
    seen = {}

    async def work() -> int:
        seen["turns_at_start"] = turns.turns
        await db.execute(products.update().where(products.c.id == mug["id"],
                                                 products.c.stock >= 1)
                         .values(stock=products.c.stock - 1))
        seen["changed"] = await db.affected_rows()
        row_id = await db.execute(cart_items.insert().values(
            user_id=shopper["id"], product_id=mug["id"], quantity=1, added_at=0.0))
        # the transaction's reads see its own writes
        seen["stock_inside"] = await db.fetch_val(
            "SELECT stock FROM products WHERE id = :id", {"id": mug["id"]})
        seen["row"] = dict((await db.fetch_one(
            sa.select(cart_items.c.id, cart_items.c.quantity)
            .where(cart_items.c.id == row_id)))._mapping)
        seen["turns_at_end"] = turns.turns
        return row_id

    with LoopTurns() as turns:
        row_id = await db.run_transaction(work)
    # no statement waited for a turn of the loop (through a worker thread, each one did)
    assert seen["turns_at_end"] == seen["turns_at_start"]
    assert db._writer.passed == 0
    assert seen["changed"] == 1 and seen["stock_inside"] == 4
    assert seen["row"] == {"id": row_id, "quantity": 1}
    # committed: the read connection (outside any transaction) sees it
    assert await stock_of(db, mug["id"]) == 4
    assert await cart_rows(db) == 1


async def test_a_failed_or_cancelled_transaction_keeps_nothing(db) -> None:
    host = await make_user(db, "Host", host=True)
    mug = await make_product(db, host, stock=5)

    async def take_one() -> None:
        await db.execute(products.update().where(products.c.id == mug["id"])
                         .values(stock=products.c.stock - 1))

    async def take_then_fail() -> None:
        await take_one()
        raise ValueError("refused after the write")

    with pytest.raises(ValueError, match="refused after the write"):
        await db.run_transaction(take_then_fail)
    assert await stock_of(db, mug["id"]) == 5

    inside, never = asyncio.Event(), asyncio.Event()

    async def take_then_wait() -> None:
        await take_one()
        inside.set()
        await never.wait()  # a transaction that waits on something: cancelled meanwhile

    waiting = asyncio.ensure_future(db.run_transaction(take_then_wait))
    await inside.wait()
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    assert await stock_of(db, mug["id"]) == 5
    # the connection was left ready and the write lock free: the next one commits
    await db.run_transaction(take_one)
    assert await stock_of(db, mug["id"]) == 4
    assert db._writer.passed == 0


async def test_a_commit_that_fails_keeps_nothing(db) -> None:
    # a foreign key checked at COMMIT (deferred) fails the COMMIT itself: everything the
    # transaction wrote goes, and the connection is not left inside it
    host = await make_user(db, "Host", host=True)
    shopper = await make_user(db, "Sue")
    mug = await make_product(db, host, stock=5)

    async def write_then_break_a_key() -> None:
        await db.execute(products.update().where(products.c.id == mug["id"])
                         .values(stock=products.c.stock - 1))
        await db.execute("PRAGMA defer_foreign_keys=ON")
        await db.execute(cart_items.insert().values(
            user_id=shopper["id"], product_id=999_999, quantity=1, added_at=0.0))

    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        await db.run_transaction(write_then_break_a_key)
    assert await stock_of(db, mug["id"]) == 5
    assert await cart_rows(db) == 0

    async def add_to_cart() -> None:
        await db.execute(cart_items.insert().values(
            user_id=shopper["id"], product_id=mug["id"], quantity=1, added_at=0.0))

    await db.run_transaction(add_to_cart)
    assert await cart_rows(db) == 1


async def test_a_write_lock_held_elsewhere_is_waited_for_off_the_loop(db) -> None:
    # Another connection (another process, say) holds the write lock: the loop's connection,
    # which never waits, cannot begin, and the transactions run on worker threads, waiting
    # for the lock, while the loop keeps running.  Half of the buyers come before the lock is
    # taken, half while it is held: every unit is sold exactly once either way.
    host = await make_user(db, "Host", host=True)
    mug = await make_product(db, host, stock=30)
    sold = 0

    async def buy_one() -> None:
        nonlocal sold

        async def work() -> bool:
            await db.execute(products.update().where(products.c.id == mug["id"],
                                                     products.c.stock >= 1)
                             .values(stock=products.c.stock - 1))
            return await db.affected_rows() == 1

        if await db.run_transaction(work):
            sold += 1

    await asyncio.gather(*(buy_one() for _ in range(20)))
    assert db._writer.passed == 0
    other = sqlite3.connect(db.url.split("sqlite:///", 1)[1], isolation_level=None,
                            check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE products SET stock = stock + 5 WHERE id = ?", (mug["id"],))
        buyers = asyncio.ensure_future(asyncio.gather(*(buy_one() for _ in range(20))))
        with LoopTurns() as turns:
            for _ in range(10_000):  # until a buyer has found the lock held (bounded)
                if db._writer.passed:
                    break
                await asyncio.sleep(0)
            assert db._writer.passed >= 1
            before = turns.turns
            for _ in range(20):
                await asyncio.sleep(0)
            assert turns.turns > before and not buyers.done()  # waiting, off the loop
        other.execute("COMMIT")  # 5 more units, and the lock goes
    finally:
        other.close()
    await asyncio.wait_for(buyers, 30)
    assert sold == 35
    assert await stock_of(db, mug["id"]) == 0
