"""Bad input never takes the node down or disturbs other streams.

While ffmpeg publishes a healthy stream and an HTTP-FLV viewer watches it, attackers send random
bytes, truncated chunks, absurd chunk sizes and message lengths, unknown chunk streams and
malicious AMF.  Each attacker must get a clean disconnect and a log line; the viewer must keep
receiving the healthy stream throughout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import resource
import socket
import struct
import subprocess
import sys
import tracemalloc
from contextlib import asynccontextmanager

import pytest
from conftest import (
    FlvHttpReader,
    node_settings,
    start_ffmpeg_publisher,
    stop_process,
    wait_live,
)

from watchbuy.engine import _chunk_py
from watchbuy.engine.client import RtmpClient
from watchbuy.engine.codecs import amf
from watchbuy.engine.handshake import ClientHandshake
from watchbuy.engine.node import MediaNode
from watchbuy.settings import ConfigError, load_settings

pytestmark = pytest.mark.usefixtures("ffmpeg")


def chunk0(csid: int, type_id: int, payload: bytes, length: int | None = None,
           stream_id: int = 0) -> bytes:
    """A format-0 chunk header (with a length that may lie) followed by ``payload``."""
    size = len(payload) if length is None else length
    return (bytes([csid]) + b"\0\0\0" + size.to_bytes(3, "big") + bytes([type_id])
            + struct.pack("<I", stream_id) + payload)


def connect_command() -> bytes:
    return _chunk_py.encode_message(
        128, 3, 0, 20, 0,
        amf.encode_amf0("connect", 1.0, {"app": "live", "tcUrl": "rtmp://127.0.0.1/live"}),
    )


def deep_amf(depth: int) -> bytes:
    # connect, 1.0, {a: {a: {a: ... }}} without the closing markers: nesting past any sane limit
    return b"\x02\x00\x07connect" + b"\x00" + struct.pack(">d", 1.0) + (b"\x03\x00\x01a") * depth


ATTACKS = {
    "random bytes instead of a handshake": lambda: os.urandom(5000),
    "RTMPE version byte": lambda: b"\x06" + os.urandom(1536),
    "random chunks after the handshake": lambda: os.urandom(20000),
    "chunk size 0": lambda: _chunk_py.encode_message(128, 2, 0, 1, 0, b"\0\0\0\0"),
    "chunk size 2^31": lambda: _chunk_py.encode_message(128, 2, 0, 1, 0, b"\x80\0\0\0"),
    "message length near 2^24 then garbage": lambda: (
        chunk0(6, 9, os.urandom(128), length=0xFFFFFF) + os.urandom(3000)
    ),
    "unknown chunk stream id mid-message": lambda: (
        chunk0(6, 9, os.urandom(128), length=1000) + bytes([0xC0 | 17]) + os.urandom(200)
    ),
    "AMF nested 10000 deep": lambda: _chunk_py.encode_message(
        128, 3, 0, 20, 0, deep_amf(10000)),
    "AMF string length past the buffer": lambda: _chunk_py.encode_message(
        128, 3, 0, 20, 0, b"\x02\xff\xffconnect"),
    "AMF object key past the buffer": lambda: connect_command() + _chunk_py.encode_message(
        128, 3, 0, 20, 0, b"\x02\x00\x0ccreateStream\x00" + struct.pack(">d", 2.0)
        + b"\x03\x7f\xffabc"),
    "publish without createStream args": lambda: connect_command() + _chunk_py.encode_message(
        128, 3, 0, 20, 1, amf.encode_amf0("publish", 3.0, None)),
    # int(NaN) used to raise ValueError in deleteStream: a traceback per message
    "deleteStream of a NaN stream id": lambda: connect_command() + _chunk_py.encode_message(
        128, 3, 0, 20, 0, amf.encode_amf0("deleteStream", 4.0, None, math.nan)),
    "deleteStream of an infinite stream id": lambda: connect_command() + _chunk_py.encode_message(
        128, 3, 0, 20, 0, amf.encode_amf0("deleteStream", 4.0, None, -math.inf)),
}

NEEDS_HANDSHAKE = {name for name in ATTACKS if "handshake" not in name and "RTMPE" not in name}


async def attack(port: int, name: str) -> float:
    """Send one attack; returns how long the server took to close the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if name in NEEDS_HANDSHAKE or name == "random chunks after the handshake":
        handshake = ClientHandshake(digest=True)
        writer.write(handshake.start())
        while not handshake.done:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "server closed during a good handshake"
            reply = handshake.feed(data)
            if reply:
                writer.write(reply)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        writer.write(ATTACKS[name]())
        await writer.drain()
        while True:  # the server must close on us; read until it does
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                break
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        writer.close()
    return loop.time() - started


