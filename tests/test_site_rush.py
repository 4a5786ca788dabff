"""The Buy-now rush (issue 15), functional: the speed lives in ``python -m bench.site.rush_outside``.

* 300 shoppers with an address and a saved test card press Buy now (``POST /api/buy-now``) at
  once on a product with 30 units, on SQLite and on MariaDB, through one app and through two
  apps sharing the database and a Redis broker (two "site processes" in this test process):
  exactly 30 orders (paid: test mode), the stock at 0 and never below, every shopper answered
  "bought" (200 ``{"ok": true}``) or "sold out" (409), no 5xx.  The cart's checkout too (one
  process): the same crowd, each with one unit in the cart.
* The same against a real ``watchbuy site`` subprocess SIGKILLed in the middle of the rush and
  started again: no unit sold twice (what the orders hold plus what is left is the stock),
  nothing pending left behind, the shoppers it never answered are answered by the restarted
  process.
* Stock reaches the room as coalesced ``stock`` events, sold out at once; a process's
  "sold out" mark is cleared by another process's restock.
* A viewer whose websocket stops reading (a real TCP client with a tiny receive buffer that
  never reads, against a real uvicorn): stock events for it are coalesced and it stays
  subscribed; chat it cannot take closes it (its queue is bounded, then freed) while a reading
  viewer gets every message; the drops show in /metrics.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import socket
import sys
import time

import httpx
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from app_helpers import SAMPLE_ADDRESS, make_user
from server_helpers import REDIS_URL, redis_problem, require_server
from shop_helpers import buy

from watchbuy.db import queries, shopping
from watchbuy.db.schema import order_items, orders
from watchbuy.site import security
from watchbuy.site import shop as shop_module
from watchbuy.site.broker.memory import InMemoryBroker
from watchbuy.site.chat import publish_room_event, room_topic
from watchbuy.site.shop import BUYERS_IN_FLIGHT, SOLD_OUT_TTL, SoldOutBoard, StockNotifier

pytest_plugins = ["site_fixtures"]

SHOPPERS = 300
UNITS = 30


# -- the rush ---------------------------------------------------------------------------------


async def prepare_rush(db, shoppers: int = SHOPPERS, units: int = UNITS):
    """A host with a room, a product of ``units``, and ``shoppers`` (session token, csrf
    cookie) pairs with an address and a saved test card on file and one unit of the product
    in the cart (for the cart's checkout; Buy now leaves it alone), made directly: argon2 per
    shopper would dominate the test."""
    host = await make_user(db, "Rush host", host=True)
    product_id = await queries.create_product(db, host["id"], "Rush mug", "", 1800, "usd",
                                              units, None)
    people, ids = [], []
    for i in range(shoppers):
        user_id = await queries.create_user(db, f"rush-{i}-{os.urandom(3).hex()}@example.test",
                                            f"Shopper {i}", "x", False)
        # the mug is shipped: a checkout needs an address (in the book, as a returning buyer)
        await shopping.add_address(db, user_id, SAMPLE_ADDRESS, True)
        await shopping.save_card(db, user_id, "visa", "4242")  # Buy now pays with it at once
        await queries.set_cart_quantity(db, user_id, product_id, 1)
        people.append((await security.start_session(db, user_id, 1.0),
                       base64.urlsafe_b64encode(os.urandom(18)).decode()))
        ids.append(user_id)
    return host, product_id, people, ids


def shopper_client(base: httpx.AsyncBaseTransport | str, token: str,
                   csrf_cookie: str) -> httpx.AsyncClient:
    cookies = {security.SESSION_COOKIE: token, security.CSRF_COOKIE: csrf_cookie}
    if isinstance(base, str):
        return httpx.AsyncClient(base_url=base, cookies=cookies, timeout=60)
    return httpx.AsyncClient(transport=base, base_url="http://testserver", cookies=cookies,
                             timeout=60)


async def press(client: httpx.AsyncClient, button: str, secret: str, token: str,
                csrf_cookie: str, product_id: int, request_key: str | None = None,
                retry: bool = False) -> httpx.Response:
    """The shopper presses ``button``: "buy-now" (the room's Buy now, with the buy sheet's
    key for the press and ``retry`` when it is sent again) or "checkout" (the cart's)."""
    fields = {"csrf_token": security.csrf_token_for(secret, csrf_cookie, token)}
    if button == "buy-now":
        if request_key is not None:
            fields.update(request_key=request_key, retry="true" if retry else "")
        return await client.post("/api/buy-now", data={**fields, "product_id": str(product_id)})
    return await client.post("/checkout", data=fields)


def answer(response: httpx.Response) -> str:
    """What the shopper was told: "bought" (Buy now's paid order, or the checkout's redirect
    to pay) or "sold out"; anything else fails."""
    if response.status_code == 200 and response.json().get("ok") is True:
        return "bought"
    if response.status_code == 303 and re.fullmatch(r"/checkout/\d+/pay",
                                                     response.headers["location"]):
        return "bought"
    if response.status_code == 409 and ("not enough Rush mug in stock" in response.text or
                                        response.json() == {
                                            "error": "Sorry, Rush mug is sold out.",
                                            "field": "product_id"}):
        return "sold out"
    raise AssertionError(f"shopper got {response.status_code}: {response.text[:200]}")


async def reserved_units(db, product_id: int) -> dict[str, int]:
    rows = await db.fetch_all(
        sa.select(orders.c.status, sa.func.sum(order_items.c.quantity), sa.func.count())
        .select_from(order_items.join(orders, orders.c.id == order_items.c.order_id))
        .where(order_items.c.product_id == product_id).group_by(orders.c.status))
    return {row[0]: int(row[1]) for row in rows}


async def orders_per_shopper(db) -> int:
    """The most orders any one shopper has (a shopper with one unit in the cart buys once)."""
    return int(await db.fetch_val(sa.select(sa.func.max(sa.literal_column("n"))).select_from(
        sa.select(sa.func.count().label("n")).select_from(orders)
        .group_by(orders.c.user_id).subquery())) or 0)


async def stock(db, product_id: int) -> int:
    return (await queries.product(db, product_id))["stock"]


@pytest.mark.parametrize(("button", "processes"),
                         [("buy-now", 1), ("buy-now", 2), ("checkout", 1)])
async def test_the_rush_sells_exactly_the_stock(make_site, button, processes) -> None:
    overrides = {"broker_url": REDIS_URL} if processes == 2 else {}
    if processes == 2:
        require_server(redis_problem(), f"Redis at {REDIS_URL}")
    sites = [await make_site(**overrides)]
    # processes of one site share its secret key (the csrf tokens they check)
    sites += [await make_site(secret_key=sites[0].settings.secret_key, **overrides)
              for _ in range(processes - 1)]
    db = sites[0].db
    host, product_id, people, _ = await prepare_rush(db)
    # a viewer of the room on each "process": stock events reach every one of them
    viewers = [s.app.state.broker.subscribe(room_topic(host["channel"]["id"])) for s in sites]
    for viewer in viewers:
        await viewer.ready()
    transports = [httpx.ASGITransport(app=s.app) for s in sites]
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(
            shopper_client(transports[i % processes], token, csrf))
            for i, (token, csrf) in enumerate(people)]
        responses = await asyncio.gather(*(
            press(client, button, sites[0].settings.secret_key, token, csrf, product_id)
            for client, (token, csrf) in zip(clients, people, strict=True)))
    told = [answer(response) for response in responses]  # no 5xx, no other answer
    assert told.count("bought") == UNITS and told.count("sold out") == SHOPPERS - UNITS
    assert await stock(db, product_id) == 0
    # Buy now pays with the saved test card at once; the checkout's orders wait for payment
    assert await reserved_units(db, product_id) == {
        "paid" if button == "buy-now" else "pending": UNITS}
    assert await orders_per_shopper(db) == 1
    if button == "buy-now":
        # most of the sold-out crowd was answered from its process's sold-out board, with no
        # query (a mark is trusted a second: a slow run reads the product again once a second)
        from_board = sum(shop_module._boards[s.app.state.broker].answered for s in sites)
        assert from_board >= (SHOPPERS - UNITS) // 2, from_board
    # every viewer, on every process, hears that the product sold out
    for viewer in viewers:
        async with asyncio.timeout(10):
            async for event in viewer:
                if event["type"] == "stock" and event["product_id"] == product_id and \
                        event["stock"] == 0:
                    break
        await viewer.close()


# -- a process killed mid-rush --------------------------------------------------------------


def site_env(db_url: str, data_dir, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("WATCHBUY_")}
    env.update({"WATCHBUY_ENV_FILE": os.devnull, "WATCHBUY_DATABASE_URL": db_url,
                "WATCHBUY_DATA_DIR": str(data_dir), "WATCHBUY_SITE_HOST": "127.0.0.1",
                "WATCHBUY_LOG_LEVEL": "INFO", **extra})
    return env


async def start_site_process(env: dict[str, str]) -> tuple[asyncio.subprocess.Process, str]:
    """``watchbuy site --port 0``; its URL once uvicorn says which port it got."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "watchbuy", "site", "--port", "0", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(30):
            while True:
                line = (await process.stderr.readline()).decode()
                if not line:
                    raise AssertionError("watchbuy site exited before it listened")
                found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
                if found:
                    break
    except BaseException:
        process.kill()
        await process.wait()
        raise
    # keep reading its log, or a full pipe would stall it
    asyncio.ensure_future(_drain(process.stderr))
    return process, f"http://127.0.0.1:{found.group(1)}"


async def _drain(stream: asyncio.StreamReader) -> None:
    with contextlib.suppress(Exception):
        while await stream.read(65536):
            pass


async def test_a_site_process_killed_mid_rush_reconciles(make_site, tmp_path) -> None:
    # The app in this test process is only the database's owner (migrated, shared with the
    # subprocess); the shoppers talk to the subprocess.
    site = await make_site()
    db, secret = site.db, site.settings.secret_key
    host, product_id, people, user_ids = await prepare_rush(db)
    env = site_env(site.settings.database_url, site.settings.data_dir,
                   WATCHBUY_SECRET_KEY=secret)
    process, url = await start_site_process(env)
    answered: dict[int, str] = {}  # shopper index -> what the killed process told them
    enough = asyncio.Event()
    keys = [os.urandom(12).hex() for _ in people]  # each buy sheet's key for its press

    async def shop(index: int, token: str, csrf: str) -> None:
        async with shopper_client(url, token, csrf) as client:
            try:
                response = await press(client, "buy-now", secret, token, csrf, product_id,
                                       keys[index])
            except httpx.TransportError:
                return  # the process died under this request: not answered
            answered[index] = answer(response)
            if len(answered) >= 5:
                enough.set()

    try:
        rush = asyncio.gather(*(shop(i, token, csrf) for i, (token, csrf)
                                in enumerate(people)))
        async with asyncio.timeout(60):
            await enough.wait()
        process.send_signal(signal.SIGKILL)
        await process.wait()
        async with asyncio.timeout(60):
            await rush
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert SHOPPERS > len(answered) >= 5, "the kill came in the middle of the rush"
    # Killed: no unit sold twice (what the orders hold plus what is left is the stock), every
    # answered buyer has an order, nothing is left pending: a Buy-now order is paid in the
    # transaction that takes its unit, and the database rolled back whatever was in flight.
    held = await reserved_units(db, product_id)
    left = await stock(db, product_id)
    assert left >= 0 and left + held.get("paid", 0) == UNITS and set(held) <= {"paid"}
    assert held.get("paid", 0) >= list(answered.values()).count("bought")
    assert await orders_per_shopper(db) == 1
    # Restarted: the shoppers the killed process never answered send their press again (its
    # key, as a retry): one whose order was committed unanswered is told it bought, with that
    # order, and buys nothing more; the others buy while units are left, then are sold out.
    ordered_before = {int(row.user_id): int(row.id) for row in await db.fetch_all(
        sa.select(orders.c.user_id, orders.c.id))}
    process, url = await start_site_process(env)
    again = [i for i in range(SHOPPERS) if i not in answered]
    try:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(shopper_client(url, *people[i]))
                       for i in again]
            responses = await asyncio.gather(*(
                press(client, "buy-now", secret, *people[i], product_id, keys[i], retry=True)
                for client, i in zip(clients, again, strict=True)))
        told = [answer(response) for response in responses]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(20):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
    unanswered_orders = [i for i in again if user_ids[i] in ordered_before]
    for i, response in zip(again, responses, strict=True):
        if user_ids[i] in ordered_before:
            assert response.json()["order"]["id"] == ordered_before[user_ids[i]], response.text
    new_buyers = len(again) - len(unanswered_orders)
    assert told.count("bought") == len(unanswered_orders) + min(left, new_buyers)
    assert told.count("sold out") == len(again) - told.count("bought")
    left_now = await stock(db, product_id)
    assert left_now == left - (told.count("bought") - len(unanswered_orders))
    assert await reserved_units(db, product_id) == {"paid": UNITS - left_now}
    assert await orders_per_shopper(db) == 1  # no press bought twice


# -- stock events ---------------------------------------------------------------------------


async def test_stock_events_are_coalesced_and_sold_out_goes_at_once(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=5)
    broker = site.app.state.broker
    viewer = broker.subscribe(room_topic(host["channel"]["id"]))
    # ten minutes: within the test only the first event and the ones that go "at once" can
    # arrive (the bounds below are ample, never a measure of speed)
    notifier = StockNotifier(site.db, broker, interval=600)
    for _ in range(100):  # a burst of sales in one tick: one event, read when it goes
        notifier.changed(mug["id"])
    assert notifier.coalesced == 99
    async with asyncio.timeout(10):
        event = await anext(viewer)
    assert (event["type"], event["product_id"], event["stock"]) == ("stock", mug["id"], 5)
    assert event["coalesce"] == f"stock:{mug['id']}"
    # sold out: a refused shopper brings the event forward, within the interval of the last
    await queries.update_product(site.db, host["id"], mug["id"], stock_delta=-5)
    notifier.changed(mug["id"], sold_out=True)
    async with asyncio.timeout(10):
        event = await anext(viewer)
    assert event["stock"] == 0
    # units back after the room was told 0 (a restock, a released order): at once too, so that
    # the room and every process's sold-out mark learn it without waiting for the interval
    await queries.update_product(site.db, host["id"], mug["id"], stock_delta=2)
    notifier.changed(mug["id"], units_back=True)
    async with asyncio.timeout(10):
        event = await anext(viewer)
    assert event["stock"] == 2
    assert notifier.published == 3
    await viewer.close()


class HeldReads(StockNotifier):
    """A StockNotifier whose stock reads wait while ``flowing`` is clear: a slow database
    made deterministic (the reads and the publishing are the real ones)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.reads = 0

    async def _publish(self, product_id: int) -> None:
        self.reads += 1
        await self.flowing.wait()
        await super()._publish(product_id)

    async def idle(self, product_id: int) -> None:
        """Until no read of ``product_id`` is under way."""
        async with asyncio.timeout(10):
            while product_id in self._reading:
                await asyncio.sleep(0.01)


async def test_refusals_after_the_room_heard_sold_out_stay_coalesced(site) -> None:
    """The room was told 0; a read is under way (slow) while a crowd keeps being refused:
    the refusals and sales that arrived meanwhile make one more event, at the interval, not
    another read at once (each event is a read plus publishes that drop the room's pages in
    every process)."""
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=0)
    broker = site.app.state.broker
    viewer = broker.subscribe(room_topic(host["channel"]["id"]))
    notifier = HeldReads(site.db, broker, interval=600)
    notifier.changed(mug["id"], sold_out=True)  # the first refusal: the room hears 0
    async with asyncio.timeout(10):
        assert (await anext(viewer))["stock"] == 0
    await notifier.idle(mug["id"])
    # a released order (units back, bought again at once: still 0) starts a read, held
    notifier.flowing.clear()
    notifier.changed(mug["id"], units_back=True)
    async with asyncio.timeout(10):
        while notifier.reads < 2:
            await asyncio.sleep(0.01)
    for n in range(100):  # refused as sold out (Buy now, a one-unit cart) or not (a bigger
        notifier.changed(mug["id"], sold_out=n % 2 == 0)  # cart), and sales
    notifier.flowing.set()
    async with asyncio.timeout(10):
        assert (await anext(viewer))["stock"] == 0
    await notifier.idle(mug["id"])
    # what arrived during the read waits for the interval: no read under way, none due soon
    assert notifier.reads == 2 and notifier.published == 2
    timer = notifier._timers[mug["id"]]
    assert timer.when() - asyncio.get_running_loop().time() > 300
    for _ in range(100):  # and more refusals fold into that one event
        notifier.changed(mug["id"], sold_out=True)
    assert notifier.reads == 2 and notifier._timers[mug["id"]] is timer
    assert notifier.coalesced >= 100
    await viewer.close()


