# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""FLV muxing, demuxing and media-tag inspection (compiled; twin of ``_flvmux_py.py``).

Same API, results and error texts as the pure-Python twin, whose docstring explains the format.
Bytes-like inputs are read through a ``const unsigned char*`` (bytes directly, anything else via
a PyBUF_SIMPLE buffer), outputs are allocated once with ``PyBytes_FromStringAndSize(NULL, n)``
and written in place.  The reader copies a payload straight from the fed bytes when the whole
payload is there, else into the tag's final ``bytes`` object as the pieces arrive, so every
payload byte is copied exactly once.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLongMask
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from operator import index

from watchbuy.engine.errors import FLVError

TAG_AUDIO = 8
TAG_VIDEO = 9
TAG_SCRIPT = 18

MAX_DATA_SIZE = 0xFFFFFF
DEFAULT_MAX_TAG_SIZE = 16 * 1024 * 1024

cdef Py_ssize_t _MAX_DATA_SIZE = 0xFFFFFF

cdef tuple _HEADERS = (
    b"FLV\x01\x00\x00\x00\x00\x09\x00\x00\x00\x00",
    b"FLV\x01\x01\x00\x00\x00\x09\x00\x00\x00\x00",
    b"FLV\x01\x04\x00\x00\x00\x09\x00\x00\x00\x00",
    b"FLV\x01\x05\x00\x00\x00\x09\x00\x00\x00\x00",
)


cdef inline uint32_t _be24(const unsigned char* p) noexcept:
    return (<uint32_t>p[0] << 16) | (<uint32_t>p[1] << 8) | p[2]


cdef inline uint32_t _be32(const unsigned char* p) noexcept:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void _put_be32(unsigned char* p, uint32_t v) noexcept:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef int _get_buffer(object obj, Py_buffer* view, str what) except -1:
    """PyBUF_SIMPLE view of ``obj`` with the twin's TypeError for anything unusable."""
    try:
        PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    except (TypeError, BufferError):
        raise TypeError(
            f"{what} must be a C-contiguous bytes-like object, not {type(obj).__name__}"
        ) from None
    return 0


def flv_header(bint has_audio=True, bint has_video=True) -> bytes:
    """The 9-byte FLV file header followed by PreviousTagSize0 (13 bytes)."""
    return _HEADERS[(2 if has_audio else 0) | (1 if has_video else 0)]


def flv_tag(tag_type, timestamp, payload) -> bytes:
    """One complete FLV tag: 11-byte header + payload + 4-byte PreviousTagSize.

    ``timestamp`` is taken modulo 2**32; the tag type must be 0..255.
    """
    cdef int overflow = 0
    cdef long long t = PyLong_AsLongLongAndOverflow(tag_type, &overflow)
    if overflow or t < 0 or t > 0xFF:
        raise FLVError(f"tag type {index(tag_type)} out of range 0..255")
    # Masking the two's-complement value is exactly Python's ``% 2**32``, negatives included.
    cdef uint32_t ts = <uint32_t>(PyLong_AsUnsignedLongLongMask(timestamp) & 0xFFFFFFFF)

    cdef Py_buffer view
    cdef const unsigned char* src
    cdef Py_ssize_t size
    cdef bint release = False
    if type(payload) is bytes:
        src = <const unsigned char*>PyBytes_AS_STRING(payload)
        size = len(<bytes>payload)
    else:
        _get_buffer(payload, &view, "payload")
        release = True
        src = <const unsigned char*>view.buf
        size = view.len
    cdef bytes out
    cdef unsigned char* dst
    try:
        if size > _MAX_DATA_SIZE:
            raise FLVError(
                f"tag payload of {size} bytes exceeds the FLV limit of {_MAX_DATA_SIZE}"
            )
        out = PyBytes_FromStringAndSize(NULL, size + 15)
        dst = <unsigned char*>PyBytes_AS_STRING(out)
        _put_be32(dst, (<uint32_t>t << 24) | <uint32_t>size)
        dst[4] = <unsigned char>(ts >> 16)
        dst[5] = <unsigned char>(ts >> 8)
        dst[6] = <unsigned char>ts
        dst[7] = <unsigned char>(ts >> 24)
        dst[8] = 0
        dst[9] = 0
        dst[10] = 0
        if size:
            memcpy(dst + 11, src, size)
        _put_be32(dst + 11 + size, <uint32_t>(size + 11))
    finally:
        if release:
            PyBuffer_Release(&view)
    return out


