"""Fixtures for the shop site's tests: load with ``pytest_plugins = ["site_fixtures"]``.

* ``db_url`` runs a test twice: on a fresh SQLite file and on a real MariaDB server.  MariaDB
  gets one database per test session (``wb_test_<uuid hex>``, dropped at the end, so parallel
  runs never collide), emptied before each test; where no server answers the MariaDB half is
  skipped loudly, except in CI (``CI=true``) where it fails.  ``fresh_mariadb_url`` is a new,
  empty database of its own.
* ``make_site`` / ``site``: the app of ``create_app``, its lifespan entered (database connected
  and migrated, broker started); ``site.browser(user)`` is a visitor (see page_helpers.Browser).
* ``sync_site``: the same app under Starlette's TestClient, for websockets.
* ``stripe_api``: a local stand-in of Stripe's API, a real HTTP server on 127.0.0.1.
* ``redis_url``: the test Redis (mandatory in CI).
* ``redis_url_refusing_publish``: the test Redis as a user that may subscribe but whose every
  PUBLISH Redis refuses (NOPERM, a ResponseError): a process that hears but cannot announce.
* ``redis_hold``: a TCP relay to the test Redis (``.url``) that, between ``hold()`` and
  ``release()``, keeps what its clients send instead of passing it on (Redis blackholed for
  commands; nothing is lost, it is sent on release).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from app_helpers import FakeNode, Site, build_app, run_sync_site, site_settings
from server_helpers import (
    REDIS_URL,
    empty_mysql_database,
    fresh_mysql_database,
    mysql_url,
    redis_problem,
    require_server,
    skipped_servers,
)
from stripe_standin import StripeStandIn

from watchbuy.db.database import Database
from watchbuy.db.migrations import upgrade


def pytest_terminal_summary(terminalreporter) -> None:
    for what in sorted(skipped_servers):
        terminalreporter.write_line(
            f"!!! {what} did not answer: its tests were SKIPPED (mandatory in CI)",
            red=True, bold=True)


@pytest.fixture
def redis_url() -> str:
    require_server(redis_problem(), f"Redis at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture
def redis_url_refusing_publish(redis_url):
    import redis

    name = f"wb-test-nopublish-{uuid.uuid4().hex[:8]}"
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", name, "on", "nopass", "~*", "&*", "+@all",
                          "-publish")
    parts = urlsplit(redis_url)
    try:
        yield parts._replace(netloc=f"{name}:any@{parts.hostname}:{parts.port or 6379}").geturl()
    finally:
        admin.execute_command("ACL", "DELUSER", name)
        admin.close()


class RedisHold:
    """A relay to Redis on 127.0.0.1 that can stop passing on its clients' bytes."""

    def __init__(self, target: str) -> None:
        self.target = urlsplit(target)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.held = 0  # bytes kept back while holding (for the test to see it happened)
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = self.target._replace(netloc=f"127.0.0.1:{port}").geturl()

    def hold(self) -> None:
        self.flowing.clear()

    def release(self) -> None:
        self.flowing.set()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.target.hostname,
                                                             self.target.port or 6379)
        self._writers += [writer, up_writer]

        async def pump(source, sink, gated: bool) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    if gated and not self.flowing.is_set():
                        self.held += len(data)
                        await self.flowing.wait()
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))

    async def close(self) -> None:
        self.flowing.set()
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()


@pytest.fixture
async def redis_hold(redis_url):
    hold = RedisHold(redis_url)
    await hold.start()
    try:
        yield hold
    finally:
        await hold.close()


@pytest.fixture(scope="session")
def mariadb_database():
    """This test session's MariaDB database (created on first use, dropped at the end)."""
    with fresh_mysql_database() as name:
        yield name


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """A migrated SQLite file that each test copies (migrating costs ~0.3 s per test)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "watchbuy.db"

    async def migrate() -> None:
        db = Database(f"sqlite:///{path}")
        await db.connect()
        await upgrade(db)
        await db.disconnect()

    asyncio.run(migrate())
    return path


@pytest.fixture(params=["sqlite", "mariadb"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        template = request.getfixturevalue("sqlite_template")
        for suffix in ("", "-wal"):
            if Path(f"{template}{suffix}").exists():
                shutil.copy(f"{template}{suffix}", tmp_path / f"watchbuy.db{suffix}")
        return f"sqlite:///{tmp_path}/watchbuy.db"
    name = request.getfixturevalue("mariadb_database")
    empty_mysql_database(name)
    return mysql_url(name)


@pytest.fixture
def fresh_mariadb_url():
    with fresh_mysql_database() as name:
        yield mysql_url(name)


@pytest.fixture
async def make_site(db_url, tmp_path):
    """Factory of started apps on this test's database (several = several site processes)."""
    async with contextlib.AsyncExitStack() as stack:
        count = 0

        async def start(**overrides) -> Site:
            nonlocal count
            count += 1
            settings = site_settings(tmp_path / f"data{count}", db_url, **overrides)
            node = FakeNode()
            app = build_app(settings, node)
            await stack.enter_async_context(app.router.lifespan_context(app))
            return Site(app, settings, node, stack)

        yield start


@pytest.fixture
async def site(make_site) -> Site:
    return await make_site()


@pytest.fixture
def sync_site(db_url, tmp_path):
    with run_sync_site(tmp_path / "data", db_url) as running:
        yield running


@pytest.fixture(scope="session")
def stripe_api():
    """The stand-in, served by uvicorn on 127.0.0.1 (a random port) in a background thread."""
    import uvicorn

    stand_in = StripeStandIn()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(stand_in.app, log_level="warning", lifespan="off",
                                           access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the Stripe stand-in did not start")
        time.sleep(0.01)
    stand_in.url = f"http://127.0.0.1:{port}"
    yield stand_in
    server.should_exit = True
    thread.join(10)
    sock.close()


