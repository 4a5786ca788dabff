"""FLV codec: the compiled module and its pure-Python twin, held to one behaviour.

Every example-based test runs against both implementations (the ``flv`` fixture); the hypothesis
tests feed both the same random and adversarial inputs and demand identical results, exception
texts included.  One test demuxes and re-muxes a real FLV written by Debian's ffmpeg.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Callable
from types import ModuleType

import pytest
from conftest import codec_implementations, needs_compiled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watchbuy.engine.errors import FLVError, ProtocolError

CODECS = codec_implementations("flvmux")
PY = CODECS["python"]
CY = CODECS.get("cython")  # None without the compiled codec: its tests are skipped
compiled = needs_compiled("flvmux")


@pytest.fixture(params=list(CODECS.values()), ids=list(CODECS))
def flv(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


@compiled
def test_compiled_module_is_really_compiled() -> None:
    # Guards against the .so silently missing and the import resolving to something else.
    assert CY.__file__.endswith(".so")
    assert PY.__file__.endswith(".py")


def tag_bytes(tag_type: int, ts: int, payload: bytes, prev: int | None = None) -> bytes:
    """An FLV tag built independently of the code under test."""
    size = len(payload)
    head = struct.pack(">B", tag_type) + size.to_bytes(3, "big")
    head += (ts & 0xFFFFFF).to_bytes(3, "big") + bytes(((ts >> 24) & 0xFF,)) + b"\0\0\0"
    return head + payload + struct.pack(">I", size + 11 if prev is None else prev)


HEADER_AV = b"FLV\x01\x05\x00\x00\x00\x09\x00\x00\x00\x00"


# --------------------------------------------------------------------------------------------
# Muxing


def test_constants(flv: ModuleType) -> None:
    assert (flv.TAG_AUDIO, flv.TAG_VIDEO, flv.TAG_SCRIPT) == (8, 9, 18)


@pytest.mark.parametrize(
    ("audio", "video", "flags"),
    [(True, True, 5), (True, False, 4), (False, True, 1), (False, False, 0)],
)
def test_flv_header(flv: ModuleType, audio: bool, video: bool, flags: int) -> None:
    head = flv.flv_header(audio, video)
    assert head == b"FLV\x01" + bytes((flags,)) + b"\x00\x00\x00\x09" + b"\x00\x00\x00\x00"
    assert len(head) == 13
    assert flv.flv_header() == HEADER_AV
    assert flv.flv_header(has_audio=False, has_video=True)[4] == 1


def test_flv_tag_layout(flv: ModuleType) -> None:
    payload = b"\x17\x01" + bytes(range(200))
    out = flv.flv_tag(9, 0x12345678, payload)
    assert out == tag_bytes(9, 0x12345678, payload)
    assert out[0] == 9
    assert out[1:4] == len(payload).to_bytes(3, "big")
    assert out[4:7] == b"\x34\x56\x78" and out[7] == 0x12  # low 24 bits, then the high byte
    assert out[8:11] == b"\0\0\0"
    assert out[11:-4] == payload
    assert int.from_bytes(out[-4:], "big") == 11 + len(payload)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_flv_tag_accepts_bytes_like(flv: ModuleType, kind: type) -> None:
    assert flv.flv_tag(8, 7, kind(b"\xaf\x01xyz")) == tag_bytes(8, 7, b"\xaf\x01xyz")


def test_flv_tag_empty_payload_and_type_edges(flv: ModuleType) -> None:
    assert flv.flv_tag(0, 0, b"") == bytes(11) + b"\x00\x00\x00\x0b"
    assert flv.flv_tag(255, 0, b"")[0] == 255
    assert flv.flv_tag(True, 0, b"")[0] == 1  # bool is an int, as everywhere in Python


@pytest.mark.parametrize(
    ("ts", "expected"),
    [(0, 0), (2**32 - 1, 2**32 - 1), (2**32, 0), (2**32 + 5, 5), (-1, 2**32 - 1), (2**70 + 3, 3)],
)
def test_flv_tag_timestamp_is_modulo_2_32(flv: ModuleType, ts: int, expected: int) -> None:
    assert flv.flv_tag(9, ts, b"x") == tag_bytes(9, expected, b"x")


@pytest.mark.parametrize("tag_type", [-1, 256, 2**64, -(2**64)])
def test_flv_tag_rejects_bad_type(flv: ModuleType, tag_type: int) -> None:
    with pytest.raises(FLVError, match="out of range"):
        flv.flv_tag(tag_type, 0, b"")


def test_flv_tag_size_limit(flv: ModuleType) -> None:
    big = bytes(0xFFFFFF)
    out = flv.flv_tag(9, 0, big)
    assert out[1:4] == b"\xff\xff\xff" and len(out) == 0xFFFFFF + 15
    with pytest.raises(FLVError, match="exceeds"):
        flv.flv_tag(9, 0, big + b"\0")


def test_flv_tag_type_errors(flv: ModuleType) -> None:
    with pytest.raises(TypeError):
        flv.flv_tag(9.0, 0, b"")
    with pytest.raises(TypeError):
        flv.flv_tag(9, 1.5, b"")
    with pytest.raises(TypeError):
        flv.flv_tag(9, 0, "text")
    with pytest.raises(TypeError):
        flv.flv_tag(9, 0, memoryview(b"abcdef")[::2])  # not contiguous


def test_flv_error_is_a_protocol_error() -> None:
    assert issubclass(FLVError, ProtocolError)


# --------------------------------------------------------------------------------------------
# Demuxing


def sample_stream() -> tuple[bytes, list[tuple[int, int, bytes]]]:
    tags = [
        (18, 0, b"\x02\x00\x0aonMetaData\x08\x00\x00\x00\x00\x00\x00\x09"),
        (9, 0, b"\x17\x00\x00\x00\x00\x01\x64\x00\x1f"),
        (8, 0, b"\xaf\x00\x12\x10"),
        (9, 40, b"\x17\x01\x00\x00\x00" + bytes(3000)),
        (8, 23, b"\xaf\x01" + bytes(150)),
        (8, 46, b""),
        (9, 0x01FFFFFF, b"\x27\x01" + b"\x55" * 70),  # uses the extended timestamp byte
    ]
    return HEADER_AV + b"".join(tag_bytes(*t) for t in tags), tags


def test_reader_whole_stream(flv: ModuleType) -> None:
    data, tags = sample_stream()
    r = flv.FlvReader()
    assert (r.header_parsed, r.has_audio, r.has_video, r.tags_read) == (False, False, False, 0)
    assert r.feed(data) == tags
    assert (r.header_parsed, r.has_audio, r.has_video, r.tags_read) == (True, True, True, len(tags))
    assert r.feed(b"") == []


def test_reader_every_split_point(flv: ModuleType) -> None:
    data, tags = sample_stream()
    for cut in range(len(data) + 1):
        r = flv.FlvReader()
        assert r.feed(data[:cut]) + r.feed(data[cut:]) == tags, cut


def test_reader_byte_by_byte(flv: ModuleType) -> None:
    data, tags = sample_stream()
    r = flv.FlvReader()
    got = []
    for i in range(len(data)):
        got += r.feed(memoryview(data)[i : i + 1])
        # Before the 9th byte nothing about the header is known.
        assert r.header_parsed == (i >= 8)
    assert got == tags


def test_reader_emits_tag_before_its_previous_tag_size(flv: ModuleType) -> None:
    # A live stream must not hold a frame back waiting for the next 4 bytes.
    r = flv.FlvReader()
    one = tag_bytes(9, 5, b"\x27\x01abc")
    assert r.feed(HEADER_AV + one[:-4]) == [(9, 5, b"\x27\x01abc")]
    assert r.feed(one[-4:]) == []


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_reader_accepts_bytes_like(flv: ModuleType, kind: type) -> None:
    data, tags = sample_stream()
    assert flv.FlvReader().feed(kind(data)) == tags


def test_reader_flags(flv: ModuleType) -> None:
    for flags, audio, video in [
        (0, False, False),
        (1, False, True),
        (4, True, False),
        (0xFD, True, True),
    ]:
        r = flv.FlvReader()
        r.feed(b"FLV\x01" + bytes((flags,)) + b"\x00\x00\x00\x09")
        assert (r.header_parsed, r.has_audio, r.has_video) == (True, audio, video)


def test_reader_skips_extra_header_bytes(flv: ModuleType) -> None:
    data = b"FLV\x01\x05\x00\x00\x00\x0f" + b"EXTRA!" + b"\0\0\0\0" + tag_bytes(9, 1, b"\x27\x01")
    for cut in range(len(data)):
        r = flv.FlvReader()
        assert r.feed(data[:cut]) + r.feed(data[cut:]) == [(9, 1, b"\x27\x01")]


def test_reader_huge_data_offset_is_skipped_without_buffering(flv: ModuleType) -> None:
    r = flv.FlvReader()
    r.feed(b"FLV\x01\x05\xff\xff\xff\xff")
    for _ in range(16):
        assert r.feed(bytes(65536)) == []
    assert r.header_parsed


def test_reader_tolerates_previous_tag_size_mismatch(flv: ModuleType) -> None:
    data = b"FLV\x01\x05\x00\x00\x00\x09" + b"\x12\x34\x56\x78"  # PreviousTagSize0 not 0
    data += tag_bytes(9, 1, b"\x17\x01a", prev=0) + tag_bytes(8, 2, b"\xaf\x01b", prev=999)
    assert flv.FlvReader().feed(data) == [(9, 1, b"\x17\x01a"), (8, 2, b"\xaf\x01b")]


def test_reader_ignores_stream_id(flv: ModuleType) -> None:
    bad = bytearray(tag_bytes(9, 1, b"\x17\x01"))
    bad[8:11] = b"\x01\x02\x03"
    assert flv.FlvReader().feed(HEADER_AV + bytes(bad)) == [(9, 1, b"\x17\x01")]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "bad FLV signature b'GET'"),
        (b"flv\x01\x05\x00\x00\x00\x09", "bad FLV signature b'flv'"),
        (b"FLV\x02\x05\x00\x00\x00\x09", "unsupported FLV version 2"),
        (b"FLV\x00\x05\x00\x00\x00\x09", "unsupported FLV version 0"),
        (b"FLV\x01\x05\x00\x00\x00\x08", "bad FLV data offset 8"),
        (b"FLV\x01\x05\x00\x00\x00\x00", "bad FLV data offset 0"),
    ],
)
def test_reader_bad_header(flv: ModuleType, header: bytes, message: str) -> None:
    r = flv.FlvReader()
    with pytest.raises(FLVError) as info:
        r.feed(header)
    assert str(info.value) == message
    assert not r.header_parsed


def test_reader_stays_broken(flv: ModuleType) -> None:
    r = flv.FlvReader()
    with pytest.raises(FLVError):
        r.feed(b"FLX\x01\x05\x00\x00\x00\x09")
    for _ in range(2):
        with pytest.raises(FLVError, match="failed earlier: bad FLV signature"):
            r.feed(HEADER_AV)
        with pytest.raises(FLVError):
            r.feed(b"")


def test_reader_max_tag_size(flv: ModuleType) -> None:
    r = flv.FlvReader(max_tag_size=100)
    assert r.max_tag_size == 100
    assert r.feed(HEADER_AV + tag_bytes(9, 0, bytes(100))) == [(9, 0, bytes(100))]
    with pytest.raises(FLVError) as info:
        r.feed(tag_bytes(9, 0, bytes(101))[:11])  # rejected at the header: nothing buffered
    assert str(info.value) == "tag data size 101 exceeds max_tag_size 100"
    assert r.tags_read == 1
    with pytest.raises(FLVError):
        r.feed(b"")
    zero = flv.FlvReader(0)
    assert zero.feed(HEADER_AV + tag_bytes(8, 3, b"")) == [(8, 3, b"")]


def test_reader_max_tag_size_validation(flv: ModuleType) -> None:
    with pytest.raises(ValueError):
        flv.FlvReader(-1)
    with pytest.raises(TypeError):
        flv.FlvReader(1.5)
    assert flv.FlvReader(2**80).max_tag_size == 2**80
    assert flv.FlvReader().max_tag_size == 16 * 1024 * 1024


def test_reader_attributes_are_read_only(flv: ModuleType) -> None:
    r = flv.FlvReader()
    for name in ("header_parsed", "has_audio", "has_video", "tags_read", "max_tag_size"):
        with pytest.raises(AttributeError):
            setattr(r, name, 1)


def test_reader_rejects_non_buffers(flv: ModuleType) -> None:
    r = flv.FlvReader()
    with pytest.raises(TypeError, match="bytes-like"):
        r.feed("FLV")
    with pytest.raises(TypeError, match="bytes-like"):
        r.feed(None)
    data, tags = sample_stream()
    assert r.feed(data) == tags  # a TypeError does not break the reader


def test_reader_large_payload_in_pieces(flv: ModuleType) -> None:
    payload = bytes(range(256)) * 1000
    data = HEADER_AV + tag_bytes(9, 9, payload)
    r = flv.FlvReader()
    got = []
    for i in range(0, len(data), 4093):
        got += r.feed(data[i : i + 4093])
    assert got == [(9, 9, payload)]


def test_reader_roundtrip_with_muxer(flv: ModuleType) -> None:
    tags = [
        (9, i * 33, bytes([0x17 if i % 30 == 0 else 0x27, 1]) + bytes(i * 7)) for i in range(90)
    ]
    data = flv.flv_header() + b"".join(flv.flv_tag(*t) for t in tags)
    assert flv.FlvReader().feed(data) == tags


# --------------------------------------------------------------------------------------------
# Inspection


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", ("", 0, False, False)),
        (b"\x17\x00\x00\x00\x00\x01", ("avc", 1, False, True)),
        (b"\x17\x01\x00\x00\x00", ("avc", 1, True, False)),
        (b"\x27\x01\x00\x00\x00", ("avc", 2, False, False)),
        (b"\x17\x02\x00\x00\x00", ("avc", 1, False, False)),  # end of sequence: no picture
        (b"\x17", ("avc", 1, False, False)),
        (b"\x1c\x00", ("hevc", 1, False, True)),
        (b"\x1c\x01", ("hevc", 1, True, False)),
        (b"\x1d\x00", ("av1", 1, False, True)),
        (b"\x12\x00", ("h263", 1, True, False)),
        (b"\x23", ("screen", 2, False, False)),
        (b"\x14\x00", ("vp6", 1, True, False)),
        (b"\x35\x00", ("vp6a", 3, False, False)),
        (b"\x16", ("screen2", 1, True, False)),
        (b"\x11", ("unknown", 1, True, False)),
        (b"\x1f\x00", ("unknown", 1, True, False)),
        (b"\x57\x00", ("avc", 5, False, True)),
    ],
)
def test_inspect_video_legacy(flv: ModuleType, payload: bytes, expected: tuple) -> None:
    assert flv.inspect_video(payload) == expected


def ex_video(frame_type: int, packet_type: int, fourcc: bytes, body: bytes = b"") -> bytes:
    return bytes((0x80 | frame_type << 4 | packet_type,)) + fourcc + body


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (ex_video(1, 0, b"avc1", b"\x01\x64"), ("avc", 1, False, True)),
        (ex_video(1, 1, b"av01", b"\x00\x00\x00x"), ("av1", 1, True, False)),
        (ex_video(1, 3, b"vp09", b"frame"), ("vp9", 1, True, False)),
        (ex_video(2, 1, b"vp09", b"frame"), ("vp9", 2, False, False)),
        (ex_video(1, 2, b"hvc1"), ("hevc", 1, False, False)),  # SequenceEnd
        (ex_video(1, 4, b"hvc1", b"\x02\x00"), ("hevc", 1, False, False)),  # Metadata
        (ex_video(1, 5, b"av01", b"desc"), ("av1", 1, False, True)),  # MPEG2TSSequenceStart
        (ex_video(1, 1, b"vvc1"), ("vvc1", 1, True, False)),  # unknown FourCC: its text
        (ex_video(1, 1, b"vp08"), ("vp08", 1, True, False)),
        (ex_video(1, 1, b"\x00\xffab"), ("unknown", 1, True, False)),  # not printable
        (ex_video(1, 1, b" ~~ "), (" ~~ ", 1, True, False)),  # printable: 0x20..0x7e
        (ex_video(1, 1, b"ab\x7fc"), ("unknown", 1, True, False)),
        (ex_video(1, 1, b"\x1fabc"), ("unknown", 1, True, False)),
        (ex_video(1, 1, b"hvc"), ("unknown", 1, False, False)),  # header shorter than 5
        (b"\x90", ("unknown", 1, False, False)),
        (b"\xff", ("unknown", 7, False, False)),
        # Command frame: a UI8 command follows, not a FourCC.
        (b"\xd1\x00", ("unknown", 5, False, False)),
        (ex_video(5, 1, b"hvc1"), ("unknown", 5, False, False)),
        (ex_video(5, 4, b"hvc1", b"\x02"), ("hevc", 5, False, False)),  # metadata: FourCC
    ],
)
def test_inspect_video_enhanced(flv: ModuleType, payload: bytes, expected: tuple) -> None:
    assert flv.inspect_video(payload) == expected


def test_inspect_video_enhanced_hevc_by_hand(flv: ModuleType) -> None:
    # What OBS sends for HEVC over E-RTMP: SequenceStart with an HEVCDecoderConfigurationRecord,
    # then CodedFramesX (no composition time) key and inter frames.
    hvcc = bytes([0x01, 0x01, 0x60, 0, 0, 0, 0x90, 0, 0, 0, 0, 0, 0x5D, 0xF0, 0, 0xFC, 0xFD])
    hvcc += bytes([0xF8, 0xF8, 0, 0, 0x0F, 0x03])  # ... then 3 NAL unit arrays (VPS/SPS/PPS)
    for nal_type, nal in ((32, b"\x40\x01\x0c"), (33, b"\x42\x01\x01"), (34, b"\x44\x01\xc1")):
        hvcc += bytes([0x80 | nal_type, 0, 1]) + len(nal).to_bytes(2, "big") + nal
    seq = bytes([0x80 | 1 << 4 | 0]) + b"hvc1" + hvcc
    idr = bytes([0x80 | 1 << 4 | 3]) + b"hvc1" + (5).to_bytes(4, "big") + b"\x26\x01\xaf\x00\x11"
    inter = (
        bytes([0x80 | 2 << 4 | 1])
        + b"hvc1"
        + b"\x00\x00\x28"
        + (3).to_bytes(4, "big")
        + b"\x02\x01\xd0"
    )
    assert flv.inspect_video(seq) == ("hevc", 1, False, True)
    assert flv.inspect_video(idr) == ("hevc", 1, True, False)
    assert flv.inspect_video(inter) == ("hevc", 2, False, False)
    # And through the muxer and the demuxer unchanged.
    stream = flv.flv_header(False, True) + b"".join(
        flv.flv_tag(flv.TAG_VIDEO, ts, p) for ts, p in ((0, seq), (0, idr), (33, inter))
    )
    r = flv.FlvReader()
    tags = r.feed(stream)
    assert [p for _, _, p in tags] == [seq, idr, inter]
    assert (r.has_audio, r.has_video) == (False, True)


def test_inspect_video_multitrack(flv: ModuleType) -> None:
    # Multitrack OneTrack / ManyTracks: byte 1 = multitrack type << 4 | tracks' packet type,
    # then the shared FourCC; ManyTracksManyCodecs puts the first track's FourCC there.
    one = bytes([0x80 | 1 << 4 | 6, 0 << 4 | 1]) + b"hvc1" + b"\x00" + b"frame"
    many = bytes([0x80 | 1 << 4 | 6, 1 << 4 | 3]) + b"av01" + b"\x00\x00\x00\x02ab"
    codecs = bytes([0x80 | 1 << 4 | 6, 2 << 4 | 1]) + b"avc1" + b"\x00\x00\x00\x01a"
    start = bytes([0x80 | 1 << 4 | 6, 0 << 4 | 0]) + b"hvc1" + b"\x00rec"
    assert flv.inspect_video(one) == ("hevc", 1, True, False)
    assert flv.inspect_video(many) == ("av1", 1, True, False)
    assert flv.inspect_video(codecs) == ("avc", 1, True, False)
    assert flv.inspect_video(start) == ("hevc", 1, False, False)
    assert flv.inspect_video(one[:5]) == ("unknown", 1, False, False)


def test_inspect_video_modex(flv: ModuleType) -> None:
    # ModEx TimestampOffsetNano (3 bytes), then the real packet type, then the FourCC.
    nano = bytes([0x80 | 1 << 4 | 7, 3 - 1]) + b"\x00\x01\x02" + bytes([0 << 4 | 1]) + b"hvc1"
    assert flv.inspect_video(nano + b"\x00\x00\x00") == ("hevc", 1, True, False)
    # A 300-byte ModEx uses the UI16 escape.
    long = bytes([0x80 | 1 << 4 | 7, 0xFF]) + (300 - 1).to_bytes(2, "big") + bytes(300)
    long += bytes([0 << 4 | 0]) + b"av01"
    assert flv.inspect_video(long) == ("av1", 1, False, True)
    for cut in range(1, len(nano) - 4 + 3):
        assert flv.inspect_video(nano[:cut])[0] == "unknown"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", ("", False)),
        (b"\xaf\x00\x12\x10", ("aac", True)),
        (b"\xaf\x01\x21", ("aac", False)),
        (b"\xaf", ("aac", False)),
        (b"\x2f\x00", ("mp3", False)),
        (b"\x0e", ("pcm", False)),
        (b"\x1e", ("adpcm", False)),
        (b"\x3e", ("pcm_le", False)),
        (b"\x4e", ("nellymoser16", False)),
        (b"\x5e", ("nellymoser8", False)),
        (b"\x6e", ("nellymoser", False)),
        (b"\x72", ("g711a", False)),
        (b"\x82", ("g711u", False)),
        (b"\xb6", ("speex", False)),
        (b"\xe2", ("mp3_8k", False)),
        (b"\xc0", ("unknown", False)),
        (b"\xd0", ("unknown", False)),
        (b"\xf0", ("unknown", False)),
        (b"\x90Opus\x01", ("opus", True)),
        (b"\x91Opus\x01", ("opus", False)),
        (b"\x90fLaC", ("flac", True)),
        (b"\x90ac-3", ("ac3", True)),
        (b"\x91ec-3", ("eac3", False)),
        (b"\x90.mp3", ("mp3", True)),
        (b"\x90mp4a\x12\x10", ("aac", True)),
        (b"\x90alac", ("alac", True)),
        (b"\x90\x01\x02\x03\x04", ("unknown", True)),
        (b"\x90Opu", ("unknown", False)),
        (b"\x90", ("unknown", False)),
        (b"\x95\x01Opus\x00", ("opus", False)),  # multitrack OneTrack, CodedFrames
        (b"\x95\x00Opus", ("opus", False)),  # multitrack sequence start: not "the" header
        (b"\x95\x00Opu", ("unknown", False)),
        (b"\x97\x02\x00\x01\x02\x00fLaC", ("flac", True)),  # ModEx then SequenceStart
    ],
)
def test_inspect_audio(flv: ModuleType, payload: bytes, expected: tuple) -> None:
    assert flv.inspect_audio(payload) == expected


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_inspect_accepts_bytes_like(flv: ModuleType, kind: type) -> None:
    assert flv.inspect_video(kind(b"\x17\x00")) == ("avc", 1, False, True)
    assert flv.inspect_audio(kind(b"\xaf\x00")) == ("aac", True)


def test_inspect_rejects_non_buffers(flv: ModuleType) -> None:
    with pytest.raises(TypeError, match="bytes-like"):
        flv.inspect_video("\x17\x00")
    with pytest.raises(TypeError, match="bytes-like"):
        flv.inspect_audio(None)


# --------------------------------------------------------------------------------------------
# Differential: both implementations, same inputs, same answers


def outcome(fn: Callable[..., object], *args: object) -> tuple:
    """What a call did: ("ok", result) or ("raise", exception class, message)."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # the exception *is* the result being compared
        return ("raise", type(exc), str(exc))


