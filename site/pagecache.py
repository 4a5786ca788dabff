"""Public pages kept rendered in process, dropped by the room events that change them.

A page anyone gets alike (the room page and the home page for a visitor who is not logged in)
is rendered once and served from memory until it expires (``WATCHBUY_PAGE_CACHE_SECONDS``) or
until an event changes what it shows: a room's pin, products, stock, live/offline, a sale, the
end of a show, its replay or a new title drop that room's pages (and the home page, for the events that
change the list of rooms).  The only per-visitor part of such a page is its CSRF token: the
page is rendered with a marker in its place and each answer puts the visitor's own token in.
What a room page is made of is kept the same way, for visitors who are logged in, and so are
their pages per variant of what they show of a shopper; what is a shopper's own (the cart,
following the host, reminded of the next show) is kept by :class:`VisitorCache` until a write
of theirs (:func:`visitor_changed`), heard by every process on its own topic,
``VISITORS_TOPIC``: a crowd's cart adds never reach the page cache's subscription.

How every process hears the events: :func:`chat.publish_room_event` also publishes each
changing event's room id on one broker topic, ``PAGES_TOPIC``, which every site process's
caches follow (with Redis, whichever process published it).  A page is kept only when that
subscription was live before the page was built and no changing event for its room arrived
while it was being built, so an event can never be lost in between (site/followed.py, shared
with the session cache).  This holds because every changing event is published after its
write has committed (a page built after the event reads the new state): code that adds an
event must keep that order.  While the subscription is down (Redis unreachable) nothing is
kept.

Stock and prices on a kept page are at most one event behind, and the event interval
(``WATCHBUY_STOCK_EVENT_INTERVAL``) bounds that; nobody pays what a page shows: checkout prices
and reserves on the server.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import string
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import HTMLResponse

from watchbuy.logs import LogLimiter
from watchbuy.site.broker import Broker
from watchbuy.site.followed import FollowedCache
from watchbuy.site.security import cookie_header, cookie_name
from watchbuy.site.state import state
from watchbuy.site.web import render

log = logging.getLogger("watchbuy.site.pagecache")
limited_log = LogLimiter(log, interval=60.0)

# Room events after which a kept room page no longer shows the room as it is; the second set
# also changes the home page's list of rooms.
CHANGING_EVENTS = frozenset({"pinned", "products", "stock", "live", "offline", "ended",
                             "sale", "sale_ended", "title", "replay"})
HOME_CHANGING_EVENTS = frozenset({"live", "offline", "ended", "title", "replay"})
# ... and the room events that change what a shopper's own bits hold: a product deleted
# leaves every cart.
VISITOR_CHANGING_EVENTS = frozenset({"products"})
# {"type": "changed", "room": <channel id>, "event": <its type>}
PAGES_TOPIC = "pages"
# {"type": "visitors", "users": [<id>, ...]}, and the "changed" messages of
# VISITOR_CHANGING_EVENTS.  Not PAGES_TOPIC: every shopper's cart add, checkout, follow and
# reminder is one of these, and a rush of them must not fill the page cache's queue.
VISITORS_TOPIC = "visitors"
VISITORS_PER_MESSAGE = 1000  # users per announcement: a few KB
HOME = 0  # the room id under which the home page is kept (channel ids start at 1)
# Shoppers' room-page bits kept per process: (shopper, host, show, version) → three small
# values, so 10000 cost about as much memory as a few kept pages.
VISITOR_CACHE_ENTRIES = 10000
# The browser's version of its shopper's own bits: a new one with every write of theirs, part
# of the visitor cache's key, so a process that has not heard the write yet misses.
VISITOR_COOKIE = "wb_mine"
_VERSION_CHARS = frozenset(string.ascii_letters + string.digits + "-_")


def page_change(channel_id: int, event: dict) -> dict | None:
    """What ``PAGES_TOPIC`` carries for a room event, or None when no kept page shows it."""
    kind = event.get("type")
    if kind not in CHANGING_EVENTS:
        return None
    return {"type": "changed", "room": channel_id, "event": kind}


@dataclass(slots=True)
class PublicPage:
    """A page rendered for nobody in particular, with markers where the per-visitor parts go
    (the CSRF token, a shopper's cart count), kept as the bytes between them: an answer joins
    them with its own parts, no search through the page and no encoding per answer."""

    pieces: tuple[bytes, ...]  # the page's bytes between its markers
    holes: tuple[str, ...]  # the marker that stood after each piece but the last
    marker: str  # the CSRF token's
    csp_media_origin: str | None

    @classmethod
    def cut(cls, html: str, markers: tuple[str, ...],
            csp_media_origin: str | None) -> PublicPage:
        """``html`` cut at each of ``markers`` (the first is the CSRF token's)."""
        parts = re.split("(" + "|".join(map(re.escape, markers)) + ")", html)
        return cls(tuple(part.encode() for part in parts[::2]), tuple(parts[1::2]), markers[0],
                   csp_media_origin)

    def respond(self, request: Request, values: dict[str, str] | None = None) -> HTMLResponse:
        """The page with the visitor's token in, and each further marker in ``values``
        replaced by its text (already escaped for where it stands)."""
        if self.csp_media_origin is not None:
            request.state.csp_media_origin = self.csp_media_origin  # as web.render sets it
        fill = {self.marker: request.state.csrf_token.encode()}
        for marker, text in (values or {}).items():
            fill[marker] = text.encode()
        pieces = self.pieces
        body = [pieces[0]]
        for hole, piece in zip(self.holes, pieces[1:], strict=True):
            body.append(fill[hole])
            body.append(piece)
        return HTMLResponse(b"".join(body))


class PageCache(FollowedCache):
    """Kept public pages by key (e.g. ``("room", slug)``), at most ``max_entries``; also what
    such a page is made of (e.g. a room's products), for pages rendered per visitor.  A page's
    scope is its room's channel id (``HOME``: the home page's list of rooms)."""

    def __init__(self, broker: Broker, seconds: float, max_entries: int) -> None:
        super().__init__(broker, PAGES_TOPIC, seconds, max_entries, "page cache")
        # One random marker per process: no page text can guess it, and a token never holds it.
        self.marker = f"csrf-{secrets.token_hex(16)}"
        self.count_marker = f"count-{secrets.token_hex(16)}"  # a logged-in page's cart count

    def render(self, request: Request, template: str, user: dict | None = None,
               **context) -> PublicPage:
        """``web.render`` of a page for nobody in particular (no user, a marker token), or
        for every logged-in ``user`` alike in what the page shows of them (the caller keys it
        by those parts and puts markers where the rest goes)."""
        response = render(request, template, user=user, csrf_token=self.marker, **context)
        return PublicPage.cut(response.body.decode(), (self.marker, self.count_marker),
                              getattr(request.state, "csp_media_origin", None))

    def room_changed(self, room_id: int, home: bool) -> None:
        """The room's pages (and with ``home`` the home page) no longer show it as it is."""
        if home:
            self.changed(room_id, HOME)
        else:
            self.changed(room_id)

    def _apply(self, message: dict) -> None:
        room = message.get("room")
        if message.get("type") == "changed" and isinstance(room, int):
            self.room_changed(room, message.get("event") in HOME_CHANGING_EVENTS)


class VisitorCache(FollowedCache):
    """What a logged-in shopper's room page shows of their own (:func:`shows.room_visitor`:
    units in the cart, following the host, reminded of the next show), by (shopper, host,
    show, the browser's version of them), so a shopper's reloads and a crowd's refreshes read
    none of it again.  Its scope is the shopper: every write of theirs that changes it calls
    :func:`visitor_changed`, which drops it here at once and, through ``VISITORS_TOPIC``, in
    every other process.  A room's "products" event (a product deleted leaves every cart)
    drops everyone's.

    Announcing never holds up the write's answer: :meth:`announce` drops the shopper here
    and leaves their id for one background task, which publishes every id left since its last
    publish in one message (a shopper who changes five things while Redis answers is sent
    once).  A publish that fails is logged, never raised.  What that costs: a process whose
    subscription is down keeps nothing anyway, so only a process that still listens while
    publishing alone fails (a broken publish connection, a refused command) may show a
    shopper's old bits, and only those it read before the write: they expire about
    ``seconds`` after it (a read's own time later at most).  An id whose change is older than
    ``seconds`` is not sent at all (nothing anywhere can still hold what it changed)."""

    def __init__(self, broker: Broker, seconds: float, max_entries: int) -> None:
        super().__init__(broker, VISITORS_TOPIC, seconds, max_entries, "visitor cache")
        # shopper → when their last unannounced change was made (monotonic); at most one
        # entry per shopper, so a burst of a crowd's writes is bounded by the crowd
        self._unannounced: dict[int, float] = {}
        self._announcer: asyncio.Task | None = None
        self.announced = 0  # ids published (for tests and stats)
        self.announce_failures = 0

    def announce(self, user_id: int) -> None:
        """The shopper changed what they have (committed): dropped here now, in the other
        processes once the announcement arrives."""
        if not self.enabled:  # nothing kept here, nor elsewhere (same settings)
            return
        self.changed(user_id)
        self._unannounced[user_id] = time.monotonic()
        if self._announcer is None or self._announcer.done():
            self._announcer = asyncio.get_running_loop().create_task(
                self._announce(), name="visitor-announce")

    async def _announce(self) -> None:
        while self._unannounced:
            # the ids left since the last publish, oldest first, VISITORS_PER_MESSAGE at most
            too_old = time.monotonic() - self.seconds
            users = []
            for user_id, when in list(self._unannounced.items()):
                del self._unannounced[user_id]
                if when > too_old:
                    users.append(user_id)
                    if len(users) == VISITORS_PER_MESSAGE:
                        break
            if not users:
                continue
            try:
                await self.broker.publish(VISITORS_TOPIC, {"type": "visitors", "users": users})
                self.announced += len(users)
            except Exception as exc:  # Redis down, or refusing: logged, never the shopper's
                self.announce_failures += 1
                limited_log.warning("visitor", "visitor cache: %d change(s) not announced "
                                    "(kept elsewhere for at most %g s): %s", len(users),
                                    self.seconds, exc)

    def _apply(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "visitors" and isinstance(users := message.get("users"), list):
            self.changed(*(user for user in users if isinstance(user, int)))
        elif kind == "changed" and message.get("event") in VISITOR_CHANGING_EVENTS:
            self.forget()

    async def close(self) -> None:
        announcer, self._announcer = self._announcer, None
        if announcer is not None:
            announcer.cancel()
            await asyncio.gather(announcer, return_exceptions=True)
        await super().close()


def visitor_version(request: Request) -> str:
    """The browser's version of its shopper's own bits (``VISITOR_COOKIE``), "" when none."""
    secure = state(request)["settings"].cookie_secure
    value = request.cookies.get(cookie_name(VISITOR_COOKIE, secure), "")
    if len(value) > 16 or not _VERSION_CHARS.issuperset(value):
        return ""
    return value


def visitor_changed(request: Request, user_id: int) -> None:
    """The shopper ``user_id`` changed their cart, follows or reminders (committed): what the
    visitor caches keep of them goes, here at once, elsewhere when the announcement arrives
    (:meth:`VisitorCache.announce`; never awaited, never raised).  The answer also gives the
    browser a new ``VISITOR_COOKIE``: the page it goes to next, from whichever process, is
    not answered from bits kept before this write, even by a process that has not heard of
    it yet."""
    site = state(request)
    visitors = site["visitors"]
    if not visitors.enabled:
        return
    visitors.announce(user_id)
    # Kept only as long as a value kept before the write can live anywhere: after that, the
    # version is no longer needed.
    request.state.visitor_cookie = cookie_header(
        VISITOR_COOKIE, secrets.token_urlsafe(6), math.ceil(visitors.seconds) + 1,
        site["settings"].cookie_secure)
