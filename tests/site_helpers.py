"""Helpers for the shop site's tests: servers, pages, users, websockets, a Stripe stand-in.

The fixtures that use them live in site_fixtures.py (load it with
``pytest_plugins = ["site_fixtures"]``); test modules import helpers from here.

* Real servers (MariaDB, Redis): mandatory in CI (``CI=true``), elsewhere a loud skip where no
  server answers (see :func:`require_server`).
* :class:`Browser` is one visitor: an ``httpx.AsyncClient`` over ``httpx.ASGITransport`` with
  their own cookies, sending the CSRF token of the page they last saw with every form, as a
  browser does.  :class:`SyncSite` is the app under Starlette's ``TestClient`` (websockets); its
  ``call`` runs async helpers on the app's loop.
* :class:`StripeStandIn` answers ``POST /v1/checkout/sessions`` as Stripe does, for the official
  ``stripe`` library; :func:`stripe_signature` signs webhooks with Stripe's real scheme.

Argon2 costs 0.2-0.4 s per hash on a small machine, so most tests make their users directly in
the database with one precomputed hash (:func:`make_user`) and start sessions directly; the
accounts tests use the real sign-up and log-in forms.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import time
import uuid
import warnings
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pymysql
import pytest
import redis
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchbuy.db import queries
from watchbuy.site import security
from watchbuy.site.accounts import ensure_channel
from watchbuy.site.app import create_app
from watchbuy.site.config import SiteSettings, load_site_settings
from watchbuy.site.media import MediaDirectory

with warnings.catch_warnings():
    # Starlette 1.x would rather use httpx2 under TestClient; httpx works the same here.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MYSQL_URL = os.environ.get("WATCHBUY_TEST_MYSQL_URL", "mysql+aiomysql://root:@127.0.0.1:3306")
REDIS_URL = os.environ.get("WATCHBUY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PASSWORD = "correct horse battery"

_skipped_servers: set[str] = set()


# -- real servers: mandatory in CI, a loud skip elsewhere --------------------------------------


def require_server(problem: str | None, what: str) -> None:
    if problem is None:
        return
    if IN_CI:
        pytest.fail(f"{what} did not answer ({problem}); it is mandatory in CI (CI=true)",
                    pytrace=False)
    _skipped_servers.add(what)
    pytest.skip(f"!!! NOT TESTED: {what} did not answer ({problem}); start it to run these "
                "tests (they are mandatory in CI)")


def _mysql_parts():
    parts = urlsplit(MYSQL_URL)
    return {"host": parts.hostname or "127.0.0.1", "port": parts.port or 3306,
            "user": parts.username or "root", "password": parts.password or ""}


def mysql_connect(database: str | None = None) -> pymysql.Connection:
    return pymysql.connect(**_mysql_parts(), database=database, connect_timeout=2,
                           autocommit=True, charset="utf8mb4")


@functools.cache
def mysql_problem() -> str | None:
    try:
        mysql_connect().close()
    except Exception as exc:  # any reason at all means: no usable server here
        return f"{type(exc).__name__}: {exc}"
    return None


def mysql_url(database: str) -> str:
    return f"{MYSQL_URL.rstrip('/')}/{database}"


@functools.cache
def redis_problem() -> str | None:
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def fresh_mysql_database():
    """A new, empty MariaDB database; dropped afterwards.  Yields its name."""
    require_server(mysql_problem(), f"MariaDB at {MYSQL_URL}")
    name = f"wb_test_{uuid.uuid4().hex}"
    with contextlib.closing(mysql_connect()) as conn, conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield name
    finally:
        with contextlib.closing(mysql_connect()) as conn, conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")


def empty_mysql_database(name: str) -> None:
    """Delete every row (the tables stay: migrating afresh costs ~1 s per test on MariaDB)."""
    with contextlib.closing(mysql_connect(name)) as conn, conn.cursor() as cursor:
        cursor.execute("SHOW TABLES")
        tables = [row[0] for row in cursor.fetchall()]
        cursor.execute("SET FOREIGN_KEY_CHECKS=0")
        for table in tables:
            if table != "schema_version":
                cursor.execute(f"DELETE FROM `{table}`")


# -- pages ----------------------------------------------------------------------------------------

CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)"')
CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_from_html(html: str) -> str | None:
    found = CSRF_META.search(html) or CSRF_INPUT.search(html)
    return found.group(1) if found else None


def error_texts(html: str) -> list[str]:
    """The messages of the page's error list (``<ul class="errors">``)."""
    block = re.search(r'<ul class="errors">(.*?)</ul>', html, re.S)
    return re.findall(r"<li>(.*?)</li>", block.group(1), re.S) if block else []


# -- the app ----------------------------------------------------------------------------------------


def site_settings(data_dir, database_url: str, **overrides) -> SiteSettings:
    # WATCHBUY_ENV_FILE=/dev/null: a developer's ./watchbuy.env must not change the tests.
    return load_site_settings(environ={"WATCHBUY_ENV_FILE": os.devnull},
                              data_dir=str(data_dir), database_url=database_url, **overrides)


