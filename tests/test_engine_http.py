"""The node's HTTP side under hostile clients: pipelining, slow heads, peers that never read.

Parser tests are socket-free.  The node tests use real sockets; the ones with ``ffmpeg`` keep a
healthy HTTP-FLV viewer watching a real publisher and require it to keep >= 90 % of real time
while the attacks run.  No assertion is a wall-clock limit on our speed: deadlines are generous
bounds for "it happens at all", and the settings under test are made small instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket

import pytest
from conftest import FFPROBE, FlvHttpReader, start_ffmpeg_publisher, stop_process, wait_live

from watchbuy.engine import http
from watchbuy.engine.client import RtmpClient
from watchbuy.engine.codecs import flvmux
from watchbuy.engine.httpparse import HttpError, Request, RequestParser
from watchbuy.settings import ConfigError, load_settings

GET = b"GET /api/streams HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(autouse=True)
def fresh_log_budget(monkeypatch):
    """Each test sees its own log lines, not a budget spent by the tests before it."""
    http.LOG_BUDGET.reset()


# -- the parser, socket-free ------------------------------------------------------------------
def test_pipelined_heads_split_anywhere_parse_the_same():
    data = b"".join(f"GET /r{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(5))
    for size in (1, 2, 3, 5, 7, 64):
        parser = RequestParser()
        events = []
        for i in range(0, len(data), size):
            events += parser.feed(data[i : i + size])
        assert [e.target for e in events] == [f"/r{i}" for i in range(5)], size
        assert parser.buffered == 0


def test_at_most_limit_requests_per_feed_the_rest_kept():
    parser = RequestParser(max_buffer=1 << 20)
    events = parser.feed(GET * 1000, limit=32)
    assert len(events) == 32 and parser.has_complete()
    total = len(events)
    while parser.has_complete():
        more = parser.feed(b"", limit=32)
        assert 0 < len(more) <= 32
        total += len(more)
    assert total == 1000 and parser.buffered == 0


def test_valid_requests_before_garbage_come_first_then_one_error():
    parser = RequestParser()
    events = parser.feed(GET + b"GET /healthz HTTP/1.0\r\n\r\n" + b"garbage\r\n\r\n" + GET)
    assert [type(e) for e in events] == [Request, Request, HttpError]
    assert events[2].status == 400
    assert parser.feed(GET) == [] and parser.buffered == 0  # nothing after the error


@pytest.mark.parametrize("data, status", [
    (b"GET /" + b"a" * 20000, 431),  # a head that never ends
    (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 400),
    (b"G\xc9T / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n bad: folded\r\n\r\n", 400),
])
def test_bad_heads_are_one_error_event(data, status):
    events = RequestParser().feed(data)
    assert len(events) == 1 and isinstance(events[0], HttpError)
    assert events[0].status == status


def test_queued_bytes_are_bounded():
    parser = RequestParser(max_buffer=64 * 1024)
    events = parser.feed(GET * 4000, limit=32)  # 150 kB queued behind the first 32
    assert isinstance(events[-1], HttpError) and events[-1].status == 431
    assert parser.buffered == 0


@pytest.mark.parametrize("name, value, message", [
    ("DRAIN_TIMEOUT", "0", "WATCHBUY_DRAIN_TIMEOUT: must be positive"),
    ("HEADER_TIMEOUT", "soon", "WATCHBUY_HEADER_TIMEOUT: expected a number, got 'soon'"),
    ("HTTP_REQUESTS_PER_TURN", "-1", "WATCHBUY_HTTP_REQUESTS_PER_TURN: must be positive"),
])
def test_bad_http_limit_is_one_clear_line(name, value, message):
    with pytest.raises(ConfigError) as error:
        load_settings({"WATCHBUY_" + name: value, "WATCHBUY_ENV_FILE": os.devnull})
    assert str(error.value) == message


# -- helpers for node tests -------------------------------------------------------------------
async def read_all(reader: asyncio.StreamReader, timeout: float = 15.0) -> bytes:
    """Everything until the server closes (a reset counts as closed)."""
    chunks = []
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), timeout)
            if not data:
                break
            chunks.append(data)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def statuses(raw: bytes) -> list[int]:
    # Each status line follows the previous answer's body directly (no CRLF after JSON).
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0  # pragma: no cover - Linux only


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def small_timeouts(node, **changes) -> None:
    for name, value in {"header_timeout": 0.5, "keepalive_timeout": 0.5,
                        "drain_timeout": 0.5, **changes}.items():
        setattr(node.settings, name, value)


# -- node tests -------------------------------------------------------------------------------
async def test_valid_pipelined_requests_are_answered_before_the_400(node):
    reader, writer = await asyncio.open_connection("127.0.0.1", node.http_port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /api/server HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"\x16\x03\x01 not http at all\r\n\r\n")
    raw = await read_all(reader)
    writer.close()
    assert statuses(raw) == [200, 200, 400]


async def test_every_pipelined_request_is_answered_in_order(node):
    reader, writer = await asyncio.open_connection("127.0.0.1", node.http_port)
    count = 5000
    requests = b"".join(f"GET /healthz?n={i} HTTP/1.1\r\n\r\n".encode() for i in range(count))
    writer.write(requests + b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
    raw = await read_all(reader, timeout=30)
    writer.close()
    assert statuses(raw) == [200] * (count + 1)


async def test_silent_and_slow_heads_time_out_with_one_line(node, caplog):
    caplog.set_level(logging.INFO, logger="watchbuy")
    small_timeouts(node, keepalive_timeout=60.0)
    silent_reader, silent = await asyncio.open_connection("127.0.0.1", node.http_port)
    slow_reader, slow = await asyncio.open_connection("127.0.0.1", node.http_port)

    async def trickle() -> None:  # slowloris: a byte of head now and then, never the end
        for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 200:
            if slow.is_closing():
                return
            slow.write(bytes([byte]))
            await asyncio.sleep(0.05)

    trickler = asyncio.ensure_future(trickle())
    try:
        assert await closed_by_server(silent_reader, 10)
        assert await closed_by_server(slow_reader, 10)
    finally:
        trickler.cancel()
        silent.close()
        slow.close()
    lines = [r for r in caplog.records if "no complete request head" in r.getMessage()]
    assert len(lines) == 2
    assert not any(r.exc_info for r in caplog.records)


async def test_idle_keep_alive_connection_is_closed(node):
    small_timeouts(node, header_timeout=60.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.http_port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b" 200 " in head.split(b"\r\n")[0]
    assert await closed_by_server(reader, 10)
    writer.close()
    await asyncio.sleep(0.1)
    assert node.stats.connections["http"] == 0


async def test_pipelined_flood_from_a_peer_that_never_reads_is_bounded(node, caplog):
    """8 MB of pipelined requests, no reads: answers stop at the write buffer's high-water
    mark, reading pauses, and the peer is cut off after the drain timeout."""
    caplog.set_level(logging.INFO, logger="watchbuy")
    small_timeouts(node, drain_timeout=1.0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", node.http_port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    flood = GET * (8 * 1024 * 1024 // len(GET))
    baseline = peak = rss_bytes()
    sender = asyncio.ensure_future(loop.sock_sendall(sock, flood))
    try:
        deadline = loop.time() + 20
        while not node.stats.connections["http"] and loop.time() < deadline:
            await asyncio.sleep(0.01)  # the node accepts the connection
        while node.stats.connections["http"] and loop.time() < deadline:
            peak = max(peak, rss_bytes())
            await asyncio.sleep(0.05)
        assert node.stats.connections["http"] == 0, "the non-reading peer was never cut off"
    finally:
        sender.cancel()
        sock.close()
    # Unbounded, the 200 000 JSON answers queued for this peer would take > 60 MB.
    assert peak - baseline < 32 * 1024 * 1024, (peak - baseline) >> 20
    assert "peer took no data" in caplog.text


async def test_non_reading_viewers_are_aborted_after_the_stream_ends(node, caplog):
    """Stream over: a viewer with a full queue that never reads is aborted after the drain
    timeout instead of holding its queued bytes forever."""
    caplog.set_level(logging.INFO, logger="watchbuy")
    node.limits.stall_timeout = 600.0  # only the drain timeout may end them
    node.limits.viewer_queue_bytes = 256 * 1024
    small_timeouts(node, drain_timeout=1.0)
    publisher = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
    await publisher.publish("key1")
    for _ in range(100):
        if node.registry.get("show1") is not None:
            break
        await asyncio.sleep(0.02)
    socks = []
    for _ in range(5):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", node.http_port))
        sock.sendall(b"GET /live/show1.flv HTTP/1.1\r\nHost: x\r\n\r\n")
        socks.append(sock)
    stream = node.registry.get("show1")
    loop = asyncio.get_running_loop()
    try:
        deadline = loop.time() + 30
        frame = b"\x27\x01\0\0\0" + os.urandom(32 * 1024)
        publisher.send_media(9, 0, b"\x17\x00\0\0\0" + os.urandom(30))
        ts = 0
        while loop.time() < deadline:  # until every viewer has bytes queued in user space
            ts += 40
            publisher.send_media(9, ts, b"\x17\x01\0\0\0" + frame[5:] if ts % 400 == 0
                                 else frame)
            await publisher.drain()
            queued = [v.transport.get_write_buffer_size() for v in stream.viewers]
            if len(queued) == 5 and all(queued):
                break
            await asyncio.sleep(0.005)
        assert len(stream.viewers) == 5 and all(
            v.transport.get_write_buffer_size() for v in stream.viewers)
        await publisher.close()  # the host stops streaming
        deadline = loop.time() + 15
        while node.stats.connections["http"] and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert node.stats.connections["http"] == 0, "viewers that never read were kept"
        assert caplog.text.count("peer took no data") == 5
    finally:
        for sock in socks:
            sock.close()


async def test_publisher_address_is_for_the_operator_view_only(node):
    node.settings.operator_token = "operator-secret"
    node.settings.hook_secret = "hook-secret"  # never an operator credential
    publisher = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
    await publisher.publish("key1")
    local_port = publisher.writer.get_extra_info("sockname")[1]

    async def streams(*headers: str) -> dict:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.http_port)
        writer.write(("GET /api/streams HTTP/1.1\r\nConnection: close\r\n"
                      + "".join(h + "\r\n" for h in headers) + "\r\n").encode())
        raw = await read_all(reader)
        writer.close()
        return json.loads(raw.split(b"\r\n\r\n", 1)[1])

    try:
        (public,) = (await streams())["streams"]
        assert public["name"] == "show1" and "publisher" not in public
        (wrong,) = (await streams("Authorization: Bearer nope"))["streams"]
        assert "publisher" not in wrong
        (hook,) = (await streams("Authorization: Bearer hook-secret"))["streams"]
        assert "publisher" not in hook
        (operator,) = (await streams("Authorization: Bearer operator-secret"))["streams"]
        assert operator["publisher"] == f"127.0.0.1:{local_port}"
        node.settings.operator_token = ""  # no token, no operator view
        (none,) = (await streams("Authorization: Bearer "))["streams"]
        assert "publisher" not in none
    finally:
        await publisher.close()


async def api_streams(port: int) -> list[dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/streams HTTP/1.1\r\nConnection: close\r\n\r\n")
    raw = await read_all(reader)
    writer.close()
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])["streams"]


async def wait_stream_info(port: int, check, timeout: float = 20.0) -> dict:
    """Poll /api/streams until the one stream's info passes ``check``; fail with what it said."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    info: dict = {}
    while loop.time() < deadline:
        streams = await api_streams(port)
        if streams:
            info = streams[0]
            if check(info):
                return info
        await asyncio.sleep(0.25)
    raise AssertionError(f"stream health never matched within {timeout} s: {info}")


