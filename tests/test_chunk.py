"""RTMP chunk stream codec: one suite run against the compiled codec and its pure-Python twin,
plus differential tests that feed both the same random and adversarial bytes."""

from __future__ import annotations

import os
import random

import pytest
from conftest import codec_implementations, needs_compiled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watchbuy.engine.errors import ChunkError

CODECS = codec_implementations("chunk")
IMPLEMENTATIONS = list(CODECS.values())
_chunk_py = CODECS["python"]


@pytest.fixture(params=IMPLEMENTATIONS, ids=list(CODECS))
def codec(request):
    return request.param


def feed_all(reader, data: bytes, step: int | None = None) -> list:
    if step is None:
        return reader.feed(data)
    out = []
    for i in range(0, len(data), step):
        out += reader.feed(data[i : i + step])
    return out


def messages_sample() -> list[tuple[int, int, int, int, bytes]]:
    rng = random.Random(7)
    msgs = [(3, 0, 20, 0, b"\x02\x00\x07connect" + bytes(200))]
    ts = 0
    for i in range(60):
        ts += 23 if i % 2 else 40
        msgs.append((4, ts, 8, 1, rng.randbytes(rng.choice([6, 200, 371]))))
        msgs.append((6, ts, 9, 1, rng.randbytes(rng.choice([0, 5, 1500, 9000]))))
    return msgs


def test_roundtrip_with_header_compression_any_split(codec):
    msgs = messages_sample()
    writer = codec.ChunkWriter(128)
    data = b"".join(writer.write(*m) for m in msgs)
    for step in (None, 1, 7, 128, 4096):
        assert feed_all(codec.ChunkReader(), data, step) == msgs


def test_writer_uses_all_four_header_formats(codec):
    writer = codec.ChunkWriter(128)
    formats = []
    for ts, size, type_id in [(0, 10, 8), (20, 10, 8), (40, 10, 8), (60, 10, 8), (70, 12, 9)]:
        formats.append(writer.write(4, ts, type_id, 1, bytes(size))[0] >> 6)
    # 0: first; 1: new delta; 2 would need same length/type and a new delta; 3: same delta.
    assert formats[0] == 0
    assert formats[1] == 1 or formats[1] == 2
    assert 3 in formats
    writer2 = codec.ChunkWriter(128)
    writer2.write(5, 0, 8, 1, bytes(4))
    writer2.write(5, 10, 8, 1, bytes(4))
    assert writer2.write(5, 30, 8, 1, bytes(4))[0] >> 6 == 2


def test_hand_built_formats_and_extended_timestamps(codec):
    """Chunks as ffmpeg writes them: format 0, then 1/2/3; extended timestamps on type-3 too."""
    big = bytes(range(256)) * 2
    ext = (0x01000000).to_bytes(4, "big")
    data = (
        # fmt 0 on csid 6: extended timestamp 0x01000000, 512 bytes, video, stream 1
        bytes([0x06]) + b"\xff\xff\xff" + (512).to_bytes(3, "big") + b"\x09" + b"\x01\0\0\0"
        + ext + big[:128]
        # continuation chunks repeat the extended timestamp
        + bytes([0xC6]) + ext + big[128:256]
        + bytes([0xC6]) + ext + big[256:384]
        + bytes([0xC6]) + ext + big[384:]
        # fmt 1: delta 40, 3 bytes, audio
        + bytes([0x46]) + (40).to_bytes(3, "big") + (3).to_bytes(3, "big") + b"\x08" + b"abc"
        # fmt 2: delta 10, same length/type
        + bytes([0x86]) + (10).to_bytes(3, "big") + b"def"
        # fmt 3 starting a new message repeats the delta 10
        + bytes([0xC6]) + b"ghi"
    )
    msgs = feed_all(codec.ChunkReader(), data, 1)
    assert msgs == [
        (6, 0x01000000, 9, 1, big),
        (6, 0x01000000 + 40, 8, 1, b"abc"),
        (6, 0x01000000 + 50, 8, 1, b"def"),
        (6, 0x01000000 + 60, 8, 1, b"ghi"),
    ]


