"""The address book: server-side checks field by field (pages and JSON), default, delete, the
checkout info one-tap buying reads, and the /account settings page."""

from __future__ import annotations

import asyncio
import re

from app_helpers import SAMPLE_ADDRESS, table_counts

from watchbuy.db import shopping

pytest_plugins = ["site_fixtures"]

GOOD = {"name": "Ann Example", "line1": "Hauptstraße 5", "line2": "2. OG", "city": "Berlin",
        "postal_code": "10115", "region": "", "country": "de"}

BAD_ADDRESSES = [  # (changes to GOOD, the field at fault, its message)
    ({"name": ""}, "name", "Enter the full name."),
    ({"name": "x" * 121}, "name", "Full name is at most 120 characters."),
    ({"line1": "   "}, "line1", "Enter the address."),
    ({"city": ""}, "city", "Enter the city."),
    ({"postal_code": ""}, "postal_code", "Enter the postal code."),
    ({"postal_code": "10115<script>"}, "postal_code",
     "A postal code has letters, digits, spaces and dashes only."),
    ({"country": "XX"}, "country", "Choose a country (a two-letter ISO code such as US or DE)."),
    ({"country": "Germany"}, "country", "Country is at most 2 characters."),
    ({"country": ""}, "country", "Enter the country."),
    ({"line2": "y" * 201}, "line2", "Apartment, suite is at most 200 characters."),
]


async def test_bad_addresses_get_an_error_beside_the_field_and_change_nothing(site) -> None:
    shopper = await site.user("Ann", address=False)
    browser = await site.browser(shopper)
    await browser.get("/addresses")
    before = await table_counts(site.db)
    for changes, field, message in BAD_ADDRESSES:
        data = {**GOOD, **changes}
        response = await browser.fetch("/api/addresses", data)
        assert response.status_code == 400, changes
        body = response.json()
        assert (body["field"], body["error"]) == (field, message), changes
        assert body["errors"] == {field: message}, changes
        # the page shows the message under its own input, and keeps what was typed
        page = await browser.post("/addresses", data)
        assert page.status_code == 400, changes
        assert f'<p class="field-error" id="error-{field}">{message}</p>' in page.text, changes
        assert re.search(rf'name="{field}"[^>]*aria-invalid="true"', page.text, re.S) or \
            field == "country", changes
        assert 'value="Ann Example"' in page.text or field == "name", changes
    # several mistakes at once: each one named
    response = await browser.fetch("/api/addresses", {**GOOD, "city": "", "country": "ZZ"})
    assert response.json()["errors"] == {
        "city": "Enter the city.",
        "country": "Choose a country (a two-letter ISO code such as US or DE)."}
    # JSON that is not an object of fields is refused as such
    response = await browser.http.post("/api/addresses", content="[1, 2]", headers={
        "X-CSRF-Token": browser.csrf, "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["field"] is None
    assert await table_counts(site.db) == before


async def test_address_book_add_default_delete(site) -> None:
    shopper = await site.user("Ann", address=False)
    other = await site.user("Bob")
    browser = await site.browser(shopper)
    # JSON in, JSON out; the country is normalised, the first address is the default
    response = await browser.http.post("/api/addresses", json=GOOD, headers={
        "X-CSRF-Token": (await browser.get("/addresses")) and browser.csrf})
    assert response.status_code == 200, response.text
    first = response.json()["address"]
    assert first == {"id": first["id"], **GOOD, "country": "DE", "is_default": True}
    # a form, as the page sends it, asking to be the default
    response = await browser.post("/addresses", {**SAMPLE_ADDRESS, "is_default": "1"})
    assert response.status_code == 303 and response.headers["location"] == \
        "/addresses?notice=saved"
    book = await shopping.user_addresses(site.db, shopper["id"])
    assert [(a["city"], bool(a["is_default"])) for a in book] == [("Springfield", True),
                                                                  ("Berlin", False)]
    page = await browser.get("/addresses")
    assert "Hauptstraße 5" in page.text and "10115 Berlin" in page.text
    assert (await browser.post(f"/addresses/{first['id']}/default")).status_code == 303
    book = await shopping.user_addresses(site.db, shopper["id"])
    assert [a["city"] for a in book if a["is_default"]] == ["Berlin"]
    # another shopper's address can be neither used nor changed
    bobs = other["address"]["id"]
    assert (await browser.post(f"/addresses/{bobs}/delete")).status_code == 404
    assert (await browser.post(f"/addresses/{bobs}/default")).status_code == 404
    assert len(await shopping.user_addresses(site.db, other["id"])) == 1
    # deleting the default makes the other one the default
    assert (await browser.post(f"/addresses/{first['id']}/delete")).status_code == 303
    book = await shopping.user_addresses(site.db, shopper["id"])
    assert [(a["city"], bool(a["is_default"])) for a in book] == [("Springfield", True)]


async def test_concurrent_first_addresses_make_one_default(site) -> None:
    shopper = await site.user("Ann", address=False)
    await asyncio.gather(*(shopping.add_address(site.db, shopper["id"],
                                                {**GOOD, "city": f"City {i}"}, False)
                           for i in range(6)))
    book = await shopping.user_addresses(site.db, shopper["id"])
    assert len(book) == 6 and sum(bool(a["is_default"]) for a in book) == 1


async def test_checkout_info_and_account_settings(site) -> None:
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug")
    shopper = await site.user("Ann Lee")
    browser = await site.browser(shopper)
    await browser.fetch("/cart/add", {"product_id": str(mug["id"]), "quantity": "2"})
    info = (await browser.get("/api/checkout-info")).json()
    assert info == {"addresses": [{"id": shopper["address"]["id"], **SAMPLE_ADDRESS,
                                   "is_default": True}],
                    "saved_card": None, "cart_count": 2, "test_mode": True}
    await shopping.save_card(site.db, shopper["id"], "visa", "4242")
    info = (await browser.get("/api/checkout-info")).json()
    assert info["saved_card"] == {"brand": "visa", "last4": "4242"}
    # a visitor gets the log-in page, not someone's data
    assert (await (await site.browser()).get("/api/checkout-info")).status_code == 303

    page = await browser.get("/account")
    assert 'id="announce" checked' in page.text and "Ann just bought" in page.text
    assert 'href="/addresses"' in page.text and "Visa ending in 4242" in page.text
    assert (await browser.post("/account", {})).status_code == 303  # the box unticked
    assert (await shopping.payment_profile(site.db, shopper["id"]))["announce_purchases"] in (
        False, 0)
    assert 'id="announce" checked' not in (await browser.get("/account")).text
    await browser.post("/account", {"announce": "1"})
    assert (await shopping.payment_profile(site.db, shopper["id"]))["announce_purchases"]
    await browser.post("/account", {"action": "forget_card"})
    assert (await browser.get("/api/checkout-info")).json()["saved_card"] is None
