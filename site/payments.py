"""Payments: Stripe Checkout when keys are configured, a labelled test mode otherwise.

Both go through :func:`fulfil` / :func:`release`, so the test mode exercises the very code that
Stripe's webhook drives.  Stripe's webhook is verified on the raw body with
``stripe.Webhook.construct_event``; each event id is recorded, so a redelivered event changes
nothing, and ``mark_paid`` only moves a *pending* order, so an order is paid exactly once.

A shopper's cancel expires the Checkout Session at Stripe *before* the stock goes back (a
session left open could still be paid while the units are sold again), and sessions expire on
their own after ``checkout_minutes``.  A payment that still arrives for a cancelled or expired
order is never dropped: the order is paid again if its stock can be reserved anew, otherwise the
payment is refunded; either is logged at ERROR and shown in the order's history.
"""

from __future__ import annotations

import logging
import time
from datetime import date
from typing import TYPE_CHECKING

import stripe

from watchbuy.db import queries, shopping
from watchbuy.logs import LogLimiter

if TYPE_CHECKING:
    from watchbuy.db.database import Database
    from watchbuy.site.state import SiteState

log = logging.getLogger("watchbuy.site.payments")
announce_log = LogLimiter(log, interval=10.0)  # a broken broker: not a line per sale

TEST_CARD = "4242424242424242"
SESSION_SLACK = 60  # seconds added to a Checkout Session's lifetime (see create_checkout)


class PaymentError(Exception):
    """The payment provider refused or failed; the text is fit to show."""


class PaymentUnknown(PaymentError):
    """Stripe did not answer whether a payment went through (timeouts, connection errors,
    5xx, rate limits, every attempt): the order keeps its stock until its PaymentIntent's
    webhook or the upkeep's look-up (:func:`settle_stale_intent_orders`) says."""


# Errors after which Stripe may or may not have acted: asked again with the same idempotency
# key (Stripe answers a request it already processed with its first answer).
UNKNOWN_OUTCOME = (stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError)
CHARGE_ATTEMPTS = 3


def idempotency_key(order: dict) -> str:
    return f"watchbuy-order-{order['id']}-{order['created_at']:.3f}"


