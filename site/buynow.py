"""Buy now: one unit of one product in one tap, with the shopper's saved address and payment,
and the thank-you page every payment ends on.

``POST /api/buy-now`` (JSON or a form; the CSRF token in X-CSRF-Token as room.js sends it)
takes ``product_id``, then an ``address_id`` from the book, or address fields (a first-time
buyer: checked, then saved to the book), or nothing (the default address).  Payment:

* test mode: the saved test card, or the test card's fields the first time (only its brand
  and last four digits are kept, in ``users.saved_card_*``); the order is paid at once and the
  answer is ``{"ok": true, "order": {...}, "thank_you_url": ...}``;
* Stripe: the shopper's Customer and saved PaymentMethod pay off-session at once where Stripe
  allows (same answer), else a Checkout Session prefilled for that Customer that keeps the
  card for next time: ``{"redirect": url}``.

Errors are ``{"error": text, "field": name}`` with a 4xx status: 400 bad input (a physical
product without an address: field ``address``), 404 not for sale, 409 sold out or a limit.

``request_key`` (optional) is the buy sheet's random key for one press.  It goes on the order
(unique per shopper), so the same press never makes two orders: sent twice at once, the second
is answered with the first's order, also when the first's order is what refuses it (the last
unit or sale unit taken, a limit reached, the price moved: a keyed press's refusal looks its
key up; the sold-out board's answer does so for a ``retry`` only, see :func:`buy_now`); sent
again with ``retry`` (the sheet never got its answer: a dropped connection, a restarted
process) it is answered from the order it made, if any, before anything else (a press whose
order took the last unit is not told "sold out").  That answer is the order paid, or its
payment resumed: the same Checkout Session (Stripe is asked again under the order's
idempotency key), a charge not yet answered asked again the same way, a PaymentIntent under
way its thank-you page.  An order released unpaid (cancelled when Stripe refused, expired)
gives its key up (``queries.release_order``): the sheet, which keeps its key after a 5xx, makes
a new order with its next press instead of being answered with the dead one.

After the order commits, ending a flash sale it sold out and keeping a first test card are
extras: their failure is logged and the shopper still hears the order is paid.

``expected_price_minor`` is the unit price the sheet showed.  When the price decided inside
the order's transaction differs (a flash sale's units went, it ended or started meanwhile)
nothing is ordered or charged: 409 ``{"error", "field": "price", "price", "price_minor"}``,
the new price for the shopper to confirm (a second tap sends it).  Without it (an old page) the price of the moment is
charged, as the cart's checkout does.

``source`` is where Buy now was pressed: ``room`` (the default) or ``replay``.  A replay sells at
the regular price: a flash sale is a live-room offer, so a replay's order ignores a running
sale (and its sheet shows, and sends as ``expected_price_minor``, the regular price).

The rush (issue 15: 3000 presses on 300 units within a second) is mostly "sold out": a product
this process knows is sold out (site/shop.py ``SoldOutBoard``) is answered before any query of
this module, and buyers go through the product's gate a few at a time, so the crowd behind the
last unit is answered from the mark instead of reaching the order's transaction.  Measured
from outside with ``python -m bench.site.rush_outside`` (bench/RESULTS.md, "Issue 15: the
Buy-now rush").
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable

import stripe
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchbuy.db import queries, shopping
from watchbuy.site import flash, payments
from watchbuy.site.addresses import clean_address, field_error
from watchbuy.site.shop import (
    SoldOutBoard,
    log_limit,
    own_order,
    parse_path_id,
    sold_out_board,
    stock_notifier,
)
from watchbuy.site.state import SiteState, state
from watchbuy.site.web import format_money, parse_int, read_fields, render, require_user

log = logging.getLogger("watchbuy.site.buynow")

# the buy sheet's key for one press (buy.js: random, URL-safe)
REQUEST_KEY = re.compile(r"[A-Za-z0-9_-]{8,64}")
TEST_CARD_BRAND = "visa"  # the one test card (4242…) is a Visa
# Where Buy now may be pressed; flash sales apply in the room only (never to a replay)
SOURCES = ("room", "replay")


def public_order(order: dict) -> dict:
    return {
        "id": order["id"],
        "total": format_money(order["total_minor"], order["currency"]),
        "total_minor": order["total_minor"],
        "currency": order["currency"],
        "items": [{"product_id": item["product_id"], "name": item["name"],
                   "quantity": item["quantity"],
                   "unit_price": format_money(item["unit_price_minor"], item["currency"]),
                   "flash_sale_id": item.get("flash_sale_id")} for item in order["items"]],
        "address": shopping.order_address(order),
    }


def choose_address(data: dict, book_address: dict | None,
                   physical: bool) -> tuple[dict | None, bool, JSONResponse | None]:
    """The address the order ships to: (address or None, whether it is a new one to keep in
    the book once the rest is checked, an error answer or None).  ``book_address`` is what
    :func:`shopping.buyer` found for the ``address_id`` asked (or the default)."""
    if (data.get("address_id") or "").strip():
        address_id = parse_int(data["address_id"], "Address", 1, 2**31 - 1)  # checked before
        if book_address is None or book_address["id"] != address_id:
            return None, False, field_error("Choose one of your addresses.", "address_id")
        return book_address, False, None
    if any((data.get(field) or "").strip() for field in ("line1", "city", "postal_code")):
        # a first-time buyer's address, typed in the buy sheet: checked, then kept in the book
        values, errors = clean_address(data)
        if errors:
            field, message = next(iter(errors.items()))
            return None, False, field_error(message, field, errors=errors)
        return values, True, None
    if book_address is not None:
        return book_address, False, None  # the default
    if physical:
        return None, False, field_error("Add a shipping address: this product is shipped.",
                                        "address")
    return None, False, None


def sold_out(name: str | None) -> JSONResponse:
    what = name if name else "this product"
    return field_error(f"Sorry, {what} is sold out.", "product_id", 409)


async def buy_now(request: Request):
    """The rush's hot path: a product this process knows is sold out is answered before any
    database work (the sold-out board); a buyer costs one read of the product, one of the
    shopper (profile and address together), the order's transaction (paid in it in test
    mode) and the announcement's read."""
    user = require_user(request)
    site = state(request)
    try:
        data = await read_fields(request)
    except ValueError as exc:
        return field_error(str(exc), None)
    try:
        product_id = parse_int(data.get("product_id"), "Product", 1, 2**31 - 1)
    except ValueError as exc:
        return field_error(str(exc), "product_id")
    source = str(data.get("source") or "room").strip()
    if source not in SOURCES:
        return field_error(f"Unknown source {source[:20]!r} (room or replay).",
                           "source")
    request_key = str(data.get("request_key") or "").strip() or None
    if request_key is not None and not REQUEST_KEY.fullmatch(request_key):
        return field_error("This buy sheet is out of date: reload the page.", None)
    retry = request_key is not None and data.get("retry") in (True, "1", "true")
    if retry:
        # the sheet sends this press again (its answer never came): the order it made, if any
        answer = await answer_for_press(request, site, user, request_key)
        if answer is not None:
            return answer
    board = sold_out_board(site)
    checkouts = site["metrics"].checkouts
    # A first send told "sold out" by the board costs no query, even with a key: the rush's
    # crowd is these answers (2700 of 3000 presses), and a first send whose press already
    # made an order can only be its twin sent at the same moment from below the page (a
    # browser's or proxy's resend: buy.js disables the button and marks its own resends
    # ``retry``).  Such a twin told "sold out" is the price: its order stands in /orders.
    known_sold_out, name = board.sold_out(product_id)
    if known_sold_out:
        checkouts.labels("unavailable").inc()
        return sold_out(name)
    try:
        async with board.gate(product_id):
            known_sold_out, name = board.sold_out(product_id)
            if known_sold_out:  # marked while this buyer waited its turn
                checkouts.labels("unavailable").inc()
                made: JSONResponse | tuple = sold_out(name)
            else:
                made = await order_in_turn(request, site, user, data, product_id, board,
                                           flash_sale=source != "replay",
                                           request_key=request_key)
    except shopping.AlreadyOrdered as exc:  # the same press twice at once: one order
        return await already_ordered(request, site, user, exc.order_id) or press_again()
    if isinstance(made, JSONResponse):
        if request_key is not None and (retry or not known_sold_out):
            # refused (sold out, a limit, the sale's limit, a new price): when this press was
            # sent twice at once its twin may have made the very order that refused it (took
            # the last unit or sale unit, filled a limit): then that order is the answer.  A
            # refusal of a keyed press only: one read, none for a press sent without a key.
            answer = await answer_for_press(request, site, user, request_key)
            if answer is not None:
                return answer
        return made
    # the order is made: its payment (Stripe's API, the slow part) goes outside the gate
    order, profile, new_card, channel_id = made
    stock_notifier(site).changed(product_id)
    await after_commit("ending the sales it sold out", order["id"], flash.sold_units(site, order))
    if not site["settings"].stripe_enabled:  # test mode: paid in its transaction
        checkouts.labels("test").inc()
        # announced from what is known here (payments.announce_purchase would read it)
        item = order["items"][0]
        lines = [{"product_id": product_id, "product_name": item["name"],
                  "channel_id": channel_id, "display_name": profile["display_name"]}] \
            if profile.get("announce_purchases") and channel_id is not None else []
        log.info("order %s paid", order["id"])
        await payments.publish_purchases(site, order["id"], lines)
        if new_card is not None:
            await after_commit("keeping the test card", order["id"],
                               shopping.save_card(site["db"], user["id"], *new_card))
        return JSONResponse({"ok": True, "order": public_order(order),
                             "thank_you_url": f"/orders/{order['id']}/thanks"})
    return await pay_with_stripe(request, site, user, order, profile)


