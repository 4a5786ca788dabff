"""Several site processes on one port (``watchbuy site --workers N``) and what they share.

* The per-user rate limit: one suite over both implementations (in this process, in Redis),
  then the chat limit held across two real site processes.
* The supervisor, with real processes, a real Redis and a real SQLite file: requests land on
  every worker, a room socket on one worker hears chat posted through another, a worker killed
  with SIGKILL comes back while the others keep answering, SIGTERM ends them all, and N > 1
  without Redis is refused before anything starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import websockets
from app_helpers import make_user, start_session
from worker_helpers import children, connection_owner

from watchbuy.db.database import Database
from watchbuy.site.ratelimit import RateLimiter, RedisRateLimiter, make_rate_limiter

pytest_plugins = ["site_fixtures"]


# -- the rate limit, both implementations ---------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def make_limiter(request):
    made: list = []

    def make(count: int, window: float):
        if request.param == "memory":
            limiter = RateLimiter(count, window)
        else:
            url = request.getfixturevalue("redis_url")
            # A prefix of its own per test: runs never see each other's counts.
            limiter = RedisRateLimiter(count, window, url, f"test-{uuid.uuid4().hex}:", "t")
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()


async def test_limit_refuses_past_the_count_per_key(make_limiter) -> None:
    limiter = make_limiter(3, 60.0)
    assert [await limiter.claim(7) for _ in range(5)] == [True, True, True, False, False]
    assert await limiter.claim(8)  # another key has its own count


async def test_limit_lets_in_again_once_the_window_has_moved(make_limiter) -> None:
    limiter = make_limiter(2, 0.3)
    assert await limiter.claim("k") and await limiter.claim("k")
    assert not await limiter.claim("k")
    await asyncio.sleep(0.45)
    assert await limiter.claim("k")


async def test_two_redis_limiters_share_one_count(redis_url) -> None:
    # Two processes' limiters on one Redis: the count is one, whichever answers.
    prefix = f"test-{uuid.uuid4().hex}:"
    # a generous timeout: this is about the shared count, and a loaded machine can take over
    # the production 1 s to connect (the fallback would then count in this process)
    first = RedisRateLimiter(4, 60.0, redis_url, prefix, "chat", timeout=10.0)
    second = RedisRateLimiter(4, 60.0, redis_url, prefix, "chat", timeout=10.0)
    try:
        results = [await (first if n % 2 else second).claim(1) for n in range(6)]
        assert results == [True] * 4 + [False] * 2
    finally:
        await first.close()
        await second.close()


async def test_redis_down_falls_back_to_this_process(caplog) -> None:
    # Nothing listens on port 1: the limit still holds, per process, with one warning.
    # its own name: the warning is rate-limited per limiter name across the process
    limiter = RedisRateLimiter(2, 60.0, "redis://127.0.0.1:1/0", "x:", "chat-down", timeout=0.5)
    try:
        assert [await limiter.claim(1) for _ in range(3)] == [True, True, False]
    finally:
        await limiter.close()
    warnings = [r for r in caplog.records if "kept in this process only" in r.getMessage()]
    assert len(warnings) == 1


def test_memory_limiter_forgets_idle_keys() -> None:
    limiter = RateLimiter(1, 0.3)
    for key in range(1000):
        limiter.allow(key)
    assert len(limiter) == 1000
    time.sleep(0.7)
    limiter.allow("late")
    assert len(limiter) == 1


def test_make_rate_limiter_follows_the_broker() -> None:
    assert isinstance(make_rate_limiter(5, 10.0, "", "w:", "chat"), RateLimiter)
    assert isinstance(make_rate_limiter(5, 10.0, "memory://", "w:", "chat"), RateLimiter)
    redis_limiter = make_rate_limiter(5, 10.0, "redis://127.0.0.1:6379/0", "w:", "chat")
    assert isinstance(redis_limiter, RedisRateLimiter)
    asyncio.run(redis_limiter.close())



# -- real processes: watchbuy site --workers 2 ----------------------------------------------------

CHAT_RATE = 4  # small, so the cross-process test sends few messages


def site_environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("WATCHBUY_")}
    env.update(WATCHBUY_ENV_FILE=os.devnull, WATCHBUY_DATA_DIR=str(tmp_path / "data"),
               WATCHBUY_DATABASE_URL=f"sqlite:///{tmp_path}/site.db",
               WATCHBUY_SITE_HOST="127.0.0.1", WATCHBUY_LOG_LEVEL="INFO",
               WATCHBUY_CHAT_RATE=str(CHAT_RATE))
    env.update(extra)
    return env


class WorkersSite:
    """``watchbuy site --workers 2 --port 0`` on a SQLite file and the test Redis."""

    def __init__(self, tmp_path: Path, redis_url: str) -> None:
        self.tmp_path = tmp_path
        self.database_url = f"sqlite:///{tmp_path}/site.db"
        self.log_path = tmp_path / "site.log"
        env = site_environment(
            tmp_path, WATCHBUY_BROKER_URL=redis_url, WATCHBUY_SITE_WORKERS="2",
            WATCHBUY_BROKER_PREFIX=f"test-{uuid.uuid4().hex}:",
            WATCHBUY_SITE_RESTART_DELAY="0.2", WATCHBUY_SITE_DRAIN_SECONDS="5")
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "watchbuy", "site", "--port", "0"], env=env,
            stdout=subprocess.PIPE, stderr=self.log_file, cwd=tmp_path)
        banner = self.process.stdout.readline().decode()  # type: ignore[union-attr]
        found = re.search(r"WatchBuy site on http://127\.0\.0\.1:(\d+) \(2 processes\)", banner)
        if found is None:
            self.stop()
            raise AssertionError(f"no banner: {banner!r}; log:\n{self.log()}")
        self.port = int(found.group(1))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> set[int]:
        """The supervisor's live child processes (the workers)."""
        return children(self.process.pid)

    async def get(self, path: str = "/metrics") -> tuple[int, int | None]:
        """The status of ``GET path`` on a new connection, and which worker answered it."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n\r\n".encode())
            status_line = await asyncio.wait_for(reader.readline(), 10.0)
            owner = connection_owner(self.port, writer.get_extra_info("sockname")[1],
                                     self.workers())
            return int(status_line.split()[1]), owner
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def until_both_workers_answer(self, timeout: float = 30.0) -> set[int]:
        """Requests on new connections until each of the two workers has answered one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        answered: set[int] = set()
        while len(answered) < 2:
            assert loop.time() < deadline, f"workers answering: {answered}; log:\n{self.log()}"
            with contextlib.suppress(OSError):
                status, owner = await self.get()
                if status == 200 and owner is not None:
                    answered.add(owner)
                    continue
            await asyncio.sleep(0.1)
        return answered

    async def socket_on(self, worker: int, slug: str, token: str | None = None):
        """A room websocket that the kernel gave to ``worker`` (new connections until one is)."""
        headers = {"Cookie": f"wb_session={token}"} if token else {}
        for _ in range(64):
            ws = await websockets.connect(f"ws://127.0.0.1:{self.port}/ws/room/{slug}",
                                          additional_headers=headers, open_timeout=10)
            if connection_owner(self.port, ws.local_address[1], {worker}) == worker:
                hello = json.loads(await asyncio.wait_for(ws.recv(), 10.0))
                assert hello["type"] == "hello"
                return ws
            await ws.close()
        raise AssertionError(f"no connection reached worker {worker}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # the workers notice their supervisor is gone and stop
            self.process.wait()
        self.log_file.close()


@pytest.fixture
def workers_site(tmp_path, redis_url):
    site = WorkersSite(tmp_path, redis_url)
    try:
        yield site
    finally:
        site.stop()


async def room_with_user(site: WorkersSite) -> tuple[str, str]:
    """A host's room and a viewer's session token, made in the site's database."""
    db = Database(site.database_url)
    await db.connect()
    try:
        host = await make_user(db, "Hana", host=True)
        viewer = await make_user(db, "Sam")
        return host["channel"]["slug"], await start_session(db, viewer)
    finally:
        await db.disconnect()


async def chat_answer(ws, text: str) -> str:
    """What the room answered a chat message sent on ``ws``: its text, once it came back to
    this socket, or the error.  (Other messages of the room are skipped.)"""
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), 10.0))
        if event["type"] == "error":
            return event["error"]
        if event["type"] == "chat" and event["text"] == text:
            return text


