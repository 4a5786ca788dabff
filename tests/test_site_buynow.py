"""Buy now (one tap): test mode with the saved test card, the address rules, Stripe with a
saved card (the local stand-in), the thank-you page, "sold"/"bought" room events, and the
host's Mark shipped seen on the shopper's /orders."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets

import pytest
import sqlalchemy as sa
from app_helpers import SAMPLE_ADDRESS, table_counts
from shop_helpers import CARD, buy, next_events
from stripe_standin import stripe_event, stripe_settings

from watchbuy.db import queries, shopping
from watchbuy.db.schema import order_items, orders, products, users
from watchbuy.site import payments
from watchbuy.site.chat import room_topic

pytest_plugins = ["site_fixtures"]
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

NEW_ADDRESS = {"name": "Ann Lee", "line1": "9 Elm Row", "city": "Leeds", "postal_code": "LS1 4AP",
               "country": "GB"}


async def product_row(db, product_id: int) -> dict:
    return dict((await db.fetch_one(products.select().where(products.c.id == product_id)))
                ._mapping)


async def test_buy_now_in_test_mode_keeps_the_card_and_needs_an_address(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=5)
    shopper = await site.user("Ann Lee", address=False)
    browser = await site.browser(shopper)
    await browser.get("/")
    before = await table_counts(site.db)
    # a physical product without an address: refused, with the field to fix
    response = await buy(browser, mug["id"], **CARD)
    assert response.status_code == 400
    assert response.json() == {"error": "Add a shipping address: this product is shipped.",
                               "field": "address"}
    # a bad address field, or a bad card: the field named, nothing saved or reserved
    response = await buy(browser, mug["id"], **CARD, **{**NEW_ADDRESS, "country": "UK"})
    assert response.status_code == 400 and response.json()["field"] == "country"
    response = await buy(browser, mug["id"], **NEW_ADDRESS, **{**CARD, "card": "4000 0000"})
    assert response.status_code == 400 and response.json() == {
        "error": "Test mode accepts only the test card 4242 4242 4242 4242.", "field": "card"}
    response = await buy(browser, mug["id"], **NEW_ADDRESS, **{**CARD, "cvc": "x"})
    assert response.json()["field"] == "cvc"
    assert await table_counts(site.db) == before

    # the first purchase: address and card typed in the sheet
    response = await buy(browser, mug["id"], **NEW_ADDRESS, **CARD)
    assert response.status_code == 200, response.text
    body = response.json()
    order_id = body["order"]["id"]
    address = {**NEW_ADDRESS, "line2": "", "region": ""}
    assert body == {"ok": True, "thank_you_url": f"/orders/{order_id}/thanks", "order": {
        "id": order_id, "total": "$18.00", "total_minor": 1800, "currency": "usd",
        "items": [{"product_id": mug["id"], "name": "Mug", "quantity": 1,
                   "unit_price": "$18.00", "flash_sale_id": None}],
        "address": address}}
    order = await queries.order(site.db, order_id)
    assert order["status"] == "paid" and order["ship_city"] == "Leeds"
    row = await product_row(site.db, mug["id"])
    assert (row["stock"], row["sold"]) == (4, 1)
    # the address went into the book; only the card's brand and last four were kept
    book = await shopping.user_addresses(site.db, shopper["id"])
    assert [(a["city"], bool(a["is_default"])) for a in book] == [("Leeds", True)]
    user = dict((await site.db.fetch_one(users.select().where(users.c.id == shopper["id"])))
                ._mapping)
    assert (user["saved_card_brand"], user["saved_card_last4"]) == ("visa", "4242")
    assert "4242424242424242" not in json.dumps(user, default=str)
    # the thank-you page: the owner's only
    page = await browser.get(body["thank_you_url"])
    assert page.status_code == 200 and "Thank you!" in page.text
    assert "1 × Mug — $18.00" in page.text and "9 Elm Row" in page.text
    assert "Host will ship it" in page.text
    stranger = await site.browser(await site.user("Eve"))
    assert (await stranger.get(body["thank_you_url"])).status_code == 404

    # the second purchase: one tap, no card, no address (the saved ones)
    response = await buy(browser, mug["id"])
    assert response.status_code == 200, response.text
    second = await queries.order(site.db, response.json()["order"]["id"])
    assert second["status"] == "paid" and second["ship_line1"] == "9 Elm Row"
    # a chosen address of someone else's book is refused
    response = await buy(browser, mug["id"], address_id=str(
        (await site.user("Bob"))["address"]["id"]))
    assert response.status_code == 400 and response.json()["field"] == "address_id"


async def test_buy_now_refusals(site) -> None:
    host = await site.user("Host", host=True)
    gone = await site.product(host, name="Gone", stock=0)
    hidden = await site.product(host, name="Hidden", stock=3)
    await queries.update_product(site.db, host["id"], hidden["id"], shown=False)
    ebook = await site.product(host, name="E-book", price_minor=500, stock=3)
    await site.db.execute(products.update().where(products.c.id == ebook["id"])
                          .values(physical=False))
    shopper = await site.user("Ann", address=False)
    browser = await site.browser(shopper)
    response = await buy(browser, gone["id"], **CARD)
    assert response.status_code == 409 and response.json() == {
        "error": "Sorry, Gone is sold out.", "field": "product_id"}
    response = await buy(browser, hidden["id"], **CARD)
    assert response.status_code == 404 and response.json()["field"] == "product_id"
    response = await buy(browser, "abc", **CARD)
    assert response.status_code == 400 and response.json()["field"] == "product_id"
    # nothing to ship: no address needed, none copied
    response = await buy(browser, ebook["id"], **CARD)
    assert response.status_code == 200, response.text
    order = await queries.order(site.db, response.json()["order"]["id"])
    assert order["status"] == "paid" and order["ship_line1"] is None


async def test_buy_now_sells_exactly_the_stock_under_concurrency(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=5)
    shoppers = [await site.user(f"Shopper {i}") for i in range(12)]
    for shopper in shoppers:
        await shopping.save_card(site.db, shopper["id"], "visa", "4242")
    browsers = [await site.browser(s) for s in shoppers]
    await asyncio.gather(*(b.get("/") for b in browsers))
    responses = await asyncio.gather(*(buy(b, mug["id"]) for b in browsers))
    assert sorted(r.status_code for r in responses) == [200] * 5 + [409] * 7
    row = await product_row(site.db, mug["id"])
    assert (row["stock"], row["sold"]) == (0, 5)


async def test_one_press_makes_one_order_however_often_it_is_sent(site) -> None:
    """The buy sheet's key for a press goes on the order: the same press sent twice at once
    makes one order (both answered with it); sent again with ``retry`` after its order took
    the last unit (the answer was lost) it gets that order, not "sold out"; a malformed key is
    refused with nothing ordered."""
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Last mug", stock=2)
    shopper = await site.user("Rita Retry")
    await shopping.save_card(site.db, shopper["id"], "visa", "4242")
    browser = await site.browser(shopper)
    key = secrets.token_urlsafe(16)
    twice = await asyncio.gather(*(buy(browser, mug["id"], request_key=key) for _ in range(2)))
    assert [r.status_code for r in twice] == [200, 200], [r.text for r in twice]
    assert {r.json()["order"]["id"] for r in twice} == {twice[0].json()["order"]["id"]}
    assert (await product_row(site.db, mug["id"]))["stock"] == 1
    # another press (a new key) takes the last unit; its answer is "lost" and it is sent again
    last_key = secrets.token_urlsafe(16)
    last = await buy(browser, mug["id"], request_key=last_key)
    assert last.status_code == 200, last.text
    again = await buy(browser, mug["id"], request_key=last_key, retry=True)
    assert again.status_code == 200 and again.json()["order"] == last.json()["order"], again.text
    assert again.json()["thank_you_url"] == f"/orders/{last.json()['order']['id']}/thanks"
    # a new press is told sold out; a retry of a press that made nothing goes on as a press
    fresh = await buy(browser, mug["id"], request_key=secrets.token_urlsafe(16), retry=True)
    assert fresh.status_code == 409 and fresh.json()["field"] == "product_id", fresh.text
    before = await table_counts(site.db)
    bad = await buy(browser, mug["id"], request_key="no spaces allowed")
    assert bad.status_code == 400 and "reload" in bad.json()["error"], bad.text
    assert await table_counts(site.db) == before
    owned = await site.db.fetch_val(sa.select(sa.func.count()).select_from(orders)
                                    .where(orders.c.user_id == shopper["id"]))
    assert owned == 2
    # another shopper's press with the same key is theirs alone
    other = await site.user("Otto Other")
    await shopping.save_card(site.db, other["id"], "visa", "4242")
    cup = await site.product(host, name="Cup", stock=1)
    theirs = await buy(await site.browser(other), cup["id"], request_key=key, retry=True)
    assert theirs.status_code == 200, theirs.text
    assert theirs.json()["order"]["id"] not in {r.json()["order"]["id"] for r in twice}


async def test_the_same_press_sent_twice_at_once_is_answered_with_its_one_order(site) -> None:
    """Whatever refuses the second send of a press sent twice at once because the first made
    its order (the last unit gone, the sale's per-shopper limit reached, the sale's last unit
    gone so the price changed), it is answered with that order, never a refusal."""
    host = await site.user("Host", host=True)
    shopper = await site.user("Rita Twin")
    await shopping.save_card(site.db, shopper["id"], "visa", "4242")
    browser = await site.browser(shopper)
    last = await site.product(host, name="Last mug", stock=1)
    limited = await site.product(host, name="Drop mug", price_minor=1000, stock=10)
    await shopping.start_sale(site.db, host["id"], host["channel"]["id"], limited["id"], 500, 5,
                              1, 600)
    one_left = await site.product(host, name="Sale cap", price_minor=1000, stock=10)
    await shopping.start_sale(site.db, host["id"], host["channel"]["id"], one_left["id"], 500,
                              1, None, 600)
    made = []
    for product, fields in ((last, {}), (limited, {"expected_price_minor": 500}),
                            (one_left, {"expected_price_minor": 500})):
        key = secrets.token_urlsafe(16)
        twice = await asyncio.gather(*(buy(browser, product["id"], request_key=key, **fields)
                                       for _ in range(2)))
        assert [r.status_code for r in twice] == [200, 200], \
            (product["name"], [r.text for r in twice])
        assert twice[0].json() == twice[1].json()
        made.append(twice[0].json()["order"]["id"])
    owned = await site.db.fetch_all(sa.select(orders.c.id, orders.c.status)
                                    .where(orders.c.user_id == shopper["id"])
                                    .order_by(orders.c.id))
    assert [(row[0], row[1]) for row in owned] == [(order_id, "paid") for order_id in made]
    assert [(await product_row(site.db, p["id"]))["stock"] for p in (last, limited, one_left)] \
        == [0, 9, 9]


# triggers that make the database refuse keeping a card and ending a flash sale (a real
# failure of the steps after an order's commit): (MariaDB's, SQLite's)
CARD_AND_SALE_END_REFUSED = {
    "no_card": (
        "CREATE TRIGGER no_card BEFORE UPDATE ON users FOR EACH ROW BEGIN "
        "IF NOT (NEW.saved_card_last4 <=> OLD.saved_card_last4) THEN "
        "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'cards refused'; END IF; END",
        "CREATE TRIGGER no_card BEFORE UPDATE OF saved_card_last4 ON users "
        "WHEN NEW.saved_card_last4 IS NOT OLD.saved_card_last4 "
        "BEGIN SELECT RAISE(ABORT, 'cards refused'); END"),
    "no_sale_end": (
        "CREATE TRIGGER no_sale_end BEFORE UPDATE ON flash_sales FOR EACH ROW BEGIN "
        "IF NEW.ended_at IS NOT NULL AND OLD.ended_at IS NULL THEN "
        "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'sale ends refused'; END IF; END",
        "CREATE TRIGGER no_sale_end BEFORE UPDATE OF ended_at ON flash_sales "
        "WHEN NEW.ended_at IS NOT NULL AND OLD.ended_at IS NULL "
        "BEGIN SELECT RAISE(ABORT, 'sale ends refused'); END"),
}


@contextlib.asynccontextmanager
async def refusing(db, triggers: dict[str, tuple[str, str]]):
    """The triggers installed for the block (the MariaDB database outlives the test)."""
    try:
        for mariadb, sqlite in triggers.values():
            await db.execute(mariadb if db.dialect_name == "mysql" else sqlite)
        yield
    finally:
        for name in triggers:
            await db.execute(f"DROP TRIGGER IF EXISTS {name}")


async def test_a_paid_order_is_answered_paid_when_the_steps_after_it_fail(site, caplog) -> None:
    """After the test-mode order commits (paid), ending the flash sale it sold out and keeping
    the first test card are extras: when they fail (here: the database refuses them, through
    triggers) the shopper is still told the order is paid, and the failure is logged."""
    host = await site.user("Host", host=True)
    shopper = await site.user("Ann First", address=False)
    browser = await site.browser(shopper)
    await browser.get("/")
    mug = await site.product(host, name="Mug", price_minor=1800, stock=5)
    cap = await site.product(host, name="Cap", price_minor=1000, stock=5)
    sale_id = await shopping.start_sale(site.db, host["id"], host["channel"]["id"], cap["id"],
                                        500, 1, None, 600)
    async with refusing(site.db, CARD_AND_SALE_END_REFUSED):
        # the first purchase: the card is typed, and keeping it fails
        response = await buy(browser, mug["id"], **NEW_ADDRESS, **CARD, request_key="press-one")
        assert response.status_code == 200 and response.json()["ok"] is True, response.text
        first = await queries.order(site.db, response.json()["order"]["id"])
        assert first["status"] == "paid"
        assert (await shopping.payment_profile(site.db, shopper["id"]))["saved_card_last4"] is None
        # the sale's only unit: ending the sale it sold out fails
        response = await buy(browser, cap["id"], **CARD, expected_price_minor=500)
        assert response.status_code == 200 and response.json()["ok"] is True, response.text
        second = await queries.order(site.db, response.json()["order"]["id"])
        assert second["status"] == "paid" and second["total_minor"] == 500
        assert (await shopping.sale(site.db, sale_id))["ended_at"] is None  # it did fail
        failures = [r.getMessage() for r in caplog.records if r.name == "watchbuy.site.buynow"
                    and "failed after the order was made" in r.getMessage()]
        assert failures == [
            f"order {first['id']}: keeping the test card failed after the order was made",
            f"order {second['id']}: ending the sales it sold out failed after the order was made",
            f"order {second['id']}: keeping the test card failed after the order was made"]
        # the press sent again is answered from the paid order too
        again = await buy(browser, mug["id"], request_key="press-one", retry=True)
        assert again.status_code == 200 and again.json()["order"]["id"] == first["id"]


async def test_cart_checkout_copies_the_address_and_needs_one(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=5)
    nobody = await site.browser(await site.user("Ann", address=False))
    await nobody.fetch("/cart/add", {"product_id": str(mug["id"]), "quantity": "1"})
    response = await nobody.post("/checkout")
    assert response.status_code == 400
    assert "Mug is shipped: add a shipping address: it is copied onto the order." in \
        response.text
    assert (await product_row(site.db, mug["id"]))["stock"] == 5
    shopper = await site.user("Bob")
    second = await shopping.add_address(site.db, shopper["id"],
                                        {**SAMPLE_ADDRESS, "city": "Shelbyville"}, False)
    browser = await site.browser(shopper)
    await browser.fetch("/cart/add", {"product_id": str(mug["id"]), "quantity": "2"})
    page = await browser.get("/cart")
    assert 'name="address_id"' in page.text and "Shelbyville" in page.text
    response = await browser.post("/checkout", {"address_id": str(second["id"])})
    assert response.status_code == 303
    order_id = int(response.headers["location"].split("/")[2])
    order = await queries.order(site.db, order_id)
    assert order["ship_city"] == "Shelbyville" and order["ship_country"] == "US"
    row = await product_row(site.db, mug["id"])
    assert (row["stock"], row["sold"]) == (3, 2)
    # an unpaid order that expires gives its units back, and "sold" with them
    await queries.release_order(site.db, order_id, "expired")
    row = await product_row(site.db, mug["id"])
    assert (row["stock"], row["sold"]) == (5, 0)


async def test_rooms_hear_sold_and_who_bought_unless_they_opted_out(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=12)
    ann = await site.user("Ann Lee")
    await shopping.save_card(site.db, ann["id"], "visa", "4242")
    browser = await site.browser(ann)
    subscription = site.app.state.broker.subscribe(room_topic(host["channel"]["id"]))
    await subscription.ready()
    try:
        # the room's cards carry "sold" and "Only N left" (threshold 10)
        card = (await browser.get(f"/api/rooms/{host['channel']['slug']}")).json()["products"][0]
        assert (card["sold"], card["low_stock"], card["stock"]) == (0, False, 12)
        assert (await buy(browser, mug["id"])).status_code == 200
        events = await next_events(subscription, {"bought", "stock"})
        assert events["bought"] == {"type": "bought", "first_name": "Ann",
                                    "product_id": mug["id"], "product_name": "Mug",
                                    "coalesce": "bought"}
        assert (events["stock"]["stock"], events["stock"]["sold"]) == (11, 1)
        card = (await browser.get(f"/api/rooms/{host['channel']['slug']}")).json()["products"][0]
        assert (card["sold"], card["low_stock"]) == (1, False)

        await browser.get("/account")
        await browser.post("/account", {})  # opts out of the announcement
        assert (await buy(browser, mug["id"])).status_code == 200
        events = await next_events(subscription, {"stock"}, also={"bought"})
        assert "bought" not in events  # the stock event came; no announcement before it
        assert (events["stock"]["stock"], events["stock"]["sold"]) == (10, 2)
        card = (await browser.get(f"/api/rooms/{host['channel']['slug']}")).json()["products"][0]
        assert card["low_stock"] is True
    finally:
        await subscription.close()


async def test_host_marks_shipped_and_the_shopper_sees_it(site) -> None:
    host = await site.user("Host", host=True)
    other_host = await site.user("Other", host=True)
    mug = await site.product(host, name="Mug", stock=5)
    shopper = await site.user("Ann")
    await shopping.save_card(site.db, shopper["id"], "visa", "4242")
    browser = await site.browser(shopper)
    order_id = (await buy(browser, mug["id"])).json()["order"]["id"]
    hosts = await site.browser(host)
    sales = await hosts.get("/studio/sales")
    assert "1 Market Street" in sales.text and "Springfield" in sales.text
    assert f'action="/studio/orders/{order_id}/ship"' in sales.text
    orders_page = await browser.get("/orders")
    assert '<span class="status paid">paid</span>' in orders_page.text
    assert "from Host" in orders_page.text and "waiting to be shipped" in orders_page.text
    # another host cannot ship it
    others = await site.browser(other_host)
    await others.get("/studio")
    assert (await others.post(f"/studio/orders/{order_id}/ship", {})).status_code == 409
    too_long = await hosts.post(f"/studio/orders/{order_id}/ship", {"carrier": "x" * 61})
    assert too_long.status_code == 400
    response = await hosts.post(f"/studio/orders/{order_id}/ship",
                                {"carrier": "DHL", "tracking_number": "JD0146 0000 1"})
    assert response.status_code == 303
    assert response.headers["location"] == f"/studio/sales?notice=shipped#order-{order_id}"
    # once only
    assert (await hosts.post(f"/studio/orders/{order_id}/ship", {})).status_code == 409
    orders_page = await browser.get("/orders")
    assert '<span class="status shipped">shipped</span>' in orders_page.text
    assert "with DHL, tracking number <strong>JD0146 0000 1</strong>" in orders_page.text
    sales = await hosts.get("/studio/sales")
    assert "Mark shipped" not in sales.text and "DHL · JD0146 0000 1" in sales.text


async def test_each_seller_ships_their_own_lines_of_a_two_seller_order(site) -> None:
    """A seller marks only their own lines shipped; the order is shipped once every seller
    has; each seller's Sales and the shopper's /orders show each seller's state."""
    host = await site.user("Host", host=True)
    other = await site.user("Other", host=True)
    mug = await site.product(host, name="Mug", stock=5)
    cap = await site.product(other, name="Cap", stock=5)
    shopper = await site.user("Ann")
    browser = await site.browser(shopper)
    hosts, others = await site.browser(host), await site.browser(other)
    orders_made = []
    for _ in range(2):
        for product in (mug, cap):
            await queries.set_cart_quantity(site.db, shopper["id"], product["id"], 1)
        order = await queries.create_order_from_cart(site.db, shopper["id"], "test",
                                                     needs_address=True)
        assert await queries.mark_paid(site.db, order["id"])
        orders_made.append(order["id"])
    first, second = orders_made
    response = await hosts.post(f"/studio/orders/{first}/ship",
                                {"carrier": "DHL", "tracking_number": "JD1"})
    assert response.status_code == 303
    assert (await hosts.post(f"/studio/orders/{first}/ship", {})).status_code == 409  # once
    order = await queries.order(site.db, first)
    assert order["shipped_at"] is None  # Other has not shipped the cap
    lines = {item["name"]: item for item in order["items"]}
    assert (lines["Mug"]["carrier"], lines["Mug"]["tracking_number"]) == ("DHL", "JD1")
    assert lines["Cap"]["shipped_at"] is None
    their_sales = await others.get("/studio/sales")
    assert "DHL" not in their_sales.text
    assert f'action="/studio/orders/{first}/ship"' in their_sales.text
    page = await browser.get("/orders")
    card = page.text.split(f'id="order-{first}"')[1].split("\n  </li>")[0]
    assert '<span class="status paid">paid</span>' in card
    assert "Host: Shipped" in card and "with DHL, tracking number <strong>JD1</strong>" in card
    assert "Other: Paid; waiting to be shipped to Springfield" in card
    response = await others.post(f"/studio/orders/{first}/ship", {"carrier": "UPS"})
    assert response.status_code == 303
    order = await queries.order(site.db, first)
    assert order["shipped_at"] is not None and order["carrier"] is None  # two carriers
    page = await browser.get("/orders")
    card = page.text.split(f'id="order-{first}"')[1].split("\n  </li>")[0]
    assert '<span class="status shipped">shipped</span>' in card
    assert "Other: Shipped" in card and "with UPS." in card
    # both sellers at once: the order ends shipped whichever commits last
    shipped = await asyncio.gather(
        shopping.mark_shipped(site.db, host["id"], second, "", ""),
        shopping.mark_shipped(site.db, other["id"], second, "", ""))
    assert shipped == [True, True]
    assert (await queries.order(site.db, second))["shipped_at"] is not None


