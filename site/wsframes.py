"""Room events written to each viewer's websocket as one pre-built frame per message.

A room event reaches thousands of sockets.  Through the ASGI ``send`` every viewer cost its own
task wake-up, Starlette's and uvicorn's checks, websockets' frame encoding (and compression)
of the same text: about 60 µs per viewer, 300 ms of one core per message at 5000 viewers
(bench/site/fanout.py).  Here the frame is built once per message (:func:`text_frame`, cached
on the broker's :class:`~watchbuy.site.broker.Message`) and the broker's fan-out writes those
very bytes to every viewer's transport in its one loop, as the media node writes one encoded
tag to every viewer.

The server protocol is uvicorn's own websockets-sansio one; :class:`FrameProtocol` only adds a
:class:`FrameWriter` to the ASGI scope's ``extensions`` (ASGI lets a server announce its own
extensions there).  A viewer whose transport is paused (its kernel buffer and uvicorn's write
buffer past the high-water mark) is not written to: its events wait in its bounded broker
queue, coalesced or dropped as before (site/broker/memory.py), and its ``_forward`` task writes
them when the transport drains -- the same writer, so the order is kept.

Frames are unfragmented, unmasked (server to client) text frames with RSV1 clear: valid also
when permessage-deflate was negotiated (RFC 7692 compresses per message, and a message
without RSV1 is not compressed), and they leave websockets' protocol state untouched (it keeps
state for fragmented messages and the closing handshake only).
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

EXTENSION = "watchbuy.frames"


def text_frame(text: str) -> bytes:
    """One complete server-to-client text frame (RFC 6455 5.2) carrying ``text``."""
    payload = text.encode("utf-8", "surrogatepass")
    length = len(payload)
    if length < 126:
        head = bytes((0x81, length))
    elif length < 65536:
        head = bytes((0x81, 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x81, 127)) + length.to_bytes(8, "big")
    return head + payload


class FrameWriter:
    """Writes complete frames to one websocket's transport, or says it cannot now."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: WebSocketsSansIOProtocol) -> None:
        self._protocol = protocol

    def ready(self) -> bool:
        """Open and not paused: a frame written now goes straight out (the fan-out's test)."""
        p = self._protocol
        return (p.handshake_complete and not p.close_sent and not p.disconnected
                and p.writable.is_set() and not p.transport.is_closing())

    def write(self, frame: bytes) -> bool:
        """Write ``frame`` unless the socket is closing; False when it was not written.  Paused
        or not: the caller decides (the fan-out asks :meth:`ready` first)."""
        p = self._protocol
        if p.close_sent or p.disconnected or p.transport.is_closing():
            return False
        p.transport.write(frame)
        return True

    async def writable(self) -> None:
        """Until the transport is not paused (uvicorn's flow control)."""
        await self._protocol.writable.wait()


class FrameProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, announcing a :class:`FrameWriter` in the scope."""

    def handle_connect(self, event) -> None:  # noqa: ANN001 (websockets' Request)
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # None when the handshake was refused (no app runs)
            scope["extensions"][EXTENSION] = FrameWriter(self)
