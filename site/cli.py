"""``watchbuy site``: the shop on its own (media nodes run elsewhere).

:func:`uvicorn_server` is the one place the site's HTTP server is configured, for ``watchbuy
site`` and ``watchbuy serve`` alike: connection-level limits (header size and time, websocket
message size, pings) and which proxies may set X-Forwarded-For.  Body size and body time are
the security middleware's (site/security.py), which sees each request's content type.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from starlette.types import ASGIApp, Receive, Scope, Send

from watchbuy.logs import LogLimiter
from watchbuy.site.config import SiteSettings, load_site_settings
from watchbuy.site.observe import PEER_KEY, install_request_id_filter
from watchbuy.supervise import Supervisor, reuse_port_socket, watch_supervisor

log = logging.getLogger("watchbuy.site.http")
workers_log = logging.getLogger("watchbuy.site.workers")
limited_log = LogLimiter(log, interval=10.0)


def guarded_http_protocol(max_header_bytes: int, header_timeout: float) -> type:
    """uvicorn's httptools protocol with a bound on the request head: at most
    ``max_header_bytes`` (httptools itself keeps any amount of header bytes it is sent) and at
    most ``header_timeout`` seconds from connecting, or from a request's first byte, to its
    last header line (a client that trickles headers, or sends nothing, holds a connection
    and a socket forever otherwise).  Over either: 431/408 and the connection is closed."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._head_bytes = 0
            self._in_head = True  # between a request's first byte and its last header
            self._heads_done = 0
            self._head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            heads_done = self._heads_done
            super().data_received(data)
            if not self._in_head or self.transport.is_closing():
                return
            # Count only chunks that did not finish a head: a chunk that did may carry a body,
            # which is not the head's.  httptools keeps at most one chunk beyond the limit.
            self._head_bytes = self._head_bytes + len(data) if heads_done == self._heads_done \
                else 0
            if self._head_bytes > max_header_bytes:
                limited_log.warning("head-size", "closed a connection from %s: request head "
                                    "over %d bytes", self._peer(), max_header_bytes)
                self._refuse(431, "Request header fields too large")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = True
            self._head_bytes = 0
            if self._head_timer is None:
                self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._heads_done += 1
            self._cancel_head_timer()
            super().on_headers_complete()

        def _arm_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or not self._in_head:
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a response is still being written: not a slow head
            limited_log.warning("head-time", "closed a connection from %s: no complete "
                                "request head within %g s", self._peer(), header_timeout)
            self._refuse(408, "Request timeout")

        def _refuse(self, status: int, reason: str) -> None:
            body = reason.encode()
            self.transport.write(
                f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
            self.transport.close()

        def _peer(self) -> str:
            return self.client[0] if self.client else "?"

    return GuardedHttpToolsProtocol


class KeepPeer:
    """Records the connection's own peer (``scope["watchbuy.peer"]``) before proxy headers
    replace ``scope["client"]`` with the address the proxy reports."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope[PEER_KEY] = scope.get("client")
        await self.app(scope, receive, send)


class DrainCutFilter(logging.Filter):
    """Drops uvicorn's traceback for each request cut off at the end of a drain: uvicorn has
    already said so in one line ("Cancel N running task(s), timeout graceful shutdown
    exceeded"), and a traceback per request would flood the log of a busy process."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, asyncio.CancelledError)
                    and "graceful shutdown" in str(exc))


def uvicorn_server(app, settings: SiteSettings):
    """The site's uvicorn server, with every connection-level limit from ``settings``."""
    import uvicorn

    from watchbuy.site.wsframes import FrameProtocol

    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(item, DrainCutFilter) for item in uvicorn_log.filters):
        uvicorn_log.addFilter(DrainCutFilter())

    proxies = [item.strip() for item in settings.trusted_proxies.split(",") if item.strip()]
    served = app
    if proxies:
        from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

        # uvicorn's own proxy-header handling, applied here rather than by uvicorn so that the
        # peer it replaces is kept: the request id trusts X-Request-Id only from a proxy.
        served = KeepPeer(ProxyHeadersMiddleware(app, trusted_hosts=proxies))
    config = uvicorn.Config(
        served, host=settings.site_host, port=settings.site_port,
        log_level=settings.log_level.lower(), lifespan="on", access_log=False,
        http=guarded_http_protocol(settings.max_header_bytes, settings.header_timeout),
        # uvicorn's websockets-sansio protocol with the room's frame writer (site/wsframes.py)
        ws=FrameProtocol, ws_max_size=settings.ws_max_bytes,
        ws_ping_interval=settings.ws_ping_interval or None,
        ws_ping_timeout=settings.ws_ping_timeout or None,
        # SIGTERM: stop accepting, let in-flight requests finish within the bound, then cut
        timeout_graceful_shutdown=settings.site_drain_seconds,
        # X-Forwarded-For/-Proto only from the named proxies (the load balancer): uvicorn
        # would otherwise trust 127.0.0.1, and request.client.host is what login throttling
        # counts by.
        proxy_headers=False)
    return uvicorn.Server(config)


