"""A small incremental HTTP/1.x request-head parser (``feed(bytes)`` → requests), socket-free.

The media node only serves GET/HEAD/OPTIONS without bodies (FLV playback and JSON stats), so
this parses request heads and refuses bodies; a head larger than ``max_head`` is an error, so a
client cannot make us buffer without bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote

from watchbuy.engine.errors import ProtocolError


class HttpError(ProtocolError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


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


class RequestParser:
    def __init__(self, max_head: int = 16384) -> None:
        self.max_head = max_head
        self._buffer = b""

    def feed(self, data: bytes) -> list[Request]:
        self._buffer += data
        requests = []
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > self.max_head:
                    raise HttpError(431, "request head too large")
                return requests
            if end > self.max_head:
                raise HttpError(431, "request head too large")
            head = self._buffer[:end]
            self._buffer = self._buffer[end + 4 :]
            requests.append(self._parse(head))

    @staticmethod
    def _parse(head: bytes) -> Request:
        try:
            text = head.decode("latin-1")
        except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes every byte
            raise HttpError(400, "undecodable request head") from exc
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HttpError(400, "malformed request line")
        method, target, version = parts
        if not method.isalpha() or not target.startswith("/"):
            raise HttpError(400, "malformed request line")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise HttpError(400, "malformed header line")
            headers[name.lower()] = value.strip()
        if headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers:
            raise HttpError(400, "request bodies are not accepted here")
        return Request(method.upper(), target, version, headers)
