"""``python -m bench.site.fanout``: one room's live events to N websockets, measured from outside.

Issue 15's "live events to a crowd": ``watchbuy site`` (uvicorn; ``--workers N`` processes
sharing Redis) serves one room; N viewers join it from ``wsload`` (bench/site/wsload.c,
compiled here with the system ``cc``: one epoll loop, batched reads with a short nap between
rounds (``--client-nap-us``), a few hundred bytes of state per socket, so the load costs less
CPU per socket than the server); ``--senders`` logged-in senders (1 by default) each post chat
messages ``--spacing`` seconds apart, all at the same moments, each stamped with its send time
(CLOCK_MONOTONIC, the clock wsload reads on arrival) just before it goes to the server.  Chat takes the same path as every
room event (pins, stock, sales, reactions: ``publish_room_event`` → broker → each viewer's
queue → its socket), plus the database write of the message, so its send→arrival time bounds
theirs.

Prints deliveries (and the fewest viewers any message reached), send→arrival p50/p99/max over
every delivery, the sockets the server closed, and CPU: the site's processes and wsload's over
the message phase, each also per delivery (the site's also over an idle phase of the same
length just before, with the same sockets open: what the deliveries themselves cost).  Exits 1 unless every message reached every
joined viewer.

    python -m bench.site.fanout --viewers 5000
    python -m bench.site.fanout --viewers 5000 --workers 2      # Redis at WATCHBUY_BENCH_REDIS_URL
    python -m bench.site.fanout --viewers 5000 --senders 10     # a busy chat: 10 messages at once

Only loopback; every wait is bounded; the site and wsload are stopped on any error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from bench.site.__main__ import database_url, percentile, taskset
from bench.site.rush_outside import Site

HERE = Path(__file__).resolve().parent


def log(*parts: object) -> None:
    print("[fanout]", *parts, file=sys.stderr, flush=True)


async def seed(url: str, senders: int) -> tuple[str, list[str]]:
    """A host's room and logged-in chat senders: (room slug, the senders' session tokens)."""
    from watchbuy.db import queries
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
        host_id = await queries.create_user(db, "host@fanout.test", "Fanout Host", "x", True)
        channel = await ensure_channel(db, host_id, "Fanout Host")
        sessions = []
        for n in range(senders):
            sender = await queries.create_user(db, f"sender{n}@fanout.test", f"Chat Sender {n}",
                                               "x", False)
            sessions.append(await security.start_session(db, sender, 1))
        return channel["slug"], sessions
    finally:
        await db.disconnect()


def build_wsload(workdir: Path) -> Path:
    binary = workdir / "wsload"
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(binary), str(HERE / "wsload.c")],
                   check=True, timeout=120)
    return binary


def cpu_of(pid: int) -> float:
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def wait_line(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    """The first stderr line of ``proc`` starting with ``prefix`` (bounded wait)."""
    deadline = time.monotonic() + timeout
    pending = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                raise RuntimeError("wsload exited before joining")
            pending += chunk
            for line in pending.decode(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
    raise RuntimeError(f"wsload: no {prefix!r} within {timeout} s")


async def send_messages(port: int, slug: str, sessions: list[str], count: int,
                        spacing: float) -> list:
    """Each sender says ``count`` messages, ``spacing`` s apart, all senders at the same
    moments (a busy chat: a round of len(sessions) messages at once); message ``seq`` of sender
    ``i`` carries the id ``seq * len(sessions) + i``."""
    errors: list = []
    start = time.monotonic() + 1.0  # every sender connected by then
    await asyncio.gather(*(_sender(port, slug, session, i, len(sessions), count, spacing, start,
                                   errors) for i, session in enumerate(sessions)))
    await asyncio.sleep(min(spacing, 3.0))  # let the last fan-out finish
    return errors


async def _sender(port: int, slug: str, session: str, index: int, senders: int, count: int,
                  spacing: float, start: float, errors: list) -> None:
    from websockets.asyncio.client import connect

    async with connect(f"ws://127.0.0.1:{port}/ws/room/{slug}",
                       additional_headers={"Cookie": f"wb_session={session}"},
                       open_timeout=20, ping_interval=None, max_queue=None) as sender:
        hello = json.loads(await asyncio.wait_for(sender.recv(), 20))
        if not hello.get("can_chat"):
            raise RuntimeError("the chat sender is not logged in")
        for seq in range(count):
            await asyncio.sleep(max(0.0, start + seq * spacing - time.monotonic()))
            await sender.send(json.dumps({"type": "chat", "text": f"bench {seq * senders + index} "
                                                                  f"{time.monotonic_ns()}"}))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # its own copy (or an error) comes back
                event = json.loads(await asyncio.wait_for(sender.recv(), 10))
                if event.get("type") == "error":
                    errors.append(event.get("error"))
                    break
                if event.get("type") == "chat" and event.get("user_id") == hello["user_id"]:
                    break


def median_of(by_seq: dict[int, list[float]], pick: Callable[[list[float]], float]) -> float | None:
    """The median over the messages of ``pick`` (min: the first viewer, max: the last) of
    each message's arrival times."""
    picked = [pick(got) for got in by_seq.values() if got]
    return round(percentile(picked, 50), 1) if picked else None