async def test_bad_input_drops_only_that_connection(node, caplog):
    caplog.set_level(logging.INFO, logger="watchbuy")
    pub = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/key1", seconds=60)
    try:
        await wait_live(node, "show1")
        viewer = await FlvHttpReader.open(node.http_port, "/live/show1.flv")
        assert await viewer.tags()
        stream = node.registry.get("show1")
        for name in ATTACKS:
            caplog.clear()
            frames_before = stream.video_frames
            took = await attack(node.rtmp_port, name)
            assert took < 10, name
            # one line for the dropped connection, and never a traceback
            assert caplog.text.count("dropping connection") == 1, f"{name}: {caplog.text}"
            assert not [r for r in caplog.records if r.exc_info], f"{name}: a traceback"
            # the healthy stream goes on: the viewer still gets tags, the publisher still sends
            assert await viewer.tags(timeout=5), name
            assert node.registry.get("show1") is stream, name
            await asyncio.sleep(0.1)
            assert stream.video_frames > frames_before, name
        # truncated: half a chunk, then the attacker hangs up; no error, nothing left behind
        reader, writer = await asyncio.open_connection("127.0.0.1", node.rtmp_port)
        handshake = ClientHandshake(digest=False)
        writer.write(handshake.start())
        while not handshake.done:
            writer.write(handshake.feed(await reader.read(65536)))
        writer.write(connect_command()[:20])
        await writer.drain()
        writer.close()
        await asyncio.sleep(0.2)
        assert node.stats.connections["rtmp"] == 1  # only the publisher remains
        assert await viewer.tags(timeout=5)
        await viewer.close()
    finally:
        await stop_process(pub)