async def following(*boards: SoldOutBoard) -> None:
    """Until each board hears the stock events (it keeps no mark before: a restock could be
    missed)."""
    for board in boards:
        board.follow()
    async with asyncio.timeout(10):
        while not all(board.live for board in boards):
            await asyncio.sleep(0.01)


async def test_a_restock_in_one_process_clears_sold_out_in_the_other(make_site) -> None:
    """The sold-out board (site/shop.py): a process that saw the product sold out answers Buy
    now from its mark; the host's restock through another process reaches it as a stock event
    over Redis, at once, and clears the mark (the marks here are trusted for ten minutes, so
    only the event can have cleared it)."""
    require_server(redis_problem(), f"Redis at {REDIS_URL}")
    first = await make_site(broker_url=REDIS_URL)
    second = await make_site(secret_key=first.settings.secret_key, broker_url=REDIS_URL)
    boards = []
    for site in (first, second):
        broker = site.app.state.broker
        boards.append(shop_module._boards.setdefault(broker, SoldOutBoard(broker, ttl=600)))
    await following(*boards)
    host = await first.user("Host", host=True)
    mug = await first.product(host, name="Mug", stock=1)
    ann, bob = await first.user("Ann"), await first.user("Bob")
    for shopper in (ann, bob):
        await shopping.save_card(first.db, shopper["id"], "visa", "4242")
    ann_browser, bob_browser = await first.browser(ann), await second.browser(bob)
    host_browser = await first.browser(host)
    for browser in (ann_browser, bob_browser, host_browser):
        await browser.get("/")
    assert (await buy(ann_browser, mug["id"])).status_code == 200
    refused = await buy(bob_browser, mug["id"])
    assert refused.status_code == 409 and "sold out" in refused.json()["error"]
    assert boards[1].sold_out(mug["id"]) == (True, "Mug")
    # the first process told the room 0; its interval made ten minutes, only "units back, at
    # once" can bring the restock's event within the bound below
    notifier = shop_module._notifiers[first.app.state.broker]
    async with asyncio.timeout(10):
        while notifier._told.get(mug["id"]) != 0 or mug["id"] in notifier._reading:
            await asyncio.sleep(0.01)
    notifier.interval = 600
    # and the second's own "sold out" event (Bob's refusal) has gone out: the events of two
    # processes keep no order between them, so a 0 still on its way could arrive after the
    # restock's event and mark the product again
    second_notifier = shop_module._notifiers[second.app.state.broker]
    async with asyncio.timeout(10):
        while second_notifier._told.get(mug["id"]) != 0:
            await asyncio.sleep(0.02)
    # the host adds two units through the first process
    response = await host_browser.post(f"/studio/products/{mug['id']}/stock",
                                       {"stock": "2", "stock_was": "0"})
    assert response.status_code in (200, 303), response.text
    async with asyncio.timeout(10):
        while boards[1].sold_out(mug["id"])[0]:
            await asyncio.sleep(0.02)
    assert (await buy(bob_browser, mug["id"])).status_code == 200
    assert await stock(first.db, mug["id"]) == 1