# Reader states; PreviousTagSize fields and extra header bytes are all "bytes to skip".
cdef enum:
    ST_HEADER = 0
    ST_SKIP = 1
    ST_TAG_HEADER = 2
    ST_PAYLOAD = 3
    ST_BROKEN = 4


cdef class FlvReader:
    """Incremental FLV demuxer: ``feed(bytes)`` returns the tags those bytes complete.

    Tags come out as ``(tag_type, timestamp, payload)`` as soon as their payload is complete.
    After an FLVError the reader stays broken and every later ``feed`` raises again.
    """

    cdef readonly object max_tag_size
    cdef readonly bint header_parsed
    cdef readonly bint has_audio
    cdef readonly bint has_video
    cdef readonly unsigned long long tags_read
    cdef Py_ssize_t _max
    cdef int _state
    cdef uint64_t _skip  # offset - 9 + 4 can exceed 2**32
    cdef unsigned char _head[11]  # an unfinished file or tag header
    cdef Py_ssize_t _have  # bytes in _head, or of _payload filled
    cdef bytes _payload  # the tag's final bytes object while it fills; None otherwise
    cdef int _type
    cdef uint32_t _ts
    cdef Py_ssize_t _size
    cdef str _error

    def __init__(self, max_tag_size=DEFAULT_MAX_TAG_SIZE):
        m = index(max_tag_size)
        if m < 0:
            raise ValueError(f"max_tag_size must be >= 0, not {m}")
        self.max_tag_size = m
        self._max = min(m, MAX_DATA_SIZE)
        self._state = ST_HEADER
        self._skip = 0
        self._have = 0
        self._payload = None
        self._type = 0
        self._ts = 0
        self._size = 0
        self._error = ""
        self.header_parsed = False
        self.has_audio = False
        self.has_video = False
        self.tags_read = 0

    cdef object _fail(self, str message):
        self._state = ST_BROKEN
        self._error = message
        self._payload = None
        self._have = 0
        return FLVError(message)

    def feed(self, data) -> list:
        cdef Py_buffer view
        cdef const unsigned char* p
        cdef Py_ssize_t n
        cdef bint release = False
        if type(data) is bytes:
            p = <const unsigned char*>PyBytes_AS_STRING(data)
            n = len(<bytes>data)
        else:
            _get_buffer(data, &view, "data")
            release = True
            p = <const unsigned char*>view.buf
            n = view.len
        cdef list out = []
        try:
            if self._state == ST_BROKEN:
                raise FLVError(f"FLV reader failed earlier: {self._error}")
            self._run(p, n, out)
        finally:
            if release:
                PyBuffer_Release(&view)
        return out

    cdef int _run(self, const unsigned char* p, Py_ssize_t n, list out) except -1:
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t need, take
        cdef uint32_t size
        cdef const unsigned char* h
        cdef bytes payload
        while pos < n or (self._state == ST_PAYLOAD and self._size == 0):
            if self._state == ST_PAYLOAD:
                need = self._size - self._have
                if self._payload is None:
                    if n - pos >= need:
                        # Whole payload in hand: one copy, straight from the input.
                        payload = PyBytes_FromStringAndSize(<const char*>(p + pos), need)
                        pos += need
                    else:
                        # Allocate the final object now and fill it as pieces arrive; nobody
                        # else sees it until it is full, so writing into it is safe.
                        self._payload = PyBytes_FromStringAndSize(NULL, self._size)
                        take = n - pos
                        memcpy(PyBytes_AS_STRING(self._payload), p + pos, take)
                        self._have = take
                        return 0
                else:
                    take = need if n - pos >= need else n - pos
                    memcpy(PyBytes_AS_STRING(self._payload) + self._have, p + pos, take)
                    pos += take
                    self._have += take
                    if self._have < self._size:
                        return 0
                    payload = self._payload
                    self._payload = None
                    self._have = 0
                out.append((self._type, self._ts, payload))
                self.tags_read += 1
                self._skip = 4  # this tag's PreviousTagSize
                self._state = ST_SKIP
            elif self._state == ST_SKIP:
                if <uint64_t>(n - pos) >= self._skip:
                    pos += <Py_ssize_t>self._skip
                    self._skip = 0
                    self._state = ST_TAG_HEADER
                else:
                    self._skip -= <uint64_t>(n - pos)
                    return 0
            elif self._state == ST_TAG_HEADER:
                if self._have == 0 and n - pos >= 11:
                    h = p + pos
                    pos += 11
                else:
                    take = 11 - self._have
                    if n - pos < take:
                        take = n - pos
                    memcpy(self._head + self._have, p + pos, take)
                    pos += take
                    self._have += take
                    if self._have < 11:
                        return 0
                    self._have = 0
                    h = self._head
                size = _be24(h + 1)
                if size > self._max:
                    raise self._fail(
                        f"tag data size {size} exceeds max_tag_size {self.max_tag_size}"
                    )
                self._type = h[0]
                self._ts = _be24(h + 4) | (<uint32_t>h[7] << 24)
                self._size = size
                self._state = ST_PAYLOAD
            else:  # ST_HEADER
                take = 9 - self._have
                if n - pos < take:
                    take = n - pos
                memcpy(self._head + self._have, p + pos, take)
                pos += take
                self._have += take
                if self._have < 9:
                    return 0
                self._have = 0
                self._parse_header()
        return 0

    cdef int _parse_header(self) except -1:
        cdef const unsigned char* h = self._head
        if memcmp(h, b"FLV", 3) != 0:
            raise self._fail(f"bad FLV signature {PyBytes_FromStringAndSize(<const char*>h, 3)!r}")
        if h[3] != 1:
            raise self._fail(f"unsupported FLV version {h[3]}")
        cdef uint32_t offset = _be32(h + 5)
        if offset < 9:
            raise self._fail(f"bad FLV data offset {offset}")
        self.has_audio = (h[4] & 0x04) != 0
        self.has_video = (h[4] & 0x01) != 0
        self.header_parsed = True
        self._skip = <uint64_t>offset - 9 + 4
        self._state = ST_SKIP
        return 0