async def test_bad_http_requests_get_errors(node):
    for request, status in [
        (b"GET /live/nothing.flv HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
        (b"BREW /coffee HTTP/1.1\r\n\r\n", b"405"),
        (b"garbage\r\n\r\n", b"400"),
        (b"GET /" + b"a" * 20000, b"431"),
        (b"POST /api/streams HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", b"400"),
    ]:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.http_port)
        writer.write(request)
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line.split()[1] == status, (request[:30], line)
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", node.http_port)
    writer.write(b"OPTIONS /live/x.flv HTTP/1.1\r\nOrigin: http://shop\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"204" in head.split(b"\r\n")[0]
    assert b"Access-Control-Allow-Origin: *" in head
    writer.close()


async def test_stalled_viewer_is_cut_off_and_others_keep_up(node):
    """A viewer that stops reading loses frames, then the connection; memory stays bounded."""
    node.limits.viewer_queue_bytes = 64 * 1024
    node.limits.stall_timeout = 2.0
    pub = await start_ffmpeg_publisher(
        f"rtmp://127.0.0.1:{node.rtmp_port}/live/key2", seconds=60, size="1280x720"
    )
    try:
        await wait_live(node, "show2")
        # a stalled viewer: tiny receive buffer, never reads
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", node.http_port))
        sock.sendall(b"GET /live/show2.flv HTTP/1.1\r\nHost: x\r\n\r\n")
        healthy = await FlvHttpReader.open(node.http_port, "/live/show2.flv")
        stream = node.registry.get("show2")
        stalled_peer = f"127.0.0.1:{sock.getsockname()[1]}"
        stalled = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 40  # the kernel's socket buffers fill first
        while loop.time() < deadline:
            stalled = next((v for v in stream.viewers if v.peer() == stalled_peer and
                            v.tags_dropped), None)
            if stalled is not None:
                break
            await healthy.tags(timeout=5)
        assert stalled is not None, "the stalled viewer never started dropping frames"
        assert stalled.transport.get_write_buffer_size() < 1024 * 1024
        deadline = loop.time() + 15
        while stalled in stream.viewers and loop.time() < deadline:
            assert await healthy.tags(timeout=5)
        assert stalled not in stream.viewers, "stalled viewer was never disconnected"
        assert await healthy.tags(timeout=5)
        # /metrics counts both steps (engine/metrics.py reads these counters at scrape time)
        assert node.stats.keyframe_resyncs >= 1 and node.stats.viewers_cut_off == 1
        assert node.stats.tags_dropped >= stalled.tags_dropped > 0
        sock.close()
        await healthy.close()
    finally:
        await stop_process(pub)


# -- the healthy stream every attack test watches -----------------------------------------------

class Healthy:
    """ffmpeg publishing in real time and an HTTP-FLV viewer reading it in the background.

    ``kept_up(mark)`` is how much stream time the viewer received per second of wall time since
    ``mark``: about 1.0 for a viewer that keeps up, far less when an attack stalls the node.
    """

    def __init__(self, publisher, viewer: FlvHttpReader) -> None:
        self.publisher = publisher
        self.viewer = viewer
        self.last_ts = -1
        self.task = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, rtmp_port: int, http_port: int, key: str = "key1",
                    name: str = "show1") -> Healthy:
        publisher = await start_ffmpeg_publisher(
            f"rtmp://127.0.0.1:{rtmp_port}/live/{key}", seconds=120)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:  # live once the play URL answers 200 (works for a node in a subprocess)
            viewer = await FlvHttpReader.open(http_port, f"/live/{name}.flv")
            if viewer.status == 200:
                break
            await viewer.close()
            assert loop.time() < deadline, f"{name} never went live"
            await asyncio.sleep(0.1)
        healthy = cls(publisher, viewer)
        while healthy.last_ts < 0:
            assert loop.time() < deadline, "the healthy viewer got no video"
            await asyncio.sleep(0.05)
        return healthy

    async def _read(self) -> None:
        while True:
            tags = await self.viewer.tags(timeout=30)
            if not tags:
                return
            for type_id, timestamp, _payload in tags:
                if type_id == 9:
                    self.last_ts = max(self.last_ts, timestamp)

    def mark(self) -> tuple[float, int]:
        return asyncio.get_running_loop().time(), self.last_ts

    async def assert_kept_up(self, mark: tuple[float, int], window: float = 4.0) -> None:
        """The viewer received >= 90 % of real time since ``mark`` (over at least ``window`` s,
        so a frame's jitter is small beside it) and is still connected."""
        loop = asyncio.get_running_loop()
        while loop.time() - mark[0] < window:
            await asyncio.sleep(0.2)
        wall = loop.time() - mark[0]
        media = (self.last_ts - mark[1]) / 1000
        assert not self.task.done(), "the healthy viewer was disconnected"
        assert media >= 0.9 * wall, f"healthy viewer got {media:.1f} s of video in {wall:.1f} s"

    async def stop(self) -> None:
        self.task.cancel()
        await self.viewer.close()
        await stop_process(self.publisher)


@asynccontextmanager
async def running_node(**settings):
    node = MediaNode(node_settings(**settings))
    await node.start()
    healthy = None
    try:
        healthy = await Healthy.start(node.rtmp_port, node.http_port)
        yield node, healthy
    finally:
        if healthy is not None:
            await healthy.stop()
        await node.stop()


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 15) -> bool:
    """Reads until the server closes; False if it is still open after ``timeout`` s."""
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return False
    return True


def drop_lines(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if "dropping connection" in r.getMessage() and text in r.getMessage()]


# -- timeouts -------------------------------------------------------------------------------------