# -- Stripe -------------------------------------------------------------------------------------


async def deliver(site, payload: str):
    from stripe_standin import stripe_signature

    return await (await site.browser()).http.post(
        "/webhooks/stripe", content=payload,
        headers={"Content-Type": "application/json", "Stripe-Signature":
                 stripe_signature(payload)})


async def stripe_shop(make_site, stripe_api, name: str = "Ann"):
    """A site paying through the Stripe stand-in, a host's $18.00 mug (5 in stock) and a
    signed-in shopper's browser: (site, mug, shopper, browser)."""
    site = await make_site(**stripe_settings(stripe_api))
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=5)
    shopper = await site.user(name)
    browser = await site.browser(shopper)
    await browser.get("/")
    return site, mug, shopper, browser


async def test_stripe_buy_now_keeps_the_card_and_pays_off_session(make_site, stripe_api) -> None:
    site, mug, shopper, browser = await stripe_shop(make_site, stripe_api)
    # first purchase: Checkout, prefilled for a new Customer, keeping the card
    response = await buy(browser, mug["id"])
    assert response.status_code == 200, response.text
    url = response.json()["redirect"]
    session = stripe_api.sessions[url.rsplit("/", 1)[1]]
    profile = await shopping.payment_profile(site.db, shopper["id"])
    assert session["customer"] == profile["stripe_customer_id"] is not None
    assert session["setup_future_usage"] == "off_session"
    order = await queries.order_by_payment_ref(site.db, session["id"])
    assert order["status"] == "pending" and order["ship_city"] == "Springfield"
    assert session["success_url"].endswith(f"/orders/{order['id']}/thanks")
    stripe_api.pay(session["id"])
    completed = stripe_event("checkout.session.completed", session)
    assert (await deliver(site, completed)).status_code == 200
    assert (await queries.order(site.db, order["id"]))["status"] == "paid"
    profile = await shopping.payment_profile(site.db, shopper["id"])
    assert (profile["saved_card_brand"], profile["saved_card_last4"]) == ("visa", "4242")
    assert profile["saved_payment_method"].startswith("pm_")

    # second purchase: the saved card pays off-session at once, no page to leave for
    response = await buy(browser, mug["id"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ok"] is True and body["thank_you_url"].endswith("/thanks")
    second = await queries.order(site.db, body["order"]["id"])
    assert second["status"] == "paid" and second["payment_ref"].startswith("pi_")
    intent_request = [r for r in stripe_api.requests if r.get("path") == "/v1/payment_intents"][-1]
    assert intent_request["form"]["off_session"] == "true"
    assert intent_request["form"]["confirm"] == "true"
    assert intent_request["form"]["customer"] == profile["stripe_customer_id"]
    assert intent_request["form"]["amount"] == "1800"
    # the customer is reused, never made twice
    assert sum(1 for c in stripe_api.customers.values()
               if c["metadata"]["user_id"] == str(shopper["id"])) == 1

    # the bank wants the buyer present: Checkout for the same Customer instead
    stripe_api.decline_saved = True
    response = await buy(browser, mug["id"])
    assert response.status_code == 200 and "redirect" in response.json()
    session = stripe_api.sessions[response.json()["redirect"].rsplit("/", 1)[1]]
    assert session["customer"] == profile["stripe_customer_id"]
    items = await site.db.fetch_val(sa.select(sa.func.count()).select_from(order_items))
    assert items == 3


async def saved_card_shopper(site, stripe_api, name: str = "Ann") -> tuple[dict, object, str]:
    """A shopper whose card Stripe keeps (a Customer with an attached PaymentMethod)."""
    shopper = await site.user(name)
    customer = f"cus_{secrets.token_hex(8)}"  # the stand-in serves every test of a session
    stripe_api.customers[customer] = {"id": customer, "object": "customer", "metadata": {}}
    method = stripe_api._card_method()
    method["customer"] = customer
    await shopping.save_card(site.db, shopper["id"], "visa", "4242", payment_method=method["id"],
                             customer_id=customer)
    browser = await site.browser(shopper)
    await browser.get("/")
    return shopper, browser, customer


async def test_a_lost_stripe_answer_never_releases_a_charge_that_may_stand(
        make_site, stripe_api) -> None:
    """Off-session charges whose answer is lost are asked again with the same idempotency key
    (one charge); with no answer at all the order keeps its stock until the intent's webhook
    says what happened."""
    site = await make_site(**stripe_settings(stripe_api))
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=5)
    shopper, browser, customer = await saved_card_shopper(site, stripe_api)
    # two answers lost, the third attempt hears the first attempt's intent: paid, charged once
    stripe_api.answers_lost = 2
    asked = len(stripe_api.requests)
    response = await buy(browser, mug["id"], expected_price_minor=1800)
    assert response.status_code == 200 and response.json()["ok"] is True, response.text
    order_id = str(response.json()["order"]["id"])
    assert [i for i in stripe_api.intents.values() if i["metadata"].get("order_id") == order_id
            and i["customer"] == customer] == [stripe_api.intents[
                (await queries.order(site.db, int(order_id)))["payment_ref"]]]
    tries = [r for r in stripe_api.requests[asked:] if r["path"] == "/v1/payment_intents"]
    assert len(tries) == 3 and len({r["headers"]["idempotency-key"] for r in tries}) == 1
    # no answer at all: 502, but the order stays pending with its unit reserved
    stripe_api.answers_lost = 3
    response = await buy(browser, mug["id"], expected_price_minor=1800)
    assert response.status_code == 502
    assert response.json()["error"] == ("The payment service did not answer: your orders "
                                        "page shows whether this payment went through.")
    pending = [o for o in await queries.user_orders(site.db, shopper["id"])
               if o["status"] == "pending"]
    assert len(pending) == 1 and pending[0]["payment_ref"] is None
    assert (await product_row(site.db, mug["id"]))["stock"] == 3
    # Stripe did charge it: its webhook finds the order by the intent's metadata
    intent = next(i for i in stripe_api.intents.values()
                  if i["metadata"].get("order_id") == str(pending[0]["id"])
                  and i["customer"] == customer)
    assert (await deliver(site, stripe_event("payment_intent.succeeded", intent))).status_code \
        == 200
    order = await queries.order(site.db, pending[0]["id"])
    assert order["status"] == "paid" and order["payment_ref"] == intent["id"]


async def test_processing_payments_settle_by_webhook_cancel_or_upkeep(make_site, stripe_api) -> None:
    site = await make_site(max_pending_orders=10, **stripe_settings(stripe_api))
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=5)
    shopper, browser, _ = await saved_card_shopper(site, stripe_api)
    stripe_api.new_intent_status = "processing"
    made = []
    try:
        for _ in range(3):
            response = await buy(browser, mug["id"], expected_price_minor=1800)
            assert response.status_code == 200 and "/thanks" in response.json()["redirect"]
            made.append(await queries.order(site.db,
                                            int(response.json()["redirect"].split("/")[2])))
    finally:
        stripe_api.new_intent_status = "succeeded"
    assert [o["status"] for o in made] == ["pending"] * 3
    first, second, third = made
    # the shopper cancels a processing payment: refused, the payment is coming
    assert await payments.cancel(site.app.state, first) == "paying"
    # its bank says no: the webhook releases the unit
    intent = stripe_api.intents[first["payment_ref"]]
    intent["status"] = "requires_payment_method"
    assert (await deliver(site, stripe_event("payment_intent.payment_failed", intent))) \
        .status_code == 200
    assert (await queries.order(site.db, first["id"]))["status"] == "expired"
    assert await payments.cancel(site.app.state, await queries.order(site.db, first["id"])) \
        == "expired"
    # no webhook came for the other two: the upkeep asks Stripe once they are stale
    stripe_api.intents[second["payment_ref"]]["status"] = "succeeded"
    stripe_api.intents[third["payment_ref"]]["status"] = "requires_payment_method"
    assert await payments.settle_stale_intent_orders(site.app.state) == 0  # not stale yet
    await site.db.execute(sa.update(orders).where(orders.c.id.in_([second["id"], third["id"]]))
                          .values(created_at=orders.c.created_at - 3600))
    assert await payments.settle_stale_intent_orders(site.app.state) == 2
    assert (await queries.order(site.db, second["id"]))["status"] == "paid"
    assert (await queries.order(site.db, third["id"]))["status"] == "expired"
    assert stripe_api.intents[third["payment_ref"]]["status"] == "canceled"
    assert (await product_row(site.db, mug["id"]))["stock"] == 4