async def after_commit(step: str, order_id: int, work: Awaitable[None]) -> None:
    """A step after the order's transaction committed: its failure is logged, never the
    shopper's answer (the order stands, paid in test mode: a 500 would say it did not)."""
    try:
        await work
    except Exception:
        log.exception("order %s: %s failed after the order was made", order_id, step)


def press_again() -> JSONResponse:
    """The twin of a press whose order was released before the twin could read it (its
    payment failed): the press bought nothing, and its key may make a new order."""
    return field_error("That payment did not go through: press again to buy.", None, 409)


async def answer_for_press(request: Request, site: SiteState, user: dict,
                           request_key: str) -> JSONResponse | None:
    """The answer from the order this press (its key) made, or None when it made none that
    stands: the press goes on (or its refusal stands)."""
    first = await shopping.order_for_request(site["db"], user["id"], request_key)
    return None if first is None else await already_ordered(request, site, user, first)


async def already_ordered(request: Request, site: SiteState, user: dict,
                          order_id: int) -> JSONResponse | None:
    """The answer to a press that was already answered (or should have been): its order paid
    (the thank-you), or with its payment under way: a Checkout (or a payment not begun: its
    send is still at Stripe, or died) is asked of Stripe again under the order's idempotency
    keys, which answer with the same session or charge, never a second one; an off-session
    payment (a PaymentIntent) settles by itself (the thank-you page shows its status).
    None when the order was released (cancelled or expired: its payment failed or never came,
    and the release gave its key up): the press bought nothing."""
    order = await queries.order(site["db"], order_id)
    if order is None:  # its account was deleted meanwhile
        return field_error("That order no longer exists.", None, 404)
    if order["status"] == "paid":
        return JSONResponse({"ok": True, "order": public_order(order),
                             "thank_you_url": f"/orders/{order_id}/thanks"})
    if order["status"] != "pending":  # cancelled, expired (or refunded after either)
        return None
    if order["payment_mode"] == "stripe" and site["payments"] is not None and \
            not (order["payment_ref"] or "").startswith("pi_"):
        profile = await shopping.payment_profile(site["db"], user["id"])
        return await pay_with_stripe(request, site, user, order, profile, resumed=True)
    return JSONResponse({"redirect": f"/orders/{order_id}/thanks"})


