"""``python -m bench.site.pages``: page throughput as a share of a minimal Starlette route.

Two servers run side by side on CPU 0 under the one uvicorn configuration of ``watchbuy site``
(:func:`watchbuy.site.cli.uvicorn_server`, uvloop, the same environment): the site itself
(``python -m watchbuy site``, fresh SQLite file or fresh MariaDB database, seeded like
``python -m bench.site``: one host room, five products, one pinned) and a baseline process
serving one Starlette route that returns a fixed ~4.9 KB HTML page.  This process is the load
on CPU 1: a lean client (one epoll loop over raw sockets, keep-alive, one request in flight per
connection, no pipelining) that costs less CPU per request than either server; its CPU is
reported beside the server's.

Measured in this order, each for the same time: baseline, the anonymous room page, the home page,
the logged-in room page, baseline again.  A page's ratio is its req/s over the mean of the two
baseline runs, so a machine that slows down during the run shows as a spread between them.

    python -m bench.site.pages                       # both databases, 5 s per URL
    python -m bench.site.pages --db sqlite --quick   # CI's pass: 2 s per URL
    python -m bench.site.pages --db mariadb --quick --profile bench/work/profile  # cProfile
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import selectors
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.site.__main__ import (
    HOST_NAME,
    SiteServer,
    cpu_model,
    database_url,
    free_port,
    log,
    seed,
    taskset,
)

# A page of the size of the room page (4.9 KB), fixed, so the baseline measures uvicorn and
# Starlette's per-request cost and nothing else.
_CARD = ('<li class="product"><img src="/static/p.png" alt="" width="96" height="96">'
         '<h3>Handmade ceramic mug</h3><p class="price">$18.00</p>'
         '<button type="submit">Add to cart</button></li>\n')
BASELINE_HTML = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                 "<title>Baseline</title></head><body><main><ul>\n"
                 + _CARD * 26 + "</ul></main></body></html>\n")


def baseline_app():
    """One Starlette route, no middleware: the floor every page is measured against."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    async def page(request):
        return HTMLResponse(BASELINE_HTML)

    return Starlette(routes=[Route("/", page)])


def serve_baseline(port: int) -> int:
    """The baseline under the site's own uvicorn configuration and event loop."""
    from watchbuy.cli import install_uvloop
    from watchbuy.site.cli import uvicorn_server
    from watchbuy.site.config import load_site_settings

    settings = load_site_settings(site_port=port)
    install_uvloop()
    asyncio.run(uvicorn_server(baseline_app(), settings).serve())
    return 0


# -- the load -------------------------------------------------------------------------------------


class _Conn:
    __slots__ = ("sock", "buf", "need", "started")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.need = -1  # bytes of the whole response once its head is in, else -1
        self.started = 0


def load(port: int, path: str, cookie: str, seconds: float, connections: int) -> dict:
    """GET ``path`` on ``connections`` keep-alive connections for ``seconds``, each sending its
    next request when the previous answer is complete.  Counts answers by status, and the CPU
    this process spent (the load generator's cost)."""
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: bench-pages\r\n"
               f"Accept: text/html\r\n" + (f"Cookie: {cookie}\r\n" if cookie else "")
               + "\r\n").encode()
    selector = selectors.EpollSelector() if hasattr(selectors, "EpollSelector") \
        else selectors.DefaultSelector()
    conns = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn = _Conn(sock)
        conns.append(conn)
        selector.register(sock, selectors.EVENT_READ, conn)
    statuses: dict[int, int] = {}
    latencies: list[int] = []
    errors = 0
    cpu0 = time.process_time()
    start = time.monotonic()
    end = start + seconds
    for conn in conns:
        conn.started = time.monotonic_ns()
        conn.sock.send(request)
    try:
        while conns:
            now = time.monotonic()
            if now >= end:
                break
            for key, _ in selector.select(end - now):
                conn = key.data
                try:
                    data = conn.sock.recv(262144)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    errors += 1
                    selector.unregister(conn.sock)
                    conn.sock.close()
                    conns.remove(conn)
                    continue
                conn.buf += data
                if conn.need < 0:
                    head_end = conn.buf.find(b"\r\n\r\n")
                    if head_end < 0:
                        continue
                    head = conn.buf[:head_end].lower()
                    at = head.find(b"\r\ncontent-length:")
                    if at < 0:
                        raise RuntimeError(f"{path}: an answer without content-length")
                    length = int(head[at + 17:head.find(b"\r\n", at + 2)
                                      if head.find(b"\r\n", at + 2) > 0 else None])
                    conn.need = head_end + 4 + length
                if len(conn.buf) < conn.need:
                    continue
                status = int(conn.buf[9:12])
                statuses[status] = statuses.get(status, 0) + 1
                finished = time.monotonic_ns()
                latencies.append(finished - conn.started)
                conn.buf = conn.buf[conn.need:]
                conn.need = -1
                conn.started = finished
                conn.sock.send(request)
    finally:
        elapsed = time.monotonic() - start
        cpu = time.process_time() - cpu0
        for conn in conns:
            selector.unregister(conn.sock)
            conn.sock.close()
        selector.close()
    answered = sum(statuses.values())
    latencies.sort()

    def pct(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1e6, 2) \
            if latencies else None

    return {"path": path, "connections": connections, "seconds": round(elapsed, 2),
            "answered": answered, "statuses": {str(k): v for k, v in statuses.items()},
            "closed_by_server": errors, "requests_per_s": round(answered / elapsed, 1),
            "latency_p50_ms": pct(0.5), "latency_p99_ms": pct(0.99),
            "load_cpu_s": round(cpu, 2),
            "load_cpu_us_per_request": round(cpu / answered * 1e6, 1) if answered else None}


