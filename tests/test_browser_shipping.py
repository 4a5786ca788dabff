"""/orders for an order bought from two sellers of whom one has shipped: each seller's state,
on a phone (docs/screenshots/orders-two-sellers-phone.png)."""

from __future__ import annotations

import sqlite3
import time
import uuid

from browser_helpers import PHONE, screenshot, sign_up

pytest_plugins = ["browser_fixtures"]

PASSWORD = "correct horse 42"


def test_orders_show_each_sellers_shipping(server, new_context):
    context = new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = context.new_page()
    email = f"sam-{uuid.uuid4().hex[:8]}@example.com"
    sign_up(page, server.url, email, "Sam", PASSWORD)
    (path,) = list(server.workdir.rglob("watchbuy.db"))
    db = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        # the order as a cart checkout of two hosts' products leaves it, paid; the demo host
        # has shipped their line, the second seller not yet
        shopper = db.execute("SELECT id FROM users WHERE email = ?", (email,)).fetchone()[0]
        host = db.execute("SELECT id FROM users WHERE email = 'host@watchbuy.local'").fetchone()[0]
        stamp = time.time()
        other = db.execute(
            "INSERT INTO users (email, display_name, password_hash, is_host, is_admin, "
            "created_at, announce_purchases) VALUES (?, 'Nora Kiln', 'x', 1, 0, ?, 1)",
            (f"nora-{uuid.uuid4().hex[:8]}@example.com", stamp)).lastrowid
        order = db.execute(
            "INSERT INTO orders (user_id, status, total_minor, currency, payment_mode, "
            "created_at, paid_at, test_mode, ship_name, ship_line1, ship_line2, ship_city, "
            "ship_postal_code, ship_region, ship_country) VALUES (?, 'paid', 4200, 'usd', "
            "'test', ?, ?, 1, 'Sam', '1 Market Street', '', 'Springfield', '62701', 'IL', 'US')",
            (shopper, stamp, stamp)).lastrowid
        db.execute(
            "INSERT INTO order_items (order_id, product_id, host_id, name, unit_price_minor, "
            "currency, quantity, shipped_at, carrier, tracking_number) VALUES "
            "(?, 1, ?, 'Ceramic mug', 1800, 'usd', 1, ?, 'UPS', '1Z999AA10123456784'), "
            "(?, 2, ?, 'Linen apron', 2400, 'usd', 1, NULL, NULL, NULL)",
            (order, host, stamp, order, other))
    finally:
        db.close()
    page.goto(server.url + "/orders")
    card = page.locator(f"#order-{order}")
    text = card.inner_text()
    assert card.locator(".status").inner_text().strip().lower() == "paid", text
    assert "Shipped" in text and "1Z999AA10123456784" in text, text
    assert "Nora Kiln: Paid; waiting to be shipped to Springfield, US." in text, text
    card.scroll_into_view_if_needed()
    screenshot(page, "orders-two-sellers-phone.png")