class StripeGateway:
    def __init__(self, secret_key: str, webhook_secret: str, api_base: str = "") -> None:
        options = {"http_client": stripe.HTTPXClient()}
        if api_base:
            options["base_addresses"] = {"api": api_base}
        self.client = stripe.StripeClient(secret_key, **options)
        self.webhook_secret = webhook_secret

    async def create_checkout(self, order: dict, public_url: str, minutes: float = 30.0,
                              customer: str | None = None) -> tuple[str, str]:
        """(session id, URL to send the buyer to) for a pending order, payable for ``minutes``
        (Stripe's own default is 24 hours, holding the reserved stock all that time).

        With ``customer`` (one-tap buying) the session is prefilled for that Stripe Customer
        and keeps the card for later off-session payments (``setup_future_usage``), and the
        buyer comes back to the order's thank-you page."""
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
            # Counted from the order, not from now: a retried create (double click) must send
            # the same parameters under its idempotency key.  The minute of slack keeps it
            # within Stripe's "at least 30 minutes ahead" when the request comes a moment later.
            "expires_at": int(order["created_at"] + minutes * 60) + SESSION_SLACK,
        }
        if customer is not None:
            params["customer"] = customer
            params["payment_intent_data"] = {"setup_future_usage": "off_session",
                                             "metadata": {"order_id": str(order["id"])}}
            params["success_url"] = f"{public_url}/orders/{order['id']}/thanks"
        try:
            session = await self.client.v1.checkout.sessions.create_async(
                params=params,
                # the same order never makes two sessions, even when the buyer double-clicks;
                # its creation time in the key keeps a reused order id (a database restored
                # or reset within Stripe's 24 h of keys) from getting another order's session
                options={"idempotency_key": idempotency_key(order)},
            )
        except UNKNOWN_OUTCOME as exc:
            # no answer, or a 409 (another request -- the same press sent twice -- is using
            # this key right now): a session may exist or be made, so the caller must not
            # release the order under it
            log.warning("stripe did not answer checkout for order %s: %s", order["id"], exc)
            raise PaymentUnknown("The payment service did not answer: press again in a "
                                 "moment, your order is kept.") from exc
        except stripe.StripeError as exc:
            log.warning("stripe refused checkout for order %s: %s", order["id"], exc)
            raise PaymentError("The payment service is not available right now.") from exc
        return session.id, session.url

    async def ensure_customer(self, user_id: int, email: str) -> str:
        """A Stripe Customer for this shopper (the same one for a retried request: the key)."""
        try:
            customer = await self.client.v1.customers.create_async(
                params={"email": email, "metadata": {"user_id": str(user_id)}},
                options={"idempotency_key": f"watchbuy-customer-{user_id}"})
        except UNKNOWN_OUTCOME as exc:  # as in create_checkout: the order stays
            log.warning("stripe did not answer a customer for user %s: %s", user_id, exc)
            raise PaymentUnknown("The payment service did not answer: press again in a "
                                 "moment, your order is kept.") from exc
        except stripe.StripeError as exc:
            log.warning("stripe refused a customer for user %s: %s", user_id, exc)
            raise PaymentError("The payment service is not available right now.") from exc
        return customer.id

    async def charge_saved(self, order: dict, customer: str,
                           payment_method: str) -> tuple[str, str] | None:
        """Pay a pending order with the shopper's saved card, off-session, at once:
        (payment intent id, its status), or None when Stripe wants the buyer present (the card
        needs authentication, was declined, or is gone): then Checkout takes over.  A request
        without an answer is sent again with the same idempotency key (never a second charge).
        Raises PaymentError when Stripe refused the request (nothing was charged), and
        :class:`PaymentUnknown` when no attempt got an answer: the charge may have been made,
        so the caller must not give the stock back."""
        for attempt in range(1, CHARGE_ATTEMPTS + 1):
            try:
                intent = await self.client.v1.payment_intents.create_async(
                    params={"amount": order["total_minor"], "currency": order["currency"],
                            "customer": customer, "payment_method": payment_method,
                            "off_session": True, "confirm": True,
                            "metadata": {"order_id": str(order["id"])}},
                    options={"idempotency_key": f"{idempotency_key(order)}-saved"})
            except stripe.CardError as exc:  # authentication_required, declined: not a failure
                log.info("saved card refused for order %s (%s): Checkout instead", order["id"],
                         exc.code)
                return None
            except UNKNOWN_OUTCOME as exc:
                log.warning("order %s: saved-card payment attempt %d of %d got no answer: %s",
                            order["id"], attempt, CHARGE_ATTEMPTS, exc)
                if attempt == CHARGE_ATTEMPTS:
                    raise PaymentUnknown(
                        "The payment service did not answer: your orders page shows "
                        "whether this payment went through.") from exc
                continue
            except stripe.StripeError as exc:
                log.warning("stripe refused a saved-card payment for order %s: %s",
                            order["id"], exc)
                raise PaymentError("The payment service is not available right now.") from exc
            return intent.id, intent.status
        raise AssertionError("unreachable")  # the loop returns or raises

    async def card_of(self, payment_intent: str) -> tuple[str, str, str] | None:
        """(payment method id, card brand, last four) a payment was made with, or None."""
        intent = await self.client.v1.payment_intents.retrieve_async(
            payment_intent, params={"expand": ["payment_method"]})
        method = intent.payment_method
        if method is None or isinstance(method, str) or getattr(method, "card", None) is None:
            return None
        return method.id, method.card.brand, method.card.last4

    async def expire_checkout(self, session_id: str) -> str:
        """Make a session unpayable: "expired" when it is (now or already), "complete" when the
        buyer has paid or is paying (the payment is coming: keep the stock); PaymentError when
        Stripe cannot say (the order must stay as it is)."""
        try:
            session = await self.client.v1.checkout.sessions.expire_async(session_id)
            return session.status
        except stripe.StripeError as exc:
            # Stripe refuses to expire a session that is not open: ask which state it is in.
            refusal = exc
        try:
            session = await self.client.v1.checkout.sessions.retrieve_async(session_id)
        except stripe.StripeError as exc:
            log.warning("stripe could not expire session %s: %s; %s", session_id, refusal, exc)
            raise PaymentError("The payment service is not available right now; "
                               "try again in a minute.") from exc
        if session.status in ("expired", "complete"):
            return session.status
        log.warning("stripe could not expire open session %s: %s", session_id, refusal)
        raise PaymentError("The payment service is not available right now; "
                           "try again in a minute.") from refusal

    async def intent_status(self, payment_intent: str) -> str:
        """A PaymentIntent's status; PaymentError when Stripe cannot say."""
        try:
            return (await self.client.v1.payment_intents.retrieve_async(payment_intent)).status
        except stripe.StripeError as exc:
            raise PaymentError("The payment service is not available right now; "
                               "try again in a minute.") from exc

    async def cancel_intent(self, payment_intent: str) -> str:
        """Make an off-session PaymentIntent unpayable: "canceled" when it is, else the status
        that stopped it ("succeeded", "processing": the payment is coming, keep the stock);
        PaymentError when Stripe cannot say."""
        try:
            return (await self.client.v1.payment_intents.cancel_async(payment_intent)).status
        except stripe.StripeError as exc:
            refusal = exc  # Stripe refuses to cancel a succeeded or processing intent
        status = await self.intent_status(payment_intent)
        if status in ("canceled", "succeeded", "processing"):
            return status
        log.warning("stripe could not cancel payment %s (%s): %s", payment_intent, status,
                    refusal)
        raise PaymentError("The payment service is not available right now; "
                           "try again in a minute.") from refusal

    async def refund(self, payment_intent: str, order_id: int) -> str:
        """Refund a payment in full; the refund's id.  Idempotent per payment (a retried webhook
        never refunds twice)."""
        refund = await self.client.v1.refunds.create_async(
            params={"payment_intent": payment_intent,
                    "metadata": {"order_id": str(order_id)}},
            options={"idempotency_key": f"watchbuy-refund-{payment_intent}"})
        return refund.id

    def parse_event(self, payload: bytes, signature: str | None):
        """The verified event as a plain dict; raises ValueError or SignatureVerificationError."""
        event = stripe.Webhook.construct_event(payload, signature, self.webhook_secret)
        # Since stripe 12 its objects are not dicts (.get raises AttributeError): the webhook
        # handler reads plain dicts.
        return event.to_dict()