class FakeNode:
    """The media node's stats as the site sees them (no node runs in these tests)."""

    def __init__(self) -> None:
        self.streams: list[dict] = []

    def __call__(self) -> dict:
        return {"node_id": "local", "streams": self.streams}


def build_app(settings: SiteSettings, node: FakeNode | None = None) -> Starlette:
    media = MediaDirectory(settings, local_stats=node or FakeNode(), cache_seconds=0)
    return create_app(settings, media=media)


@functools.cache
def password_hash() -> str:
    return security.hash_password(PASSWORD)


async def make_user(db, name: str, host: bool = False, email: str | None = None) -> dict:
    """A user made directly in the database (password: PASSWORD), with a room for hosts."""
    local = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "user"
    email = email or f"{local}-{uuid.uuid4().hex[:6]}@example.test"
    user_id = await queries.create_user(db, email, name, password_hash(), host)
    user = {"id": user_id, "email": email, "password": PASSWORD, "display_name": name,
            "is_host": host, "channel": None}
    if host:
        user["channel"] = await ensure_channel(db, user_id, name)
    return user


async def make_product(db, host: dict, name: str = "Ceramic mug", price_minor: int = 1800,
                       stock: int = 10, currency: str = "usd", description: str = "") -> dict:
    product_id = await queries.create_product(db, host["id"], name, description, price_minor,
                                              currency, stock, None)
    return await queries.product(db, product_id)


async def start_session(db, user: dict, days: float = 1.0) -> str:
    return await security.start_session(db, user["id"], days)


async def table_counts(db) -> dict[str, int]:
    """Rows per table: 'changes nothing' is checked against this."""
    from watchbuy.db.schema import metadata

    counts = {}
    for table in metadata.sorted_tables:
        counts[table.name] = int(await db.fetch_val(f"SELECT COUNT(*) FROM {table.name}"))
    return counts


class Browser:
    """One visitor: their own cookies, and the CSRF token of the last page they saw."""

    def __init__(self, app: Starlette) -> None:
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                      base_url="http://testserver")
        self.csrf: str | None = None

    async def get(self, url: str, **kwargs) -> httpx.Response:
        response = await self.http.get(url, **kwargs)
        token = csrf_from_html(response.text) if "html" in \
            response.headers.get("content-type", "") else None
        if token:
            self.csrf = token
        return response

    async def post(self, url: str, data: dict | None = None, files=None, csrf: bool = True,
                   **kwargs) -> httpx.Response:
        data = dict(data or {})
        if csrf:
            if self.csrf is None:
                await self.get("/login")  # any page: it sets the CSRF cookie and shows the token
            data = {"csrf_token": self.csrf, **data}
        return await self.http.post(url, data=data, files=files, **kwargs)

    async def fetch(self, url: str, data: dict, accept_json: bool = True) -> httpx.Response:
        """A script's fetch(): the token in the X-CSRF-Token header."""
        if self.csrf is None:
            await self.get("/login")
        headers = {"X-CSRF-Token": self.csrf}
        if accept_json:
            headers["Accept"] = "application/json"
        return await self.http.post(url, data=data, headers=headers)

    def login_with(self, token: str) -> None:
        self.http.cookies.set(security.SESSION_COOKIE, token)

    @property
    def session_cookie(self) -> str | None:
        return self.http.cookies.get(security.SESSION_COOKIE)

    async def aclose(self) -> None:
        await self.http.aclose()


async def sign_up(browser: Browser, email: str, name: str, password: str = PASSWORD,
                  host: bool = False) -> httpx.Response:
    """The sign-up form, as a person fills it in (costs one argon2 hash)."""
    await browser.get("/signup")
    return await browser.post("/signup", {
        "email": email, "display_name": name, "password": password,
        "account_type": "host" if host else "shopper"})


async def log_in(browser: Browser, email: str, password: str = PASSWORD,
                 next_url: str | None = None) -> httpx.Response:
    """The log-in form (costs one argon2 verification)."""
    await browser.get("/login" + (f"?next={next_url}" if next_url else ""))
    data = {"email": email, "password": password}
    if next_url is not None:
        data["next"] = next_url
    return await browser.post("/login", data)


async def add_product_with_form(browser: Browser, name: str, price: str, stock: str,
                                description: str = "", image: tuple | None = None):
    """The studio's product form (multipart, like the browser sends it)."""
    await browser.get("/studio/products/new")
    files = {"image": image} if image else None
    return await browser.post("/studio/products/new", {
        "name": name, "description": description, "price": price, "stock": stock},
        files=files)


@dataclass
class Site:
    app: Starlette
    settings: SiteSettings
    node: FakeNode
    stack: contextlib.AsyncExitStack

    @property
    def db(self):
        return self.app.state.db

    async def browser(self, user: dict | None = None) -> Browser:
        """A new visitor; logged in as ``user`` (a session made directly) when given."""
        browser = Browser(self.app)
        self.stack.push_async_callback(browser.aclose)
        if user is not None:
            browser.login_with(await start_session(self.db, user))
        return browser

    async def user(self, name: str, host: bool = False) -> dict:
        return await make_user(self.db, name, host)

    async def product(self, host: dict, **kwargs) -> dict:
        return await make_product(self.db, host, **kwargs)


