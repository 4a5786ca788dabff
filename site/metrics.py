"""Prometheus metrics of the site, served at ``/metrics`` (deploy/grafana/watchbuy.json charts
them).

Each app has its own :class:`CollectorRegistry`, not prometheus-client's global one: several
apps in one process (the tests, two "site processes" side by side) must not collide.

``/metrics`` is not public: it answers loopback clients, and anyone else only with
``Authorization: Bearer <WATCHBUY_METRICS_TOKEN>`` (when that token is set).
"""

from __future__ import annotations

import hmac
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from watchbuy.logs import LogLimiter
from watchbuy.net import is_loopback
from watchbuy.site.state import state

log = logging.getLogger("watchbuy.site.metrics")
refusals = LogLimiter(log, interval=60.0)

#: The ``route`` label of requests that matched no route: raw paths would make the label's
#: values unbounded (every scanner's probe a new series).
UNMATCHED = "<unmatched>"


class _BrokerDrops:
    """``watchbuy_site_ws_dropped_total{reason}``: room events a viewer did not get, as the
    broker's fan-out counts them (``drops``), read at scrape time (the fan-out's hot loop
    adds to plain ints, not to a prometheus Counter per message)."""

    def __init__(self) -> None:
        self.broker: object = None

    def collect(self):
        family = CounterMetricFamily(
            "watchbuy_site_ws_dropped", "Room events not sent to a viewer: coalesced (a newer "
            "state replaced it in the viewer's queue or in a pending round) or overflow (the viewer's "
            "queue, or a round longer than it, was full: "
            "closed with 4408)", labels=["reason"])
        for reason, count in sorted(getattr(self.broker, "drops", {}).items()):
            family.add_metric([reason], count)
        yield family


class SiteMetrics:
    """The site's counters and gauges, in this app's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # prometheus-client appends "_total" to counters on exposition
        self.requests = Counter("watchbuy_site_requests", "HTTP requests answered, by route "
                                "template and status", ["route", "status"],
                                registry=self.registry)
        self.websockets = Gauge("watchbuy_site_websocket_connections",
                                "Room websockets open now", registry=self.registry)
        self.broker_up = Gauge("watchbuy_site_broker_up", "1 while the chat broker's backend "
                               "is reachable", ["backend"], registry=self.registry)
        self.checkouts = Counter("watchbuy_site_checkouts", "Checkouts, by result",
                                 ["result"], registry=self.registry)
        self.webhooks = Counter("watchbuy_site_webhooks", "Stripe webhook deliveries, by "
                                "outcome", ["outcome"], registry=self.registry)
        self.stock_events = Counter(
            "watchbuy_site_stock_events", "Stock events this process published (a product's "
            "stock read and sent to its room: at most one per WATCHBUY_STOCK_EVENT_INTERVAL, "
            "plus sold out and units back at once)", registry=self.registry)
        self.ws_dropped = _BrokerDrops()
        self.registry.register(self.ws_dropped)

    def render(self, broker: object) -> bytes:
        backend = "redis" if type(broker).__name__ == "RedisBroker" else "memory"
        # Read at scrape time: the broker knows whether its connection is up right now.
        self.broker_up.labels(backend).set(1 if getattr(broker, "connected", True) else 0)
        self.ws_dropped.broker = broker
        return generate_latest(self.registry)


def route_template(scope: dict) -> str:
    """The path template of the route that served ``scope`` (``/room/{slug}``; a Mount's
    prefix for static files), or :data:`UNMATCHED`: Starlette's router leaves the matched
    route in the scope."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else UNMATCHED


async def metrics_page(request: Request) -> Response:
    site = state(request)
    token = site["settings"].metrics_token
    sent = request.headers.get("authorization", "")
    # Loopback only when nothing forwarded the request: a proxy on this machine makes every
    # visitor look like loopback.
    forwarded = "x-forwarded-for" in request.headers or "forwarded" in request.headers
    local = not forwarded and is_loopback(request.client.host if request.client else None)
    allowed = local or bool(
        token and hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()))
    if not allowed:
        refusals.warning("metrics", "refused /metrics to %s: not loopback and no valid token",
                         request.client.host if request.client else "?")
        return PlainTextResponse("Not found", status_code=404)
    return Response(site["metrics"].render(site["broker"]), media_type=CONTENT_TYPE_LATEST,
                    headers={"Cache-Control": "no-store"})


routes = [Route("/metrics", metrics_page)]
