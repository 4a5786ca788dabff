# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""RTMP chunk stream: incremental parser and serialiser (compiled; twin of ``_chunk_py.py``).

Same API, results and error texts as the pure-Python twin, whose docstring explains the format,
the limits on unfinished messages and the extended-timestamp detection.  The parser walks a
``const unsigned char*`` over the fed bytes, copies each chunk's payload with one ``memcpy``
straight into a ``bytes`` object that becomes the message (handed out when full, so no copy at the
end), and keeps per-chunk-stream state in typed fields.  That object grows as chunks arrive, by
doubling (resized in place where realloc can), and is never sized by the declared length alone:
it is sized to the bytes at hand, and when a message is the only unfinished one, to up to twice
the bytes left in the fed buffer (so a message that arrived whole is allocated once, at its exact
size, and one cut by the end of a read usually needs one more resize).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport Py_INCREF, PyObject
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy

from watchbuy.engine.errors import ChunkError

cdef extern from "Python.h":
    # Resizes a bytes object nobody else holds, in place when the allocator can (realloc);
    # on failure it frees the object, sets *bytes to NULL and returns -1 with MemoryError set.
    int _PyBytes_Resize(PyObject** bytes, Py_ssize_t newsize) except -1
    void _decref "Py_DECREF" (PyObject* o)

from watchbuy.engine.wire import MSG_ABORT, MSG_SET_CHUNK_SIZE  # the one vocabulary

MAX_CHUNK_SIZE = 0x7FFFFFFF
MAX_MESSAGE_SIZE = 0xFFFFFF
MAX_CSID = 65599
MAX_PARTIAL_MESSAGES = 64
MAX_PARTIAL_BYTES = 32 * 1024 * 1024
HEADER_SIZES = (11, 7, 3, 0)

# C-level twins of the constants above (checked against wire.py's values at import, below):
# comparing against the Python module globals costs a dict lookup, an int box and a rich compare
# per message.
cdef enum:
    _SET_CHUNK_SIZE = 1
    _ABORT = 2
    _MAX_CHUNK_SIZE = 0x7FFFFFFF
    _MAX_MESSAGE_SIZE = 0xFFFFFF
    _MAX_CSID = 65599
    _SMALL_CSIDS = 64  # csids with a one-byte basic header: all that ffmpeg and OBS use
    EXTENDED = 0xFFFFFF  # timestamp field value announcing an extended timestamp
    # What the peer does with the extended timestamp on continuation chunks (see the twin).
    _EXT_UNKNOWN = 0
    _EXT_REPEATED = 1
    _EXT_OMITTED = 2

if _SET_CHUNK_SIZE != MSG_SET_CHUNK_SIZE or _ABORT != MSG_ABORT:  # pragma: no cover
    raise ImportError("_chunk.pyx: the C-level message types drifted from engine/wire.py")

cdef int[4] _HEADER_SIZES
_HEADER_SIZES[0] = 11
_HEADER_SIZES[1] = 7
_HEADER_SIZES[2] = 3
_HEADER_SIZES[3] = 0


cdef class _Stream:
    cdef uint32_t timestamp
    cdef uint32_t ts_field
    cdef bint extended
    cdef Py_ssize_t length
    cdef int type_id
    cdef uint32_t stream_id
    cdef bint has_header
    cdef bytes payload  # None between messages; its size is the capacity
    cdef Py_ssize_t filled


cdef inline uint32_t _be24(const unsigned char* p) noexcept:
    return (<uint32_t>p[0] << 16) | (<uint32_t>p[1] << 8) | p[2]


cdef inline uint32_t _be32(const unsigned char* p) noexcept:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint32_t _le32(const unsigned char* p) noexcept:
    return (<uint32_t>p[3] << 24) | (<uint32_t>p[2] << 16) | (<uint32_t>p[1] << 8) | p[0]


