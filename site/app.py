"""The Starlette application: explicit routes from each page module, no magic."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from watchbuy.db.database import Database
from watchbuy.db.migrations import upgrade
from watchbuy.site import (
    accounts,
    addresses,
    buynow,
    chat,
    dashboard,
    flash,
    hooks,
    metrics,
    notify,
    rooms,
    shop,
    shows,
    studio,
)
from watchbuy.site.broker import make_broker
from watchbuy.site.config import SiteSettings
from watchbuy.site.media import MediaDirectory
from watchbuy.site.metrics import SiteMetrics
from watchbuy.site.observe import RequestContextMiddleware, install_request_id_filter
from watchbuy.site.pagecache import VISITOR_CACHE_ENTRIES, PageCache, VisitorCache
from watchbuy.site.passwords import PasswordWorkers
from watchbuy.site.payments import (
    StripeGateway,
    expire_stale_test_orders,
    settle_stale_intent_orders,
)
from watchbuy.site.ratelimit import make_rate_limiter
from watchbuy.site.replays import expire_recordings
from watchbuy.site.replays import routes as replay_routes
from watchbuy.site.roomlive import RoomLive
from watchbuy.site.security import AuthMiddleware, SessionCache, origin_of
from watchbuy.site.state import SiteState
from watchbuy.site.storage import LocalStorage, make_storage
from watchbuy.site.upkeep import repeat_until
from watchbuy.site.web import build_templates, render

log = logging.getLogger("watchbuy.site")

HERE = Path(__file__).parent
STATIC = HERE / "static"
# Front-end packages come from npm (site/frontend/package.json), installed by the set-up.
NODE_MODULES = HERE / "frontend" / "node_modules"
VENDOR = {
    "mpegts": NODE_MODULES / "mpegts.js" / "dist",
    "chart": NODE_MODULES / "chart.js" / "dist",
}


# A year: what a versioned URL names never changes (a new version is a new URL).
IMMUTABLE = "public, max-age=31536000, immutable"
# Compressed: the static files (the 275 KB player script above all) and the JSON APIs.  Not the
# HTML pages: they carry the CSRF token beside text a visitor can put there (a chat name, a
# search), the mix BREACH reads secrets from through compressed sizes.  Never websockets or
# server-sent events (the middleware passes both through).
COMPRESSED_PREFIXES = ("/static/", "/uploads/", "/api/")


class ImmutableFiles(StaticFiles):
    """Files under a versioned URL, cached by browsers and CDNs for a year."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["cache-control"] = IMMUTABLE
        return response


