"""Cart, checkout, orders and payment: test mode, Stripe (a local stand-in), concurrency."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass

import httpx
import pytest
import sqlalchemy as sa
from app_helpers import Site, make_product, make_user, start_session, table_counts
from page_helpers import Browser, error_texts
from stripe_standin import STRIPE_WEBHOOK_SECRET, stripe_event, stripe_settings, stripe_signature

from watchbuy.db import queries
from watchbuy.db.schema import orders, products, webhook_events
from watchbuy.site import payments
from watchbuy.site.state import app_state

pytest_plugins = ["site_fixtures"]
# stripe's HTTPXClient posts its form as data=str, which httpx deprecates (not our code)
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


async def stock(db, product_id: int) -> int:
    return int(await db.fetch_val(sa.select(products.c.stock).where(products.c.id == product_id)))


async def add_to_cart(browser, product_id, quantity="1"):
    return await browser.post("/cart/add", {"product_id": str(product_id),
                                            "quantity": str(quantity)})


# -- the cart ---------------------------------------------------------------------------------


BAD_CART_INPUT = [  # (product, quantity, status, message, the field at fault)
    (None, "0", 400, "Quantity must be between 1 and 99.", "quantity"),
    (None, "-1", 400, "Quantity must be between 1 and 99.", "quantity"),
    (None, "1000000000", 400, "Quantity must be between 1 and 99.", "quantity"),
    (None, "2.5", 400, "Quantity must be a whole number.", "quantity"),
    (None, "", 400, "Quantity must be a whole number.", "quantity"),
    (None, "11", 400, "Only 10 of Mug left in stock.", "quantity"),
    ("999999", "1", 404, "That product is not for sale.", "product_id"),
    ("abc", "1", 400, "Product must be a whole number.", "product_id"),
]


async def test_bad_cart_input_gets_a_message_and_changes_nothing(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=10)
    shopper = await site.user("Sue")
    browser = await site.browser(shopper)
    await browser.get("/cart")
    before = await table_counts(site.db)
    for product_id, quantity, status, message, field in BAD_CART_INPUT:
        product_id = product_id or str(mug["id"])
        case = f"product_id={product_id!r} quantity={quantity!r}"
        response = await add_to_cart(browser, product_id, quantity)
        assert response.status_code == status, case
        assert error_texts(response.text) == [message], case
        assert "Your cart" in response.text  # the message is on the cart page
        # a script's fetch gets the same message as JSON
        response = await browser.fetch("/cart/add", {"product_id": product_id,
                                                     "quantity": quantity})
        assert response.status_code == status, case
        assert response.json() == {"ok": False, "error": message, "field": field}, case
    for quantity, message in [("1000000000", "Quantity must be between 0 and 99."),
                              ("-1", "Quantity must be between 0 and 99."),
                              ("11", "Only 10 of Mug left in stock.")]:
        response = await browser.post("/cart/update", {"product_id": str(mug["id"]),
                                                       "quantity": quantity})
        assert response.status_code == 400 and error_texts(response.text) == [message]
    assert await table_counts(site.db) == before
    assert await stock(site.db, mug["id"]) == 10


async def test_cart_add_update_remove_and_stock_limits(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=5)
    bag = await site.product(host, name="Bag", price_minor=2450, stock=5)
    shopper = await site.user("Sue")
    browser = await site.browser(shopper)
    response = await browser.fetch("/cart/add", {"product_id": str(mug["id"]), "quantity": "2"})
    assert response.json() == {"ok": True, "product_id": mug["id"], "quantity": 2,
                               "cart_count": 2}
    assert (await add_to_cart(browser, mug["id"], 2)).status_code == 303
    assert (await add_to_cart(browser, bag["id"], 1)).status_code == 303
    # 4 in the cart, 5 in stock: 2 more would be 6
    response = await add_to_cart(browser, mug["id"], 2)
    assert response.status_code == 400 and "Only 5 of Mug left in stock." in response.text
    page = await browser.get("/cart")
    assert "$72.00" in page.text and "$24.50" in page.text and "$96.50" in page.text
    # totals are the server's: a price sent with the form is ignored
    response = await browser.post("/cart/update", {"product_id": str(mug["id"]),
                                                   "quantity": "1", "price": "0.01"})
    assert response.status_code == 303
    assert await queries.cart_quantity(site.db, shopper["id"], mug["id"]) == 1
    response = await browser.post("/cart/update", {"product_id": str(bag["id"]),
                                                   "quantity": "0"})
    assert response.status_code == 303
    lines = await queries.cart(site.db, shopper["id"])
    assert [(line["name"], line["quantity"]) for line in lines] == [("Mug", 1)]
    # a hidden product cannot be added
    await queries.update_product(site.db, host["id"], bag["id"], shown=False)
    response = await add_to_cart(browser, bag["id"], 1)
    assert response.status_code == 404


def cart_badge(html: str) -> str | None:
    """The header's cart badge: its number, or None when it is hidden."""
    match = re.search(r'<span id="cart-count" class="cart-count"( hidden)?>(\d+)</span>', html)
    assert match is not None, "no cart badge in the header"
    return None if match.group(1) else match.group(2)