def test_several_workers_need_redis(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "watchbuy", "site", "--workers", "2", "--port", "0"],
        env=site_environment(tmp_path), capture_output=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == b""  # refused before anything started
    assert result.stderr.decode().splitlines() == [
        "watchbuy: configuration error: WATCHBUY_SITE_WORKERS=2 needs Redis: set "
        "WATCHBUY_BROKER_URL=redis://host:6379/0 (the processes share rooms, chat limits and "
        "hook nonces through it)"]
    assert not (tmp_path / "site.db").exists()


async def test_requests_reach_both_workers_and_chat_crosses_them(workers_site) -> None:
    site = workers_site
    first, second = sorted(await site.until_both_workers_answer())
    statuses = [(await site.get("/"))[0] for _ in range(20)]
    assert statuses == [200] * 20
    slug, token = await room_with_user(site)
    watcher = await site.socket_on(first, slug)  # anonymous, on one worker
    speaker = await site.socket_on(second, slug, token)  # logged in, on the other
    try:
        await speaker.send(json.dumps({"type": "chat", "text": "hello across"}))
        assert await chat_answer(watcher, "hello across") == "hello across"
    finally:
        await watcher.close()
        await speaker.close()


async def test_chat_rate_limit_holds_across_workers(workers_site) -> None:
    site = workers_site
    first, second = sorted(await site.until_both_workers_answer())
    slug, token = await room_with_user(site)
    sockets = [await site.socket_on(first, slug, token), await site.socket_on(second, slug, token)]
    try:
        answers = []
        for n in range(CHAT_RATE + 2):  # alternately through each worker
            ws = sockets[n % 2]
            await ws.send(json.dumps({"type": "chat", "text": f"message {n}"}))
            answers.append(await chat_answer(ws, f"message {n}"))
        # Per process, each worker would have let CHAT_RATE through (2 * CHAT_RATE in all).
        assert answers == [f"message {n}" for n in range(CHAT_RATE)] + \
            ["Slow down a little."] * 2
    finally:
        for ws in sockets:
            await ws.close()
    assert "over 4 chat messages" in site.log()