@pytest.mark.usefixtures("ffmpeg")
async def test_stream_health_shows_what_ffmpeg_publishes(node):
    """Resolution, frame rate, both bitrates, codecs, audio and the keyframe interval measured
    from keyframe timestamps (ffmpeg -g 25 at 25 fps: one a second)."""
    url = f"rtmp://127.0.0.1:{node.rtmp_port}/live/key1"
    pub = await start_ffmpeg_publisher(url, seconds=60, size="640x360", rate=25, gop=25)
    try:
        info = await wait_stream_info(
            node.http_port, lambda i: i["keyframe_interval"] is not None
            and i["video_bitrate"] > 0 and i["audio_bitrate"] > 0 and i["fps"] >= 20)
        assert (info["width"], info["height"]) == (640, 360)
        assert (info["video_codec"], info["audio_codec"], info["has_audio"]) == ("avc", "aac", True)
        assert info["keyframe_interval"] == pytest.approx(1.0, abs=0.1)
        # AAC at -b:a 64k: the audio rate is measured apart from the video's
        assert 30_000 < info["audio_bitrate"] < 130_000, info
        assert info["video_bitrate"] + info["audio_bitrate"] == pytest.approx(
            info["bitrate_in"], abs=16)
    finally:
        await stop_process(pub)


