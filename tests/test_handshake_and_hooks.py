"""Handshake (simple and digest), the HMAC-signed publish hook, and the settings/CLI errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
from conftest import node_settings

from watchbuy.engine.errors import HandshakeError
from watchbuy.engine.handshake import PACKET_SIZE, ClientHandshake, ServerHandshake
from watchbuy.engine.hooks import HttpHooks, PublishRefused, sign, verify
from watchbuy.engine.httpparse import HttpError, RequestParser
from watchbuy.engine.node import MediaNode
from watchbuy.settings import ConfigError, load_settings


@pytest.mark.parametrize("digest", [True, False])
def test_handshake_both_kinds_byte_by_byte(digest):
    client = ClientHandshake(digest=digest)
    server = ServerHandshake()
    reply = b"".join(server.feed(bytes([b])) for b in client.start())
    assert len(reply) == 1 + 2 * PACKET_SIZE
    assert server.digest_scheme == (0 if digest else None)
    c2 = client.feed(reply)  # verifies S1's digest and S2's signature when digest=True
    assert len(c2) == PACKET_SIZE
    assert server.feed(c2 + b"\x03chunks") == b""
    assert server.done and server.leftover == b"\x03chunks"


def test_handshake_refuses_other_versions():
    with pytest.raises(HandshakeError, match="0x06"):
        ServerHandshake().feed(b"\x06" + bytes(1536))


def test_tampered_s2_is_detected_by_the_client():
    client = ClientHandshake(digest=True)
    reply = bytearray(ServerHandshake().feed(client.start()))
    reply[-1] ^= 0xFF
    with pytest.raises(HandshakeError, match="S2"):
        client.feed(bytes(reply))


def test_signatures():
    now = time.time()
    ts = str(int(now))
    signature = sign("s3cret", ts, b"{}")
    assert verify("s3cret", ts, b"{}", signature, now=now)
    assert not verify("s3cret", ts, b"{ }", signature, now=now)
    assert not verify("other", ts, b"{}", signature, now=now)
    assert not verify("s3cret", ts, b"{}", signature, now=now + 3600)  # replayed later
    assert not verify("", ts, b"{}", signature, now=now)


async def hook_server(answers: dict[str, tuple[int, dict]], calls: list):
    """A real HTTP endpoint that checks our signature, as the site does."""

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        headers = dict(
            line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line
        )
        headers = {k.lower(): v for k, v in headers.items()}
        body = await reader.readexactly(int(headers["content-length"]))
        ok = verify("hook-secret", headers["x-watchbuy-timestamp"], body,
                    headers["x-watchbuy-signature"])
        payload = json.loads(body)
        calls.append((ok, payload))
        status, answer = answers.get(payload.get("key"), (404, {"error": "unknown key"}))
        if not ok:
            status, answer = 401, {"error": "bad signature"}
        data = json.dumps(answer).encode()
        writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (status, len(data), data))
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_http_publish_hook_names_the_stream_and_hears_publish_done():
    from watchbuy.engine.client import RtmpClient, RtmpError

    calls: list = []
    server = await hook_server({"good-key": (200, {"name": "alice-room"})}, calls)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks/rtmp"
    node = MediaNode(node_settings(stream_keys={}, publish_hook_url=url,
                                   hook_secret="hook-secret"))
    await node.start()
    try:
        client = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
        await client.publish("good-key?obs=1")
        assert node.registry.get("alice-room") is not None  # public name, never the key
        assert calls[0] == (True, {"call": "publish", "app": "live", "key": "good-key",
                                   "addr": "127.0.0.1", "node_id": "test-node"})
        await client.close()
        for _ in range(50):
            if len(calls) == 2:
                break
            await asyncio.sleep(0.05)
        assert calls[1][0] is True and calls[1][1]["call"] == "publish_done"
        assert calls[1][1]["name"] == "alice-room"
        assert node.registry.get("alice-room") is None

        bad = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
        with pytest.raises(RtmpError, match="Unauthorized"):
            await bad.publish("wrong-key")
        await bad.close()
    finally:
        await node.stop()
        server.close()


async def test_hook_with_wrong_secret_is_refused():
    calls: list = []
    server = await hook_server({"k": (200, {"name": "x"})}, calls)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    hooks = HttpHooks(url, "not-the-secret", "n1")
    with pytest.raises(PublishRefused, match="401"):
        await hooks.authorize("live", "k", "1.2.3.4")
    await hooks.close()
    server.close()


def test_request_parser_incremental():
    parser = RequestParser()
    data = b"GET /live/a.flv?x=1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\nGET /b HTTP/1.0\r\n\r\n"
    requests = []
    for i in range(len(data)):
        requests += parser.feed(data[i : i + 1])
    assert [(r.method, r.path, r.query, r.keep_alive) for r in requests] == [
        ("GET", "/live/a.flv", "x=1", False), ("GET", "/b", "", False)]
    with pytest.raises(HttpError):
        RequestParser().feed(b"GET nope\r\n\r\n")


def test_settings_from_env_and_file(tmp_path):
    env_file = tmp_path / "watchbuy.env"
    env_file.write_text("# node\nWATCHBUY_RTMP_PORT=2935\nWATCHBUY_STREAM_KEYS='a=one, b=two'\n")
    settings = load_settings({"WATCHBUY_ENV_FILE": str(env_file), "WATCHBUY_HTTP_PORT": "9000"})
    assert settings.rtmp_port == 2935 and settings.http_port == 9000
    assert settings.stream_keys == {"a": "one", "b": "two"}
    with pytest.raises(ConfigError, match="WATCHBUY_RTMP_PORT: expected a whole number"):
        load_settings({"WATCHBUY_RTMP_PORT": "lots"})
    with pytest.raises(ConfigError, match="WATCHBUY_HOOK_SECRET"):
        load_settings({"WATCHBUY_PUBLISH_HOOK_URL": "http://x/"})


def test_cli_bad_config_is_one_line_and_exit_1():
    proc = subprocess.run(
        [sys.executable, "-m", "watchbuy", "media"],
        env={"WATCHBUY_RTMP_PORT": "99999", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "WATCHBUY_RTMP_PORT" in proc.stderr