async def test_stuck_connections_time_out_and_the_healthy_stream_keeps_its_rate(caplog):
    caplog.set_level(logging.INFO, logger="watchbuy")
    async with running_node(handshake_timeout=1.5, partial_message_timeout=1.5,
                            idle_connection_timeout=4, publish_idle_timeout=2) as (node, healthy):
        mark = healthy.mark()
        # nothing at all after the TCP connect
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", node.rtmp_port)
        # a handshake, then no connect
        shaken = await RtmpClient.open("127.0.0.1", node.rtmp_port)
        # connected, then half a message that never completes
        partial = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
        partial.send_raw(chunk0(3, 20, os.urandom(100), length=1000))
        # connected, a stream created, then nothing: neither publishing nor playing
        idle = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
        await idle.call("createStream", None)
        # a publisher that sends one frame and goes silent (a hung encoder)
        hung = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
        await hung.publish("key2")
        hung.send_media(9, 0, bytes([0x17, 1, 0, 0, 0]) + os.urandom(100))
        await hung.drain()
        assert node.registry.get("show2") is not None

        for reader in (silent_r, shaken.reader, partial.reader, idle.reader, hung.reader):
            assert await closed_by_server(reader)
        # one line per kind: the two handshake timeouts come in one sweep, rate-limited
        for setting in ("HANDSHAKE_TIMEOUT", "PARTIAL_MESSAGE_TIMEOUT", "IDLE_CONNECTION_TIMEOUT",
                        "PUBLISH_IDLE_TIMEOUT"):
            assert len(drop_lines(caplog, "WATCHBUY_" + setting)) == 1, setting
        assert not [r for r in caplog.records if r.exc_info]
        # the hung publisher's stream ended, so its host can publish again at once
        assert node.registry.get("show2") is None
        again = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
        assert (await again.publish("key2"))["code"] == "NetStream.Publish.Start"
        assert node.stats.connections["rtmp"] == 2  # the healthy publisher and `again`
        await healthy.assert_kept_up(mark)
        await again.close()
        for client in (shaken, partial, idle, hung):
            await client.close()
        silent_w.close()


def test_bad_limit_settings_are_one_clear_error():
    for variable, value in [("WATCHBUY_PUBLISH_IDLE_TIMEOUT", "-1"),
                            ("WATCHBUY_HANDSHAKE_TIMEOUT", "nan"),
                            ("WATCHBUY_MAX_CONNECTIONS_PER_IP", "lots")]:
        with pytest.raises(ConfigError, match=variable):
            load_settings({variable: value})
    result = subprocess.run([sys.executable, "-m", "watchbuy", "media"], capture_output=True,
                            text=True, env={**os.environ, "WATCHBUY_FD_RESERVE": "-5"},
                            timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "WATCHBUY_FD_RESERVE" in result.stderr


# -- aggregates -----------------------------------------------------------------------------------

def aggregate(parts: list[tuple[int, int, bytes]]) -> bytes:
    """An aggregate message body: FLV-tag-like sub-messages, each with its back pointer."""
    out = b""
    for type_id, timestamp, body in parts:
        out += (bytes([type_id]) + len(body).to_bytes(3, "big") + (timestamp & 0xFFFFFF)
                .to_bytes(3, "big") + bytes([timestamp >> 24]) + b"\0\0\0" + body
                + (11 + len(body)).to_bytes(4, "big"))
    return out


def nested_aggregate(body: bytes, depth: int) -> bytes:
    payload = aggregate([(9, 0, body)])
    for _ in range(depth - 1):
        payload = aggregate([(22, 0, payload)])
    return payload


async def test_nested_aggregates_are_dropped_without_copies_or_recursion(caplog):
    """A 2 MB message nested 150 deep once peaked at +291 MB; 3000 deep hit the recursion limit
    with ~2000 log lines.  An aggregate inside an aggregate is now a protocol error."""
    caplog.set_level(logging.INFO, logger="watchbuy")
    async with running_node() as (node, healthy):
        mark = healthy.mark()
        for depth, size in ((150, 2_000_000), (3000, 1000)):
            caplog.clear()
            attacker = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
            await attacker.publish("key2")
            payload = nested_aggregate(bytes([0x17, 1, 0, 0, 0]) + bytes(size), depth)
            tracemalloc.start()
            try:
                attacker.send_raw(attacker.out.write(6, 0, 22, attacker.stream_id, payload))
                await attacker.drain()
                assert await closed_by_server(attacker.reader)
                _current, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            # the message itself is held while it is assembled (and once more by the client
            # writing it, in this process); no copy per level
            assert peak < 4 * len(payload) + 8_000_000, (depth, peak)
            lines = drop_lines(caplog, "aggregate message inside an aggregate")
            assert len(lines) == 1, caplog.text
            assert caplog.text.count("dropping connection") == 1
            assert not [r for r in caplog.records if r.exc_info]
            await attacker.close()
        await healthy.assert_kept_up(mark)


# -- connection caps ------------------------------------------------------------------------------

async def accepted(port: int, protocol: str) -> tuple[bool, asyncio.StreamWriter]:
    """Open a connection and tell whether the server kept it (it answers) or refused it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if protocol == "rtmp":
        writer.write(ClientHandshake(digest=False).start())
        want = 1 + 2 * 1536
    else:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        want = 12
    try:
        data = await asyncio.wait_for(reader.readexactly(want), 10)
        return bool(data), writer
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return False, writer


async def test_connections_per_address_are_capped_for_rtmp_and_http(caplog):
    caplog.set_level(logging.INFO, logger="watchbuy")
    cap = 12  # the healthy publisher and viewer hold two of them
    async with running_node(max_connections_per_ip=cap, per_ip_limit_loopback=True) as (
            node, healthy):
        mark = healthy.mark()
        kept = []
        for i in range(cap - 2):
            ok, writer = await accepted(node.rtmp_port if i % 2 else node.http_port,
                                        "rtmp" if i % 2 else "http")
            assert ok, i
            kept.append(writer)
        refused = []
        for i in range(30):
            ok, writer = await accepted(node.rtmp_port if i % 2 else node.http_port,
                                        "rtmp" if i % 2 else "http")
            assert not ok, i
            refused.append(writer)
        assert node.stats.connections_refused == 30
        lines = [r for r in caplog.records if "WATCHBUY_MAX_CONNECTIONS_PER_IP" in r.getMessage()]
        assert len(lines) == 1  # 30 refusals, one line (rate-limited)
        # a connection closed gives its place back
        kept.pop().close()
        for _ in range(100):
            if len(node.per_ip["127.0.0.1"]) < cap:
                break
            await asyncio.sleep(0.05)
        ok, writer = await accepted(node.http_port, "http")
        assert ok
        kept.append(writer)
        await healthy.assert_kept_up(mark)
        for writer in kept + refused:
            writer.close()
    # loopback is exempt by default: the tests and benchmarks open thousands from 127.0.0.1
    assert MediaNode(node_settings()).settings.per_ip_limit_loopback is False


async def test_exempt_networks_are_not_capped():
    """A CDN's edges bring thousands of viewers from a few addresses: ops exempt its ranges."""
    node = MediaNode(node_settings(max_connections_per_ip=2, per_ip_limit_loopback=True,
                                   per_ip_exempt=["10.0.0.0/8", "127.0.0.0/8"]))
    await node.start()
    try:
        kept = []
        for _ in range(6):
            ok, writer = await accepted(node.http_port, "http")
            assert ok
            kept.append(writer)
        assert node.stats.connections_refused == 0
        for writer in kept:
            writer.close()
    finally:
        await node.stop()
    with pytest.raises(ConfigError, match="WATCHBUY_PER_IP_EXEMPT"):
        load_settings({"WATCHBUY_PER_IP_EXEMPT": "10.0.0.0/8,not-a-network"})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def low_fd_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))
    return apply