cdef class ChunkReader:
    """Incremental RTMP chunk stream parser: ``feed(bytes)`` → completed messages.

    Limits (each breach raises :class:`ChunkError`, and the reader stays broken):

    * ``max_message_size``: the largest message length a header may declare;
    * ``max_partial_messages``: unfinished messages (begun, not yet complete) at any one time;
    * ``max_partial_bytes``: payload bytes buffered in unfinished messages.

    Read-only state for the session, current after every ``feed()``:

    * ``partial_count``: unfinished messages;
    * ``partial_bytes``: payload bytes buffered in them (memory held is at most about twice
      this, plus twice one fed buffer);
    * ``chunk_size``: the peer's chunk size; ``bytes_received``: bytes fed so far.
    """

    cdef Py_ssize_t _chunk_size
    cdef public Py_ssize_t max_message_size
    cdef public Py_ssize_t max_partial_messages
    cdef public Py_ssize_t max_partial_bytes
    cdef dict _streams
    cdef list _small  # _streams[csid] for csid < 64 (None when unseen): no int box, no hashing
    cdef bytes _tail
    cdef _Stream _current
    cdef int _current_csid
    cdef Py_ssize_t _chunk_left
    cdef Py_ssize_t _partial_count
    cdef Py_ssize_t _partial_bytes
    cdef int _ext_style
    cdef object _broken
    cdef public unsigned long long bytes_received

    def __init__(self, Py_ssize_t max_message_size=MAX_MESSAGE_SIZE,
                 Py_ssize_t max_partial_messages=MAX_PARTIAL_MESSAGES,
                 Py_ssize_t max_partial_bytes=MAX_PARTIAL_BYTES):
        self._chunk_size = 128
        self.max_message_size = max_message_size
        self.max_partial_messages = max_partial_messages
        self.max_partial_bytes = max_partial_bytes
        self._streams = {}
        self._small = [None] * _SMALL_CSIDS
        self._tail = b""
        self._current = None
        self._current_csid = 0
        self._chunk_left = 0
        self._partial_count = 0
        self._partial_bytes = 0
        self._ext_style = _EXT_UNKNOWN
        self._broken = None
        self.bytes_received = 0

    @property
    def chunk_size(self):
        """The peer's current chunk size (changed by its Set Chunk Size messages)."""
        return self._chunk_size

    @property
    def partial_count(self):
        """Messages begun and not yet complete."""
        return self._partial_count

    @property
    def partial_bytes(self):
        """Payload bytes buffered in unfinished messages."""
        return self._partial_bytes

    cdef int _reserve(self, _Stream stream, Py_ssize_t want, Py_ssize_t at_hand) except -1:
        """Grow the message buffer to hold ``want`` bytes; ``at_hand``: as many as could be
        filled from the bytes already fed."""
        cdef Py_ssize_t cap = 2 * PyBytes_GET_SIZE(stream.payload)
        cdef PyObject* raw
        if cap < want:
            cap = want
        # Only one message may size itself by the fed buffer (several doing so would each claim
        # the same bytes), to twice what is at hand like any doubling: then a message cut by
        # the end of a read usually needs no second allocation.
        if self._partial_count == 1 and cap < 2 * at_hand:
            cap = 2 * at_hand
        if cap > stream.length:
            cap = stream.length
        if PyBytes_GET_SIZE(stream.payload) == 0:  # the shared b"": nothing to keep
            stream.payload = PyBytes_FromStringAndSize(NULL, cap)
            return 0
        # The buffer was never handed out: once the stream lets go, ours is the only reference,
        # as resizing requires.  realloc often grows it without a copy.
        raw = <PyObject*>stream.payload
        Py_INCREF(stream.payload)
        stream.payload = None
        _PyBytes_Resize(&raw, cap)
        stream.payload = <bytes>raw
        _decref(raw)
        return 0

    def feed(self, data):
        if self._broken is not None:
            raise ChunkError(self._broken)
        if type(data) is not bytes:
            data = bytes(data)
        try:
            return self._feed(<bytes>data)
        except ChunkError as exc:
            self._broken = str(exc)
            raise

    cdef list _feed(self, bytes data):
        cdef list out = []
        cdef Py_ssize_t pos = 0, end, start, need, n
        cdef const unsigned char* buf
        cdef int b0, fmt, csid, type_id
        cdef uint32_t ts_field, stream_id
        cdef Py_ssize_t length
        cdef bint extended, in_message
        cdef _Stream stream
        cdef object found

        self.bytes_received += PyBytes_GET_SIZE(data)
        if PyBytes_GET_SIZE(self._tail):
            data = self._tail + data
            self._tail = b""
        buf = <const unsigned char*>PyBytes_AS_STRING(data)
        end = PyBytes_GET_SIZE(data)

        while pos < end:
            if self._chunk_left:
                stream = self._current
                n = self._chunk_left
                if end - pos < n:
                    n = end - pos
                if stream.filled + n > PyBytes_GET_SIZE(stream.payload):
                    self._reserve(stream, stream.filled + n, stream.filled + end - pos)
                memcpy(PyBytes_AS_STRING(stream.payload) + stream.filled, buf + pos, n)
                stream.filled += n
                self._partial_bytes += n
                self._chunk_left -= n
                pos += n
                if stream.filled == stream.length:
                    payload = stream.payload  # exactly `length` bytes: capacity never exceeds it
                    stream.payload = None
                    self._partial_bytes -= stream.length
                    self._partial_count -= 1
                    self._chunk_left = 0
                    self._current = None
                    if stream.type_id == _SET_CHUNK_SIZE or stream.type_id == _ABORT:
                        self._complete(self._current_csid, stream, payload, out)
                    else:
                        out.append((self._current_csid, stream.timestamp, stream.type_id,
                                    stream.stream_id, payload))
                elif self._partial_bytes > self.max_partial_bytes:
                    raise ChunkError(
                        f"chunk stream {self._current_csid}: more than {self.max_partial_bytes} "
                        "bytes in unfinished messages")
                continue

            start = pos
            b0 = buf[pos]
            fmt = b0 >> 6
            csid = b0 & 0x3F
            pos += 1
            if csid == 0:
                if end - pos < 1:
                    self._tail = data[start:]
                    break
                csid = buf[pos] + 64
                pos += 1
            elif csid == 1:
                if end - pos < 2:
                    self._tail = data[start:]
                    break
                csid = buf[pos] + (buf[pos + 1] << 8) + 64
                pos += 2
            need = _HEADER_SIZES[fmt]
            if end - pos < need:
                self._tail = data[start:]
                break
            if csid < _SMALL_CSIDS:
                found = self._small[csid]
            else:
                found = self._streams.get(csid)
            if found is None:
                if fmt != 0:
                    raise ChunkError(
                        f"chunk stream {csid}: format {fmt} chunk without a previous header")
                stream = _Stream.__new__(_Stream)
                stream.payload = None
                self._streams[csid] = stream
                if csid < _SMALL_CSIDS:
                    self._small[csid] = stream
            else:
                stream = <_Stream>found
                if not stream.has_header and fmt != 0:
                    raise ChunkError(
                        f"chunk stream {csid}: format {fmt} chunk without a previous header")
            in_message = stream.payload is not None
            if fmt != 3 and in_message:
                raise ChunkError(
                    f"chunk stream {csid}: new message header inside an unfinished message")
            if fmt < 3:
                ts_field = _be24(buf + pos)
                if fmt < 2:
                    length = _be24(buf + pos + 3)
                    type_id = buf[pos + 6]
                    if fmt == 0:
                        stream_id = _le32(buf + pos + 7)
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
                    ts_field = _be32(buf + pos)
                    pos += 4
                if length > self.max_message_size:
                    raise ChunkError(
                        f"chunk stream {csid}: message of {length} bytes exceeds the limit "
                        f"of {self.max_message_size}")
                stream.extended = extended
                stream.ts_field = ts_field
                stream.length = length
                stream.type_id = type_id
                stream.stream_id = stream_id
                stream.has_header = True
                if fmt == 0:
                    stream.timestamp = ts_field
                else:
                    stream.timestamp = stream.timestamp + ts_field  # wraps mod 2**32
            elif not in_message:
                if stream.extended:
                    if end - pos < 4:
                        self._tail = data[start:]
                        break
                    stream.ts_field = _be32(buf + pos)
                    pos += 4
                # A format-3 chunk that starts a message repeats the previous delta.
                stream.timestamp = stream.timestamp + stream.ts_field
            elif stream.extended and self._ext_style != _EXT_OMITTED:
                # A continuation chunk: its extended timestamp may be repeated or omitted.
                if end - pos < 4:
                    self._tail = data[start:]
                    break
                if self._ext_style == _EXT_UNKNOWN:
                    ts_field = _be32(buf + pos)
                    if ts_field == stream.ts_field or ts_field == stream.timestamp:
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
                    raise ChunkError(
                        f"chunk stream {csid}: more than {self.max_partial_messages} "
                        "unfinished messages")
                self._partial_count += 1
                stream.payload = b""  # grown as the chunks arrive
                stream.filled = 0
            self._current = stream
            self._current_csid = csid
            self._chunk_left = self._chunk_size
            if stream.length - stream.filled < self._chunk_left:
                self._chunk_left = stream.length - stream.filled
        return out

    cdef _complete(self, int csid, _Stream stream, bytes payload, list out):
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(payload)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        cdef uint32_t size
        cdef object found
        cdef _Stream aborted
        if stream.type_id == _SET_CHUNK_SIZE:
            if n < 4:
                raise ChunkError("set chunk size: payload shorter than 4 bytes")
            size = _be32(p)
            if size < 1 or size > _MAX_CHUNK_SIZE:
                raise ChunkError(f"set chunk size: invalid chunk size {size}")
            self._chunk_size = size
        elif stream.type_id == _ABORT:
            if n < 4:
                raise ChunkError("abort: payload shorter than 4 bytes")
            found = self._streams.get(_be32(p))
            if found is not None:
                aborted = <_Stream>found
                if aborted.payload is not None:
                    self._partial_bytes -= aborted.filled
                    self._partial_count -= 1
                    aborted.payload = None
        out.append((csid, stream.timestamp, stream.type_id, stream.stream_id, payload))