def test_stream_health_reads_the_picture_size_from_the_sps_not_the_metadata(tmp_path):
    """A publisher's onMetaData may say anything; the health figures come from the stream:
    the SPS's picture size, keyframe timestamps (-g 15 at 30 fps: 0.5 s), audio bytes apart."""
    from media_helpers import ffmpeg_flv, split_flv

    from watchbuy.engine.relay import LiveStream, RelayLimits
    from watchbuy.engine.wire import MSG_AUDIO, MSG_VIDEO

    media = split_flv(ffmpeg_flv(tmp_path / "a.flv", seconds=2, size="426x240", gop=15))
    stream = LiveStream("show", "live", RelayLimits())
    stream.on_metadata(["onMetaData", {"width": 1920, "height": 1080}])
    stream.on_media(MSG_VIDEO, 0, media.video_header)
    stream.on_media(MSG_AUDIO, 0, media.audio_header)
    for type_id, ts, payload, _key in media.tags:
        stream.on_media(type_id, ts, payload)
    info = stream.info()
    assert (info["width"], info["height"]) == (426, 240)
    assert info["keyframe_interval"] == 0.5 and stream.keyframe_interval_ms == 500
    assert info["has_audio"] is True
    assert stream.audio_bytes == sum(len(p) for t, _, p, _ in media.tags if t == 8) + \
        len(media.audio_header)

    silent = LiveStream("silent", "live", RelayLimits())
    silent.on_media(MSG_VIDEO, 0, b"\x17\x00\x00\x00\x00garbage")  # an unreadable header
    for type_id, ts, payload, _key in media.tags:
        if type_id == MSG_VIDEO:
            silent.on_media(type_id, ts, payload)
    info = silent.info()
    assert info["has_audio"] is False and info["audio_bitrate"] == 0
    assert info["width"] is None  # neither SPS nor metadata: unknown, not made up