def session_creates(stripe_api, since: int) -> list[dict]:
    """The Checkout Session creations the stand-in heard since request ``since``."""
    return [r for r in stripe_api.requests[since:] if "path" not in r]


async def test_a_checkout_press_sent_again_gets_its_checkout_not_a_waiting_page(
        make_site, stripe_api) -> None:
    """A press whose Checkout answer was lost, sent again, goes to the same Checkout Session
    (asked of Stripe again under the order's idempotency key with the same parameters), also
    when it comes while the first send is still at Stripe (the order holds no session yet);
    a pending off-session payment (a PaymentIntent) is answered with its thank-you page."""
    site, mug, shopper, browser = await stripe_shop(make_site, stripe_api)
    key = secrets.token_urlsafe(16)
    since = len(stripe_api.requests)
    first = await buy(browser, mug["id"], request_key=key)
    assert first.status_code == 200, first.text
    url = first.json()["redirect"]
    assert url.startswith("https://checkout.stripe.test/")
    again = await buy(browser, mug["id"], request_key=key, retry=True)
    assert again.status_code == 200 and again.json() == {"redirect": url}, again.text
    creates = session_creates(stripe_api, since)
    assert len(creates) == 2 and creates[0]["form"] == creates[1]["form"]
    assert creates[0]["headers"]["idempotency-key"] == creates[1]["headers"]["idempotency-key"]
    order_id = int(creates[0]["form"]["metadata[order_id]"])
    assert (await queries.order(site.db, order_id))["payment_ref"] == url.rsplit("/", 1)[1]

    # the retry comes while the first send is still at Stripe: the order has no session yet
    key = secrets.token_urlsafe(16)
    pending = await shopping.create_buy_now_order(
        site.db, shopper["id"], mug["id"], "stripe", test_mode=True, address=shopper["address"],
        max_pending=None, max_units=None, request_key=key)
    again = await buy(browser, mug["id"], request_key=key, retry=True)
    assert again.status_code == 200, again.text
    url = again.json()["redirect"]
    assert url.startswith("https://checkout.stripe.test/")
    session_id = url.rsplit("/", 1)[1]
    assert (await queries.order(site.db, pending["id"]))["payment_ref"] == session_id
    # ... and the first send's own request, when it lands, is answered with the same session
    profile = await shopping.payment_profile(site.db, shopper["id"])
    made = await site.app.state.payments.create_checkout(
        pending, site.settings.public_url, site.settings.checkout_minutes,
        customer=profile["stripe_customer_id"])
    assert made == (session_id, url)
    assert [o["status"] for o in await queries.user_orders(site.db, shopper["id"])] == \
        ["pending", "pending"]

    # a saved card: the retry of a press whose charge had not been answered asks Stripe again
    # under the same key (one charge) and the order is paid
    saver, saver_browser, customer = await saved_card_shopper(site, stripe_api, "Sam")
    key = secrets.token_urlsafe(16)
    pending = await shopping.create_buy_now_order(
        site.db, saver["id"], mug["id"], "stripe", test_mode=True, address=saver["address"],
        max_pending=None, max_units=None, request_key=key)
    again = await buy(saver_browser, mug["id"], request_key=key, retry=True)
    assert again.status_code == 200 and again.json()["ok"] is True, again.text
    paid = await queries.order(site.db, pending["id"])
    assert paid["status"] == "paid" and paid["payment_ref"].startswith("pi_")
    # an off-session payment still processing: the thank-you page, nothing asked of Stripe
    stripe_api.new_intent_status = "processing"
    try:
        key = secrets.token_urlsafe(16)
        first = await buy(saver_browser, mug["id"], request_key=key)
    finally:
        stripe_api.new_intent_status = "succeeded"
    thanks = first.json()["redirect"]
    assert thanks.endswith("/thanks"), first.text
    since = len(stripe_api.requests)
    again = await buy(saver_browser, mug["id"], request_key=key, retry=True)
    assert again.status_code == 200 and again.json() == {"redirect": thanks}
    assert stripe_api.requests[since:] == []
    assert sum(1 for i in stripe_api.intents.values() if i["customer"] == customer) == 2


