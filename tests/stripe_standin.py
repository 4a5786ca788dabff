"""A local stand-in of Stripe's API, for the official ``stripe`` library, and Stripe's
webhook signing scheme.

:class:`StripeStandIn` answers checkout sessions (create, retrieve, expire) and refunds as
Stripe does; site_fixtures.py serves it with uvicorn on 127.0.0.1 (``stripe_api``).
:func:`stripe_signature` signs webhooks with Stripe's real scheme.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

STRIPE_SECRET_KEY = "sk_test_x"
STRIPE_WEBHOOK_SECRET = "whsec_test"


def _form(body: bytes) -> dict[str, str]:
    return {key: values[-1] for key, values in parse_qs(body.decode()).items()}


class _CustomersAndIntents:
    """Customers, card PaymentMethods and PaymentIntents (one-tap buying): what
    payments.StripeGateway's ensure_customer / charge_saved / card_of call."""

    def add_customers_and_intents(self) -> None:
        self.customers: dict[str, dict] = {}
        self.methods: dict[str, dict] = {}
        self.intents: dict[str, dict] = {}
        self.by_key: dict[str, dict] = {}  # idempotency key → the object it made
        self.decline_saved = False  # the next off-session payment needs the buyer present
        # the next N payment requests are processed (the intent made, its key kept) but their
        # answer is lost: a 500, as when Stripe or the network fails after acting
        self.answers_lost = 0
        self.new_intent_status = "succeeded"  # e.g. "processing" (a bank debit, a slow bank)
        self.app.router.routes.extend([
            Route("/v1/customers", self.create_customer, methods=["POST"]),
            Route("/v1/payment_intents", self.create_intent, methods=["POST"]),
            Route("/v1/payment_intents/{intent_id}", self.retrieve_intent, methods=["GET"]),
            Route("/v1/payment_intents/{intent_id}/cancel", self.cancel_intent,
                  methods=["POST"]),
        ])

    def _card_method(self) -> dict:
        method = {"id": f"pm_{secrets.token_hex(12)}", "object": "payment_method",
                  "type": "card", "customer": None,
                  "card": {"brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2099}}
        self.methods[method["id"]] = method
        return method

    def _intent(self, amount: int, currency: str, customer: str | None, method: str,
                status: str) -> dict:
        intent = {"id": f"pi_{secrets.token_hex(12)}", "object": "payment_intent",
                  "amount": amount, "currency": currency, "customer": customer,
                  "payment_method": method, "status": status, "metadata": {}}
        self.intents[intent["id"]] = intent
        return intent

    async def create_customer(self, request: Request):
        form = _form(await request.body())
        refused = self._refusal(request, "")
        if refused:
            return refused
        key = request.headers.get("idempotency-key")
        if key and key in self.by_key:
            return JSONResponse(self.by_key[key])
        customer = {"id": f"cus_{secrets.token_hex(8)}", "object": "customer",
                    "email": form.get("email"),
                    "metadata": {"user_id": form.get("metadata[user_id]")}}
        self.customers[customer["id"]] = customer
        if key:
            self.by_key[key] = customer
        return JSONResponse(customer)

    async def create_intent(self, request: Request):
        form = _form(await request.body())
        method = self.methods.get(form.get("payment_method", ""))
        problem = ""
        if method is None:
            problem = f"No such PaymentMethod: '{form.get('payment_method')}'"
        elif method["customer"] != form.get("customer"):
            problem = "The provided PaymentMethod is not attached to this Customer."
        refused = self._refusal(request, problem)
        self.requests[-1]["form"] = form  # (_refusal recorded the request)
        if refused:
            return refused
        key = request.headers.get("idempotency-key")
        if key and key in self.by_key:
            return self._maybe_lost(self.by_key[key])
        if self.decline_saved:  # as Stripe answers an off-session payment that needs 3DS
            self.decline_saved = False
            return JSONResponse({"error": {
                "type": "card_error", "code": "authentication_required",
                "message": "This payment requires authentication."}}, 402)
        intent = self._intent(int(form["amount"]), form["currency"], form.get("customer"),
                              method["id"], self.new_intent_status)
        intent["metadata"] = {"order_id": form.get("metadata[order_id]")}
        if key:
            self.by_key[key] = intent
        return self._maybe_lost(intent)

    def _maybe_lost(self, intent: dict) -> JSONResponse:
        if self.answers_lost:
            self.answers_lost -= 1
            # Stripe-Should-Retry: false keeps the library from retrying on its own: the
            # site's retries (same idempotency key) are what is tested
            return JSONResponse({"error": {"type": "api_error",
                                           "message": "An unknown error occurred"}}, 500,
                                headers={"Stripe-Should-Retry": "false"})
        return JSONResponse(intent)

    async def cancel_intent(self, request: Request):
        intent = self.intents.get(request.path_params["intent_id"])
        problem = "" if intent else "No such payment_intent"
        if intent and intent["status"] in ("succeeded", "processing", "canceled"):
            # as Stripe refuses it
            problem = ("You cannot cancel this PaymentIntent because it has a status of "
                       f"{intent['status']}.")
        refused = self._refusal(request, problem, 400 if intent else 404)
        if refused:
            return refused
        intent["status"] = "canceled"
        return JSONResponse(intent)

    async def retrieve_intent(self, request: Request):
        intent = self.intents.get(request.path_params["intent_id"])
        refused = self._refusal(request, "" if intent else "No such payment_intent", 404)
        if refused:
            return refused
        answer = dict(intent)
        if "payment_method" in request.query_params.getlist("expand[]") or \
                request.query_params.get("expand[0]") == "payment_method":
            answer["payment_method"] = self.methods[intent["payment_method"]]
        return JSONResponse(answer)


class StripeStandIn(_CustomersAndIntents):
    """POST /v1/checkout/sessions as Stripe answers it, enough for the official library.

    Records every request; the same Idempotency-Key gets the same session back, as Stripe does.
    """

    def __init__(self) -> None:
        self.sessions: dict[str, dict] = {}
        self.by_idempotency_key: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.fail_next = False
        # the next Checkout request is answered 409, as Stripe answers a request whose
        # idempotency key another request is still using (nothing made by this one)
        self.conflict_next = False
        self.url = ""
        self.app = Starlette(routes=[
            Route("/v1/checkout/sessions", self.create_session, methods=["POST"]),
        ])
        self.add_expire_and_refund()
        self.add_customers_and_intents()

    async def create_session(self, request: Request):
        body = (await request.body()).decode()
        form = {key: values[-1] for key, values in parse_qs(body).items()}
        record = {"headers": dict(request.headers), "form": form}
        self.requests.append(record)
        if request.headers.get("authorization") != f"Bearer {STRIPE_SECRET_KEY}":
            return JSONResponse({"error": {"type": "invalid_request_error",
                                           "message": "Invalid API Key provided"}}, 401)
        if self.fail_next:  # a refusal the library does not retry
            self.fail_next = False
            return JSONResponse({"error": {"type": "invalid_request_error",
                                           "message": "Amount must be at least $0.50 usd"}},
                                400)
        if self.conflict_next:
            self.conflict_next = False
            return JSONResponse({"error": {"type": "invalid_request_error",
                                           "code": "idempotency_key_in_use",
                                           "message": "There is currently another in-progress "
                                                      "request using this Idempotent Key"}}, 409)
        key = request.headers.get("idempotency-key")
        if key and key in self.by_idempotency_key:
            return JSONResponse(self.by_idempotency_key[key])
        session_id = f"cs_test_{secrets.token_hex(12)}"
        amount = 0
        index = 0
        while f"line_items[{index}][quantity]" in form:
            amount += int(form[f"line_items[{index}][quantity]"]) * \
                int(form[f"line_items[{index}][price_data][unit_amount]"])
            index += 1
        session = {
            "id": session_id,
            "object": "checkout.session",
            "url": f"https://checkout.stripe.test/c/pay/{session_id}",
            "payment_status": "unpaid",
            "status": "open",
            "mode": form.get("mode"),
            "livemode": False,
            "amount_total": amount,
            "currency": form.get("line_items[0][price_data][currency]"),
            "client_reference_id": form.get("client_reference_id"),
            "metadata": {"order_id": form.get("metadata[order_id]")},
            "success_url": form.get("success_url"),
            "cancel_url": form.get("cancel_url"),
            "line_item_count": index,
            "expires_at": int(form["expires_at"]) if "expires_at" in form else None,
            "payment_intent": None,
            "customer": form.get("customer"),
            "setup_future_usage": form.get("payment_intent_data[setup_future_usage]"),
        }
        self.sessions[session_id] = session
        if key:
            self.by_idempotency_key[key] = session
        return JSONResponse(session)

    # -- expiring sessions, refunds (what the cancel and late-payment paths call) ------------

    def add_expire_and_refund(self) -> None:
        self.refunds: list[dict] = []
        self.refunds_by_idempotency_key: dict[str, dict] = {}
        self.expire_fails = False  # Stripe unreachable for expire/retrieve (a refusal, no retry)
        self.app.router.routes.extend([
            Route("/v1/checkout/sessions/{session_id}/expire", self.expire_session,
                  methods=["POST"]),
            Route("/v1/checkout/sessions/{session_id}", self.retrieve_session, methods=["GET"]),
            Route("/v1/refunds", self.create_refund, methods=["POST"]),
        ])

    def pay(self, session_id: str) -> dict:
        """The buyer pays on Stripe's page (with the test Visa): the session completes with a
        payment intent; a session made to keep the card attaches it to its Customer."""
        session = self.sessions[session_id]
        method = self._card_method()
        intent = self._intent(session["amount_total"], session["currency"], session["customer"],
                              method["id"], "succeeded")
        if session["customer"] and session.get("setup_future_usage"):
            method["customer"] = session["customer"]
        session.update(status="complete", payment_status="paid", payment_intent=intent["id"])
        return session

    def _refusal(self, request: Request, message: str, status: int = 400,
                 kind: str = "invalid_request_error") -> JSONResponse | None:
        self.requests.append({"headers": dict(request.headers), "path": request.url.path})
        if request.headers.get("authorization") != f"Bearer {STRIPE_SECRET_KEY}":
            return JSONResponse({"error": {"type": "invalid_request_error",
                                           "message": "Invalid API Key provided"}}, 401)
        if message:
            return JSONResponse({"error": {"type": kind, "message": message}}, status)
        return None

    async def expire_session(self, request: Request):
        session = self.sessions.get(request.path_params["session_id"])
        refused = self._refusal(request, "No such checkout.session" if session is None else
                                "Simulated outage" if self.expire_fails else "")
        if refused:
            return refused
        if session["status"] != "open":  # as Stripe answers for a complete/expired session
            return JSONResponse({"error": {
                "type": "invalid_request_error",
                "message": 'Only Checkout Sessions with a status in ["open"] can be expired. '
                           f'This Checkout Session has a status of "{session["status"]}".'}},
                400)
        session["status"] = "expired"
        return JSONResponse(session)

    async def retrieve_session(self, request: Request):
        session = self.sessions.get(request.path_params["session_id"])
        refused = self._refusal(request, "No such checkout.session" if session is None else
                                "Simulated outage" if self.expire_fails else "", 404)
        return refused or JSONResponse(session)

    async def create_refund(self, request: Request):
        form = {key: values[-1] for key, values in parse_qs((await request.body()).decode())
                .items()}
        intent = form.get("payment_intent")
        paid = [s for s in self.sessions.values() if intent and s["payment_intent"] == intent]
        refused = self._refusal(request, "" if paid else f"No such payment_intent: '{intent}'")
        if refused:
            return refused
        key = request.headers.get("idempotency-key")
        if key and key in self.refunds_by_idempotency_key:
            return JSONResponse(self.refunds_by_idempotency_key[key])
        refund = {"id": f"re_{secrets.token_hex(12)}", "object": "refund",
                  "payment_intent": intent, "amount": paid[0]["amount_total"],
                  "status": "succeeded", "metadata": {"order_id": form.get("metadata[order_id]")}}
        self.refunds.append(refund)
        if key:
            self.refunds_by_idempotency_key[key] = refund
        return JSONResponse(refund)


def stripe_settings(stripe_api: StripeStandIn) -> dict:
    return {"stripe_secret_key": STRIPE_SECRET_KEY, "stripe_webhook_secret": STRIPE_WEBHOOK_SECRET,
            "stripe_api_base": stripe_api.url}


def stripe_event(event_type: str, session: dict, **changes) -> str:
    """A signed-to-be event of ``event_type`` whose data.object is ``session`` (a Checkout
    Session, or a PaymentIntent for payment_intent.* events) with ``changes``."""
    return json.dumps({
        "id": f"evt_{secrets.token_hex(12)}",
        "object": "event",
        "api_version": "2025-01-01",
        "created": int(time.time()),
        "livemode": False,
        "type": event_type,
        "data": {"object": {**session, **changes}},
    })


def stripe_signature(payload: str, secret: str = STRIPE_WEBHOOK_SECRET,
                     timestamp: int | None = None) -> str:
    """``Stripe-Signature`` as Stripe computes it: v1 = HMAC-SHA256(secret, "t.payload")."""
    stamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{stamp}.{payload}".encode(), hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"
