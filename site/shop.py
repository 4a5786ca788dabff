"""Cart, checkout, payment (Stripe or test mode), the Stripe webhook, order history.

The checkout rush (thousands of shoppers press buy on one pinned product within a second).
Measured in process with ``python -m bench.site.rush --db sqlite|mysql://root@127.0.0.1/<db>
--shoppers N --stock 300`` (httpx's ASGI transport against one app, no uvicorn: the driver
shares the process and its CPU, so these are lower bounds of the app's throughput; a shared
2-core box; one run each, checkouts answered per second, p99 answer time)::

                            SQLite            MariaDB
    before, 300 shoppers    56/s  p99 5.1 s   109/s  p99 2.7 s
    after,  300 shoppers    87/s  p99 3.3 s   218/s  p99 1.3 s
    after,  3000 shoppers   92/s  p99 30 s    273/s  p99 10.7 s   (300 bought, 2700 sold out)

Where the time went (``--profile``): SQLAlchemy compiling statements (``databases`` compiles
every statement on every run) was ~45 % of the checkout, so the number of statements was the
cost: shopper row FOR UPDATE, cart read, two limit queries, the conditional UPDATE, the order,
its items one by one, the cart delete, under SQLite's single write lock or, on MariaDB, with
the product row locked; after COMMIT the order read back (two queries) and, for every sale,
the host's whole product list read and broadcast to the room.  What is left on SQLite is
mostly ``databases`` opening a new aiosqlite connection and thread for each statement outside
a transaction (db/database.py, shared with every page).

The design (db/queries.py ``create_order_from_cart`` has the details): the database stays the
one record of truth, with one conditional ``UPDATE products SET stock = stock - q WHERE id = ?
AND stock >= q`` per item in a short transaction; on MariaDB it runs last, so the hot row is
locked for one statement and the commit; sold out is answered without any write (a plain read
before the transaction, and the transaction's first statement for those who read just before
the last unit went); the limits are one query, the items one multi-row INSERT, the hot
statements compiled once; the order is not read back; and the rooms hear about stock through
:class:`StockNotifier` (one small event per product per ``stock_event_interval``, the latest
value wins, sold out at once) instead of a product list per sale.  A Redis reservation counter
was not taken: it would be a second record of the stock to reconcile after every crash, while
the conditional UPDATE already is an atomic counter that survives a killed process (the
database rolls back its open transactions; its committed pending orders expire like any other
and give the stock back: tests/test_site_rush.py kills one mid-rush).  Buy now, the button
the rush presses, adds a sold-out board and a per-product gate in front of this design
(:class:`SoldOutBoard`, site/buynow.py).  The issue's targets
(500/s MariaDB, 200/s SQLite at 3000 shoppers) are for a real server measured from outside
(``python -m bench.site.rush_outside``, bench/RESULTS.md "Rush"); this in-process driver does
not reach them on this box.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import TYPE_CHECKING

import stripe
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchbuy.db import queries, shopping
from watchbuy.logs import LogLimiter
from watchbuy.site import flash, payments
from watchbuy.site.chat import publish_room_event
from watchbuy.site.followed import FollowedCache
from watchbuy.site.pagecache import visitor_changed
from watchbuy.site.state import SiteState, state
from watchbuy.site.web import (
    format_money,
    money_totals,
    parse_int,
    read_form,
    redirect,
    remember_cart_count,
    render,
    require_user,
    safe_next,
)

if TYPE_CHECKING:
    from prometheus_client import Counter

    from watchbuy.db.database import Database

log = logging.getLogger("watchbuy.site.shop")
notifier_log = LogLimiter(log, interval=10.0)  # a broken broker must not log a line per sale
# a shopper pressing against a shop limit: one line a minute each
limit_log = LogLimiter(log, interval=60.0)

MAX_QUANTITY = 99
COALESCE_LOG_INTERVAL = 10.0  # seconds between two "stock events coalesced" lines a product


class StockNotifier:
    """Tells a product's room its stock, coalesced: at most one event per product per
    ``interval`` seconds from this process, reading the stock when it sends (so the latest
    value wins and a burst of sales costs one read); at once only when the room's picture is
    wrong in a way that matters now: a shopper was just refused as sold out while the room was
    not told 0, or units came back while it was told 0 (see :meth:`changed`).

    :meth:`changed` never awaits: a checkout's answer does not wait for the room.  The event is
    ``{"type": "stock", "product_id", "stock", "sold", "coalesce": "stock:<id>"}``; the
    ``coalesce`` key lets each viewer's queue keep only the latest one (site/broker/memory.py).
    """

    def __init__(self, db: Database, broker, interval: float,
                 events: Counter | None = None) -> None:
        self.db = db
        # weakly: the notifiers are kept in a WeakKeyDictionary keyed by their broker, which
        # a strong reference from the value would keep alive for ever
        self._broker = weakref.ref(broker)
        self.interval = interval
        self.coalesced = 0  # changes folded into an event already scheduled (for tests/stats)
        self.published = 0  # events sent (for tests/stats)
        self._events = events  # the site's watchbuy_site_stock_events_total, when there is one
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._reading: set[int] = set()  # products whose read and publish are under way
        # changed while being read: another event after, with what those changes said
        # (sold_out, units_back), so that the follow-up is as urgent as they were, no more
        self._again: dict[int, tuple[bool, bool]] = {}
        self._last: dict[int, float] = {}  # product -> when its last event went (monotonic)
        self._told: dict[int, int] = {}  # product -> the stock its room was last told
        self._tasks: set[asyncio.Task] = set()
        self._logged: dict[int, float] = {}  # product -> when coalescing was last logged

    def changed(self, product_id: int, sold_out: bool = False,
                units_back: bool = False) -> None:
        """The stock of ``product_id`` changed.

        ``sold_out``: a shopper was just refused because none is left.  ``units_back``: units
        were given back or added (a released order, a restock), not taken.  Anything else (a
        sale, a refusal that does not prove 0 is left) waits for the interval, coalesced.

        Goes at once, not coalesced, in two cases only: a refusal while the room was not told
        0 (the room shows units that are gone), and units back while it was told 0 (the room
        and every process's sold-out mark say "sold out" when there are units: the event
        clears the marks).  A refusal once the room was told 0 is coalesced like a sale: in a
        rush a thousand refusals arrive after the last unit went, and each event costs a read
        and drops the room's kept pages in every process."""
        if product_id in self._reading:
            queued = self._again.get(product_id, (False, False))
            self._again[product_id] = (queued[0] or sold_out, queued[1] or units_back)
            return
        told = self._told.get(product_id)
        urgent = (sold_out and told != 0) or (units_back and told == 0)
        timer = self._timers.get(product_id)
        if timer is not None:
            if not urgent:
                self.coalesced += 1
                self._log_coalesced(product_id)
                return
            timer.cancel()  # still waiting (no query under way): safe to bring forward
        loop = asyncio.get_running_loop()
        delay = 0.0 if urgent else max(
            0.0, self._last.get(product_id, -1e9) + self.interval - time.monotonic())
        self._timers[product_id] = loop.call_later(delay, self._fire, product_id)

    def _log_coalesced(self, product_id: int) -> None:
        # The limit at work (a rush): one line per product per COALESCE_LOG_INTERVAL at most.
        now = time.monotonic()
        if now - self._logged.get(product_id, -COALESCE_LOG_INTERVAL) >= COALESCE_LOG_INTERVAL:
            self._logged[product_id] = now
            log.info("product %s: stock changes coalesced into one event per %g s "
                     "(WATCHBUY_STOCK_EVENT_INTERVAL); %d coalesced so far", product_id,
                     self.interval, self.coalesced)

    def _fire(self, product_id: int) -> None:
        self._timers.pop(product_id, None)
        self._reading.add(product_id)
        task = asyncio.ensure_future(self._publish(product_id))
        self._tasks.add(task)  # a reference, or the task could be collected mid-way
        task.add_done_callback(self._tasks.discard)

    def _sent(self, product_id: int) -> None:
        """After a read and publish (done or failed): the changes that arrived meanwhile are
        scheduled again, as urgent as they said (a refusal heard while the room was being told
        0 waits for the interval; it does not start another read at once)."""
        self._last[product_id] = time.monotonic()
        self._reading.discard(product_id)
        queued = self._again.pop(product_id, None)
        if queued is not None:
            self.changed(product_id, sold_out=queued[0], units_back=queued[1])

    async def _publish(self, product_id: int) -> None:
        try:
            found = await queries.product_stock_room(self.db, product_id)
            broker = self._broker()
            if found is not None and broker is not None:
                stock, channel_id, sold, name = found
                # every site process's sold-out board hears it (this one's too): a restock
                # or a released order here clears "sold out" there
                await broker.publish(STOCK_TOPIC, {
                    "type": "stock", "product_id": product_id, "stock": stock, "name": name,
                    "coalesce": f"stock:{product_id}"})
                if channel_id is not None:
                    await publish_room_event(broker, channel_id, {
                        "type": "stock", "product_id": product_id, "stock": stock,
                        "sold": sold, "coalesce": f"stock:{product_id}"})
                self._told[product_id] = stock
                self.published += 1
                if self._events is not None:
                    self._events.inc()
        except Exception as exc:  # the database or broker hiccupped: the next sale retries
            notifier_log.warning("stock", "stock event for product %s failed: %s",
                                 product_id, exc)
        finally:
            self._sent(product_id)