def measure(server: SiteServer, path: str, cookie: str, seconds: float,
            connections: int) -> dict:
    load(server.port, path, cookie, min(0.5, seconds), connections)  # warm: templates, pools
    cpu = server.cpu_seconds()
    result = load(server.port, path, cookie, seconds, connections)
    after = server.cpu_seconds()
    if cpu is not None and after is not None:
        result["server_cpu_s"] = round(after - cpu, 2)
        if result["answered"]:
            result["server_cpu_us_per_request"] = round((after - cpu) / result["answered"]
                                                        * 1e6, 1)
    return result


def browser_cookie(base: str, path: str, session: str | None) -> str:
    """The cookies a browser would send after its first visit (the CSRF cookie it was given,
    and the session when logged in): without them every answer would mint a new CSRF cookie."""
    cookies = {"wb_session": session} if session else {}
    first = httpx.get(base + path, cookies=cookies, timeout=5)
    if first.status_code != 200:
        raise RuntimeError(f"{path}: {first.status_code}")
    cookies.update(dict(first.cookies))
    check = httpx.get(base + path, cookies=cookies, timeout=5)
    if check.status_code != 200 or "set-cookie" in check.headers:
        raise RuntimeError(f"{path}: {check.status_code}, set-cookie "
                           f"{check.headers.get('set-cookie')!r} on a second visit")
    if session and "Log out" not in check.text:
        raise RuntimeError(f"{path}: the session did not log in")
    return "; ".join(f"{k}={v}" for k, v in cookies.items())


