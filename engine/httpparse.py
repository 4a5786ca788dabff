"""A small incremental HTTP/1.x request-head parser (``feed(bytes)`` → events), socket-free.

The media node only serves GET/HEAD/OPTIONS without bodies (FLV playback and JSON stats), so
this parses request heads and refuses bodies.

Events are :class:`Request` objects and, at most once and always last, an :class:`HttpError`:
the requests before a malformed one are still returned, so a client that pipelines a valid
request and then garbage gets its answer before the 400.  After an error the parser returns
nothing more.

Work and memory are bounded: a head larger than ``max_head`` is an error, unparsed bytes beyond
``max_buffer`` are an error (a client cannot make us buffer without bound), the buffer is one
``bytearray`` consumed from the front once per :meth:`feed`, and the search for the end of a
head resumes where the previous search stopped, so N pipelined requests cost O(bytes), not
O(N × bytes).  ``feed(data, limit)`` returns at most ``limit`` events and keeps the rest for the
next call (``feed(b"", limit)``), so the caller can answer a bounded number per turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote

from watchbuy.engine.errors import ProtocolError

HEAD_END = b"\r\n\r\n"


class HttpError(ProtocolError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_header_lines(lines: list[str]) -> dict[str, str]:
    """``{lower-cased name: value}`` from HTTP/1 header lines (requests here, responses in the
    status agent's client); a line without a colon, or with space around the name, is a 400.
    A repeated name keeps its last value: nothing we read is a list-valued header."""
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, "malformed header line")
        headers[name.lower()] = value.strip()
    return headers


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return unquote(self.target.split("?", 1)[0])

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


Event = Request | HttpError


class RequestParser:
    def __init__(self, max_head: int = 16384, max_buffer: int = 256 * 1024) -> None:
        self.max_head = max_head
        self.max_buffer = max(max_buffer, max_head)
        self._buffer = bytearray()
        self._scan = 0  # where the search for the next head end resumes
        self.failed = False

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a request (a partial or queued head)."""
        return len(self._buffer)

    def has_complete(self) -> bool:
        """Whether a whole head is waiting (``feed(b"")`` would return an event)."""
        if self.failed or not self._buffer:
            return False
        return self._buffer.find(HEAD_END, max(0, self._scan - 3)) >= 0 or \
            len(self._buffer) > self.max_head

    def feed(self, data: bytes = b"", limit: int | None = None) -> list[Event]:
        if self.failed:
            return []
        buffer = self._buffer
        buffer += data
        events: list[Event] = []
        start = 0
        try:
            while limit is None or len(events) < limit:
                # Resume 3 bytes back: the end marker may straddle two reads.
                end = buffer.find(HEAD_END, max(start, self._scan - 3))
                if end < 0:
                    self._scan = len(buffer)
                    if len(buffer) - start > self.max_head:
                        raise HttpError(431, "request head too large")
                    break
                if end - start > self.max_head:
                    raise HttpError(431, "request head too large")
                events.append(self._parse(bytes(buffer[start:end])))
                start = self._scan = end + 4
        except HttpError as exc:
            events.append(exc)
            self.failed = True
            buffer.clear()
            self._scan = 0
            return events
        del buffer[:start]  # once per feed: no per-request copy of the rest
        self._scan -= start
        if len(buffer) > self.max_buffer:
            events.append(HttpError(431, "too much pipelined data"))
            self.failed = True
            buffer.clear()
            self._scan = 0
        return events

    @staticmethod
    def _parse(head: bytes) -> Request:
        text = head.decode("latin-1")  # decodes every byte; names and values are ASCII anyway
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HttpError(400, "malformed request line")
        method, target, version = parts
        if not method.isascii() or not method.isalpha() or not target.startswith("/"):
            raise HttpError(400, "malformed request line")
        headers = parse_header_lines(lines[1:])
        if headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers:
            raise HttpError(400, "request bodies are not accepted here")
        return Request(method.upper(), target, version, headers)