async def request_keys(site, user: dict) -> list[tuple[str, bool]]:
    """The shopper's orders as (status, whether it holds a press's key), oldest first."""
    rows = await site.db.fetch_all(sa.select(orders.c.status, orders.c.request_key)
                                   .where(orders.c.user_id == user["id"])
                                   .order_by(orders.c.id))
    return [(row[0], row[1] is not None) for row in rows]


async def test_a_press_whose_order_was_released_buys_when_sent_again(
        make_site, stripe_api) -> None:
    """Stripe refused the Checkout: the order is cancelled and gives its press's key up, so
    the sheet's next send (buy.js keeps the key after a 5xx) makes a new order instead of
    being answered with the cancelled one; so does a press whose session expired."""
    site, mug, shopper, browser = await stripe_shop(make_site, stripe_api)
    key = secrets.token_urlsafe(16)
    stripe_api.fail_next = True
    first = await buy(browser, mug["id"], request_key=key)
    assert first.status_code == 502, first.text
    assert await request_keys(site, shopper) == [("cancelled", False)]
    assert (await product_row(site.db, mug["id"]))["stock"] == 5
    again = await buy(browser, mug["id"], request_key=key, retry=True)
    assert again.status_code == 200, again.text
    url = again.json()["redirect"]
    assert url.startswith("https://checkout.stripe.test/")
    # the same press once more (not marked a retry): the new order's session, no third order
    twin = await buy(browser, mug["id"], request_key=key)
    assert twin.status_code == 200 and twin.json() == {"redirect": url}, twin.text
    assert await request_keys(site, shopper) == [("cancelled", False), ("pending", True)]
    # its session expires unpaid: the order gives the key up too, and the press buys again
    session = stripe_api.sessions[url.rsplit("/", 1)[1]]
    assert (await deliver(site, stripe_event("checkout.session.expired", session,
                                             status="expired"))).status_code == 200
    assert await request_keys(site, shopper) == [("cancelled", False), ("expired", False)]
    third = await buy(browser, mug["id"], request_key=key, retry=True)
    assert third.status_code == 200, third.text
    assert third.json()["redirect"].startswith("https://checkout.stripe.test/")
    assert third.json()["redirect"] != url
    assert await request_keys(site, shopper) == [("cancelled", False), ("expired", False),
                                                 ("pending", True)]
    assert (await product_row(site.db, mug["id"]))["stock"] == 4


async def test_a_checkout_conflict_keeps_the_order_for_the_press_sent_again(
        make_site, stripe_api) -> None:
    """Stripe answers 409 when the same press's twin is using the idempotency key at that
    moment: the outcome is not known (the twin may hand the shopper that very session), so the
    order is not released under it; the press sent again gets the session."""
    site, mug, shopper, browser = await stripe_shop(make_site, stripe_api, "Cora Conflict")
    key = secrets.token_urlsafe(16)
    stripe_api.conflict_next = True
    first = await buy(browser, mug["id"], request_key=key)
    assert first.status_code == 502 and "kept" in first.json()["error"], first.text
    assert await request_keys(site, shopper) == [("pending", True)]
    assert (await product_row(site.db, mug["id"]))["stock"] == 4
    again = await buy(browser, mug["id"], request_key=key, retry=True)
    assert again.status_code == 200, again.text
    assert again.json()["redirect"].startswith("https://checkout.stripe.test/")
    assert await request_keys(site, shopper) == [("pending", True)]