async def test_a_released_order_in_one_process_clears_sold_out_in_the_other(make_site) -> None:
    """A cart checkout in the first process takes the last unit (its room is told 0); the
    second process marks the product sold out; the order is cancelled in the first: the
    units came back, so its stock event goes at once (the interval made ten minutes: only
    "at once" can bring it within the bound) and clears the second's mark over Redis."""
    require_server(redis_problem(), f"Redis at {REDIS_URL}")
    first = await make_site(broker_url=REDIS_URL)
    second = await make_site(secret_key=first.settings.secret_key, broker_url=REDIS_URL)
    boards = [shop_module._boards.setdefault(site.app.state.broker,
                                             SoldOutBoard(site.app.state.broker, ttl=600))
              for site in (first, second)]
    await following(*boards)
    host = await first.user("Host", host=True)
    mug = await first.product(host, name="Mug", stock=1)
    ann, bob = await first.user("Ann"), await first.user("Bob")
    await shopping.add_address(first.db, ann["id"], SAMPLE_ADDRESS, True)
    await shopping.save_card(first.db, bob["id"], "visa", "4242")
    await queries.set_cart_quantity(first.db, ann["id"], mug["id"], 1)
    ann_browser, bob_browser = await first.browser(ann), await second.browser(bob)
    for browser in (ann_browser, bob_browser):
        await browser.get("/")
    checkout = await ann_browser.post("/checkout", {})
    assert checkout.status_code == 303, checkout.text
    order_id = int(re.fullmatch(r"/checkout/(\d+)/pay", checkout.headers["location"]).group(1))
    notifier = shop_module._notifiers[first.app.state.broker]
    async with asyncio.timeout(10):  # the sale's event (the first: at once) tells the room 0
        while notifier._told.get(mug["id"]) != 0 or mug["id"] in notifier._reading:
            await asyncio.sleep(0.01)
    notifier.interval = 600
    refused = await buy(bob_browser, mug["id"])
    assert refused.status_code == 409 and "sold out" in refused.json()["error"]
    assert boards[1].sold_out(mug["id"]) == (True, "Mug")
    cancelled = await ann_browser.post(f"/checkout/{order_id}/cancel", {})
    assert cancelled.status_code == 303, cancelled.text
    assert await stock(first.db, mug["id"]) == 1
    async with asyncio.timeout(10):
        while boards[1].sold_out(mug["id"])[0]:
            await asyncio.sleep(0.02)
    assert (await buy(bob_browser, mug["id"])).status_code == 200


