"""RTMP chunk stream: incremental parser and serialiser (pure-Python twin of ``_chunk.pyx``).

The chunk stream splits RTMP messages into chunks of at most ``chunk_size`` payload bytes and
interleaves them by chunk stream id (csid).  Each chunk has a basic header (format + csid in 1, 2
or 3 bytes), a message header of 11, 7, 3 or 0 bytes (formats 0..3, each repeating less of the
previous header on that csid) and an optional 4-byte extended timestamp.

``ChunkReader.feed(bytes)`` returns the messages completed by those bytes as tuples
``(csid, timestamp, type_id, stream_id, payload)``.  It never touches a socket.  Payload bytes
are consumed as they arrive, so only an incomplete chunk *header* (at most 18 bytes) is ever held
back, and a huge chunk size cannot make us buffer a huge chunk.

Protocol control that changes how the following bytes must be parsed is applied inside the
reader, at the exact byte where it takes effect: Set Chunk Size (type 1) and Abort (type 2).
Both are still returned as messages so the session can log or answer them.

Unfinished messages cost only what has arrived: a message's buffer grows as its chunks come in
and is never sized by the length its header declares (thousands of chunk streams each declaring
a large message and sending one byte would otherwise cost far more memory than they sent).  Their
number and their buffered bytes are capped per reader (``max_partial_messages``,
``max_partial_bytes``) and readable after each ``feed()`` (``partial_count``, ``partial_bytes``)
so that the session can also cap them across connections and time out stalled ones.

Extended timestamps on continuation chunks: the specification has a format-3 chunk repeat the
4-byte extended timestamp of its message's header, and most encoders do, but some omit it within a
message (the gap shows once timestamps pass 0xFFFFFF, after about 4.6 hours).  Like SRS and
nginx-rtmp we accept both: the first continuation chunk that could carry one decides the peer's
style (if its next 4 bytes equal the header's extended timestamp, or the message's timestamp, the
peer repeats them; otherwise they are payload and the peer omits them).  The style is then kept
for the connection, so later payload that happens to look like the timestamp is not taken for it.
Format-3 chunks that *start* a message always carry it, as before.
"""

from __future__ import annotations

from watchbuy.engine.errors import ChunkError
from watchbuy.engine.wire import MSG_ABORT, MSG_SET_CHUNK_SIZE  # the one vocabulary

MAX_CHUNK_SIZE = 0x7FFFFFFF  # the top bit of Set Chunk Size must be zero
MAX_MESSAGE_SIZE = 0xFFFFFF  # message length is a 24-bit field
EXTENDED = 0xFFFFFF  # timestamp field value announcing an extended timestamp
MAX_CSID = 65599
#: Default ``max_partial_messages``: ffmpeg and OBS interleave at most a handful of messages.
MAX_PARTIAL_MESSAGES = 64
#: Default ``max_partial_bytes``: room for one message of the largest size (0xFFFFFF, a big
#: keyframe) next to others in flight, while bounding what one connection can make us hold.
MAX_PARTIAL_BYTES = 32 * 1024 * 1024

# What the peer does with the extended timestamp on continuation chunks (see above).
_EXT_UNKNOWN = 0
_EXT_REPEATED = 1
_EXT_OMITTED = 2

# How many header bytes follow the basic header, by chunk format.
HEADER_SIZES = (11, 7, 3, 0)

Message = tuple[int, int, int, int, bytes]


class _Stream:
    """What one chunk stream id remembers from its previous chunk headers."""

    __slots__ = (
        "timestamp",
        "ts_field",
        "extended",
        "length",
        "type_id",
        "stream_id",
        "has_header",
        "payload",
    )

    def __init__(self) -> None:
        self.timestamp = 0  # absolute timestamp of the current/last message
        self.ts_field = 0  # last timestamp field (absolute for fmt 0, delta for 1/2)
        self.extended = False  # last fmt 0/1/2 header used an extended timestamp
        self.length = 0
        self.type_id = 0
        self.stream_id = 0
        self.has_header = False
        # The message being assembled (grown as chunks arrive), None between messages.
        self.payload: bytearray | None = None