cdef Py_ssize_t _write_basic_header(char* out, int fmt, long csid) except -1:
    if csid < 2 or csid > _MAX_CSID:
        raise ChunkError(f"chunk stream id {csid} out of range 2..{MAX_CSID}")
    if csid < 64:
        out[0] = <char>((fmt << 6) | csid)
        return 1
    if csid < 320:
        out[0] = <char>(fmt << 6)
        out[1] = <char>(csid - 64)
        return 2
    csid -= 64
    out[0] = <char>((fmt << 6) | 1)
    out[1] = <char>(csid & 0xFF)
    out[2] = <char>(csid >> 8)
    return 3


cdef inline void _put24(char* p, uint32_t v) noexcept:
    p[0] = <char>((v >> 16) & 0xFF)
    p[1] = <char>((v >> 8) & 0xFF)
    p[2] = <char>(v & 0xFF)


cdef inline void _put32(char* p, uint32_t v) noexcept:
    p[0] = <char>((v >> 24) & 0xFF)
    p[1] = <char>((v >> 16) & 0xFF)
    p[2] = <char>((v >> 8) & 0xFF)
    p[3] = <char>(v & 0xFF)


cdef int _check(long long chunk_size, Py_ssize_t length) except -1:
    if chunk_size < 1 or chunk_size > _MAX_CHUNK_SIZE:
        raise ChunkError(f"invalid chunk size {chunk_size}")
    if length > _MAX_MESSAGE_SIZE:
        raise ChunkError(f"message of {length} bytes exceeds the 24-bit length field")
    return 0