async def order_in_turn(request: Request, site: SiteState, user: dict, data: dict,
                        product_id: int, board: SoldOutBoard, flash_sale: bool = True,
                        request_key: str | None = None) -> JSONResponse | tuple[dict, dict, tuple[str, str] | None,
                                                 int | None]:
    """Inside the product's gate (a few buyers at a time per process): the order made, as
    (order, the shopper's payment profile, a first test card to keep, the product's room), or
    the refusal."""
    db, settings = site["db"], site["settings"]
    checkouts = site["metrics"].checkouts
    # taken before the read: a restock heard while it runs keeps the 0 read from being marked
    before_read = board.reading()
    product = await shopping.product_with_room(db, product_id)
    if product is None or not product["shown"]:
        return field_error("That product is not for sale.", "product_id", 404)
    if product["stock"] < 1:
        board.mark(product_id, product["name"], before_read)
        stock_notifier(site).changed(product_id, sold_out=True)
        checkouts.labels("unavailable").inc()
        return sold_out(product["name"])
    expected_price = None
    if str(data.get("expected_price_minor") or "").strip():
        try:
            expected_price = parse_int(data["expected_price_minor"], "Price", 0, 2**62)
        except ValueError as exc:
            return field_error(str(exc), "price")
    address_id = None
    if (data.get("address_id") or "").strip():
        try:
            address_id = parse_int(data["address_id"], "Address", 1, 2**31 - 1)
        except ValueError as exc:
            return field_error(str(exc), "address_id")
    profile, book_address = await shopping.buyer(db, user["id"], address_id)
    address, new_address, refused = choose_address(data, book_address,
                                                    bool(product["physical"]))
    if refused is not None:
        return refused
    test_mode = not settings.stripe_enabled
    new_card = None
    if test_mode and not profile.get("saved_card_last4"):
        # the first purchase: the test card's fields, checked before anything is reserved
        problem = payments.test_card_problem(data.get("card", ""), data.get("expiry", ""),
                                             (data.get("cvc") or "").strip())
        if problem is not None:
            return field_error(problem[1], problem[0])
        new_card = (TEST_CARD_BRAND, payments.TEST_CARD[-4:])
    if new_address:
        # every field checked: the address goes in the book (the default for a first one)
        try:
            address = await shopping.add_address(db, user["id"], address, make_default=False)
        except shopping.AddressBookFull as exc:
            return field_error(str(exc), "address")
    before_order = board.reading()
    try:
        # test mode: the test card was checked, so the order is paid in the transaction
        # that makes it (no second transaction to mark it paid)
        order = await shopping.create_buy_now_order(
            db, user["id"], product_id, "test" if test_mode else "stripe",
            test_mode=settings.test_orders, address=address,
            max_pending=settings.max_pending_orders,
            max_units=settings.max_units_per_product, expected_price_minor=expected_price,
            product=product, paid=test_mode, flash_sale=flash_sale, request_key=request_key)
    except shopping.PriceChanged as exc:
        # nothing ordered, nothing charged: the sheet shows the new price to confirm
        checkouts.labels("price_changed").inc()
        price = format_money(exc.price_minor, exc.currency)
        return JSONResponse({"error": f"The price of {product['name']} is now {price}: "
                                      "confirm to buy at this price.",
                             "field": "price", "price": price,
                             "price_minor": exc.price_minor}, status_code=409)
    except queries.OutOfStock as exc:
        checkouts.labels("unavailable").inc()
        if exc.stock_seen == 0:
            board.mark(product_id, product["name"], before_order)
        stock_notifier(site).changed(product_id, sold_out=exc.stock_seen == 0)
        return sold_out(product["name"])
    except queries.OrderLimit as exc:  # SaleLimit too
        checkouts.labels("limit").inc()
        log_limit(request, user, str(exc))
        return field_error(f"Sorry: {exc}.", "product_id", 409)
    except LookupError:
        return field_error("That product is not for sale.", "product_id", 404)
    return order, profile, new_card, product["channel_id"]


