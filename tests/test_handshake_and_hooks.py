"""Handshake (simple and digest), the HMAC-signed publish hook (the engine's side, and the
site's: signature, time window, one-use nonces on SQLite and MariaDB, in one process and across
processes sharing Redis), and the settings/CLI errors."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest
from conftest import node_settings
from hook_helpers import signed_hook

from watchbuy.db import queries
from watchbuy.engine.errors import HandshakeError
from watchbuy.engine.handshake import PACKET_SIZE, ClientHandshake, ServerHandshake
from watchbuy.engine.hooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    HttpHooks,
    PublishRefused,
    check_signature,
    sign,
    verify,
)
from watchbuy.engine.httpparse import HttpError, RequestParser
from watchbuy.engine.node import MediaNode
from watchbuy.settings import ConfigError, load_settings
from watchbuy.site.config import load_site_settings
from watchbuy.site.hooks import MemoryNonces, NonceStoreError, RedisNonces

pytest_plugins = ["site_fixtures"]


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
    # what any caller can send: never an exception (compare_digest raises on non-ASCII str,
    # int() on other scripts' digits)
    assert check_signature("s3cret", ts, b"{}", "é" * 64, now=now) == "bad signature"
    assert check_signature("s3cret", "²" * 3, b"{}", signature, now=now) == "bad signature"
    # the window: 300 s back, 30 s ahead (clocks of two machines differ a little, not more)
    assert verify("s3cret", ts, b"{}", signature, now=now + 299)
    assert verify("s3cret", ts, b"{}", signature, now=now - 29)
    assert check_signature("s3cret", ts, b"{}", signature, now=now - 31) == \
        "timestamp in the future"
    assert check_signature("s3cret", ts, b"{}", signature, now=now + 301) == "stale timestamp"
    assert check_signature("s3cret", ts, b"{}", signature, now=now - 31, max_future=60) == ""
    # the timestamp is only judged once the signature is ours
    assert check_signature("other", ts, b"{}", signature, now=now + 3600) == "bad signature"
    for bad in ("", "-5", "1e9", " 17", "9" * 40):
        assert check_signature("s3cret", bad, b"{}", sign("s3cret", bad, b"{}")) == \
            "bad signature"


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
        nonce = calls[0][1].pop("nonce")
        assert re.fullmatch(r"[0-9a-f]{32}", nonce)  # signed with the body: one use each
        assert calls[0] == (True, {"call": "publish", "app": "live", "key": "good-key",
                                   "addr": "127.0.0.1", "node_id": "test-node"})
        await client.close()
        for _ in range(50):
            if len(calls) == 2:
                break
            await asyncio.sleep(0.05)
        assert calls[1][0] is True and calls[1][1]["call"] == "publish_done"
        assert calls[1][1]["name"] == "alice-room" and calls[1][1]["nonce"] != nonce
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


async def test_a_recording_report_says_whether_sending_it_again_could_help():
    """engine/record.py retries a report while the hook answers False: unreachable, 5xx, 408
    and 429; a 2xx is taken and any other 4xx refused for good (sending it again would not
    change the answer)."""
    calls: list = []
    answers = {"taken": (200, {"ok": True}), "bad": (400, {"error": "bad field"}),
               "busy": (503, {}), "slow": (429, {}), "late": (408, {})}
    server = await hook_server(answers, calls)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks/rtmp"
    hooks = HttpHooks(url, "hook-secret", "n1")
    try:
        results = {key: await hooks.recording("recording_ready", "live", key, {"name": "s"})
                   for key in answers}
        assert results == {"taken": True, "bad": True, "busy": False, "slow": False,
                           "late": False}
        assert all(ok and payload["call"] == "recording_ready" for ok, payload in calls)
    finally:
        await hooks.close()
        server.close()
    await server.wait_closed()
    gone = HttpHooks(url, "hook-secret", "n1")  # nothing listens there now
    assert await gone.recording("recording_ready", "live", "taken", {"name": "s"}) is False
    await gone.close()


# -- the site's side: the engine's own calls, refused when replayed -----------------------------
class Recording(httpx.AsyncBaseTransport):
    """The engine's hook client's transport into the site app, keeping every request sent."""

    def __init__(self, app) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.inner.handle_async_request(request)


async def send_again(app, request: httpx.Request) -> httpx.Response:
    """What an eavesdropper who captured ``request`` sends: the same bytes and headers."""
    headers = {name: request.headers[name]
               for name in ("content-type", TIMESTAMP_HEADER, SIGNATURE_HEADER)}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        return await client.post(str(request.url), content=request.content, headers=headers)


async def post_hook(app, call: dict) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        return await client.post("http://site/hooks/rtmp", content=call["content"],
                                 headers=call["headers"])


def engine_hooks(site, transport: Recording) -> HttpHooks:
    return HttpHooks("http://site/hooks/rtmp", site.settings.hook_secret, "node-a",
                     transport=transport)


async def is_live(site, slug: str) -> bool:
    return bool((await queries.channel_by_slug(site.db, slug))["is_live"])


async def test_engine_hook_calls_pass_once_and_their_replays_are_refused(make_site):
    site = await make_site()
    host = await site.user("Hana", host=True)
    key, slug = host["channel"]["stream_key"], host["channel"]["slug"]
    sent = Recording(site.app)
    hooks = engine_hooks(site, sent)
    try:
        assert await hooks.authorize("live", key, "10.0.0.9") == slug  # a fresh call passes
        assert await is_live(site, slug)
        await hooks.publish_done("live", key, slug)
        assert not await is_live(site, slug)
    finally:
        await hooks.close()
    publish, done = sent.requests
    # the captured "publish", sent again within its window: refused, the room stays offline
    replayed = await send_again(site.app, publish)
    assert replayed.status_code == 409 and replayed.json() == {"error": "replayed hook call"}
    assert not await is_live(site, slug)
    assert (await send_again(site.app, done)).status_code == 409
    # a nonce is one-use whatever the rest of the call says
    nonce = json.loads(publish.content)["nonce"]
    again = signed_hook(site.settings.hook_secret, {"call": "publish", "app": "live", "key": key,
                                                    "node_id": "node-a", "nonce": nonce})
    assert (await post_hook(site.app, again)).status_code == 409
    # a signed call without a usable nonce is refused as well
    for bad in (None, "", "short", "x" * 129, "not/url-safe-but-long-enough", 12345678901234567):
        call = signed_hook(site.settings.hook_secret, {"call": "publish", "app": "live",
                                                       "key": key, "nonce": bad})
        response = await post_hook(site.app, call)
        assert response.status_code == 400, bad
        assert response.json() == {"error": "hook call without a nonce"}
    assert not await is_live(site, slug)


async def test_timestamps_from_the_future_are_refused_beyond_the_skew(make_site):
    site = await make_site()
    host = await site.user("Hana", host=True)
    publish = {"call": "publish", "app": "live", "key": host["channel"]["stream_key"],
               "node_id": "node-a"}
    secret = site.settings.hook_secret
    ahead = await post_hook(site.app, signed_hook(secret, publish, int(time.time()) + 120))
    assert ahead.status_code == 401 and ahead.json() == {"error": "timestamp in the future"}
    stale = await post_hook(site.app, signed_hook(secret, publish, int(time.time()) - 400))
    assert stale.status_code == 401 and stale.json() == {"error": "stale timestamp"}
    assert not await is_live(site, host["channel"]["slug"])
    # a node whose clock is a little ahead is not refused
    slightly = await post_hook(site.app, signed_hook(secret, publish, int(time.time()) + 10))
    assert slightly.status_code == 200 and slightly.json() == {"name": host["channel"]["slug"]}


async def test_a_replay_to_another_site_process_is_refused_through_redis(make_site, redis_url):
    a = await make_site(broker_url=redis_url)
    b = await make_site(broker_url=redis_url)  # another process: same database, same Redis
    assert b.settings.hook_secret != a.settings.hook_secret
    b.settings.hook_secret = a.settings.hook_secret  # one deployment: one secret
    host = await a.user("Hana", host=True)
    key, slug = host["channel"]["stream_key"], host["channel"]["slug"]
    sent = Recording(a.app)
    hooks = engine_hooks(a, sent)
    try:
        assert await hooks.authorize("live", key, "10.0.0.9") == slug
        await hooks.publish_done("live", key, slug)
    finally:
        await hooks.close()
    replayed = await send_again(b.app, sent.requests[0])
    assert replayed.status_code == 409 and replayed.json() == {"error": "replayed hook call"}
    assert not await is_live(b, slug)
    # and a fresh call reaches B as usual
    call = signed_hook(a.settings.hook_secret, {"call": "publish", "app": "live", "key": key,
                                                "node_id": "node-a"})
    assert (await post_hook(b.app, call)).json() == {"name": slug}


async def test_a_full_nonce_store_refuses_and_a_flood_is_logged_once(make_site, caplog):
    site = await make_site(hook_nonce_capacity=2)
    host = await site.user("Hana", host=True)
    publish = {"call": "publish", "app": "live", "key": host["channel"]["stream_key"],
               "node_id": "node-a"}
    secret = site.settings.hook_secret
    for _ in range(2):
        assert (await post_hook(site.app, signed_hook(secret, publish))).status_code == 200
    with caplog.at_level(logging.WARNING, logger="watchbuy.site.hooks"):
        full = await post_hook(site.app, signed_hook(secret, publish))
        assert full.status_code == 503 and full.json() == {"error": "replay check unavailable"}
        for _ in range(50):  # forgeries: refused, one line for them all
            assert (await post_hook(site.app, signed_hook("guess", publish))).status_code == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "watchbuy.site.hooks"]
    assert len(lines) == 1 and "WATCHBUY_HOOK_NONCE_CAPACITY" in lines[0]


async def test_memory_nonces_expire_after_their_window():
    nonces = MemoryNonces(ttl=0.05, capacity=2)
    assert await nonces.claim("a" * 16) and not await nonces.claim("a" * 16)
    assert await nonces.claim("b" * 16)
    with pytest.raises(NonceStoreError):
        await nonces.claim("c" * 16)
    await asyncio.sleep(0.1)  # past the window: the old ones make room (and may be reused)
    assert await nonces.claim("c" * 16) and await nonces.claim("a" * 16) and len(nonces) == 2


async def test_redis_nonces_unreachable_is_an_error_not_a_pass():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    nonces = RedisNonces(f"redis://127.0.0.1:{closed}/0", "wbtest:", ttl=330)
    with pytest.raises(NonceStoreError, match="Redis"):
        await nonces.claim("a" * 32)


def test_hook_window_settings():
    base = {"WATCHBUY_ENV_FILE": os.devnull, "WATCHBUY_SECRET_KEY": "k",
            "WATCHBUY_HOOK_SECRET": "h"}
    settings = load_site_settings({**base, "WATCHBUY_HOOK_MAX_AGE": "120",
                                   "WATCHBUY_HOOK_MAX_FUTURE": "5",
                                   "WATCHBUY_HOOK_NONCE_CAPACITY": "50"})
    assert (settings.hook_max_age, settings.hook_max_future, settings.hook_nonce_capacity) == \
        (120, 5, 50)
    for name, value in [("WATCHBUY_HOOK_MAX_AGE", "0"), ("WATCHBUY_HOOK_MAX_FUTURE", "-1"),
                        ("WATCHBUY_HOOK_MAX_FUTURE", "400"), ("WATCHBUY_HOOK_NONCE_CAPACITY", "0")]:
        with pytest.raises(ConfigError, match=name):
            load_site_settings({**base, name: value})


def test_request_parser_incremental():
    parser = RequestParser()
    data = b"GET /live/a.flv?x=1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\nGET /b HTTP/1.0\r\n\r\n"
    requests = []
    for i in range(len(data)):
        requests += parser.feed(data[i : i + 1])
    assert [(r.method, r.path, r.query, r.keep_alive) for r in requests] == [
        ("GET", "/live/a.flv", "x=1", False), ("GET", "/b", "", False)]
    # A malformed head is an event (the last one), not an exception: requests before it keep
    # their answers.
    events = RequestParser().feed(b"GET nope\r\n\r\n")
    assert len(events) == 1 and isinstance(events[0], HttpError) and events[0].status == 400


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