async def fulfil(db: Database, order_id: int, site: SiteState | None = None) -> bool:
    """Mark a pending order paid (once); with ``site``, the rooms of its products announce it
    ("<first name> just bought <product>", for shoppers who did not opt out)."""
    paid = await queries.mark_paid(db, order_id)
    if paid:
        log.info("order %s paid", order_id)
        if site is not None:
            await announce_purchase(site, order_id)
    return paid


async def announce_purchase(site: SiteState, order_id: int) -> None:
    """``{"type": "bought", "first_name", "product_id", "product_name"}`` in the room of each
    product of a paid order: the first word of the buyer's display name only."""
    try:
        lines = await shopping.purchase_announcements(site["db"], order_id)
    except Exception as exc:  # the payment stands; a database hiccup costs the ticker only
        announce_log.warning("bought", "purchase of order %s not announced: %s", order_id, exc)
        return
    await publish_purchases(site, order_id, lines)


async def publish_purchases(site: SiteState, order_id: int, lines: list[dict]) -> None:
    """The "bought" events of :func:`announce_purchase` from its lines as
    :func:`shopping.purchase_announcements` gives them (a caller that has them already, Buy
    now, saves the query)."""
    from watchbuy.site.chat import publish_room_event, strip_invisible

    try:
        for line in lines:
            first = (strip_invisible(line["display_name"]).split() or ["Someone"])[0]
            # coalesced per room: a viewer whose queue still holds an unsent "bought" gets
            # the newer one instead (a rush of sales is a ticker, not a backlog that could
            # overflow the queue and cut the viewer off)
            await publish_room_event(site["broker"], line["channel_id"], {
                "type": "bought", "first_name": first, "product_id": line["product_id"],
                "product_name": line["product_name"], "coalesce": "bought"})
    except Exception as exc:  # the payment stands; a broker hiccup costs the ticker only
        announce_log.warning("bought", "purchase of order %s not announced: %s", order_id, exc)


async def release(site: SiteState, order_id: int, status: str) -> bool:
    """Cancel or expire a pending order and give its stock back (the rooms are told)."""
    released = await queries.release_order(site["db"], order_id, status)
    if released:
        log.info("order %s %s; stock released", order_id, status)
        await announce_stock(site, await queries.order(site["db"], order_id), units_back=True)
    return released


async def cancel(site: SiteState, order: dict) -> str:
    """The shopper cancels a pending order: "cancelled", or "paying" when Stripe says the buyer
    has already paid (the webhook will fulfil it; the stock stays reserved).  PaymentError when
    Stripe cannot be asked: nothing changes, the shopper can try again."""
    if order["status"] != "pending":
        return order["status"]
    if order["payment_mode"] == "stripe" and order["payment_ref"] and \
            site["payments"] is not None:
        # First make the session (or off-session PaymentIntent) unpayable, only then give the
        # stock back: the other order would let the buyer pay for units sold again.
        if order["payment_ref"].startswith("pi_"):
            state = await site["payments"].cancel_intent(order["payment_ref"])
            paying = state in ("succeeded", "processing")
        else:
            state = await site["payments"].expire_checkout(order["payment_ref"])
            paying = state == "complete"
        if paying:
            log.info("order %s: cancel refused, its checkout session is complete", order["id"])
            return "paying"
    await release(site, order["id"], "cancelled")
    return "cancelled"