async def test_the_cart_badge_shows_on_every_page_without_a_cart_query(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=5)
    shopper = await site.user("Sue")
    browser = await site.browser(shopper)
    assert cart_badge((await browser.get("/orders")).text) is None
    await browser.fetch("/cart/add", {"product_id": str(mug["id"]), "quantity": "2"})
    # a page that never reads the cart shows what the cart endpoint left for it
    assert cart_badge((await browser.get("/orders")).text) == "2"
    assert cart_badge((await browser.get("/account")).text) == "2"
    # another shopper on the same browser never sees Sue's count (it names her)
    bob = await site.browser(await site.user("Bob"))
    bob.http.cookies.set("wb_cart", browser.http.cookies["wb_cart"])
    assert cart_badge((await bob.get("/orders")).text) is None
    # checkout turns the cart into an order: the badge goes
    sue = await site.browser(shopper)
    await sue.fetch("/cart/add", {"product_id": str(mug["id"]), "quantity": "1"})
    assert (await sue.post("/checkout")).status_code == 303
    assert cart_badge((await sue.get("/orders")).text) is None


async def test_nobody_sees_another_shoppers_cart_or_orders(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Secret mug", stock=10)
    ann, bob = await site.user("Ann"), await site.user("Bob")
    anns, bobs = await site.browser(ann), await site.browser(bob)
    await add_to_cart(anns, mug["id"], 2)
    assert "Secret mug" in (await anns.get("/cart")).text
    assert "Secret mug" not in (await bobs.get("/cart")).text
    response = await anns.post("/checkout")
    assert response.status_code == 303
    order_id = int(re.fullmatch(r"/checkout/(\d+)/pay", response.headers["location"]).group(1))

    assert "Secret mug" not in (await bobs.get("/orders")).text
    before = await queries.order(site.db, order_id)
    for method, path, data in [
        ("get", f"/checkout/{order_id}/pay", None),
        ("post", f"/checkout/{order_id}/pay",
         {"card": "4242 4242 4242 4242", "expiry": "12/99", "cvc": "123"}),
        ("get", f"/checkout/cancel?order={order_id}", None),
        ("post", f"/checkout/{order_id}/cancel", {}),
    ]:
        response = await (bobs.get(path) if method == "get" else bobs.post(path, data))
        assert response.status_code == 404, path
        assert "No such order." in response.text
    assert await queries.order(site.db, order_id) == before
    assert (await bobs.get("/checkout/abc/pay")).status_code == 404
    # anonymous visitors are sent to log in
    response = await (await site.browser()).get("/cart")
    assert response.status_code == 303 and response.headers["location"] == "/login?next=/cart"


# -- test mode (no Stripe keys) --------------------------------------------------------------------


async def test_test_mode_checkout_pays_with_the_test_card(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=10)
    shopper = await site.user("Sue")
    browser = await site.browser(shopper)
    await add_to_cart(browser, mug["id"], 2)
    cart = await browser.get("/cart")
    assert "Checkout (test mode)" in cart.text
    response = await browser.post("/checkout")
    assert response.status_code == 303
    pay_url = response.headers["location"]
    order_id = int(re.fullmatch(r"/checkout/(\d+)/pay", pay_url).group(1))
    order = await queries.order(site.db, order_id)
    assert (order["status"], order["payment_mode"], order["total_minor"]) == ("pending", "test", 3600)
    assert [(i["name"], i["unit_price_minor"], i["quantity"]) for i in order["items"]] == \
        [("Mug", 1800, 2)]
    assert await stock(site.db, mug["id"]) == 8  # reserved
    assert await queries.cart(site.db, shopper["id"]) == []

    page = await browser.get(pay_url)
    assert page.status_code == 200 and "TEST MODE" in page.text and "$36.00" in page.text
    for card, expiry, cvc, message in [
        ("4000 0000 0000 0002", "12/99", "123",
         "Test mode accepts only the test card 4242 4242 4242 4242."),
        ("4242 4242 4242 4242", "01/20", "123", "That expiry date is not in the future."),
        ("4242 4242 4242 4242", "soon", "123", "Enter the expiry date as MM/YY."),
        ("4242 4242 4242 4242", "12/99", "1", "Enter the 3 or 4 digit security code."),
    ]:
        response = await browser.post(pay_url, {"card": card, "expiry": expiry, "cvc": cvc})
        assert response.status_code == 400 and error_texts(response.text) == [message]
        assert (await queries.order(site.db, order_id))["status"] == "pending"

    response = await browser.post(pay_url, {"card": "4242 4242 4242 4242", "expiry": "12/99",
                                            "cvc": "123"})
    assert response.status_code == 303 and \
        response.headers["location"] == f"/orders/{order_id}/thanks"
    order = await queries.order(site.db, order_id)
    assert order["status"] == "paid" and order["paid_at"]
    # paying again changes nothing, and says so
    response = await browser.post(pay_url, {"card": "4242424242424242", "expiry": "12/99",
                                            "cvc": "123"})
    assert response.status_code == 409
    assert error_texts(response.text) == [
        "This order is no longer waiting for payment (paid): nothing was charged."]
    assert await queries.order(site.db, order_id) == order
    assert await stock(site.db, mug["id"]) == 8

    orders_page = await browser.get("/orders")
    assert re.search(rf'id="order-{order_id}">\s*<h3>Order #{order_id} '
                     r'<span class="status paid">paid</span> <span class="testmode">test order',
                     orders_page.text)
    sales = await (await site.browser(host)).get("/studio/sales")
    assert "Sue" in sales.text and '<span class="status paid">paid</span>' in sales.text
    # a test-card order is no money earned: shown apart, never in "Paid so far"
    assert "Paid so far" not in sales.text
    assert "Test orders (no real money, not counted above): $36.00" in sales.text


async def test_a_test_payment_after_the_reservation_expired_is_refused(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=3)
    browser = await site.browser(await site.user("Sue"))
    await add_to_cart(browser, mug["id"], 1)
    pay_url = (await browser.post("/checkout")).headers["location"]
    order_id = int(re.fullmatch(r"/checkout/(\d+)/pay", pay_url).group(1))
    await browser.get(pay_url)
    # the sweep gives the stock back while the shopper types the card number
    assert await payments.release(app_state(site.app), order_id, "expired")
    response = await browser.post(pay_url, {"card": "4242 4242 4242 4242", "expiry": "12/99",
                                            "cvc": "123"})
    assert response.status_code == 409
    assert error_texts(response.text) == [
        "This order is no longer waiting for payment (expired): nothing was charged."]
    assert (await queries.order(site.db, order_id))["status"] == "expired"
    assert await stock(site.db, mug["id"]) == 3


async def test_checkout_of_an_empty_cart_or_more_than_is_left(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=3)
    shopper = await site.user("Sue")
    browser = await site.browser(shopper)
    response = await browser.post("/checkout")
    assert response.status_code == 400 and error_texts(response.text) == ["your cart is empty"]
    await add_to_cart(browser, mug["id"], 3)
    await queries.update_product(site.db, host["id"], mug["id"], stock=2)  # sold elsewhere
    before = await table_counts(site.db)
    response = await browser.post("/checkout")
    assert response.status_code == 409
    assert error_texts(response.text) == [
        "Sorry: not enough Mug in stock. Adjust your cart and try again."]
    assert await table_counts(site.db) == before
    assert await stock(site.db, mug["id"]) == 2
    assert await queries.cart_quantity(site.db, shopper["id"], mug["id"]) == 3


async def test_cancelling_a_pending_order_releases_its_stock(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=4)
    browser = await site.browser(await site.user("Sue"))
    await add_to_cart(browser, mug["id"], 3)
    order_id = int((await browser.post("/checkout")).headers["location"].split("/")[2])
    assert await stock(site.db, mug["id"]) == 1
    # Stripe's cancel URL is a GET: it only asks, so another site cannot cancel for the buyer
    response = await browser.get(f"/checkout/cancel?order={order_id}")
    assert response.status_code == 200 and "Cancel this order" in response.text
    assert (await queries.order(site.db, order_id))["status"] == "pending"
    assert (await browser.post(f"/checkout/{order_id}/cancel", csrf=False)).status_code == 403
    response = await browser.post(f"/checkout/{order_id}/cancel")
    assert response.status_code == 303
    assert (await queries.order(site.db, order_id))["status"] == "cancelled"
    assert await stock(site.db, mug["id"]) == 4
    await browser.post(f"/checkout/{order_id}/cancel")  # twice: released once
    assert await stock(site.db, mug["id"]) == 4


# -- 50 shoppers, 10 in stock ----------------------------------------------------------------------

SHOPPERS = 50
STOCK = 10


async def shoppers_with_carts(db, product: dict) -> list[dict]:
    shoppers = []
    for n in range(SHOPPERS):
        shopper = await make_user(db, f"Shopper {n}")
        await queries.set_cart_quantity(db, shopper["id"], product["id"], 1)
        shoppers.append(shopper)
    return shoppers


async def watch_stock(db, product_id: int, seen: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        seen.append(await stock(db, product_id))
        await asyncio.sleep(0.005)


async def assert_sold_exactly_the_stock(db, product: dict, seen: list[int]) -> None:
    assert await stock(db, product["id"]) == 0
    assert min(seen) >= 0
    sold = await db.fetch_val("SELECT SUM(quantity) FROM order_items WHERE product_id = "
                              f"{int(product['id'])}")
    assert int(sold) == STOCK
    assert int(await db.fetch_val(sa.select(sa.func.count()).select_from(orders))) == STOCK


async def test_fifty_concurrent_checkouts_sell_exactly_the_stock_in_the_data_layer(site) -> None:
    host = await make_user(site.db, "Host", host=True)
    product = await make_product(site.db, host, name="Last ones", stock=STOCK)
    shoppers = await shoppers_with_carts(site.db, product)
    seen: list[int] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_stock(site.db, product["id"], seen, stop))
    results = await asyncio.gather(
        *(queries.create_order_from_cart(site.db, s["id"], "test") for s in shoppers),
        return_exceptions=True)
    stop.set()
    await watcher
    made = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, queries.OutOfStock)]
    assert len(made) == STOCK and len(refused) == SHOPPERS - STOCK, \
        [r for r in results if not isinstance(r, dict | queries.OutOfStock)]
    assert all(order["status"] == "pending" and order["total_minor"] == 1800 for order in made)
    await assert_sold_exactly_the_stock(site.db, product, seen)
    # the refused keep their carts; the buyers' carts are empty
    buyers = {order["user_id"] for order in made}
    for shopper in shoppers:
        expected = 0 if shopper["id"] in buyers else 1
        assert await queries.cart_quantity(site.db, shopper["id"], product["id"]) == expected


