"""Chunk reader: unfinished-message limits and memory, and extended timestamps on continuation
chunks repeated or omitted.  Every test runs against the compiled reader and its pure-Python
twin; the differential test feeds both the same streams and demands the same outcome."""

from __future__ import annotations

import tracemalloc

import pytest
from conftest import codec_implementations, needs_compiled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watchbuy.engine.errors import ChunkError, ProtocolError

CODECS = codec_implementations("chunk")
IMPLEMENTATIONS = list(CODECS.values())
_chunk_py = CODECS["python"]


@pytest.fixture(params=IMPLEMENTATIONS, ids=list(CODECS))
def codec(request):
    return request.param


def basic(fmt: int, csid: int) -> bytes:
    if csid < 64:
        return bytes([fmt << 6 | csid])
    if csid < 320:
        return bytes([fmt << 6, csid - 64])
    return bytes([fmt << 6 | 1, (csid - 64) & 0xFF, (csid - 64) >> 8])


def header0(csid: int, timestamp: int, length: int, type_id: int = 9, msid: int = 1) -> bytes:
    """A format-0 chunk header (with the extended timestamp when the timestamp needs one)."""
    ext = timestamp >= 0xFFFFFF
    return (
        basic(0, csid)
        + min(timestamp, 0xFFFFFF).to_bytes(3, "big")
        + length.to_bytes(3, "big")
        + bytes([type_id])
        + msid.to_bytes(4, "little")
        + (timestamp.to_bytes(4, "big") if ext else b"")
    )


def chunked(
    csid: int, timestamp: int, payload: bytes, chunk_size: int, repeat_ext: bool, type_id: int = 9
) -> bytes:
    """One message with a format-0 header, continuation chunks repeating the extended timestamp
    (as the specification, ffmpeg and OBS do) or omitting it (as some encoders do)."""
    ext = timestamp.to_bytes(4, "big") if timestamp >= 0xFFFFFF and repeat_ext else b""
    out = header0(csid, timestamp, len(payload), type_id) + payload[:chunk_size]
    for offset in range(chunk_size, len(payload), chunk_size):
        out += basic(3, csid) + ext + payload[offset : offset + chunk_size]
    return out


def set_chunk_size(size: int) -> bytes:
    return _chunk_py.encode_message(128, 2, 0, 1, 0, size.to_bytes(4, "big"))


def feed_all(reader, data: bytes, step: int | None = None) -> list:
    if step is None:
        return reader.feed(data)
    out = []
    for i in range(0, len(data), step):
        out += reader.feed(data[i : i + step])
    return out


# ----------------------------------------------------------------- unfinished-message memory


def test_a_declared_length_is_not_allocated_up_front(codec):
    reader = codec.ChunkReader()
    reader.feed(set_chunk_size(1 << 24))
    tracemalloc.start()
    try:
        reader.feed(header0(6, 0, 0xFFFFFF) + bytes(1000))  # 16 MiB declared, 1000 bytes sent
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (reader.partial_count, reader.partial_bytes) == (1, 1000)
    assert peak < 256 * 1024, peak


def test_many_chunk_streams_cost_what_they_send_not_what_they_declare(codec):
    """The issue's attack: many chunk streams at chunk size 1, each declaring a message and
    sending one byte of it.  Memory must follow the bytes sent, not the lengths declared."""
    streams = 2000
    attack = set_chunk_size(1) + b"".join(
        header0(400 + i, 0, 64 * 1024) + b"x" for i in range(streams)
    )
    reader = codec.ChunkReader(max_partial_messages=streams)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        assert reader.feed(attack)[1:] == []
        held = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert (reader.partial_count, reader.partial_bytes) == (streams, streams)
    # 128 MB declared; per stream we may keep its state and a tiny buffer, under 1 KiB.
    assert held < streams * 1024, held


def test_the_same_attack_is_refused_by_the_default_count_limit(codec):
    limit = codec.MAX_PARTIAL_MESSAGES
    attack = set_chunk_size(1) + b"".join(header0(400 + i, 0, 1000) + b"x" for i in range(limit))
    reader = codec.ChunkReader()
    reader.feed(attack)
    assert reader.partial_count == limit
    with pytest.raises(ChunkError) as info:
        reader.feed(header0(400 + limit, 0, 1000) + b"x")
    assert str(info.value) == f"chunk stream {400 + limit}: more than {limit} unfinished messages"
    assert isinstance(info.value, ProtocolError)