def run_site(args: argparse.Namespace) -> int:
    from watchbuy.cli import install_uvloop, setup_logging

    settings = load_site_settings(site_port=args.port, site_workers=args.workers)
    setup_logging(settings.log_level)
    install_request_id_filter()
    if args.worker is not None:
        install_uvloop()
        asyncio.run(serve_worker(settings, args.worker, args.supervisor))
        return 0
    if settings.site_workers > 1:
        return supervise(settings)
    install_uvloop()
    from watchbuy.site.app import create_app

    app = create_app(settings)
    server = uvicorn_server(app, settings)
    print(f"WatchBuy site on {settings.public_url}", flush=True)
    asyncio.run(server.serve())
    return 0


# -- several processes on one port ---------------------------------------------------------------
#
# Why not uvicorn's own ``workers=N``: its supervisor (uvicorn.supervisors.Multiprocess) starts
# workers with multiprocessing's spawn and pickles the Config into them, so the app must be an
# import string or factory (ours is built from settings by create_app) and the protocol class
# must be importable (ours is made per settings by guarded_http_protocol); and its workers share
# one listening socket instead of SO_REUSEPORT, which spreads connections over the processes
# by the kernel rather than by whichever process wakes first.  Each worker here is an ordinary
# ``watchbuy site`` process (its own uvicorn server and event loop, the same uvicorn_server
# configuration) bound with SO_REUSEPORT; the supervisor only starts, restarts and stops them.


async def serve_worker(settings: SiteSettings, index: int, supervisor: int | None) -> None:
    """One worker of ``watchbuy site --workers N``: the site on a SO_REUSEPORT socket.  The
    supervisor has migrated the database already; the worker ends itself when its supervisor
    is gone (killed, not stopped), rather than serving on unsupervised."""
    from watchbuy.site.app import create_app

    app = create_app(settings, run_migrations=False)
    server = uvicorn_server(app, settings)
    sock = reuse_port_socket(settings.site_host, settings.site_port)

    def orphaned() -> None:
        workers_log.warning("site worker %d: supervisor %s gone, stopping", index, supervisor)
        server.should_exit = True

    watch = asyncio.ensure_future(watch_supervisor(supervisor, orphaned)) \
        if supervisor is not None else None
    try:
        await server.serve(sockets=[sock])
    finally:
        if watch is not None:
            watch.cancel()


async def prepare_shared(settings: SiteSettings) -> None:
    """What the workers share, checked once before any starts: the database, migrated here
    (not by N workers racing), and Redis, reachable (raises BrokerUnavailable, an OSError)."""
    from watchbuy.db.database import Database
    from watchbuy.db.migrations import upgrade
    from watchbuy.site.broker import make_broker

    db = Database(settings.database_url)
    await db.connect()
    try:
        applied = await upgrade(db)
        if applied:
            workers_log.info("database migrated to version %d", applied[-1])
    finally:
        await db.disconnect()
    broker = make_broker(settings.broker_url, settings.broker_prefix)
    await broker.start()
    await broker.close()


def supervise(settings: SiteSettings) -> int:
    """``watchbuy site --workers N``: N worker processes on one port, restarted when they die,
    drained on SIGTERM/SIGINT."""
    asyncio.run(prepare_shared(settings))
    holder = reuse_port_socket(settings.site_host, settings.site_port)
    port = holder.getsockname()[1]
    try:
        if port != settings.site_port:  # --port 0: the public URL names the port we got
            settings = load_site_settings(site_port=port, site_workers=settings.site_workers)
        print(f"WatchBuy site on {settings.public_url} ({settings.site_workers} processes)",
              flush=True)
        # Workers get SIGTERM and uvicorn's graceful-shutdown bound for requests in flight.
        supervisor = Supervisor("site worker", settings.site_workers,
                                lambda index: worker_command(port, index),
                                settings.site_drain_seconds, settings.site_restart_delay,
                                settings.site_restart_delay_max, workers_log)
        return asyncio.run(supervisor.run())
    finally:
        holder.close()


def worker_command(port: int, index: int) -> list[str]:
    # The same settings reach the worker as reached us: the environment (inherited) and the
    # port, now resolved; the generated secrets are files in the data folder, written before
    # any worker starts (load_site_settings), so every worker reads the same ones.
    return [sys.executable, "-m", "watchbuy", "site", "--port", str(port),
            "--worker", str(index), "--supervisor", str(os.getpid())]


def register(subparsers) -> None:
    site = subparsers.add_parser("site", help="run the shop site (Starlette)")
    site.add_argument("--port", type=int, help="site port (default 8080)")
    site.add_argument("--workers", type=int, help="site processes on the port (default 1; "
                      "more need a Redis broker: WATCHBUY_BROKER_URL)")
    # Set by the supervisor on the processes it starts, not by people.
    site.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    site.add_argument("--supervisor", type=int, help=argparse.SUPPRESS)
    site.set_defaults(run=run_site)