async def test_fifty_concurrent_checkouts_through_the_site(site) -> None:
    host = await make_user(site.db, "Host", host=True)
    product = await make_product(site.db, host, name="Last ones", stock=STOCK)
    shoppers = await shoppers_with_carts(site.db, product)
    browsers = [await site.browser(s) for s in shoppers]
    await asyncio.gather(*(b.get("/cart") for b in browsers))  # each page's CSRF token
    seen: list[int] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_stock(site.db, product["id"], seen, stop))
    responses = await asyncio.gather(*(b.post("/checkout") for b in browsers))
    stop.set()
    await watcher
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [303] * STOCK + [409] * (SHOPPERS - STOCK)
    for response in responses:
        if response.status_code == 303:
            assert re.fullmatch(r"/checkout/\d+/pay", response.headers["location"])
        else:
            assert "Sorry: not enough Last ones in stock." in response.text
    await assert_sold_exactly_the_stock(site.db, product, seen)


# -- Stripe (the official library against a local stand-in of its API) ----------------------------


@pytest.fixture
async def stripe_site(make_site, stripe_api):
    return await make_site(**stripe_settings(stripe_api))


@dataclass
class StripeBuy:
    """A shopper who checked a Mug out through Stripe: the order is pending, its stock held."""

    site: Site
    host: dict
    mug: dict
    shopper: dict
    browser: Browser
    cart_page: str  # the shopper's cart page just before checking out
    session: dict  # the checkout session, as the Stripe stand-in holds it
    order: dict


