"""FLV muxing, demuxing and media-tag inspection (pure-Python twin of ``_flvmux.pyx``).

An FLV stream is a 9-byte header (``"FLV"``, version 1, flags 0x04 audio | 0x01 video, data
offset) and then ``PreviousTagSize0`` (a 4-byte zero) followed by tags, each an 11-byte header
(type; 24-bit data size; 24-bit timestamp + 8-bit extended timestamp = bits 24..31; 24-bit stream
id, always 0) + payload + a 4-byte ``PreviousTagSize`` (11 + payload length).

HTTP-FLV fan-out muxes each media message once with :func:`flv_tag` and shares those bytes with
every viewer.  :class:`FlvReader` is the incremental demuxer (``feed(bytes)`` → completed tags).
:func:`inspect_video` / :func:`inspect_audio` look at a tag's first bytes, legacy FLV or Enhanced
RTMP (Veovera E-RTMP v1/v2: FourCC codecs, ModEx, multitrack), to tell codec, keyframes and
sequence headers apart for the GOP cache.

Both implementations give the same results and raise the same exceptions with the same texts;
the parity tests in ``tests/test_flvmux.py`` hold them to it.
"""

from __future__ import annotations

import struct
from operator import index

from watchbuy.engine.errors import FLVError

TAG_AUDIO = 8
TAG_VIDEO = 9
TAG_SCRIPT = 18

MAX_DATA_SIZE = 0xFFFFFF  # the tag header's data size is a 24-bit field
DEFAULT_MAX_TAG_SIZE = 16 * 1024 * 1024

Tag = tuple[int, int, bytes]

# (type << 24 | data size), (timestamp low 24 bits << 8 | extended byte), 3-byte stream id 0.
_TAG_HEADER = struct.Struct(">II3x")
_U32 = struct.Struct(">I")


def _make_header(has_audio: bool, has_video: bool) -> bytes:
    flags = (0x04 if has_audio else 0) | (0x01 if has_video else 0)
    # Signature, version 1, flags, data offset 9; then PreviousTagSize0 = 0.
    return b"FLV\x01" + bytes((flags,)) + (9).to_bytes(4, "big") + bytes(4)


# Only four possible headers: build them once.
_HEADERS = {(a, v): _make_header(a, v) for a in (False, True) for v in (False, True)}


def _buffer(obj: object, what: str) -> bytes | bytearray | memoryview:
    """``obj`` as something indexable by byte.

    The compiled module asks for a plain C-contiguous buffer (PyBUF_SIMPLE); this mirrors what
    that accepts and raises the same TypeError for what it refuses.
    """
    t = type(obj)
    if t is bytes or t is bytearray:
        return obj  # type: ignore[return-value]
    try:
        mv = memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{what} must be a C-contiguous bytes-like object, not {t.__name__}"
        ) from None
    if not mv.c_contiguous:
        raise TypeError(f"{what} must be a C-contiguous bytes-like object, not {t.__name__}")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


def flv_header(has_audio: bool = True, has_video: bool = True) -> bytes:
    """The 9-byte FLV file header followed by PreviousTagSize0 (13 bytes)."""
    return _HEADERS[bool(has_audio), bool(has_video)]


def flv_tag(tag_type: int, timestamp: int, payload: bytes | bytearray | memoryview) -> bytes:
    """One complete FLV tag: 11-byte header + payload + 4-byte PreviousTagSize.

    ``timestamp`` is taken modulo 2**32 (RTMP timestamps wrap; FLV stores the low 24 bits and the
    high 8 bits in the extended byte).  The tag type is not checked against 8/9/18: filter and
    reserved bits are the caller's business.
    """
    t = index(tag_type)
    if not 0 <= t <= 0xFF:
        raise FLVError(f"tag type {t} out of range 0..255")
    ts = index(timestamp) & 0xFFFFFFFF
    data = _buffer(payload, "payload")
    size = len(data)
    if size > MAX_DATA_SIZE:
        raise FLVError(f"tag payload of {size} bytes exceeds the FLV limit of {MAX_DATA_SIZE}")
    return b"".join(
        (
            _TAG_HEADER.pack((t << 24) | size, ((ts & 0xFFFFFF) << 8) | (ts >> 24)),
            data,
            _U32.pack(size + 11),
        )
    )


