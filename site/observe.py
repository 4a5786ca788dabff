"""Request ids on log lines and responses, and the per-request metrics.

Every HTTP request and websocket gets a short id: made here, or taken from the request's
``X-Request-Id`` when the connection comes from one of ``WATCHBUY_TRUSTED_PROXIES`` (the load
balancer's id then follows the request through both logs).  It lives in a contextvar for the
request's duration; :class:`RequestIdFilter`, installed on the log handlers, copies it onto
every record as ``request_id``, which both log formatters print (watchbuy/cli.py).  Responses
carry it back as ``X-Request-Id``, so a user's report can be matched to the log.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
from contextvars import ContextVar

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from watchbuy.site.metrics import SiteMetrics, route_template

REQUEST_ID_HEADER = "x-request-id"
#: The peer the connection really came from, before proxy headers replaced ``scope["client"]``
#: (set by the site's server, site/cli.py; absent when the app runs without it, as in tests).
PEER_KEY = "watchbuy.peer"
# What an incoming id may look like: it is written into log lines and echoed in a header.
_INCOMING_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

request_id: ContextVar[str | None] = ContextVar("watchbuy_site_request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Gives every record logged during a request that request's ``request_id``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            current = request_id.get()
            if current is not None:
                record.request_id = current
        return True


REQUEST_ID_FILTER = RequestIdFilter()


def install_request_id_filter(logger: logging.Logger | None = None) -> None:
    """Put :data:`REQUEST_ID_FILTER` on the handlers of ``logger`` (the root logger): on the
    handlers, not on a logger, because a logger's filters do not see its children's records."""
    for handler in (logger or logging.getLogger()).handlers:
        if REQUEST_ID_FILTER not in handler.filters:
            handler.addFilter(REQUEST_ID_FILTER)


def trusted_networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``WATCHBUY_TRUSTED_PROXIES`` (comma-separated addresses or networks) as networks."""
    networks = []
    for item in text.split(","):
        item = item.strip()
        if item:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                continue  # uvicorn's forwarded_allow_ips also takes names; those never match here
    return networks


def new_request_id() -> str:
    return secrets.token_hex(6)


class RequestContextMiddleware:
    """Pure ASGI, outside the security middleware: the request id (contextvar, response
    header) and ``watchbuy_site_requests_total{route,status}``."""

    def __init__(self, app: ASGIApp, trusted_proxies: str, metrics: SiteMetrics) -> None:
        self.app = app
        self.trusted = trusted_networks(trusted_proxies)
        self.metrics = metrics

    def _from_trusted_proxy(self, scope: Scope) -> bool:
        peer = scope.get(PEER_KEY) or scope.get("client")
        if not self.trusted or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        return any(address in network for network in self.trusted)

    def _request_id(self, scope: Scope) -> str:
        if self._from_trusted_proxy(scope):
            sent = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
            if _INCOMING_ID.fullmatch(sent):
                return sent
        return new_request_id()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        current = self._request_id(scope)
        token = request_id.set(current)
        status = 500  # what the client gets when the app fails before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] in ("http.response.start", "websocket.accept"):
                status = message.get("status", status)
                message.setdefault("headers", [])  # optional on websocket.accept
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, current)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
            if scope["type"] == "http":
                self.metrics.requests.labels(route_template(scope), str(status)).inc()