class ChunkReader:
    """Incremental RTMP chunk stream parser: ``feed(bytes)`` → completed messages.

    Limits (each breach raises :class:`ChunkError`, and the reader stays broken):

    * ``max_message_size``: the largest message length a header may declare;
    * ``max_partial_messages``: unfinished messages (begun, not yet complete) at any one time;
    * ``max_partial_bytes``: payload bytes buffered in unfinished messages.

    Read-only state for the session, current after every ``feed()``:

    * ``partial_count``: unfinished messages;
    * ``partial_bytes``: payload bytes buffered in them (memory held is at most about twice
      this, as buffers grow by doubling);
    * ``chunk_size``: the peer's chunk size; ``bytes_received``: bytes fed so far.
    """

    def __init__(
        self,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_partial_messages: int = MAX_PARTIAL_MESSAGES,
        max_partial_bytes: int = MAX_PARTIAL_BYTES,
    ) -> None:
        self._chunk_size = 128
        self.max_message_size = max_message_size
        self.max_partial_messages = max_partial_messages
        self.max_partial_bytes = max_partial_bytes
        self._streams: dict[int, _Stream] = {}
        self._tail = b""  # an incomplete chunk header held back from the last feed
        self._current: _Stream | None = None  # stream whose chunk payload we are inside
        self._current_csid = 0
        self._chunk_left = 0  # payload bytes left in the current chunk
        self._partial_count = 0
        self._partial_bytes = 0
        self._ext_style = _EXT_UNKNOWN
        self._broken: str | None = None
        self.bytes_received = 0

    @property
    def chunk_size(self) -> int:
        """The peer's current chunk size (changed by its Set Chunk Size messages)."""
        return self._chunk_size

    @property
    def partial_count(self) -> int:
        """Messages begun and not yet complete."""
        return self._partial_count

    @property
    def partial_bytes(self) -> int:
        """Payload bytes buffered in unfinished messages."""
        return self._partial_bytes

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        if self._broken is not None:
            raise ChunkError(self._broken)
        try:
            return self._feed(bytes(data))
        except ChunkError as exc:
            self._broken = str(exc)
            raise

    def _fail(self, text: str) -> None:
        raise ChunkError(text)

    def _feed(self, data: bytes) -> list[Message]:
        self.bytes_received += len(data)
        if self._tail:
            data = self._tail + data
            self._tail = b""
        out: list[Message] = []
        pos = 0
        end = len(data)
        while pos < end:
            if self._chunk_left:
                pos = self._take_payload(data, pos, end, out)
                continue
            start = pos
            b0 = data[pos]
            fmt = b0 >> 6
            csid = b0 & 0x3F
            pos += 1
            if csid == 0:
                if end - pos < 1:
                    self._tail = data[start:]
                    break
                csid = data[pos] + 64
                pos += 1
            elif csid == 1:
                if end - pos < 2:
                    self._tail = data[start:]
                    break
                csid = data[pos] + (data[pos + 1] << 8) + 64
                pos += 2
            need = HEADER_SIZES[fmt]
            if end - pos < need:
                self._tail = data[start:]
                break
            stream = self._streams.get(csid)
            if stream is None:
                if fmt != 0:
                    self._fail(f"chunk stream {csid}: format {fmt} chunk without a previous header")
                stream = _Stream()
                self._streams[csid] = stream
            elif not stream.has_header and fmt != 0:
                self._fail(f"chunk stream {csid}: format {fmt} chunk without a previous header")
            in_message = stream.payload is not None
            if fmt != 3 and in_message:
                self._fail(f"chunk stream {csid}: new message header inside an unfinished message")
            if fmt < 3:
                ts_field = (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]
                if fmt < 2:
                    length = (data[pos + 3] << 16) | (data[pos + 4] << 8) | data[pos + 5]
                    type_id = data[pos + 6]
                    if fmt == 0:
                        stream_id = int.from_bytes(data[pos + 7 : pos + 11], "little")
                    else:
                        stream_id = stream.stream_id
                else:
                    length = stream.length
                    type_id = stream.type_id
                    stream_id = stream.stream_id
                pos += need
                extended = ts_field == EXTENDED
                if extended:
                    if end - pos < 4:
                        self._tail = data[start:]
                        break
                    ts_field = int.from_bytes(data[pos : pos + 4], "big")
                    pos += 4
                if length > self.max_message_size:
                    self._fail(
                        f"chunk stream {csid}: message of {length} bytes exceeds the limit "
                        f"of {self.max_message_size}"
                    )
                stream.extended = extended
                stream.ts_field = ts_field
                stream.length = length
                stream.type_id = type_id
                stream.stream_id = stream_id
                stream.has_header = True
                if fmt == 0:
                    stream.timestamp = ts_field
                else:
                    stream.timestamp = (stream.timestamp + ts_field) & 0xFFFFFFFF
            elif not in_message:
                if stream.extended:
                    if end - pos < 4:
                        self._tail = data[start:]
                        break
                    stream.ts_field = int.from_bytes(data[pos : pos + 4], "big")
                    pos += 4
                # A format-3 chunk that starts a message repeats the previous delta.
                stream.timestamp = (stream.timestamp + stream.ts_field) & 0xFFFFFFFF
            elif stream.extended and self._ext_style != _EXT_OMITTED:
                # A continuation chunk: its extended timestamp may be repeated or omitted.
                if end - pos < 4:
                    self._tail = data[start:]
                    break
                if self._ext_style == _EXT_UNKNOWN:
                    value = int.from_bytes(data[pos : pos + 4], "big")
                    if value == stream.ts_field or value == stream.timestamp:
                        self._ext_style = _EXT_REPEATED
                    else:
                        self._ext_style = _EXT_OMITTED
                if self._ext_style == _EXT_REPEATED:
                    pos += 4
            if not in_message:
                if stream.length == 0:
                    out.append((csid, stream.timestamp, stream.type_id, stream.stream_id, b""))
                    continue
                if self._partial_count >= self.max_partial_messages:
                    self._fail(
                        f"chunk stream {csid}: more than {self.max_partial_messages} "
                        "unfinished messages"
                    )
                self._partial_count += 1
                stream.payload = bytearray()
            self._current = stream
            self._chunk_left = min(self._chunk_size, stream.length - len(stream.payload))
            self._current_csid = csid
        return out

    def _take_payload(self, data: bytes, pos: int, end: int, out: list[Message]) -> int:
        stream = self._current
        assert stream is not None and stream.payload is not None
        n = min(self._chunk_left, end - pos)
        stream.payload += data[pos : pos + n]
        self._partial_bytes += n
        self._chunk_left -= n
        pos += n
        if len(stream.payload) == stream.length:
            payload = bytes(stream.payload)
            stream.payload = None
            self._partial_bytes -= stream.length
            self._partial_count -= 1
            self._chunk_left = 0
            self._current = None
            self._complete(self._current_csid, stream, payload, out)
        elif self._partial_bytes > self.max_partial_bytes:
            self._fail(
                f"chunk stream {self._current_csid}: more than {self.max_partial_bytes} bytes "
                "in unfinished messages"
            )
        return pos

    def _complete(self, csid: int, stream: _Stream, payload: bytes, out: list[Message]) -> None:
        type_id = stream.type_id
        if type_id == MSG_SET_CHUNK_SIZE:
            if len(payload) < 4:
                self._fail("set chunk size: payload shorter than 4 bytes")
            size = int.from_bytes(payload[:4], "big")
            if size < 1 or size > MAX_CHUNK_SIZE:
                self._fail(f"set chunk size: invalid chunk size {size}")
            self._chunk_size = size
        elif type_id == MSG_ABORT:
            if len(payload) < 4:
                self._fail("abort: payload shorter than 4 bytes")
            aborted = self._streams.get(int.from_bytes(payload[:4], "big"))
            if aborted is not None and aborted.payload is not None:
                self._partial_bytes -= len(aborted.payload)
                self._partial_count -= 1
                aborted.payload = None
        out.append((csid, stream.timestamp, type_id, stream.stream_id, payload))