@pytest.fixture
def stripe_buy(stripe_site, stripe_api):
    """``await stripe_buy(stock=…, quantity=…)``: a host with a Mug and a shopper who bought
    ``quantity`` of them through Stripe's checkout (not paid yet)."""

    async def buy(stock: int = 5, quantity: int = 2, shopper: str = "Sue") -> StripeBuy:
        site = stripe_site
        host = await site.user("Host", host=True)
        mug = await site.product(host, name="Mug", price_minor=1800, stock=stock)
        buyer = await site.user(shopper)
        browser = await site.browser(buyer)
        await add_to_cart(browser, mug["id"], quantity)
        cart_page = (await browser.get("/cart")).text
        response = await browser.post("/checkout")
        assert response.status_code == 303, response.text
        session_id = response.headers["location"].rsplit("/", 1)[1]
        assert response.headers["location"] == f"https://checkout.stripe.test/c/pay/{session_id}"
        session = stripe_api.sessions[session_id]
        order = await queries.order_by_payment_ref(site.db, session_id)
        return StripeBuy(site, host, mug, buyer, browser, cart_page, session, order)

    return buy


async def deliver(site, payload: str, signature: str | None = None):
    browser = await site.browser()
    headers = {"Content-Type": "application/json"}
    if signature is not False:
        headers["Stripe-Signature"] = signature or stripe_signature(payload)
    return await browser.http.post("/webhooks/stripe", content=payload, headers=headers)


async def test_stripe_checkout_and_webhook_pay_exactly_once(stripe_buy, stripe_api) -> None:
    buy = await stripe_buy(stock=10, quantity=2)
    site, host, mug, browser, session, order = \
        buy.site, buy.host, buy.mug, buy.browser, buy.session, buy.order
    assert 'id="checkout"' in buy.cart_page and "test mode" not in buy.cart_page
    request = stripe_api.requests[-1]
    assert order["status"] == "pending" and order["payment_mode"] == "stripe"
    assert order["payment_ref"] == session["id"]
    assert request["headers"]["idempotency-key"] == \
        f"watchbuy-order-{order['id']}-{order['created_at']:.3f}"
    assert request["form"]["line_items[0][price_data][unit_amount]"] == "1800"
    assert request["form"]["line_items[0][quantity]"] == "2"
    assert request["form"]["line_items[0][price_data][product_data][name]"] == "Mug"
    assert session["amount_total"] == order["total_minor"] == 3600
    assert session["success_url"].startswith(site.settings.public_url)
    assert await stock(site.db, mug["id"]) == 8

    # the success redirect is no proof of payment
    response = await browser.get(f"/checkout/success?order={order['id']}")
    assert response.status_code == 303
    assert (await queries.order(site.db, order["id"]))["status"] == "pending"

    completed = stripe_event("checkout.session.completed", session, payment_status="paid",
                             status="complete")
    # forged, tampered, stale or unsigned: refused, and nothing changes
    tampered = completed.replace('"amount_total": 3600', '"amount_total": 1')
    assert tampered != completed
    before = await table_counts(site.db)
    for payload, signature in [
        (completed, stripe_signature(completed, secret="whsec_someone_else")),
        (tampered, stripe_signature(completed)),
        (completed, stripe_signature(completed, timestamp=1_000_000_000)),
        (completed, "t=1,v1=00"),
        (completed, False),
        ("not json", stripe_signature("not json", STRIPE_WEBHOOK_SECRET)),
    ]:
        response = await deliver(site, payload, signature)
        assert response.status_code == 400, signature
    assert await table_counts(site.db) == before
    assert (await queries.order(site.db, order["id"]))["status"] == "pending"

    response = await deliver(site, completed)
    assert response.status_code == 200 and response.json() == {"ok": True}
    paid = await queries.order(site.db, order["id"])
    assert paid["status"] == "paid" and paid["paid_at"]
    # Stripe delivers at least once: the same event again changes nothing
    response = await deliver(site, completed)
    assert response.status_code == 200 and response.json()["duplicate"] is True
    # nor does another event for the same session
    again = stripe_event("checkout.session.completed", session, payment_status="paid")
    assert (await deliver(site, again)).status_code == 200
    # nor an expiry that comes late
    late = stripe_event("checkout.session.expired", session, status="expired")
    assert (await deliver(site, late)).status_code == 200
    assert await queries.order(site.db, order["id"]) == paid
    assert await stock(site.db, mug["id"]) == 8
    events = await site.db.fetch_val(sa.select(sa.func.count()).select_from(webhook_events))
    assert events == 3

    page = await browser.get("/orders")
    assert '<span class="status paid">paid</span>' in page.text
    # Stripe's test keys (sk_test_…) take no real money either: a test order
    assert paid["test_mode"]
    sales = await (await site.browser(host)).get("/studio/sales")
    assert "Test orders (no real money, not counted above): $36.00" in sales.text