cdef bytes _chunks(Py_ssize_t chunk_size, long csid, const char* header, Py_ssize_t header_len,
                   uint32_t ts_field, const unsigned char* payload, Py_ssize_t length):
    """Header + payload split into chunks with format-3 continuation headers, in one buffer."""
    cdef char cont[8]
    cdef Py_ssize_t cont_len, n_cont, total, offset, n
    cdef bint extended = ts_field >= EXTENDED
    cdef bytes result
    cdef char* w
    cont_len = _write_basic_header(cont, 3, csid)
    if extended:
        _put32(cont + cont_len, ts_field)
        cont_len += 4
    n_cont = (length - 1) // chunk_size if length > 0 else 0
    total = header_len + (4 if extended else 0) + length + n_cont * cont_len
    result = PyBytes_FromStringAndSize(NULL, total)
    w = PyBytes_AS_STRING(result)
    memcpy(w, header, header_len)
    w += header_len
    if extended:
        _put32(w, ts_field)
        w += 4
    n = chunk_size if length > chunk_size else length
    memcpy(w, payload, n)
    w += n
    offset = n
    while offset < length:
        memcpy(w, cont, cont_len)
        w += cont_len
        n = chunk_size if length - offset > chunk_size else length - offset
        memcpy(w, payload + offset, n)
        w += n
        offset += n
    return result