# One notifier per broker (each app has its own broker), kept beside it rather than in the
# lifespan state so that the notifier exists wherever a checkout or a release runs.
_notifiers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

STOCK_TOPIC = "stock"  # every product's stock events, for the site processes themselves
SOLD_OUT_TTL = 1.0  # seconds a "sold out" mark is trusted without a stock event clearing it
# Buy-now attempts of one product in flight at once in one process (the rest wait their turn,
# and leave without a query once it is sold out): see SoldOutBoard.gate
BUYERS_IN_FLIGHT = 8


SOLD_OUT_ENTRIES = 10_000  # products marked at once in one process (the oldest mark goes)


class _SoldOutMarks(FollowedCache):
    """The board's marks (site/followed.py): product -> (its name,), scoped by product, kept
    for the board's ttl while the stock events are heard."""

    def _apply(self, message: dict) -> None:
        product_id, stock = message.get("product_id"), message.get("stock")
        if not isinstance(product_id, int) or not isinstance(stock, int):
            return
        self.changed(product_id)  # a restock, a release: its mark (if any) no longer holds
        if stock <= 0 and self.live:  # another process sold the last unit: marked here too
            self._store(product_id, product_id, (message.get("name"),))


class SoldOutBoard:
    """The products this site process knows are sold out, so that the Buy-now crowd told
    "sold out" costs no database work (in a rush of 3000 presses on 300 units, 2700 answers).

    A product is marked when this process reads its stock at 0, or hears a stock event of 0
    from the broker (another process sold the last unit); it is cleared by a stock event above
    0 (a restock, a released order, in any process: the StockNotifier publishes every one on
    :data:`STOCK_TOPIC`, at once when the room was told 0), and in any case trusted for
    :data:`SOLD_OUT_TTL` seconds only.  The marks are a :class:`FollowedCache`: nothing is
    marked while the stock events are not heard (the subscription not live yet, Redis down,
    its connection lost: everything marked goes, since a restock may have been missed), so a
    buyer then reads the product, a few at a time through the gate.  It never sells anything:
    the database's conditional UPDATE decides who buys; a stale mark can only say "sold out"
    for up to ``ttl`` after a restock whose event was published while this process read 0.
    """

    def __init__(self, broker, ttl: float = SOLD_OUT_TTL,
                 in_flight: int = BUYERS_IN_FLIGHT) -> None:
        self.ttl = ttl
        self.in_flight = in_flight
        self.answered = 0  # presses answered from a mark, with no query (tests, stats)
        self._marks = _SoldOutMarks(broker, STOCK_TOPIC, ttl, SOLD_OUT_ENTRIES,
                                    "sold-out board")
        # kept while a buyer holds or waits for one
        self._gates: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    @property
    def live(self) -> bool:
        """Whether marks are kept now (the stock events are heard)."""
        return self._marks.live

    def follow(self) -> None:
        """Hear the stock events from now on (in the background; the first buyer's gate)."""
        self._marks.follow()

    async def close(self) -> None:
        await self._marks.close()

    def gate(self, product_id: int) -> asyncio.Semaphore:
        """The turnstile of one product's buyers in this process: ``in_flight`` at a time.

        Without it a rush is one wave: 3000 presses arrive within a second, each await lets
        the next one in, so every one of them reads the product (in stock, then) and goes on
        to the order's transaction, and only there do 2700 learn it is sold out.  Through the
        gate the first buyers take the stock a few at a time, the one that finds it gone marks
        the product, and everyone still waiting is answered from the mark with no query.
        (The database's conditional UPDATE still decides every sale.)"""
        self.follow()  # live by the time the stock runs out
        gate = self._gates.get(product_id)
        if gate is None:
            gate = self._gates[product_id] = asyncio.Semaphore(self.in_flight)
        return gate

    def sold_out(self, product_id: int) -> tuple[bool, str | None]:
        """(whether ``product_id`` is known sold out, its name when known)."""
        kept = self._marks.get(product_id)
        if kept is None:
            return False, None
        self.answered += 1
        return True, kept[0]

    def reading(self) -> int:
        """Taken before reading a product's stock, for :meth:`mark`."""
        return self._marks.mark()

    def mark(self, product_id: int, name: str | None = None,
             before_read: int | None = None) -> None:
        """This process read the product's stock at 0 (kept only while the events are heard,
        and not when a stock event about it came since ``before_read``, :meth:`reading`'s
        value taken before that read: a restock heard meanwhile makes the 0 old news)."""
        self.follow()
        if name is None:
            known = self._marks.get(product_id)
            name = known[0] if known is not None else None
        since = self._marks.mark() if before_read is None else before_read
        self._marks.put(product_id, product_id, (name,), since)

    def clear(self, product_id: int) -> None:
        self._marks.changed(product_id)