def run(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="wb-fanout-"))
    site = load = None
    try:
        binary = build_wsload(workdir)
        with database_url(args.db, workdir) as url:
            slug, sessions = asyncio.run(seed(url, args.senders))
            site = Site(url, workdir / "data", args.workers, args.pin, workdir / "site.log",
                        extra_env={"WATCHBUY_WS_MAX_PER_IP": str(args.viewers + args.senders
                                                                 + 100),
                                   # a message per --spacing per sender: over the default 5 / 10 s
                                   "WATCHBUY_CHAT_RATE": str(args.messages + 10)})
            site.wait_ready()
            log(f"site up on port {site.port}: {' '.join(site.command)}")
            load = subprocess.Popen(
                [*(taskset(1) if args.pin else []), str(binary), "127.0.0.1", str(site.port),
                 f"/ws/room/{slug}", str(args.viewers), str(args.inflight),
                 str(args.client_nap_us)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            began = time.monotonic()
            joined, join_failed = map(int, wait_line(load, "joined", args.join_timeout).split()[1:])
            join_seconds = time.monotonic() - began
            log(f"{joined} viewers joined ({join_failed} failed) in {join_seconds:.1f} s")
            time.sleep(1.0)  # the last joiners' hello frames are out
            phase = args.messages * args.spacing + min(args.spacing, 3.0)
            # What N open sockets cost with nothing said (keep-alive pings, timers), over a
            # phase as long as the messages': subtracted to get the cost of the deliveries.
            idle_before = site.cpu_seconds()
            time.sleep(phase)
            idle_cpu = site.cpu_seconds() - idle_before
            server_before, load_before = site.cpu_seconds(), cpu_of(load.pid)
            errors = asyncio.run(send_messages(site.port, slug, sessions, args.messages,
                                               args.spacing))
            server_cpu, load_cpu = site.cpu_seconds() - server_before, cpu_of(load.pid) - load_before
            load.send_signal(signal.SIGUSR1)
            out, _ = load.communicate(timeout=60)
            load = None
            lines = out.decode().splitlines()
            closed = int(lines[-1].split()[1]) if lines and lines[-1].startswith("closed") else -1
            by_seq: dict[int, list[float]] = {}
            for line in lines[:-1]:
                seq, _, ns = line.split()
                by_seq.setdefault(int(seq), []).append(int(ns) / 1e6)
            every = [ms for got in by_seq.values() for ms in got]
            said = args.messages * args.senders
            received_min = min((len(by_seq.get(s, [])) for s in range(said)), default=0)
            alive = site.proc.poll() is None
            site.stop()
            site = None
            deliveries = len(every)
            return {
                "db": args.db, "workers": args.workers, "viewers": args.viewers,
                "joined": joined, "join_failed": join_failed,
                "join_seconds": round(join_seconds, 1), "messages": args.messages,
                "senders": args.senders,
                "spacing_s": args.spacing, "client_nap_us": args.client_nap_us,
                "send_errors": errors,
                "deliveries": deliveries, "expected": joined * said,
                "received_min": received_min, "closed_by_server": closed,
                "p50_ms": round(percentile(every, 50), 1) if every else None,
                "p99_ms": round(percentile(every, 99), 1) if every else None,
                "max_ms": round(max(every), 1) if every else None,
                # per round of the senders' messages (one message a round with one sender)
                "per_round_p99_ms": [round(percentile([ms for s in range(r * args.senders,
                                                                         (r + 1) * args.senders)
                                                       for ms in by_seq.get(s, [])], 99) or -1, 1)
                                     for r in range(args.messages)],
                # per message: its first viewer (the server's path before the fan-out: the
                # chat's checks and insert, the publish) and its last (plus the whole fan-out),
                # the medians over the messages: the model's inputs
                "first_viewer_ms_median": median_of(by_seq, min),
                "last_viewer_ms_median": median_of(by_seq, max),
                "server_cpu_s": round(server_cpu, 2), "load_cpu_s": round(load_cpu, 2),
                "server_idle_cpu_s": round(idle_cpu, 2),
                "server_us_per_delivery_over_idle": round(
                    1e6 * max(0.0, server_cpu - idle_cpu) / deliveries, 2) if deliveries else None,
                "server_cpu_pct": round(100 * server_cpu / phase, 1),
                "load_cpu_pct": round(100 * load_cpu / phase, 1),
                "server_us_per_delivery": round(1e6 * server_cpu / deliveries, 2)
                if deliveries else None,
                "load_us_per_delivery": round(1e6 * load_cpu / deliveries, 2)
                if deliveries else None,
                "loadavg_1m": round(os.getloadavg()[0], 2),
                "correct": alive and not errors and deliveries == joined * said
                and joined == args.viewers,
                "command": " ".join(["python -m bench.site.fanout", *sys.argv[1:]]),
            }
    finally:
        if load is not None:
            load.kill()
            load.wait(5)
        if site is not None:
            site.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=["sqlite", "mysql"], default="sqlite")
    parser.add_argument("--workers", type=int, default=1,
                        help="site processes (more than 1 uses Redis)")
    parser.add_argument("--viewers", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--spacing", type=float, default=1.0, help="seconds between messages")
    parser.add_argument("--senders", type=int, default=1,
                        help="logged-in senders, each saying --messages at the same moments "
                        "(a busy chat: rounds of this many messages at once)")
    parser.add_argument("--inflight", type=int, default=100, help="handshakes at once")
    parser.add_argument("--client-nap-us", type=int, default=250,
                        help="wsload sleeps this long between rounds of reads, so that it reads "
                        "in batches and the server's writes do not wake it one by one (0: no "
                        "nap); arrivals are stamped at most this late (bench/site/wsload.c)")
    parser.add_argument("--join-timeout", type=float, default=300.0)
    parser.add_argument("--pin", action="store_true",
                        help="the site on CPU 0, wsload on CPU 1 (taskset)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