# Reader states.  PreviousTagSize fields are never checked (real files get them wrong), so
# they and the header's extra data-offset bytes are all just "bytes to skip".
_ST_HEADER = 0
_ST_SKIP = 1
_ST_TAG_HEADER = 2
_ST_PAYLOAD = 3
_ST_BROKEN = 4


class FlvReader:
    """Incremental FLV demuxer: ``feed(bytes)`` returns the tags those bytes complete.

    Tags come out as ``(tag_type, timestamp, payload)`` as soon as their payload is complete
    (the trailing PreviousTagSize is skipped when it arrives, so a live stream never waits for
    it).  After an :class:`FLVError` the reader stays broken and every later ``feed`` raises
    again; tags completed earlier in the failing call are dropped with it, as the connection is
    about to be.
    """

    __slots__ = (
        "_max",
        "_max_tag_size",
        "_state",
        "_buf",
        "_skip",
        "_type",
        "_ts",
        "_size",
        "_error",
        "_header_parsed",
        "_has_audio",
        "_has_video",
        "_tags_read",
    )

    def __init__(self, max_tag_size: int = DEFAULT_MAX_TAG_SIZE) -> None:
        m = index(max_tag_size)
        if m < 0:
            raise ValueError(f"max_tag_size must be >= 0, not {m}")
        self._max_tag_size = m
        self._max = min(m, MAX_DATA_SIZE)  # the field cannot say more anyway
        self._state = _ST_HEADER
        self._buf = bytearray()  # bytes of the unfinished header or tag, nothing else
        self._skip = 0
        self._type = 0
        self._ts = 0
        self._size = 0
        self._error = ""
        self._header_parsed = False
        self._has_audio = False
        self._has_video = False
        self._tags_read = 0

    @property
    def max_tag_size(self) -> int:
        return self._max_tag_size

    @property
    def header_parsed(self) -> bool:
        return self._header_parsed

    @property
    def has_audio(self) -> bool:
        return self._has_audio

    @property
    def has_video(self) -> bool:
        return self._has_video

    @property
    def tags_read(self) -> int:
        return self._tags_read

    def _fail(self, message: str) -> FLVError:
        self._state = _ST_BROKEN
        self._error = message
        self._buf = bytearray()
        return FLVError(message)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Tag]:
        data = _buffer(data, "data")
        if self._state == _ST_BROKEN:
            raise FLVError(f"FLV reader failed earlier: {self._error}")
        out: list[Tag] = []
        n = len(data)
        pos = 0
        buf = self._buf
        while pos < n or (self._state == _ST_PAYLOAD and self._size == 0):
            state = self._state
            if state == _ST_PAYLOAD:
                need = self._size - len(buf)
                if n - pos < need:
                    buf += data[pos:]
                    break
                if buf:
                    buf += data[pos : pos + need]
                    payload = bytes(buf)
                    buf.clear()
                else:
                    payload = bytes(data[pos : pos + need])
                pos += need
                out.append((self._type, self._ts, payload))
                self._tags_read += 1
                self._skip = 4  # this tag's PreviousTagSize
                self._state = _ST_SKIP
            elif state == _ST_SKIP:
                take = min(self._skip, n - pos)
                pos += take
                self._skip -= take
                if self._skip == 0:
                    self._state = _ST_TAG_HEADER
            elif state == _ST_TAG_HEADER:
                if buf or n - pos < 11:
                    take = min(11 - len(buf), n - pos)
                    buf += data[pos : pos + take]
                    pos += take
                    if len(buf) < 11:
                        break
                    head = bytes(buf)
                    buf.clear()
                else:
                    head = bytes(data[pos : pos + 11])
                    pos += 11
                size = (head[1] << 16) | (head[2] << 8) | head[3]
                if size > self._max:
                    raise self._fail(
                        f"tag data size {size} exceeds max_tag_size {self._max_tag_size}"
                    )
                self._type = head[0]
                self._ts = (head[4] << 16) | (head[5] << 8) | head[6] | (head[7] << 24)
                self._size = size
                self._state = _ST_PAYLOAD
            else:  # _ST_HEADER
                take = min(9 - len(buf), n - pos)
                buf += data[pos : pos + take]
                pos += take
                if len(buf) < 9:
                    break
                head = bytes(buf)
                buf.clear()
                self._parse_header(head)
        return out

    def _parse_header(self, head: bytes) -> None:
        if head[:3] != b"FLV":
            raise self._fail(f"bad FLV signature {head[:3]!r}")
        if head[3] != 1:
            raise self._fail(f"unsupported FLV version {head[3]}")
        offset = int.from_bytes(head[5:9], "big")
        if offset < 9:
            raise self._fail(f"bad FLV data offset {offset}")
        self._has_audio = bool(head[4] & 0x04)
        self._has_video = bool(head[4] & 0x01)
        self._header_parsed = True
        # Extra header bytes (offset > 9) are skipped, then PreviousTagSize0.
        self._skip = offset - 9 + 4
        self._state = _ST_SKIP


