"""The ops dashboard: per-node traffic in/out as live charts, live streams with the sales of
their show, site-wide totals.

A sampler polls the media nodes every ``INTERVAL`` seconds while anyone watches and keeps the
last ``HISTORY`` seconds per node; the page gets snapshots over Server-Sent Events.  Network in
grows with hosts, network out with viewers.  Every rate is converted to kb/s here, once: the
page (template and script) shows the snapshot's numbers as they are, so a node's line and its
chart cannot disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from watchbuy.db import queries
from watchbuy.site.security import session_hash
from watchbuy.site.state import state
from watchbuy.site.web import format_money, render, require_admin

if TYPE_CHECKING:
    from watchbuy.db.database import Database
    from watchbuy.site.media import MediaDirectory

log = logging.getLogger("watchbuy.site.dashboard")

INTERVAL = 2.0
HISTORY = 300.0


def kbps(bytes_per_s: float | None) -> int | None:
    """Bytes per second as the dashboard shows every rate: kilobits per second."""
    return None if bytes_per_s is None else round(bytes_per_s * 8 / 1000)


async def live_room_sales(db: Database) -> dict[str, dict]:
    """Per live room (by slug): the paid orders of its show so far and their revenue per
    currency, formatted (test-mode orders are no money: left out, as in the site-wide totals)."""
    sales: dict[str, dict] = {}
    for slug, currency, count, revenue in await queries.live_show_sales(db):
        room = sales.setdefault(slug, {"orders": 0, "revenue": []})
        room["orders"] += count  # an order has one currency: no order counted twice
        room["revenue"].append(format_money(revenue, currency))
    return sales


class DashboardSampler:
    def __init__(self, media: MediaDirectory, db: Database) -> None:
        self.media = media
        self.db = db
        self.series: dict[str, deque] = {}  # node id → deque of (t, rx B/s, tx B/s)
        self.latest: dict = {}
        self.watchers = 0
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        idle_since = None
        if self.latest and time.time() - self.latest["at"] < INTERVAL:
            await asyncio.sleep(INTERVAL)  # a page just sampled: don't add a duplicate point
        while True:
            try:
                await self.sample()
            except Exception:  # a bad round must not end the dashboard
                log.exception("dashboard sample failed")
            if self.watchers == 0:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 60:
                    return  # nobody is looking: stop polling the nodes
            else:
                idle_since = None
            await asyncio.sleep(INTERVAL)

    async def sample(self) -> dict:
        media = self.media
        now = time.time()
        nodes = await media.node_stats()
        streams = await media.stream_stats()
        db = self.db
        # test-mode orders (test card, Stripe test keys) are no money: counted apart
        orders = await queries.order_counts(db, test_mode=False)
        test_orders = await queries.order_counts(db, test_mode=True)
        revenue = await queries.paid_revenue(db)
        sales = await live_room_sales(db)
        rows = []
        for node in nodes:
            # The engine's own traffic, converted once, here: the chart and the node's line
            # both show these numbers (the chart's last point is the line).
            in_kbps, out_kbps = kbps(node.get("bytes_in_per_s")), kbps(node.get("bytes_out_per_s"))
            series = self.series.setdefault(node["node_id"], deque())
            series.append((round(now, 1), in_kbps, out_kbps))
            while series and now - series[0][0] > HISTORY:
                series.popleft()
            rows.append({
                "node_id": node["node_id"],
                "publishers": node.get("publishers", 0),
                "viewers": node.get("viewers", 0),
                "in_kbps": in_kbps,
                "out_kbps": out_kbps,
                # the status agent's view of the machine's interfaces (what the balancer
                # compares): another measure, shown apart and labelled as such
                "nic_in_kbps": kbps(node.get("net_rx_per_s")),
                "nic_out_kbps": kbps(node.get("net_tx_per_s")),
                "cpu_load": node.get("cpu_load"),
                "series": list(series),
            })
        self.latest = {
            "at": now,
            "units": {"rates": "kb/s"},
            "nodes": rows,
            "streams": sorted(
                ({"name": name, "node_id": s.get("node_id"), "viewers": s.get("viewers", 0),
                  # bitrate_in is in bits per second
                  "bitrate_kbps": round(s.get("bitrate_in", 0) / 1000),
                  "video_codec": s.get("video_codec"),
                  "width": s.get("width"), "height": s.get("height"), "fps": s.get("fps"),
                  "uptime": s.get("uptime"),
                  **sales.get(name, {"orders": 0, "revenue": []})}
                 for name, s in streams.items()),
                key=lambda s: -s["viewers"]),
            "viewers": sum(s.get("viewers", 0) for s in streams.values()),
            "orders": orders,
            "test_orders": test_orders,
            "revenue": [format_money(v, c) for c, v in sorted(revenue.items())],
        }
        self._changed.set()
        self._changed = asyncio.Event()
        return self.latest

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)


async def current_snapshot(request: Request) -> dict:
    """The latest snapshot (sampled now if there is none yet); sampling goes on meanwhile."""
    require_admin(request)
    data = state(request)["dashboard"]
    snapshot = data.latest or await data.sample()
    data.ensure_running()
    return snapshot


async def dashboard_page(request: Request):
    return render(request, "dashboard.html", snapshot=await current_snapshot(request))


async def dashboard_json(request: Request):
    return JSONResponse(await current_snapshot(request))


async def dashboard_events(request: Request):
    """Server-Sent Events: one snapshot per sampling round, while the page stays open."""
    require_admin(request)
    site = state(request)
    data = site["dashboard"]
    data.ensure_running()
    token = request.state.session_token

    async def still_operator() -> bool:
        # The stream outlives the request that opened it: a log-out, an expired session or a
        # lost operator flag ends it at the next round.
        found = await queries.session_user(site["db"], session_hash(token)) if token else None
        return found is not None and bool(found[1]["is_admin"])

    async def stream():
        data.watchers += 1
        try:
            if data.latest:
                yield f"data: {json.dumps(data.latest)}\n\n"
            while not await request.is_disconnected():
                await data.wait(INTERVAL * 2)
                if not await still_operator():
                    return
                if data.latest:
                    yield f"data: {json.dumps(data.latest)}\n\n"
        finally:
            data.watchers -= 1

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


routes = [
    Route("/dashboard", dashboard_page),
    Route("/dashboard/data", dashboard_json),
    Route("/dashboard/events", dashboard_events),
]
