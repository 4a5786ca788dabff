"""The shop site's app for tests: settings, a stand-in for the node's stats, users and products
made directly in the database, and the started app (:class:`Site`, or :class:`SyncSite` under
Starlette's ``TestClient`` for websockets; its ``call`` runs async helpers on the app's loop).

The fixtures that use them live in site_fixtures.py (``pytest_plugins = ["site_fixtures"]``).
Argon2 costs 0.2-0.4 s per hash on a small machine, so users made here share one precomputed
hash (:func:`make_user`) and sessions start directly.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import uuid
import warnings
from dataclasses import dataclass, field

import httpx
from page_helpers import PASSWORD, Browser
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning

from watchbuy.db import queries, shopping
from watchbuy.site import security
from watchbuy.site.accounts import ensure_channel
from watchbuy.site.app import create_app
from watchbuy.site.config import SiteSettings, load_site_settings
from watchbuy.site.media import MediaDirectory

with warnings.catch_warnings():
    # Starlette 1.x would rather use httpx2 under TestClient; httpx works the same here.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient


def site_settings(data_dir, database_url: str, **overrides) -> SiteSettings:
    # WATCHBUY_ENV_FILE=/dev/null: a developer's ./watchbuy.env must not change the tests.
    # Sessions read per request: tests change sessions and users straight in the database and
    # must see it at once (the session cache has its own tests, test_site_sessions.py).
    overrides.setdefault("session_cache_seconds", 0)
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


SAMPLE_ADDRESS = {"name": "Sam Shopper", "line1": "1 Market Street", "line2": "",
                  "city": "Springfield", "postal_code": "12345", "region": "OR",
                  "country": "US"}


async def make_user(db, name: str, host: bool = False, email: str | None = None,
                    address: bool = True) -> dict:
    """A user made directly in the database (password: PASSWORD), with a room for hosts and
    (unless ``address=False``) a default shipping address, as a shopper who bought before has
    (physical products need one at checkout)."""
    local = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "user"
    email = email or f"{local}-{uuid.uuid4().hex[:6]}@example.test"
    user_id = await queries.create_user(db, email, name, password_hash(), host)
    user = {"id": user_id, "email": email, "password": PASSWORD, "display_name": name,
            "is_host": host, "channel": None}
    if address:
        user["address"] = await shopping.add_address(db, user_id, SAMPLE_ADDRESS, True)
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

    async def user(self, name: str, host: bool = False, address: bool = True) -> dict:
        return await make_user(self.db, name, host, address=address)

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

    def user(self, name: str, host: bool = False, address: bool = True) -> dict:
        user = self.call(functools.partial(make_user, self.db, name, host, address=address))
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
