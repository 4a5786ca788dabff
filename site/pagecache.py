"""Public pages kept rendered in process, dropped by the room events that change them.

A page anyone gets alike (the room page and the home page for a visitor who is not logged in)
is rendered once and served from memory until it expires (``WATCHBUY_PAGE_CACHE_SECONDS``) or,
for a room, until the room hears an event that changes what the page shows (a pin, products,
stock, live/offline, a sale, the end of a show, a new title).  The only per-visitor part of such a page
is its CSRF token: the page is rendered with a marker in its place and each answer puts the
visitor's own token in.

How a room's events are heard: the first time a room's page is kept, this process subscribes
to the room's broker topic (the same one its websockets use, so with Redis every process hears
what any process publishes); the subscription ends when the room's page has not been asked for
in a while.  A page is kept only when the subscription was live before the page was built and no
changing event arrived while it was being built, so an event can never be lost in between.
Without a live subscription (Redis down, too many rooms) pages are simply not kept.

Stock and prices on a kept page are at most one event behind, and the event interval
(``WATCHBUY_STOCK_EVENT_INTERVAL``) bounds that; nobody pays what a page shows: checkout prices
and reserves on the server.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse

from watchbuy.logs import LogLimiter
from watchbuy.site.broker import Broker
from watchbuy.site.chat import room_topic
from watchbuy.site.web import render

log = logging.getLogger("watchbuy.site.pagecache")
limited_log = LogLimiter(log, interval=60.0)

# Room events after which a kept room page no longer shows the room as it is.
CHANGING_EVENTS = frozenset({"pinned", "products", "stock", "live", "offline", "ended",
                             "sale", "sale_ended", "title"})
# A room's subscription ends after this many cache lifetimes without its page being asked for.
IDLE_LIFETIMES = 30


@dataclass(slots=True)
class PublicPage:
    """A page rendered for nobody in particular, with a marker where the CSRF token goes."""

    html: str
    marker: str
    csp_media_origin: str | None

    def respond(self, request: Request) -> HTMLResponse:
        if self.csp_media_origin is not None:
            request.state.csp_media_origin = self.csp_media_origin  # as web.render sets it
        return HTMLResponse(self.html.replace(self.marker, request.state.csrf_token))


@dataclass(slots=True)
class _Entry:
    room_id: int | None
    value: Any
    expires: float


class PageCache:
    """Kept public pages by key (e.g. ``("room", slug)``), at most ``max_entries``; also what
    such a page is made of (e.g. a room's products), for pages rendered per visitor."""

    def __init__(self, broker: Broker, seconds: float, max_entries: int) -> None:
        self.broker = broker
        self.seconds = seconds
        self.max_entries = max_entries
        # One random marker per process: no page text can guess it, and a token never holds it.
        self.marker = f"csrf-{secrets.token_hex(16)}"
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        # A counter of everything that decides whether a page may be kept: each changing
        # event, each subscription going live.  A build notes it first (mark()); put() then
        # knows whether anything happened to the page's room since.
        self._seq = 0
        self._changed_at: dict[int, int] = {}  # room → seq of its last changing event
        self._live_at: dict[int, int] = {}  # room → seq when its subscription went live
        self._used: dict[int, float] = {}  # room → when its page was last asked for
        self._listeners: dict[int, asyncio.Task] = {}
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    def get(self, key: Hashable) -> Any:
        """The kept value (a :class:`PublicPage`, or what was put), or None."""
        entry = self._entries.get(key)
        if entry is None or entry.expires <= time.monotonic():
            self.misses += 1
            return None
        self.hits += 1
        if entry.room_id is not None:
            self._used[entry.room_id] = time.monotonic()
        return entry.value

    def mark(self) -> int:
        """Call before reading what a page shows; pass the result to :meth:`put`."""
        return self._seq

    def render(self, request: Request, template: str, **context) -> PublicPage:
        """``web.render`` of a page for nobody in particular (no user, a marker token)."""
        response = render(request, template, user=None, csrf_token=self.marker, **context)
        return PublicPage(response.body.decode(), self.marker,
                          getattr(request.state, "csp_media_origin", None))

    def put(self, key: Hashable, room_id: int | None, value: Any, mark: int) -> bool:
        """Keeps ``value`` unless something changed the room since ``mark``; True when kept.
        ``room_id`` None: a page no single room's events change (kept until it expires)."""
        if not self.enabled:
            return False
        if room_id is not None:
            live_at = self._live_at.get(room_id)
            if live_at is None:
                if self._listen(room_id):
                    self._used[room_id] = time.monotonic()
                return False
            self._used[room_id] = time.monotonic()
            if live_at > mark or self._changed_at.get(room_id, -1) > mark:
                return False
        self._entries[key] = _Entry(room_id, value, time.monotonic() + self.seconds)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def changed(self, room_id: int) -> None:
        """The room's pages no longer show it as it is."""
        self._seq += 1
        self._changed_at[room_id] = self._seq
        for key in [k for k, e in self._entries.items() if e.room_id == room_id]:
            del self._entries[key]

    def _listen(self, room_id: int) -> bool:
        """Starts following the room (once); False when too many rooms are followed."""
        if room_id in self._listeners:
            return True
        if len(self._listeners) >= self.max_entries:
            return False
        self._listeners[room_id] = asyncio.get_running_loop().create_task(
            self._follow(room_id), name=f"pagecache-room-{room_id}")
        return True

    async def _follow(self, room_id: int) -> None:
        idle = max(30.0, IDLE_LIFETIMES * self.seconds)
        try:
            async with self.broker.subscribe(room_topic(room_id)) as sub:
                self._seq += 1
                self._live_at[room_id] = self._seq
                while time.monotonic() - self._used.get(room_id, 0.0) < idle:
                    try:
                        message = await asyncio.wait_for(sub.__anext__(), idle)
                    except TimeoutError:
                        continue
                    except StopAsyncIteration:  # dropped as too slow, or the broker closed
                        break
                    if message.get("type") in CHANGING_EVENTS:
                        self.changed(room_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis down: pages of this room are not kept meanwhile
            limited_log.warning("listen", "page cache: room %s not followed: %s", room_id,
                                exc)
        finally:
            # Whatever ended the subscription, this room's pages can no longer be trusted.
            self._live_at.pop(room_id, None)
            self._used.pop(room_id, None)
            self._listeners.pop(room_id, None)
            self.changed(room_id)
            self._changed_at.pop(room_id, None)  # a new subscription's live_at supersedes it

    async def close(self) -> None:
        tasks = list(self._listeners.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._entries.clear()