# -- the sold-out board -----------------------------------------------------------------------


async def test_the_gate_lets_a_product_s_buyers_in_a_few_at_a_time() -> None:
    """At most BUYERS_IN_FLIGHT buyers of one product inside at once in one process, each
    product its own gate; a buyer whose order failed (an exception) or who went away
    (cancelled, inside or still waiting) gives the turn back."""
    async with InMemoryBroker() as broker:
        board = SoldOutBoard(broker)
        try:
            held = board.gate(1)  # kept for the end (the board keeps a gate while it is used)
            inside, entered = {1: 0, 2: 0}, {1: 0, 2: 0}
            go = asyncio.Event()

            async def buyer(product_id: int, fails: bool = False) -> None:
                async with board.gate(product_id):
                    inside[product_id] += 1
                    entered[product_id] += 1
                    try:
                        await go.wait()
                        if fails:
                            raise RuntimeError("the order's transaction failed")
                    finally:
                        inside[product_id] -= 1

            async def settled() -> None:  # every buyer that can move has moved
                for _ in range(20):
                    await asyncio.sleep(0)

            crowd = [asyncio.ensure_future(buyer(1, fails=i % 3 == 0)) for i in range(30)]
            others = [asyncio.ensure_future(buyer(2)) for _ in range(3)]
            await settled()
            assert inside == {1: BUYERS_IN_FLIGHT, 2: 3}
            for task in crowd[:3] + crowd[-3:]:  # three inside, three still waiting
                task.cancel()
            await settled()
            assert inside[1] == BUYERS_IN_FLIGHT and entered[1] == BUYERS_IN_FLIGHT + 3
            go.set()
            outcomes = await asyncio.gather(*crowd, *others, return_exceptions=True)
            assert sum(isinstance(o, RuntimeError) for o in outcomes) == 8  # 10 would, 2 were cancelled
            assert inside == {1: 0, 2: 0} and entered[1] == 30 - 3
            assert board.gate(1) is held
            async with asyncio.timeout(10):  # every turn is free again
                for _ in range(BUYERS_IN_FLIGHT):
                    await held.acquire()
            assert held.locked()
        finally:
            await board.close()


