"""RTMP chunk stream benchmarks: the compiled codec against its pure-Python twin, pair by pair.

Run with ``pytest bench/test_bench_chunk.py --benchmark-only``.  The input is a real session:
what Debian's ffmpeg sent to a media node while publishing 10 s of 720p30 H.264 at 2.5 Mbit/s
plus 128 kbit/s AAC (``recording.py`` records it once into ``bench/work/``).

- ``ChunkReader.feed``: the whole session fed in 64 KiB pieces, as a socket would hand it over;
  and the same messages re-chunked at the default 128-byte chunk size (many more headers).
- ``ChunkWriter.write`` / ``encode_message``: the ~750 messages parsed from that session (connect
  and publish commands, metadata, ~430 AAC frames, ~300 H.264 frames), re-encoded with a chunk
  size of 4096.

Each benchmark sets ``extra_info["bytes"]`` (per round: the chunk stream's bytes for the reader,
the message payload bytes for the writers), so the bench conftest prints MB/s and the speed-up
over the twin after the table.  The twin runs a few pedantic rounds only.
"""

from __future__ import annotations

import importlib
from collections import deque
from itertools import starmap
from types import ModuleType

import pytest

PY = importlib.import_module("watchbuy.engine._chunk_py")
CY = pytest.importorskip(
    "watchbuy.engine._chunk", reason="no compiled chunk codec to pair with its twin"
)
IMPLS = pytest.mark.parametrize("impl", [PY, CY], ids=["python", "cython"])

PIECE = 64 * 1024
OUT_CHUNK_SIZE = 4096
TWIN_ROUNDS = 15


def _run(benchmark, impl: ModuleType, fn):
    if impl is PY:
        return benchmark.pedantic(fn, rounds=TWIN_ROUNDS, warmup_rounds=1)
    return benchmark(fn)


@pytest.fixture(scope="module")
def messages(recorded_rtmp: bytes) -> list[tuple[int, int, int, int, bytes]]:
    parsed = CY.ChunkReader().feed(recorded_rtmp)
    assert parsed == PY.ChunkReader().feed(recorded_rtmp)
    return parsed


@pytest.fixture(scope="module")
def streams(recorded_rtmp: bytes, messages: list) -> dict[str, tuple[bytes, int]]:
    """Chunk streams to parse: label -> (bytes, message count).

    ``ffmpeg`` is the recording itself (ffmpeg switches to 4096-byte chunks after connect).
    ``rechunked-128`` carries the same messages, minus Set Chunk Size, at the protocol's default
    128-byte chunks: 32 times as many chunk headers, so it measures the header path.
    """
    kept = [m for m in messages if m[2] != PY.MSG_SET_CHUNK_SIZE]
    writer = CY.ChunkWriter(128)
    rechunked = b"".join(starmap(writer.write, kept))
    return {"ffmpeg": (recorded_rtmp, len(messages)), "rechunked-128": (rechunked, len(kept))}


@IMPLS
@pytest.mark.parametrize("label", ["ffmpeg", "rechunked-128"])
def test_reader_feed(benchmark, impl: ModuleType, label: str, streams: dict) -> None:
    data, expected = streams[label]
    benchmark.group = f"ChunkReader.feed, 64 KiB pieces: {label}"
    pieces = [data[i : i + PIECE] for i in range(0, len(data), PIECE)]

    def parse() -> int:
        reader = impl.ChunkReader()
        count = 0
        for piece in pieces:
            count += len(reader.feed(piece))
        return count

    count = _run(benchmark, impl, parse)
    assert count == expected > 700
    benchmark.extra_info["bytes"] = len(data)
    benchmark.extra_info["messages"] = count


def _payload_bytes(messages: list) -> int:
    return sum(len(m[4]) for m in messages)


@IMPLS
def test_writer_write(benchmark, impl: ModuleType, messages: list) -> None:
    benchmark.group = f"ChunkWriter.write: the session's messages, chunk size {OUT_CHUNK_SIZE}"

    def write() -> None:
        writer = impl.ChunkWriter(OUT_CHUNK_SIZE)
        deque(starmap(writer.write, messages), maxlen=0)

    _run(benchmark, impl, write)
    out = _written(impl, messages)
    assert out == _written(PY if impl is CY else CY, messages)
    # The compressed headers parse back into the same messages.
    set_size = CY.encode_message(128, 2, 0, 1, 0, OUT_CHUNK_SIZE.to_bytes(4, "big"))
    assert CY.ChunkReader().feed(set_size + out)[1:] == messages
    benchmark.extra_info["bytes"] = _payload_bytes(messages)
    benchmark.extra_info["bytes_out"] = len(out)


def _written(impl: ModuleType, messages: list) -> bytes:
    writer = impl.ChunkWriter(OUT_CHUNK_SIZE)
    return b"".join(starmap(writer.write, messages))


@IMPLS
def test_encode_message(benchmark, impl: ModuleType, messages: list) -> None:
    benchmark.group = f"encode_message: the session's messages, chunk size {OUT_CHUNK_SIZE}"
    args = [(OUT_CHUNK_SIZE, *m) for m in messages]
    encode = impl.encode_message

    _run(benchmark, impl, lambda: deque(starmap(encode, args), maxlen=0))
    out = list(starmap(encode, args))
    assert out == list(starmap(PY.encode_message if impl is CY else CY.encode_message, args))
    benchmark.extra_info["bytes"] = _payload_bytes(messages)
    benchmark.extra_info["bytes_out"] = sum(map(len, out))