async def pay_with_stripe(request: Request, site: SiteState, user: dict, order: dict,
                          profile: dict, resumed: bool = False) -> JSONResponse:
    """The saved card off-session where Stripe allows it, else Checkout for the Customer.

    ``resumed``: the order's press was sent again (its answer lost) while the order is pending
    without a PaymentIntent.  Every request to Stripe here carries the order's idempotency
    key, so asking again answers with what the first send made (the same Checkout Session,
    the same charge).  An order holding a session goes straight to it (never off-session:
    the buyer could pay twice).  A failure does not release the order: its first send owns
    it (and may be at Stripe right now); the sheet's next send asks again."""
    gateway = site["payments"]
    assert gateway is not None  # stripe mode means a gateway
    checkouts = site["metrics"].checkouts
    try:
        customer = profile.get("stripe_customer_id")
        if customer and profile.get("saved_payment_method") and not order["payment_ref"]:
            charged = await gateway.charge_saved(order, customer,
                                                 profile["saved_payment_method"])
            if charged is not None:
                intent_id, status = charged
                await queries.set_payment_ref(site["db"], order["id"], intent_id)
                if status == "succeeded":
                    if not resumed:  # a press is counted once
                        checkouts.labels("stripe").inc()
                    if await payments.fulfil(site["db"], order["id"], site):
                        return JSONResponse({
                            "ok": True, "order": public_order(order),
                            "thank_you_url": f"/orders/{order['id']}/thanks"})
                # processing: its webhook settles it; the thank-you page shows the status
                return JSONResponse({"redirect": f"/orders/{order['id']}/thanks"})
        if not customer:
            customer = await gateway.ensure_customer(user["id"], user["email"])
            if not await shopping.set_stripe_customer(site["db"], user["id"], customer):
                customer = (await shopping.payment_profile(
                    site["db"], user["id"]))["stripe_customer_id"]
        session_id, url = await gateway.create_checkout(
            order, site["settings"].public_url, site["settings"].checkout_minutes,
            customer=customer)
    except payments.PaymentUnknown as exc:
        # the charge may have gone through: the order keeps its stock until the intent's
        # webhook or the upkeep settles it (payments.settle_stale_intent_orders)
        checkouts.labels("payment_unknown").inc()
        return field_error(str(exc), None, 502)
    except payments.PaymentError as exc:
        checkouts.labels("payment_error").inc()
        if not resumed:
            await payments.release(site, order["id"], "cancelled")
        return field_error(str(exc), None, 502)
    if order["payment_ref"] != session_id:
        await queries.set_payment_ref(site["db"], order["id"], session_id)
    if not resumed:  # a press is counted once
        checkouts.labels("stripe").inc()
    return JSONResponse({"redirect": url})


