"""HTTP side of a media node: HTTP-FLV playback and the JSON stats API.

Routes:

* ``GET /<app>/<name>.flv`` and ``GET /<node-id>/<app>/<name>.flv`` — the live stream as FLV
  (the second form is what a CDN forwards, so one cache behaviour per node finds its origin);
* ``GET /<app>/<name>/index.m3u8`` (and ``init.mp4``, ``part<msn>.<i>.m4s``, ``seg<msn>.m4s``
  beside it), with or without the ``/<node-id>`` prefix — LL-HLS, answered by
  engine/hls_http.py; a blocking request *holds* the connection (``self.hold``) until its part
  exists, with no head or keep-alive timeout meanwhile, and the requests pipelined behind it
  are answered after it, in order;
* ``GET /api/streams`` and ``GET /api/server`` — stats; ``GET /healthz``;
* ``GET /metrics`` — Prometheus metrics (engine/metrics.py);
* ``OPTIONS`` — CORS preflight; every answer carries CORS headers so a browser on the site's
  origin can fetch the stream.

``/api/streams`` is public and leaves out each stream's ``publisher`` (the host's IP:port, often
a home address).  The operator view adds it: the same request with
``Authorization: Bearer <WATCHBUY_OPERATOR_TOKEN>``.  ``/metrics`` answers loopback, and others
with that token.  Without a configured operator token there is neither.

Live responses are never cacheable (``Cache-Control: no-cache``) and use chunked encoding on
HTTP/1.1, which proxies and CDNs handle, and close-delimited bodies on HTTP/1.0.

The FLV header's audio/video flags say what the stream carries, as SRS does with its default
``guess_has_av``: players (ffmpeg, ffplay, mpv, VLC) wait for every track the header announces,
so an audio-only stream announced as audio+video never starts.  A viewer joining a stream that
has shown its tracks (sequence headers, codecs, or ``onMetaData``'s ``videocodecid`` /
``audiocodecid``) gets the flags from those; a viewer joining before the stream has shown any
audio or video gets its header with the first batch that carries some, flagged from what the
stream has shown by then (SRS writes its header at the first messages with A/V the same way).

One client costs bounded work and memory (``WATCHBUY_HTTP_*`` and the timeouts in
:class:`~watchbuy.settings.Settings`): at most ``http_requests_per_turn`` pipelined requests are
answered before the event loop serves others; reading pauses while answers are queued or the
peer is not taking them; a head must be complete within ``header_timeout``, an idle keep-alive
connection closes after ``keepalive_timeout``, and an answer the peer does not take (a closing
JSON answer, the end of a live body, a paused pipeline) is aborted after ``drain_timeout``.  An
HTTP-FLV viewer, once streaming, is left to the relay's stall cut-off instead.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from watchbuy.engine import metrics
from watchbuy.engine.codecs import flvmux
from watchbuy.engine.httpparse import HttpError, Request, RequestParser
from watchbuy.engine.relay import LiveStream, Tag, Viewer
from watchbuy.engine.session import ViewerSession
from watchbuy.engine.wire import MSG_AUDIO, MSG_VIDEO
from watchbuy.logs import LogLimiter
from watchbuy.net import is_loopback

if TYPE_CHECKING:
    from watchbuy.engine.node import MediaNode

log = logging.getLogger("watchbuy.engine.http")

CORS_HEADERS = (
    "Access-Control-Allow-Origin: *\r\n"
    "Access-Control-Allow-Methods: GET, HEAD, OPTIONS\r\n"
    "Access-Control-Allow-Headers: Range, Content-Type\r\n"
    "Access-Control-Expose-Headers: Content-Length, Content-Type\r\n"
)
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found",
           405: "Method Not Allowed", 431: "Request Header Fields Too Large"}


# Lines a crowd of peers can trigger at once (timeouts, aborted drains, refused requests)
# share one budget, so a flood cannot flood the log.
LOG_BUDGET = LogLimiter(log, interval=10.0, lines=20)


def stream_tracks(stream: LiveStream) -> tuple[bool, bool]:
    """(has audio, has video) as far as the stream has shown so far."""
    meta = stream.metadata
    # ``is not None``: codec id 0 (PCM) is a real audio codec.
    audio = bool(stream.audio_codec or stream.audio_header) or \
        meta.get("audiocodecid") is not None
    video = bool(stream.has_video or stream.video_header) or \
        meta.get("videocodecid") is not None
    return audio, video


class FlvViewer(Viewer):
    """An HTTP-FLV viewer: gets the shared FLV tag bytes, framed per batch when chunked."""

    kind = "flv"

    def __init__(self, session: HttpSession, chunked: bool) -> None:
        super().__init__(session)
        self.chunked = chunked
        self.stream: LiveStream | None = None
        self.header_sent = False

    def encoding_key(self) -> object:
        return ("flv", self.chunked)

    def encode(self, tags: list[Tag]) -> list[bytes]:
        return self.frame([tag.flv for tag in tags])

    def frame(self, body: list[bytes]) -> list[bytes]:
        """One write's bytes: as they are, or as one HTTP/1.1 chunk."""
        if not self.chunked:
            return body
        return [b"%x\r\n" % sum(map(len, body)), *body, b"\r\n"]

    def start(self, stream: LiveStream) -> None:
        self.stream = stream
        has_audio, has_video = stream_tracks(stream)
        if not (has_audio or has_video):
            return  # nothing shown yet: the header goes out with the first audio or video
        self.header_sent = True
        header = flvmux.flv_header(has_audio, has_video)
        self.write(self.frame([header, *(tag.flv for tag in stream.startup_tags())]))

    def deliver(self, tags: list[Tag], shared: dict | None = None) -> None:
        if self.header_sent or self.closed or self.paused_since is not None:
            super().deliver(tags, shared)
            return
        if not any(tag.type_id in (MSG_AUDIO, MSG_VIDEO) for tag in tags):
            return  # script data before any track: nothing a player could start from (as SRS)
        stream = self.stream
        has_audio, has_video = stream_tracks(stream) if stream is not None else (True, True)
        if not (has_audio or has_video):  # pragma: no cover - only empty media payloads name no codec
            has_audio = has_video = True
        self.header_sent = True
        prefix = [flvmux.flv_header(has_audio, has_video)]
        if stream is not None:
            # What this batch does not carry and a player needs first (a viewer that was
            # paused before its header also lost the sequence headers).
            prefix.extend(t.flv for t in (stream.metadata_tag, stream.video_header,
                                          stream.audio_header)
                          if t is not None and all(t is not tag for tag in tags))
        self.write(self.frame(prefix))
        super().deliver(tags, None)