def run_reader(module: ModuleType, pieces: list[bytes], max_tag_size: int) -> list:
    r = module.FlvReader(max_tag_size)
    results = [outcome(r.feed, piece) for piece in pieces]
    results.append((r.header_parsed, r.has_audio, r.has_video, r.tags_read))
    return results


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


tag_types = st.sampled_from([8, 9, 18]) | st.integers(0, 255)
timestamps = st.integers(0, 2**32 - 1)


@st.composite
def flv_streams(draw: st.DrawFn) -> bytes:
    """Mostly valid FLV streams, then optionally damaged: bytes flipped, cut or inserted."""
    header_kind = draw(st.integers(0, 2))
    if header_kind == 0:
        extra = draw(st.binary(max_size=8))
        flags = draw(st.integers(0, 255))
        head = b"FLV\x01" + bytes((flags,)) + (9 + len(extra)).to_bytes(4, "big") + extra
    elif header_kind == 1:  # data offsets around the minimum, consistent or not
        offset = draw(st.sampled_from([8, 9, 10, 2**32 - 1]) | st.integers(0, 13))
        head = b"FLV\x01\x05" + offset.to_bytes(4, "big") + bytes(max(0, min(offset, 13) - 9))
    else:
        head = draw(st.sampled_from([b"FLV\x01", b"FLV\x02", b"FLW\x01", b"FL"])) + draw(
            st.binary(max_size=6)
        )
    body = draw(st.binary(min_size=0, max_size=4))  # PreviousTagSize0, maybe malformed
    tags = draw(st.lists(st.tuples(tag_types, timestamps, st.binary(max_size=300)), max_size=8))
    for t, ts, payload in tags:
        body += tag_bytes(t, ts, payload, prev=draw(st.none() | st.integers(0, 2**32 - 1)))
    data = bytearray(head + body)
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i:]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=5))
    return bytes(data)