# ---------------------------------------------------------------------------------------------
# Tag inspection

_LEGACY_VIDEO = {
    2: "h263",
    3: "screen",
    4: "vp6",
    5: "vp6a",
    6: "screen2",
    7: "avc",
    12: "hevc",  # not in Adobe's spec; the id Chinese CDNs and SRS/nginx forks use
    13: "av1",  # likewise non-standard
}
_LEGACY_AUDIO = {
    0: "pcm",
    1: "adpcm",
    2: "mp3",
    3: "pcm_le",
    4: "nellymoser16",
    5: "nellymoser8",
    6: "nellymoser",
    7: "g711a",
    8: "g711u",
    10: "aac",
    11: "speex",
    14: "mp3_8k",
}
_VIDEO_FOURCC = {b"avc1": "avc", b"hvc1": "hevc", b"av01": "av1", b"vp09": "vp9"}
_AUDIO_FOURCC = {
    b"mp4a": "aac",
    b"Opus": "opus",
    b"fLaC": "flac",
    b"ac-3": "ac3",
    b"ec-3": "eac3",
    b".mp3": "mp3",
}

# Enhanced RTMP packet types (video and audio share SequenceStart, CodedFrames and ModEx).
_PKT_SEQUENCE_START = 0
_PKT_CODED_FRAMES = 1
_PKT_CODED_FRAMES_X = 3  # video only
_PKT_METADATA = 4  # video; for audio 4 is MultichannelConfig
_PKT_MPEG2TS_SEQUENCE_START = 5  # video
_PKT_VIDEO_MULTITRACK = 6
_PKT_AUDIO_MULTITRACK = 5
_PKT_MODEX = 7
_FRAME_KEY = 1
_FRAME_COMMAND = 5


def _fourcc_name(code: bytes | bytearray | memoryview, known: dict[bytes, str]) -> str:
    code = bytes(code)
    name = known.get(code)
    if name is not None:
        return name
    if all(0x20 <= c < 0x7F for c in code):
        return code.decode("ascii")
    return "unknown"


def _skip_modex(data: bytes | bytearray | memoryview, packet_type: int) -> tuple[int, int]:
    """Walk the E-RTMP v2 ModEx chain that may sit between the first byte and the FourCC.

    Returns (position after the chain, the real packet type), or (-1, 0) when truncated.  Each
    ModEx is: UI8 size-1 (0xFF: a UI16 size-1 follows), the data, then one byte of
    modExType << 4 | next packet type.
    """
    n = len(data)
    pos = 1
    while packet_type == _PKT_MODEX:
        if pos >= n:
            return -1, 0
        size = data[pos] + 1
        pos += 1
        if size == 256:
            if pos + 2 > n:
                return -1, 0
            size = ((data[pos] << 8) | data[pos + 1]) + 1
            pos += 2
        pos += size
        if pos >= n:
            return -1, 0
        packet_type = data[pos] & 0x0F
        pos += 1
    return pos, packet_type


