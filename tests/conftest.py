"""Shared fixtures: a media node on loopback ports, and real peers (Debian's ffmpeg)."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from watchbuy.engine import codecs
from watchbuy.engine.codecs import flvmux
from watchbuy.engine.node import MediaNode
from watchbuy.settings import Settings

# bench/ is no installed package: it is imported from the checkout.  `python -m pytest` run in
# the checkout has the root on sys.path already; a bare `pytest` needs it added (at the end: the
# top-level folders must not shadow installed modules).
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from bench.common import loopback_node_settings  # noqa: E402

# Fixtures of the balancer tests (moto's `aws`, the `off_loopback` guard), shared by the
# modules that need them.
pytest_plugins = ["balancer_helpers"]

FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")


def codec_implementations(name: str) -> dict[str, ModuleType]:
    """The implementations of codec ``name`` to run its suite on, by test id: ``"python"`` (the
    twin, always) and ``"cython"`` (the compiled module, when it imports and
    ``WATCHBUY_NO_EXTENSIONS`` is off).  A build without extensions thus still collects and runs
    every codec test; test_codec_selection.py fails if a default build silently lacks one."""
    found = {"python": codecs.load_pure(name)}
    if not codecs.extensions_disabled():
        try:
            found["cython"] = codecs.load_compiled(name)
        except ImportError:
            pass
    return found


def needs_compiled(name: str) -> pytest.MarkDecorator:
    """Marks a test of codec ``name``'s compiled module, or one comparing it with the twin:
    skipped, with the reason, when only the twin exists."""
    return pytest.mark.skipif(
        "cython" not in codec_implementations(name),
        reason=f"needs the compiled {name} codec: not built, or WATCHBUY_NO_EXTENSIONS is on",
    )


def node_settings(**changes) -> Settings:
    """A node on loopback (ports 0, no data folder) with stream keys key1..key5 publishing
    show1..show5, as the benchmarks build theirs; ``changes`` override any field."""
    changes.setdefault("stream_keys", {f"key{i}": f"show{i}" for i in range(1, 6)})
    return loopback_node_settings(changes.pop("node_id", "test-node"),
                                  changes.pop("stream_keys"), **changes)


@pytest.fixture
async def node():
    media = MediaNode(node_settings())
    await media.start()
    yield media
    await media.stop()


@pytest.fixture
def ffmpeg() -> str:
    if FFMPEG is None:
        pytest.fail("Debian's ffmpeg is required (make test installs it when run as root)")
    return FFMPEG


async def start_ffmpeg_publisher(
    url: str, seconds: float = 30, size: str = "320x240", rate: int = 25, gop: int = 25,
) -> asyncio.subprocess.Process:
    """ffmpeg publishing an H.264/AAC test pattern in real time, as OBS would."""
    return await asyncio.create_subprocess_exec(
        FFMPEG, "-hide_banner", "-loglevel", "error", "-re",
        "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
        "-t", str(seconds),
        "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", str(gop),
        "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "64k",
        "-f", "flv", url,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def wait_live(node: MediaNode, name: str, timeout: float = 15.0, frames: int = 1) -> None:
    """Until ``name`` is live and has relayed ``frames`` video frames."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stream = node.registry.get(name)
        if stream is not None and stream.video_frames >= frames:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"stream {name!r} did not go live within {timeout} s")
        await asyncio.sleep(0.05)


class FlvHttpReader:
    """Reads an HTTP-FLV response over a raw socket (HTTP/1.0: the body ends with the stream)."""

    def __init__(self, reader, writer, status: int, headers: dict[str, str]) -> None:
        self.reader = reader
        self.writer = writer
        self.status = status
        self.headers = headers
        self.flv = flvmux.FlvReader()
        self.eof = False

    @classmethod
    async def open(cls, port: int, path: str, connection=None) -> FlvHttpReader:
        """``GET path`` on a new connection, or on ``connection`` (reader, writer) when given."""
        reader, writer = connection or await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        return cls(reader, writer, status, headers)

    async def tags(self, timeout: float = 10.0) -> list:
        """The next tags that arrive (at least one), or [] at the end of the stream."""
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                self.eof = True
                return []
            tags = self.flv.feed(data)
            if tags:
                return tags

    async def close(self) -> None:
        self.writer.close()