DIFF = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@compiled
@DIFF
@given(data=st.data(), raw=st.binary(max_size=600), limit=st.sampled_from([0, 16, 300, 2**24]))
def test_diff_reader_random_bytes(data: st.DataObject, raw: bytes, limit: int) -> None:
    if data.draw(st.booleans()):
        raw = b"FLV\x01\x05\x00\x00\x00\x09" + raw  # get past the header into the tag parser
    pieces = data.draw(split(raw))
    assert run_reader(PY, pieces, limit) == run_reader(CY, pieces, limit)


@compiled
@DIFF
@given(data=st.data(), stream=flv_streams(), limit=st.sampled_from([0, 100, 2**24, 2**40]))
def test_diff_reader_adversarial_streams(data: st.DataObject, stream: bytes, limit: int) -> None:
    pieces = data.draw(split(stream))
    kinds = data.draw(
        st.lists(
            st.sampled_from([bytes, bytearray, memoryview]),
            min_size=len(pieces),
            max_size=len(pieces),
        )
    )
    pieces = [k(p) for k, p in zip(kinds, pieces, strict=True)]
    assert run_reader(PY, pieces, limit) == run_reader(CY, pieces, limit)


@compiled
@DIFF
@given(stream=flv_streams())
def test_diff_reader_split_does_not_matter(stream: bytes) -> None:
    # Whole-stream result equals byte-by-byte result for the compiled reader (the twin is
    # held to the compiled one by the tests above).
    whole = run_reader(CY, [stream], 2**24)
    r = CY.FlvReader(2**24)
    tags: list = []
    error = None
    for i in range(len(stream)):
        try:
            tags += r.feed(stream[i : i + 1])
        except FLVError as exc:
            error = str(exc)
            break
    if whole[0][0] == "ok":
        assert error is None and tags == whole[0][1]
    else:
        assert error == whole[0][2]


