"""Payments: Stripe Checkout when keys are configured, a labelled test mode otherwise.

Both go through :func:`fulfil` / :func:`release`, so the test mode exercises the very code that
Stripe's webhook drives.  Stripe's webhook is verified on the raw body with
``stripe.Webhook.construct_event``; each event id is recorded, so a redelivered event changes
nothing, and ``mark_paid`` only moves a *pending* order, so an order is paid exactly once.
"""

from __future__ import annotations

import logging
from datetime import date

import stripe

from watchbuy.db import queries

log = logging.getLogger("watchbuy.site.payments")

TEST_CARD = "4242424242424242"


class PaymentError(Exception):
    """The payment provider refused or failed; the text is fit to show."""


class StripeGateway:
    def __init__(self, secret_key: str, webhook_secret: str, api_base: str = "") -> None:
        options = {"http_client": stripe.HTTPXClient()}
        if api_base:
            options["base_addresses"] = {"api": api_base}
        self.client = stripe.StripeClient(secret_key, **options)
        self.webhook_secret = webhook_secret

    async def create_checkout(self, order: dict, public_url: str) -> tuple[str, str]:
        """(session id, URL to send the buyer to) for a pending order."""
        line_items = [
            {
                "quantity": item["quantity"],
                "price_data": {
                    "currency": item["currency"],
                    "unit_amount": item["unit_price_minor"],
                    "product_data": {"name": item["name"]},
                },
            }
            for item in order["items"]
        ]
        params = {
            "mode": "payment",
            "line_items": line_items,
            "client_reference_id": str(order["id"]),
            "metadata": {"order_id": str(order["id"])},
            "success_url": f"{public_url}/checkout/success?order={order['id']}",
            "cancel_url": f"{public_url}/checkout/cancel?order={order['id']}",
        }
        try:
            session = await self.client.v1.checkout.sessions.create_async(
                params=params,
                # the same order never makes two sessions, even when the buyer double-clicks
                options={"idempotency_key": f"watchbuy-order-{order['id']}"},
            )
        except stripe.StripeError as exc:
            log.warning("stripe refused checkout for order %s: %s", order["id"], exc)
            raise PaymentError("The payment service is not available right now.") from exc
        return session.id, session.url

    def parse_event(self, payload: bytes, signature: str | None):
        """The verified event as a plain dict; raises ValueError or SignatureVerificationError."""
        event = stripe.Webhook.construct_event(payload, signature, self.webhook_secret)
        # Since stripe 12 its objects are not dicts (.get raises AttributeError): the webhook
        # handler reads plain dicts.
        return event.to_dict()


async def fulfil(app, order_id: int) -> bool:
    """Mark a pending order paid (once) and tell the rooms whose stock changed."""
    paid = await queries.mark_paid(app.state.db, order_id)
    if paid:
        log.info("order %s paid", order_id)
    return paid


async def release(app, order_id: int, status: str) -> bool:
    """Cancel or expire a pending order and give its stock back."""
    released = await queries.release_order(app.state.db, order_id, status)
    if released:
        log.info("order %s %s; stock released", order_id, status)
        order = await queries.order(app.state.db, order_id)
        from watchbuy.site.studio import announce_products

        for host_id in {item["host_id"] for item in order["items"]}:
            await announce_products(app, host_id)
    return released


def check_test_card(number: str, expiry: str, cvc: str, today: date | None = None) -> str | None:
    """None when the test card is acceptable, else the message for the form."""
    digits = "".join(ch for ch in number if ch.isdigit())
    if digits != TEST_CARD:
        return "Test mode accepts only the test card 4242 4242 4242 4242."
    month_text, _, year_text = expiry.replace(" ", "").partition("/")
    try:
        month, year = int(month_text), int(year_text)
    except ValueError:
        return "Enter the expiry date as MM/YY."
    if year < 100:
        year += 2000
    today = today or date.today()
    if not 1 <= month <= 12 or (year, month) < (today.year, today.month):
        return "That expiry date is not in the future."
    if not (cvc.isdigit() and 3 <= len(cvc) <= 4):
        return "Enter the 3 or 4 digit security code."
    return None


async def expire_stale_test_orders(app) -> int:
    """Release test-mode orders nobody paid within the reservation time; returns how many."""
    import time

    settings = app.state.settings
    cutoff = time.time() - settings.test_reservation_minutes * 60
    released = 0
    for order_id in await queries.stale_pending_orders(app.state.db, cutoff, "test"):
        released += await release(app, order_id, "expired")
    return released


async def expire_forever(app, every: float = 60.0) -> None:
    import asyncio

    while True:
        try:
            await expire_stale_test_orders(app)
        except Exception:  # the sweep must outlive a bad round (database restarting, …)
            log.exception("expiring stale test-mode orders failed")
        await asyncio.sleep(every)
