"""The bulk viewer process: thousands of HTTP-FLV viewers on one epoll loop, bytes counted only.

Run by the harness as ``python -m bench.fanout.bulk '<plan json>'`` (the plan of
:func:`bench.fanout.load.viewer_plan`); writes one JSON object to the plan's ``out`` file.

Why a second load generator: the parsing viewers of ``bench/fanout/load.py`` undo the chunking
and parse every FLV tag in Python, which costs the load CPU about what the server spends sending,
so past a few thousand viewers the harness measured its own limit, not the server's.  A viewer
here does what costs least and still proves delivery: it sends the request, checks the status
line, and counts the bytes that arrive.  One ``select.epoll`` loop serves every socket; each
turn sleeps ``batch_ms`` first, so one ``recv_into`` (into one large, reused buffer) takes what
the kernel gathered meanwhile -- tens of kilobytes instead of one tag -- and the load's CPU per
viewer falls far below the server's.  Latency is not measured here (batching would add to it):
the harness runs a few parsing probes (``load.py``) beside this process for that.

Per viewer: the bytes received inside the window ``[t_start, t_end)``, the status, errors, and
whether the server closed it early.  The harness compares the window's bytes to the stream's bit
rate to decide whether a viewer kept up.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import sys
import time
from array import array

from bench.fanout.load import raise_fd_limit, write_result

RECV_BUFFER = 1 << 20  # one buffer for every recv: the bytes are counted, never kept


def run_plan(plan: dict) -> dict:
    host, port = plan["host"], plan["port"]
    paths: list[str] = plan["paths"]
    count: int = plan["viewers"]
    t_start, t_end = plan["t_start"], plan["t_end"]
    connect_at, spread = plan["connect_at"], plan["connect_spread"]
    batch = plan.get("batch_ms", 250) / 1000
    requests = [
        (f"GET {p} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: watchbuy-bench-bulk\r\n"
         "Accept: */*\r\n\r\n").encode()
        for p in paths
    ]
    socks: list[socket.socket | None] = [None] * count
    total = array("q", [0]) * count  # bytes received so far
    status = array("h", [0]) * count  # HTTP status; 0 until the head arrived
    sent = bytearray(count)  # 1 once the request went out
    closed_at = array("d", [0.0]) * count
    errors: list[str] = [""] * count
    at_start: array | None = None
    at_end: array | None = None
    by_fd: dict[int, int] = {}
    ep = select.epoll()
    buf = bytearray(RECV_BUFFER)
    IN, OUT, ERR = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR | select.EPOLLHUP

    def drop(i: int, reason: str = "") -> None:
        sock = socks[i]
        if sock is None:
            return
        if reason and not errors[i]:
            errors[i] = reason
        closed_at[i] = time.monotonic()
        by_fd.pop(sock.fileno(), None)
        try:
            ep.unregister(sock.fileno())
        except OSError:
            pass
        sock.close()
        socks[i] = None

    opened = 0
    cpu0 = cpu1 = 0.0
    while True:
        now = time.monotonic()
        if at_start is None and now >= t_start:
            at_start, cpu0 = array("q", total), sum(os.times()[:2])
        if now >= t_end:
            at_end, cpu1 = array("q", total), sum(os.times()[:2])
            break
        # the connects due by now, paced over the spread as the parsing viewers are
        while opened < count and now >= connect_at + spread * opened / count:
            i = opened
            opened += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex((host, port))
            if code not in (0, errno.EINPROGRESS):
                errors[i] = f"connect: {os.strerror(code)}"
                sock.close()
                continue
            socks[i] = sock
            by_fd[sock.fileno()] = i
            ep.register(sock.fileno(), OUT)
        turn = time.monotonic()
        for fd, event in ep.poll(batch, 65536):
            i = by_fd.get(fd)
            if i is None:
                continue
            sock = socks[i]
            if not sent[i]:
                if event & ERR:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    drop(i, f"connect: {os.strerror(code) if code else 'refused'}")
                    continue
                try:
                    sock.send(requests[i % len(requests)])  # ~100 bytes: always fits
                except OSError as exc:
                    drop(i, f"send: {exc}")
                    continue
                sent[i] = 1
                ep.modify(fd, IN)
                continue
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError as exc:
                drop(i, f"{type(exc).__name__}: {exc}")
                continue
            if n == 0:
                drop(i, "server closed the stream" if time.monotonic() < t_end else "")
                continue
            if not status[i]:
                # the head comes in the first read (the server writes it with the first tags)
                if buf[:5] != b"HTTP/" or n < 12:
                    drop(i, f"bad status line {bytes(buf[:40])!r}")
                    continue
                status[i] = int(buf[9:12])
                if status[i] != 200:
                    drop(i, f"HTTP {status[i]}")
                    continue
            total[i] += n
        # let the kernel gather more bytes per socket before the next turn
        rest = batch - (time.monotonic() - turn)
        if rest > 0:
            time.sleep(rest)
    for i in range(count):
        if socks[i] is not None:
            socks[i].close()
    ep.close()
    if at_start is None:
        at_start = array("q", total)
    rows = [
        {
            "path": paths[i % len(paths)],
            "error": errors[i] or ("not connected before the window ended" if not sent[i] else ""),
            "status": status[i],
            "bytes": total[i],
            "bytes_window": at_end[i] - at_start[i],
            "closed_early": bool(closed_at[i] and closed_at[i] < t_end and errors[i]),
        }
        for i in range(count)
    ]
    return {
        "viewers": rows,
        "hist": {},
        "late": [],
        "bulk": True,
        "load_cpu_s": round(cpu1 - cpu0, 3),
        "window_s": round(t_end - t_start, 3),
        "pid": os.getpid(),
    }


def main(argv: list[str]) -> int:
    import json

    plan = json.loads(argv[0])
    raise_fd_limit()
    write_result(plan, run_plan(plan))  # one epoll loop of its own: no asyncio here
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