class CompressText:
    """Starlette's GZipMiddleware (which skips images, video and text/event-stream) on the
    paths of COMPRESSED_PREFIXES only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Level 6: most of level 9's saving on JavaScript for a fraction of the CPU.
        self.gzip = GZipMiddleware(app, minimum_size=500, compresslevel=6)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(COMPRESSED_PREFIXES):
            await self.gzip(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def vendor_version(name: str) -> str | None:
    """The installed version of a front-end package (its package.json), None when missing."""
    try:
        return json.loads((VENDOR[name].parent / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def vendor_paths() -> dict[str, str]:
    """Where templates load each front-end package from: ``/static/vendor/<name>@<version>``
    (cached for a year), or the unversioned folder when the version cannot be read."""
    paths = {}
    for name in VENDOR:
        version = vendor_version(name)
        paths[name] = f"/static/vendor/{name}@{version}" if version else f"/static/vendor/{name}"
    return paths


def vendor_mounts() -> list[Mount]:
    mounts = []
    for name, folder in VENDOR.items():
        if folder.is_dir():
            version = vendor_version(name)
            if version:
                mounts.append(Mount(f"/static/vendor/{name}@{version}",
                                    ImmutableFiles(directory=folder)))
            # unversioned too, revalidated (ETag): for pages that name the folder itself
            mounts.append(Mount(f"/static/vendor/{name}", StaticFiles(directory=folder)))
        else:
            log.warning("front-end package %s is not installed (%s): run make setup", name,
                        folder)
    return mounts


async def http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code in (301, 302, 303, 307) and exc.headers:
        return RedirectResponse(exc.headers["Location"], status_code=exc.status_code)
    if request.url.path.startswith("/api/") or \
            request.headers.get("accept", "").startswith("application/json"):
        # the exception's headers too (Retry-After on a 429)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code,
                            headers=exc.headers)
    try:
        page = render(request, "error.html", status_code=exc.status_code,
                      status=exc.status_code, message=exc.detail)
        page.headers.update(exc.headers or {})
        return page
    except Exception:  # the error page must never fail itself
        return PlainTextResponse(str(exc.detail), status_code=exc.status_code)


def make_balancer(environ: dict[str, str] | None = None):
    """A balancer over the configured media nodes, or None for the single local node.

    Only when ops name the nodes (``WATCHBUY_BALANCER_NODES``) or an Auto Scaling group
    (``WATCHBUY_BALANCER_ASG``): hosts are then sent to the least-loaded node.
    """
    import os

    from watchbuy.balancer import Balancer, BalancerSettings
    from watchbuy.settings import load_config, read_environment

    env = read_environment(os.environ if environ is None else environ)
    if not env.get("WATCHBUY_BALANCER_NODES") and not env.get("WATCHBUY_BALANCER_ASG"):
        return None
    return Balancer(load_config(BalancerSettings, env))


def create_app(settings: SiteSettings, media: MediaDirectory | None = None,
               db: Database | None = None, run_migrations: bool = True) -> Starlette:
    db = db or Database(settings.database_url)
    broker = make_broker(settings.broker_url, settings.broker_prefix)
    storage = make_storage(settings)
    media = media or MediaDirectory(settings, balancer=make_balancer())
    # What every request shares.  The lifespan completes it and yields it: Starlette then hands
    # each request and websocket a shallow copy (see site/state.py).
    shared: dict = {
        "settings": settings,
        "db": db,
        "broker": broker,
        "storage": storage,
        "media": media,
        "templates": build_templates(vendor=vendor_paths()),
        "metrics": SiteMetrics(),
        "payments": (
            StripeGateway(settings.stripe_secret_key, settings.stripe_webhook_secret,
                          settings.stripe_api_base)
            if settings.stripe_enabled else None
        ),
    }

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[SiteState]:
        await db.connect()
        if run_migrations:
            applied = await upgrade(db)
            if applied:
                log.info("database migrated to version %d", applied[-1])
        await broker.start()
        install_request_id_filter()  # the server has set up logging by now
        # Made here, not in create_app: the broker is configured by now (its prefix is what the
        # hook nonces are kept under), and these belong to the process that serves.
        shared.update(
            # per user across every site process (kept in Redis with a Redis broker)
            chat_limiter=make_rate_limiter(settings.chat_rate, 10.0, settings.broker_url,
                                           settings.broker_prefix, "chat"),
            # per shopper across every site process, like chat
            heart_limiter=make_rate_limiter(settings.heart_rate, settings.heart_window,
                                            settings.broker_url, settings.broker_prefix,
                                            "hearts"),
            # per host across every site process: each pin is a node call and a room event
            pin_limiter=make_rate_limiter(settings.pin_rate, settings.pin_window,
                                          settings.broker_url, settings.broker_prefix, "pins"),
            room_live=RoomLive(settings, broker),
            room_connections=chat.Connections(),
            session_watch=chat.SessionWatch(broker),
            dashboard=dashboard.DashboardSampler(media, db),
            password_workers=PasswordWorkers(settings.password_hash_concurrency),
            hook_guard=hooks.HookGuard(settings, broker),
            notify_connections=chat.Connections(),
            mailer=notify.make_mailer(settings),
            show_timers=shows.ShowTimers(),
            pages=PageCache(broker, settings.page_cache_seconds, settings.page_cache_entries),
            # a shopper's own bits of the room page, as long as a page (site/pagecache.py)
            visitors=VisitorCache(broker, settings.page_cache_seconds,
                                  VISITOR_CACHE_ENTRIES),
            sessions=SessionCache(broker, settings.session_cache_seconds),
        )
        for cache in ("pages", "visitors", "sessions"):
            await shared[cache].start()
        site = cast(SiteState, shared)
        # the sold-out board hears the stock events from the start: a rush's first seconds
        # (the first process to sell out) are when its marks matter most
        shop.sold_out_board(site)
        site["room_live"].start()
        # Upkeep: unpaid test-mode orders give their stock back; ended sessions and old login
        # attempts are pruned.  Stopped between rounds (see repeat_until).
        stopping = asyncio.Event()
        upkeep = [
            asyncio.ensure_future(repeat_until(
                stopping, 60.0, lambda: expire_stale_test_orders(site),
                "expiring stale test-mode orders")),
            asyncio.ensure_future(repeat_until(  # off-session payments no webhook settled
                stopping, 60.0, lambda: settle_stale_intent_orders(site),
                "settling stale off-session payments")),
            asyncio.ensure_future(repeat_until(
                stopping, settings.prune_interval,
                lambda: accounts.prune_and_log(db, settings),
                "pruning sessions and login attempts")),
            asyncio.ensure_future(repeat_until(
                stopping, 3600.0, lambda: expire_recordings(site),
                "expiring replays past WATCHBUY_RECORD_RETENTION_DAYS")),
            asyncio.ensure_future(repeat_until(
                stopping, 3600.0, lambda: notify.prune(site),
                "pruning notifications past WATCHBUY_NOTIFICATION_RETENTION_DAYS")),
            # shows whose grace period ran out while the process that got the hook stopped
            asyncio.ensure_future(repeat_until(
                stopping, max(1.0, settings.show_end_grace / 2),
                lambda: shows.end_overdue(site), "ending shows")),
            # flash sales end on time, announced by exactly one process (site/flash.py)
            asyncio.ensure_future(flash.run_ender(site, stopping)),
        ]
        try:
            yield site
        finally:
            stopping.set()
            await asyncio.gather(*upkeep)
            await site["show_timers"].stop()
            if site["mailer"] is not None:
                await site["mailer"].drain()
            for cache in ("pages", "visitors", "sessions"):
                await site[cache].close()
            await media.close()
            await site["dashboard"].stop()
            await site["chat_limiter"].close()
            await site["room_live"].close()
            await site["heart_limiter"].close()
            await site["pin_limiter"].close()
            await shop.close_sold_out_board(broker)  # made at the start (site/shop.py)
            await broker.close()
            await db.disconnect()

    routes = [
        *rooms.routes,
        *accounts.routes,
        *studio.routes,
        *shows.routes,
        *notify.routes,
        *shop.routes,
        *buynow.routes,
        *addresses.routes,
        *flash.routes,
        *hooks.routes,
        *replay_routes,
        *chat.routes,
        *dashboard.routes,
        *metrics.routes,
        *vendor_mounts(),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    if isinstance(storage, LocalStorage):
        settings.uploads_dir.mkdir(parents=True, exist_ok=True)
        routes.append(Mount("/uploads", StaticFiles(directory=settings.uploads_dir)))
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error})
    # Not read by the site's code (that reads the request's state): tests and servers that run
    # no lifespan state see the same objects through it (state.app_state).
    app.state = State(shared)
    app.add_middleware(AuthMiddleware, settings=settings,
                       media_origins=media_origins(settings, media))
    app.add_middleware(CompressText)
    # Added last, so outermost: security refusals get a request id and are counted too.
    app.add_middleware(RequestContextMiddleware, trusted_proxies=settings.trusted_proxies,
                       metrics=shared["metrics"])
    return app


def media_origins(settings: SiteSettings, media: MediaDirectory) -> list[str]:
    """Where the room player may fetch HTTP-FLV from (the pages' CSP media-src/connect-src):
    the local node, the balancer's CDN, and any origins ops list in WATCHBUY_MEDIA_ORIGINS."""
    origins = [origin_of(media.local_ingest()["play_base"])]
    cdn = getattr(media.balancer, "cdn_domain", "") if media.balancer is not None else ""
    if cdn:
        origins.append(f"https://{cdn}")
    origins += [item for item in settings.media_origins.replace(",", " ").split() if item]
    return list(dict.fromkeys(origin for origin in origins if origin))
