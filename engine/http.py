"""HTTP side of a media node: HTTP-FLV playback and the JSON stats API.

Routes:

* ``GET /<app>/<name>.flv`` and ``GET /<node-id>/<app>/<name>.flv`` — the live stream as FLV
  (the second form is what a CDN forwards, so one cache behaviour per node finds its origin);
* ``GET /api/streams`` and ``GET /api/server`` — stats; ``GET /healthz``;
* ``OPTIONS`` — CORS preflight; every answer carries CORS headers so a browser on the site's
  origin can fetch the stream.

Live responses are never cacheable (``Cache-Control: no-cache``) and use chunked encoding on
HTTP/1.1, which proxies and CDNs handle, and close-delimited bodies on HTTP/1.0.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from watchbuy.engine.codecs import flvmux
from watchbuy.engine.errors import ProtocolError
from watchbuy.engine.httpparse import HttpError, Request, RequestParser
from watchbuy.engine.relay import LiveStream, Tag, Viewer, ViewerSession

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


class FlvViewer(Viewer):
    """An HTTP-FLV viewer: gets the shared FLV tag bytes, framed per batch when chunked."""

    kind = "flv"

    def __init__(self, session: HttpSession, chunked: bool) -> None:
        super().__init__(session)
        self.chunked = chunked

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
        header = flvmux.flv_header(True, True)
        self.write(self.frame([header, *(tag.flv for tag in stream.startup_tags())]))

    def end(self) -> None:
        self.closed = True
        self.session.stream_ended(self)


class HttpSession(ViewerSession):
    protocol = "http"

    def __init__(self, node: MediaNode) -> None:
        super().__init__(node)
        self.parser = RequestParser()
        self.stream: LiveStream | None = None

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)  # the per-address count (ViewerSession)
        self.node.stats.connection_closed("http")
        if self.viewer is not None and self.stream is not None:
            self.viewer.closed = True
            self.stream.remove_viewer(self.viewer)
            self.viewer = None

    def data_received(self, data: bytes) -> None:
        self.node.stats.bytes_in += len(data)
        if self.viewer is not None:
            return  # a streaming response owns the connection; ignore pipelined junk
        try:
            requests = self.parser.feed(data)
        except HttpError as exc:
            log.info("http %s: %s", self.peer, exc.reason)
            self.respond(exc.status, {"error": exc.reason}, keep_alive=False)
            return
        except ProtocolError as exc:  # pragma: no cover - the parser raises HttpError only
            self.respond(400, {"error": str(exc)}, keep_alive=False)
            return
        for request in requests:
            self.handle(request)
            if self.viewer is not None or self.transport.is_closing():
                return

    # -- responses ----------------------------------------------------------------------------
    def respond(self, status: int, body: dict | None, keep_alive: bool = True,
                head_only: bool = False) -> None:
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n"
            f"Cache-Control: no-cache\r\n"
            f"{CORS_HEADERS}"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        ).encode()
        self.transport.write(head if head_only else head + payload)
        self.count_out(len(head) + len(payload))
        if not keep_alive:
            self.transport.close()

    def handle(self, request: Request) -> None:
        keep = request.keep_alive
        if request.method == "OPTIONS":
            self.respond(204, None, keep)
            return
        if request.method not in ("GET", "HEAD"):
            self.respond(405, {"error": "method not allowed"}, keep)
            return
        head_only = request.method == "HEAD"
        path = request.path
        if path == "/api/streams":
            self.respond(200, self.node.streams_info(), keep, head_only)
        elif path == "/api/server":
            self.respond(200, self.node.server_info(), keep, head_only)
        elif path == "/healthz":
            self.respond(200, {"ok": True, "node_id": self.node.config.node_id}, keep, head_only)
        elif path.endswith(".flv"):
            self.play(request, path, head_only)
        else:
            self.respond(404, {"error": "not found"}, keep, head_only)

    def play(self, request: Request, path: str, head_only: bool) -> None:
        parts = path[:-4].strip("/").split("/")
        if len(parts) == 3 and parts[0] == self.node.config.node_id:
            parts = parts[1:]
        stream = None
        if len(parts) == 2 and parts[0] in self.node.config.apps:
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
            self.transport.close()
            return
        self.stream = stream
        self.viewer = FlvViewer(self, chunked)
        stream.add_viewer(self.viewer)

    def stream_ended(self, viewer: FlvViewer) -> None:
        """The publisher stopped: finish the body so the player sees the end at once."""
        if viewer.chunked:
            self.transport.write(b"0\r\n\r\n")
        self.transport.close()
        self.viewer = None
        self.stream = None
