"""fMP4 muxer benchmarks: the compiled module against its pure-Python twin, pair by pair.

Run with ``pytest bench/test_bench_fmp4.py --benchmark-only``.  Each group holds the two
implementations of one operation on one realistic input, so pytest-benchmark prints them side
by side:

* ``fragment``: one LL-HLS part of a 720p30 stream (10 video frames of a few KB, 14 AAC frames);
* ``mux 20s``: a 20 s 720p30 / ~2.7 Mbit/s recording (ffmpeg, written at module setup) cut into
  parts the way ``HlsStream`` cuts them — the muxing cost per stream-second is this / 20;
* ``HlsStream 20s``: the same recording fed tag by tag through the whole segmenter (inspection,
  part/segment cutting, playlist bookkeeping and muxing), with whichever muxer is selected.

The module-level fixture is skipped, with a message, when ffmpeg is not installed.

Measured on the shared 2-core CI box (``pytest bench/test_bench_fmp4.py --benchmark-only
--benchmark-min-rounds=3 --benchmark-max-time=1``, best round): one part 3.6 us compiled vs
32 us twin; 20 s of 720p30 at 2.77 Mbit/s into 60 parts 0.38 ms compiled (19 us per
stream-second) vs 2.5 ms twin (123 us per stream-second); the whole HlsStream over the same
20 s 2.2 ms with the compiled muxer (110 us per stream-second), 5.0 ms with the twin.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
from types import ModuleType

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from watchbuy.engine.hls import HlsStream

PY = importlib.import_module("watchbuy.engine._fmp4_py")
CY = pytest.importorskip(
    "watchbuy.engine._fmp4", reason="no compiled fmp4 codec to pair with its twin"
)
flvmux = pytest.importorskip(
    "watchbuy.engine._flvmux", reason="no compiled flvmux codec to pair with its twin"
)
IMPLS = pytest.mark.parametrize("impl", [PY, CY], ids=["python", "cython"])

SECONDS = 20


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, int, bytes]]:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed; the fMP4 benchmarks need a real recording")
    out = tmp_path_factory.mktemp("bench_fmp4") / "720p.flv"
    subprocess.run(
        [
            "ffmpeg", "-hide_banner", "-loglevel", "error",
            "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30",
            "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
            "-t", str(SECONDS), "-c:v", "libx264", "-preset", "veryfast", "-b:v", "2560k",
            "-maxrate", "2560k", "-bufsize", "5M", "-g", "60", "-bf", "2",
            "-c:a", "aac", "-b:a", "128k", "-f", "flv", str(out),
        ],
        check=True,
        timeout=300,
    )  # fmt: skip
    return flvmux.FlvReader().feed(out.read_bytes())


def split(tags: list[tuple[int, int, bytes]]) -> tuple[bytes, bytes, list, list]:
    vhead = ahead = b""
    video, audio = [], []
    for t, ts, p in tags:
        if t == 9:
            if flvmux.inspect_video(p)[3]:
                vhead = p
            elif p[1] == 1:
                video.append((ts, p))
        elif t == 8:
            if flvmux.inspect_audio(p)[1]:
                ahead = p
            else:
                audio.append((ts, p))
    return vhead, ahead, video, audio


def plan(video: list, audio: list, frames: int = 10) -> list[tuple[list, list, int, int]]:
    """Parts of ``frames`` video frames with the audio that falls in each (ends known)."""
    parts = []
    a = 0
    for i in range(0, len(video), frames):
        vs = video[i : i + frames]
        vend = video[i + frames][0] if i + frames < len(video) else -1
        cut = vend if vend >= 0 else 2**40
        j = a
        while j + 1 < len(audio) and audio[j][0] < cut:
            j += 1
        parts.append((vs, audio[a:j], vend, audio[j][0] if j < len(audio) else -1))
        a = j
    return parts


@IMPLS
def test_fragment_one_part(benchmark: BenchmarkFixture, impl: ModuleType, recording: list) -> None:
    vhead, ahead, video, audio = split(recording)
    m = impl.Muxer(impl.video_track(vhead), impl.audio_track(ahead))
    vs, aud, vend, aend = plan(video, audio)[5]
    benchmark.group = f"fragment: one part ({len(vs)} video + {len(aud)} AAC frames)"
    out = benchmark(m.fragment, 7, vs, aud, vend, aend)
    assert out == PY.Muxer(PY.video_track(vhead), PY.audio_track(ahead)).fragment(
        7, vs, aud, vend, aend
    )


@IMPLS
def test_mux_recording(benchmark: BenchmarkFixture, impl: ModuleType, recording: list) -> None:
    vhead, ahead, video, audio = split(recording)
    parts = plan(video, audio)
    m = impl.Muxer(impl.video_track(vhead), impl.audio_track(ahead))
    size = sum(len(p) for _, _, p in recording)
    benchmark.group = f"mux {SECONDS}s 720p30 ({size * 8 // SECONDS // 1000} kbit/s) into parts"

    def mux() -> int:
        total = 0
        for seq, (vs, aud, vend, aend) in enumerate(parts, 1):
            total += len(m.fragment(seq, vs, aud, vend, aend))
        return total

    total = benchmark(mux)
    assert total > size * 0.95
    benchmark.extra_info["stream_seconds"] = SECONDS


@pytest.mark.parametrize("muxer", ["python", "cython"])
def test_hls_stream_recording(
    benchmark: BenchmarkFixture, recording: list, muxer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from watchbuy.engine import hls

    monkeypatch.setattr(hls, "fmp4", PY if muxer == "python" else CY)
    benchmark.group = f"HlsStream {SECONDS}s 720p30: segmenter + muxer"

    def run() -> int:
        stream = HlsStream("bench")
        for t, ts, p in recording:
            stream.feed(t, ts, p)
        stream.end()
        return len(stream.segments)

    assert benchmark(run) >= SECONDS // 2 - 1
    benchmark.extra_info["stream_seconds"] = SECONDS