_boards: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sold_out_board(site: SiteState) -> SoldOutBoard:
    """This process's :class:`SoldOutBoard` (one per broker, as the notifiers)."""
    board = _boards.get(site["broker"])
    if board is None:
        board = _boards[site["broker"]] = SoldOutBoard(site["broker"])
        board.follow()  # live by the time a product sells out
    return board


async def close_sold_out_board(broker) -> None:
    """Stops the board of ``broker`` (the app's lifespan, before the broker closes)."""
    board = _boards.pop(broker, None)
    if board is not None:
        await board.close()


def stock_notifier(site: SiteState) -> StockNotifier:
    notifier = _notifiers.get(site["broker"])
    if notifier is None:
        notifier = _notifiers[site["broker"]] = StockNotifier(
            site["db"], site["broker"], site["settings"].stock_event_interval,
            site["metrics"].stock_events)
    return notifier


class SaleNotifier(StockNotifier):
    """The rooms' "sale" events with the units left, coalesced by interval per sale exactly as
    :class:`~watchbuy.site.shop.StockNotifier` coalesces stock (keyed by sale id here): a rush
    of purchases at the sale price sends (and drops the room's kept page) once per
    ``stock_event_interval``, reading the sale when it sends so the latest count wins."""

    def _log_coalesced(self, sale_id: int) -> None:
        flash.announce_log.log(logging.INFO, "flash sale %s: remaining-count events coalesced into "
                         "one per %g s (WATCHBUY_STOCK_EVENT_INTERVAL); %d coalesced so far",
                         sale_id, self.interval, self.coalesced, key="coalesced")

    async def _publish(self, sale_id: int) -> None:
        try:
            sale = await shopping.sale(self.db, sale_id)
            broker = self._broker()
            # an ended (or sold-out, ending) sale's end is announced on its own ("sale_ended")
            running = sale is not None and sale["ended_at"] is None and (
                sale["quantity"] is None or sale["sold"] < sale["quantity"])
            if running and broker is not None:
                await publish_room_event(broker, sale["channel_id"], {
                    "type": "sale", "sale": flash.public_sale(sale), "server_time": time.time(),
                    "coalesce": f"sale:{sale_id}"})
        except Exception as exc:  # the purchase stands; the next one tells the room
            flash.announce_log.warning("remaining", "flash sale %s remaining not announced: %s",
                                 sale_id, exc)
        finally:
            self._sent(sale_id)