async def test_stripe_unpaid_completion_and_expiry_release_stock(stripe_buy, stripe_api) -> None:
    buy = await stripe_buy(stock=5, quantity=3)
    site, mug, session, order = buy.site, buy.mug, buy.session, buy.order
    assert await stock(site.db, mug["id"]) == 2
    # completed but not paid (a delayed payment method): still pending
    pending = stripe_event("checkout.session.completed", session, payment_status="unpaid")
    assert (await deliver(site, pending)).status_code == 200
    assert (await queries.order(site.db, order["id"]))["status"] == "pending"

    expired = stripe_event("checkout.session.expired", session, status="expired")
    assert (await deliver(site, expired)).status_code == 200
    assert (await queries.order(site.db, order["id"]))["status"] == "expired"
    assert await stock(site.db, mug["id"]) == 5
    assert (await deliver(site, expired)).status_code == 200  # replayed: released once
    other = stripe_event("checkout.session.expired", session, status="expired")
    assert (await deliver(site, other)).status_code == 200
    assert await stock(site.db, mug["id"]) == 5
    # (a payment that arrives after expiry: see test_a_payment_after_cancelling_*)

    unknown = stripe_event("checkout.session.completed", {"id": "cs_test_unknown"},
                           payment_status="paid")
    response = await deliver(site, unknown)
    assert response.status_code == 200 and response.json()["ignored"] is True


async def test_a_webhook_that_fails_midway_is_applied_on_stripes_retry(stripe_buy, stripe_api,
                                                                        monkeypatch) -> None:
    buy = await stripe_buy(stock=5, quantity=1)
    site, session, order = buy.site, buy.session, buy.order
    completed = stripe_event("checkout.session.completed", session, payment_status="paid")

    async def database_hiccup(app, order_id):
        raise ConnectionError("lost the database for a moment")

    with monkeypatch.context() as patch:
        patch.setattr(payments, "fulfil", database_hiccup)
        transport = httpx.ASGITransport(app=site.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            response = await http.post("/webhooks/stripe", content=completed, headers={
                "Stripe-Signature": stripe_signature(completed)})
        assert response.status_code == 500  # Stripe retries
    assert (await queries.order(site.db, order["id"]))["status"] == "pending"
    response = await deliver(site, completed)  # the retry is no duplicate
    assert response.status_code == 200 and response.json() == {"ok": True}
    assert (await queries.order(site.db, order["id"]))["status"] == "paid"


async def test_stripe_refusal_cancels_the_order(stripe_site, stripe_api) -> None:
    site = stripe_site
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=5)
    shopper = await site.user("Sue")
    browser = await site.browser(shopper)
    await add_to_cart(browser, mug["id"], 1)
    stripe_api.fail_next = True
    response = await browser.post("/checkout")
    assert response.status_code == 502
    assert error_texts(response.text) == ["The payment service is not available right now."]
    [order] = await queries.user_orders(site.db, shopper["id"])
    assert order["status"] == "cancelled" and order["payment_ref"] is None
    assert await stock(site.db, mug["id"]) == 5


async def test_one_order_never_makes_two_stripe_sessions(stripe_site, stripe_api) -> None:
    site = stripe_site
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=5)
    shopper = await site.user("Sue")
    await queries.set_cart_quantity(site.db, shopper["id"], mug["id"], 1)
    order = await queries.create_order_from_cart(site.db, shopper["id"], "stripe")
    gateway = site.app.state.payments
    first = await gateway.create_checkout(order, site.settings.public_url)
    second = await gateway.create_checkout(order, site.settings.public_url)
    assert first == second and first[0].startswith("cs_test_")


async def test_webhook_without_stripe_configured_is_not_found(site) -> None:
    payload = json.dumps({"id": "evt_1", "type": "checkout.session.completed",
                          "data": {"object": {"id": "cs_test_1"}}})
    response = await deliver(site, payload)
    assert response.status_code == 404
    assert await site.db.fetch_val(sa.select(sa.func.count()).select_from(webhook_events)) == 0


async def test_sessions_are_per_shopper_even_when_made_at_once(site) -> None:
    # sanity for the helpers the concurrency tests rely on: one session per browser
    a, b = await make_user(site.db, "A"), await make_user(site.db, "B")
    tokens = await asyncio.gather(start_session(site.db, a), start_session(site.db, b))
    assert len(set(tokens)) == 2


