"""LL-HLS on the node: one :class:`~watchbuy.engine.hls.HlsStream` per live stream, served over
the node's hardened HTTP server (engine/http.py).

Muxing.  :class:`HlsService` listens to the stream registry: at "publish" it gives the
``LiveStream`` an ``HlsStream`` (``LiveStream.hls``), which the relay feeds with every media
message it already turns into a tag, once per message and not per viewer.  The stream exists
from the first keyframe on, before any player asks, so the first request finds parts ready.
At "publish_done" it is ended (``EXT-X-ENDLIST``; every waiting request is answered) and kept
``hls_ended_keep`` seconds for the players that have not seen the end yet, then dropped.

Routes (``/<app>/<name>/…`` and the CDN form ``/<node-id>/<app>/<name>/…``):

* ``index.m3u8`` with the delivery directives ``_HLS_msn``, ``_HLS_part`` and ``_HLS_skip=YES``;
* ``init.mp4`` (``init<n>.mp4`` after a codec change), ``seg<msn>.m4s``, ``part<msn>.<i>.m4s``.

The playlist names them relatively, so both forms work.  Each publish of a name starts at a
new media sequence number (tenths of a second since the epoch), so names never repeat across
publishes and a CDN cannot serve a part or blocking playlist cached from an earlier one.

Blocking.  A playlist request whose ``_HLS_msn``/``_HLS_part`` is not there yet, or a request
for a part or segment still to come (the ``EXT-X-PRELOAD-HINT`` part), *holds* its connection:
:class:`Hold` registers a waiter on the stream and a timer, and the HTTP session stops reading,
answering and timing out (no keep-alive or head timeout while it waits) until the waiter fires,
which happens in the very call that publishes the part.  Pipelined requests behind it wait in
the parser's bounded buffer and are answered in order afterwards (HTTP/1.1 answers in order).
One hold per connection, so holds are bounded by the node's connection caps.  A hold that
outlives ``hls_block_timeout`` (default three target durations, the wait RFC 8216bis tells
clients to allow) is answered 503, which the spec's clients retry; a request too far ahead is
400, as the spec says.

Headers (Apple's LL-HLS guidance): parts, segments and blocking playlist answers are cacheable by
a CDN (their names, or their ``_HLS_*`` query, which the CDN keys on, never change meaning); a
plain playlist is ``no-cache`` so a joining player starts at the live edge; init segments keep
their name across publishes of a stream, so a CDN keeps them only briefly.  CORS as for FLV.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from watchbuy.engine.hls import BadRequest, HlsStream, parse_resource
from watchbuy.engine.http import CORS_HEADERS, LOG_BUDGET
from watchbuy.engine.httpparse import Request
from watchbuy.settings import hls_config

if TYPE_CHECKING:
    from watchbuy.engine.http import HttpSession
    from watchbuy.engine.node import MediaNode
    from watchbuy.engine.relay import LiveStream

log = logging.getLogger("watchbuy.engine.hls")

PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
INIT_TYPE = "video/mp4"
MEDIA_TYPE = "video/iso.segment"  # .m4s, as registered for CMAF segments
# Parts and segments never change and their names are never reused: a CDN may keep them
# well past the playlist window.
MEDIA_CACHE = "public, max-age=300"
# init.mp4 keeps its name when a stream is published again (maybe with another codec): short.
INIT_CACHE = "public, max-age=2"
PLAIN_PLAYLIST_CACHE = "no-cache"  # a joining player must see the live edge
NOT_FOUND_CACHE = "public, max-age=1"  # an unknown stream may go live any moment
NO_STORE = "no-store"  # 400, 503: say nothing about later answers
STATUS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found",
          503: "Service Unavailable"}  # fmt: skip
_QUERY_NUMBER_DIGITS = 18  # an MSN or part index longer than this is not one we made


def _media_sequence_base() -> int:
    """The first MSN of a new publish: tenths of a second since the epoch, so a republish of a
    name (which takes more than a tenth of a second) never reuses an earlier MSN, while a
    publish advances by one segment per segment target (≥ 0.2 s)."""
    return int(time.time() * 10)


class HlsService:
    """The node's HLS streams by name: the live ones and, briefly, the ended ones."""

    def __init__(self, node: MediaNode) -> None:
        self.node = node
        self.settings = node.settings
        self.config = hls_config(node.settings)
        self.streams: dict[str, HlsStream] = {}
        self._drops: dict[str, asyncio.TimerHandle] = {}
        self.requests = 0
        self.holds = 0
        self.hold_timeouts = 0
        node.registry.listeners.append(self.on_stream)

    # -- streams ------------------------------------------------------------------------------
    def on_stream(self, event: str, stream: LiveStream) -> None:
        if event == "publish":
            self._cancel_drop(stream.name)
            first_msn = stream.hls_first_msn  # set for a stream pulled from a sibling worker
            hls = HlsStream(stream.name, self.config, first_msn=_media_sequence_base()
                            if first_msn is None else first_msn)
            old = self.streams.get(stream.name)
            if old is not None:
                old.end()  # an ended one still kept: its players get the end now
            self.streams[stream.name] = hls
            stream.hls = hls
        elif event == "publish_done":
            hls, stream.hls = stream.hls, None
            if hls is None:
                return
            hls.end()
            self._schedule_drop(stream.name, hls)

    def _schedule_drop(self, name: str, hls: HlsStream) -> None:
        def drop() -> None:
            self._drops.pop(name, None)
            if self.streams.get(name) is hls:
                del self.streams[name]

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a registry used on its own): nothing can wait anyway
            drop()
            return
        self._cancel_drop(name)
        self._drops[name] = loop.call_later(self.settings.hls_ended_keep, drop)

    def _cancel_drop(self, name: str) -> None:
        handle = self._drops.pop(name, None)
        if handle is not None:
            handle.cancel()

    def get(self, name: str) -> HlsStream | None:
        return self.streams.get(name)

    def close(self) -> None:
        for handle in self._drops.values():
            handle.cancel()
        self._drops.clear()
        for hls in self.streams.values():
            hls.end()
        self.streams.clear()

    def block_timeout(self, hls: HlsStream) -> float:
        configured = self.settings.hls_block_timeout
        return configured if configured > 0 else 3 * hls._target_duration

    # -- requests -----------------------------------------------------------------------------
    @staticmethod
    def is_hls_path(path: str) -> bool:
        return path.endswith((".m3u8", ".m4s", ".mp4"))

    def handle(self, session: HttpSession, request: Request, head_only: bool) -> None:
        """Answer one GET/HEAD for an HLS path, now or (blocking) when its part exists."""
        self.requests += 1
        keep = request.keep_alive
        parts = request.path.strip("/").split("/")
        if len(parts) == 4 and parts[0] == self.settings.node_id:
            parts = parts[1:]
        hls = None
        if len(parts) == 3 and parts[0] in self.settings.apps:
            hls = self.streams.get(parts[1])
        if hls is None:
            respond(session, 404, b"stream is not live\n", "text/plain", NOT_FOUND_CACHE, keep,
                    head_only)
            return
        resource = parts[2]
        if resource == "index.m3u8":
            self._playlist(session, hls, request, keep, head_only)
            return
        what = parse_resource(resource)
        if what is None:
            respond(session, 404, b"no such resource\n", "text/plain", NOT_FOUND_CACHE, keep,
                    head_only)
            return
        kind, a, b = what
        if kind == "init":
            if a == 0 and not hls.available and not hls.ended:
                # Live, no keyframe yet: the first part (and init) is on its way.
                self._hold(session, hls, hls.first_msn, 0, keep,
                           lambda: self._init(session, hls, a, keep, head_only))
                return
            self._init(session, hls, a, keep, head_only)
            return
        msn, index = a, (b if kind == "part" else None)
        fetch = (lambda: hls.part(msn, index)) if index is not None else (lambda: hls.segment(msn))
        data = fetch()
        if data is None and not hls.ended and not hls.ready(msn, index) \
                and not hls.too_far(msn, index):
            # A part or segment still to come (the preload hint): answered once it exists.
            self._hold(session, hls, msn, index, keep,
                       lambda: self._media(session, fetch(), keep, head_only))
            return
        self._media(session, data, keep, head_only)

    def _init(self, session: HttpSession, hls: HlsStream, n: int, keep: bool,
              head_only: bool) -> None:  # fmt: skip
        data = hls.init(n)
        if data is None:
            respond(session, 404, b"no such init segment\n", "text/plain", NOT_FOUND_CACHE,
                    keep, head_only)
        else:
            respond(session, 200, data, INIT_TYPE, INIT_CACHE, keep, head_only)

    @staticmethod
    def _media(session: HttpSession, data: bytes | None, keep: bool, head_only: bool) -> None:
        if data is None:  # expired from the window, or never made (the segment ended sooner)
            respond(session, 404, b"no such part or segment\n", "text/plain", NOT_FOUND_CACHE,
                    keep, head_only)
        else:
            respond(session, 200, data, MEDIA_TYPE, MEDIA_CACHE, keep, head_only)

    def _playlist(self, session: HttpSession, hls: HlsStream, request: Request, keep: bool,
                  head_only: bool) -> None:  # fmt: skip
        try:
            msn, part, skip = delivery_directives(request.query)
            text = hls.playlist(msn, part, skip)
        except BadRequest as exc:
            LOG_BUDGET.log(logging.INFO, "http %s: hls %s: %s", session.peer, hls.name, exc,
                           extra=session.log.extra)
            respond(session, 400, f"{exc}\n".encode(), "text/plain", NO_STORE, keep, head_only)
            return

        def answer() -> None:
            body = hls.playlist(msn, part, skip)
            if body is None:  # pragma: no cover - a fired waiter means it is ready
                respond(session, 503, b"playlist not ready\n", "text/plain", NO_STORE, keep,
                        head_only)
                return
            # A blocking answer never changes for its query: a CDN keys on it and keeps it.
            cache = PLAIN_PLAYLIST_CACHE if msn is None else \
                f"public, max-age={6 * hls._target_duration}"
            respond(session, 200, body.encode(), PLAYLIST_TYPE, cache, keep, head_only)

        if text is not None:
            answer()
        elif msn is None:
            # Live but no part yet: wait for the first one rather than say 404.
            self._hold(session, hls, hls.first_msn, 0, keep, answer)
        else:
            self._hold(session, hls, msn, part, keep, answer)

    def _hold(self, session: HttpSession, hls: HlsStream, msn: int, part: int | None,
              keep: bool, answer: Callable[[], None]) -> None:  # fmt: skip
        self.holds += 1
        hold = Hold(self, session, hls, keep, answer)
        session.hold = hold
        if not hls.add_waiter(msn, part, hold.callback):
            session.hold = None
            answer()  # ready after all
            return
        hold.timer = session.loop.call_later(self.block_timeout(hls), hold.expire)


