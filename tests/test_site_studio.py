"""The host studio: who may enter, products and their validation, images, pins, sales."""

from __future__ import annotations

import io
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
                 "/studio/sales"):
        response = await shopper.get(path)
        assert response.status_code == 403, path
        assert "Only hosts can open the studio." in response.text
    for path, data in [("/studio/key", {}), ("/studio/title", {"title": "Mine now"}),
                       ("/studio/pin", {"product_id": str(product["id"])}),
                       ("/studio/products/new", product_form()),
                       (f"/studio/products/{product['id']}", product_form(name="Taken")),
                       (f"/studio/products/{product['id']}/delete", {}),
                       (f"/studio/products/{product['id']}/shown", {})]:
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