async def test_connections_are_refused_before_the_open_file_limit(tmp_path):
    """A media node under a soft RLIMIT_NOFILE of 160 (so 96 connections after the reserve of
    64): connections past that are refused at once, with one log line, and the node goes on
    serving its healthy stream and accepting again once connections close."""
    rtmp_port, http_port = free_port(), free_port()
    env = {**os.environ, "WATCHBUY_RTMP_HOST": "127.0.0.1", "WATCHBUY_HTTP_HOST": "127.0.0.1",
           "WATCHBUY_RTMP_PORT": str(rtmp_port), "WATCHBUY_HTTP_PORT": str(http_port),
           "WATCHBUY_STREAM_KEYS": "key1=show1", "WATCHBUY_DATA_DIR": str(tmp_path),
           "WATCHBUY_NODE_ID": "fd-node", "WATCHBUY_WORKERS": "1"}  # one process's limit
    node = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "watchbuy", "media", env=env, preexec_fn=low_fd_limit(160),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    healthy = None
    writers = []
    try:
        for _ in range(200):  # until it listens
            try:
                _r, writer = await asyncio.open_connection("127.0.0.1", rtmp_port)
                writer.close()
                break
            except ConnectionRefusedError:
                assert node.returncode is None, "the media node exited"
                await asyncio.sleep(0.05)
        healthy = await Healthy.start(rtmp_port, http_port)
        mark = healthy.mark()
        results = []
        for _ in range(150):
            ok, writer = await accepted(http_port, "http")
            results.append(ok)
            writers.append(writer)
        # two connections are the healthy publisher's and viewer's
        # 96 allowed, two of them the healthy publisher's and viewer's (and perhaps one of the
        # connections that went before, not yet closed on the server side)
        first_refused = results.index(False)
        assert 92 <= first_refused <= 94, first_refused
        assert not any(results[first_refused:])
        await healthy.assert_kept_up(mark)
        for writer in writers:
            writer.close()
        writers = []
        for _ in range(100):
            ok, writer = await accepted(http_port, "http")
            writer.close()
            if ok:
                break
            await asyncio.sleep(0.05)
        assert ok, "no connection accepted after the others closed"
    finally:
        for writer in writers:
            writer.close()
        if healthy is not None:
            await healthy.stop()
        node.terminate()
        _out, err = await asyncio.wait_for(node.communicate(), 10)
    lines = [line for line in err.decode().splitlines() if "open-file limit" in line]
    assert len(lines) == 1, err.decode()[-2000:]
    assert "Traceback" not in err.decode()