@pytest.mark.usefixtures("ffmpeg")
async def test_long_keyframe_interval_shows_before_the_second_keyframe(node):
    """-g 300 at 25 fps is a keyframe every 12 s: the interval reads over 4 s well before the
    second keyframe, and never less than the time since the first."""
    url = f"rtmp://127.0.0.1:{node.rtmp_port}/live/key2"
    pub = await start_ffmpeg_publisher(url, seconds=60, size="320x240", rate=25, gop=300)
    try:
        info = await wait_stream_info(
            node.http_port, lambda i: (i["keyframe_interval"] or 0) > 4.0)
        stream = node.registry.get("show2")
        assert stream.keyframe_interval_ms is None  # no second keyframe yet: a lower bound
        assert info["keyframe_interval"] <= 12.1
    finally:
        await stop_process(pub)


async def test_metrics_answer_loopback_and_the_operator_only(node, monkeypatch):
    async def metrics(*headers: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.http_port)
        writer.write(("GET /metrics HTTP/1.1\r\nConnection: close\r\n"
                      + "".join(h + "\r\n" for h in headers) + "\r\n").encode())
        raw = await read_all(reader)
        writer.close()
        return raw.split(b"\r\n", 1)[0]

    assert b" 200 " in await metrics()  # loopback: Prometheus beside the node
    monkeypatch.setattr(http, "is_loopback", lambda host: False)  # as if from elsewhere
    node.settings.operator_token = "operator-secret"
    assert b" 404 " in await metrics()
    assert b" 404 " in await metrics("Authorization: Bearer nope")
    assert b" 200 " in await metrics("Authorization: Bearer operator-secret")


