"""The site's HTTP hardening: bodies, CSRF without buffering, connection limits, headers, cookies.

ASGI-level tests run the app on SQLite and MariaDB (``site`` fixture); the connection-level
ones run the real uvicorn server of ``watchbuy site`` (site/cli.py ``uvicorn_server``) on a
loopback port with raw sockets, because the limits they check live below the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import anyio
import httpx
import pytest
from app_helpers import make_user, site_settings, table_counts
from page_helpers import csrf_from_html, log_in
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from watchbuy.db.database import Database
from watchbuy.logs import LogLimiter
from watchbuy.settings import ConfigError
from watchbuy.site import security
from watchbuy.site.cli import uvicorn_server
from watchbuy.site.config import load_site_settings
from watchbuy.site.security import CsrfFieldScanner

pytest_plugins = ["site_fixtures"]

TEMPLATES = Path(__file__).resolve().parent.parent / "site" / "templates"
STATIC_JS = Path(__file__).resolve().parent.parent / "site" / "static" / "js"


# -- driving the ASGI app directly: how much of a body did the site pull? -----------------------


class Upload:
    """A request body handed to the app chunk by chunk, counting what the app pulled."""

    def __init__(self, body: bytes, chunk: int = 16 * 1024, stall: bool = False) -> None:
        self.chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
        self.pulled = 0
        self.stall = stall  # after the chunks, wait forever (a client that stopped sending)

    async def receive(self) -> dict:
        if self.chunks:
            chunk = self.chunks.pop(0)
            self.pulled += len(chunk)
            return {"type": "http.request", "body": chunk,
                    "more_body": bool(self.chunks) or self.stall}
        await anyio.sleep_forever() if self.stall else None
        return {"type": "http.disconnect"}


async def call_app(app, method: str, path: str, headers: dict[str, str],
                   upload: Upload) -> tuple[int, dict[str, str], bytes]:
    sent: list[dict] = []

    async def send(message) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "scheme": "http", "server": ("testserver", 80),
             "client": ("127.0.0.1", 5000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    with anyio.fail_after(20):
        await app(scope, upload.receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def multipart(fields: list[tuple[str, bytes]], boundary: str = "wbtestboundary") -> bytes:
    parts = []
    for name, value in fields:
        extra = '; filename="x.png"\r\nContent-Type: image/png' if name == "image" else ""
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}'
                     f"\r\n\r\n".encode() + value + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


MULTIPART = "multipart/form-data; boundary=wbtestboundary"
FORM = "application/x-www-form-urlencoded"


# -- 1. no bodies on GET/HEAD/OPTIONS ------------------------------------------------------------


async def test_head_with_a_form_body_creates_nothing(site):
    host = await site.user("Hana", host=True)
    browser = await site.browser(host)
    await browser.get("/studio/products/new")
    before = await table_counts(site.db)
    form = {"csrf_token": browser.csrf, "name": "Sneaky", "price": "1", "stock": "1",
            "description": ""}
    for method in ("HEAD", "GET", "OPTIONS"):
        response = await browser.http.request(method, "/studio/products/new", data=form)
        assert response.status_code == 400, method
    # a chunked body (no Content-Length) is refused alike
    async def chunked():
        yield b"email=a"

    response = await browser.http.request("HEAD", "/login", content=chunked())
    assert response.status_code == 400
    assert await table_counts(site.db) == before


async def test_a_safe_request_never_reads_a_body(site):
    # No Content-Length, no Transfer-Encoding: the app must not pull anything from receive().
    # (HEAD /login still runs the log-in handler's POST branch on an empty form until its
    # method check is fixed; what matters here is that no body reaches it.)
    for method, path in (("HEAD", "/login"), ("GET", "/"), ("OPTIONS", "/studio/key")):
        upload = Upload(b"email=a%40b.c&password=x" * 1000)
        await call_app(site.app, method, path, {}, upload)
        assert upload.pulled == 0, (method, path)


# -- 2. CSRF before buffering; every body bounded ------------------------------------------------


@pytest.mark.parametrize("kind", ["urlencoded", "multipart"])
async def test_a_post_without_a_token_is_refused_after_a_bounded_prefix(site, kind):
    scan = site.settings.csrf_scan_bytes
    if kind == "urlencoded":
        body = b"name=" + b"x" * (200 * 1024) + b"&csrf_token=late"
        content_type = FORM
    else:
        body = multipart([("image", b"\0" * (4 * 1024 * 1024)), ("csrf_token", b"late")])
        content_type = MULTIPART
    upload = Upload(body)
    status, _, _ = await call_app(site.app, "POST", "/studio/products/new",
                                  {"content-type": content_type,
                                   "cookie": "wb_csrf=" + "c" * 32}, upload)
    assert status == 403
    assert upload.pulled <= scan + 16 * 1024, upload.pulled  # not the whole upload


async def test_a_header_token_is_checked_before_any_body_is_read(site):
    upload = Upload(b"x" * (100 * 1024))
    status, _, _ = await call_app(site.app, "POST", "/cart/add",
                                  {"content-type": "application/json", "x-csrf-token": "f" * 64,
                                   "cookie": "wb_csrf=" + "c" * 32}, upload)
    assert status == 403 and upload.pulled == 0


async def test_tokens_with_non_ascii_characters_are_refused_not_a_server_error(site):
    # compare_digest raises TypeError on a str with non-ASCII characters: a 500 for anyone
    for headers, body in (({"x-csrf-token": "é" * 64}, b""),
                          ({"content-type": "application/x-www-form-urlencoded"},
                           b"csrf_token=%C3%A9%C3%A9&quantity=1")):
        status, _, _ = await call_app(site.app, "POST", "/cart/add",
                                      {**headers, "cookie": "wb_csrf=" + "c" * 32}, Upload(body))
        assert status == 403


async def test_a_token_first_in_a_large_upload_lets_it_through(site):
    host = await site.user("Hana", host=True)
    browser = await site.browser(host)
    await browser.get("/studio/products/new")
    response = await browser.post("/studio/products/new", {
        "name": "Big picture", "description": "", "price": "5", "stock": "2"},
        files={"image": ("big.png", b"\0" * (site.settings.csrf_scan_bytes * 3), "image/png")})
    # refused or not as the image check decides, but never for the token
    assert response.status_code != 403


async def test_missing_cookie_with_a_valid_looking_token_is_refused(site):
    browser = await site.browser()
    await browser.get("/login")
    browser.http.cookies.clear()
    response = await browser.post("/login", {"email": "a@b.c", "password": "x"})
    assert response.status_code == 403


async def test_every_body_is_bounded(site):
    limit = site.settings.max_body_bytes
    # declared too large: refused before a byte is read (even on the CSRF-exempt hooks)
    upload = Upload(b"{}" * limit)
    status, _, _ = await call_app(site.app, "POST", "/hooks/rtmp",
                                  {"content-type": "application/json",
                                   "content-length": str(2 * limit)}, upload)
    assert status == 413 and upload.pulled == 0
    # undeclared (chunked): refused once the limit is crossed, not after the whole body
    upload = Upload(b"x" * (20 * limit))
    status, _, _ = await call_app(site.app, "POST", "/hooks/rtmp",
                                  {"content-type": "application/json"}, upload)
    assert status == 413 and upload.pulled <= limit + 16 * 1024


async def test_a_trickled_body_times_out(make_site):
    site = await make_site(body_timeout=0.3)
    upload = Upload(b"x" * 100, stall=True)
    status, _, body = await call_app(site.app, "POST", "/hooks/rtmp",
                                     {"content-type": "application/json"}, upload)
    assert status == 408 and b"in time" in body


def test_csrf_field_scanner_is_incremental():
    token = "ab" * 32
    for body, content_type in [
        (f"csrf_token={token}&name=mug".encode(), FORM),
        (f"name=mug&csrf_token={token}".encode(), FORM),
        (multipart([("csrf_token", token.encode()), ("image", b"\0" * 5000)]), MULTIPART),
    ]:
        scanner = CsrfFieldScanner(content_type, limit=1024)
        results = [scanner.feed(body[i : i + 1]) for i in range(len(body))]
        found = next((r for r in results if r is not None), None) or scanner.finish()
        assert found == token
    scanner = CsrfFieldScanner(FORM, limit=1024)
    assert scanner.feed(b"csrf_token=" + token[:10].encode()) is None  # not complete yet
    assert scanner.finish() == token[:10]
    scanner = CsrfFieldScanner(FORM, limit=1024)
    assert scanner.feed(b"name=" + b"x" * 2000) == ""  # not within the prefix: absent
    scanner = CsrfFieldScanner(MULTIPART, limit=1024)
    assert scanner.feed(multipart([("image", b"\0" * 2000)])) == ""


async def test_read_form_limits_files_and_fields(tmp_path):
    from types import SimpleNamespace

    from watchbuy.site.web import read_form

    async def handler(request: Request) -> PlainTextResponse:
        form = await read_form(request)
        return PlainTextResponse(str(len(form)))

    app = Starlette(routes=[Route("/", handler, methods=["POST"])])
    app.state.settings = SimpleNamespace(max_body_bytes=1024)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://testserver") as client:
        one = await client.post("/", files={"image": ("a.png", b"1")}, data={"name": "mug"})
        assert one.status_code == 200 and one.text == "2"
        two = await client.post("/", files=[("image", ("a.png", b"1")),
                                            ("image", ("b.png", b"2"))])
        assert two.status_code == 400
        big_field = await client.post("/", files={"image": ("a.png", b"1")},
                                      data={"description": "x" * 2048})
        assert big_field.status_code == 400


def test_refusals_are_logged_without_flooding(caplog):
    log = LogLimiter(security.log, interval=60.0)
    with caplog.at_level("WARNING", logger=security.log.name):
        for _ in range(1000):
            log.warning("k", "refused %s", "x")
    assert len(caplog.records) == 1 and caplog.records[0].getMessage() == "refused x"


# -- 4, 5. Cache-Control and security headers ----------------------------------------------------


async def test_personal_pages_are_never_cached_static_files_set_no_cookie(site, tmp_path):
    host = await site.user("Hana", host=True)
    browser = await site.browser(host)
    studio = await browser.get("/studio")
    assert studio.status_code == 200
    assert studio.headers["cache-control"] == "private, no-store"
    anonymous = await site.browser()
    first = await anonymous.get("/")
    assert "set-cookie" in first.headers and "no-store" in first.headers["cache-control"]
    again = await anonymous.get("/")  # the csrf cookie is known now: public and cacheable
    assert "set-cookie" not in again.headers and "no-store" not in \
        again.headers.get("cache-control", "")
    upload = site.settings.uploads_dir / "pic.png"
    upload.write_bytes(b"\x89PNG")
    for url in ("/static/css/site.css", "/uploads/pic.png"):
        response = await browser.get(url)  # a logged-in visitor without a csrf cookie yet
        assert response.status_code == 200, url
        assert "set-cookie" not in response.headers, url
        assert "no-store" not in response.headers.get("cache-control", ""), url
        assert response.headers["x-content-type-options"] == "nosniff", url


async def test_pages_carry_the_security_headers(site):
    browser = await site.browser()
    response = await browser.get("/")
    headers = response.headers
    csp = headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert "'unsafe-inline'" not in csp
    node = f"http://{site.settings.public_host}:{site.settings.http_port}"
    assert re.search(r"media-src 'self' blob: [^;]*" + re.escape(node), csp)
    assert re.search(r"connect-src 'self' ws://[^;]*" + re.escape(node), csp)
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "strict-origin-when-cross-origin"
    assert "camera=()" in headers["permissions-policy"]
    assert "strict-transport-security" not in headers  # http: no HSTS
    refused = await browser.post("/logout", {}, csrf=False)
    assert refused.status_code == 403 and "frame-ancestors" in \
        refused.headers["content-security-policy"]


async def test_a_room_on_another_node_may_play_from_it(site):
    host = await site.user("Hana", host=True)
    browser = await site.browser()

    async def elsewhere(node_id, slug):
        return f"http://10.1.2.3:8000/live/{slug}.flv"

    site.app.state.media.play_url = elsewhere
    response = await browser.get(f"/room/{host['channel']['slug']}")
    assert "http://10.1.2.3:8000" in response.headers["content-security-policy"]


def test_templates_and_scripts_need_no_unsafe_inline():
    for page in TEMPLATES.glob("*.html"):
        html = page.read_text()
        for match in re.finditer(r"<script\b([^>]*)>(.*?)</script>", html, re.S):
            attributes, code = match.groups()
            assert 'type="application/json"' in attributes or \
                ("src=" in attributes and not code.strip()), f"inline script in {page.name}"
        assert not re.search(r"\son[a-z]+\s*=", html), f"inline handler in {page.name}"
        assert not re.search(r"\sstyle\s*=", html), f"inline style in {page.name}"
    for script in STATIC_JS.glob("*.js"):
        code = script.read_text()
        assert not re.search(r"\bon[a-z]+=|style=|\beval\(|new Function", code), script.name


# -- 6. cookies: Secure and __Host- on https, the token bound to the session ---------------------


async def test_https_public_url_makes_cookies_secure_and_host_prefixed(make_site):
    site = await make_site(public_url="https://shop.example.test", test_payments=True)
    assert site.settings.cookie_secure
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=site.app),
                                 base_url="https://testserver") as client:
        response = await client.get("/login")
        cookie = response.headers["set-cookie"]
        assert cookie.startswith("__Host-wb_csrf=") and "Secure" in cookie and \
            "Path=/" in cookie and "Domain" not in cookie
        assert response.headers["strict-transport-security"].startswith("max-age=")
        token = csrf_from_html(response.text)
        assert (await client.post("/logout", data={"csrf_token": token})).status_code == 303
        # the plain name is not read on https (a sibling subdomain could plant it)
        client.cookies.clear()
        client.cookies.set("wb_csrf", "c" * 32)
        refused = await client.post("/logout", data={
            "csrf_token": security.csrf_token_for(site.settings.secret_key, "c" * 32)})
        assert refused.status_code == 403


async def test_a_token_from_one_session_does_not_work_in_another(site):
    alice, bob = await site.user("Alice"), await site.user("Bob")
    a = await site.browser(alice)
    await a.get("/cart")
    b = await site.browser(bob)
    # Bob's browser gets Alice's csrf cookie planted and posts Alice's token: refused.
    b.http.cookies.set(security.CSRF_COOKIE, a.http.cookies.get(security.CSRF_COOKIE))
    refused = await b.post("/logout", {"csrf_token": a.csrf}, csrf=False)
    assert refused.status_code == 403
    assert (await a.post("/logout", {})).status_code == 303


async def test_logging_in_rotates_the_csrf_cookie(site):
    user = await site.user("Alice")
    browser = await site.browser()
    await browser.get("/login")
    before_cookie = browser.http.cookies.get(security.CSRF_COOKIE)
    anonymous_token = browser.csrf
    response = await log_in(browser, user["email"])
    assert response.status_code == 303
    after_cookie = browser.http.cookies.get(security.CSRF_COOKIE)
    assert after_cookie and after_cookie != before_cookie
    refused = await browser.post("/logout", {"csrf_token": anonymous_token}, csrf=False)
    assert refused.status_code == 403


def test_bad_limit_settings_are_one_clear_error():
    with pytest.raises(ConfigError, match="WATCHBUY_WS_MAX_BYTES"):
        load_site_settings(environ={"WATCHBUY_ENV_FILE": "/dev/null",
                                    "WATCHBUY_WS_MAX_BYTES": "0"}, data_dir="/tmp")
    with pytest.raises(ConfigError, match="WATCHBUY_HEADER_TIMEOUT"):
        load_site_settings(environ={"WATCHBUY_ENV_FILE": "/dev/null",
                                    "WATCHBUY_HEADER_TIMEOUT": "soon"}, data_dir="/tmp")


# -- 3. the real server: header size and time, stalled bodies, websockets, proxies ---------------


@contextlib.contextmanager
def serve(app, settings):
    """``uvicorn_server(app, settings)`` on a free loopback port in a thread; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn_server(app, settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the site did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@pytest.fixture
def live_site(sqlite_template, tmp_path):
    """The real site (SQLite) under its real uvicorn server; yields (port, settings, host)."""
    shutil.copy(sqlite_template, tmp_path / "watchbuy.db")
    url = f"sqlite:///{tmp_path}/watchbuy.db"

    async def prepare() -> dict:
        db = Database(url)
        await db.connect()
        try:
            return await make_user(db, "Hana", host=True)
        finally:
            await db.disconnect()

    host = asyncio.run(prepare())

    @contextlib.contextmanager
    def start(**overrides):
        from app_helpers import build_app

        settings = site_settings(tmp_path / "data", url, **overrides)
        with serve(build_app(settings), settings) as port:
            yield port, settings, host

    return start


def connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    return conn


def read_all(conn: socket.socket) -> bytes:
    """Everything until the server closes (the socket timeout bounds the wait)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := conn.recv(65536):
            data += chunk
    return data


def get_ok(port: int) -> bool:
    with connect(port) as conn:
        conn.sendall(b"GET /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return read_all(conn).startswith(b"HTTP/1.1 200")


def test_an_oversized_or_slow_request_head_is_refused(live_site):
    with live_site(header_timeout=0.5) as (port, settings, _):
        with connect(port) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                for _ in range(64):  # 4 MiB of headers, far over the limit
                    conn.sendall(b"X-Big: " + b"a" * 65536 + b"\r\n")
            assert read_all(conn).startswith(b"HTTP/1.1 431")
        with connect(port) as conn:  # half a head, then nothing
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            assert read_all(conn).startswith(b"HTTP/1.1 408")
        with connect(port) as conn:  # connects and sends nothing at all
            assert read_all(conn) in (b"", b"HTTP/1.1 408 Request timeout\r\n"
                                      b"content-type: text/plain; charset=utf-8\r\n"
                                      b"content-length: 15\r\nconnection: close\r\n\r\n"
                                      b"Request timeout")
        assert get_ok(port)  # and the site still serves everyone else


def test_head_declaring_a_huge_body_is_refused_before_it_is_sent(live_site):
    with live_site() as (port, _, _):
        before = vm_rss_mb()
        with connect(port) as conn:
            conn.sendall(b"HEAD /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/"
                         b"x-www-form-urlencoded\r\nContent-Length: 943718400\r\n\r\n"
                         + b"email=a&password=b&" * 3000)
            assert read_all(conn).startswith(b"HTTP/1.1 400")
        assert vm_rss_mb() - before < 32
        assert get_ok(port)


def vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_stalled_posts_without_a_token_are_refused_before_their_body(live_site):
    with live_site() as (port, settings, _):
        prefix = multipart([("image", b"\0" * (settings.csrf_scan_bytes + 4096))])
        head = (f"POST /studio/products/new HTTP/1.1\r\nHost: x\r\nContent-Type: {MULTIPART}"
                f"\r\nContent-Length: {settings.max_upload_bytes - 1024}\r\n"
                f"Cookie: wb_csrf={'c' * 32}\r\n\r\n").encode()
        before = vm_rss_mb()
        conns = []
        try:
            for _ in range(60):
                conn = connect(port)
                conns.append(conn)
                conn.sendall(head + prefix[:-64])  # most of its body is never sent
            for conn in conns:
                assert read_all(conn).startswith(b"HTTP/1.1 403")
            grown = vm_rss_mb() - before
        finally:
            for conn in conns:
                conn.close()
        # 60 uploads of ~6 MB would need 360 MB buffered; only their prefixes may be kept
        assert grown < 64, f"RSS grew by {grown:.0f} MB"
        assert get_ok(port)


def test_a_trickled_body_is_cut_off(live_site):
    with live_site(body_timeout=0.5) as (port, _, _):
        with connect(port) as conn:
            conn.sendall(b"POST /hooks/rtmp HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: 1000\r\n\r\n{")
            assert read_all(conn).startswith(b"HTTP/1.1 408")


def test_websocket_messages_are_bounded(live_site):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect as ws_connect

    with live_site() as (port, settings, host):
        slug = host["channel"]["slug"]
        with ws_connect(f"ws://127.0.0.1:{port}/ws/room/{slug}", open_timeout=10,
                        max_size=None) as ws:
            ws.send("x" * (settings.ws_max_bytes * 4))
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(100):
                    ws.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def echo_client(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.client.host)


def test_forwarded_for_is_trusted_only_from_named_proxies(tmp_path):
    echo = Starlette(routes=[Route("/", echo_client)])
    for proxies, expected in (("", "127.0.0.1"), ("127.0.0.1", "203.0.113.9")):
        settings = site_settings(tmp_path / "data", "sqlite://", trusted_proxies=proxies)
        with serve(echo, settings) as port, connect(port) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\n"
                         b"Connection: close\r\n\r\n")
            assert read_all(conn).endswith(expected.encode()), proxies
