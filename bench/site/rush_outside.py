"""``python -m bench.site.rush_outside``: the checkout rush against real ``watchbuy site`` processes.

What issue 15's "checkout rush" asks, measured from outside as deployed: ``watchbuy site``
(uvicorn; ``--workers N`` with Redis for several processes) on SQLite or MariaDB; S shoppers
(users, sessions, a saved address and a saved test card, made directly in the database)
all press **Buy now** on the pinned product within ``--window`` seconds (default 1 s, spread
evenly): ``POST /api/buy-now`` with the product's id (JSON and the CSRF header, as the buy
sheet's script sends it), answered 200 ``{"ok": true}`` (bought)
or 409 (sold out); ``--stock`` units.  ``--endpoint /checkout --bought-status 303`` presses
the cart's checkout instead (each shopper then also has one unit in the cart);
``--field name=value`` adds form fields.

The load is one lean asyncio process: each shopper is one raw HTTP/1.1 connection (a
pre-built request, the answer parsed just far enough to get its status and length), so the
client costs far less CPU per request than the server; its CPU is reported beside the
server's.  A thread polls the product's stock during the rush (the lowest value seen).

It checks, and exits 1 unless all hold: exactly min(S, stock) orders of the product, stock
never below zero and ending at stock - orders, no shopper with two orders (a press sent again
after a lost answer carries its key and ``retry``, as buy.js sends it), every shopper answered
"bought" or "sold out", no 5xx, no connection error, no timeout.  It prints answers/s (presses answered, bought or sold
out, over the time from the first press to the last answer: the rush's throughput, what the
issue's "checkouts/s" counts), orders/s, p50/p99/max answer time, and CPU seconds of the
server processes and of this client.

    python -m bench.site.rush_outside --db sqlite --shoppers 3000 --stock 300
    python -m bench.site.rush_outside --db mysql --shoppers 3000 --stock 300
    python -m bench.site.rush_outside --db mysql --workers 2 --shoppers 3000 --stock 300

Only loopback (the site binds 127.0.0.1; MariaDB and Redis from WATCHBUY_BENCH_MYSQL_URL and
WATCHBUY_BENCH_REDIS_URL, loopback defaults).  Every wait is bounded; the server is stopped on
any error.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import httpx

from bench.site.__main__ import database_url, free_port, mysql_connect, percentile, taskset

REDIS_URL = os.environ.get("WATCHBUY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
BUY_NOW = "/api/buy-now"
SECRET = base64.urlsafe_b64encode(os.urandom(32)).decode()  # the site's key, so tokens are made here


def log(*parts: object) -> None:
    print("[rush_outside]", *parts, file=sys.stderr, flush=True)


# -- the shoppers ---------------------------------------------------------------------------------


async def seed(url: str, shoppers: int, stock: int, concurrency: int) -> dict:
    """A host with a room, the product (``stock`` units) and ``shoppers`` signed-up shoppers
    with an address and a saved test card on file and one unit of it in the cart (for the
    cart's checkout; Buy now leaves the cart alone), each as (session token, csrf cookie)."""
    from bench.site.rush import ADDRESS
    from watchbuy.db import queries, shopping
    from watchbuy.db.database import Database
    from watchbuy.db.migrations import upgrade
    from watchbuy.site import security
    from watchbuy.site.accounts import ensure_channel

    db = Database(url)
    await db.connect()
    try:
        with warnings.catch_warnings():  # MariaDB's notes on CREATE ... IF NOT EXISTS
            warnings.simplefilter("ignore")
            await upgrade(db)
        host_id = await queries.create_user(db, "host@rush.test", "Rush Host", "x", True)
        channel = await ensure_channel(db, host_id, "Rush Host")
        product_id = await queries.create_product(db, host_id, "Rush print", "", 2500, "usd",
                                                  stock, None)
        gate = asyncio.Semaphore(concurrency)

        async def shopper(i: int) -> tuple[str, str]:
            async with gate:
                # "x" is no argon2 hash: nobody logs in, the session is made directly
                user_id = await queries.create_user(db, f"shopper{i}@rush.test", f"Shopper {i}",
                                                    "x", False)
                # the print is shipped: checkout copies the default address onto the order
                await shopping.add_address(db, user_id, ADDRESS, True)
                # a returning buyer: Buy now pays with the saved test card at once
                await shopping.save_card(db, user_id, "visa", "4242")
                await queries.set_cart_quantity(db, user_id, product_id, 1)
                token = await security.start_session(db, user_id, 1)
            return token, base64.urlsafe_b64encode(os.urandom(18)).decode()

        people = await asyncio.gather(*(shopper(i) for i in range(shoppers)))
        return {"slug": channel["slug"], "product_id": product_id, "people": people}
    finally:
        await db.disconnect()


def request_bytes(host: str, endpoint: str, token: str, csrf_cookie: str,
                  fields: dict[str, object]) -> bytes:
    """One shopper's press as their browser sends it: Buy now as site/static/js/buy.js does
    (JSON, the CSRF token in X-CSRF-Token), the cart's checkout as its form does."""
    from watchbuy.site import security

    csrf = security.csrf_token_for(SECRET, csrf_cookie, token)
    if endpoint == BUY_NOW:
        body = json.dumps(fields).encode()
        extra = (f"X-CSRF-Token: {csrf}\r\nAccept: application/json\r\n"
                 "Content-Type: application/json\r\n")
    else:
        body = urlencode({"csrf_token": csrf, **fields}).encode()
        extra = "Content-Type: application/x-www-form-urlencoded\r\n"
    head = (f"POST {endpoint} HTTP/1.1\r\nHost: {host}\r\n"
            f"Cookie: {security.SESSION_COOKIE}={token}; {security.CSRF_COOKIE}={csrf_cookie}\r\n"
            f"{extra}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def presses(host: str, endpoint: str, token: str, csrf_cookie: str,
            fields: dict[str, object]) -> tuple[bytes, bytes]:
    """A shopper's press and the same press sent again after a lost answer: Buy now carries
    the buy sheet's key for the press (and ``retry`` the second time), as buy.js sends it."""
    if endpoint != BUY_NOW:
        request = request_bytes(host, endpoint, token, csrf_cookie, fields)
        return request, request
    key = os.urandom(16).hex()
    return (request_bytes(host, endpoint, token, csrf_cookie,
                          {**fields, "request_key": key, "retry": False}),
            request_bytes(host, endpoint, token, csrf_cookie,
                          {**fields, "request_key": key, "retry": True}))


# -- the load: one raw connection per shopper -----------------------------------------------------


class Press(asyncio.Protocol):
    """One shopper's press: write the request, read the answer's head and body, close."""

    def __init__(self, request: bytes, done: asyncio.Future) -> None:
        self.request = request
        self.done = done
        self.buf = bytearray()
        self.status = 0
        self.length: int | None = None
        self.head_end = -1
        self.location = ""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.head_end < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head_end = end + 4
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            self.status = int(lines[0].split(" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    self.length = int(value)
                elif name == "location":
                    self.location = value.strip()
        if self.length is not None and len(self.buf) - self.head_end >= self.length:
            self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            body = bytes(self.buf[self.head_end:self.head_end + 300]) if self.head_end >= 0 else b""
            self.done.set_result((self.status, self.location, body))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if self.head_end >= 0 and self.length is None:  # read-until-close answer
            self._finish()
        else:
            self.done.set_result((0, "", f"connection lost: {exc}".encode()))


async def press(loop: asyncio.AbstractEventLoop, port: int, request: bytes,
                timeout: float) -> tuple[int, str, bytes]:
    done = loop.create_future()
    try:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(lambda: Press(request, done), "127.0.0.1", port), timeout)
    except (OSError, TimeoutError) as exc:
        return 0, "", f"connect: {exc}".encode()
    try:
        return await asyncio.wait_for(done, timeout)
    except TimeoutError:
        return -1, "", b"timeout"
    finally:
        transport.close()


def told(status: int, location: str, body: bytes, bought_status: int) -> str:
    if status == bought_status:
        return "bought"
    if status == 409:
        return "sold out"
    if status == 0:
        return "connection error"
    if status == -1:
        return "timeout"
    if status >= 500:
        return "5xx"
    return f"other {status}"


async def rush(port: int, requests: list[tuple[bytes, bytes]], window: float, timeout: float,
               retries: int,
               bought_status: int) -> tuple[list[tuple[str, float, int, str]], float]:
    """Every request pressed once, spread evenly over ``window`` seconds; a shopper whose
    connection failed (a process killed under it) presses again, up to ``retries`` times, as a
    phone would.  Returns (what each was told, seconds, tries, detail) and the rush's length."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    count = len(requests)

    async def one(i: int, request: tuple[bytes, bytes]) -> tuple[str, float, int, str]:
        await asyncio.sleep(max(0.0, started + window * i / count - loop.time()))
        begun = loop.time()
        tries = 0
        while True:
            tries += 1
            status, location, body = await press(loop, port, request[tries > 1], timeout)
            answer = told(status, location, body, bought_status)
            if answer != "connection error" or tries > retries:
                break
            await asyncio.sleep(0.2)
        return answer, loop.time() - begun, tries, body[:120].decode("latin-1")

    results = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    return results, loop.time() - started


# -- the server -----------------------------------------------------------------------------------


class Site:
    """``watchbuy site`` in a subprocess: one process, or ``--workers N`` (Redis)."""

    def __init__(self, url: str, data_dir: Path, workers: int, pin: bool, log_path: Path,
                 extra_env: dict[str, str] | None = None, profile: str | None = None) -> None:
        self.port = free_port()
        env = {**os.environ, "WATCHBUY_ENV_FILE": os.devnull, "WATCHBUY_DATABASE_URL": url,
               "WATCHBUY_DATA_DIR": str(data_dir), "WATCHBUY_SITE_HOST": "127.0.0.1",
               "WATCHBUY_SECRET_KEY": SECRET, "WATCHBUY_LOG_LEVEL": "WARNING",
               # no media node runs: its stats port is a closed one (refused at once)
               "WATCHBUY_HTTP_PORT": str(free_port())}
        env.pop("WATCHBUY_BROKER_URL", None)
        if workers > 1:
            env["WATCHBUY_BROKER_URL"] = REDIS_URL
            env["WATCHBUY_BROKER_PREFIX"] = f"rush{os.getpid()}:"
        env.update(extra_env or {})
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.log_path = log_path
        # --profile: the one process under cProfile, its stats written when it stops
        profiler = ["-m", "cProfile", "-o", profile] if profile and workers == 1 else []
        self.command = [*(taskset(0) if pin else []), sys.executable, *profiler, "-m",
                        "watchbuy", "site", "--port", str(self.port), "--workers", str(workers)]
        self.proc = subprocess.Popen(self.command, env=env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.workers = workers
        # uvicorn re-raises the signal that stopped it once it has shut down: SIGTERM then ends
        # the process before cProfile writes, SIGINT (KeyboardInterrupt) lets it write
        self.stop_signal = signal.SIGINT if profiler else signal.SIGTERM

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"site exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/", timeout=1.0).status_code == 200:
                    if self.workers <= 1 or len(self.worker_pids()) >= self.workers:
                        return
            time.sleep(0.2)
        raise RuntimeError(f"site did not answer within {timeout} s")

    def worker_pids(self) -> list[int]:
        if self.workers <= 1:
            return [self.proc.pid]
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            return [int(pid) for pid in text.split()]
        return []

    def cpu_seconds(self) -> float:
        """CPU of the supervisor and its live workers (a killed worker's is lost)."""
        total = 0.0
        pids = {self.proc.pid, *self.worker_pids()}
        for pid in pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log_file.close()


class StockWatch(threading.Thread):
    """Polls the product's stock on its own connection; keeps the lowest value seen."""

    def __init__(self, url: str, product_id: int) -> None:
        super().__init__(daemon=True)
        self.url, self.product_id = url, product_id
        self.lowest: int | None = None
        self.running = True

    def run(self) -> None:
        if self.url.startswith("sqlite"):
            conn = sqlite3.connect(self.url.split("///", 1)[1], timeout=5)
        else:
            conn = mysql_connect(urlsplit(self.url).path.lstrip("/"))
        with contextlib.closing(conn):
            while self.running:
                cursor = conn.cursor()
                cursor.execute(f"SELECT stock FROM products WHERE id = {int(self.product_id)}")
                value = int(cursor.fetchone()[0])
                cursor.close()
                self.lowest = value if self.lowest is None else min(self.lowest, value)
                time.sleep(0.005)


def database_server_cpu() -> float | None:
    """CPU seconds so far of the local MariaDB server (it shares the machine: its share of a
    rush is reported beside the site's), None when it is not found."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            if (proc / "comm").read_text().strip() in ("mariadbd", "mysqld"):
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def counts(url: str, product_id: int) -> tuple[int, int, int, int]:
    """(orders of the product, units in them, stock now, shoppers who ordered it) read from
    the database."""
    query_orders = ("SELECT COUNT(DISTINCT order_id), COALESCE(SUM(quantity), 0), "
                    "COUNT(DISTINCT orders.user_id) FROM order_items "
                    "JOIN orders ON orders.id = order_items.order_id "
                    f"WHERE product_id = {int(product_id)}")
    query_stock = f"SELECT stock FROM products WHERE id = {int(product_id)}"
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.split("///", 1)[1], timeout=5)
    else:
        conn = mysql_connect(urlsplit(url).path.lstrip("/"))
    with contextlib.closing(conn):
        cursor = conn.cursor()
        cursor.execute(query_orders)
        orders, units, buyers = cursor.fetchone()
        cursor.execute(query_stock)
        stock = cursor.fetchone()[0]
    return int(orders), int(units), int(stock), int(buyers)


def scraped_stock_events(port: int) -> int | None:
    """``watchbuy_site_stock_events_total`` of the site process that answers /metrics (it
    answers loopback), None when it cannot be read."""
    with contextlib.suppress(httpx.HTTPError, ValueError):
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10.0).text
        found = re.search(r"^watchbuy_site_stock_events_total (\S+)$", text, re.M)
        if found:
            return int(float(found.group(1)))
    return None


# -- one run --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="wb-rush-"))
    site = None
    try:
        with database_url(args.db, workdir) as url:
            began = time.monotonic()
            seeded = asyncio.run(seed(url, args.shoppers, args.stock,
                                      1 if args.db == "sqlite" else 16))
            log(f"{args.db}: {args.shoppers} shoppers seeded in {time.monotonic() - began:.1f} s")
            site = Site(url, workdir / "data", args.workers, args.pin, workdir / "site.log",
                        profile=args.profile)
            site.wait_ready()
            log(f"site up on port {site.port}: {' '.join(site.command)}")
            fields = dict(item.split("=", 1) for item in args.field)
            if args.endpoint == BUY_NOW:
                fields.setdefault("product_id", str(seeded["product_id"]))
            requests = [presses(f"127.0.0.1:{site.port}", args.endpoint, token, csrf, fields)
                        for token, csrf in seeded["people"]]
            watch = StockWatch(url, seeded["product_id"])
            watch.start()
            time.sleep(0.2)
            killed = None
            if args.kill_at is not None:
                def kill() -> None:
                    nonlocal killed
                    pids = site.worker_pids()
                    if pids:
                        killed = pids[0]
                        os.kill(killed, signal.SIGKILL)
                threading.Timer(args.kill_at, kill).start()
            cpu_server = site.cpu_seconds()
            cpu_db = database_server_cpu() if args.db == "mysql" else None
            cpu_client = resource.getrusage(resource.RUSAGE_SELF)
            results, elapsed = asyncio.run(rush(site.port, requests, args.window, args.timeout,
                                                args.retries, args.bought_status))
            cpu_client_after = resource.getrusage(resource.RUSAGE_SELF)
            server_cpu = site.cpu_seconds() - cpu_server
            cpu_db_after = database_server_cpu() if cpu_db is not None else None
            watch.running = False
            watch.join(5)
            orders, units, final_stock, buyers = counts(url, seeded["product_id"])
            lowest = min(x for x in (watch.lowest, final_stock) if x is not None)
            answers: dict[str, int] = {}
            for answer, *_ in results:
                answers[answer] = answers.get(answer, 0) + 1
            samples = [r[1] * 1000 for r in results]
            bought = answers.get("bought", 0)
            expected = min(args.shoppers, args.stock)
            odd = [r for r in results if r[0] not in ("bought", "sold out")][:3]
            correct = (orders == expected and units == expected and lowest >= 0
                       and final_stock == args.stock - units
                       and bought == expected and answers.get("sold out", 0)
                       == args.shoppers - expected) if args.kill_at is None else (
                orders == units and lowest >= 0 and final_stock == args.stock - units
                and units <= args.stock and set(answers) <= {"bought", "sold out"})
            # a press sent again after a lost answer never buys twice (Buy now's request key)
            correct = correct and buyers == orders
            alive = site.proc.poll() is None
            stock_events = scraped_stock_events(site.port) if alive else None
            site.stop()
            site = None
            return {
                "db": args.db, "workers": args.workers, "endpoint": args.endpoint,
                "shoppers": args.shoppers, "stock": args.stock, "window_s": args.window,
                "answers": answers, "orders": orders, "units_sold": units, "buyers": buyers,
                "final_stock": final_stock, "lowest_stock_seen": lowest,
                "killed_worker": killed, "retried": sum(1 for r in results if r[2] > 1),
                "correct": correct and alive, "server_survived": alive,
                "seconds": round(elapsed, 3),
                "orders_per_s": round(orders / elapsed, 1),
                "answers_per_s": round(len(results) / elapsed, 1),
                "p50_ms": round(percentile(samples, 50), 1),
                "p99_ms": round(percentile(samples, 99), 1),
                "max_ms": round(max(samples), 1),
                "server_cpu_s": round(server_cpu, 2),
                "server_cpu_ms_per_answer": round(server_cpu * 1000 / len(results), 3),
                "mariadb_cpu_s": None if cpu_db_after is None or cpu_db is None
                else round(cpu_db_after - cpu_db, 2),
                "client_cpu_s": round(
                    cpu_client_after.ru_utime + cpu_client_after.ru_stime
                    - cpu_client.ru_utime - cpu_client.ru_stime, 2),
                "client_cpu_ms_per_answer": round(
                    (cpu_client_after.ru_utime + cpu_client_after.ru_stime
                     - cpu_client.ru_utime - cpu_client.ru_stime) * 1000 / len(results), 3),
                # each a stock read plus publishes that drop the room's kept pages everywhere
                # (with --workers N: the one worker that answered /metrics)
                "stock_events": stock_events,
                "loadavg_1m": round(os.getloadavg()[0], 2),
                "odd_answers": odd,
                "command": " ".join(sys.argv),
            }
    finally:
        if site is not None:
            site.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=["sqlite", "mysql"], default="sqlite")
    parser.add_argument("--workers", type=int, default=1,
                        help="site processes (more than 1 uses Redis)")
    parser.add_argument("--shoppers", type=int, default=3000)
    parser.add_argument("--stock", type=int, default=300)
    parser.add_argument("--window", type=float, default=1.0,
                        help="seconds over which the presses are spread")
    parser.add_argument("--endpoint", default=BUY_NOW,
                        help="what the buy button posts to (/checkout: the cart's checkout)")
    parser.add_argument("--field", action="append", default=[],
                        help="extra form field name=value (repeatable)")
    parser.add_argument("--bought-status", type=int, default=200,
                        help="the status that means bought (200 for Buy now; 303, the "
                        "redirect to pay, for /checkout)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per press, seconds")
    parser.add_argument("--retries", type=int, default=0,
                        help="presses again after a connection error (with --kill-at)")
    parser.add_argument("--kill-at", type=float, default=None,
                        help="SIGKILL one site worker this many seconds into the rush")
    parser.add_argument("--pin", action="store_true",
                        help="pin the site to CPU 0 and this client to CPU 1 (taskset)")
    parser.add_argument("--profile", help="run the site (one process) under cProfile and "
                        "write its stats here (python -m pstats)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if args.pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    result = run(args)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
