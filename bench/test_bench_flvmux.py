"""FLV codec benchmarks: the compiled module against its pure-Python twin, pair by pair.

Run with ``pytest bench/test_bench_flvmux.py --benchmark-only``.  Each benchmark group holds the
two implementations of one operation on one realistic input, so pytest-benchmark prints them
side by side.  The demux benchmark reads a 10 s 720p FLV that ffmpeg writes at module setup; it
is skipped, with a message, when ffmpeg is not installed.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
from collections import deque
from types import ModuleType

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

PY = importlib.import_module("watchbuy.engine._flvmux_py")
CY = pytest.importorskip(
    "watchbuy.engine._flvmux", reason="no compiled flvmux codec to pair with its twin"
)
IMPLS = pytest.mark.parametrize("impl", [PY, CY], ids=["python", "cython"])

# What one 720p30 / 2.5 Mbit/s stream with 128 kbit/s AAC sends: ~340-byte AAC frames, P-frames
# of a few KB, keyframes of tens of KB.
AUDIO = b"\xaf\x01" + bytes(range(148))
PFRAME = b"\x27\x01\x00\x00\x28" + (4091).to_bytes(4, "big") + b"\x41" * 4091
KEYFRAME = b"\x17\x01\x00\x00\x00" + (61435).to_bytes(4, "big") + b"\x65" * 61435

# Inspection sees every media tag; mix them as a stream does (legacy and E-RTMP).
VIDEO_MIX = [
    PFRAME,
    PFRAME,
    KEYFRAME,
    b"\x17\x00\x00\x00\x00\x01\x64\x00\x1f\xff\xe1",  # AVC sequence header
    b"\x93hvc1" + bytes(64),  # E-RTMP HEVC CodedFramesX keyframe
    b"\xa1hvc1\x00\x00\x00" + bytes(64),  # E-RTMP HEVC inter frame
    b"\x97\x02\x00\x01\x02\x01av01" + bytes(32),  # ModEx (nano offset) then AV1 frame
    b"\x96\x03vp09" + bytes(16),  # multitrack
] * 128
AUDIO_MIX = [
    AUDIO,
    AUDIO,
    AUDIO,
    b"\xaf\x00\x12\x10",
    b"\x91Opus" + bytes(80),
    b"\x2f\xff\xfb",
] * 128


# Two 10 s files: what a host's OBS sends for this product (720p30, 2.5 Mbit/s: tags of many KB,
# so copying payload bytes is most of the work) and a small low-bitrate one (240p25 at ffmpeg's
# default bitrate: tags of a few hundred bytes, so per-tag overhead is most of the work).
FILE_PROFILES = {
    "720p-2.5Mbps": ["testsrc2=size=1280x720:rate=30", "-preset", "veryfast", "-b:v", "2500k",
                     "-g", "60", "-b:a", "128k"],
    "240p-low": ["testsrc2=size=320x240:rate=25", "-g", "25"],
}  # fmt: skip


@pytest.fixture(scope="module", params=list(FILE_PROFILES))
def flv_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed; the FLV demux benchmark needs a real file from it")
    source, *video_opts = FILE_PROFILES[request.param]
    audio_opts = video_opts[video_opts.index("-b:a") :] if "-b:a" in video_opts else []
    video_opts = video_opts[: len(video_opts) - len(audio_opts)]
    out = tmp_path_factory.mktemp("bench_flv") / f"{request.param}.flv"
    subprocess.run(
        [
            "ffmpeg", "-hide_banner", "-loglevel", "error",
            "-f", "lavfi", "-i", source,
            "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
            "-t", "10", "-c:v", "libx264", *video_opts, "-c:a", "aac", *audio_opts,
            "-f", "flv", str(out),
        ],
        check=True,
        timeout=120,
    )  # fmt: skip
    return out.read_bytes()


def _pieces(data: bytes, size: int = 65536) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@IMPLS
@pytest.mark.parametrize(
    ("label", "tag_type", "payload"),
    [
        pytest.param("audio-150B", 8, AUDIO, id="audio-150B"),
        pytest.param("pframe-4KB", 9, PFRAME, id="pframe-4KB"),
        pytest.param("keyframe-60KB", 9, KEYFRAME, id="keyframe-60KB"),
    ],
)
def test_flv_tag(
    benchmark: BenchmarkFixture, impl: ModuleType, label: str, tag_type: int, payload: bytes
) -> None:
    benchmark.group = f"flv_tag {label}"
    out = benchmark(impl.flv_tag, tag_type, 123456, payload)
    assert out == CY.flv_tag(tag_type, 123456, payload) == PY.flv_tag(tag_type, 123456, payload)


@IMPLS
def test_feed_whole_file(
    benchmark: BenchmarkFixture, impl: ModuleType, flv_file: bytes, request: pytest.FixtureRequest
) -> None:
    profile = request.node.callspec.params["flv_file"]
    benchmark.group = f"FlvReader.feed 10s {profile} file ({len(flv_file) // 1024} KB), 64KB pieces"
    pieces = _pieces(flv_file)

    def demux() -> int:
        reader = impl.FlvReader()
        count = 0
        for piece in pieces:
            count += len(reader.feed(piece))
        return count

    count = benchmark(demux)
    expected = CY.FlvReader().feed(flv_file)
    assert count == len(expected) > 500
    benchmark.extra_info["bytes"] = len(flv_file)
    benchmark.extra_info["tags"] = count


@IMPLS
def test_inspect_video(benchmark: BenchmarkFixture, impl: ModuleType) -> None:
    benchmark.group = f"inspect_video x{len(VIDEO_MIX)}"
    fn = impl.inspect_video
    # deque(map(...), maxlen=0) drives the calls from C, so the loop costs next to nothing and
    # the comparison is of the functions themselves.
    benchmark(lambda: deque(map(fn, VIDEO_MIX), maxlen=0))
    assert list(map(fn, VIDEO_MIX[:8])) == list(map(PY.inspect_video, VIDEO_MIX[:8]))


@IMPLS
def test_inspect_audio(benchmark: BenchmarkFixture, impl: ModuleType) -> None:
    benchmark.group = f"inspect_audio x{len(AUDIO_MIX)}"
    fn = impl.inspect_audio
    benchmark(lambda: deque(map(fn, AUDIO_MIX), maxlen=0))
    assert list(map(fn, AUDIO_MIX[:6])) == list(map(PY.inspect_audio, AUDIO_MIX[:6]))
