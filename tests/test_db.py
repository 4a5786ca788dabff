"""The data layer on SQLite and a real MariaDB: migrations, ``watchbuy db upgrade``, and the
guarantees the site builds on (conditional stock updates, exactly-once state changes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import subprocess
import sys

import pymysql.err
import pytest
import sqlalchemy as sa
from app_helpers import make_product, make_user
from server_helpers import MYSQL_URL, mysql_connect, mysql_problem, mysql_url, require_server

from watchbuy.db import migrations, queries, schema
from watchbuy.db.database import Database, is_duplicate_key
from watchbuy.db.migrations import MIGRATIONS, column_names, upgrade
from watchbuy.db.schema import cart_items, chat_mutes, metadata, orders, products, sessions
from watchbuy.site import security

pytest_plugins = ["site_fixtures"]

TABLES = {table.name for table in metadata.sorted_tables} | {"schema_version"}


def watchbuy(tmp_path, *args: str, database_url: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHBUY_")}
    env.update(WATCHBUY_DATABASE_URL=database_url, WATCHBUY_DATA_DIR=str(tmp_path / "data"))
    return subprocess.run([sys.executable, "-m", "watchbuy", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def assert_upgrades_once(tmp_path, url: str) -> None:
    first = watchbuy(tmp_path, "db", "upgrade", database_url=url)
    assert first.returncode == 0, first.stderr
    every = ", ".join(str(m.version) for m in MIGRATIONS)
    assert first.stdout.strip() == f"database is up to date (applied: {every})"
    again = watchbuy(tmp_path, "db", "upgrade", database_url=url)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "database is up to date (applied: nothing)"


def test_db_upgrade_on_a_fresh_sqlite_file(tmp_path) -> None:
    path = tmp_path / "fresh" / "watchbuy.db"
    assert_upgrades_once(tmp_path, f"sqlite:///{path}")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master "
                                                "WHERE type = 'table'")}
        versions = conn.execute("SELECT version FROM schema_version").fetchall()
    assert TABLES <= names and versions == [(m.version,) for m in MIGRATIONS]


def test_db_upgrade_on_a_fresh_mariadb(tmp_path, fresh_mariadb_url) -> None:
    assert_upgrades_once(tmp_path, fresh_mariadb_url)
    name = fresh_mariadb_url.rsplit("/", 1)[1]
    with contextlib.closing(mysql_connect(name)) as conn, conn.cursor() as cursor:
        cursor.execute("SHOW TABLES")
        names = {row[0] for row in cursor.fetchall()}
        cursor.execute("SELECT version FROM schema_version")
        versions = cursor.fetchall()
        cursor.execute("SELECT ENGINE FROM information_schema.TABLES "
                       "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'products'", (name,))
        engine = cursor.fetchone()[0]
    assert TABLES <= names and engine == "InnoDB"
    assert versions == tuple((m.version,) for m in MIGRATIONS)


def test_db_upgrade_with_a_bad_url_says_so_in_one_line(tmp_path) -> None:
    result = watchbuy(tmp_path, "db", "upgrade", database_url="postgres://someone@db.example/shop")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "watchbuy: configuration error: WATCHBUY_DATABASE_URL: use " \
        "sqlite:///path or mysql+aiomysql://user:pass@host/db\n"


def run_cli_here(monkeypatch, tmp_path, url: str, *args: str) -> int:
    """``watchbuy <args>`` in this process (a subprocess costs ~1.5 s of imports)."""
    from watchbuy.cli import main

    for name in list(os.environ):
        if name.startswith("WATCHBUY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WATCHBUY_DATABASE_URL", url)
    monkeypatch.setenv("WATCHBUY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return main(list(args))


@pytest.mark.parametrize("url", [
    "mysql+aiomysql://root:hunter2@127.0.0.1:1/watchbuy",  # nothing listens on port 1
    "mysql+aiomysql://root:hunter2@127.0.0.1:port/watchbuy",
    "sqlite:////proc/no/such/folder/watchbuy.db",
])
def test_db_upgrade_reports_unusable_databases_in_one_line(monkeypatch, tmp_path, capsys,
                                                           url) -> None:
    assert run_cli_here(monkeypatch, tmp_path, url, "db", "upgrade") == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("watchbuy: "), err
    assert "hunter2" not in err


def test_db_upgrade_of_a_missing_mariadb_database_says_so(monkeypatch, tmp_path,
                                                          capsys) -> None:
    require_server(mysql_problem(), f"MariaDB at {MYSQL_URL}")
    url = mysql_url("wb_test_this_database_does_not_exist")
    assert run_cli_here(monkeypatch, tmp_path, url, "db", "upgrade") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Unknown database" in err


# -- the data layer on both databases -----------------------------------------------------------


@pytest.fixture
async def db(db_url):
    database = Database(db_url)
    await database.connect()
    # MariaDB's session database is reused
    assert await upgrade(database) in ([m.version for m in MIGRATIONS], [])
    assert await upgrade(database) == []
    yield database
    await database.disconnect()


async def stock_of(db, product_id: int) -> int:
    return int(await db.fetch_val(sa.select(products.c.stock).where(products.c.id == product_id)))


async def test_migrations_are_recorded(db) -> None:
    versions = await db.fetch_all("SELECT version, description FROM schema_version")
    assert [(row[0], row[1]) for row in versions] == \
        [(m.version, m.description) for m in MIGRATIONS]


async def test_checkout_is_all_or_nothing(db) -> None:
    host = await make_user(db, "Host", host=True)
    plenty = await make_product(db, host, name="Plenty", stock=5)
    scarce = await make_product(db, host, name="Scarce", stock=2)
    shopper = await make_user(db, "Sue")
    await queries.set_cart_quantity(db, shopper["id"], plenty["id"], 1)
    await queries.set_cart_quantity(db, shopper["id"], scarce["id"], 3)
    with pytest.raises(queries.OutOfStock, match="not enough Scarce in stock"):
        await queries.create_order_from_cart(db, shopper["id"], "test")
    # the reservation made before the failing line was rolled back
    assert await stock_of(db, plenty["id"]) == 5 and await stock_of(db, scarce["id"]) == 2
    assert len(await queries.cart(db, shopper["id"])) == 2
    assert await queries.user_orders(db, shopper["id"]) == []

    await queries.set_cart_quantity(db, shopper["id"], scarce["id"], 2)
    order = await queries.create_order_from_cart(db, shopper["id"], "test")
    assert order["total_minor"] == 3 * 1800 and order["status"] == "pending"
    assert await stock_of(db, plenty["id"]) == 4 and await stock_of(db, scarce["id"]) == 0
    assert await queries.cart(db, shopper["id"]) == []
    with pytest.raises(ValueError, match="your cart is empty"):
        await queries.create_order_from_cart(db, shopper["id"], "test")

    euro = await make_product(db, host, name="Euro", stock=5, currency="eur")
    await queries.set_cart_quantity(db, shopper["id"], plenty["id"], 1)
    await queries.set_cart_quantity(db, shopper["id"], euro["id"], 1)
    with pytest.raises(ValueError, match="different currencies"):
        await queries.create_order_from_cart(db, shopper["id"], "test")
    assert await stock_of(db, plenty["id"]) == 4


async def test_stock_can_never_go_negative(db) -> None:
    host = await make_user(db, "Host", host=True)
    product = await make_product(db, host, stock=1)
    with pytest.raises(Exception):  # noqa: B017 - the driver's own integrity error
        async with db.transaction():
            await db.execute(products.update().where(products.c.id == product["id"])
                             .values(stock=-1))
    assert await stock_of(db, product["id"]) == 1


async def test_paid_and_released_exactly_once_even_at_once(db) -> None:
    host = await make_user(db, "Host", host=True)
    product = await make_product(db, host, stock=10)
    shopper = await make_user(db, "Sue")
    await queries.set_cart_quantity(db, shopper["id"], product["id"], 4)
    paid_order = await queries.create_order_from_cart(db, shopper["id"], "stripe")
    await queries.set_cart_quantity(db, shopper["id"], product["id"], 3)
    released_order = await queries.create_order_from_cart(db, shopper["id"], "stripe")
    assert await stock_of(db, product["id"]) == 3

    results = await asyncio.gather(*(queries.mark_paid(db, paid_order["id"]) for _ in range(10)))
    assert sorted(results) == [False] * 9 + [True]
    assert await queries.release_order(db, paid_order["id"], "expired") is False

    results = await asyncio.gather(
        *(queries.release_order(db, released_order["id"], "expired") for _ in range(10)))
    assert sorted(results) == [False] * 9 + [True]
    assert await stock_of(db, product["id"]) == 6  # the 3 came back once
    assert await queries.mark_paid(db, released_order["id"]) is False
    statuses = {row[0]: row[1] for row in await db.fetch_all(sa.select(orders.c.id,
                                                                       orders.c.status))}
    assert statuses == {paid_order["id"]: "paid", released_order["id"]: "expired"}


async def test_webhook_events_are_recorded_once(db) -> None:
    assert await queries.record_webhook_event(db, "evt_1", "checkout.session.completed")
    assert not await queries.record_webhook_event(db, "evt_1", "checkout.session.completed")
    results = await asyncio.gather(
        *(queries.record_webhook_event(db, "evt_2", "checkout.session.expired")
          for _ in range(5)))
    assert sorted(results) == [False] * 4 + [True]


async def test_sessions_expire_and_revoke(db) -> None:
    user = await make_user(db, "Sue")
    live = await security.start_session(db, user["id"], 1)
    assert (await queries.session_user(db, security.session_hash(live)))[1]["id"] == user["id"]
    expired = await security.start_session(db, user["id"], -1)
    assert await queries.session_user(db, security.session_hash(expired)) is None
    await queries.revoke_session(db, security.session_hash(live))
    assert await queries.session_user(db, security.session_hash(live)) is None
    stored = {row[0] for row in await db.fetch_all(sa.select(sessions.c.id))}
    assert live not in stored and security.session_hash(live) in stored


async def test_deleting_a_product_keeps_orders_and_clears_carts_and_pins(db) -> None:
    host = await make_user(db, "Host", host=True)
    other = await make_user(db, "Other host", host=True)
    product = await make_product(db, host, name="Mug", stock=5)
    shopper = await make_user(db, "Sue")
    await queries.set_cart_quantity(db, shopper["id"], product["id"], 1)
    order = await queries.create_order_from_cart(db, shopper["id"], "test")
    await queries.set_cart_quantity(db, shopper["id"], product["id"], 2)
    await queries.set_pinned(db, host["channel"]["id"], product["id"])
    assert not await queries.delete_product(db, other["id"], product["id"])  # not theirs
    assert await queries.product(db, product["id"]) is not None
    assert await queries.delete_product(db, host["id"], product["id"])
    assert await queries.product(db, product["id"]) is None
    assert await queries.cart(db, shopper["id"]) == []
    assert (await queries.channel_by_host(db, host["id"]))["pinned_product_id"] is None
    assert [i["name"] for i in (await queries.order(db, order["id"]))["items"]] == ["Mug"]
    assert [line["order_id"] for line in await queries.host_sales(db, host["id"])] == \
        [order["id"]]
    assert await queries.host_sales(db, other["id"]) == []
    assert not await queries.update_product(db, host["id"], product["id"], stock=9)


async def test_rooms_list_live_first(db) -> None:
    quiet = await make_user(db, "Quiet", host=True)
    recent = await make_user(db, "Recent", host=True)
    live = await make_user(db, "Live", host=True)
    await queries.set_live(db, recent["channel"]["id"], True, "node-a")
    await queries.set_live(db, recent["channel"]["id"], False, None)
    await queries.set_live(db, live["channel"]["id"], True, "node-b")
    rooms = await queries.list_rooms(db)
    assert [r["host_id"] for r in rooms] == [live["id"], recent["id"], quiet["id"]]
    assert rooms[0]["live_node_id"] == "node-b" and rooms[1]["live_node_id"] is None
    assert await queries.channel_by_key(db, live["channel"]["stream_key"]) is not None
    new_key = await queries.regenerate_stream_key(db, live["id"])
    assert await queries.channel_by_key(db, live["channel"]["stream_key"]) is None
    assert (await queries.channel_by_key(db, new_key))["host_id"] == live["id"]


async def test_times_keep_their_precision(db) -> None:
    # Unix times need a double: MySQL's FLOAT is single precision (~2 minutes at today's epoch)
    first = await make_user(db, "First", host=True)
    second = await make_user(db, "Second", host=True)
    message = await queries.add_chat_message(db, first["channel"]["id"], second["id"], "Second",
                                             "hello")
    [stored] = await queries.recent_chat(db, first["channel"]["id"])
    assert abs(stored["created_at"] - message["created_at"]) < 0.001
    # the room that was live most recently comes first, even a moment later
    await queries.set_live(db, second["channel"]["id"], True, "n")
    await queries.set_live(db, second["channel"]["id"], False, None)
    await asyncio.sleep(0.01)
    await queries.set_live(db, first["channel"]["id"], True, "n")
    await queries.set_live(db, first["channel"]["id"], False, None)
    assert [r["host_id"] for r in await queries.list_rooms(db)] == [first["id"], second["id"]]
    live = await security.start_session(db, second["id"], 30 / 86400)  # 30 seconds
    assert await queries.session_user(db, security.session_hash(live)) is not None


async def test_foreign_keys_hold_on_every_connection(db) -> None:
    # SQLite checks foreign keys only where PRAGMA foreign_keys is on, per connection, and the
    # driver opens a connection per statement: every one of them must have it
    user = await make_user(db, "Sue")
    with pytest.raises(Exception):  # noqa: B017 - the driver's own integrity error
        await queries.set_cart_quantity(db, user["id"], 999_999, 1)
    assert await queries.cart(db, user["id"]) == []


# -- migration 2: 64-bit money, test-mode orders ------------------------------------------------

BIG_PRICE = 2**31 + 12_345  # more minor units than a 32-bit INT holds ($21.5 million)


async def money_column_types(db) -> dict[str, str]:
    if db.dialect_name == "sqlite":
        types = {}
        for table in ("products", "orders", "order_items"):
            for row in await db.fetch_all(f"PRAGMA table_info({table})"):
                types[f"{table}.{row[1]}"] = row[2].upper()
    else:
        rows = await db.fetch_all(
            "SELECT TABLE_NAME, COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = DATABASE()")
        types = {f"{row[0]}.{row[1]}": row[2].upper() for row in rows}
    return {name: types[name] for name in
            ("products.price_minor", "orders.total_minor", "order_items.unit_price_minor")}


async def test_a_price_above_two_to_the_31_round_trips(db) -> None:
    host = await make_user(db, "Host", host=True)
    yacht = await make_product(db, host, name="Yacht", price_minor=BIG_PRICE, stock=3)
    assert (await queries.product(db, yacht["id"]))["price_minor"] == BIG_PRICE
    shopper = await make_user(db, "Rich")
    await queries.set_cart_quantity(db, shopper["id"], yacht["id"], 2)
    order = await queries.create_order_from_cart(db, shopper["id"], "test")
    assert order["total_minor"] == 2 * BIG_PRICE
    assert order["items"][0]["unit_price_minor"] == BIG_PRICE
    assert set((await money_column_types(db)).values()) == {"BIGINT"}


async def test_a_version_1_database_upgrades_to_bigint_money_and_test_orders(db) -> None:
    # Put the database back to version 1's shape: 32-bit money, no test_mode/status_note.
    if db.dialect_name == "mysql":
        for table, column in (("products", "price_minor"), ("orders", "total_minor"),
                              ("order_items", "unit_price_minor")):
            await db.execute(f"ALTER TABLE {table} MODIFY {column} INT NOT NULL")
    await db.execute("ALTER TABLE orders DROP COLUMN test_mode")
    await db.execute("ALTER TABLE orders DROP COLUMN status_note")
    await db.execute("DELETE FROM schema_version WHERE version > 1")
    host = await make_user(db, "Host", host=True)
    product = await make_product(db, host, stock=5)
    shopper = await make_user(db, "Sue")
    made = {}
    for mode in ("test", "stripe"):
        await db.execute(
            "INSERT INTO orders (user_id, status, total_minor, currency, payment_mode, "
            "created_at) VALUES (:user, 'paid', 1800, 'usd', :mode, 0)",
            {"user": shopper["id"], "mode": mode})
        made[mode] = int(await db.fetch_val(
            "SELECT MAX(id) FROM orders WHERE payment_mode = :mode", {"mode": mode}))
    if db.dialect_name == "mysql":
        assert set((await money_column_types(db)).values()) == {"INT"}

    assert await upgrade(db) == [m.version for m in MIGRATIONS if m.version > 1]
    assert set((await money_column_types(db)).values()) == {"BIGINT"}
    test_order = await queries.order(db, made["test"])
    real_order = await queries.order(db, made["stripe"])
    assert bool(test_order["test_mode"]) is True and bool(real_order["test_mode"]) is False
    assert test_order["status_note"] is None
    await queries.update_product(db, host["id"], product["id"], price_minor=BIG_PRICE)
    assert (await queries.product(db, product["id"]))["price_minor"] == BIG_PRICE
    assert await upgrade(db) == []


# -- migration 3: shows, shipping, flash sales, replays ------------------------------------------

NEW_IN_3 = ("addresses", "flash_sales", "shows", "show_products", "follows", "reminders",
            "notifications", "recordings", "pins")


async def test_a_version_2_database_gains_the_tables_and_columns_of_version_3(db) -> None:
    host = await make_user(db, "Host", host=True)
    mug = await make_product(db, host, name="Mug", stock=4)
    # Back to version 2's shape: none of the new tables, none of the new columns.
    for name in reversed([t.name for t in schema.metadata.sorted_tables]):
        if name in NEW_IN_3:
            await db.execute(f"DROP TABLE {name}")
    await db.execute("DROP INDEX ix_order_items_flash_sale_id"
                     + (" ON order_items" if db.dialect_name == "mysql" else ""))
    for table, column in (("users", "announce_purchases"), ("users", "saved_card_last4"),
                          ("products", "physical"), ("products", "sold"),
                          ("orders", "ship_line1"), ("orders", "shipped_at"),
                          ("order_items", "flash_sale_id")):
        await db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    await db.execute("DELETE FROM schema_version WHERE version > 2")

    assert await upgrade(db) == [m.version for m in MIGRATIONS if m.version > 2]
    for name in NEW_IN_3:
        assert await db.fetch_val(f"SELECT COUNT(*) FROM {name}") == 0
    assert {"physical", "sold"} <= await column_names(db, "products")
    # existing rows take the defaults: physical goods, nothing sold yet, purchases announced
    row = await queries.product(db, mug["id"])
    assert bool(row["physical"]) is True and row["sold"] == 0
    assert bool((await queries.user_by_id(db, host["id"]))["announce_purchases"]) is True
    assert {"ship_line1", "shipped_at", "carrier"} <= await column_names(db, "orders")
    assert await upgrade(db) == []


async def test_a_version_3_database_gains_buy_now_request_keys(db) -> None:
    # Migration 4: orders.request_key and its unique index (one order per Buy-now press).
    host = await make_user(db, "Host", host=True)
    shopper = await make_user(db, "Sue")
    await db.execute("DROP INDEX ux_orders_user_request"
                     + (" ON orders" if db.dialect_name == "mysql" else ""))
    await db.execute("ALTER TABLE orders DROP COLUMN request_key")
    await db.execute("DELETE FROM schema_version WHERE version > 3")
    assert host and await upgrade(db) == [4]
    assert "request_key" in await column_names(db, "orders")
    insert = ("INSERT INTO orders (user_id, status, total_minor, currency, payment_mode, "
              "created_at, request_key) VALUES (:user, 'paid', 100, 'usd', 'test', 0, :key)")
    await db.execute(insert, {"user": shopper["id"], "key": "press-0001"})
    await db.execute(insert, {"user": shopper["id"], "key": None})
    await db.execute(insert, {"user": shopper["id"], "key": None})  # no key: no limit
    with pytest.raises(Exception) as refused:
        await db.execute(insert, {"user": shopper["id"], "key": "press-0001"})
    assert is_duplicate_key(refused.value)
    assert await upgrade(db) == []


async def test_two_processes_migrating_a_fresh_database_at_once_both_start(db) -> None:
    # Two site instances of one deploy start together on an empty database: both run every
    # migration's steps; each migration ends recorded once, and neither start fails.
    await migrations.drop_all(db)
    others = [Database(db.url) for _ in range(3)]
    for other in others:
        await other.connect()
    try:
        results = await asyncio.gather(*(upgrade(other) for other in others))
    finally:
        for other in others:
            await other.disconnect()
    every = [m.version for m in MIGRATIONS]
    assert sorted(v for applied in results for v in applied) == every  # each applied once
    versions = await db.fetch_all("SELECT version FROM schema_version ORDER BY version")
    assert [row[0] for row in versions] == every
    assert await upgrade(db) == []


# -- concurrent writers: upserts, and transactions run again after a deadlock -------------------


async def test_many_shoppers_fill_their_carts_at_once(db) -> None:
    # On MariaDB a delete-then-insert cart update deadlocked four shoppers writing at the same
    # moment (gap locks on the cart index): every write must succeed, and the last one counts.
    host = await make_user(db, "Host", host=True)
    goods = [await make_product(db, host, name=f"Thing {i}", stock=1000) for i in range(4)]
    shoppers = [await make_user(db, f"Shopper {i}") for i in range(40)]

    async def shop(shopper: dict) -> None:
        for quantity in (1, 3):  # add, then change: both paths of the upsert
            await asyncio.gather(*(queries.set_cart_quantity(db, shopper["id"], product["id"],
                                                             quantity + index)
                                   for index, product in enumerate(goods)))
        await queries.set_cart_quantity(db, shopper["id"], goods[0]["id"], 0)  # and remove

    await asyncio.gather(*(shop(shopper) for shopper in shoppers))
    for shopper in shoppers:
        lines = await queries.cart(db, shopper["id"])
        assert {line["product_id"]: line["quantity"] for line in lines} == \
            {product["id"]: 3 + index for index, product in enumerate(goods) if index}
    count = await db.fetch_val(sa.select(sa.func.count()).select_from(cart_items))
    assert count == 40 * 3


async def test_muting_twice_keeps_one_mute(db) -> None:
    host = await make_user(db, "Host", host=True)
    troll = await make_user(db, "Troll")
    await asyncio.gather(*(queries.mute(db, host["channel"]["id"], troll["id"])
                           for _ in range(5)))
    assert await queries.is_muted(db, host["channel"]["id"], troll["id"])
    assert await db.fetch_val(sa.select(sa.func.count()).select_from(chat_mutes)) == 1


async def test_user_orders_come_with_their_own_items(db) -> None:
    host = await make_user(db, "Host", host=True)
    mug = await make_product(db, host, name="Mug", stock=9)
    cup = await make_product(db, host, name="Cup", stock=9)
    sue, tom = await make_user(db, "Sue"), await make_user(db, "Tom")
    made = []
    for shopper, picks in ((sue, [mug]), (tom, [cup]), (sue, [mug, cup])):
        for product in picks:
            await queries.set_cart_quantity(db, shopper["id"], product["id"], 2)
        made.append(await queries.create_order_from_cart(db, shopper["id"], "test"))
    listed = await queries.user_orders(db, sue["id"])
    assert [o["id"] for o in listed] == [made[2]["id"], made[0]["id"]]  # newest first
    assert [[i["name"] for i in o["items"]] for o in listed] == [["Mug", "Cup"], ["Mug"]]
    assert listed == [await queries.order(db, made[2]["id"]),
                      await queries.order(db, made[0]["id"])]


def test_duplicate_keys_are_told_from_other_errors() -> None:
    assert is_duplicate_key(pymysql.err.IntegrityError(1062, "Duplicate entry 'evt_1'"))
    assert not is_duplicate_key(pymysql.err.IntegrityError(1452, "foreign key fails"))
    assert not is_duplicate_key(RuntimeError("Duplicate entry"))
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY, ref INTEGER CHECK (ref > 0))")
        conn.execute("INSERT INTO t VALUES ('a', 1)")
        with pytest.raises(sqlite3.IntegrityError) as duplicate:
            conn.execute("INSERT INTO t VALUES ('a', 1)")
        with pytest.raises(sqlite3.IntegrityError) as check:
            conn.execute("INSERT INTO t VALUES ('b', -1)")
    assert is_duplicate_key(duplicate.value) and not is_duplicate_key(check.value)


async def test_a_failing_webhook_insert_is_not_taken_for_a_redelivery(db) -> None:
    # Only the unique key's refusal means "seen before": any other error, even another integrity
    # error (here NOT NULL), reaches the caller, and the event counts as new next time.
    with pytest.raises(Exception) as failed:  # noqa: B017 - the driver's own error
        await queries.record_webhook_event(db, "evt_3", None)
    assert not is_duplicate_key(failed.value)
    assert await queries.record_webhook_event(db, "evt_3", "checkout.session.completed")


async def test_a_deadlock_victim_runs_its_transaction_again(fresh_mariadb_url, caplog) -> None:
    # Two transactions lock two rows in opposite orders: a real deadlock, MariaDB rolls one back
    # (1213), and run_transaction runs that one again, so both end up done.
    db = Database(fresh_mariadb_url)
    await db.connect()
    try:
        await db.execute("CREATE TABLE pair (id INT PRIMARY KEY, n INT NOT NULL) ENGINE=InnoDB")
        await db.execute("INSERT INTO pair VALUES (1, 0), (2, 0)")
        both_hold_one = asyncio.Barrier(2)
        runs = {"forward": 0, "backward": 0}

        def locker(name: str, first: int, second: int):
            async def work() -> str:
                runs[name] += 1
                await db.execute("UPDATE pair SET n = n + 1 WHERE id = :id", {"id": first})
                if runs[name] == 1:  # only the first run waits for the other to hold its row
                    await asyncio.wait_for(both_hold_one.wait(), 10)
                await db.execute("UPDATE pair SET n = n + 1 WHERE id = :id", {"id": second})
                return name
            return work

        with caplog.at_level(logging.WARNING, logger="watchbuy.db"):
            done = await asyncio.gather(db.run_transaction(locker("forward", 1, 2)),
                                        db.run_transaction(locker("backward", 2, 1)))
        assert done == ["forward", "backward"]
        assert db.retries == 1 and sorted(runs.values()) == [1, 2]
        assert [row[0] for row in await db.fetch_all("SELECT n FROM pair ORDER BY id")] == [2, 2]
        assert "lock conflict" in caplog.text and "attempt 2 of 3" in caplog.text
    finally:
        await db.disconnect()


async def test_retries_are_bounded_and_other_errors_are_not_retried(db) -> None:
    runs = 0

    async def always_deadlocked() -> None:
        nonlocal runs
        runs += 1
        raise pymysql.err.OperationalError(1213, "Deadlock found when trying to get lock")

    with pytest.raises(pymysql.err.OperationalError):
        await db.run_transaction(always_deadlocked)
    assert runs == db.transaction_attempts == 3

    runs = 0

    async def broken() -> None:
        nonlocal runs
        runs += 1
        raise pymysql.err.OperationalError(1054, "Unknown column")

    with pytest.raises(pymysql.err.OperationalError):
        await db.run_transaction(broken)
    assert runs == 1