# ---------------------------------------------------------------------------------------------
# Tag inspection (see the twin for the format notes)
#
# Results are small immutable tuples drawn from a few hundred possibilities, so they are built
# once at import and handed out shared: a call allocates nothing unless a FourCC is one we do
# not know (then its text is the codec name).

cdef tuple _VIDEO_NAMES = (
    "unknown", "h263", "screen", "vp6", "vp6a", "screen2", "avc", "hevc", "av1", "vp9",
)
cdef enum:
    V_UNKNOWN = 0
    V_AVC = 6
    V_HEVC = 7
    V_AV1 = 8
    V_VP9 = 9
    V_COUNT = 10
# Legacy CodecID → index into _VIDEO_NAMES.
cdef int[16] _LEGACY_VIDEO
_LEGACY_VIDEO[:] = [0, 0, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 7, 8, 0, 0]

cdef tuple _AUDIO_NAMES = (
    "unknown", "pcm", "adpcm", "mp3", "pcm_le", "nellymoser16", "nellymoser8", "nellymoser",
    "g711a", "g711u", "aac", "speex", "mp3_8k", "opus", "flac", "ac3", "eac3",
)
cdef enum:
    A_UNKNOWN = 0
    A_MP3 = 3
    A_AAC = 10
    A_OPUS = 13
    A_FLAC = 14
    A_AC3 = 15
    A_EAC3 = 16
    A_COUNT = 17