@pytest.mark.parametrize("csid", [2, 63, 64, 319, 320, 65599])
def test_chunk_stream_id_encodings(codec, csid):
    writer = codec.ChunkWriter(128)
    data = writer.write(csid, 5, 9, 1, bytes(200))
    assert codec.ChunkReader().feed(data) == [(csid, 5, 9, 1, bytes(200))]


@pytest.mark.parametrize("csid", [0, 1, 65600])
def test_bad_chunk_stream_ids_refused_by_writer(codec, csid):
    with pytest.raises(ChunkError):
        codec.ChunkWriter().write(csid, 0, 9, 1, b"x")


def set_chunk_size(size: int) -> bytes:
    return _chunk_py.encode_message(128, 2, 0, 1, 0, size.to_bytes(4, "big"))


def test_set_chunk_size_applies_at_once(codec):
    payload = os.urandom(5000)
    data = set_chunk_size(4096) + _chunk_py.encode_message(4096, 6, 0, 9, 1, payload)
    reader = codec.ChunkReader()
    msgs = feed_all(reader, data, 3)
    assert reader.chunk_size == 4096
    assert msgs[1] == (6, 0, 9, 1, payload)


@pytest.mark.parametrize("size", [0, 2**31, 2**32 - 1])
def test_invalid_chunk_size_is_an_error(codec, size):
    reader = codec.ChunkReader()
    with pytest.raises(ChunkError, match="invalid chunk size"):
        reader.feed(set_chunk_size(size))
    # a broken reader stays broken
    with pytest.raises(ChunkError):
        reader.feed(b"\x03")


def test_huge_chunk_size_does_not_buffer_a_huge_chunk(codec):
    reader = codec.ChunkReader()
    reader.feed(set_chunk_size(2**31 - 1))
    payload = os.urandom(100_000)
    msgs = feed_all(reader, _chunk_py.encode_message(2**31 - 1, 6, 0, 9, 1, payload), 1000)
    assert msgs == [(6, 0, 9, 1, payload)]


def test_message_length_limit(codec):
    header = bytes([0x06]) + b"\0\0\0" + (0xFFFFFF).to_bytes(3, "big") + b"\x09" + bytes(4)
    with pytest.raises(ChunkError, match="exceeds the limit"):
        codec.ChunkReader(max_message_size=1 << 20).feed(header)
    # at the protocol's own limit a message is accepted and assembled as bytes arrive
    reader = codec.ChunkReader()
    assert reader.feed(set_chunk_size(1 << 20) + header + bytes(1000)) == [
        (2, 0, 1, 0, (1 << 20).to_bytes(4, "big"))
    ]


def test_partial_bytes_are_bounded(codec):
    reader = codec.ChunkReader(max_partial_bytes=1 << 20)
    data = b""
    for csid in range(3, 10):
        data += bytes([csid]) + b"\0\0\0" + (500_000).to_bytes(3, "big") + b"\x09" + bytes(4)
        data += bytes(128)  # one full chunk, then the next chunk stream starts
    reader.feed(data)  # 7 * 128 bytes arrived: what counts, not the 3.5 MB declared
    assert (reader.partial_count, reader.partial_bytes) == (7, 7 * 128)
    # A message that arrives whole is never buffered unfinished; one that stalls is.
    whole = set_chunk_size(1 << 21) + bytes([0x0A]) + b"\0\0\0" + (1_100_000).to_bytes(3, "big")
    assert len(reader.feed(whole + b"\x09" + bytes(4) + bytes(1_100_000))) == 2
    stalled = bytes([0x0A]) + b"\0\0\0" + (1_100_000).to_bytes(3, "big") + b"\x09" + bytes(4)
    with pytest.raises(ChunkError, match="^chunk stream 10: more than 1048576 bytes in unfin"):
        reader.feed(stalled + bytes(1_050_000))


@pytest.mark.parametrize("fmt", [1, 2, 3])
def test_unknown_chunk_stream_without_header(codec, fmt):
    with pytest.raises(ChunkError, match="without a previous header"):
        codec.ChunkReader().feed(bytes([(fmt << 6) | 9]) + bytes(20))


