"""Helpers for the browser tests: a real ``watchbuy serve``, an ffmpeg publisher, Chromium.

The browser is Debian's ``chromium`` (``/usr/bin/chromium``) driven by Playwright's Python
package; Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("WATCHBUY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required", "--disable-dev-shm-usage",
    "--mute-audio",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
# hls.js is a test-only npm devDependency (site/frontend/package.json): the room never loads
# it, the tests serve it to their own page.
NODE_MODULES = Path(__file__).resolve().parent.parent / "site" / "frontend" / "node_modules"
HLSJS = NODE_MODULES / "hls.js" / "dist" / "hls.min.js"
MPEGTS = NODE_MODULES / "mpegts.js" / "dist" / "mpegts.js"  # what the room page loads
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_browser() -> None:
    """Chromium, Playwright and ffmpeg must be present in CI; elsewhere the tests skip."""
    missing = []
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright (pip install -e '.[test]')")
    if shutil.which("ffmpeg") is None:
        missing.append("ffmpeg (apt-get install ffmpeg)")
    if missing:
        message = "browser tests need " + ", ".join(missing)
        if in_ci():
            pytest.fail(message + " — in CI these tests must run, not skip", pytrace=False)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``watchbuy serve`` as a subprocess in a fresh folder, with what its banner prints."""

    BANNER_TIMEOUT = 60.0

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.extra_env = env or {}  # WATCHBUY_* settings of this server
        self.rtmp_port = free_port()
        self.http_port = free_port()
        self.site_port = free_port()
        self.agent_port = free_port()  # the status agent's 8090 would collide with other runs
        self.url = f"http://127.0.0.1:{self.site_port}"
        self.lines: list[str] = []
        self.password = ""
        self.stream_key = ""
        self.room_slug = ""
        self.proc: subprocess.Popen | None = None
        self._banner = threading.Event()

    @property
    def rtmp_url(self) -> str:
        return f"rtmp://127.0.0.1:{self.rtmp_port}/live/{self.stream_key}"

    @property
    def room_url(self) -> str:
        return f"{self.url}/room/{self.room_slug}"

    def output(self, last: int = 60) -> str:
        return "\n".join(self.lines[-last:])

    def start(self) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHBUY_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watchbuy", "serve", "--rtmp-port", str(self.rtmp_port),
             "--http-port", str(self.http_port), "--site-port", str(self.site_port),
             "--agent-port", str(self.agent_port)],
            cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()
        if not self._banner.wait(self.BANNER_TIMEOUT) or not self.stream_key:
            code = self.proc.poll()
            self.stop()
            raise AssertionError(
                f"watchbuy serve printed no demo login within {self.BANNER_TIMEOUT:.0f} s "
                f"(exit code {code}); its output:\n{self.output()}")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if match := re.search(r"Demo host .*password: (\S+)", line):
                self.password = match.group(1)
            elif match := re.search(r"Room: \S+/room/(\S+)", line):
                self.room_slug = match.group(1)
            elif match := re.search(r"Stream key (\S+)", line):
                self.stream_key = match.group(1)
            elif "media node" in line and "HTTP-FLV http" in line:
                self._banner.set()
        self._banner.set()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Publisher:
    """ffmpeg pushing a test pattern with sound over RTMP, in real time, as OBS does: 1280×720,
    or ``size="720x1280"`` for a phone held upright."""

    def __init__(self, rtmp_url: str, log: Path, size: str = "1280x720", gop: int = 30) -> None:
        self.rtmp_url = rtmp_url
        self.log = log
        self.size = size
        self.gop = gop  # frames between keyframes: 30 (1 s), or 300 to see the health warning
        self.proc: subprocess.Popen | None = None

    def start(self) -> Publisher:
        self.stop()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-loglevel", "error",
                 "-re", "-f", "lavfi", "-i", f"testsrc2=size={self.size}:rate=30",
                 "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
                 "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
                 "-g", str(self.gop), "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "64k",
                 "-f", "flv", self.rtmp_url],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def errors(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def wait_until(check, timeout: float, message, interval: float = 0.2):
    """Poll ``check()`` until it returns something truthy; fail with ``message()`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(interval)


# What the room's <video> is doing, read in the page.
VIDEO_STATE_JS = """() => {
  const v = document.getElementById('video');
  const q = v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality() : {};
  const b = v.buffered;
  const end = b.length ? b.end(b.length - 1) : null;
  return {
    width: v.videoWidth, height: v.videoHeight, time: v.currentTime, paused: v.paused,
    readyState: v.readyState, frames: q.totalVideoFrames || 0, dropped: q.droppedVideoFrames || 0,
    bufferedEnd: end, ahead: end === null ? null : end - v.currentTime,
    offline: !document.getElementById('offline').hidden,
    badge: document.getElementById('live-badge').textContent,
  };
}"""


def video_state(page) -> dict:
    return page.evaluate(VIDEO_STATE_JS)


# For each visible element a selector matches: is its centre inside the viewport, and is the
# element the browser hits there (elementFromPoint) that element or inside it?  Playwright's
# click finds an overlay only when it clicks; this names every covered control at once.
COVERED_JS = """selector => {
  const out = [];
  for (const el of document.querySelectorAll(selector)) {
    const r = el.getBoundingClientRect();
    if (!r.width || !r.height || getComputedStyle(el).visibility === "hidden") continue;
    const x = r.left + r.width / 2, y = r.top + r.height / 2;
    const label = (el.id ? "#" + el.id + " " : "") + (el.textContent || "").trim().slice(0, 40);
    if (x < 0 || y < 0 || x > innerWidth || y > innerHeight) { out.push(label + ": off screen"); continue; }
    const hit = document.elementFromPoint(x, y);
    if (!hit || !(hit === el || el.contains(hit))) {
      out.push(label + ": under " + (hit ? hit.tagName.toLowerCase() + "." + hit.className : "nothing"));
    }
  }
  return out;
}"""


def covered(page, selector: str) -> list[str]:
    """The controls matching selector that a tap at their centre would not reach."""
    return page.evaluate(COVERED_JS, selector)


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path), full_page=False, animations="disabled")
    return path


def log_in(page, base_url: str, email: str, password: str, next_path: str = "/") -> None:
    page.goto(f"{base_url}/login?next={next_path}")
    page.fill('input[name="email"]', email)
    page.fill('input[name="password"]', password)
    with page.expect_navigation():
        page.click('form[action="/login"] button[type="submit"]')
    if "/login" in page.url:
        raise AssertionError(f"logging in as {email} failed: {page.inner_text('main')[:300]}")


def sign_up(page, base_url: str, email: str, name: str, password: str) -> None:
    page.goto(f"{base_url}/signup")
    page.fill('input[name="email"]', email)
    page.fill('input[name="display_name"]', name)
    page.fill('input[name="password"]', password)
    page.check('input[name="account_type"][value="shopper"]')
    with page.expect_navigation():
        page.click('form[action="/signup"] button[type="submit"]')
    if "/signup" in page.url:
        raise AssertionError(f"signing up {email} failed: {page.inner_text('main')[:300]}")
    # Sign-up answers new and taken emails alike (the login page): the new user logs in once.
    log_in(page, base_url, email, password)


def require_hlsjs() -> Path:
    """hls.js from npm (``make setup`` installs it with the site's packages): a must in CI."""
    if not HLSJS.is_file():
        message = f"{HLSJS} is missing (make setup, or npm ci in site/frontend)"
        if in_ci():
            pytest.fail(message + " — in CI these tests must run, not skip", pytrace=False)
        pytest.skip(message)
    return HLSJS


class LocalPages:
    """A tiny HTTP server on loopback (port 0) for a test's own page and scripts.

    Chromium lets a page fetch from loopback (the media node) only when the page itself came
    from loopback, so the test page is served for real rather than fulfilled by Playwright.
    ``files``: path -> (content type, body).  Used as a context manager; ``url(path)``.
    """

    def __init__(self, files: dict[str, tuple[str, bytes]]) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                found = files.get(self.path.split("?")[0])
                if found is None:
                    self.send_error(404)
                    return
                content_type, body = found
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # quiet: the test reports what matters
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self) -> LocalPages:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def room_state(server) -> dict:
    with urllib.request.urlopen(f"{server.url}/api/rooms/{server.room_slug}", timeout=5) as r:
        return json.load(r)


def go_live(server, publisher) -> None:
    """Start ffmpeg and wait until the site knows the room is live."""
    publisher.start()
    wait_until(
        lambda: room_state(server)["live"], 30,
        lambda: (f"the room did not go live 30 s after ffmpeg started publishing to "
                 f"{server.rtmp_url} (ffmpeg running: {publisher.running()}; ffmpeg says: "
                 f"{publisher.errors()!r}); server output:\n{server.output()}"))


def sqlite_of(server) -> sqlite3.Connection:
    """The served site's SQLite database (``watchbuy serve`` keeps it in data/)."""
    [path] = server.workdir.glob("data/watchbuy.db")
    return sqlite3.connect(path, timeout=10)


# What a first-time buyer types into the buy-now sheet (test mode: the test card).
BUYER_ADDRESS = {"name": "Rosa Diaz", "line1": "99 Harbour Lane", "city": "Portland",
                 "postal_code": "04101", "country": "US"}
TEST_CARD = {"card": "4242 4242 4242 4242", "expiry": "12/34", "cvc": "123"}


def fill_first_purchase(page) -> None:
    """The address and the test card, typed into the open buy-now sheet (buy.js)."""
    for name, value in {**BUYER_ADDRESS, **TEST_CARD}.items():
        page.fill(f'#buy-sheet input[name="{name}"]', value)


def thank_you(page) -> tuple[int, str]:
    """Waits for the buy-now sheet's thank-you: (order id, its text)."""
    page.wait_for_function(
        "() => document.getElementById('buy-title').textContent === 'Thank you!'",
        timeout=15_000)
    text = page.inner_text("#buy-sheet .thank-you")
    order_id = int(re.search(r"order #(\d+)", text).group(1))
    return order_id, text