# one per broker, as shop.stock_notifier
_sale_notifiers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sale_notifier(site: SiteState) -> SaleNotifier:
    notifier = _sale_notifiers.get(site["broker"])
    if notifier is None:
        notifier = _sale_notifiers[site["broker"]] = SaleNotifier(
            site["db"], site["broker"], site["settings"].stock_event_interval)
    return notifier


def log_limit(request: Request, user: dict, message: str) -> None:
    """Log a shop limit that refused this shopper: one line a minute per shopper at most, not
    one per request (a script hitting the limit must not flood the log)."""
    limit_log.log(logging.INFO, "shop limit for user %s: %s", user["id"], message,
                  key=str(user["id"]))


def wants_json(request: Request) -> bool:
    return request.headers.get("accept", "").startswith("application/json")


async def cart_view(request: Request, error: str | None = None, status_code: int = 200,
                    lines: list[dict] | None = None):
    """The cart page; ``lines`` when the caller has just read the cart (the sold-out answer)."""
    user = require_user(request)
    site = state(request)
    if lines is None:
        lines = await queries.cart(site["db"], user["id"])
    for line in lines:
        line["line_total"] = format_money(line["price_minor"] * line["quantity"],
                                          line["currency"])
        line["price"] = format_money(line["price_minor"], line["currency"])
    count = sum(line["quantity"] for line in lines)
    return remember_cart_count(request, render(
        request, "cart.html", status_code=status_code, lines=lines, cart_count=count,
        totals=money_totals(lines, "price_minor"), error=error,
        test_mode=not site["settings"].stripe_enabled,
        addresses=await shopping.user_addresses(site["db"], user["id"])), user["id"], count)