async def test_webhook_that_beats_the_stored_session_id_still_pays(stripe_buy,
                                                                  stripe_api) -> None:
    """Stripe can deliver checkout.session.completed before we stored the session id; the
    order named by client_reference_id is adopted (once) and paid."""
    buy = await stripe_buy(stock=5, quantity=1, shopper="Early")
    site, session, order = buy.site, buy.session, buy.order
    await queries.set_payment_ref(site.db, order["id"], None)  # as if the webhook came first
    response = await deliver(site, stripe_event(
        "checkout.session.completed", session, payment_status="paid",
        client_reference_id=str(order["id"])))
    assert response.status_code == 200
    paid = await queries.order(site.db, order["id"])
    assert paid["status"] == "paid" and paid["payment_ref"] == session["id"]
    # another session cannot claim an order that has its own
    response = await deliver(site, stripe_event(
        "checkout.session.completed", {**session, "id": "cs_test_other"}, payment_status="paid",
        client_reference_id=str(order["id"])))
    assert response.json().get("ignored") is True


# -- cancel, then pay: the payment is never lost (hardening item 1) -------------------------------


def refunds_of(stripe_api, session: dict) -> list[dict]:
    """Refunds of this session's payment (the stand-in serves the whole test session)."""
    intent = stripe_api.sessions[session["id"]]["payment_intent"]
    return [r for r in stripe_api.refunds if intent and r["payment_intent"] == intent]


async def cancel(browser, order_id: int):
    await browser.get(f"/checkout/cancel?order={order_id}")
    return await browser.post(f"/checkout/{order_id}/cancel")


async def test_stripe_sessions_expire_after_the_checkout_minutes(stripe_buy, stripe_api) -> None:
    buy = await stripe_buy(stock=5, quantity=1)
    site, session, order = buy.site, buy.session, buy.order
    # not Stripe's default of 24 hours: the settings' minutes (30, Stripe's minimum) + slack
    assert site.settings.checkout_minutes == 30
    assert session["expires_at"] == int(order["created_at"] + 30 * 60) + payments.SESSION_SLACK


async def test_cancelling_expires_the_stripe_session_before_releasing_stock(stripe_buy,
                                                                            stripe_api) -> None:
    buy = await stripe_buy(stock=5, quantity=2)
    site, mug, browser, session, order = buy.site, buy.mug, buy.browser, buy.session, buy.order
    response = await cancel(browser, order["id"])
    assert response.status_code == 303 and response.headers["location"] == "/orders"
    assert stripe_api.sessions[session["id"]]["status"] == "expired"  # no longer payable
    assert (await queries.order(site.db, order["id"]))["status"] == "cancelled"
    assert await stock(site.db, mug["id"]) == 5


async def test_cancelling_a_session_the_buyer_already_paid_keeps_the_stock(stripe_buy,
                                                                           stripe_api) -> None:
    buy = await stripe_buy(stock=5, quantity=2)
    site, mug, browser, session, order = buy.site, buy.mug, buy.browser, buy.session, buy.order
    stripe_api.pay(session["id"])  # paid in another tab; the webhook is still on its way
    response = await cancel(browser, order["id"])
    assert response.headers["location"] == "/orders?cancel=paying"
    assert "its payment had already gone through" in (await browser.get("/orders?cancel=paying")).text
    assert (await queries.order(site.db, order["id"]))["status"] == "pending"
    assert await stock(site.db, mug["id"]) == 3  # still reserved for the payment that is coming
    completed = stripe_event("checkout.session.completed", stripe_api.sessions[session["id"]])
    assert (await deliver(site, completed)).json() == {"ok": True}
    assert (await queries.order(site.db, order["id"]))["status"] == "paid"
    assert await stock(site.db, mug["id"]) == 3 and refunds_of(stripe_api, session) == []


async def test_cancelling_while_stripe_does_not_answer_changes_nothing(stripe_buy,
                                                                       stripe_api) -> None:
    buy = await stripe_buy(stock=5, quantity=2)
    site, mug, browser, session, order = buy.site, buy.mug, buy.browser, buy.session, buy.order
    stripe_api.expire_fails = True
    try:
        response = await cancel(browser, order["id"])
    finally:
        stripe_api.expire_fails = False
    assert response.headers["location"] == "/orders?cancel=failed"
    assert (await queries.order(site.db, order["id"]))["status"] == "pending"
    assert await stock(site.db, mug["id"]) == 3
    assert stripe_api.sessions[session["id"]]["status"] == "open"
    response = await cancel(browser, order["id"])  # Stripe is back: the retry cancels
    assert response.headers["location"] == "/orders"
    assert await stock(site.db, mug["id"]) == 5


async def test_a_payment_after_cancelling_reserves_the_stock_again(stripe_buy, stripe_api,
                                                                   caplog) -> None:
    buy = await stripe_buy(stock=5, quantity=3)
    site, mug, browser, session, order = buy.site, buy.mug, buy.browser, buy.session, buy.order
    # the order expired on our side (e.g. Stripe's expiry event) while the buyer was paying
    assert await payments.release(app_state(site.app), order["id"], "expired")
    assert await stock(site.db, mug["id"]) == 5
    paid = stripe_api.pay(session["id"])
    with caplog.at_level("ERROR", logger="watchbuy.site.payments"):
        response = await deliver(site, stripe_event("checkout.session.completed", paid))
    assert response.status_code == 200 and response.json()["late_payment"] == "paid"
    order = await queries.order(site.db, order["id"])
    assert order["status"] == "paid" and "stock reserved again" in order["status_note"]
    assert await stock(site.db, mug["id"]) == 2 and refunds_of(stripe_api, session) == []
    assert any(f"order {order['id']} was expired when its payment arrived" in r.getMessage()
               for r in caplog.records if r.levelname == "ERROR")
    assert "stock reserved again" in (await browser.get("/orders")).text


