"""Public pages kept rendered in process, dropped by the room events that change them.

A page anyone gets alike (the room page and the home page for a visitor who is not logged in)
is rendered once and served from memory until it expires (``WATCHBUY_PAGE_CACHE_SECONDS``) or
until an event changes what it shows: a room's pin, products, stock, live/offline, a sale, the
end of a show, its replay or a new title drop that room's pages (and the home page, for the events that
change the list of rooms).  The only per-visitor part of such a page is its CSRF token: the
page is rendered with a marker in its place and each answer puts the visitor's own token in.
What a room page is made of is kept the same way, for visitors who are logged in (their page
is rendered for them, without reading the room again).

How every process hears the events: :func:`chat.publish_room_event` also publishes each
changing event's room id on one broker topic, ``PAGES_TOPIC``, which every site process's
cache follows (with Redis, whichever process published it).  A page is kept only when that
subscription was live before the page was built and no changing event for its room arrived
while it was being built, so an event can never be lost in between.  This holds because every
changing event is published after its write has committed (a page built after the event reads
the new state): code that adds an event must keep that order.  While the subscription is down
(Redis unreachable) nothing is kept.

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
from watchbuy.site.broker import Broker, Subscription
from watchbuy.site.web import render

log = logging.getLogger("watchbuy.site.pagecache")
limited_log = LogLimiter(log, interval=60.0)

# Room events after which a kept room page no longer shows the room as it is; the second set
# also changes the home page's list of rooms.
CHANGING_EVENTS = frozenset({"pinned", "products", "stock", "live", "offline", "ended",
                             "sale", "sale_ended", "title", "replay"})
HOME_CHANGING_EVENTS = frozenset({"live", "offline", "ended", "title", "replay"})
PAGES_TOPIC = "pages"  # {"type": "changed", "room": <channel id>, "event": <its type>}
HOME = 0  # the room id under which the home page is kept (channel ids start at 1)
RESUBSCRIBE_DELAY = 1.0  # seconds before following PAGES_TOPIC again after it broke


def page_change(channel_id: int, event: dict) -> dict | None:
    """What ``PAGES_TOPIC`` carries for a room event, or None when no kept page shows it."""
    kind = event.get("type")
    if kind not in CHANGING_EVENTS:
        return None
    return {"type": "changed", "room": channel_id, "event": kind}


@dataclass(slots=True)
class PublicPage:
    """A page rendered for nobody in particular, with a marker where the CSRF token goes."""

    html: str
    marker: str
    csp_media_origin: str | None

    def respond(self, request: Request, values: dict[str, str] | None = None) -> HTMLResponse:
        """The page with the visitor's token in, and each further marker in ``values``
        replaced by its text (already escaped for where it stands)."""
        if self.csp_media_origin is not None:
            request.state.csp_media_origin = self.csp_media_origin  # as web.render sets it
        html = self.html.replace(self.marker, request.state.csrf_token)
        for marker, text in (values or {}).items():
            html = html.replace(marker, text)
        return HTMLResponse(html)


@dataclass(slots=True)
class _Entry:
    room_id: int
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
        self.count_marker = f"count-{secrets.token_hex(16)}"  # a logged-in page's cart count
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        # A counter of everything that decides whether a page may be kept: each changing
        # event, the subscription going live.  A build notes it first (mark()); put() then
        # knows whether anything happened to the page's room since.
        self._seq = 0
        self._changed_at: dict[int, int] = {}  # room (HOME: the list) → seq of its last change
        self._live_at: int | None = None  # seq when the subscription went live; None: down
        self._follower: asyncio.Task | None = None
        self._sub: Subscription | None = None  # PAGES_TOPIC while it is live
        self._interruptions = 0  # the broker's count when the subscription was last live
        self._relive: asyncio.Task | None = None
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    async def start(self) -> None:
        """Follows ``PAGES_TOPIC`` (in the background) when pages are kept at all."""
        if self.enabled and self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(
                self._follow(), name="pagecache-follow")

    def get(self, key: Hashable) -> Any:
        """The kept value (a :class:`PublicPage`, or what was put), or None."""
        if self._sub is not None:
            self._check_interrupted()
            # What arrived but the follower has not read yet: a change published by this very
            # process a moment ago (the pin just posted) counts before the page is served.
            while (message := self._sub.get_nowait()) is not None:
                self._apply(message)
        entry = self._entries.get(key)
        if entry is None or entry.expires <= time.monotonic():
            self.misses += 1
            return None
        self.hits += 1
        return entry.value

    def mark(self) -> int:
        """Call before reading what a page shows; pass the result to :meth:`put`."""
        return self._seq

    def render(self, request: Request, template: str, user: dict | None = None,
               **context) -> PublicPage:
        """``web.render`` of a page for nobody in particular (no user, a marker token), or
        for every logged-in ``user`` alike in what the page shows of them (the caller keys it
        by those parts and puts markers where the rest goes)."""
        response = render(request, template, user=user, csrf_token=self.marker, **context)
        return PublicPage(response.body.decode(), self.marker,
                          getattr(request.state, "csp_media_origin", None))

    def put(self, key: Hashable, room_id: int, value: Any, mark: int) -> bool:
        """Keeps ``value`` unless something changed the room (``HOME``: the list of rooms)
        since ``mark``; True when kept."""
        self._check_interrupted()
        if (self._live_at is None or self._live_at > mark
                or self._changed_at.get(room_id, -1) > mark):
            return False
        self._entries[key] = _Entry(room_id, value, time.monotonic() + self.seconds)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def changed(self, room_id: int, home: bool) -> None:
        """The room's pages (and with ``home`` the home page) no longer show it as it is."""
        self._seq += 1
        if len(self._changed_at) >= 10 * self.max_entries:
            # bounded: forget old changes, and refuse every build that started before now
            self._changed_at.clear()
            self._live_at = self._seq if self._live_at is not None else None
        rooms = {room_id, HOME} if home else {room_id}
        for room in rooms:
            self._changed_at[room] = self._seq
        for key in [k for k, e in self._entries.items() if e.room_id in rooms]:
            del self._entries[key]

    def _check_interrupted(self) -> None:
        """Redis lost our subscription's connection (and resubscribes by itself): changes
        published meanwhile never arrived, so every kept page goes, and pages are kept again
        only once the subscription is live again."""
        sub = self._sub
        if sub is None:
            return
        if self.broker.interruptions != self._interruptions:
            self._interruptions = self.broker.interruptions
            self._seq += 1
            self._live_at = None
            self._changed_at.clear()
            self._entries.clear()
            limited_log.warning("interrupted", "page cache: page events were interrupted; "
                                "every kept page dropped")
        if self._live_at is None and (self._relive is None or self._relive.done()):
            self._relive = asyncio.get_running_loop().create_task(self._until_live(sub))

    async def _until_live(self, sub: Subscription) -> None:
        try:
            await sub.ready()
        except Exception:  # still down: the next get() tries again
            return
        if self._sub is sub and self._live_at is None:
            self._interruptions = self.broker.interruptions
            self._seq += 1
            self._live_at = self._seq

    def _apply(self, message: dict) -> None:
        room = message.get("room")
        if message.get("type") == "changed" and isinstance(room, int):
            self.changed(room, message.get("event") in HOME_CHANGING_EVENTS)

    def _forget_all(self) -> None:
        self._sub = None
        self._seq += 1
        self._live_at = None
        self._changed_at.clear()
        self._entries.clear()

    async def _follow(self) -> None:
        while True:
            try:
                async with self.broker.subscribe(PAGES_TOPIC) as sub:
                    self._interruptions = self.broker.interruptions
                    self._seq += 1
                    self._live_at = self._seq
                    self._sub = sub
                    async for message in sub:
                        self._apply(message)
                    self._sub = None
                    if sub.overflowed:
                        limited_log.warning("overflow", "page cache: fell behind the page "
                                            "events; every kept page dropped")
            except asyncio.CancelledError:
                self._forget_all()
                raise
            except Exception as exc:  # Redis down: nothing is kept until it is back
                limited_log.warning("follow", "page cache: not following page events, "
                                    "nothing kept meanwhile: %s", exc)
            # Whatever ended the subscription, events may have been missed meanwhile.
            self._forget_all()
            await asyncio.sleep(RESUBSCRIBE_DELAY)

    async def close(self) -> None:
        if self._relive is not None:
            self._relive.cancel()
            await asyncio.gather(self._relive, return_exceptions=True)
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        self._forget_all()
