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

``expected_price_minor`` is the unit price the sheet showed.  When the price decided inside
the order's transaction differs (a flash sale's units went, it ended or started meanwhile)
nothing is ordered or charged: 409 ``{"error", "field": "price", "price", "price_minor"}``,
the new price for the shopper to confirm (a second tap sends it).  Without it (an old page) the price of the moment is
charged, as the cart's checkout does.

``source`` is where Buy now was pressed: ``room`` (the default) or ``replay``.  A replay sells at
the regular price: a flash sale is a live-room offer, so a replay's order ignores a running
sale (and its sheet shows, and sends as ``expected_price_minor``, the regular price).
"""

from __future__ import annotations

import logging

import stripe
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchbuy.db import queries, shopping
from watchbuy.site import flash, payments
from watchbuy.site.addresses import clean_address, field_error
from watchbuy.site.shop import log_limit, own_order, parse_path_id, stock_notifier
from watchbuy.site.state import SiteState, state
from watchbuy.site.web import format_money, parse_int, read_fields, render, require_user

log = logging.getLogger("watchbuy.site.buynow")

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


async def choose_address(request: Request, user: dict, data: dict,
                         physical: bool) -> tuple[dict | None, bool, JSONResponse | None]:
    """The address the order ships to: (address or None, whether it is a new one to keep in
    the book once the rest is checked, an error answer or None)."""
    db = state(request)["db"]
    if (data.get("address_id") or "").strip():
        try:
            address_id = parse_int(data["address_id"], "Address", 1, 2**31 - 1)
        except ValueError as exc:
            return None, False, field_error(str(exc), "address_id")
        address = await shopping.user_address(db, user["id"], address_id)
        if address is None:
            return None, False, field_error("Choose one of your addresses.", "address_id")
        return address, False, None
    if any((data.get(field) or "").strip() for field in ("line1", "city", "postal_code")):
        # a first-time buyer's address, typed in the buy sheet: checked, then kept in the book
        values, errors = clean_address(data)
        if errors:
            field, message = next(iter(errors.items()))
            return None, False, field_error(message, field, errors=errors)
        return values, True, None
    book = await shopping.user_addresses(db, user["id"])
    if book:
        return book[0], False, None  # the default comes first
    if physical:
        return None, False, field_error("Add a shipping address: this product is shipped.",
                                        "address")
    return None, False, None


async def buy_now(request: Request):
    user = require_user(request)
    site = state(request)
    db, settings = site["db"], site["settings"]
    checkouts = site["metrics"].checkouts
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
    product = await queries.product(db, product_id)
    if product is None or not product["shown"]:
        return field_error("That product is not for sale.", "product_id", 404)
    if product["stock"] < 1:
        stock_notifier(site).changed(product_id, sold_out=True)
        return field_error(f"Sorry, {product['name']} is sold out.", "product_id", 409)
    expected_price = None
    if str(data.get("expected_price_minor") or "").strip():
        try:
            expected_price = parse_int(data["expected_price_minor"], "Price", 0, 2**62)
        except ValueError as exc:
            return field_error(str(exc), "price")
    address, new_address, refused = await choose_address(request, user, data,
                                                         bool(product["physical"]))
    if refused is not None:
        return refused
    profile = await shopping.payment_profile(db, user["id"])
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
    try:
        order = await shopping.create_buy_now_order(
            db, user["id"], product_id, "test" if test_mode else "stripe",
            test_mode=settings.test_orders, address=address,
            max_pending=settings.max_pending_orders,
            max_units=settings.max_units_per_product, expected_price_minor=expected_price,
            flash_sale=source != "replay")
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
        stock_notifier(site).changed(product_id, sold_out=exc.stock_seen == 0)
        return field_error(f"Sorry, {product['name']} is sold out.", "product_id", 409)
    except queries.OrderLimit as exc:  # SaleLimit too
        checkouts.labels("limit").inc()
        log_limit(request, user, str(exc))
        return field_error(f"Sorry: {exc}.", "product_id", 409)
    except LookupError:
        return field_error("That product is not for sale.", "product_id", 404)
    stock_notifier(site).changed(product_id)
    await flash.sold_units(site, order)
    if test_mode:
        checkouts.labels("test").inc()
        return await paid_answer(site, user, order, new_card)
    return await pay_with_stripe(request, site, user, order, profile)


async def paid_answer(site: SiteState, user: dict, order: dict,
                      new_card: tuple[str, str] | None) -> JSONResponse:
    """Pays a test-mode order at once (the test card was checked) and answers."""
    if not await payments.fulfil(site["db"], order["id"], site):
        return field_error("This order is no longer waiting for payment: nothing was charged.",
                           None, 409)
    if new_card is not None:
        await shopping.save_card(site["db"], user["id"], *new_card)
    return JSONResponse({"ok": True, "order": public_order(order),
                         "thank_you_url": f"/orders/{order['id']}/thanks"})


async def pay_with_stripe(request: Request, site: SiteState, user: dict, order: dict,
                          profile: dict) -> JSONResponse:
    """The saved card off-session where Stripe allows it, else Checkout for the Customer."""
    gateway = site["payments"]
    assert gateway is not None  # stripe mode means a gateway
    checkouts = site["metrics"].checkouts
    try:
        customer = profile.get("stripe_customer_id")
        if customer and profile.get("saved_payment_method"):
            charged = await gateway.charge_saved(order, customer,
                                                 profile["saved_payment_method"])
            if charged is not None:
                intent_id, status = charged
                await queries.set_payment_ref(site["db"], order["id"], intent_id)
                if status == "succeeded":
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
        await payments.release(site, order["id"], "cancelled")
        return field_error(str(exc), None, 502)
    await queries.set_payment_ref(site["db"], order["id"], session_id)
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
