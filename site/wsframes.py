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
them when the transport drains -- the same writer, so the order is kept.  The fan-out's step
per viewer is one call, :meth:`FrameWriter.send`: one flag the protocol keeps up to date
(``FrameProtocol.flowing``), the transport's ``is_closing`` and ``write``, all bound once.

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

    __slots__ = ("_protocol", "_is_closing", "_write")

    def __init__(self, protocol: FrameProtocol) -> None:
        self._protocol = protocol
        # Bound once: the fan-out calls send() for every viewer of every message.
        self._is_closing = protocol.transport.is_closing
        self._write = protocol.transport.write

    def ready(self) -> bool:
        """Open and not paused: a frame written now goes straight out."""
        return self._protocol.flowing and not self._is_closing()

    def send(self, frames: bytes) -> bool:
        """Write ``frames`` (one or more complete frames) when :meth:`ready`, in one call: the
        fan-out's whole step per viewer.  False when nothing was written (then the fan-out
        queues the messages for this viewer's own task)."""
        if self._protocol.flowing and not self._is_closing():
            self._write(frames)
            return True
        return False

    def write(self, frame: bytes) -> bool:
        """Write ``frame`` unless the socket is closing; False when it was not written.  Paused
        or not: the caller decides (the viewer's own task, once :meth:`writable`)."""
        p = self._protocol
        if p.close_sent or p.disconnected or self._is_closing():
            return False
        self._write(frame)
        return True

    async def writable(self) -> None:
        """Until the transport is not paused (uvicorn's flow control)."""
        await self._protocol.writable.wait()


def _flow_flag(name: str) -> property:
    # One of the four states uvicorn's protocol keeps as plain attributes, as a property whose
    # setter also recomputes ``flowing``.
    private = "_" + name

    def get(self: FrameProtocol) -> bool:
        return getattr(self, private)

    def set_(self: FrameProtocol, value: bool) -> None:
        setattr(self, private, value)
        self._flow()

    return property(get, set_)


class FrameProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, announcing a :class:`FrameWriter` in the scope.

    ``flowing`` says in one attribute what the fan-out must know of each viewer (handshake
    done, no close sent, connected, not paused): uvicorn sets the states it is made of as plain
    attributes in many places, so they are properties here that keep it up to date, rather
    than four lookups and a method call per viewer per message."""

    flowing = False
    _handshake_complete = _close_sent = _disconnected = _paused = False
    handshake_complete = _flow_flag("handshake_complete")
    close_sent = _flow_flag("close_sent")
    disconnected = _flow_flag("disconnected")

    def _flow(self) -> None:
        self.flowing = (self._handshake_complete and not self._close_sent
                        and not self._disconnected and not self._paused)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._paused = True
        self._flow()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._paused = False
        self._flow()

    def handle_connect(self, event) -> None:  # noqa: ANN001 (websockets' Request)
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # None when the handshake was refused (no app runs)
            scope["extensions"][EXTENSION] = FrameWriter(self)