# -- peer values in logs, replies and the stats API -----------------------------------------------

async def test_huge_peer_values_are_cut_short_in_logs_and_replies(caplog):
    caplog.set_level(logging.DEBUG, logger="watchbuy")
    async with running_node() as (node, healthy):
        mark = healthy.mark()
        for app in ("x" * 1_000_000, {"nested": ["y" * 100_000] * 10}):
            caplog.clear()
            client = await RtmpClient.open("127.0.0.1", node.rtmp_port)
            reply = await client.call("connect", {"app": app, "tcUrl": "rtmp://127.0.0.1/x"})
            assert reply[0] == "_error"
            assert reply[3]["code"] == "NetConnection.Connect.Rejected"
            assert len(reply[3]["description"]) < 150
            assert await closed_by_server(client.reader)
            assert caplog.records and max(len(r.getMessage()) for r in caplog.records) < 300
            await client.close()
        # an unknown command with a huge name: ignored, logged (at debug) in short
        caplog.clear()
        client = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
        client.command("z" * 500_000)
        assert (await client.call("createStream", None))[0] == "_result"
        assert max(len(r.getMessage()) for r in caplog.records) < 300
        await client.close()
        await healthy.assert_kept_up(mark)


async def test_publisher_metadata_is_bounded_and_stats_stay_valid_json(caplog):
    caplog.set_level(logging.INFO, logger="watchbuy")
    async with running_node() as (node, healthy):
        mark = healthy.mark()
        publisher = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
        await publisher.publish("key2")
        metadata = {"framerate": math.inf, "width": math.inf, "height": math.nan,
                    "nested": {"deep": list(range(1000))}, "encoder": "e" * 100_000}
        metadata.update({f"field{i}": float(i) for i in range(5000)})
        for _ in range(20):  # resent at will: one log line all the same
            publisher.send_metadata(metadata)
        await publisher.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while "field" not in str(node.registry.get("show2").metadata):
            assert loop.time() < deadline
            await asyncio.sleep(0.05)
        stream = node.registry.get("show2")
        assert len(stream.metadata) <= 65  # 64 fields of the publisher's and "server"
        assert "nested" not in stream.metadata and "encoder" not in stream.metadata
        assert len(stream.metadata_tag.payload) < 8192 + 64 * 20
        assert len([r for r in caplog.records if "metadata trimmed" in r.getMessage()]) == 1
        # the stats API: strict JSON (no Infinity/NaN), the bad numbers left out
        reader, writer = await asyncio.open_connection("127.0.0.1", node.http_port)
        writer.write(b"GET /api/streams HTTP/1.0\r\n\r\n")
        body = (await asyncio.wait_for(reader.read(), 10)).split(b"\r\n\r\n", 1)[1]
        writer.close()

        def no_constants(name):
            raise ValueError(f"not JSON: {name}")

        streams = json.loads(body, parse_constant=no_constants)["streams"]
        info = next(s for s in streams if s["name"] == "show2")
        assert info["fps"] is None and info["width"] is None and info["height"] is None
        await publisher.close()
        await healthy.assert_kept_up(mark)


# -- unfinished messages across the node ----------------------------------------------------------