def _basic_header(fmt: int, csid: int) -> bytes:
    if csid < 2 or csid > MAX_CSID:
        raise ChunkError(f"chunk stream id {csid} out of range 2..{MAX_CSID}")
    if csid < 64:
        return bytes(((fmt << 6) | csid,))
    if csid < 320:
        return bytes((fmt << 6, csid - 64))
    csid -= 64
    return bytes(((fmt << 6) | 1, csid & 0xFF, csid >> 8))


def _check(chunk_size: int, length: int) -> None:
    if chunk_size < 1 or chunk_size > MAX_CHUNK_SIZE:
        raise ChunkError(f"invalid chunk size {chunk_size}")
    if length > MAX_MESSAGE_SIZE:
        raise ChunkError(f"message of {length} bytes exceeds the 24-bit length field")


def _chunks(
    chunk_size: int, csid: int, header: bytes, ts_field: int, payload: bytes
) -> bytes:
    """Header + payload split into chunks with format-3 continuation headers."""
    extended = ts_field >= EXTENDED
    ext = ts_field.to_bytes(4, "big") if extended else b""
    parts = [header, ext, payload[:chunk_size]]
    if len(payload) > chunk_size:
        cont = _basic_header(3, csid) + ext
        for offset in range(chunk_size, len(payload), chunk_size):
            parts.append(cont)
            parts.append(payload[offset : offset + chunk_size])
    return b"".join(parts)


