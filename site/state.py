"""What the site shares between requests: the lifespan state, typed.

``create_app`` builds one :class:`SiteState`; its lifespan starts what needs starting and
yields it, and Starlette hands every HTTP request and websocket a shallow copy of it in
``scope["state"]`` (its lifespan-state convention).  Handlers, middleware and domain
functions read it through :func:`state` / :func:`state_of`, never through ``request.app``;
domain functions take the state (or just the parts they use), never the app.

The per-request entries the security middleware adds (``user``, ``csrf_token``, ...) live in
the same scope dict; read them from ``request.state`` as before.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, TypedDict, cast

if TYPE_CHECKING:
    from jinja2 import Environment
    from starlette.applications import Starlette
    from starlette.requests import HTTPConnection

    from watchbuy.db.database import Database
    from watchbuy.site.broker import Broker
    from watchbuy.site.chat import Connections, RateLimiter, SessionWatch
    from watchbuy.site.config import SiteSettings
    from watchbuy.site.dashboard import DashboardSampler
    from watchbuy.site.hooks import HookGuard
    from watchbuy.site.media import MediaDirectory
    from watchbuy.site.metrics import SiteMetrics
    from watchbuy.site.notify import Mailer
    from watchbuy.site.pagecache import PageCache, VisitorCache
    from watchbuy.site.passwords import PasswordWorkers
    from watchbuy.site.payments import StripeGateway
    from watchbuy.site.ratelimit import RedisRateLimiter
    from watchbuy.site.roomlive import RoomLive
    from watchbuy.site.security import SessionCache
    from watchbuy.site.shows import ShowTimers
    from watchbuy.site.storage import LocalStorage, S3Storage


class SiteState(TypedDict):
    settings: SiteSettings
    db: Database
    broker: Broker
    media: MediaDirectory
    storage: LocalStorage | S3Storage
    payments: StripeGateway | None  # None: test-mode payments only
    templates: Environment
    metrics: SiteMetrics
    chat_limiter: RateLimiter | RedisRateLimiter  # per user, shared by every site process
    heart_limiter: RateLimiter | RedisRateLimiter  # heart frames per shopper, shared
    pin_limiter: RateLimiter | RedisRateLimiter  # pins per host, shared
    room_live: RoomLive  # hearts and viewer counts
    room_connections: Connections
    session_watch: SessionWatch
    dashboard: DashboardSampler
    password_workers: PasswordWorkers
    hook_guard: HookGuard
    notify_connections: Connections  # notification streams open in this process
    mailer: Mailer | None  # None: no WATCHBUY_SMTP_URL
    show_timers: ShowTimers  # ending shows after their grace period
    pages: PageCache  # public pages kept rendered (site/pagecache.py)
    visitors: VisitorCache  # a shopper's own bits of the room page (site/pagecache.py)
    sessions: SessionCache  # sessions found, kept <= 2 s, dropped on logout (site/security.py)


def state(conn: HTTPConnection) -> SiteState:
    """The site's shared state as this request or websocket sees it."""
    return state_of(conn.scope)


def state_of(scope: MutableMapping[str, Any]) -> SiteState:
    """The same from an ASGI scope (for pure ASGI middleware)."""
    found = scope.setdefault("state", {})
    if "settings" not in found:
        # A server that passes no lifespan state (httpx's ASGITransport runs no lifespan at
        # all): the same shallow copy a lifespan-aware server would have made.
        found.update(app_state(scope["app"]))
    return cast("SiteState", found)


def app_state(app: Starlette) -> SiteState:
    """The state ``create_app`` made, outside any request (tests, tools).  ``app.state``
    mirrors it only so that such callers and lifespan-less servers see the same objects."""
    return cast("SiteState", {key: app.state[key] for key in app.state})
