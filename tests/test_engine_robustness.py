"""Bad input never takes the node down or disturbs other streams.

While ffmpeg publishes a healthy stream and an HTTP-FLV viewer watches it, attackers send random
bytes, truncated chunks, absurd chunk sizes and message lengths, unknown chunk streams and
malicious AMF.  Each attacker must get a clean disconnect and a log line; the viewer must keep
receiving the healthy stream throughout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct

import pytest
from conftest import FlvHttpReader, start_ffmpeg_publisher, stop_process, wait_live

from watchbuy.engine import _chunk_py
from watchbuy.engine.codecs import amf
from watchbuy.engine.handshake import ClientHandshake

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
            assert "dropping connection" in caplog.text, f"{name}: no log line"
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
        sock.close()
        await healthy.close()
    finally:
        await stop_process(pub)