async def test_a_sold_out_mark_is_trusted_for_sold_out_ttl_only() -> None:
    async with InMemoryBroker() as broker:
        board = SoldOutBoard(broker)
        try:
            assert board.ttl == SOLD_OUT_TTL
            await following(board)
            board.mark(3, "Mug")
            marked = time.monotonic()
            assert board.sold_out(3) == (True, "Mug")
            assert board.sold_out(4) == (False, None)
            while time.monotonic() <= marked + SOLD_OUT_TTL:  # only ever later, never sooner
                await asyncio.sleep(SOLD_OUT_TTL / 10)
            assert board.sold_out(3) == (False, None)  # the database is asked again
        finally:
            await board.close()


async def test_the_sold_out_board_keeps_nothing_while_the_stock_events_are_down(
        make_site, redis_url) -> None:
    """Marks are kept only while the stock events are heard: none before the subscription is
    live, and the connection to Redis lost (a restock published meanwhile never arrives)
    drops every mark and keeps none until the subscription is live again."""
    site = await make_site(broker_url=redis_url,
                           broker_prefix=f"wb-test-{os.urandom(4).hex()}:")
    broker = site.app.state.broker
    board = SoldOutBoard(broker, ttl=600)
    try:
        board.mark(7, "Mug")  # not following the events: not kept
        assert board.sold_out(7) == (False, None)
        await following(board)
        board.mark(7, "Mug")
        assert board.sold_out(7) == (True, "Mug")
        before = broker.interruptions
        plain = aioredis.Redis.from_url(redis_url)
        try:
            assert await plain.execute_command("CLIENT", "KILL", "TYPE", "pubsub", "ID",
                                               str(broker.pubsub_client_id)) == 1
        finally:
            await plain.connection_pool.disconnect()
        async with asyncio.timeout(10):
            while broker.interruptions == before:
                await asyncio.sleep(0.01)
        assert board.sold_out(7) == (False, None)  # the mark went with the connection
        board.mark(7, "Mug")  # read 0 while not live again: not kept
        assert board.sold_out(7) == (False, None)
        async with asyncio.timeout(10):  # kept again once the subscription is live again
            while not board.sold_out(7)[0]:
                board.mark(7, "Mug")
                await asyncio.sleep(0.01)
    finally:
        await board.close()