# Legacy SoundFormat → index into _AUDIO_NAMES (9 is the ExHeader, handled before this).
cdef int[16] _LEGACY_AUDIO
_LEGACY_AUDIO[:] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 10, 11, 0, 0, 12, 0]

# FourCCs as big-endian integers.
cdef enum:
    FOURCC_AVC1 = 0x61766331
    FOURCC_HVC1 = 0x68766331
    FOURCC_AV01 = 0x61763031
    FOURCC_VP09 = 0x76703039
    FOURCC_MP4A = 0x6D703461
    FOURCC_OPUS = 0x4F707573
    FOURCC_FLAC = 0x664C6143
    FOURCC_AC3 = 0x61632D33
    FOURCC_EAC3 = 0x65632D33
    FOURCC_MP3 = 0x2E6D7033

cdef enum:
    FRAME_KEY = 1
    FRAME_COMMAND = 5
    PKT_SEQUENCE_START = 0
    PKT_CODED_FRAMES = 1
    PKT_CODED_FRAMES_X = 3
    PKT_METADATA = 4
    PKT_MPEG2TS_SEQUENCE_START = 5
    PKT_VIDEO_MULTITRACK = 6
    PKT_AUDIO_MULTITRACK = 5
    PKT_MODEX = 7


cdef tuple _make_video_results():
    cdef list out = []
    for name in _VIDEO_NAMES:
        for frame_type in range(8):
            for key in (False, True):
                for seq in (False, True):
                    out.append((name, frame_type, key, seq))
    return tuple(out)


cdef tuple _make_audio_results():
    return tuple([(name, seq) for name in _AUDIO_NAMES for seq in (False, True)])


cdef tuple _VIDEO_RESULTS = _make_video_results()
cdef tuple _AUDIO_RESULTS = _make_audio_results()
cdef tuple _VIDEO_EMPTY = ("", 0, False, False)
cdef tuple _AUDIO_EMPTY = ("", False)


cdef inline tuple _video(int name, int frame_type, bint key, bint seq):
    return <tuple>_VIDEO_RESULTS[((name * 8 + frame_type) * 2 + key) * 2 + seq]


cdef inline tuple _audio(int name, bint seq):
    return <tuple>_AUDIO_RESULTS[name * 2 + seq]


cdef inline int _fourcc_index(const unsigned char* p, bint video) noexcept:
    """Index of a known FourCC's codec name, V/A_UNKNOWN if not printable, else -1."""
    cdef uint32_t code = _be32(p)
    if video:
        if code == FOURCC_AVC1:
            return V_AVC
        if code == FOURCC_HVC1:
            return V_HEVC
        if code == FOURCC_AV01:
            return V_AV1
        if code == FOURCC_VP09:
            return V_VP9
    else:
        if code == FOURCC_MP4A:
            return A_AAC
        if code == FOURCC_OPUS:
            return A_OPUS
        if code == FOURCC_FLAC:
            return A_FLAC
        if code == FOURCC_AC3:
            return A_AC3
        if code == FOURCC_EAC3:
            return A_EAC3
        if code == FOURCC_MP3:
            return A_MP3
    cdef int i
    for i in range(4):
        if p[i] < 0x20 or p[i] >= 0x7F:
            return 0  # V_UNKNOWN == A_UNKNOWN
    return -1


include "_modex.pxi"


cdef tuple _video_fourcc(const unsigned char* p, int frame_type, bint key, bint seq):
    cdef int name = _fourcc_index(p, True)
    if name >= 0:
        return _video(name, frame_type, key, seq)
    return (PyUnicode_DecodeASCII(<const char*>p, 4, NULL), frame_type, key, seq)