def encode_message(long long chunk_size, long csid, unsigned long long timestamp, int type_id,
                   unsigned long long stream_id, payload):
    """One message as chunks with a full (format 0) header (see the twin's docstring)."""
    cdef const unsigned char[:] view
    cdef const unsigned char* p
    cdef Py_ssize_t length
    cdef char header[16]
    cdef Py_ssize_t h
    cdef uint32_t ts = <uint32_t>timestamp  # mod 2**32 (a 0xFFFFFFFF mask would box)
    if type(payload) is bytes:
        p = <const unsigned char*>PyBytes_AS_STRING(payload)
        length = PyBytes_GET_SIZE(payload)
    else:
        payload = bytes(payload)
        p = <const unsigned char*>PyBytes_AS_STRING(payload)
        length = PyBytes_GET_SIZE(payload)
    _check(chunk_size, length)
    h = _write_basic_header(header, 0, csid)
    _put24(header + h, ts if ts < EXTENDED else EXTENDED)
    _put24(header + h + 3, <uint32_t>length)
    header[h + 6] = <char>(type_id & 0xFF)
    header[h + 7] = <char>(stream_id & 0xFF)
    header[h + 8] = <char>((stream_id >> 8) & 0xFF)
    header[h + 9] = <char>((stream_id >> 16) & 0xFF)
    header[h + 10] = <char>((stream_id >> 24) & 0xFF)
    return _chunks(chunk_size, csid, header, h + 11, ts, p, length)


cdef class _Last:
    cdef uint32_t timestamp
    cdef Py_ssize_t length
    cdef int type_id
    cdef uint32_t stream_id
    cdef uint32_t delta
    cdef bint delta_usable


cdef class ChunkWriter:
    """Serialiser for one connection's outgoing messages, with header compression."""

    cdef public long long chunk_size
    cdef dict _last

    def __init__(self, long long chunk_size=128):
        self.chunk_size = chunk_size
        self._last = {}

    def write(self, long csid, unsigned long long timestamp, int type_id,
              unsigned long long stream_id, payload):
        cdef const unsigned char* p
        cdef Py_ssize_t length, h
        cdef char header[16]
        cdef uint32_t ts = <uint32_t>timestamp  # mod 2**32 (a 0xFFFFFFFF mask would box)
        cdef uint32_t sid = <uint32_t>stream_id
        cdef uint32_t delta, ts_field
        cdef int tid = type_id & 0xFF
        cdef _Last last
        cdef object found
        if type(payload) is not bytes:
            payload = bytes(payload)
        p = <const unsigned char*>PyBytes_AS_STRING(payload)
        length = PyBytes_GET_SIZE(payload)
        _check(self.chunk_size, length)
        found = self._last.get(csid)
        if found is None:
            last = _Last.__new__(_Last)
            self._last[csid] = last
            h = -1
        else:
            last = <_Last>found
            h = 0 if (last.stream_id == sid and ts >= last.timestamp) else -1
        if h < 0:
            h = _write_basic_header(header, 0, csid)
            _put24(header + h, ts if ts < EXTENDED else EXTENDED)
            _put24(header + h + 3, <uint32_t>length)
            header[h + 6] = <char>tid
            header[h + 7] = <char>(sid & 0xFF)
            header[h + 8] = <char>((sid >> 8) & 0xFF)
            header[h + 9] = <char>((sid >> 16) & 0xFF)
            header[h + 10] = <char>((sid >> 24) & 0xFF)
            h += 11
            ts_field = ts
            last.delta = ts
            last.delta_usable = False
        else:
            delta = ts - last.timestamp
            if length != last.length or tid != last.type_id:
                h = _write_basic_header(header, 1, csid)
                _put24(header + h, delta if delta < EXTENDED else EXTENDED)
                _put24(header + h + 3, <uint32_t>length)
                header[h + 6] = <char>tid
                h += 7
            elif delta != last.delta or not last.delta_usable:
                h = _write_basic_header(header, 2, csid)
                _put24(header + h, delta if delta < EXTENDED else EXTENDED)
                h += 3
            else:
                h = _write_basic_header(header, 3, csid)
            ts_field = delta
            last.delta = delta
            last.delta_usable = True
        last.timestamp = ts
        last.length = length
        last.type_id = tid
        last.stream_id = sid
        return _chunks(self.chunk_size, csid, header, h, ts_field, p, length)