def bench_one(kind: str, seconds: float, connections: int, profile: Path | None = None) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"wb-bench-pages-{kind}-"))
    data_dir = workdir / "data"
    servers: list[SiteServer] = []
    try:
        with database_url(kind, workdir) as url:
            seeded = asyncio.run(seed(url, 0, 10))
            asyncio.run(pin_a_product(url, seeded["product_id"]))
            port = free_port()
            # --profile: the site under cProfile, written when it stops (SIGINT, a clean exit)
            profiled = None if profile is None else [
                sys.executable, "-m", "cProfile", "-o", str(profile / f"site-{kind}.prof"),
                "-m", "watchbuy", "site", "--port", str(port)]
            site = SiteServer(url, data_dir, port, workdir / "site.log", command=profiled)
            servers.append(site)
            baseline_port = free_port()
            baseline = SiteServer(url, data_dir, baseline_port, workdir / "baseline.log",
                                  command=[sys.executable, "-m", "bench.site.pages",
                                           "--serve-baseline", str(baseline_port)])
            servers.append(baseline)
            site.wait_ready()
            baseline.wait_ready()
            slug = seeded["slug"]
            room = f"/room/{slug}"
            anonymous = browser_cookie(site.base, room, None)
            logged_in = browser_cookie(site.base, room, seeded["sender_session"])
            page = httpx.get(site.base + room, timeout=5, headers={"Cookie": anonymous})
            if HOST_NAME not in page.text or "Limited print" not in page.text:
                raise RuntimeError("the room page lacks its host or its pinned product")
            runs = {}
            for name, server, path, cookie in (
                    ("baseline_1", baseline, "/", ""),
                    ("room_anonymous", site, room, anonymous),
                    ("home", site, "/", anonymous),
                    ("room_logged_in", site, room, logged_in),
                    ("baseline_2", baseline, "/", "")):
                runs[name] = measure(server, path, cookie, seconds, connections)
                runs[name]["bytes"] = len(httpx.get(server.base + path, timeout=5,
                                                    headers={"Cookie": cookie}).content)
                log(f"{kind}: {name} {runs[name]['requests_per_s']} req/s "
                    f"(load {runs[name]['load_cpu_us_per_request']} us/req, server "
                    f"{runs[name].get('server_cpu_us_per_request')} us/req)")
            for server in servers:
                server.stop()
            servers.clear()
            if profile is not None:
                print_profile(profile / f"site-{kind}.prof")
            base_rps = (runs["baseline_1"]["requests_per_s"]
                        + runs["baseline_2"]["requests_per_s"]) / 2
            ratios = {name: round(runs[name]["requests_per_s"] / base_rps, 4)
                      for name in ("room_anonymous", "home", "room_logged_in")}
            # The same ratio from the server's CPU per request: what one saturated core would
            # serve.  Steadier than req/s when other work shares the machine (neither server
            # then has its core to itself, and how much it gets varies within a run).
            base_cpu = [runs[n].get("server_cpu_us_per_request") for n in ("baseline_1",
                                                                            "baseline_2")]
            cpu_ratios = {}
            if all(base_cpu):
                for name in ratios:
                    page_cpu = runs[name].get("server_cpu_us_per_request")
                    if page_cpu:
                        cpu_ratios[name] = round(sum(base_cpu) / 2 / page_cpu, 4)
            bad = {name: r["statuses"] for name, r in runs.items()
                   if set(r["statuses"]) != {"200"} or r["closed_by_server"]}
            return {"db": kind, "baseline_requests_per_s": round(base_rps, 1),
                    "ratios": ratios, "cpu_ratios": cpu_ratios, "runs": runs, "non_200": bad}
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def pin_a_product(url: str, product_id: int) -> None:
    """The host pins the benchmark's product, as in a show: the room page then renders it."""
    from watchbuy.db import queries
    from watchbuy.db.database import Database

    db = Database(url)
    await db.connect()
    try:
        product = await queries.product(db, product_id)
        channel = await queries.channel_by_host(db, product["host_id"])
        await queries.set_pinned(db, channel["id"], product_id)
    finally:
        await db.disconnect()


def print_profile(path: Path, lines: int = 40) -> None:
    """The profiled site's functions by cumulative time (all five runs, the warm-ups too)."""
    import pstats

    if not path.exists():
        log(f"no profile at {path}: the site did not exit cleanly")
        return
    print(f"\n{path} (python -m pstats {path}):")
    pstats.Stats(str(path)).sort_stats("cumulative").print_stats(lines)


def print_table(results: list[dict]) -> None:
    print(f"\n{'db':8} {'run':16} {'req/s':>9} {'ratio':>7} {'cpu ratio':>9} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'server us/req':>13} {'load us/req':>11} {'bytes':>6}")
    for r in results:
        for name, run in r["runs"].items():
            ratio = r["ratios"].get(name)
            cpu = r["cpu_ratios"].get(name)
            print(f"{r['db']:8} {name:16} {run['requests_per_s']:>9} "
                  f"{'' if ratio is None else f'{ratio:.1%}':>7} "
                  f"{'' if cpu is None else f'{cpu:.1%}':>9} "
                  f"{run['latency_p50_ms']!s:>8} {run['latency_p99_ms']!s:>8} "
                  f"{run.get('server_cpu_us_per_request')!s:>13} "
                  f"{run['load_cpu_us_per_request']!s:>11} {run['bytes']:>6}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.site.pages",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--db", default="sqlite,mariadb", help="sqlite,mariadb (default both)")
    parser.add_argument("--seconds", type=float, help="per URL (default 5, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="2 s per URL")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run the site under cProfile, write DIR/site-<db>.prof and print "
                        "its top functions (the ratios of such a run are not comparable)")
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline:
        return serve_baseline(args.serve_baseline)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        args.profile = args.profile.resolve()  # the site runs in its own working directory
    # the baseline server is ``-m bench.site.pages`` run from the servers' working directory
    root = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    if taskset(1) and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {1})  # the load stays off the servers' CPU
    results = []
    for kind in [k.strip() for k in args.db.split(",") if k.strip()]:
        if kind not in ("sqlite", "mariadb"):
            parser.error(f"unknown database {kind!r}")
        results.append(bench_one(kind, seconds, args.connections, args.profile))
    print_table(results)
    report = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "cpu": cpu_model(),
                          "loadavg_1m": os.getloadavg()[0]},
              "args": {"seconds": seconds, "connections": args.connections,
                       "profiled": args.profile is not None},
              "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0 if all(not r["non_200"] for r in results) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