AAC_CONFIG = b"\xaf\x00\x12\x10"  # AAC, sequence header: AAC-LC 44.1 kHz stereo


async def test_viewer_joining_before_any_media_gets_flags_of_the_first_tracks(node):
    """An audio-only stream: the header waits for the first audio and says audio only; the
    header and keep-alive timeouts do not cut the waiting viewer."""
    small_timeouts(node, header_timeout=0.2, keepalive_timeout=0.2)
    publisher = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
    await publisher.publish("key1")
    try:
        for _ in range(100):
            if node.registry.get("show1") is not None:
                break
            await asyncio.sleep(0.02)
        viewer = await FlvHttpReader.open(node.http_port, "/live/show1.flv")
        await asyncio.sleep(0.6)  # longer than both timeouts
        publisher.send_media(8, 0, AAC_CONFIG)
        for i in range(1, 6):
            publisher.send_media(8, i * 23, b"\xaf\x01" + os.urandom(100))
        await publisher.drain()
        tags = []
        while len(tags) < 6:
            tags += await viewer.tags(timeout=10)
        assert viewer.flv.has_audio and not viewer.flv.has_video
        assert tags[0][2] == AAC_CONFIG
        await viewer.close()
    finally:
        await publisher.close()


# -- with real ffmpeg peers -------------------------------------------------------------------
async def start_ffmpeg(*args: str) -> asyncio.subprocess.Process:
    from conftest import FFMPEG

    return await asyncio.create_subprocess_exec(
        FFMPEG, "-hide_banner", "-loglevel", "error", "-re", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def probe_streams(url: str) -> list[str]:
    """ffprobe's codec types for ``url``; fails only if ffprobe never gets started."""
    proc = await asyncio.create_subprocess_exec(
        FFPROBE, "-hide_banner", "-v", "error", "-rw_timeout", "15000000",
        "-show_streams", "-of", "json", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("ffprobe never started on the stream") from None
    assert proc.returncode == 0, err.decode()
    return sorted(s["codec_type"] for s in json.loads(out)["streams"])


@pytest.mark.usefixtures("ffmpeg")
@pytest.mark.parametrize("kind", ["audio", "video"])
async def test_single_track_streams_start_in_ffprobe(node, kind):
    url = f"rtmp://127.0.0.1:{node.rtmp_port}/live/key1"
    if kind == "audio":
        pub = await start_ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
                                 "-t", "60", "-vn", "-c:a", "aac", "-b:a", "64k", "-f", "flv", url)
    else:
        pub = await start_ffmpeg("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25", "-t",
                                 "60", "-an", "-c:v", "libx264", "-preset", "ultrafast",
                                 "-tune", "zerolatency", "-g", "25", "-pix_fmt", "yuv420p",
                                 "-f", "flv", url)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while loop.time() < deadline:
            stream = node.registry.get("show1")
            if stream is not None and (stream.audio_header or stream.video_frames):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("stream did not go live")
        assert await probe_streams(f"http://127.0.0.1:{node.http_port}/live/show1.flv") == [kind]
        viewer = await FlvHttpReader.open(node.http_port, "/live/show1.flv")
        assert await viewer.tags()
        assert (viewer.flv.has_audio, viewer.flv.has_video) == (kind == "audio", kind == "video")
        await viewer.close()
    finally:
        await stop_process(pub)


class RateMeter:
    """Media seconds a viewer receives per wall-clock second, over a window."""

    def __init__(self, viewer: FlvHttpReader) -> None:
        self.viewer = viewer
        self.last_ts = 0
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            tags = await self.viewer.tags(timeout=30)
            if not tags:
                return
            self.last_ts = max([self.last_ts, *(ts for kind, ts, _ in tags
                                                if kind == flvmux.TAG_VIDEO)])

    async def measure(self, attack) -> float:
        loop = asyncio.get_running_loop()
        started, ts0 = loop.time(), self.last_ts
        await attack
        elapsed = loop.time() - started
        return (self.last_ts - ts0) / 1000 / elapsed

    def close(self) -> None:
        self.task.cancel()


async def pipelined_flood(port: int, seconds: float, read: bool) -> int:
    """Pipelined GET /api/streams as fast as the node takes them; returns answers seen."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    seen = 0

    async def drain_answers() -> None:
        nonlocal seen
        while True:
            data = await reader.read(1 << 20)
            if not data:
                return
            seen += data.count(b"HTTP/1.1 200")

    answers = asyncio.ensure_future(drain_answers()) if read else None
    try:
        while loop.time() < end:
            writer.write(GET * 20000)  # ~800 kB per write
            try:
                await asyncio.wait_for(writer.drain(), max(0.01, end - loop.time()))
            except TimeoutError:
                break
    except ConnectionError:
        pass
    finally:
        if answers is not None:
            answers.cancel()
        writer.transport.abort()
    return seen


async def slow_heads(port: int, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    writers = [(await asyncio.open_connection("127.0.0.1", port))[1] for _ in range(20)]
    while loop.time() < end:
        for writer in writers:
            if not writer.is_closing():
                writer.write(b"X")
        await asyncio.sleep(0.2)
    for writer in writers:
        writer.transport.abort()


async def garbage_after_valid(port: int, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GET + os.urandom(3000) + b"\r\n\r\n")
        assert statuses(await read_all(reader))[:1] == [200]
        writer.close()


class AnswersPerTurn:
    """The most HTTP answers the node gave within one turn of the event loop: a callback that
    re-schedules itself with call_soon runs once per turn and reads the count in between."""

    def __init__(self, monkeypatch) -> None:
        self.count = self.most = 0
        self.running = True
        respond = http.HttpSession.respond

        def counting(session, *args, **kwargs):
            self.count += 1
            return respond(session, *args, **kwargs)

        monkeypatch.setattr(http.HttpSession, "respond", counting)
        self.loop = asyncio.get_running_loop()
        self.loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.most = max(self.most, self.count)
        self.count = 0
        if self.running:
            self.loop.call_soon(self._tick)


@pytest.mark.usefixtures("ffmpeg")
async def test_healthy_viewer_keeps_its_rate_under_every_http_attack(node, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="watchbuy")
    small_timeouts(node, header_timeout=1.0, drain_timeout=1.0)
    pub = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/key1", seconds=90)
    try:
        await wait_live(node, "show1")
        meter = RateMeter(await FlvHttpReader.open(node.http_port, "/live/show1.flv"))
        await asyncio.sleep(1.0)  # past the start-up burst of the cached GOP
        window = 6.0
        attacks = asyncio.gather(
            pipelined_flood(node.http_port, window, read=True),
            pipelined_flood(node.http_port, window, read=True),
            pipelined_flood(node.http_port, window, read=False),
            slow_heads(node.http_port, window),
            garbage_after_valid(node.http_port, window),
        )
        per_turn = AnswersPerTurn(monkeypatch)
        rate = await meter.measure(attacks)
        per_turn.running = False
        answered = attacks.result()[:2]
        # Three pipelining connections and one more at a time: each gets at most
        # http_requests_per_turn answers per turn (one 256 kB read used to get ~6500).
        assert per_turn.most <= 4 * node.settings.http_requests_per_turn, per_turn.most
        assert rate >= 0.9, f"healthy viewer got {rate:.0%} of real time"
        assert all(answered), answered  # the floods were answered, just not all at once
        assert not meter.task.done()
        meter.close()
        assert not any(r.exc_info for r in caplog.records)  # never a traceback
    finally:
        await stop_process(pub)