async def cart_page(request: Request):
    return await cart_view(request)


async def cart_set(request: Request, add: bool):
    """Add to or set a cart line; quantities are checked against stock here, on the server."""
    user = require_user(request)
    form = await read_form(request)
    db = state(request)["db"]
    try:
        product_id = parse_int(form.get("product_id"), "Product", 1, 2**31 - 1)
    except ValueError as exc:
        return await cart_error(request, str(exc), field="product_id")
    try:
        quantity = parse_int(form.get("quantity", "1"), "Quantity", 0 if not add else 1,
                             MAX_QUANTITY)
    except ValueError as exc:
        return await cart_error(request, str(exc))
    product = await queries.product(db, product_id)
    # A hidden product is not for sale by any path (its id is still known to the shoppers
    # who saw it); taking it out of the cart (quantity 0) stays possible.
    if product is None or not product["shown"] and (add or quantity > 0):
        return await cart_error(request, "That product is not for sale.", 404,
                                field="product_id")
    if add:
        quantity += await queries.cart_quantity(db, user["id"], product_id)
    if quantity > product["stock"]:
        return await cart_error(
            request, f"Only {product['stock']} of {product['name']} left in stock.")
    if quantity > MAX_QUANTITY:
        return await cart_error(request, f"At most {MAX_QUANTITY} of one product per order.")
    max_units = state(request)["settings"].max_units_per_product
    if quantity > max_units:
        message = f"At most {max_units} of {product['name']} per shopper."
        log_limit(request, user, message)
        return await cart_error(request, message)
    await queries.set_cart_quantity(db, user["id"], product_id, quantity)
    visitor_changed(request, user["id"])  # the room page's cart badge
    if wants_json(request):
        # the header's cart badge shows the units in the cart
        count = sum(line["quantity"] for line in await queries.cart(db, user["id"]))
        return remember_cart_count(request, JSONResponse(
            {"ok": True, "product_id": product_id, "quantity": quantity, "cart_count": count}),
            user["id"], count)
    # no badge cookie here: the page this goes to (the cart, a room) reads the cart and sets it
    return redirect(safe_next(form.get("next")) if form.get("next") else "/cart")


async def cart_error(request: Request, message: str, status_code: int = 400,
                     field: str = "quantity"):
    if wants_json(request):
        return JSONResponse({"ok": False, "error": message, "field": field},
                            status_code=status_code)
    return await cart_view(request, error=message, status_code=status_code)


async def cart_add(request: Request):
    return await cart_set(request, add=True)


async def cart_update(request: Request):
    return await cart_set(request, add=False)