async def test_a_payment_after_cancelling_when_sold_out_is_refunded(stripe_buy, stripe_api,
                                                                    caplog) -> None:
    buy = await stripe_buy(stock=3, quantity=3)
    site, host, mug, browser, session, order = \
        buy.site, buy.host, buy.mug, buy.browser, buy.session, buy.order
    assert await payments.release(app_state(site.app), order["id"], "expired")
    # the units are sold to someone else ...
    other = await site.user("Olga")
    await queries.set_cart_quantity(site.db, other["id"], mug["id"], 3)
    resold = await queries.create_order_from_cart(site.db, other["id"], "stripe")
    assert await stock(site.db, mug["id"]) == 0
    # ... and then Sue's payment arrives: refunded through Stripe, never dropped
    paid = stripe_api.pay(session["id"])
    with caplog.at_level("ERROR", logger="watchbuy.site.payments"):
        response = await deliver(site, stripe_event("checkout.session.completed", paid))
    assert response.status_code == 200 and response.json()["late_payment"] == "refunded"
    [refund] = refunds_of(stripe_api, session)
    assert refund["payment_intent"] == paid["payment_intent"] and refund["amount"] == 5400
    order = await queries.order(site.db, order["id"])
    assert order["status"] == "refunded"
    assert order["status_note"] == "refunded: sold out while you paid"
    assert await stock(site.db, mug["id"]) == 0
    assert (await queries.order(site.db, resold["id"]))["status"] == "pending"
    assert any("refunded" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    # another event for the same payment refunds nothing more
    again = stripe_event("checkout.session.async_payment_succeeded", paid)
    assert (await deliver(site, again)).status_code == 200
    assert len(refunds_of(stripe_api, session)) == 1
    page = await browser.get("/orders")
    assert '<span class="status refunded">refunded</span>' in page.text
    assert "refunded: sold out while you paid" in page.text
    sales = await (await site.browser(host)).get("/studio/sales")
    assert "refunded: sold out while you paid" in sales.text


# -- hidden products (item 2) -------------------------------------------------------------------


async def test_a_hidden_product_cannot_be_bought_by_any_path(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=10)
    shopper = await site.user("Sue")
    browser = await site.browser(shopper)
    assert (await add_to_cart(browser, mug["id"], 1)).status_code == 303
    await queries.update_product(site.db, host["id"], mug["id"], shown=False)  # host hides it
    before = await table_counts(site.db)
    response = await browser.post("/cart/update", {"product_id": str(mug["id"]),
                                                   "quantity": "2"})
    assert response.status_code == 404
    assert error_texts(response.text) == ["That product is not for sale."]
    response = await browser.post("/checkout")
    assert response.status_code == 409
    assert error_texts(response.text) == [
        "Sorry: Mug is not for sale any more: remove it from your cart. "
        "Adjust your cart and try again."]
    assert await table_counts(site.db) == before and await stock(site.db, mug["id"]) == 10
    assert "no longer for sale" in (await browser.get("/cart")).text
    # taking it out of the cart still works
    response = await browser.post("/cart/update", {"product_id": str(mug["id"]),
                                                   "quantity": "0"})
    assert response.status_code == 303 and await queries.cart(site.db, shopper["id"]) == []


# -- stock hoarding (item 3) ----------------------------------------------------------------------


async def test_one_shopper_cannot_hoard_the_stock(site, caplog) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=250)
    hoarder = await site.user("Hoarder")
    browser = await site.browser(hoarder)
    assert site.settings.max_units_per_product == 10 and site.settings.max_pending_orders == 2
    with caplog.at_level("INFO", logger="watchbuy.site.shop"):
        response = await add_to_cart(browser, mug["id"], 11)
        assert response.status_code == 400
        assert error_texts(response.text) == ["At most 10 of Mug per shopper."]
        # hoarding: order after order, all left unpaid, each holding stock from other shoppers
        statuses = []
        for _ in range(5):
            await queries.set_cart_quantity(site.db, hoarder["id"], mug["id"], 10)  # even direct
            statuses.append((await browser.post("/checkout")).status_code)
    assert statuses == [303, 409, 409, 409, 409]
    # one log line for the shopper who hit the limits five times (rate-limited)
    limit_lines = [r for r in caplog.records if r.getMessage().startswith(
        f"shop limit for user {hoarder['id']}:")]
    assert len(limit_lines) == 1
    assert await stock(site.db, mug["id"]) == 240  # never more than 10 units held
    response = await browser.post("/checkout")
    assert "at most 10 of Mug per shopper (your unpaid orders hold 10)" in response.text
    # another product still sells, up to the pending-order cap
    bag = await site.product(host, name="Bag", stock=50)
    await queries.set_cart_quantity(site.db, hoarder["id"], mug["id"], 0)
    await queries.set_cart_quantity(site.db, hoarder["id"], bag["id"], 1)
    assert (await browser.post("/checkout")).status_code == 303
    await queries.set_cart_quantity(site.db, hoarder["id"], bag["id"], 1)
    response = await browser.post("/checkout")
    assert response.status_code == 409
    assert "you already have 2 unpaid orders" in response.text
    # an honest shopper still buys
    honest = await site.browser(await site.user("Honest"))
    assert (await add_to_cart(honest, mug["id"], 3)).status_code == 303
    assert (await honest.post("/checkout")).status_code == 303
    assert await stock(site.db, mug["id"]) == 237