class Hold:
    """One blocked request: answered by its stream's waiter, or 503 at its timeout."""

    __slots__ = ("service", "session", "hls", "keep", "answer", "timer", "done", "callback")

    def __init__(self, service: HlsService, session: HttpSession, hls: HlsStream, keep: bool,
                 answer: Callable[[], None]) -> None:  # fmt: skip
        self.service = service
        self.session = session
        self.hls = hls
        self.keep = keep
        self.answer = answer
        self.timer: asyncio.TimerHandle | None = None
        self.done = False
        # One bound method, kept: the stream forgets a waiter by identity.
        self.callback = self.fire

    def fire(self) -> None:
        """The awaited part exists (or the stream ended): answer now, in the publisher's call,
        then let the session go on with what it has queued."""
        if self.done:
            return
        self._finish()
        try:
            self.answer()
        except Exception as exc:  # a bug costs this connection only, and one line
            LOG_BUDGET.log(logging.WARNING, "http %s: hls answer failed: %s: %s",
                           self.session.peer, type(exc).__name__, exc,
                           extra=self.session.log.extra)
            self.session.transport.abort()
            return
        self.session.hold_released()

    def expire(self) -> None:
        if self.done:
            return
        self.timer = None
        self._finish()
        self.hls.remove_waiter(self.callback)
        self.service.hold_timeouts += 1
        LOG_BUDGET.log(logging.INFO, "http %s: hls %s: blocking request not satisfied within "
                       "%.1f s (WATCHBUY_HLS_BLOCK_TIMEOUT): 503", self.session.peer,
                       self.hls.name, self.service.block_timeout(self.hls),
                       extra=self.session.log.extra)
        respond(self.session, 503, b"not available yet\n", "text/plain", NO_STORE, self.keep,
                False)
        self.session.hold_released()

    def cancel(self) -> None:
        """The connection closed while waiting: forget the waiter and the timer."""
        if self.done:
            return
        self._finish()
        self.hls.remove_waiter(self.callback)

    def _finish(self) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.session.hold is self:
            self.session.hold = None