def _ts3(value: int) -> bytes:
    return min(value, EXTENDED).to_bytes(3, "big")


def encode_message(
    chunk_size: int,
    csid: int,
    timestamp: int,
    type_id: int,
    stream_id: int,
    payload: bytes | bytearray | memoryview,
) -> bytes:
    """One message as chunks with a full (format 0) header.

    Stateless, so the same bytes can be shared by every player that uses ``chunk_size``: this is
    how the relay encodes each media message once for all its RTMP viewers.
    """
    payload = bytes(payload)
    _check(chunk_size, len(payload))
    timestamp &= 0xFFFFFFFF
    header = (
        _basic_header(0, csid)
        + _ts3(timestamp)
        + len(payload).to_bytes(3, "big")
        + bytes((type_id & 0xFF,))
        + (stream_id & 0xFFFFFFFF).to_bytes(4, "little")
    )
    return _chunks(chunk_size, csid, header, timestamp, payload)


class ChunkWriter:
    """Serialiser for one connection's outgoing messages, with header compression.

    Uses format 1/2/3 headers when the chunk stream's previous message allows it, as ffmpeg and
    OBS do.  Set ``chunk_size`` only after the Set Chunk Size message itself was written.
    """

    def __init__(self, chunk_size: int = 128) -> None:
        self.chunk_size = chunk_size
        # csid -> (timestamp, length, type_id, stream_id, delta, delta_usable)
        self._last: dict[int, tuple[int, int, int, int, int, bool]] = {}

    def write(
        self,
        csid: int,
        timestamp: int,
        type_id: int,
        stream_id: int,
        payload: bytes | bytearray | memoryview,
    ) -> bytes:
        payload = bytes(payload)
        length = len(payload)
        _check(self.chunk_size, length)
        timestamp &= 0xFFFFFFFF
        type_id &= 0xFF
        stream_id &= 0xFFFFFFFF
        last = self._last.get(csid)
        if last is None or last[3] != stream_id or timestamp < last[0]:
            header = (
                _basic_header(0, csid)
                + _ts3(timestamp)
                + length.to_bytes(3, "big")
                + bytes((type_id,))
                + stream_id.to_bytes(4, "little")
            )
            ts_field = timestamp
            # After a format-0 header a format-3 message would repeat the *absolute* time.
            self._last[csid] = (timestamp, length, type_id, stream_id, timestamp, False)
        else:
            delta = timestamp - last[0]
            if length != last[1] or type_id != last[2]:
                header = (
                    _basic_header(1, csid)
                    + _ts3(delta)
                    + length.to_bytes(3, "big")
                    + bytes((type_id,))
                )
            elif delta != last[4] or not last[5]:
                header = _basic_header(2, csid) + _ts3(delta)
            else:
                header = _basic_header(3, csid)
            ts_field = delta
            self._last[csid] = (timestamp, length, type_id, stream_id, delta, True)
        return _chunks(self.chunk_size, csid, header, ts_field, payload)