async def test_a_killed_worker_is_restarted_and_sigterm_stops_all(workers_site) -> None:
    site = workers_site
    before = await site.until_both_workers_answer()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    # Connections the kernel queued for the victim before it was gone die with it; once it is
    # gone the other worker keeps answering (the restarted one joins when it is ready): every
    # request gets its 200.
    for _ in range(100):
        if victim not in site.workers():
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"worker {victim} not reaped")
    statuses = [(await site.get())[0] for _ in range(20)]
    assert statuses == [200] * 20
    after = await site.until_both_workers_answer()
    assert victim not in after and len(after & before) == 1
    assert re.search(rf"site worker \d \(pid {victim}\) ended with signal 9: restarting",
                     site.log())
    # SIGTERM: requests in flight are answered, a request that never completes is cut at the
    # drain bound (5 s here), and every process ends, the supervisor with status 0.
    slug, _ = await room_with_user(site)
    viewer = await site.socket_on(min(after), slug)
    form = b"email=sam%40example.test&password=not-the-one"
    head = (f"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/"
            f"x-www-form-urlencoded\r\nContent-Length: {len(form)}\r\n\r\n").encode()
    in_flight = await asyncio.open_connection("127.0.0.1", site.port)
    stuck = await asyncio.open_connection("127.0.0.1", site.port)
    for _, writer in (in_flight, stuck):
        writer.write(head + form[:10])  # the body is still coming: the request is in flight
        await writer.drain()
    await asyncio.sleep(0.5)
    site.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(1.0)
    in_flight[1].write(form[10:])
    answer = await asyncio.wait_for(in_flight[0].read(), 10.0)
    assert answer.startswith(b"HTTP/1.1 ") and b"connection: close" in answer.lower()
    code = await asyncio.get_running_loop().run_in_executor(None, site.process.wait, 30)
    assert code == 0
    cut = await asyncio.wait_for(stuck[0].read(), 10.0)
    assert cut == b"" or cut.startswith(b"HTTP/1.1 500 ")  # cut at the bound, no hanging
    assert "timeout graceful shutdown exceeded" in site.log()
    assert "Traceback" not in site.log()  # one line for the cut, not a traceback
    for _, writer in (in_flight, stuck):
        writer.close()
    with pytest.raises(websockets.ConnectionClosed):  # closed by the draining worker
        while True:  # after the room's viewer counts, if any came first
            assert json.loads(await asyncio.wait_for(viewer.recv(), 10.0))["type"] == "viewers"
    for pid in after:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    with pytest.raises(OSError):
        await site.get()


async def test_serve_stays_one_process(tmp_path) -> None:
    # WATCHBUY_SITE_WORKERS in the environment (and no Redis) does not change `watchbuy serve`:
    # it starts, as one process with no children.
    from browser_helpers import free_port

    env = site_environment(tmp_path, WATCHBUY_SITE_WORKERS="3", PYTHONUNBUFFERED="1")
    del env["WATCHBUY_DATABASE_URL"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "watchbuy", "serve", "--rtmp-port", str(free_port()),
        "--http-port", str(free_port()), "--site-port", str(free_port()), "--agent-port",
        str(free_port()), env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        lines = []
        while not any("WatchBuy is up" in line for line in lines):
            line = (await asyncio.wait_for(process.stdout.readline(), 60.0)).decode()
            assert line, f"serve ended: {lines}"
            lines.append(line)
        children = set()
        for task in Path(f"/proc/{process.pid}/task").iterdir():
            children |= set((task / "children").read_text().split())
        assert children == set()
    finally:
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 30.0) == 0