def delivery_directives(query: str) -> tuple[int | None, int | None, bool]:
    """(``_HLS_msn``, ``_HLS_part``, ``_HLS_skip=YES``) from a query string; other parameters
    are ignored, malformed ones raise :class:`BadRequest`."""
    msn = part = None
    skip = False
    for item in query.split("&") if query else ():
        name, _, value = item.partition("=")
        if name in ("_HLS_msn", "_HLS_part"):
            if not value.isdigit() or not value.isascii() or len(value) > _QUERY_NUMBER_DIGITS:
                raise BadRequest(f"{name} must be a small non-negative integer")
            if name == "_HLS_msn":
                msn = int(value)
            else:
                part = int(value)
        elif name == "_HLS_skip":
            if value not in ("YES", "v2"):
                raise BadRequest("_HLS_skip must be YES or v2")
            skip = True
    return msn, part, skip


def respond(session: HttpSession, status: int, payload: bytes, content_type: str,
            cache_control: str, keep_alive: bool, head_only: bool) -> None:  # fmt: skip
    """One HLS answer with its caching and CORS headers (HEAD: the same head, no body)."""
    head = (
        f"HTTP/1.1 {status} {STATUS.get(status, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(payload)}\r\n"
        f"Cache-Control: {cache_control}\r\n"
        f"{CORS_HEADERS}"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    ).encode()
    if head_only or not payload:
        session.transport.write(head)
    else:
        session.transport.writelines((head, payload))  # no copy of a part's bytes
    session.count_out(len(head) + (0 if head_only else len(payload)))
    if not keep_alive:
        session.close_after_drain()