async def test_a_double_clicked_checkout_makes_one_order(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=50)
    shopper = await site.user("Sue")
    browser = await site.browser(shopper)
    await add_to_cart(browser, mug["id"], 5)
    responses = await asyncio.gather(*(browser.post("/checkout") for _ in range(4)))
    assert sorted(r.status_code for r in responses) == [303, 400, 400, 400]
    assert len(await queries.user_orders(site.db, shopper["id"])) == 1
    assert await stock(site.db, mug["id"]) == 45


async def test_test_reservations_are_short() -> None:
    from watchbuy.site.config import SiteSettings

    assert SiteSettings().test_reservation_minutes == 10


# -- test mode fails closed, test orders are no revenue (item 4) ---------------------------------


def run_site_cli(monkeypatch, tmp_path, capsys, **env: str) -> tuple[int, str]:
    import os

    from watchbuy.cli import main

    for name in list(os.environ):
        if name.startswith("WATCHBUY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WATCHBUY_ENV_FILE", os.devnull)
    monkeypatch.setenv("WATCHBUY_DATA_DIR", str(tmp_path / "data"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["site"])
    return code, capsys.readouterr().err


def test_test_mode_refuses_to_start_on_a_public_https_site(monkeypatch, tmp_path,
                                                           capsys) -> None:
    code, err = run_site_cli(monkeypatch, tmp_path, capsys,
                             WATCHBUY_PUBLIC_URL="https://shop.example.com")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("watchbuy: configuration error: WATCHBUY_STRIPE_SECRET_KEY is not "
                          "set on a public https site")
    assert "WATCHBUY_TEST_PAYMENTS=1" in err


def test_test_mode_on_https_only_when_asked_for() -> None:
    from watchbuy.settings import ConfigError
    from watchbuy.site.config import SiteSettings

    SiteSettings(public_url="https://shop.example.com", test_payments=True).validate()
    SiteSettings(public_url="https://shop.example.com", stripe_secret_key="sk_live_x",
                 stripe_webhook_secret="whsec_x").validate()
    SiteSettings(public_url="http://127.0.0.1:8080").validate()  # a developer's machine
    with pytest.raises(ConfigError, match="WATCHBUY_TEST_PAYMENTS=1"):
        SiteSettings(public_url="HTTPS://shop.example.com").validate()
    for bad in ({"checkout_minutes": 10}, {"checkout_minutes": 1440},
                {"max_pending_orders": 0}, {"max_units_per_product": 0},
                {"max_image_pixels": 0}):
        with pytest.raises(ConfigError):
            SiteSettings(**bad).validate()
    assert SiteSettings(stripe_secret_key="sk_live_x").test_orders is False
    assert SiteSettings(stripe_secret_key="sk_test_x").test_orders is True
    assert SiteSettings().test_orders is True


async def test_test_orders_are_not_revenue_on_the_dashboard_and_sales(site) -> None:
    from app_helpers import password_hash

    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=10)
    shopper = await site.user("Sue")
    made = []
    for test_mode in (False, True, True):
        await queries.set_cart_quantity(site.db, shopper["id"], mug["id"], 1)
        order = await queries.create_order_from_cart(site.db, shopper["id"], "stripe",
                                                     test_mode=test_mode)
        assert await queries.mark_paid(site.db, order["id"])
        made.append(order)
    admin_id = await queries.create_user(site.db, "ops@example.test", "Ops", password_hash(),
                                         False, is_admin=True)
    ops = await site.browser({"id": admin_id})
    data = (await ops.get("/dashboard/data")).json()
    assert data["orders"] == {"paid": 1} and data["test_orders"] == {"paid": 2}
    assert data["revenue"] == ["$18.00"]
    page = await ops.get("/dashboard")
    assert 'id="revenue">$18.00<' in page.text and 'id="test-orders-paid">2<' in page.text
    sales = await (await site.browser(host)).get("/studio/sales")
    assert "Paid so far: <strong>$18.00</strong>" in sales.text
    assert "Test orders (no real money, not counted above): $36.00" in sales.text
    orders_page = await (await site.browser(shopper)).get("/orders")
    assert orders_page.text.count("test order, no real payment") == 2


# -- POST, and only POST, changes things (item 8) -------------------------------------------------


async def test_head_requests_never_pay_or_save(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=10)
    shopper = await site.user("Sue")
    browser = await site.browser(shopper)
    await add_to_cart(browser, mug["id"], 1)
    order_id = int((await browser.post("/checkout")).headers["location"].split("/")[2])
    await browser.get(f"/checkout/{order_id}/pay")
    form = {"csrf_token": browser.csrf, "card": "4242 4242 4242 4242", "expiry": "12/99",
            "cvc": "123"}
    response = await browser.http.request("HEAD", f"/checkout/{order_id}/pay", data=form)
    assert response.status_code in (200, 400)  # shown (or the body refused), never paid
    assert (await queries.order(site.db, order_id))["status"] == "pending"

    studio = await site.browser(host)
    await studio.get("/studio/products/new")
    before = await table_counts(site.db)
    response = await studio.http.request("HEAD", "/studio/products/new", data={
        "csrf_token": studio.csrf, "name": "Sneaky", "price": "5", "stock": "1"})
    assert response.status_code in (200, 400)
    assert await table_counts(site.db) == before
