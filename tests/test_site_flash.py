"""Flash sales: the host's start/end, checks, the sale price inside the window only, the
per-shopper limit and the sale quantity under concurrent buyers, the end announced exactly
once by racing site processes, and what the room's websocket hello carries."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import sqlalchemy as sa
from server_helpers import mysql_connect
from shop_helpers import buy, events_for, next_events
from ws_helpers import ws_receive

from watchbuy.db import queries, shopping
from watchbuy.db.schema import flash_sales, order_items, orders
from watchbuy.site import flash, payments
from watchbuy.site.chat import room_topic

pytest_plugins = ["site_fixtures"]


async def flash_row(db, sale_id: int) -> dict:
    return dict((await db.fetch_one(flash_sales.select().where(flash_sales.c.id == sale_id)))
                ._mapping)


async def start(browser, product_id: int, **fields):
    data = {"product_id": str(product_id), "duration_seconds": "60", **fields}
    return await browser.fetch("/studio/flash", data)


async def shoppers_with_cards(site, count: int, prefix: str = "Shopper") -> list:
    browsers = []
    for i in range(count):
        user = await site.user(f"{prefix} {i}")
        await shopping.save_card(site.db, user["id"], "visa", "4242")
        browser = await site.browser(user)
        browsers.append(browser)
    await asyncio.gather(*(b.get("/") for b in browsers))
    return browsers


BAD_SALES = [  # (fields, status, the field at fault, its message)
    ({"sale_price": "20.00"}, 400, "sale_price",
     "The sale price must be more than zero and less than the regular $18.00."),
    ({"sale_price": "abc"}, 400, "sale_price", "The price must be a positive number, like 12.50."),
    ({"duration_seconds": "5", "sale_price": "9"}, 400, "duration_seconds",
     "Duration (seconds) must be between 10 and 3,600."),
    ({"quantity": "51"}, 400, "quantity", "Sale quantity must be between 1 and 50."),
    ({"quantity": "5", "per_shopper_limit": "0"}, 400, "per_shopper_limit",
     "Limit per shopper must be between 1 and 99."),
    ({}, 400, "sale_price", "Give a sale price, a sale quantity, or both."),
]


async def test_the_host_starts_and_ends_a_sale_with_checked_fields(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=50)
    other = await site.user("Other", host=True)
    theirs = await site.product(other, name="Theirs")
    hosts = await site.browser(host)
    await hosts.get("/studio")
    for fields, status, field, message in BAD_SALES:
        response = await start(hosts, mug["id"], **fields)
        assert response.status_code == status, fields
        assert (response.json()["field"], response.json()["error"]) == (field, message), fields
    # the studio's form shows the message beside the form and keeps what was typed
    page = await hosts.post("/studio/flash", {"product_id": str(mug["id"]),
                                              "sale_price": "20.00", "duration_seconds": "60"})
    assert page.status_code == 400
    assert '<p class="field-error" data-field="sale_price">The sale price must be more than ' \
        'zero and less than the regular $18.00.</p>' in page.text
    assert 'name="sale_price" value="20.00"' in page.text
    assert (await start(hosts, theirs["id"], sale_price="1")).status_code == 404
    shopper = await site.browser(await site.user("Ann"))
    await shopper.get("/")
    assert (await start(shopper, mug["id"], sale_price="1")).status_code == 403
    assert await site.db.fetch_val(sa.select(sa.func.count()).select_from(flash_sales)) == 0

    subscription = site.app.state.broker.subscribe(room_topic(host["channel"]["id"]))
    await subscription.ready()
    try:
        before = time.time()
        response = await start(hosts, mug["id"], sale_price="9.50", quantity="10",
                               per_shopper_limit="2", duration_seconds="120")
        assert response.status_code == 200, response.text
        sale = response.json()["sale"]
        assert sale == {"id": sale["id"], "product_id": mug["id"], "sale_price": "$9.50",
                        "sale_price_minor": 950, "currency": "usd", "quantity": 10,
                        "remaining": 10, "per_shopper_limit": 2,
                        "starts_at": sale["starts_at"], "ends_at": sale["starts_at"] + 120}
        assert before <= sale["starts_at"] <= time.time()
        event = (await next_events(subscription, {"sale"}))["sale"]
        assert event["sale"] == sale and abs(event["server_time"] - time.time()) < 5
        # one running sale per product
        again = await start(hosts, mug["id"], sale_price="8")
        assert again.status_code == 409 and again.json()["field"] == "product_id"
        # the room's card shows the sale price while it runs
        card = (await shopper.get(f"/api/rooms/{host['channel']['slug']}")).json()
        assert card["products"][0]["price"] == "$9.50"
        assert card["products"][0]["regular_price"] == "$18.00"
        assert card["sales"] == [sale]
        studio = await hosts.get("/studio")
        assert f'action="/studio/flash/{sale["id"]}/end"' in studio.text
        # another host cannot end it; the host can, once
        others = await site.browser(other)
        await others.get("/studio")
        assert (await others.fetch(f"/studio/flash/{sale['id']}/end", {})).status_code == 404
        response = await hosts.fetch(f"/studio/flash/{sale['id']}/end", {})
        assert response.json() == {"ended": True}
        assert (await hosts.fetch(f"/studio/flash/{sale['id']}/end", {})).json() == \
            {"ended": False}
        ended = (await next_events(subscription, {"sale_ended"}))["sale_ended"]
        assert ended == {"type": "sale_ended", "sale_id": sale["id"], "product_id": mug["id"],
                         "reason": "host"}
        card = (await shopper.get(f"/api/rooms/{host['channel']['slug']}")).json()
        assert card["products"][0]["price"] == "$18.00" and card["sales"] == []
        # after the end, the regular price
        response = await buy(shopper, mug["id"], card="4242424242424242", expiry="12/99",
                             cvc="123")
        assert response.json()["order"]["total"] == "$18.00"
        assert response.json()["order"]["items"][0]["flash_sale_id"] is None
    finally:
        await subscription.close()


async def test_sale_price_inside_the_window_only_and_the_end_on_time(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=50)
    ann, bob = await shoppers_with_cards(site, 2)
    subscription = site.app.state.broker.subscribe(room_topic(host["channel"]["id"]))
    await subscription.ready()
    try:
        sale_id = await shopping.start_sale(site.db, host["id"], host["channel"]["id"],
                                            mug["id"], 900, None, None, 1.5)
        inside = (await buy(ann, mug["id"])).json()["order"]
        assert inside["total"] == "$9.00" and inside["items"][0]["flash_sale_id"] == sale_id
        # the lifespan's ender ends it on time, without anyone asking
        ended = (await next_events(subscription, {"sale_ended"}, timeout=5))["sale_ended"]
        assert ended["reason"] == "time" and ended["sale_id"] == sale_id
        row = await flash_row(site.db, sale_id)
        assert row["end_reason"] == "time" and row["ended_at"] >= row["ends_at"]
        assert row["ended_at"] - row["ends_at"] < site.settings.flash_sale_check_interval + 1
        after = (await buy(bob, mug["id"])).json()["order"]
        assert after["total"] == "$18.00" and after["items"][0]["flash_sale_id"] is None
    finally:
        await subscription.close()


async def test_the_sale_quantity_holds_under_concurrent_buyers(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=40)
    browsers = await shoppers_with_cards(site, 16)
    subscription = site.app.state.broker.subscribe(room_topic(host["channel"]["id"]))
    await subscription.ready()
    try:
        sale_id = await shopping.start_sale(site.db, host["id"], host["channel"]["id"],
                                            mug["id"], 500, 5, None, 600)
        # every sheet showed $5.00: five are charged that, eleven are asked to confirm $18.00
        # and charged nothing
        responses = await asyncio.gather(*(buy(b, mug["id"], expected_price_minor=500)
                                           for b in browsers))
        assert sorted(r.status_code for r in responses) == [200] * 5 + [409] * 11
        assert [r.json()["order"]["total"] for r in responses
                if r.status_code == 200] == ["$5.00"] * 5
        assert [r.json() for r in responses if r.status_code == 409] == [{
            "error": "The price of Mug is now $18.00: confirm to buy at this price.",
            "field": "price", "price": "$18.00", "price_minor": 1800}] * 11
        orders_made = await site.db.fetch_val(sa.select(sa.func.count()).select_from(orders))
        assert orders_made == 5
        # the second tap, at the price confirmed, buys
        again = await buy(browsers[0], mug["id"], expected_price_minor=1800)
        assert again.status_code == 200 and again.json()["order"]["total"] == "$18.00"
        row = await flash_row(site.db, sale_id)
        assert row["sold"] == 5 and row["end_reason"] == "sold_out"
        events = await events_for(subscription, 1.0)
        # units left at the sale price go to the room as they sell (a buyer who reads the
        # sale after the last unit went ends it instead): never 0, never more than 4
        remaining = [e["sale"]["remaining"] for e in events if e["type"] == "sale"]
        assert set(remaining) <= {1, 2, 3, 4}, remaining
        assert [e for e in events if e["type"] == "sale_ended"] == [
            {"type": "sale_ended", "sale_id": sale_id, "product_id": mug["id"],
             "reason": "sold_out"}]
        sale_units = await site.db.fetch_val(
            sa.select(sa.func.sum(order_items.c.quantity))
            .where(order_items.c.flash_sale_id == sale_id))
        assert sale_units == 5
    finally:
        await subscription.close()


async def test_the_room_hears_the_units_left_as_they_sell(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=10)
    (ann,) = await shoppers_with_cards(site, 1)
    sale_id = await shopping.start_sale(site.db, host["id"], host["channel"]["id"], mug["id"],
                                        500, 3, None, 600)
    subscription = site.app.state.broker.subscribe(room_topic(host["channel"]["id"]))
    await subscription.ready()
    try:
        assert (await buy(ann, mug["id"])).json()["order"]["total"] == "$5.00"
        event = (await next_events(subscription, {"sale"}))["sale"]
        assert (event["sale"]["id"], event["sale"]["remaining"]) == (sale_id, 2)
        assert event["coalesce"] == f"sale:{sale_id}"
    finally:
        await subscription.close()


async def test_the_per_shopper_limit_holds_under_concurrency(make_site) -> None:
    # unpaid orders are not the limit here (each tap's order is unpaid for a moment)
    site = await make_site(max_pending_orders=10)
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=60)
    browsers = await shoppers_with_cards(site, 4)
    sale_id = await shopping.start_sale(site.db, host["id"], host["channel"]["id"], mug["id"],
                                        700, None, 2, 600)
    # every shopper taps five times at once: two at the sale price each, the rest refused
    responses = await asyncio.gather(*(buy(b, mug["id"]) for b in browsers for _ in range(5)))
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(ok) == 8 and all(r.json()["order"]["total"] == "$7.00" for r in ok)
    assert {r.status_code for r in refused} == {409}
    assert all(r.json()["field"] == "product_id" for r in refused)
    assert any("at most 2 of Mug per shopper in this flash sale" in r.json()["error"]
               for r in refused)
    rows = await site.db.fetch_all(
        sa.select(order_items.c.order_id).where(order_items.c.flash_sale_id == sale_id))
    per_shopper: dict[int, int] = {}
    for row in rows:
        order = await queries.order(site.db, row[0])
        per_shopper[order["user_id"]] = per_shopper.get(order["user_id"], 0) + 1
    assert sorted(per_shopper.values()) == [2, 2, 2, 2]
    assert (await flash_row(site.db, sale_id))["sold"] == 8
    # the cart checkout honours the same limit
    cart = browsers[0]
    await cart.fetch("/cart/add", {"product_id": str(mug["id"]), "quantity": "1"})
    response = await cart.post("/checkout")
    assert response.status_code == 409 and "per shopper in this flash sale" in response.text


async def test_two_processes_end_a_sale_exactly_once(make_site) -> None:
    first = await make_site()
    second = await make_site()  # another site process on the same database
    host = await first.user("Host", host=True)
    mug = await first.product(host, name="Mug", stock=5)
    topic = room_topic(host["channel"]["id"])
    subscriptions = [first.app.state.broker.subscribe(topic),
                     second.app.state.broker.subscribe(topic)]
    for subscription in subscriptions:
        await subscription.ready()
    try:
        sale_id = await shopping.start_sale(first.db, host["id"], host["channel"]["id"],
                                            mug["id"], 100, None, None, 0.8)
        await asyncio.sleep(0.8)
        # both processes' enders wake for it, and two more callers race them
        await asyncio.gather(flash.end_due_sales(first.app.state),
                             flash.end_due_sales(second.app.state))
        events = [e for subscription in subscriptions
                  for e in await events_for(subscription, 1.5)
                  if e["type"] == "sale_ended"]
        assert events == [{"type": "sale_ended", "sale_id": sale_id, "product_id": mug["id"],
                           "reason": "time"}]
        assert (await flash_row(first.db, sale_id))["end_reason"] == "time"
    finally:
        for subscription in subscriptions:
            await subscription.close()


def test_the_room_hello_carries_server_time_and_running_sales(sync_site) -> None:
    host = sync_site.user("Host", host=True)
    mug = sync_site.product(host, name="Mug", price_minor=1800, stock=5)
    sale_id = sync_site.call(shopping.start_sale, sync_site.db, host["id"],
                             host["channel"]["id"], mug["id"], 1200, 3, 1, 300.0)
    with sync_site.websocket(host["channel"]["slug"]) as ws:
        hello = ws_receive(ws)
        assert hello["type"] == "hello" and abs(hello["server_time"] - time.time()) < 5
        assert [(s["id"], s["sale_price"], s["remaining"], s["per_shopper_limit"])
                for s in hello["sales"]] == [(sale_id, "$12.00", 3, 1)]


class LockHolder:
    """Another client holding the lock a checkout waits for first: the shopper's row on
    MariaDB (SELECT … FOR UPDATE), the write lock on SQLite (BEGIN IMMEDIATE)."""

    def __init__(self, site, user_id: int) -> None:
        url = site.db.url
        if site.db.dialect_name == "mysql":
            self.conn = mysql_connect(url.rsplit("/", 1)[1].split("?")[0])
            self.conn.autocommit(False)
            with self.conn.cursor() as cursor:
                cursor.execute("SELECT id FROM users WHERE id = %s FOR UPDATE", (user_id,))
        else:
            self.conn = sqlite3.connect(url.split("sqlite:///", 1)[1], isolation_level=None)
            self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


async def test_a_buyer_who_waited_for_the_lock_is_priced_at_the_time_it_got_it(site) -> None:
    """The sale window is checked against a time taken once the checkout holds its first
    lock, not before: here a sale starts while both checkouts wait, and both get its price
    (with the time read before the wait, both paid the regular price)."""
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=10)
    ann, bob = await site.user("Ann"), await site.user("Bob")
    await shopping.save_card(site.db, ann["id"], "visa", "4242")
    buyer = await site.browser(ann)
    await buyer.get("/")
    await queries.set_cart_quantity(site.db, bob["id"], mug["id"], 1)
    stamp = time.time()
    sale_id = await site.db.execute(flash_sales.insert().values(
        channel_id=host["channel"]["id"], product_id=mug["id"], sale_price_minor=900,
        quantity=5, sold=0, per_shopper_limit=None, starts_at=stamp + 1.0,
        ends_at=stamp + 600, created_at=stamp))
    holders = [LockHolder(site, ann["id"])]
    if site.db.dialect_name == "mysql":
        holders.append(LockHolder(site, bob["id"]))
    tapped = asyncio.create_task(buy(buyer, mug["id"]))
    checked_out = asyncio.create_task(queries.create_order_from_cart(site.db, bob["id"], "test"))
    await asyncio.sleep(1.5)
    assert not tapped.done() and not checked_out.done()  # both waiting for the lock
    for holder in holders:
        holder.release()
    order = (await tapped).json()["order"]
    assert order["total"] == "$9.00" and order["items"][0]["flash_sale_id"] == sale_id
    cart_order = await checked_out
    assert cart_order["total_minor"] == 900
    assert cart_order["items"][0]["flash_sale_id"] == sale_id
    assert (await flash_row(site.db, sale_id))["sold"] == 2


async def test_releases_and_buyers_of_a_sale_at_once_never_deadlock(site) -> None:
    """Releases (cancelled orders giving units back) and buy-nows of one flash-sale product at
    once: both take the sale's row before the product's, so neither waits for the other in a
    cycle (taken the other way round, MariaDB answered 1213 deadlocks until retries ran out)."""
    count = 40
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=2 * count)
    sale_id = await shopping.start_sale(site.db, host["id"], host["channel"]["id"], mug["id"],
                                        500, 2 * count, None, 600)
    shoppers = [await site.user(f"Shopper {i}") for i in range(2 * count)]
    first = [await shopping.create_buy_now_order(site.db, user["id"], mug["id"], "test", True,
                                                 None, None, None)
             for user in shoppers[:count]]
    assert {order["total_minor"] for order in first} == {500}
    results = await asyncio.gather(
        *(queries.release_order(site.db, order["id"], "cancelled") for order in first),
        *(shopping.create_buy_now_order(site.db, user["id"], mug["id"], "test", True, None,
                                        None, None) for user in shoppers[count:]),
        return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == []
    assert results[:count] == [True] * count
    assert {order["total_minor"] for order in results[count:]} == {500}
    row = await flash_row(site.db, sale_id)
    product = await queries.product(site.db, mug["id"])
    assert (row["sold"], product["stock"], product["sold"]) == (count, count, count)


async def test_a_late_payment_takes_its_sale_units_back_or_says_why_not(site, caplog) -> None:
    """A payment for a cancelled sale order reopens it with the sale's units taken again; when
    the sale's units went meanwhile it is kept (paid at the sale price) with a note and one
    log line, and the sale is not counted past its quantity."""
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=10)
    sale_id = await shopping.start_sale(site.db, host["id"], host["channel"]["id"], mug["id"],
                                        500, 1, None, 600)
    ann, bob, cat = [await site.user(name) for name in ("Ann", "Bob", "Cat")]

    async def sale_order(user: dict) -> dict:
        order = await shopping.create_buy_now_order(site.db, user["id"], mug["id"], "test",
                                                    True, None, None, None)
        assert order["total_minor"] == 500
        return order

    first = await sale_order(ann)
    assert await queries.release_order(site.db, first["id"], "cancelled")
    assert await queries.reopen_paid_order(site.db, first["id"]) == \
        "paid after it was cancelled; stock reserved again"
    assert (await flash_row(site.db, sale_id))["sold"] == 1

    await site.db.execute(flash_sales.update().where(flash_sales.c.id == sale_id)
                          .values(quantity=2))
    second = await sale_order(bob)
    assert await queries.release_order(site.db, second["id"], "expired")
    third = await sale_order(cat)  # the unit Bob's order gave back
    assert (await flash_row(site.db, sale_id))["sold"] == 2
    order = await queries.order(site.db, second["id"])
    with caplog.at_level("ERROR", logger="watchbuy.site.payments"):
        assert await payments.late_payment(site.app.state, order, None) == "paid"
    note = (await queries.order(site.db, second["id"]))["status_note"]
    assert note == ("paid after it was expired; stock reserved again; the flash sale's units "
                    "were gone by then: sold above its quantity")
    assert (await flash_row(site.db, sale_id))["sold"] == 2  # not past its quantity
    assert [r.getMessage() for r in caplog.records if "units were gone" in r.getMessage()] == [
        f"order {second['id']}: the flash sale's units were gone by then: sold above its "
        "quantity"]
    assert third["status"] == "pending"


async def test_a_rush_of_sale_purchases_sends_one_remaining_count_per_interval(make_site) -> None:
    """Each "sale" event drops the room's kept page: a rush of purchases at the sale price
    sends them coalesced by interval (the latest count wins), not one per purchase."""
    site = await make_site(stock_event_interval=1.0)
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=40)
    browsers = await shoppers_with_cards(site, 8)
    sale_id = await shopping.start_sale(site.db, host["id"], host["channel"]["id"], mug["id"],
                                        500, 30, None, 600)
    subscription = site.app.state.broker.subscribe(room_topic(host["channel"]["id"]))
    await subscription.ready()
    try:
        started = time.monotonic()
        for browser in browsers:  # one after another: eight purchases, each its own event before
            assert (await buy(browser, mug["id"], expected_price_minor=500)).status_code == 200
        took = time.monotonic() - started
        events = [e for e in await events_for(subscription, 2.5) if e["type"] == "sale"]
        # the first at once, then at most one per second (and the latest after the last)
        assert 1 <= len(events) <= min(7, int(took) + 2), (took, events)
        assert events[-1]["sale"]["remaining"] == 22 and events[-1]["sale"]["id"] == sale_id
    finally:
        await subscription.close()
