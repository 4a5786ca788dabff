"""The host studio: who may enter, products and their validation, images, pins, sales."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os

import pytest
from app_helpers import table_counts
from page_helpers import add_product_with_form, error_texts
from PIL import Image

from watchbuy.db import queries

pytest_plugins = ["site_fixtures"]


def png_bytes(size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def product_form(name: str = "Ceramic mug", price: str = "18.00", stock: str = "10",
                 description: str = "Hand-glazed") -> dict:
    return {"name": name, "description": description, "price": price, "stock": stock}


async def test_anonymous_goes_to_login_and_shoppers_are_refused(site) -> None:
    host = await site.user("Hana", host=True)
    product = await site.product(host)
    anonymous = await site.browser()
    response = await anonymous.get("/studio")
    assert response.status_code == 303 and response.headers["location"] == "/login?next=/studio"

    shopper = await site.browser(await site.user("Sam"))
    before = await table_counts(site.db)
    for path in ("/studio", "/studio/products/new", f"/studio/products/{product['id']}",
                 "/studio/sales", "/studio/health", "/studio/state"):
        response = await shopper.get(path)
        assert response.status_code == 403, path
        assert "Only hosts can open the studio." in response.text
    for path, data in [("/studio/key", {}), ("/studio/title", {"title": "Mine now"}),
                       ("/studio/pin", {"product_id": str(product["id"])}),
                       ("/studio/products/new", product_form()),
                       (f"/studio/products/{product['id']}", product_form(name="Taken")),
                       (f"/studio/products/{product['id']}/delete", {}),
                       (f"/studio/products/{product['id']}/shown", {}),
                       (f"/studio/products/{product['id']}/stock", {"stock": "0"})]:
        response = await shopper.post(path, data)
        assert response.status_code == 403, path
    assert await table_counts(site.db) == before
    assert await queries.product(site.db, product["id"]) == product
    assert await queries.channel_by_host(site.db, host["id"]) == host["channel"]


async def test_host_cannot_touch_another_hosts_products_or_sales(site) -> None:
    alice = await site.user("Alice", host=True)
    bob = await site.user("Bob", host=True)
    bobs = await site.product(bob, name="Bob's lamp")
    alices = await site.product(alice, name="Alice's vase")
    buyer = await site.user("Buyer")
    await queries.set_cart_quantity(site.db, buyer["id"], bobs["id"], 1)
    await queries.create_order_from_cart(site.db, buyer["id"], "test")

    browser = await site.browser(alice)
    before = await table_counts(site.db)
    bob_product_before = await queries.product(site.db, bobs["id"])
    assert (await browser.get(f"/studio/products/{bobs['id']}")).status_code == 404
    for path, data in [(f"/studio/products/{bobs['id']}", product_form(name="Mine")),
                       (f"/studio/products/{bobs['id']}/delete", {}),
                       (f"/studio/products/{bobs['id']}/shown", {}),
                       (f"/studio/products/{bobs['id']}/stock", {"stock": "0"}),
                       ("/studio/pin", {"product_id": str(bobs["id"])})]:
        response = await browser.post(path, data)
        assert response.status_code == 404, path
        assert "No such product." in response.text
    assert await queries.product(site.db, bobs["id"]) == bob_product_before
    assert await table_counts(site.db) == before
    channel = await queries.channel_by_host(site.db, alice["id"])
    assert channel["pinned_product_id"] is None

    sales = await browser.get("/studio/sales")
    assert sales.status_code == 200
    assert "Bob&#39;s lamp" not in sales.text and "Buyer" not in sales.text
    assert "No sales yet." in sales.text
    bob_sales = await (await site.browser(bob)).get("/studio/sales")
    assert "Bob&#39;s lamp" in bob_sales.text and "Buyer" in bob_sales.text
    studio = await browser.get("/studio")
    assert "Alice&#39;s vase" in studio.text and "Bob&#39;s lamp" not in studio.text
    assert alices["id"] != bobs["id"]


async def test_create_edit_delete_a_product_with_an_image(site) -> None:
    host = await site.user("Ivy", host=True)
    browser = await site.browser(host)
    page = await browser.get("/studio/products/new")
    assert page.status_code == 200 and 'enctype="multipart/form-data"' in page.text
    response = await browser.post("/studio/products/new", product_form(price="1,234.5"),
                                  files={"image": ("mug.png", png_bytes(), "image/png")})
    assert response.status_code == 303, response.text
    [product] = await queries.host_products(site.db, host["id"])
    assert (product["name"], product["price_minor"], product["currency"], product["stock"]) == \
        ("Ceramic mug", 123450, "usd", 10)
    assert product["image"].endswith(".png")
    stored = site.settings.uploads_dir / product["image"]
    # re-encoded, never the uploaded bytes: the same picture
    with Image.open(stored) as saved:
        assert saved.format == "PNG" and saved.size == (8, 8)
        assert saved.convert("RGB").getpixel((3, 3)) == (200, 30, 30)
    image = await browser.get(f"/uploads/{product['image']}")
    assert image.status_code == 200 and image.content == stored.read_bytes()
    assert image.headers["content-type"] == "image/png"

    response = await browser.get(f"/studio/products/{product['id']}")
    assert 'value="1234.50"' in response.text
    response = await browser.post(f"/studio/products/{product['id']}",
                                  product_form(name="Big mug", price="20", stock="3"))
    assert response.status_code == 303
    product = await queries.product(site.db, product["id"])
    assert (product["name"], product["price_minor"], product["stock"]) == ("Big mug", 2000, 3)
    assert product["image"] == stored.name  # editing without a new image keeps the old one

    response = await browser.post(f"/studio/products/{product['id']}/shown")
    assert response.status_code == 303
    assert not (await queries.product(site.db, product["id"]))["shown"]
    response = await browser.post(f"/studio/products/{product['id']}/delete")
    assert response.status_code == 303
    assert await queries.product(site.db, product["id"]) is None
    assert await queries.host_products(site.db, host["id"]) == []


BAD_PRODUCT_INPUT = [
    ("-5", "1", "The price must be a positive number, like 12.50."),
    ("abc", "1", "The price must be a positive number, like 12.50."),
    ("1e3", "1", "The price must be a positive number, like 12.50."),
    ("NaN", "1", "The price must be a positive number, like 12.50."),
    ("", "1", "Enter a price."),
    ("0", "1", "The price must be more than zero."),
    ("1.999", "1", "The price can have at most 2 digits after the point."),
    ("²", "1", "The price must be a positive number, like 12.50."),
    ("9" * 5000, "1", "That price is too high."),
    ("100000000.01", "1", "That price is too high."),
    ("10", "-1", "Stock must be between 0 and 1,000,000."),
    ("10", "1000000000", "Stock must be between 0 and 1,000,000."),
    ("10", "ten", "Stock must be a whole number."),
]


async def test_bad_product_input_gets_a_message_and_changes_nothing(site) -> None:
    host = await site.user("Jo", host=True)
    product = await site.product(host)
    browser = await site.browser(host)
    before = await table_counts(site.db)
    for price, stock, message in BAD_PRODUCT_INPUT:
        case = f"price={price!r} stock={stock!r}"
        response = await browser.post("/studio/products/new",
                                      product_form(name="Bad one", price=price, stock=stock))
        assert response.status_code == 400, case
        assert error_texts(response.text) == [message], case
        assert 'value="Bad one"' in response.text  # the form keeps what was typed
        response = await browser.post(f"/studio/products/{product['id']}",
                                      product_form(name="Bad edit", price=price, stock=stock))
        assert response.status_code == 400 and error_texts(response.text) == [message], case
    response = await browser.post("/studio/products/new", product_form(name=""))
    assert error_texts(response.text) == ["The name must be 1 to 100 characters."]
    assert await table_counts(site.db) == before
    assert await queries.product(site.db, product["id"]) == product


async def test_bad_images_get_a_message_and_change_nothing(site) -> None:
    host = await site.user("Kit", host=True)
    browser = await site.browser(host)
    before = await table_counts(site.db)
    limit = site.settings.max_image_bytes
    cases = [
        (("notes.png", b"#!/bin/sh\necho this is no image\n", "image/png"),
         "That file is not an image (use JPEG, PNG, WebP or GIF)."),
        (("mug.png", png_bytes()[:-20], "image/png"),  # truncated
         "That file is not an image (use JPEG, PNG, WebP or GIF)."),
        (("big.png", png_bytes() + b"\0" * (limit + 1 - len(png_bytes())), "image/png"),
         f"The image is larger than {limit // (1024 * 1024)} MB."),
        (("mug.bmp", _bmp_bytes(), "image/bmp"), "Use a JPEG, PNG, WebP or GIF image."),
    ]
    for upload, message in cases:
        response = await browser.post("/studio/products/new", product_form(),
                                      files={"image": upload})
        assert response.status_code == 400, upload[0]
        assert error_texts(response.text) == [message], upload[0]
    # far beyond the limit: refused before the form is even read
    response = await browser.post(
        "/studio/products/new", product_form(),
        files={"image": ("huge.png", b"\0" * (limit + 2 * 1024 * 1024), "image/png")})
    assert response.status_code == 413 and "That upload is too large." in response.text
    assert await table_counts(site.db) == before
    uploads = site.settings.uploads_dir
    assert not uploads.exists() or os.listdir(uploads) == []


def _bmp_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "BMP")
    return buffer.getvalue()


async def test_script_in_product_text_is_shown_as_text(site) -> None:
    host = await site.user("Lu", host=True)
    browser = await site.browser(host)
    evil = '<script>alert("x")</script>'
    response = await add_product_with_form(browser, evil, "5", "1", description=evil)
    assert response.status_code == 303
    [product] = await queries.host_products(site.db, host["id"])
    assert product["name"] == evil  # stored as typed ...
    await browser.post("/studio/pin", {"product_id": str(product["id"])})
    escaped = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;"
    for path in ("/studio", f"/room/{host['channel']['slug']}"):
        page = await (browser if path == "/studio" else await site.browser()).get(path)
        assert page.status_code == 200
        assert "<script>alert" not in page.text, path  # ... and shown as text
        assert escaped in page.text, path
    room = await (await site.browser()).get(f"/room/{host['channel']['slug']}")
    # the pinned card and the product list, each: the name as heading and as the image's
    # label, and the description
    assert room.text.count(escaped) == 6


async def test_stream_key_regenerates_and_title_changes(site) -> None:
    host = await site.user("Mo", host=True)
    browser = await site.browser(host)
    old_key = host["channel"]["stream_key"]
    response = await browser.post("/studio/key")
    assert response.status_code == 303 and response.headers["location"] == "/studio?notice=key"
    channel = await queries.channel_by_host(site.db, host["id"])
    assert channel["stream_key"] != old_key and channel["stream_key"].startswith("wb_")
    page = await browser.get(response.headers["location"])
    assert channel["stream_key"] in page.text and old_key not in page.text
    assert "rtmp://127.0.0.1/live" in page.text
    response = await browser.post("/studio/title", {"title": "x"})
    assert response.headers["location"] == "/studio?notice=title-invalid"
    response = await browser.post("/studio/title", {"title": "Friday <b>deals</b>"})
    assert response.headers["location"] == "/studio?notice=title"
    room = await (await site.browser()).get(f"/room/{channel['slug']}")
    assert "Friday &lt;b&gt;deals&lt;/b&gt;" in room.text


async def test_pin_and_unpin_show_on_the_room_page(site) -> None:
    host = await site.user("Nia", host=True)
    mug = await site.product(host, name="Mug")
    browser = await site.browser(host)
    response = await browser.post("/studio/pin", {"product_id": str(mug["id"])})
    assert response.status_code == 303
    room = await (await site.browser()).get(f"/room/{host['channel']['slug']}")
    assert 'id="pinned" class="pinned-card">' in room.text
    response = await browser.post("/studio/pin", {"product_id": "not-a-number"})
    assert response.status_code == 404
    response = await browser.post("/studio/pin", {"product_id": ""})
    assert response.status_code == 303
    assert (await queries.channel_by_host(site.db, host["id"]))["pinned_product_id"] is None
    room = await (await site.browser()).get(f"/room/{host['channel']['slug']}")
    assert 'id="pinned" class="pinned-card" hidden>' in room.text


@pytest.mark.parametrize("currency, typed, stored, shown", [
    ("chf", "1,234.5", 123450, "1234.50"),  # no symbol of its own: "CHF 1,234.50"
    ("jpy", "1800", 1800, "1800"),  # no minor unit
    ("eur", "18", 1800, "18.00"),
])
async def test_the_edit_form_shows_the_price_as_it_can_be_saved_again(make_site, currency, typed,
                                                                       stored, shown) -> None:
    site = await make_site(currency=currency)
    host = await site.user("Ola", host=True)
    browser = await site.browser(host)
    response = await browser.post("/studio/products/new", product_form(price=typed))
    assert response.status_code == 303
    [product] = await queries.host_products(site.db, host["id"])
    assert (product["price_minor"], product["currency"]) == (stored, currency)
    page = await browser.get(f"/studio/products/{product['id']}")
    assert f'name="price" value="{shown}"' in page.text
    response = await browser.post(f"/studio/products/{product['id']}", product_form(price=shown))
    assert response.status_code == 303
    assert (await queries.product(site.db, product["id"]))["price_minor"] == stored


async def test_editing_stock_keeps_units_sold_meanwhile(site) -> None:
    """The host opens the edit form at stock 10, 3 sell, the host saves 15 (adding 5): 12."""
    from page_helpers import csrf_from_html

    from watchbuy.db import queries

    host = await site.user("Stock Host", host=True)
    product = await site.product(host, name="Mug", stock=10)
    browser = await site.browser(host)
    form = await browser.get(f"/studio/products/{product['id']}")
    assert 'name="stock_was" value="10"' in form.text
    shopper = await site.user("Quick Buyer")
    await queries.set_cart_quantity(site.db, shopper["id"], product["id"], 3)
    await queries.create_order_from_cart(site.db, shopper["id"], "test")
    browser.csrf = csrf_from_html(form.text)
    response = await browser.post(f"/studio/products/{product['id']}", {
        "name": "Mug", "description": "", "price": "18.00", "stock": "15", "stock_was": "10"})
    assert response.status_code == 303
    assert (await queries.product(site.db, product["id"]))["stock"] == 12
    # lowering below what is left now is refused with a message, not a negative stock
    response = await browser.post(f"/studio/products/{product['id']}", {
        "name": "Mug", "description": "", "price": "18.00", "stock": "0", "stock_was": "15"})
    assert response.status_code == 409 and "sold while you were editing" in response.text
    assert (await queries.product(site.db, product["id"]))["stock"] == 12


def test_prices_as_shoppers_and_hosts_type_them() -> None:
    from watchbuy.site.web import parse_money

    assert parse_money("12,50", "usd") == 1250  # decimal comma
    assert parse_money("1,250", "usd") == 125000  # thousands separator
    assert parse_money("1,000,000.50", "usd") == 100000050
    for bad in ("1,2,3", "12,5,0", "-3", "1e3"):
        try:
            parse_money(bad, "usd")
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was accepted")


async def test_an_uploaded_photo_loses_its_gps_and_is_served_as_what_it_is(site) -> None:
    host = await site.user("Pia", host=True)
    browser = await site.browser(host)
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 7.0), 3: "E", 4: (13.0, 24.0, 0.0)}  # GPS
    buffer = io.BytesIO()
    Image.new("RGB", (32, 16), (10, 120, 200)).save(buffer, "JPEG", exif=exif.tobytes())
    upload = buffer.getvalue() + b"<html><script>alert(1)</script>"  # and a polyglot tail
    # named and typed as a PNG: what is stored follows the content, not the claim
    response = await browser.post("/studio/products/new", product_form(),
                                  files={"image": ("photo.png", upload, "image/png")})
    assert response.status_code == 303, response.text
    [product] = await queries.host_products(site.db, host["id"])
    assert product["image"].endswith(".jpg")
    served = await browser.get(f"/uploads/{product['image']}")
    assert served.headers["content-type"] == "image/jpeg"
    assert b"<script>" not in served.content and b"Exif" not in served.content
    with Image.open(io.BytesIO(served.content)) as image:
        assert image.size == (32, 16) and dict(image.getexif()) == {}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
async def test_an_image_with_too_many_pixels_is_refused_and_nothing_is_stored(site) -> None:
    host = await site.user("Quinn", host=True)
    browser = await site.browser(host)
    buffer = io.BytesIO()
    Image.new("1", (6000, 5000)).save(buffer, "PNG")  # 30 Mpx in a few kB
    before = await table_counts(site.db)
    response = await browser.post("/studio/products/new", product_form(),
                                  files={"image": ("big.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 400
    assert error_texts(response.text) == ["That image has too many pixels (at most 25,000,000)."]
    assert await table_counts(site.db) == before
    uploads = site.settings.uploads_dir
    assert not uploads.exists() or os.listdir(uploads) == []


def test_hiding_the_pinned_product_unpins_it_in_every_viewers_room(sync_site) -> None:
    from ws_helpers import ws_receive, ws_until

    site = sync_site
    host = site.user("Rae", host=True)
    mug = site.product(host, name="Mug")
    assert site.post("/studio/pin", host, {"product_id": str(mug["id"])}).status_code == 303
    with site.websocket(host["channel"]["slug"]) as viewer:
        ws_receive(viewer)  # hello
        response = site.post(f"/studio/products/{mug['id']}/shown", host, {})
        assert response.status_code == 303
        assert ws_until(viewer, "pinned") == {"type": "pinned", "product": None}
    assert site.call(queries.channel_by_host, site.db, host["id"])["pinned_product_id"] is None
    assert not site.call(queries.product, site.db, mug["id"])["shown"]
    room = site.client.get(f"/room/{host['channel']['slug']}")
    assert 'id="pinned" class="pinned-card" hidden>' in room.text
    # a hidden product cannot be pinned again until it is shown
    response = site.post("/studio/pin", host, {"product_id": str(mug["id"])})
    assert response.status_code == 409
    assert site.call(queries.channel_by_host, site.db, host["id"])["pinned_product_id"] is None
    # showing it again does not pin it by itself
    assert site.post(f"/studio/products/{mug['id']}/shown", host, {}).status_code == 303
    assert site.call(queries.channel_by_host, site.db, host["id"])["pinned_product_id"] is None


async def test_a_price_above_two_to_the_31_minor_units_is_saved_and_sold(site) -> None:
    host = await site.user("Sol", host=True)
    browser = await site.browser(host)
    response = await browser.post("/studio/products/new",
                                  product_form(name="Yacht", price="30,000,000.01", stock="1"))
    assert response.status_code == 303, response.text
    [yacht] = await queries.host_products(site.db, host["id"])
    assert yacht["price_minor"] == 3_000_000_001 > 2**31
    shopper = await site.user("Tycoon")
    await queries.set_cart_quantity(site.db, shopper["id"], yacht["id"], 1)
    order = await queries.create_order_from_cart(site.db, shopper["id"], "test")
    assert order["total_minor"] == 3_000_000_001
    page = await browser.get(f"/studio/products/{yacht['id']}")
    assert 'name="price" value="30000000.01"' in page.text


# -- running the show: card actions as fetches, stock, held images, stream health (issue 14) ----
async def test_a_failed_product_form_keeps_the_chosen_image_and_every_field(site) -> None:
    import re

    host = await site.user("Holly", host=True)
    browser = await site.browser(host)
    await browser.get("/studio/products/new")
    response = await browser.post(
        "/studio/products/new", product_form(name="Red mug", price="abc", stock="4",
                                             description="Glazed twice"),
        files={"image": ("mug.png", png_bytes(), "image/png")})
    assert response.status_code == 400
    assert error_texts(response.text) == ["The price must be a positive number, like 12.50."]
    for kept in ('value="Red mug"', 'value="abc"', 'value="4"', ">Glazed twice</textarea>"):
        assert kept in response.text, kept
    token = re.search(r'name="pending_image" value="([^"]+)"', response.text).group(1)
    name = token.rpartition(":")[0]
    assert f'src="/uploads/{name}"' in response.text  # the host sees the image is kept
    assert await queries.host_products(site.db, host["id"]) == []

    # a forged hold (a name with a made-up signature) attaches nothing
    response = await browser.post("/studio/products/new", {
        **product_form(name="Forged", price="5"), "pending_image": f"{name}:{'0' * 64}"})
    assert response.status_code == 303
    # the real one: saved with the image, no file chosen again
    response = await browser.post("/studio/products/new", {
        **product_form(name="Red mug", price="18"), "pending_image": token})
    assert response.status_code == 303
    by_name = {p["name"]: p for p in await queries.host_products(site.db, host["id"])}
    assert by_name["Forged"]["image"] is None
    assert by_name["Red mug"]["image"] == name
    assert (site.settings.uploads_dir / name).is_file()

    # another host cannot use this host's hold
    otto = await site.user("Otto", host=True)
    other = await site.browser(otto)
    await other.get("/studio/products/new")
    assert (await other.post("/studio/products/new", {
        **product_form(name="Borrowed", price="5"), "pending_image": token})).status_code == 303
    [borrowed] = await queries.host_products(site.db, otto["id"])
    assert borrowed["image"] is None


async def test_card_actions_answer_json_for_the_page_and_redirect_forms(site) -> None:
    host = await site.user("Cara", host=True)
    mug = await site.product(host, name="Mug", stock=10)
    lamp = await site.product(host, name="Lamp", stock=2)
    browser = await site.browser(host)
    await browser.get("/studio")

    response = await browser.fetch("/studio/pin", {"product_id": str(mug["id"])})
    assert response.status_code == 200
    answer = response.json()
    assert answer["pinned"]["name"] == "Mug" and answer["pinned_product_id"] == mug["id"]
    assert [(p["name"], p["shown"], p["stock"]) for p in answer["products"]] == \
        [("Mug", True, 10), ("Lamp", True, 2)]

    # show/hide says which state it wants: the same request twice leaves it hidden
    for _ in range(2):
        response = await browser.fetch(f"/studio/products/{lamp['id']}/shown", {"shown": "0"})
        assert response.status_code == 200
        assert [p["shown"] for p in response.json()["products"]] == [True, False]

    response = await browser.fetch(f"/studio/products/{mug['id']}/stock",
                                   {"stock": "25", "stock_was": "10"})
    assert response.status_code == 200 and response.json()["products"][0]["stock"] == 25
    response = await browser.fetch(f"/studio/products/{mug['id']}/stock",
                                   {"stock": "many", "stock_was": "25"})
    assert response.status_code == 400
    assert response.json() == {"error": "Stock must be a whole number.", "field": "stock"}

    # 3 sell while the host's page still shows 25: setting 0 would undercut them
    shopper = await site.user("Quick")
    await queries.set_cart_quantity(site.db, shopper["id"], mug["id"], 3)
    await queries.create_order_from_cart(site.db, shopper["id"], "test")
    response = await browser.fetch(f"/studio/products/{mug['id']}/stock",
                                   {"stock": "0", "stock_was": "25"})
    assert response.status_code == 409
    assert "It is 22 now." in response.json()["error"]
    assert response.json()["state"]["products"][0]["stock"] == 22
    response = await browser.fetch(f"/studio/products/{mug['id']}/stock",
                                   {"stock": "20", "stock_was": "22"})
    assert response.status_code == 200
    assert (await queries.product(site.db, mug["id"]))["stock"] == 20

    # the same routes from a plain form (no script): redirects back to the studio
    response = await browser.post(f"/studio/products/{mug['id']}/stock",
                                  {"stock": "21", "stock_was": "20"})
    assert response.status_code == 303 and response.headers["location"] == "/studio"
    response = await browser.fetch(f"/studio/products/{lamp['id']}/delete", {})
    assert [p["name"] for p in response.json()["products"]] == ["Mug"]

    state = (await browser.get("/studio/state")).json()
    assert state["pinned_product_id"] == mug["id"] and len(state["products"]) == 1
    studio = await browser.get("/studio")
    assert 'class="studio-products"' in studio.text and "<table" not in studio.text
    assert "Waiting for your stream" in studio.text and "1080×1920" in studio.text


def test_a_stock_change_reaches_the_room_as_a_stock_event(sync_site) -> None:
    from ws_helpers import ws_receive, ws_until

    site = sync_site
    host = site.user("Sid", host=True)
    mug = site.product(host, name="Mug", stock=5)
    with site.websocket(host["channel"]["slug"]) as viewer:
        ws_receive(viewer)  # hello
        response = site.post(f"/studio/products/{mug['id']}/stock", host,
                             {"stock": "9", "stock_was": "5"})
        assert response.status_code == 303
        event = ws_until(viewer, "stock")
        assert (event["product_id"], event["stock"]) == (mug["id"], 9)


async def test_stream_health_for_the_host_only(site) -> None:
    host = await site.user("Hal", host=True)
    shopper = await site.browser(await site.user("Sue"))
    assert (await shopper.get("/studio/health")).status_code == 403
    browser = await site.browser(host)
    assert (await browser.get("/studio/health")).json() == \
        {"live": False, "receiving": False, "warnings": []}
    site.node.streams = [{
        "name": host["channel"]["slug"], "width": 1280, "height": 720, "fps": 30.0,
        "bitrate_in": 2_564_000, "video_bitrate": 2_500_000, "audio_bitrate": 64_000,
        "keyframe_interval": 1.0, "video_codec": "avc", "audio_codec": "aac",
        "has_audio": True, "viewers": 3, "uptime": 30.0}]
    report = (await browser.get("/studio/health")).json()
    assert report["receiving"] is True and report["warnings"] == []
    assert (report["width"], report["height"], report["bitrate_kbps"], report["video_kbps"],
            report["audio_kbps"], report["viewers"]) == (1280, 720, 2564, 2500, 64, 3)


def test_stream_health_warns_in_plain_words() -> None:
    from watchbuy.site.studio import stream_health

    healthy = {"width": 1080, "height": 1920, "fps": 30, "bitrate_in": 4_000_000,
               "video_bitrate": 3_872_000, "audio_bitrate": 128_000, "keyframe_interval": 2.0,
               "video_codec": "avc", "audio_codec": "aac", "has_audio": True, "uptime": 10.0}
    assert stream_health(healthy, True, 6000)["warnings"] == []
    bad = {**healthy, "keyframe_interval": 10.0, "has_audio": False, "audio_codec": "",
           "bitrate_in": 12_000_000}
    warnings = stream_health(bad, True, 6000)["warnings"]
    assert len(warnings) == 3
    assert warnings[0].startswith("A keyframe comes only every 10 s")
    assert "keyframe interval to 2 s" in warnings[0]
    assert warnings[1].startswith("No sound is arriving.")
    assert warnings[2].startswith("Your bitrate is 12,000 kbps, far above")
    # exactly 4 s is still fine; the bitrate limit is the setting's
    assert stream_health({**healthy, "keyframe_interval": 4.0}, True, 6000)["warnings"] == []
    assert len(stream_health(healthy, True, 3000)["warnings"]) == 1
    assert stream_health(None, True, 6000) == {"live": True, "receiving": False, "warnings": []}
    # the first seconds of a publish: sound and rate are still arriving, keyframes are not
    starting = stream_health({**bad, "uptime": 1.0}, True, 6000)["warnings"]
    assert len(starting) == 1 and starting[0].startswith("A keyframe comes only every")


def test_a_bad_health_bitrate_setting_is_one_clear_line() -> None:
    from watchbuy.settings import ConfigError
    from watchbuy.site.config import load_site_settings

    with pytest.raises(ConfigError, match="WATCHBUY_HEALTH_BITRATE_WARN_KBPS"):
        load_site_settings({"WATCHBUY_HEALTH_BITRATE_WARN_KBPS": "0",
                            "WATCHBUY_DATA_DIR": "/nonexistent-never-created"})


async def test_concurrent_stock_changes_and_sales_all_count(site) -> None:
    """The studio and the room's panel each add units while shoppers buy: every change is a
    difference applied in one conditional update, so none is lost and none oversells."""
    import asyncio

    host = await site.user("Dana", host=True)
    mug = await site.product(host, name="Mug", stock=10)
    pages = [await site.browser(host) for _ in range(2)]
    for page in pages:
        await page.get("/studio")
    buyers = [await site.user(f"Buyer {i}") for i in range(4)]
    for buyer in buyers:
        await queries.set_cart_quantity(site.db, buyer["id"], mug["id"], 1)

    async def add_one(page) -> int:
        response = await page.fetch(f"/studio/products/{mug['id']}/stock",
                                    {"stock": "11", "stock_was": "10"})
        return response.status_code

    results = await asyncio.gather(
        *(add_one(pages[i % 2]) for i in range(6)),
        *(queries.create_order_from_cart(site.db, b["id"], "test") for b in buyers))
    assert results[:6] == [200] * 6
    assert (await queries.product(site.db, mug["id"]))["stock"] == 10 + 6 - 4


# -- pins: a rate per host, and the last event is the current pin --------------------------------


async def test_pins_over_the_rate_get_a_clear_429_and_change_nothing(make_site, caplog) -> None:
    from watchbuy.site import studio as studio_module

    studio_module._limited.reset()  # rate-limited per process: the other database's run logged
    site = await make_site(pin_rate=2, pin_window=60.0)
    host = await site.user("Pia", host=True)
    mug = await site.product(host, name="Mug")
    tote = await site.product(host, name="Tote")
    studio = await site.browser(host)
    for product in (mug, tote):
        assert (await studio.fetch("/studio/pin", {"product_id": str(product["id"])})).status_code \
            == 200
    refused = await studio.fetch("/studio/pin", {"product_id": str(mug["id"])})
    assert refused.status_code == 429
    assert refused.json()["error"].startswith("Too many pins: at most 2 every 60 seconds")
    assert refused.headers["retry-after"] == "60"
    assert (await queries.channel_by_host(site.db, host["id"]))["pinned_product_id"] == tote["id"]
    assert "pin refused" in caplog.text
    # a plain form post gets the error page with the same words; another host is not limited
    page = await studio.post("/studio/pin", {"product_id": ""})
    assert page.status_code == 429 and "Too many pins" in page.text
    other = await site.user("Olu", host=True)
    other_mug = await site.product(other, name="Mug")
    answer = await (await site.browser(other)).fetch(
        "/studio/pin", {"product_id": str(other_mug["id"])})
    assert answer.status_code == 200


def test_a_bad_pin_rate_setting_is_one_clear_line() -> None:
    from watchbuy.settings import ConfigError
    from watchbuy.site.config import load_site_settings

    for name, value in (("WATCHBUY_PIN_RATE", "0"), ("WATCHBUY_PIN_WINDOW", "-1")):
        with pytest.raises(ConfigError, match=name):
            load_site_settings({name: value, "WATCHBUY_DATA_DIR": "/nonexistent-never-created"})


class SlowCueNode:
    """The node's cue endpoint on loopback (engine/cues.py answers ``{"media_ms"}``), slow for
    one product: a node busy for most of the site's one-second cue budget."""

    def __init__(self, slow_product: int, delay: float) -> None:
        self.slow_product = slow_product
        self.delay = delay
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].decode()
                if f"product_id={self.slow_product}" in target:
                    await asyncio.sleep(self.delay)
                body = json.dumps({"media_ms": 1000}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_two_quick_pins_with_a_slow_cue_leave_viewers_on_the_second(make_site) -> None:
    from watchbuy.site.chat import room_topic

    async with contextlib.AsyncExitStack() as stack:
        node = SlowCueNode(slow_product=-1, delay=0.8)
        base = await stack.enter_async_context(node)
        site = await make_site(node_stats_url=base)
        host = await site.user("Quin", host=True)
        mug = await site.product(host, name="Mug")
        tote = await site.product(host, name="Tote")
        node.slow_product = mug["id"]
        await queries.set_live(site.db, host["channel"]["id"], True, "local")
        events = site.app.state.broker.subscribe(room_topic(host["channel"]["id"]))
        await events.ready()
        studio = await site.browser(host)
        first = asyncio.ensure_future(studio.fetch("/studio/pin", {"product_id": str(mug["id"])}))
        await asyncio.sleep(0.2)  # the mug's cue is under way when the tote is pinned
        second = await studio.fetch("/studio/pin", {"product_id": str(tote["id"])})
        assert second.status_code == 200 and second.json()["pinned"]["id"] == tote["id"]
        answered = await first
        assert answered.status_code == 200
        # the late answer says what is pinned now, as the room's last event does
        assert answered.json()["pinned"]["id"] == tote["id"]
        pinned = []
        while len(pinned) < 2:
            message = await asyncio.wait_for(events.__anext__(), 5)
            if message["type"] == "pinned":
                pinned.append(message["product"]["id"] if message["product"] else None)
        assert pinned == [tote["id"], tote["id"]]
        # both pins are on the media clock all the same (the replay's timeline)
        rows = await site.db.fetch_all("SELECT product_id FROM pins ORDER BY id")
        assert sorted(r[0] for r in rows) == sorted([mug["id"], tote["id"]])
        await events.close()


@pytest.mark.timeout(120)
def test_in_chromium_the_studio_says_when_pins_are_over_the_rate(tmp_path) -> None:
    from browser_helpers import (
        CHROMIUM,
        CHROMIUM_ARGS,
        PHONE,
        Server,
        log_in,
        require_browser,
        screenshot,
    )
    from playwright.sync_api import sync_playwright

    require_browser()
    server = Server(tmp_path, env={"WATCHBUY_PIN_RATE": "2", "WATCHBUY_PIN_WINDOW": "60"}).start()
    try:
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                  headless=True, timeout=60_000)
            page = chromium.new_context(viewport=PHONE, is_mobile=True, has_touch=True,
                                        device_scale_factor=1).new_page()
            page.set_default_timeout(20_000)
            log_in(page, server.url, "host@watchbuy.local", server.password, "/studio")
            page.evaluate("window.__sameDocument = true")
            pin = page.locator("[data-pin]").first
            for expected in ("Pinned ", "Unpinned."):
                pin.click()
                page.wait_for_function("t => document.getElementById('studio-status')"
                                       ".textContent.startsWith(t)", arg=expected)
            pin.click()  # the third within the minute
            page.wait_for_function("() => document.getElementById('studio-status')"
                                   ".textContent.startsWith('Too many pins')")
            assert "at most 2 every 60 seconds" in page.inner_text("#studio-status")
            assert page.evaluate("window.__sameDocument === true"), "the studio reloaded"
            page.locator("#studio-status").scroll_into_view_if_needed()
            screenshot(page, "studio-pin-rate-phone.png")
            chromium.close()
    finally:
        server.stop()