async def checkout(request: Request):
    """Cart → order (stock reserved, one transaction) → Stripe Checkout or the test card form."""
    user = require_user(request)
    site = state(request)
    settings = site["settings"]
    checkouts = site["metrics"].checkouts
    mode = "stripe" if settings.stripe_enabled else "test"
    form = await read_form(request)
    chosen = (form.get("address_id") or "").strip()
    address_id = int(chosen) if chosen.isascii() and chosen.isdigit() and \
        len(chosen) < 10 else None  # not one of theirs: their default (checked in the query)
    try:
        # hidden products, stock and the per-shopper limits are all checked here, on the
        # server, in the transaction that reserves the stock
        order = await queries.create_order_from_cart(
            site["db"], user["id"], mode, test_mode=settings.test_orders,
            max_pending=settings.max_pending_orders,
            max_units=settings.max_units_per_product, needs_address=True,
            address_id=address_id)
    except (queries.OutOfStock, queries.NotForSale) as exc:
        checkouts.labels("unavailable").inc()
        if isinstance(exc, queries.OutOfStock) and exc.product_id is not None:
            # a room still showing units of a product that has none left hears it now (a
            # refusal that does not prove none is left, a cart of several units, waits for the
            # interval like a sale: it must not start a read per refused shopper)
            stock_notifier(site).changed(exc.product_id, sold_out=exc.stock_seen == 0)
        return await cart_view(request, error=f"Sorry: {exc}. Adjust your cart and try again.",
                               status_code=409, lines=getattr(exc, "lines", None))
    except queries.OrderLimit as exc:
        checkouts.labels("limit").inc()
        log_limit(request, user, str(exc))
        return await cart_view(request, error=f"Sorry: {exc}.", status_code=409)
    except queries.AddressRequired as exc:
        checkouts.labels("invalid").inc()
        return await cart_view(request, error=f"{exc}: it is copied onto the order.",
                               status_code=400)
    except ValueError as exc:
        checkouts.labels("invalid").inc()
        return await cart_view(request, error=str(exc), status_code=400)
    visitor_changed(request, user["id"])  # the cart became the order
    notifier = stock_notifier(site)
    for item in order["items"]:
        notifier.changed(item["product_id"])  # the rooms hear it, coalesced; nobody waits
    await flash.sold_units(site, order)
    if mode == "test":
        checkouts.labels("test").inc()
        return remember_cart_count(request, redirect(f"/checkout/{order['id']}/pay"),
                                   user["id"], 0)  # the cart became the order
    gateway = site["payments"]
    assert gateway is not None  # stripe mode means a gateway
    try:
        session_id, url = await gateway.create_checkout(
            order, settings.public_url, settings.checkout_minutes)
    except payments.PaymentError as exc:
        checkouts.labels("payment_error").inc()
        await payments.release(site, order["id"], "cancelled")
        return await cart_view(request, error=str(exc), status_code=502)
    await queries.set_payment_ref(site["db"], order["id"], session_id)
    checkouts.labels("stripe").inc()
    return remember_cart_count(request, redirect(url), user["id"], 0)


async def own_order(request: Request, order_id: int) -> dict:
    user = require_user(request)
    order = await queries.order(state(request)["db"], order_id)
    if order is None or order["user_id"] != user["id"]:
        raise HTTPException(404, "No such order.")
    return order


def decorate(order: dict) -> dict:
    order["total"] = format_money(order["total_minor"], order["currency"])
    for item in order["items"]:
        item["line_total"] = format_money(item["unit_price_minor"] * item["quantity"],
                                          item["currency"])
    return order


async def test_pay(request: Request):
    """Test mode (no Stripe keys): a clearly labelled card form that takes Stripe's
    test card number (4242 4242 4242 4242) and moves no money."""
    order = await own_order(request, parse_path_id(request, "order_id"))
    if order["payment_mode"] != "test":
        raise HTTPException(404, "No such order.")
    # Only a POST pays; GET and HEAD (which Starlette routes here too) just show the form.
    if request.method != "POST":
        return render(request, "pay_test.html", order=decorate(order), error=None)
    if order["status"] == "pending":
        form = await read_form(request)
        error = payments.check_test_card(form.get("card", ""), form.get("expiry", ""),
                                         (form.get("cvc") or "").strip())
        if error:
            return render(request, "pay_test.html", status_code=400, order=decorate(order),
                          error=error)
        if await payments.fulfil(state(request)["db"], order["id"], state(request)):
            return redirect(f"/orders/{order['id']}/thanks")
        # It stopped being payable between the read above and now (its reservation expired,
        # or it was cancelled in another tab).
        order = await own_order(request, order["id"])
    return render(request, "pay_test.html", status_code=409, order=decorate(order),
                  error=f"This order is no longer waiting for payment ({order['status']}): "
                        "nothing was charged.")