def test_new_header_inside_unfinished_message(codec):
    first = bytes([0x06]) + b"\0\0\0" + (300).to_bytes(3, "big") + b"\x09" + bytes(4) + bytes(128)
    with pytest.raises(ChunkError, match="unfinished message"):
        codec.ChunkReader().feed(first + first)


def test_abort_discards_partial_message(codec):
    partial = bytes([0x06]) + b"\0\0\0" + (300).to_bytes(3, "big") + b"\x09" + bytes(4) + bytes(128)
    abort = _chunk_py.encode_message(128, 2, 0, 2, 0, (6).to_bytes(4, "big"))
    fresh = _chunk_py.encode_message(128, 6, 9, 9, 1, b"new")
    msgs = codec.ChunkReader().feed(partial + abort + fresh)
    assert msgs[-1] == (6, 9, 9, 1, b"new")


def test_encode_message_is_shareable_format0(codec):
    payload = os.urandom(10_000)
    data = codec.encode_message(4096, 6, 1234, 9, 1, payload)
    assert data[0] >> 6 == 0
    reader = codec.ChunkReader()
    reader.feed(set_chunk_size(4096))
    assert reader.feed(data) == [(6, 1234, 9, 1, payload)]
    assert data == _chunk_py.encode_message(4096, 6, 1234, 9, 1, bytearray(payload))


# --- differential tests: both implementations must agree on everything ------------------------


def run(codec, chunks: list[bytes], **kwargs):
    reader = codec.ChunkReader(**kwargs)
    out = []
    try:
        for piece in chunks:
            out.append(("ok", reader.feed(piece)))
    except ChunkError as exc:
        out.append(("error", str(exc)))
    except Exception as exc:  # anything but ChunkError is a bug in either twin
        out.append(("crash", type(exc).__name__, str(exc)))
    return out, reader.chunk_size


DIFF_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@needs_compiled("chunk")
@DIFF_SETTINGS
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_differential_random_bytes(pieces):
    results = [run(c, pieces, max_partial_bytes=1 << 16) for c in IMPLEMENTATIONS]
    assert results[0] == results[1]
    assert all(r[0] != "crash" for r in results[0][0])


message = st.tuples(
    st.sampled_from([2, 3, 4, 5, 6, 63, 64, 300, 65599]),
    st.integers(0, 2**32 - 1),
    # not 1/2 (Set Chunk Size, Abort): those change how the reader parses what follows
    st.sampled_from([3, 4, 5, 6, 8, 9, 15, 17, 18, 20, 22]),
    st.integers(0, 3),
    st.binary(max_size=600),
)


@needs_compiled("chunk")
@DIFF_SETTINGS
@given(st.lists(message, max_size=12), st.sampled_from([1, 7, 128, 4096]), st.data())
def test_differential_mutated_streams(msgs, chunk_size, data):
    """Valid streams, then truncated or with a byte flipped: adversarial but close to real."""
    writer = _chunk_py.ChunkWriter(128)
    stream = set_chunk_size(chunk_size)
    writer.chunk_size = chunk_size
    for m in msgs:
        stream += writer.write(*m)
    if stream and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(stream) - 1))
        stream = stream[:i] + bytes([data.draw(st.integers(0, 255))]) + stream[i + 1 :]
    cut = data.draw(st.integers(0, len(stream)))
    step = data.draw(st.integers(1, 64))
    pieces = [stream[i : i + step] for i in range(0, cut, step)]
    results = [run(c, pieces) for c in IMPLEMENTATIONS]
    assert results[0] == results[1]


@needs_compiled("chunk")
@DIFF_SETTINGS
@given(st.lists(message, min_size=1, max_size=12), st.sampled_from([1, 60, 128, 4096]))
def test_differential_writers_and_roundtrip(msgs, chunk_size):
    writers = [c.ChunkWriter(chunk_size) for c in IMPLEMENTATIONS]
    for m in msgs:
        encoded = [w.write(*m) for w in writers]
        assert encoded[0] == encoded[1]
    for c in IMPLEMENTATIONS:
        writer = c.ChunkWriter(128)
        stream = set_chunk_size(chunk_size)
        writer.chunk_size = chunk_size
        stream += b"".join(writer.write(*m) for m in msgs)
        got = c.ChunkReader().feed(stream)[1:]
        assert got == msgs