class NodeWideAnswer:
    """A stats request on one worker of several, answered once the sibling workers have
    (engine/interworker.py, each within a short timeout).  It holds the connection as a
    blocking LL-HLS request does (``session.hold``): nothing else is read or answered
    meanwhile, and a closed connection cancels it."""

    def __init__(self, session: HttpSession,
                 answer: Coroutine[Any, Any, dict | bytes | tuple[int, dict]],
                 keep: bool, head_only: bool, content_type: str = "application/json") -> None:
        self.session = session
        self.content_type = content_type
        self.keep = keep
        self.head_only = head_only
        self.task = asyncio.ensure_future(answer)
        self.task.add_done_callback(self.done)

    def done(self, task: asyncio.Task) -> None:
        session = self.session
        if task.cancelled() or session.hold is not self or session._lost:
            return
        session.hold = None
        exc = task.exception()
        if exc is not None:  # a bug costs this request only, and one line
            LOG_BUDGET.log(logging.WARNING, "http %s: node-wide stats failed: %s: %s",
                           session.peer, type(exc).__name__, exc, extra=session.log.extra)
            session.respond(500, {"error": "internal error"}, False, self.head_only)
            return
        result = task.result()
        status = 200
        if isinstance(result, tuple):  # (status, answer): a cue refused by its worker
            status, result = result
        if isinstance(result, bytes):
            session.respond_bytes(200, result, self.content_type, self.keep, self.head_only)
        else:
            session.respond(status, result, self.keep, self.head_only)
        session.hold_released()

    def cancel(self) -> None:
        self.task.cancel()