def parse_path_id(request: Request, name: str) -> int:
    try:
        return int(request.path_params[name])
    except ValueError:
        raise HTTPException(404, "Not found.") from None


async def checkout_success(request: Request):
    # Payment is confirmed by the webhook, never by this redirect (anyone can open a URL): the
    # thank-you page shows the order as it stands (paid, or being confirmed).
    order_id = request.query_params.get("order", "")
    if order_id.isascii() and order_id.isdigit():
        return redirect(f"/orders/{int(order_id)}/thanks")
    return redirect("/orders?returned=1")


async def checkout_cancel(request: Request):
    """Where Stripe sends a buyer who backs out.  The GET only asks (another site could make a
    browser open this URL); releasing the reserved stock takes the page's POST."""
    try:
        order_id = int(request.query_params.get("order") or request.path_params.get("order_id"))
    except (TypeError, ValueError):
        return redirect("/cart")
    order = await own_order(request, order_id)
    if request.method == "POST":
        try:
            outcome = await payments.cancel(state(request), order)
        except payments.PaymentError:
            return redirect("/orders?cancel=failed")
        if outcome == "paying":
            return redirect("/orders?cancel=paying")
        return redirect("/orders")
    return render(request, "checkout_cancel.html", order=decorate(order))


async def orders_page(request: Request):
    user = require_user(request)
    db = state(request)["db"]
    orders = [decorate(o) for o in await queries.user_orders(db, user["id"])]
    shipments = await shopping.order_shipments(db, [order["id"] for order in orders])
    for order in orders:
        order["shipments"] = shipments.get(order["id"], [])  # each seller's shipping state
        for shipment in order["shipments"]:
            if shipment["shipped_at"] is None and order.get("shipped_at"):
                # shipped before shipping was kept per seller: the order's own record
                shipment.update(shipped_at=order["shipped_at"], carrier=order.get("carrier"),
                                tracking_number=order.get("tracking_number"))
        order["sellers"] = [shipment["seller"] for shipment in order["shipments"]]
        order["address"] = shopping.order_address(order)
    notices = {
        "paying": "That order was not cancelled: its payment had already gone through.",
        "failed": "The payment service did not answer, so the order is not cancelled yet. "
                  "Try again in a minute.",
    }
    return render(request, "orders.html", orders=orders,
                  returned=request.query_params.get("returned"),
                  notice=notices.get(request.query_params.get("cancel", "")))


async def order_from_reference(db: Database, session: dict) -> dict | None:
    """The order a session names in client_reference_id, when the webhook came before we stored
    the session id (Stripe can be that fast); adopted only if no other session claimed it."""
    try:
        order_id = int(session.get("client_reference_id") or "")
    except ValueError:
        return None
    order = await queries.order(db, order_id)
    if order is None or order["payment_mode"] != "stripe" or \
            order["payment_ref"] not in (None, session["id"]):
        return None
    await queries.set_payment_ref(db, order_id, session["id"])
    return await queries.order(db, order_id)


async def stripe_webhook(request: Request):
    site = state(request)
    webhooks = site["metrics"].webhooks
    gateway = site["payments"]
    if gateway is None:
        webhooks.labels("not_configured").inc()
        return JSONResponse({"error": "stripe is not configured"}, status_code=404)
    payload = await request.body()
    try:
        event = gateway.parse_event(payload, request.headers.get("stripe-signature"))
    except (ValueError, stripe.SignatureVerificationError) as exc:
        webhooks.labels("invalid_signature").inc()
        log.warning("refused a webhook: %s", exc)
        return JSONResponse({"error": "invalid signature"}, status_code=400)
    if not await queries.record_webhook_event(site["db"], event["id"], event["type"]):
        webhooks.labels("duplicate").inc()
        return JSONResponse({"ok": True, "duplicate": True})
    try:
        outcome, response = await apply_stripe_event(site, event)
    except Exception:
        webhooks.labels("failed").inc()
        # Not applied: forget the event, or Stripe's retry (it retries after a 5xx) would be
        # taken for a duplicate and the payment lost.
        await queries.forget_webhook_event(site["db"], event["id"])
        raise
    webhooks.labels(outcome).inc()
    return response