cdef tuple _inspect_video(const unsigned char* p, Py_ssize_t n):
    if n == 0:
        return _VIDEO_EMPTY
    cdef unsigned char b0 = p[0]
    cdef int frame_type, name, packet_type, inner
    cdef Py_ssize_t pos
    if not (b0 & 0x80):
        frame_type = b0 >> 4
        name = _LEGACY_VIDEO[b0 & 0x0F]
        if name == V_AVC or name == V_HEVC or name == V_AV1:
            # AVCPacketType: 0 sequence header, 1 NALUs, 2 end of sequence.
            if n < 2:
                return _video(name, frame_type, False, False)
            return _video(name, frame_type, frame_type == FRAME_KEY and p[1] == 1, p[1] == 0)
        return _video(name, frame_type, frame_type == FRAME_KEY, False)

    frame_type = (b0 >> 4) & 0x07
    packet_type = b0 & 0x0F
    pos = _skip_modex(p, n, &packet_type)
    if pos < 0:
        return _video(V_UNKNOWN, frame_type, False, False)
    if frame_type == FRAME_COMMAND and packet_type != PKT_METADATA:
        return _video(V_UNKNOWN, frame_type, False, False)
    if packet_type == PKT_VIDEO_MULTITRACK:
        if pos + 5 > n:
            return _video(V_UNKNOWN, frame_type, False, False)
        inner = p[pos] & 0x0F
        return _video_fourcc(
            p + pos + 1,
            frame_type,
            frame_type == FRAME_KEY and (inner == PKT_CODED_FRAMES or inner == PKT_CODED_FRAMES_X),
            False,
        )
    if pos + 4 > n:
        return _video(V_UNKNOWN, frame_type, False, False)
    return _video_fourcc(
        p + pos,
        frame_type,
        frame_type == FRAME_KEY
        and (packet_type == PKT_CODED_FRAMES or packet_type == PKT_CODED_FRAMES_X),
        packet_type == PKT_SEQUENCE_START or packet_type == PKT_MPEG2TS_SEQUENCE_START,
    )


cdef tuple _audio_fourcc(const unsigned char* p, bint seq):
    cdef int name = _fourcc_index(p, False)
    if name >= 0:
        return _audio(name, seq)
    return (PyUnicode_DecodeASCII(<const char*>p, 4, NULL), seq)


cdef tuple _inspect_audio(const unsigned char* p, Py_ssize_t n):
    if n == 0:
        return _AUDIO_EMPTY
    cdef unsigned char b0 = p[0]
    cdef int fmt = b0 >> 4
    cdef int packet_type
    cdef Py_ssize_t pos
    if fmt != 9:
        return _audio(_LEGACY_AUDIO[fmt], fmt == 10 and n >= 2 and p[1] == 0)
    packet_type = b0 & 0x0F
    pos = _skip_modex(p, n, &packet_type)
    if pos < 0:
        return _audio(A_UNKNOWN, False)
    if packet_type == PKT_AUDIO_MULTITRACK:
        if pos + 5 > n:
            return _audio(A_UNKNOWN, False)
        return _audio_fourcc(p + pos + 1, False)
    if pos + 4 > n:
        return _audio(A_UNKNOWN, False)
    return _audio_fourcc(p + pos, packet_type == PKT_SEQUENCE_START)


def inspect_video(payload) -> tuple:
    """``(codec, frame_type, is_keyframe, is_sequence_header)`` of a video tag's payload."""
    cdef Py_buffer view
    if type(payload) is bytes:
        return _inspect_video(
            <const unsigned char*>PyBytes_AS_STRING(payload), len(<bytes>payload)
        )
    _get_buffer(payload, &view, "payload")
    try:
        return _inspect_video(<const unsigned char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


def inspect_audio(payload) -> tuple:
    """``(codec, is_sequence_header)`` of an audio tag's payload; never raises on content."""
    cdef Py_buffer view
    if type(payload) is bytes:
        return _inspect_audio(
            <const unsigned char*>PyBytes_AS_STRING(payload), len(<bytes>payload)
        )
    _get_buffer(payload, &view, "payload")
    try:
        return _inspect_audio(<const unsigned char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