class HttpSession(ViewerSession):
    """One HTTP connection: answers pipelined requests a bounded number per turn, under
    backpressure and timeouts, until it becomes an HTTP-FLV viewer or closes."""

    protocol = "http"

    def __init__(self, node: MediaNode) -> None:
        super().__init__(node)
        settings = node.settings
        self.parser = RequestParser(settings.http_max_head, settings.http_max_buffer)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind = ""
        self._write_paused = False  # our answers are above the transport's high-water mark
        self._reading_paused = False
        self._turn_scheduled = False
        self._closing = False  # the last answer is queued; the transport closes after it
        self._lost = False
        # A blocking LL-HLS request waiting for its part (engine/hls_http.py Hold): while set,
        # nothing is read, answered or timed out but the hold's own timer.
        self.hold = None
        # Requests parsed in a turn that stopped early (a hold, a paused writer): answered
        # first, in order, next turn.  At most ``http_requests_per_turn`` of them.
        self._queued: list = []

    # -- connection life ----------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.loop = asyncio.get_running_loop()
        self._arm("header", self.node.settings.header_timeout)

    def connection_lost(self, exc) -> None:
        self._lost = True
        self._cancel_timer()
        if self.hold is not None:
            self.hold.cancel()
        super().connection_lost(exc)  # the per-address count (ViewerSession)
        self.node.stats.connection_closed("http")
        if self.viewer is not None and self.playing is not None:
            self.viewer.closed = True
            self.playing.remove_viewer(self.viewer)
            self.viewer = None

    def data_received(self, data: bytes) -> None:
        self.node.stats.bytes_in += len(data)
        if self.viewer is not None or self._closing:
            return  # a streaming or closing response owns the connection; ignore the rest
        self._turn(data)

    def pause_writing(self) -> None:
        if self.viewer is not None:
            super().pause_writing()
            return
        # The peer is not taking our answers: stop reading (and answering) until it does.
        self._write_paused = True
        if not self._closing:
            self._set_reading(False)
            self._arm("drain", self.node.settings.drain_timeout)

    def resume_writing(self) -> None:
        if self.viewer is not None:
            super().resume_writing()
            return
        self._write_paused = False
        if not self._closing and not self._lost:
            self._schedule()

    # -- requests -----------------------------------------------------------------------------
    def _turn(self, data: bytes = b"") -> None:
        """Answer at most ``http_requests_per_turn`` requests; the rest wait for a later turn."""
        self._turn_scheduled = False
        if self._lost or self._closing or self.viewer is not None:
            return
        if self.hold is not None:
            # Reading is paused while a request waits; bytes already on their way are kept,
            # in order and within the parser's bound, for after its answer.
            self._queued.extend(self.parser.feed(data, 0))  # an error, past the bound
            return
        try:
            queued, self._queued = self._queued, []
            limit = self.node.settings.http_requests_per_turn
            events = queued + self.parser.feed(data, max(limit - len(queued), 0))
            for index, event in enumerate(events):
                if isinstance(event, HttpError):
                    self.node.stats.protocol_errors["http"] += 1
                    LOG_BUDGET.log(logging.INFO, "http %s: %s", self.peer, event.reason,
                                   extra=self.log.extra)
                    self.respond(event.status, {"error": event.reason}, keep_alive=False)
                    return
                self._cancel_timer()  # a whole head arrived in time
                self.handle(event)
                if self.viewer is not None or self._closing:
                    break
                if self._write_paused or self.hold is not None:
                    self._queued = events[index + 1 :]  # theirs to answer, after this one
                    break
        except Exception as exc:  # a bug must cost this connection only, and one line
            LOG_BUDGET.log(logging.WARNING, "http %s: internal error: %s: %s", self.peer,
                           type(exc).__name__, exc, extra=self.log.extra)
            self.node.stats.protocol_errors["internal"] += 1
            self._closing = True
            self.transport.abort()
            return
        if self.viewer is not None:
            self._cancel_timer()  # a streaming viewer is the relay's to cut off
            self._set_reading(True)
            return
        if not self._closing:
            self._schedule()

    def _schedule(self) -> None:
        """After a turn or a drained write buffer: plan the next turn, reading and timer."""
        if self.hold is not None:
            # Waiting on a stream, not on the peer: no head or keep-alive timeout meanwhile.
            self._set_reading(False)
            if not self._write_paused:
                self._cancel_timer()
            return
        backlog = bool(self._queued) or self.parser.has_complete()
        if backlog and not self._write_paused and not self._turn_scheduled:
            self._turn_scheduled = True
            self.loop.call_soon(self._turn)
        # Read more only when all that was read is answered and the peer takes the answers:
        # this bounds what one client can queue in the parser and in the write buffer.
        self._set_reading(not backlog and not self._write_paused)
        settings = self.node.settings
        if self._write_paused:
            if self._timer_kind != "drain":
                self._arm("drain", settings.drain_timeout)
        elif backlog:
            self._cancel_timer()  # waiting on us, not on the peer
        elif self.parser.buffered:
            if self._timer_kind != "header":  # the clock runs from a head's first byte
                self._arm("header", settings.header_timeout)
        elif self._timer_kind != "keepalive":
            self._arm("keepalive", settings.keepalive_timeout)

    def _set_reading(self, on: bool) -> None:
        if self._reading_paused is not on or self.transport.is_closing():
            return  # already as asked (paused is the opposite of on), or closing anyway
        self._reading_paused = not on
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    # -- timers -------------------------------------------------------------------------------
    def _arm(self, kind: str, delay: float) -> None:
        self._cancel_timer()
        self._timer_kind = kind
        self._timer = self.loop.call_later(delay, self._expired)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_kind = ""

    def _expired(self) -> None:
        kind, self._timer, self._timer_kind = self._timer_kind, None, ""
        if self._lost:
            return
        settings = self.node.settings
        self.node.stats.timeouts["http_" + kind] += 1
        if kind == "drain":
            LOG_BUDGET.log(logging.INFO, "http %s: peer took no data for %.0f s: aborting",
                           self.peer, settings.drain_timeout, extra=self.log.extra)
            self._closing = True
            self.transport.abort()
        elif kind == "header":
            LOG_BUDGET.log(logging.INFO, "http %s: no complete request head within %.0f s: "
                           "closing", self.peer, settings.header_timeout, extra=self.log.extra)
            self.close_after_drain()
        else:
            LOG_BUDGET.log(logging.DEBUG, "http %s: idle for %.0f s: closing", self.peer,
                           settings.keepalive_timeout, extra=self.log.extra)
            self.close_after_drain()

    def close_after_drain(self) -> None:
        """Close once the queued bytes are sent, but abort a peer that does not take them
        within ``drain_timeout``: ``transport.close()`` alone waits on it forever."""
        if self._closing and self._timer_kind == "drain":
            return
        self._closing = True
        self._set_reading(False)
        self.transport.close()
        if not self._lost and self.transport.get_write_buffer_size():
            self._arm("drain", self.node.settings.drain_timeout)
        else:
            self._cancel_timer()

    # -- responses ----------------------------------------------------------------------------
    def respond(self, status: int, body: dict | None, keep_alive: bool = True,
                head_only: bool = False) -> None:
        payload = b"" if body is None else json.dumps(body).encode()
        self.respond_bytes(status, payload, "application/json", keep_alive, head_only)

    def respond_bytes(self, status: int, payload: bytes, content_type: str,
                      keep_alive: bool = True, head_only: bool = False) -> None:
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(payload)}\r\n"
            f"Cache-Control: no-cache\r\n"
            f"{CORS_HEADERS}"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        ).encode()
        self.transport.write(head if head_only else head + payload)
        self.count_out(len(head) + len(payload))
        if not keep_alive:
            self.close_after_drain()

    def is_operator(self, request: Request) -> bool:
        """``Authorization: Bearer <WATCHBUY_OPERATOR_TOKEN>``; never without a configured
        token."""
        secret = self.node.settings.operator_token
        if not secret:
            return False
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode("latin-1"), secret.encode())

    def handle(self, request: Request) -> None:
        keep = request.keep_alive
        if request.method == "OPTIONS":
            self.respond(204, None, keep)
            return
        if request.method == "POST" and self.node.cues.is_cue_path(request.path):
            self.node.cues.handle(self, request)  # engine/cues.py: a pin in band
            return
        if request.method not in ("GET", "HEAD"):
            self.respond(405, {"error": "method not allowed"}, keep)
            return
        head_only = request.method == "HEAD"
        path = request.path
        cluster = self.node.cluster
        if path == "/api/streams":
            if cluster is not None:  # one worker of several: the node's answer, from them all
                self.hold = NodeWideAnswer(self, cluster.streams_info(self.is_operator(request)),
                                           keep, head_only)
                return
            info = self.node.streams_info(operator=self.is_operator(request))
            self.respond(200, info, keep, head_only)
        elif path == "/api/server":
            if cluster is not None:
                self.hold = NodeWideAnswer(self, cluster.server_info(), keep, head_only)
                return
            self.respond(200, self.node.server_info(), keep, head_only)
        elif path == "/metrics":
            if not (is_loopback(self.peer_host) or self.is_operator(request)):
                self.respond(404, {"error": "not found"}, keep, head_only)
                return
            if cluster is not None:  # every worker's series, labelled by worker
                self.hold = NodeWideAnswer(self, cluster.metrics_text(), keep, head_only,
                                           metrics.CONTENT_TYPE)
                return
            self.respond_bytes(200, metrics.render(self.node.metrics), metrics.CONTENT_TYPE, keep,
                               head_only)
        elif path == "/healthz":
            self.respond(200, {"ok": True, "node_id": self.node.settings.node_id}, keep, head_only)
        elif path.endswith(".flv"):
            self.play(request, path, head_only)
        elif self.node.hls is not None and self.node.hls.is_hls_path(path):
            self.node.hls.handle(self, request, head_only)  # engine/hls_http.py
        else:
            self.respond(404, {"error": "not found"}, keep, head_only)

    def play(self, request: Request, path: str, head_only: bool) -> None:
        parts = path[:-4].strip("/").split("/")
        if len(parts) == 3 and parts[0] == self.node.settings.node_id:
            parts = parts[1:]
        stream = None
        if len(parts) == 2 and parts[0] in self.node.settings.apps:
            stream = self.node.registry.get(parts[1])
        if stream is None:
            self.respond(404, {"error": "stream is not live"}, request.keep_alive, head_only)
            return
        chunked = request.version == "HTTP/1.1"
        head = (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: video/x-flv\r\n"
            "Cache-Control: no-cache, no-store\r\n"
            "Pragma: no-cache\r\n"
            f"{CORS_HEADERS}"
            + ("Transfer-Encoding: chunked\r\n" if chunked else "")
            + "Connection: close\r\n\r\n"
        ).encode()
        self.transport.write(head)
        self.count_out(len(head))
        if head_only:
            self.close_after_drain()
            return
        self.playing = stream
        self.viewer = FlvViewer(self, chunked)
        stream.add_viewer(self.viewer)

    def hold_released(self) -> None:
        """A blocking LL-HLS request was answered: go on with the pipeline."""
        if not self._closing and not self._lost:
            self._schedule()

    def stream_ended(self, viewer: FlvViewer) -> None:
        """The publisher stopped: finish the body so the player sees the end at once."""
        if viewer.chunked:
            self.transport.write(b"0\r\n\r\n")
        self.viewer = None
        self.playing = None
        self.close_after_drain()