async def apply_stripe_event(site: SiteState, event: dict) -> tuple[str, JSONResponse]:
    """The event applied: its outcome (a metrics label) and the answer for Stripe."""
    db = site["db"]
    session = event["data"]["object"]
    if event["type"].startswith("payment_intent."):
        return await apply_intent_event(site, event)
    order = None
    if session.get("id"):
        order = await queries.order_by_payment_ref(db, session["id"])
    if order is None and session.get("id"):
        order = await order_from_reference(db, session)
    if order is None:
        log.warning("webhook %s for an unknown checkout session", event["id"])
        return "ignored", JSONResponse({"ok": True, "ignored": True})
    if event["type"] in ("checkout.session.completed",
                         "checkout.session.async_payment_succeeded"):
        if session.get("payment_status") in ("paid", "no_payment_required"):
            if not await payments.fulfil(db, order["id"], site):
                # not pending: cancelled or expired while the buyer paid (or paid already);
                # the payment must not be dropped
                outcome = await payments.late_payment(
                    site, await queries.order(db, order["id"]),
                    session.get("payment_intent"))
                return "late_payment", JSONResponse({"ok": True, "late_payment": outcome})
            from watchbuy.site.buynow import remember_card  # it builds on this module

            await remember_card(site, order, session)
            return "paid", JSONResponse({"ok": True})
    elif event["type"] in ("checkout.session.expired",
                           "checkout.session.async_payment_failed"):
        await payments.release(site, order["id"], "expired")
        return "expired", JSONResponse({"ok": True})
    return "applied", JSONResponse({"ok": True})


async def apply_intent_event(site: SiteState, event: dict) -> tuple[str, JSONResponse]:
    """payment_intent.succeeded / payment_failed of an off-session (saved-card) payment: the
    order whose payment_ref is the intent, or (when the charge's answer was lost before the
    ref was stored) the one its metadata names that has no ref yet.  Intents of Checkout
    Sessions (their orders hold a cs_ ref) are settled by the session's own events."""
    db = site["db"]
    intent = event["data"]["object"]
    order = await queries.order_by_payment_ref(db, intent["id"])
    if order is None:
        try:
            candidate = await queries.order(
                db, int((intent.get("metadata") or {}).get("order_id") or 0))
        except ValueError:
            candidate = None
        if candidate is not None and candidate["payment_mode"] == "stripe" and \
                candidate["payment_ref"] is None:
            await queries.set_payment_ref(db, candidate["id"], intent["id"])
            order = await queries.order(db, candidate["id"])
    if order is None:
        return "ignored", JSONResponse({"ok": True, "ignored": True})
    if event["type"] == "payment_intent.succeeded":
        if await payments.fulfil(db, order["id"], site):
            return "paid", JSONResponse({"ok": True})
        outcome = await payments.late_payment(site, await queries.order(db, order["id"]),
                                              intent["id"])
        return "late_payment", JSONResponse({"ok": True, "late_payment": outcome})
    if event["type"] in ("payment_intent.payment_failed", "payment_intent.canceled"):
        await payments.release(site, order["id"], "expired")
        return "expired", JSONResponse({"ok": True})
    return "applied", JSONResponse({"ok": True})


routes = [
    Route("/cart", cart_page),
    Route("/cart/add", cart_add, methods=["POST"]),
    Route("/cart/update", cart_update, methods=["POST"]),
    Route("/checkout", checkout, methods=["POST"]),
    Route("/checkout/success", checkout_success),
    Route("/checkout/cancel", checkout_cancel),
    Route("/checkout/{order_id}/cancel", checkout_cancel, methods=["POST"]),
    Route("/checkout/{order_id}/pay", test_pay, methods=["GET", "POST"]),
    Route("/orders", orders_page),
    Route("/webhooks/stripe", stripe_webhook, methods=["POST"]),
]