fourccs = st.sampled_from(
    [
        b"avc1",
        b"hvc1",
        b"av01",
        b"vp09",
        b"vp08",
        b"mp4a",
        b"Opus",
        b"fLaC",
        b"ac-3",
        b"ec-3",
        b".mp3",
    ]
    + [b" ~~ ", b"ab\x7fc", b"\x1fabc", b"\x80bcd"]  # edges of "printable"
) | st.binary(min_size=4, max_size=4)


@st.composite
def media_payloads(draw: st.DrawFn) -> bytes:
    """Random bytes, and bytes shaped like legacy and enhanced headers (ModEx, multitrack)."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=24))
    # The first byte: anything, or an enhanced video / audio header with a chosen packet type
    # (ModEx 7 for a chain, Multitrack 6 video / 5 audio), so every branch is reached.
    first = draw(
        st.integers(0, 255)
        | st.builds(lambda ft, pt: 0x80 | ft << 4 | pt, st.integers(0, 7), st.integers(0, 15))
        | st.builds(lambda pt: 0x90 | pt, st.integers(0, 15))
    )
    if kind == 2:
        first = (first & 0xF0) | 7
    elif kind == 3:
        first = (first & 0xF0) | draw(st.sampled_from([5, 6]))
    if draw(st.booleans()):
        first = (first & 0x8F) | 0x10  # frame type 1: keyframe rules apply
    out = bytes((first,))
    if kind == 2:  # a ModEx chain
        size = draw(st.integers(1, 300) | st.sampled_from([1, 255, 256, 257]))
        if size <= 255:
            out += bytes((size - 1,))
        else:
            out += b"\xff" + (size - 1).to_bytes(2, "big")
        out += bytes(size) + bytes((draw(st.integers(0, 255)),))
    if kind == 3:  # multitrack: multitrack type << 4 | the tracks' packet type
        out += bytes((draw(st.integers(0, 3)) << 4 | draw(st.integers(0, 7) | st.integers(0, 15)),))
    return out + draw(fourccs) + draw(st.binary(max_size=8))


@compiled
@settings(max_examples=400, deadline=None)
@given(whole=media_payloads())
def test_diff_inspect(whole: bytes) -> None:
    # Every prefix too: truncation at each length boundary is where parsers differ.
    for end in range(len(whole) + 1):
        payload = whole[:end]
        video = outcome(PY.inspect_video, payload)
        audio = outcome(PY.inspect_audio, payload)
        assert video == outcome(CY.inspect_video, payload)
        assert audio == outcome(CY.inspect_audio, payload)
        assert video[0] == audio[0] == "ok"  # inspection never raises on content
    assert outcome(PY.inspect_video, memoryview(whole)) == outcome(
        CY.inspect_video, bytearray(whole)
    )


@compiled
@settings(max_examples=200, deadline=None)
@given(
    tag_type=st.integers(-(2**70), 2**70) | st.integers(-2, 300),
    timestamp=st.integers(-(2**70), 2**70) | timestamps,
    payload=st.binary(max_size=400),
)
def test_diff_flv_tag(tag_type: int, timestamp: int, payload: bytes) -> None:
    expected = outcome(PY.flv_tag, tag_type, timestamp, payload)
    assert expected == outcome(CY.flv_tag, tag_type, timestamp, payload)
    assert expected == outcome(CY.flv_tag, tag_type, timestamp, bytearray(payload))
    if expected[0] == "ok":
        assert expected[1] == tag_bytes(tag_type, timestamp & 0xFFFFFFFF, payload)


@compiled
def test_diff_odd_argument_types() -> None:
    odd = [
        None,
        1.5,
        "x",
        b"\x01",
        [1],
        memoryview(b"abcd")[::2],
        memoryview(b"ab").cast("B", (2, 1)),
    ]
    for value in odd:
        for args in ((value, 0, b""), (9, value, b""), (9, 0, value), (value, value, value)):
            assert outcome(PY.flv_tag, *args) == outcome(CY.flv_tag, *args), args
        assert outcome(PY.inspect_video, value) == outcome(CY.inspect_video, value), value
        assert outcome(PY.inspect_audio, value) == outcome(CY.inspect_audio, value), value
        assert outcome(lambda v: PY.FlvReader().feed(v), value) == outcome(
            lambda v: CY.FlvReader().feed(v), value
        ), value
        assert outcome(lambda v: PY.FlvReader(v).max_tag_size, value) == outcome(
            lambda v: CY.FlvReader(v).max_tag_size, value
        ), value
        assert outcome(PY.flv_header, value, value) == outcome(CY.flv_header, value, value)


# --------------------------------------------------------------------------------------------
# A real file from Debian's ffmpeg


@pytest.fixture(scope="module")
def ffmpeg_flv(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    out = tmp_path_factory.mktemp("flv") / "out.flv"
    subprocess.run(
        [
            "ffmpeg", "-hide_banner", "-loglevel", "error",
            "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25",
            "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
            "-t", "2", "-c:v", "libx264", "-g", "25", "-c:a", "aac", "-f", "flv", str(out),
        ],
        check=True,
        timeout=60,
    )  # fmt: skip
    return out.read_bytes()


@pytest.mark.ffmpeg
def test_ffmpeg_file_demux_and_remux(flv: ModuleType, ffmpeg_flv: bytes) -> None:
    data = ffmpeg_flv
    r = flv.FlvReader()
    tags = []
    for i in range(0, len(data), 1000):  # odd-sized pieces, as a socket would deliver them
        tags += r.feed(data[i : i + 1000])
    assert (r.header_parsed, r.has_audio, r.has_video) == (True, True, True)
    assert r.tags_read == len(tags) > 100

    assert tags[0][0] == flv.TAG_SCRIPT and b"onMetaData" in tags[0][2][:16]
    video = [(ts, p) for t, ts, p in tags if t == flv.TAG_VIDEO]
    audio = [(ts, p) for t, ts, p in tags if t == flv.TAG_AUDIO]
    assert {t for t, _, _ in tags} == {8, 9, 18}

    assert flv.inspect_video(video[0][1]) == ("avc", 1, False, True)
    assert flv.inspect_audio(audio[0][1]) == ("aac", True)
    assert all(flv.inspect_audio(p) == ("aac", False) for _, p in audio[1:])

    # ffmpeg ends H.264 with an end-of-sequence tag (frame type 1, AVCPacketType 2).
    assert video[-1][1][:2] == b"\x17\x02"
    assert flv.inspect_video(video[-1][1]) == ("avc", 1, False, False)
    frames = [flv.inspect_video(p) for _, p in video[1:-1]]
    assert len(frames) == 50  # 2 s at 25 fps
    assert all(codec == "avc" and not seq for codec, _, _, seq in frames)
    keyframes = [i for i, (_, _, key, _) in enumerate(frames) if key]
    assert keyframes == [0, 25]  # -g 25
    assert all((ft == 1) == (i % 25 == 0) for i, (_, ft, _, _) in enumerate(frames))

    # Timestamps in ms, monotonic per stream; 25 fps → 40 ms apart.
    assert [ts for ts, _ in video[1:-1]][:3] == [0, 40, 80]
    assert all(a <= b for (a, _), (b, _) in zip(audio, audio[1:], strict=False))

    # Muxing every tag again gives the file back, byte for byte.
    assert flv.flv_header() == data[:13]
    assert b"".join(flv.flv_tag(t, ts, p) for t, ts, p in tags) == data[13:]