async def test_a_viewer_queue_keeps_the_latest_stock_and_drops_a_chat_backlog() -> None:
    async with InMemoryBroker() as broker:
        stuck = broker.subscribe("room:1", queue_size=8)
        for stock_left in range(1000, -1, -1):
            await broker.publish("room:1", {"type": "stock", "product_id": 7,
                                            "stock": stock_left, "coalesce": "stock:7"})
        await broker.publish("room:1", {"type": "chat", "text": "hi"})
        # one queued entry per coalesce key, holding the latest value, in its place
        assert len(stuck._sink.buf) == 2 and not stuck.overflowed
        assert broker.drops == {"coalesced": 1000, "overflow": 0}
        assert (await anext(stuck))["stock"] == 0
        assert (await anext(stuck))["text"] == "hi"
        for n in range(9):  # chat cannot be coalesced: a full queue drops the viewer
            await broker.publish("room:1", {"type": "chat", "text": str(n)})
        assert stuck.overflowed and len(stuck._sink.buf) == 0
        assert broker.drops["overflow"] == 9 and broker.local_subscribers("room:1") == 0


# -- a viewer that stops reading ------------------------------------------------------------


class NonReadingViewer:
    """A websocket client over a raw TCP socket with a tiny receive buffer that, once the
    handshake is read, never reads again (the test's loop runs the server too: all async)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setblocking(False)

    async def open(self, port: int, path: str) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        await loop.sock_sendall(self.sock, (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        async with asyncio.timeout(10):
            while b"\r\n\r\n" not in head:
                head += await loop.sock_recv(self.sock, 1)  # nothing after the headers
        assert head.startswith(b"HTTP/1.1 101"), head

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("ws_protocol", ["frames", "websockets-sansio"])
async def test_a_viewer_that_stops_reading_does_not_hold_up_the_room(make_site,
                                                                     ws_protocol) -> None:
    """Both send paths: the deployed one (``watchbuy site``: the broker writes pre-built frames
    to sockets that keep up, site/wsframes.py) and plain ASGI sends."""
    import uvicorn
    import websockets

    from watchbuy.site.wsframes import FrameProtocol

    queue_size = 32
    site = await make_site(ws_send_queue=queue_size)
    host = await site.user("Host", host=True)
    channel = host["channel"]
    broker = site.app.state.broker
    topic = room_topic(channel["id"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(site.app, lifespan="off", log_level="warning",
                                           ws=FrameProtocol if ws_protocol == "frames"
                                           else ws_protocol, access_log=False))
    serving = asyncio.ensure_future(server.serve(sockets=[listener]))
    stuck = None
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.02)
        path = f"/ws/room/{channel['slug']}"
        stuck = NonReadingViewer()
        await stuck.open(port, path)
        async with websockets.connect(f"ws://127.0.0.1:{port}{path}",
                                      max_size=2**20) as reader:
            assert json.loads(await reader.recv())["type"] == "hello"
            async with asyncio.timeout(10):
                while broker.local_subscribers(topic) < 2:
                    await asyncio.sleep(0.02)
            got: list[dict] = []
            deepest = 0

            async def flood(events, keep_going) -> None:
                """Publish in batches, waiting after each until the reading viewer has the
                batch's last event (so only the stuck one falls behind), until
                ``keep_going()`` says stop."""
                nonlocal deepest
                sent = 0
                for event in events:
                    await publish_room_event(broker, channel["id"], event)
                    sent += 1
                    sinks = broker._topics.get(topic, ())
                    deepest = max([deepest, *(len(sink.buf) for sink in sinks)])
                    if sent % 16 == 0:
                        await caught_up(event)
                        if not keep_going():
                            return
                await caught_up(event)

            async def caught_up(last: dict) -> None:
                async with asyncio.timeout(10):
                    while not got or {k: got[-1].get(k) for k in last} != last:
                        got.append(json.loads(await reader.recv()))

            pad = "x" * 3000  # big events fill the stuck viewer's socket buffers sooner
            # 1. Stock for a viewer that does not read: coalesced, it is not dropped.
            await flood(({"type": "stock", "product_id": 1, "stock": n,
                          "coalesce": "stock:1", "pad": pad} for n in range(3000, -1, -1)),
                        lambda: broker.drops["coalesced"] < 200)
            assert broker.drops["coalesced"] >= 200 and broker.drops["overflow"] == 0
            assert broker.local_subscribers(topic) == 2  # still there, still bounded
            got.clear()
            # 2. Chat it cannot take: its queue fills, it is dropped (its backlog freed)
            #    while the reading viewer gets every message, in order.
            await flood(({"type": "chat", "n": n, "text": pad} for n in range(5000)),
                        lambda: broker.local_subscribers(topic) == 2)
            assert broker.local_subscribers(topic) == 1
            assert [event["n"] for event in got] == list(range(len(got)))
            assert broker.drops["overflow"] > 0
            assert deepest <= queue_size  # the server never held more for it than this
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                metrics = (await client.get("/metrics")).text
            assert re.search(r'watchbuy_site_ws_dropped_total\{reason="overflow"\} [1-9]',
                             metrics)
            assert re.search(r'watchbuy_site_ws_dropped_total\{reason="coalesced"\} [1-9]',
                             metrics)
    finally:
        if stuck is not None:
            stuck.close()
        server.should_exit = True
        async with asyncio.timeout(20):
            await serving
        listener.close()
