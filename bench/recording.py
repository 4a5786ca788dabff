"""A real recorded RTMP publish session, for benchmarks that need the bytes OBS/ffmpeg send.

:func:`recorded_session` returns everything Debian's ffmpeg sent to a media node while it
published 10 s of 1280x720 30 fps H.264 (libx264 ultrafast/zerolatency, 2.5 Mbit/s, GOP 60) and
128 kbit/s AAC, minus the 3073-byte handshake (C0 + C1 + C2): the chunk stream exactly as a
``ChunkReader`` sees it, Set Chunk Size, connect/publish commands and all.

The first call records it: a :class:`~watchbuy.engine.node.MediaNode` runs in-process on loopback
ports, a small asyncio TCP proxy in front of its RTMP port copies the client's bytes aside, and
ffmpeg publishes through the proxy as fast as it can encode (no ``-re``).  The result is checked
(it must parse into hundreds of audio and video messages) and cached, written atomically, at
``bench/work/ffmpeg_publish.rtmp``; later calls read the file.  Delete it to record afresh.

Run ``python bench/recording.py`` to record (or show) the cached session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # a script, or imported as `recording` (bench/conftest.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import loopback_node_settings  # noqa: E402
from watchbuy.engine.wire import MSG_AUDIO, MSG_VIDEO  # noqa: E402

WORK_DIR = Path(__file__).resolve().parent / "work"
SESSION_FILE = WORK_DIR / "ffmpeg_publish.rtmp"

HANDSHAKE_BYTES = 1 + 1536 + 1536  # C0 + C1 + C2, before the chunk stream starts
STREAM_KEY = "benchkey"
STREAM_NAME = "bench"
SECONDS = 10

# What the recording must contain at least (10 s at 30 fps; AAC at 44.1 kHz is ~43 frames/s).
MIN_VIDEO_MESSAGES = 250
MIN_AUDIO_MESSAGES = 350


class RecordingError(RuntimeError):
    """The session could not be recorded (ffmpeg missing or failing, nothing published...)."""


def recorded_session(path: Path | str = SESSION_FILE, *, refresh: bool = False) -> bytes:
    """The client→server bytes of a real ffmpeg publish, after the handshake (cached at ``path``).

    Records the session on first use (about 10-20 s, mostly ffmpeg encoding); ``refresh=True``
    records again even if the file exists.  Callable from plain code and from inside a running
    event loop (it then records on a worker thread).
    """
    path = Path(path)
    if path.exists() and not refresh:
        data = path.read_bytes()
        if data:
            return data
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RecordingError(
            "ffmpeg is not installed: recording the RTMP session needs Debian's ffmpeg "
            "(apt-get install ffmpeg), or put a recorded session at " + str(path)
        )
    data = _run(_record(ffmpeg))
    _check_session(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, data)
    return data


def _run(coro):
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # asyncio.run() refuses to nest: record on a thread with its own event loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_session(data: bytes) -> None:
    """Parse the recording; it must hold a full publish (enough audio and video messages)."""
    from watchbuy.engine import _chunk_py

    messages = _chunk_py.ChunkReader().feed(data)
    video = sum(1 for m in messages if m[2] == MSG_VIDEO)
    audio = sum(1 for m in messages if m[2] == MSG_AUDIO)
    if video < MIN_VIDEO_MESSAGES or audio < MIN_AUDIO_MESSAGES:
        raise RecordingError(
            f"the recorded session is incomplete: {len(data)} bytes, {len(messages)} messages, "
            f"{video} video and {audio} audio (wanted >= {MIN_VIDEO_MESSAGES} and "
            f">= {MIN_AUDIO_MESSAGES})"
        )


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bytearray | None
) -> None:
    try:
        while data := await reader.read(262144):
            if record is not None:
                record += data
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        if writer.can_write_eof() and not writer.is_closing():
            try:
                writer.write_eof()
            except (ConnectionError, OSError):
                pass


async def _record(ffmpeg: str) -> bytes:
    from watchbuy.engine.node import MediaNode

    node = MediaNode(loopback_node_settings("bench-recorder", {STREAM_KEY: STREAM_NAME}))
    await node.start()
    sessions: list[bytearray] = []
    proxies: list[asyncio.Task] = []

    async def proxy(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        proxies.append(asyncio.current_task())
        record = bytearray()
        sessions.append(record)
        server_r, server_w = await asyncio.open_connection("127.0.0.1", node.rtmp_port)
        try:
            await asyncio.gather(_pump(client_r, server_w, record), _pump(server_r, client_w, None))
        finally:
            server_w.close()
            client_w.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error",
        "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
        "-t", str(SECONDS),
        "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
        "-b:v", "2500k", "-maxrate", "2500k", "-bufsize", "5000k", "-g", "60",
        "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "128k",
        "-f", "flv", f"rtmp://127.0.0.1:{port}/live/{STREAM_KEY}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 120)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RecordingError("ffmpeg did not finish publishing within 120 s") from None
        if proc.returncode != 0:
            raise RecordingError(
                f"ffmpeg exited with {proc.returncode}: {err.decode(errors='replace').strip()}"
            )
        # ffmpeg has exited, so its socket is closed: the proxy ends once it has read the rest.
        if proxies:
            await asyncio.wait_for(asyncio.gather(*proxies, return_exceptions=True), 10)
    finally:
        server.close()
        await node.stop()
    if len(sessions) != 1:
        raise RecordingError(f"expected one RTMP connection from ffmpeg, saw {len(sessions)}")
    data = bytes(sessions[0])
    if len(data) <= HANDSHAKE_BYTES or data[0] != 3:
        raise RecordingError(f"no RTMP handshake in the recorded bytes ({len(data)} bytes)")
    return data[HANDSHAKE_BYTES:]


if __name__ == "__main__":
    session = recorded_session()
    print(f"{SESSION_FILE}: {len(session)} bytes after the handshake")