def test_partial_counters_follow_messages_and_aborts(codec):
    # Every message counts from its first chunk header on, the Abort too: 2 open + 1.
    reader = codec.ChunkReader(max_partial_messages=3)
    data = set_chunk_size(100) + header0(6, 0, 250) + bytes(100) + header0(7, 0, 150) + bytes(40)
    reader.feed(data)  # csid 7 is in the middle of its first chunk
    assert (reader.partial_count, reader.partial_bytes) == (2, 140)
    reader.feed(bytes(60) + b"\xc6" + bytes(100))  # the rest of it, then csid 6's second chunk
    assert (reader.partial_count, reader.partial_bytes) == (2, 300)
    abort = _chunk_py.encode_message(100, 2, 0, 2, 0, (6).to_bytes(4, "big"))
    reader.feed(abort)
    assert (reader.partial_count, reader.partial_bytes) == (1, 100)
    got = reader.feed(b"\xc7" + bytes(50))
    assert got == [(7, 0, 9, 1, bytes(150))]
    assert (reader.partial_count, reader.partial_bytes) == (0, 0)
    more = header0(8, 5, 300) + bytes(100) + header0(9, 5, 300) + bytes(100)
    assert reader.feed(more + header0(10, 5, 3) + b"abc") == [(10, 5, 9, 1, b"abc")]
    with pytest.raises(ChunkError, match="^chunk stream 12: more than 3 unfinished messages$"):
        reader.feed(header0(11, 5, 300) + bytes(100) + header0(12, 5, 3))


def test_partial_bytes_limit_counts_arrived_bytes(codec):
    reader = codec.ChunkReader(max_partial_bytes=1000)
    reader.feed(set_chunk_size(600) + header0(6, 0, 5000) + bytes(600) + header0(7, 0, 900))
    reader.feed(bytes(400))
    assert reader.partial_bytes == 1000
    with pytest.raises(ChunkError, match="^chunk stream 7: more than 1000 bytes in unfinished"):
        reader.feed(bytes(1))
    with pytest.raises(ChunkError, match="more than 1000 bytes"):  # a broken reader stays broken
        reader.feed(b"")


def test_limits_and_counters_are_attributes_of_both_twins(codec):
    reader = codec.ChunkReader(max_message_size=10, max_partial_messages=3, max_partial_bytes=7)
    assert (reader.max_message_size, reader.max_partial_messages, reader.max_partial_bytes) == (
        10, 3, 7)  # fmt: skip
    assert (reader.partial_count, reader.partial_bytes) == (0, 0)
    for name in ("partial_count", "partial_bytes"):
        with pytest.raises(AttributeError):
            setattr(reader, name, 1)
    assert codec.MAX_PARTIAL_MESSAGES == _chunk_py.MAX_PARTIAL_MESSAGES
    assert codec.MAX_PARTIAL_BYTES == _chunk_py.MAX_PARTIAL_BYTES >= codec.MAX_MESSAGE_SIZE


def test_a_message_that_arrives_whole_is_returned_intact(codec):
    # The compiled reader sizes a lone message by the bytes at hand: check every way of cutting.
    payload = bytes(range(256)) * 40
    data = set_chunk_size(1000) + chunked(6, 0, payload, 1000, True) + chunked(4, 1, b"a", 1000, True)
    for step in (None, 1, 999, 1000, 1001, 4096):
        got = feed_all(codec.ChunkReader(), data, step)
        assert got[1:] == [(6, 0, 9, 1, payload), (4, 1, 9, 1, b"a")], step


# ------------------------------------------------------- extended timestamps on continuations


HIGH = 0x01234567  # past 0xFFFFFF: about 5.3 hours into a stream


@pytest.mark.parametrize("repeat_ext", [True, False], ids=["repeated", "omitted"])
@pytest.mark.parametrize("step", [None, 1, 5])
def test_continuation_chunks_with_and_without_extended_timestamp(codec, repeat_ext, step):
    video = bytes(range(256)) * 3  # 6 chunks of 128
    audio = b"\xaf\x01" + bytes(300)
    data = (
        chunked(6, HIGH, video, 128, repeat_ext)
        + chunked(4, HIGH + 21, audio, 128, repeat_ext, type_id=8)
        + chunked(6, HIGH + 33, video[::-1], 128, repeat_ext)
    )
    assert feed_all(codec.ChunkReader(), data, step) == [
        (6, HIGH, 9, 1, video),
        (4, HIGH + 21, 8, 1, audio),
        (6, HIGH + 33, 9, 1, video[::-1]),
    ]


def test_omitting_peer_payload_that_looks_like_the_timestamp_stays_payload(codec):
    # Once the peer is seen to omit the extended timestamp, 4 payload bytes equal to it at the
    # start of a later continuation chunk are still payload.
    first = bytes(256)
    tricky = bytes(128) + HIGH.to_bytes(4, "big") + bytes(124)
    data = chunked(6, HIGH, first, 128, False) + chunked(6, HIGH, tricky, 128, False)
    assert feed_all(codec.ChunkReader(), data, 3) == [(6, HIGH, 9, 1, first), (6, HIGH, 9, 1, tricky)]