async def late_payment(site: SiteState, order: dict, payment_intent: str | None) -> str:
    """A payment arrived for an order that is no longer pending.  Returns what became of it:
    "paid" (already, or the stock was reserved again), "refunded", or "unresolved"."""
    if order["status"] in ("paid", "refunded"):
        return order["status"]  # another event for the same payment: already handled
    log.error("order %s was %s when its payment arrived", order["id"], order["status"])
    note = await queries.reopen_paid_order(site["db"], order["id"])
    if note is not None:
        log.error("order %s: stock reserved again, the order is paid", order["id"])
        if queries.SALE_UNITS_GONE in note:
            # paid at the sale price already: kept (a refund would lose a sale the shopper
            # paid for), but the host sold more at that price than the sale offered
            log.error("order %s: %s", order["id"], queries.SALE_UNITS_GONE)
        await announce_stock(site, order)  # units taken again, not given back
        return "paid"
    if not payment_intent:
        log.error("order %s: sold out and no payment intent to refund: refund it by hand",
                  order["id"])
        return "unresolved"
    gateway = site["payments"]
    assert gateway is not None  # only Stripe's webhook reports payments
    refund_id = await gateway.refund(payment_intent, order["id"])
    await queries.mark_refunded(site["db"], order["id"],
                                "refunded: sold out while you paid")
    log.error("order %s: sold out meanwhile, payment %s refunded (%s)", order["id"],
              payment_intent, refund_id)
    return "refunded"


async def announce_stock(site: SiteState, order: dict, units_back: bool = False) -> None:
    """The rooms of the order's products hear their new stock (coalesced, never awaited: a
    burst of expiries or cancels is one event per product, as a burst of sales is).
    ``units_back``: the order gave its units back (released): a room told "sold out" hears
    it at once, and so does every process's sold-out board (shop.StockNotifier.changed)."""
    from watchbuy.site.shop import stock_notifier  # shop imports this module

    notifier = stock_notifier(site)
    for item in order["items"]:
        notifier.changed(item["product_id"], units_back=units_back)


def check_test_card(number: str, expiry: str, cvc: str, today: date | None = None) -> str | None:
    """None when the test card is acceptable, else the message for the form."""
    problem = test_card_problem(number, expiry, cvc, today)
    return None if problem is None else problem[1]


def test_card_problem(number: str, expiry: str, cvc: str,
                      today: date | None = None) -> tuple[str, str] | None:
    """None when the test card is acceptable, else (the field at fault, its message)."""
    digits = "".join(ch for ch in number if ch.isdigit())
    if digits != TEST_CARD:
        return "card", "Test mode accepts only the test card 4242 4242 4242 4242."
    month_text, _, year_text = expiry.replace(" ", "").partition("/")
    try:
        month, year = int(month_text), int(year_text)
    except ValueError:
        return "expiry", "Enter the expiry date as MM/YY."
    if year < 100:
        year += 2000
    today = today or date.today()
    if not 1 <= month <= 12 or (year, month) < (today.year, today.month):
        return "expiry", "That expiry date is not in the future."
    if not (cvc.isdigit() and 3 <= len(cvc) <= 4):
        return "cvc", "Enter the 3 or 4 digit security code."
    return None


async def expire_stale_test_orders(site: SiteState) -> int:
    """Release test-mode orders nobody paid within the reservation time; returns how many."""
    cutoff = time.time() - site["settings"].test_reservation_minutes * 60
    released = 0
    for order_id in await queries.stale_pending_orders(site["db"], cutoff, "test"):
        released += await release(site, order_id, "expired")
    return released


async def settle_stale_intent_orders(site: SiteState) -> int:
    """Pending off-session (PaymentIntent) orders older than the checkout time, whose webhook
    never settled them: their intent's status decides.  Succeeded: paid; processing: still
    waiting; anything else is made unpayable (cancelled) and its stock released.  Orders whose
    charge got no answer at all (no intent id) are left for the shopper or an operator: their
    outcome is unknown and their stock must not be sold twice.  Returns how many changed."""
    gateway = site["payments"]
    if gateway is None:
        return 0
    cutoff = time.time() - site["settings"].checkout_minutes * 60
    changed = 0
    for order_id in await queries.stale_pending_orders(site["db"], cutoff, "stripe"):
        order = await queries.order(site["db"], order_id)
        if order is None or order["status"] != "pending" or \
                not (order["payment_ref"] or "").startswith("pi_"):
            continue
        try:
            status = await gateway.intent_status(order["payment_ref"])
            if status == "succeeded":
                changed += await fulfil(site["db"], order_id, site)
            elif status != "processing":
                if status != "canceled":
                    status = await gateway.cancel_intent(order["payment_ref"])
                if status == "canceled":
                    changed += await release(site, order_id, "expired")
        except PaymentError as exc:  # Stripe unreachable: the next round asks again
            log.warning("order %s: payment %s not settled: %s", order_id,
                        order["payment_ref"], exc)
    return changed