# -- the same app under Starlette's TestClient (websockets) ---------------------------------------


@dataclass
class SyncSite:
    app: Starlette
    client: TestClient
    settings: SiteSettings
    node: FakeNode
    _csrf_cookie: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    @property
    def db(self):
        return self.app.state.db

    def call(self, fn, *args):
        """Run ``await fn(*args)`` on the app's event loop."""
        return self.client.portal.call(fn, *args)

    def user(self, name: str, host: bool = False) -> dict:
        user = self.call(make_user, self.db, name, host)
        user["session"] = self.call(start_session, self.db, user)
        return user

    def product(self, host: dict, **kwargs) -> dict:
        return self.call(functools.partial(make_product, self.db, host, **kwargs))

    def cookies(self, user: dict | None) -> dict[str, str]:
        cookie = f"{security.CSRF_COOKIE}={self._csrf_cookie}"
        if user is not None:
            cookie += f"; {security.SESSION_COOKIE}={user['session']}"
        return {"cookie": cookie}

    def post(self, url: str, user: dict | None, data: dict, **kwargs) -> httpx.Response:
        # the token is bound to the session when there is one, as the site computes it
        token = security.csrf_token_for(self.settings.secret_key, self._csrf_cookie,
                                        user["session"] if user is not None else "")
        return self.client.post(url, data={"csrf_token": token, **data},
                                headers=self.cookies(user), follow_redirects=False, **kwargs)

    def websocket(self, slug: str, user: dict | None = None):
        return self.client.websocket_connect(f"/ws/room/{slug}", headers=self.cookies(user))


@contextlib.contextmanager
def run_sync_site(data_dir, database_url: str, prepare=None, **overrides):
    settings = site_settings(data_dir, database_url, **overrides)
    node = FakeNode()
    app = build_app(settings, node)
    if prepare is not None:
        prepare(app)
    with TestClient(app) as client:
        yield SyncSite(app, client, settings, node)


def ws_receive(ws, timeout: float = 5.0) -> dict:
    """The next event on a TestClient websocket; fails instead of hanging when none comes."""

    async def receive():
        with anyio.fail_after(timeout):
            return await ws._send_rx.receive()

    try:
        message = ws.portal.call(receive)
    except TimeoutError:
        raise AssertionError(f"no websocket event within {timeout:g} s") from None
    ws._raise_on_close(message)
    return json.loads(message["text"])


def ws_until(ws, kind: str, timeout: float = 5.0) -> dict:
    """The next event of type ``kind``, skipping others (product list updates and so on)."""
    deadline = time.monotonic() + timeout
    while True:
        event = ws_receive(ws, max(0.05, deadline - time.monotonic()))
        if event.get("type") == kind:
            return event


def ws_quiet(ws, seconds: float = 0.3, kind: str | None = None) -> list[dict]:
    """Events that arrive within ``seconds`` (of type ``kind`` when given)."""
    events = []

    async def drain():
        with anyio.move_on_after(seconds):
            while True:
                events.append(await ws._send_rx.receive())

    ws.portal.call(drain)
    decoded = [json.loads(m["text"]) for m in events if m.get("type") == "websocket.send"]
    return [e for e in decoded if kind is None or e.get("type") == kind]


# -- engine hooks -----------------------------------------------------------------------------


def signed_hook(secret: str, payload: dict, timestamp: int | None = None) -> dict:
    """Body and headers of an engine hook call, signed as engine/hooks.py signs them (with a
    fresh nonce unless the payload has one)."""
    from watchbuy.engine.hooks import (
        NONCE_FIELD,
        SIGNATURE_HEADER,
        TIMESTAMP_HEADER,
        new_nonce,
        sign,
    )

    payload = {NONCE_FIELD: new_nonce(), **payload}
    body = json.dumps(payload, separators=(",", ":")).encode()
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    return {"content": body,
            "headers": {"Content-Type": "application/json", TIMESTAMP_HEADER: stamp,
                        SIGNATURE_HEADER: sign(secret, stamp, body)}}


# -- a local stand-in of Stripe's API ------------------------------------------------------------

STRIPE_SECRET_KEY = "sk_test_x"
STRIPE_WEBHOOK_SECRET = "whsec_test"


class StripeStandIn:
    """POST /v1/checkout/sessions as Stripe answers it, enough for the official library.

    Records every request; the same Idempotency-Key gets the same session back, as Stripe does.
    """

    def __init__(self) -> None:
        self.sessions: dict[str, dict] = {}
        self.by_idempotency_key: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.fail_next = False
        self.url = ""
        self.app = Starlette(routes=[
            Route("/v1/checkout/sessions", self.create_session, methods=["POST"]),
        ])
        self.add_expire_and_refund()

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
        """The buyer pays on Stripe's page: the session completes with a payment intent."""
        session = self.sessions[session_id]
        session.update(status="complete", payment_status="paid",
                       payment_intent=f"pi_{secrets.token_hex(12)}")
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