def inspect_video(payload: bytes | bytearray | memoryview) -> tuple[str, int, bool, bool]:
    """``(codec, frame_type, is_keyframe, is_sequence_header)`` of a video tag's payload.

    A keyframe is a tag that carries a coded key picture: frame type 1 and, where the format has
    packet types, coded frames (not a sequence header, end of sequence, metadata or command).
    Never raises on content: short or odd payloads give "unknown" (empty gives "").
    """
    data = _buffer(payload, "payload")
    n = len(data)
    if n == 0:
        return ("", 0, False, False)
    b0 = data[0]
    if not b0 & 0x80:
        frame_type = b0 >> 4
        codec = _LEGACY_VIDEO.get(b0 & 0x0F, "unknown")
        if b0 & 0x0F in (7, 12, 13):  # AVC-style: AVCPacketType 0 header, 1 NALUs, 2 EOS
            if n < 2:
                return (codec, frame_type, False, False)
            packet_type = data[1]
            return (
                codec,
                frame_type,
                frame_type == _FRAME_KEY and packet_type == 1,
                packet_type == 0,
            )
        return (codec, frame_type, frame_type == _FRAME_KEY, False)

    frame_type = (b0 >> 4) & 0x07
    pos, packet_type = _skip_modex(data, b0 & 0x0F)
    if pos < 0:
        return ("unknown", frame_type, False, False)
    if frame_type == _FRAME_COMMAND and packet_type != _PKT_METADATA:
        # A command frame carries a UI8 command instead of a FourCC: no codec to name.
        return ("unknown", frame_type, False, False)
    if packet_type == _PKT_VIDEO_MULTITRACK:
        # UB[4] multitrack type | UB[4] packet type of every track, then the FourCC (shared, or
        # the first track's for ManyTracksManyCodecs; it comes first in either layout).
        if pos + 5 > n:
            return ("unknown", frame_type, False, False)
        inner = data[pos] & 0x0F
        codec = _fourcc_name(data[pos + 1 : pos + 5], _VIDEO_FOURCC)
        key = frame_type == _FRAME_KEY and inner in (_PKT_CODED_FRAMES, _PKT_CODED_FRAMES_X)
        return (codec, frame_type, key, False)
    if pos + 4 > n:
        return ("unknown", frame_type, False, False)
    codec = _fourcc_name(data[pos : pos + 4], _VIDEO_FOURCC)
    key = frame_type == _FRAME_KEY and packet_type in (_PKT_CODED_FRAMES, _PKT_CODED_FRAMES_X)
    seq = packet_type in (_PKT_SEQUENCE_START, _PKT_MPEG2TS_SEQUENCE_START)
    return (codec, frame_type, key, seq)


def inspect_audio(payload: bytes | bytearray | memoryview) -> tuple[str, bool]:
    """``(codec, is_sequence_header)`` of an audio tag's payload; never raises on content."""
    data = _buffer(payload, "payload")
    n = len(data)
    if n == 0:
        return ("", False)
    b0 = data[0]
    fmt = b0 >> 4
    if fmt != 9:
        codec = _LEGACY_AUDIO.get(fmt, "unknown")
        return (codec, fmt == 10 and n >= 2 and data[1] == 0)
    pos, packet_type = _skip_modex(data, b0 & 0x0F)
    if pos < 0:
        return ("unknown", False)
    if packet_type == _PKT_AUDIO_MULTITRACK:
        if pos + 5 > n:
            return ("unknown", False)
        return (_fourcc_name(data[pos + 1 : pos + 5], _AUDIO_FOURCC), False)
    if pos + 4 > n:
        return ("unknown", False)
    return (_fourcc_name(data[pos : pos + 4], _AUDIO_FOURCC), packet_type == _PKT_SEQUENCE_START)