def test_repeating_peer_with_delta_headers(codec):
    # Format 1 with an extended delta: its continuation chunks repeat the delta (the header's
    # field); the writer of both twins produces exactly this.
    writer = _chunk_py.ChunkWriter(128)
    msgs = [(6, HIGH, 9, 1, bytes(300)), (6, HIGH + 0x1000000, 9, 1, b"k" * 400)]
    data = b"".join(writer.write(*m) for m in msgs)
    assert feed_all(codec.ChunkReader(), data, 1) == msgs


message = st.tuples(
    st.sampled_from([3, 4, 6, 7]),
    st.integers(0, 0xFFFF),  # added to a timestamp base, below or above 0xFFFFFF
    st.sampled_from([8, 9, 18]),
    st.binary(max_size=700),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    msgs=st.lists(message, min_size=1, max_size=8),
    base=st.sampled_from([0, 0xFFFF00, 0xFFFFFF, HIGH]),
    chunk_size=st.sampled_from([1, 60, 128, 4096]),
    repeat_ext=st.booleans(),
    step=st.integers(1, 300),
)
def test_differential_extended_timestamp_styles(msgs, base, chunk_size, repeat_ext, step):
    end = header0(5, 0, 1, 20) + b"."  # later bytes, as a live stream always has
    data = set_chunk_size(chunk_size) + b"".join(
        chunked(csid, base + ts, payload, chunk_size, repeat_ext, type_id)
        for csid, ts, type_id, payload in msgs
    ) + end
    want = [(csid, base + ts, type_id, 1, payload) for csid, ts, type_id, payload in msgs]
    want.append((5, 0, 20, 1, b"."))
    # The one input detection cannot tell apart: an omitting peer whose first continuation
    # chunk starts with the very bytes of the extended timestamp.
    lookalike = not repeat_ext and any(
        base + ts >= 0xFFFFFF and payload[chunk_size : chunk_size + 4] == (base + ts).to_bytes(4, "big")
        for _, ts, _, payload in msgs
    )
    for codec in IMPLEMENTATIONS:
        whole = codec.ChunkReader().feed(data)[1:]
        assert feed_all(codec.ChunkReader(), data, step)[1:] == whole
        if not lookalike:
            assert whole == want
    first, *others = (codec.ChunkReader().feed(data) for codec in IMPLEMENTATIONS)
    assert all(other == first for other in others)


def run(codec, pieces: list[bytes], **limits) -> list:
    """What a reader makes of the pieces: messages or the error, and its counters, per feed."""
    reader = codec.ChunkReader(**limits)
    out = []
    for piece in pieces:
        try:
            got: object = reader.feed(piece)
        except ChunkError as exc:
            got = ("error", str(exc))
        out.append((got, reader.partial_count, reader.partial_bytes))
    return out


@needs_compiled("chunk")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    msgs=st.lists(message, max_size=10),
    chunk_size=st.sampled_from([1, 7, 128]),
    cut=st.integers(0, 4000) | st.just(10**6),
    step=st.integers(1, 200),
    max_partial_messages=st.integers(0, 4) | st.just(20),
    max_partial_bytes=st.integers(0, 600) | st.just(10_000),
)
def test_differential_partial_limits(
    msgs, chunk_size, cut, step, max_partial_messages, max_partial_bytes
):
    """Messages on several chunk streams with their chunks interleaved, cut anywhere: both
    twins agree on every feed's messages or error and on the counters after it."""
    lists = []
    for i, (_, ts, type_id, payload) in enumerate(msgs):
        whole = chunked(3 + i, ts, payload, chunk_size, True, type_id)
        first = len(header0(3 + i, ts, len(payload))) + min(chunk_size, len(payload))
        rest = whole[first:]
        step3 = len(basic(3, 3 + i)) + chunk_size
        lists.append([whole[:first]] + [rest[j : j + step3] for j in range(0, len(rest), step3)])
    data = set_chunk_size(chunk_size)
    while any(lists):  # round robin: one chunk of each unfinished message in turn
        for chunks in lists:
            if chunks:
                data += chunks.pop(0)
    data = data[: len(set_chunk_size(1)) + cut]
    pieces = [data[i : i + step] for i in range(0, len(data), step)]
    limits = {"max_partial_messages": max_partial_messages, "max_partial_bytes": max_partial_bytes}
    _chunk = CODECS["cython"]
    assert run(_chunk, pieces, **limits) == run(_chunk_py, pieces, **limits)
    roomy = max_partial_messages > len(msgs) and max_partial_bytes >= 700 * len(msgs) + 4
    if roomy and cut >= 10**6:  # Set Chunk Size counts too, while it is unfinished
        delivered = [m for feed, _, _ in run(_chunk, pieces, **limits) for m in feed][1:]
        assert sorted(delivered) == sorted(
            (3 + i, ts, type_id, 1, payload) for i, (_, ts, type_id, payload) in enumerate(msgs)
        )