async def remember_card(site: SiteState, order: dict, session: dict) -> None:
    """After a Checkout Session for a Customer was paid: keep its card for the next one-tap
    purchase (Stripe keeps the card; we keep its id, brand and last four)."""
    customer, intent = session.get("customer"), session.get("payment_intent")
    if not customer or not intent or site["payments"] is None:
        return
    profile = await shopping.payment_profile(site["db"], order["user_id"])
    if profile.get("stripe_customer_id") != customer:
        return
    try:
        card = await site["payments"].card_of(intent)
    except stripe.StripeError as exc:  # the payment stands; the next purchase uses Checkout
        log.warning("card of payment %s not read: %s", intent, exc)
        return
    if card is not None:
        method, brand, last4 = card
        await shopping.save_card(site["db"], order["user_id"], brand, last4,
                                 payment_method=method)


async def thank_you(request: Request):
    """GET /orders/<id>/thanks (the order's owner only): what was bought, where it goes."""
    order = await own_order(request, parse_path_id(request, "order_id"))
    sellers = await shopping.order_sellers(state(request)["db"], [order["id"]])
    return render(request, "thank_you.html", order=order, summary=public_order(order),
                  sellers=sellers.get(order["id"], []))


routes = [
    Route("/api/buy-now", buy_now, methods=["POST"]),
    Route("/orders/{order_id}/thanks", thank_you),
]
