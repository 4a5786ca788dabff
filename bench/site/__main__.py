"""``python -m bench.site``: the shop site as a real server process, measured from outside.

The site runs as ``python -m watchbuy site`` (uvicorn, pinned to CPU 0 with ``taskset`` when
available); this process and wrk run on CPU 1.  For each database (SQLite, MariaDB):

1. GET /room/<slug> (server-rendered, a few products) and GET / with
   ``wrk -t1 -c32 -d5s``: requests/s and latency.
2. Chat fan-out: N websocket viewers join one room; a logged-in sender sends messages
   (> 2 s apart, under the 5 / 10 s rate limit) stamped with their send time; delivery latency
   p50/p99/max across all viewers, and how many got each message.
3. Checkout: K shoppers with one item in their carts (made directly in the database), all POST
   /checkout at once; checkouts/s, and the check that exactly min(K, stock) orders were made
   and the stock never went negative.

Everything is on loopback; every wait is bounded; the server is stopped on any error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
MYSQL_BASE = os.environ.get("WATCHBUY_BENCH_MYSQL_URL", "mysql+aiomysql://root:@127.0.0.1:3306")
CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)"')
HOST_NAME = "Bench Host"


def log(*parts) -> None:
    print("[bench.site]", *parts, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def taskset(cpu: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > cpu:
        return ["taskset", "-c", str(cpu)]
    return []


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# -- databases ------------------------------------------------------------------------------------


def mysql_connect(database: str | None = None):
    from urllib.parse import urlsplit

    import pymysql

    parts = urlsplit(MYSQL_BASE)
    return pymysql.connect(host=parts.hostname or "127.0.0.1", port=parts.port or 3306,
                           user=parts.username or "root", password=parts.password or "",
                           database=database, connect_timeout=3, autocommit=True)


@contextlib.contextmanager
def database_url(kind: str, workdir: Path):
    if kind == "sqlite":
        yield f"sqlite:///{workdir}/watchbuy.db"
        return
    name = f"wb_bench_{uuid.uuid4().hex[:12]}"
    with contextlib.closing(mysql_connect()) as conn, conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield f"{MYSQL_BASE.rstrip('/')}/{name}"
    finally:
        with contextlib.closing(mysql_connect()) as conn, conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")


async def seed(url: str, shoppers: int, stock: int) -> dict:
    """Host + room + products, a chat sender, K shoppers with one checkout item in their carts."""
    from watchbuy.db import queries
    from watchbuy.db.database import Database
    from watchbuy.db.migrations import upgrade
    from watchbuy.site import security
    from watchbuy.site.accounts import ensure_channel

    db = Database(url)
    await db.connect()
    try:
        await upgrade(db)
        pw = security.hash_password("bench password 1234")
        host_id = await queries.create_user(db, "host@bench.test", HOST_NAME, pw, True)
        channel = await ensure_channel(db, host_id, HOST_NAME)
        for i, (name, price) in enumerate([("Ceramic mug", 1800), ("Linen apron", 3400),
                                           ("Walnut board", 5200), ("Tea towel set", 1200)]):
            await queries.create_product(db, host_id, name, f"Handmade item number {i}.",
                                         price, "usd", 500, None)
        target = await queries.create_product(db, host_id, "Limited print",
                                              "The checkout benchmark's item.", 2500, "usd",
                                              stock, None)
        sender_id = await queries.create_user(db, "sender@bench.test", "Chat Sender", pw, False)
        sender_session = await security.start_session(db, sender_id, 1)
        sessions = []
        for i in range(shoppers):
            user_id = await queries.create_user(db, f"shopper{i}@bench.test", f"Shopper {i}",
                                                pw, False)
            await queries.set_cart_quantity(db, user_id, target, 1)
            sessions.append(await security.start_session(db, user_id, 1))
        return {"slug": channel["slug"], "product_id": target, "stock": stock,
                "sender_session": sender_session, "shopper_sessions": sessions}
    finally:
        await db.disconnect()


# -- the server -----------------------------------------------------------------------------------


class SiteServer:
    def __init__(self, url: str, data_dir: Path, port: int, log_path: Path,
                 command: list[str] | None = None) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "WATCHBUY_ENV_FILE": os.devnull, "WATCHBUY_DATABASE_URL": url,
               "WATCHBUY_DATA_DIR": str(data_dir), "WATCHBUY_SITE_HOST": "127.0.0.1",
               "WATCHBUY_LOG_LEVEL": "WARNING",
               # every chat viewer of the benchmark connects from 127.0.0.1
               "WATCHBUY_WS_MAX_PER_IP": "100000",
               # no media node runs: its stats port is a closed one (refused at once)
               "WATCHBUY_HTTP_PORT": str(free_port())}
        env.pop("WATCHBUY_BROKER_URL", None)
        self.log_file = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        # ``command``: another server under the same environment and CPU (bench.site.pages'
        # minimal Starlette baseline)
        self.command = [*taskset(0), *(command or [sys.executable, "-m", "watchbuy", "site",
                                                  "--port", str(port)])]
        self.proc = subprocess.Popen(self.command, env=env, cwd=data_dir.parent,
                                     stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"site exited with {self.proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + "/", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"site did not answer within {timeout} s")

    def cpu_seconds(self) -> float | None:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_file.close()


# -- 1. pages with wrk ----------------------------------------------------------------------------


def parse_wrk(text: str) -> dict:
    def grab(pattern: str):
        found = re.search(pattern, text)
        return found.group(1) if found else None

    def ms(value: str | None) -> float | None:
        if value is None:
            return None
        found = re.match(r"([\d.]+)(us|ms|s|m)", value)
        if not found:
            return None
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[found.group(2)]
        return round(float(found.group(1)) * scale, 3)

    rps = grab(r"Requests/sec:\s+([\d.]+)")
    return {"requests_per_s": float(rps) if rps else None,
            "requests": int(grab(r"(\d+) requests in") or 0),
            "latency_avg_ms": ms(grab(r"Latency\s+(\S+)")),
            "latency_p50_ms": ms(grab(r"\n\s+50%\s+(\S+)")),
            "latency_p99_ms": ms(grab(r"\n\s+99%\s+(\S+)")),
            "non_2xx_3xx": int(grab(r"Non-2xx or 3xx responses:\s+(\d+)") or 0),
            "socket_errors": grab(r"Socket errors:\s+(.*)")}


def run_wrk(url: str, seconds: int, connections: int) -> dict:
    command = [*taskset(1), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr.strip()}")
    return {**parse_wrk(done.stdout), "command": " ".join(command)}


# -- 2. chat fan-out ------------------------------------------------------------------------------


async def chat_fanout(server: SiteServer, slug: str, sender_session: str, viewers: int,
                      messages: int, spacing: float) -> dict:
    from websockets.asyncio.client import connect

    uri = f"ws://127.0.0.1:{server.port}/ws/room/{slug}"
    arrivals: list[dict[int, int]] = [{} for _ in range(viewers)]  # viewer → {seq: ns}
    joined = 0
    join_failures = 0
    all_joined = asyncio.Event()
    stop = asyncio.Event()
    gate = asyncio.Semaphore(50)  # handshakes in flight

    async def viewer(index: int) -> None:
        nonlocal joined, join_failures
        try:
            async with gate:
                ws = await connect(uri, open_timeout=20, close_timeout=2, max_queue=None,
                                   ping_interval=None)
                hello = json.loads(await asyncio.wait_for(ws.recv(), 20))
                assert hello.get("type") == "hello", hello
        except Exception as exc:
            join_failures += 1
            if join_failures <= 3:
                log(f"viewer {index} could not join: {type(exc).__name__}: {exc}")
            return
        joined += 1
        if joined + join_failures >= viewers:
            all_joined.set()
        mine = arrivals[index]
        try:
            while not stop.is_set():
                try:
                    raw = await asyncio.wait_for(ws.recv(), 0.5)
                except TimeoutError:
                    continue
                at = time.monotonic_ns()
                if '"chat"' not in raw:
                    continue
                event = json.loads(raw)
                found = re.match(r"bench (\d+) (\d+)$", event.get("text", ""))
                if event.get("type") == "chat" and found:
                    mine[int(found.group(1))] = at - int(found.group(2))
        except Exception:  # the connection went away: what arrived so far counts
            pass
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 3)

    started = time.monotonic()
    tasks = [asyncio.create_task(viewer(i)) for i in range(viewers)]
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_joined.wait(), 120)
        join_seconds = time.monotonic() - started
        log(f"chat: {joined}/{viewers} viewers joined in {join_seconds:.1f} s")
        sender = await connect(uri, additional_headers={"Cookie": f"wb_session={sender_session}"},
                               open_timeout=20, ping_interval=None, max_queue=None)
        try:
            hello = json.loads(await asyncio.wait_for(sender.recv(), 20))
            if not hello.get("can_chat"):
                raise RuntimeError("the chat sender is not logged in")
            errors = []
            for seq in range(messages):
                await asyncio.sleep(spacing)
                await sender.send(json.dumps({"type": "chat",
                                              "text": f"bench {seq} {time.monotonic_ns()}"}))
                # the sender's own copy (or an error) comes back through the room
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    event = json.loads(await asyncio.wait_for(sender.recv(), 10))
                    if event.get("type") == "error":
                        errors.append(event.get("error"))
                        break
                    if event.get("type") == "chat":
                        break
            await asyncio.sleep(min(spacing, 3.0))  # let the last fan-out finish
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sender.close(), 3)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)

    per_message = []
    every = []
    for seq in range(messages):
        got = [a[seq] / 1e6 for a in arrivals if seq in a]
        every.extend(got)
        per_message.append({"seq": seq, "received": len(got),
                            "p50_ms": percentile(got, 50), "max_ms": max(got, default=None)})
    return {"viewers": viewers, "joined": joined, "join_failures": join_failures,
            "join_seconds": round(join_seconds, 2), "messages": messages,
            "spacing_s": spacing, "send_errors": errors,
            "received_min": min((m["received"] for m in per_message), default=0),
            "deliveries": len(every), "expected_deliveries": viewers * messages,
            "latency_p50_ms": percentile(every, 50), "latency_p99_ms": percentile(every, 99),
            "latency_max_ms": max(every, default=None),
            "latency_mean_ms": round(statistics.fmean(every), 3) if every else None,
            "per_message": per_message}


# -- 3. checkout ----------------------------------------------------------------------------------


async def checkout_rush(server: SiteServer, url: str, seeded: dict) -> dict:
    from watchbuy.db import queries
    from watchbuy.db.database import Database

    sessions = seeded["shopper_sessions"]
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(base_url=server.base, timeout=60, limits=limits)
               for _ in sessions]
    db = Database(url)
    await db.connect()
    try:
        # each shopper opens their cart page first (as a browser does): CSRF cookie and token
        tokens = []
        for client, session in zip(clients, sessions, strict=True):
            page = await client.get("/cart", headers={"Cookie": f"wb_session={session}"})
            token = CSRF_META.search(page.text)
            if page.status_code != 200 or token is None or "wb_csrf" not in page.cookies:
                raise RuntimeError(f"cart page: {page.status_code}")
            tokens.append((f"wb_session={session}; wb_csrf={page.cookies['wb_csrf']}",
                           token.group(1)))
        lowest = [seeded["stock"]]
        running = True

        async def watch_stock() -> None:
            while running:
                product = await queries.product(db, seeded["product_id"])
                lowest[0] = min(lowest[0], int(product["stock"]))
                await asyncio.sleep(0.005)

        async def buy(client: httpx.AsyncClient, cookie: str, token: str):
            start = time.monotonic()
            response = await client.post("/checkout", data={"csrf_token": token},
                                         headers={"Cookie": cookie})
            return response.status_code, response.headers.get("location", ""), \
                time.monotonic() - start

        watcher = asyncio.create_task(watch_stock())
        started = time.monotonic()
        cpu_before = server.cpu_seconds()
        results = await asyncio.wait_for(asyncio.gather(
            *(buy(c, cookie, token) for c, (cookie, token) in zip(clients, tokens, strict=True))),
            120)
        elapsed = time.monotonic() - started
        cpu_after = server.cpu_seconds()
        running = False
        await asyncio.wait_for(watcher, 5)
        statuses: dict[str, int] = {}
        ok = 0
        for status, location, _ in results:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 303 and re.fullmatch(r"/checkout/\d+/pay", location):
                ok += 1
        counts = await queries.order_counts(db)
        final_stock = int((await queries.product(db, seeded["product_id"]))["stock"])
        lowest[0] = min(lowest[0], final_stock)
        expected = min(len(sessions), seeded["stock"])
        orders = sum(counts.values())
        latencies = [r[2] * 1000 for r in results]
        return {"shoppers": len(sessions), "stock": seeded["stock"], "expected_orders": expected,
                "succeeded": ok, "orders_in_db": orders, "statuses": statuses,
                "final_stock": final_stock, "lowest_stock_seen": lowest[0],
                "correct": ok == expected and orders == expected and lowest[0] >= 0
                and final_stock == seeded["stock"] - expected,
                "seconds": round(elapsed, 3),
                "requests_per_s": round(len(results) / elapsed, 1),
                "checkouts_per_s": round(ok / elapsed, 1),
                "latency_p50_ms": round(percentile(latencies, 50), 1),
                "latency_max_ms": round(max(latencies), 1),
                "server_cpu_s": round(cpu_after - cpu_before, 2)
                if cpu_before is not None and cpu_after is not None else None}
    finally:
        running = False
        await db.disconnect()
        for client in clients:
            await client.aclose()


# -- one database ---------------------------------------------------------------------------------


def bench_one(kind: str, args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"wb-bench-site-{kind}-"))
    data_dir = workdir / "data"
    server = None
    try:
        with database_url(kind, workdir) as url:
            stock = args.stock if args.stock is not None else max(1, args.shoppers * 4 // 5)
            seeded = asyncio.run(seed(url, args.shoppers, stock))
            server = SiteServer(url, data_dir, free_port(), workdir / "site.log")
            server.wait_ready()
            log(f"{kind}: site up on {server.base} (pid {server.proc.pid}), room {seeded['slug']}")
            result = {"db": kind, "server_command": " ".join(server.command)}
            pages = {}
            for name, path in (("room", f"/room/{seeded['slug']}"), ("home", "/")):
                check = httpx.get(server.base + path, timeout=5)
                if check.status_code != 200:
                    raise RuntimeError(f"{path}: {check.status_code}")
                cpu = server.cpu_seconds()
                pages[name] = run_wrk(server.base + path, args.wrk_seconds, args.connections)
                pages[name]["path"] = path
                pages[name]["bytes"] = len(check.content)
                if cpu is not None:
                    pages[name]["server_cpu_s"] = round(server.cpu_seconds() - cpu, 2)
                log(f"{kind}: {path} {pages[name]['requests_per_s']} req/s")
            result["pages"] = pages
            result["chat"] = asyncio.run(chat_fanout(server, seeded["slug"],
                                                     seeded["sender_session"], args.viewers,
                                                     args.messages, args.spacing))
            log(f"{kind}: chat p50 {result['chat']['latency_p50_ms']} ms")
            result["checkout"] = asyncio.run(checkout_rush(server, url, seeded))
            log(f"{kind}: checkout {result['checkout']['checkouts_per_s']}/s "
                f"correct={result['checkout']['correct']}")
            alive = server.proc.poll() is None
            server.stop()
            server = None
            result["server_survived"] = alive
            return result
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(results: list[dict]) -> None:
    print("\nPages (wrk -t1, req/s; latency ms)")
    print(f"{'db':8} {'page':6} {'req/s':>9} {'p50':>8} {'p99':>8} {'non2xx':>7} {'bytes':>7}")
    for r in results:
        for name, p in r["pages"].items():
            print(f"{r['db']:8} {name:6} {fmt(p['requests_per_s']):>9} "
                  f"{fmt(p['latency_p50_ms'], 2):>8} {fmt(p['latency_p99_ms'], 2):>8} "
                  f"{p['non_2xx_3xx']:>7} {p['bytes']:>7}")
    print("\nChat fan-out (delivery latency over all viewers and messages, ms)")
    print(f"{'db':8} {'viewers':>7} {'joined':>6} {'msgs':>4} {'recv/exp':>12} "
          f"{'p50':>8} {'p99':>8} {'max':>8}")
    for r in results:
        c = r["chat"]
        print(f"{r['db']:8} {c['viewers']:>7} {c['joined']:>6} {c['messages']:>4} "
              f"{c['deliveries']:>5}/{c['expected_deliveries']:<6} {fmt(c['latency_p50_ms']):>8} "
              f"{fmt(c['latency_p99_ms']):>8} {fmt(c['latency_max_ms']):>8}")
    print("\nCheckout (all shoppers at once)")
    print(f"{'db':8} {'K':>4} {'stock':>5} {'ok':>4} {'orders':>6} {'min stock':>9} "
          f"{'s':>7} {'ok/s':>7} {'req/s':>7} {'p50 ms':>8} {'max ms':>8} correct")
    for r in results:
        k = r["checkout"]
        print(f"{r['db']:8} {k['shoppers']:>4} {k['stock']:>5} {k['succeeded']:>4} "
              f"{k['orders_in_db']:>6} {k['lowest_stock_seen']:>9} {k['seconds']:>7} "
              f"{k['checkouts_per_s']:>7} {k['requests_per_s']:>7} {k['latency_p50_ms']:>8} "
              f"{k['latency_max_ms']:>8} {k['correct']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.site", description=__doc__.split("\n")[0])
    parser.add_argument("--db", default="sqlite,mariadb", help="sqlite,mariadb (default both)")
    parser.add_argument("--quick", action="store_true",
                        help="100 viewers, 10 shoppers, 2 s wrk, 2 messages (~30 s)")
    parser.add_argument("--viewers", type=int, help="chat websocket viewers (default 1000)")
    parser.add_argument("--messages", type=int, help="chat messages (default 4)")
    parser.add_argument("--spacing", type=float, default=2.5, help="seconds between messages")
    parser.add_argument("--shoppers", type=int, help="concurrent checkouts (default 50)")
    parser.add_argument("--stock", type=int, help="stock of the item (default 4/5 of shoppers)")
    parser.add_argument("--wrk-seconds", type=int, help="wrk duration (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    args.viewers = args.viewers or (100 if args.quick else 1000)
    args.messages = args.messages or (2 if args.quick else 4)
    args.shoppers = args.shoppers or (10 if args.quick else 50)
    args.wrk_seconds = args.wrk_seconds or (2 if args.quick else 5)
    if args.messages > 5 or args.spacing <= 2:
        parser.error("the chat rate limit is 5 messages / 10 s: at most 5, more than 2 s apart")
    kinds = [k.strip() for k in args.db.split(",") if k.strip()]
    if not shutil.which("wrk"):
        parser.error("wrk is not installed")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.viewers + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # the server inherits it
    if taskset(1) and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {1})  # the load generator stays off the server's CPU
    results = []
    for kind in kinds:
        if kind not in ("sqlite", "mariadb"):
            parser.error(f"unknown database {kind!r}")
        results.append(bench_one(kind, args))
    print_table(results)
    report = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "cpu": cpu_model()},
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    ok = all(r["checkout"]["correct"] and r["server_survived"] for r in results)
    return 0 if ok else 1


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