async def test_unfinished_messages_are_capped_across_the_node(caplog):
    """Each connection stays under its own cap, but together they would hold the node's memory:
    the connection that asks for more than the node-wide budget is dropped, the others and the
    healthy stream go on, and the budget comes back when connections close."""
    caplog.set_level(logging.INFO, logger="watchbuy")
    async with running_node(node_partial_bytes=300_000,
                            partial_message_timeout=0) as (node, healthy):
        mark = healthy.mark()
        clients = []
        for _ in range(5):  # 100 KB each of a declared 1 MB command: the fourth is one too many
            client = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
            # one chunk can carry the 100 KB: the node holds exactly that much for this one
            client.send_raw(client.out.write(2, 0, 1, 0, struct.pack(">I", 1 << 20)))
            client.send_raw(chunk0(3, 20, os.urandom(100_000), length=1_000_000))
            await client.drain()
            clients.append(client)
        for _ in range(100):
            if sum(c.reader.at_eof() for c in clients) >= 2:
                break
            await asyncio.sleep(0.05)
        dropped = [c for c in clients if c.reader.at_eof()]
        assert len(dropped) == 2, "exactly the connections past the node's budget are dropped"
        assert node.partial_bytes <= 300_000
        assert len(drop_lines(caplog, "WATCHBUY_NODE_PARTIAL_BYTES")) == 1  # rate-limited
        for client in clients:
            await client.close()
        for _ in range(100):
            if node.partial_bytes == 0:
                break
            await asyncio.sleep(0.05)
        assert node.partial_bytes == 0, "closed connections give their share back"
        await healthy.assert_kept_up(mark)


async def test_amf_budgets_come_from_the_settings(caplog):
    """A connect that expands past WATCHBUY_AMF_MAX_NODES is refused with one line and no
    traceback; the same connect is answered by a node with the default budget."""
    caplog.set_level(logging.INFO, logger="watchbuy")
    command = {"app": "live", **{f"k{i}": float(i) for i in range(200)}}
    for budget, accepted in ((100, False), (None, True)):
        node = MediaNode(node_settings() if budget is None else node_settings(amf_max_nodes=budget))
        await node.start()
        try:
            client = await RtmpClient.open("127.0.0.1", node.rtmp_port)
            if accepted:
                assert (await client.call("connect", command))[0] == "_result"
            else:
                client.command("connect", command)
                assert await closed_by_server(client.reader)
                assert len(drop_lines(caplog, "values")) == 1
                assert not [r for r in caplog.records if r.exc_info]
            await client.close()
        finally:
            await node.stop()


# -- replies under backpressure -------------------------------------------------------------------

async def test_a_peer_that_never_reads_its_replies_is_cut_off(caplog):
    """Commands whose replies the peer never reads (ping requests, createStream) stop being
    read once our write buffer is full, and the peer is dropped after the drain time; the
    healthy stream keeps its rate and the node's memory does not follow the flood."""
    caplog.set_level(logging.INFO, logger="watchbuy")
    async with running_node(drain_timeout=1.0) as (node, healthy):
        mark = healthy.mark()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        flooder = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
        # A small receive buffer on our side, never read: the node's replies pile up there.
        flooder.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                           4096)
        ping = flooder.out.write(2, 0, 4, 0, struct.pack(">HI", 6, 1))  # user control: ping
        create = b"".join(flooder.out.write(3, 0, 20, 0, amf.encode_amf0(
            "createStream", float(n), None)) for n in range(100))
        sent = 0
        try:
            for _ in range(400):  # at most ~200 MB of requests, far more than any buffer holds
                flooder.writer.write(ping * 2000 + create)
                sent += 1
                await asyncio.wait_for(flooder.writer.drain(), 0.5)
        except (TimeoutError, ConnectionError):
            pass  # the node stopped reading us: our own send buffer filled up
        assert await closed_by_server(flooder.reader, timeout=15)
        assert sent < 400, "the node kept reading a peer that takes none of its replies"
        assert len(drop_lines(caplog, "WATCHBUY_DRAIN_TIMEOUT")) == 1
        assert not [r for r in caplog.records if r.exc_info]
        assert node.stats.timeouts["rtmp_drain"] == 1
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        assert grown_mb < 64, f"the node grew {grown_mb:.0f} MB"
        await healthy.assert_kept_up(mark)
        await flooder.close()
