"""The viewer load process: many HTTP-FLV viewers on one asyncio loop, every tag timed.

Run by the harness as ``python -m bench.fanout.load '<plan json>'``; writes one JSON object to
the plan's ``out`` file when done.  Each viewer sends a plain ``GET /live/<name>.flv HTTP/1.1`` (as mpegts.js in a
browser does), undoes the chunked transfer encoding, parses the FLV incrementally with
``FlvReader`` and notes, for each audio/video tag that arrives inside the measurement window,
``arrival (monotonic) - tag timestamp``.  All processes share the kernel's monotonic clock, so
the window ``[t_start, t_end)`` chosen by the harness means the same moments everywhere.

Per viewer the result holds: video frames received in the window, the media time they span, the
added-latency figures (``arrival - timestamp`` minus that viewer's minimum in the window) and
errors.  The pooled added latency goes back as a histogram of 0.1 ms bins, so the harness can
merge processes exactly.  Late joiners connect at given moments and report connect → first
video keyframe tag.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from array import array
from collections import Counter

from watchbuy.engine.codecs import flvmux

BIN = 10000  # histogram bins per second: 0.1 ms
HEADER_LIMIT = 16384


class HttpFlvViewer(asyncio.Protocol):
    """One HTTP-FLV viewer. ``mode``: "load" (timed), "late" (stop at the first keyframe)."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        t_start: float,
        t_end: float,
        mode: str = "load",
        done: asyncio.Future | None = None,
    ) -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "User-Agent: watchbuy-bench\r\nAccept: */*\r\n\r\n"
        ).encode()
        self.path = path
        self.t_start = t_start
        self.t_end = t_end
        self.mode = mode
        self.done = done
        self.transport = None
        self.reader = flvmux.FlvReader()
        self.head = b""
        self.in_body = False
        self.chunked = False
        self.remaining = 0
        self.skip = 0
        self.line = b""
        self.status = 0
        self.error = ""
        self.t_connect = 0.0
        self.t_connected = 0.0
        self.t_keyframe = 0.0
        self.closed_at = 0.0
        self.closed_by_us = False
        self.bytes = 0
        self.tags = 0
        self.vframes = 0  # video tags inside the window
        self.first_ts = -1  # first/last media timestamp inside the window
        self.last_ts = -1
        self.lat = array("d")  # arrival - timestamp/1000 of media tags inside the window
        self.lat_t = array("d")  # their arrival times (for the end-of-window lag)

    # -- asyncio ------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.t_connected = time.monotonic()
        transport.write(self.request)

    def connection_lost(self, exc) -> None:
        self.closed_at = time.monotonic()
        if exc is not None and not self.error:
            self.error = f"{type(exc).__name__}: {exc}"
        self._finish()

    def eof_received(self):
        if not self.error and self.mode == "load" and time.monotonic() < self.t_end:
            self.error = "server closed the stream"
        return False

    def _finish(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(self)

    def close(self) -> None:
        self.closed_by_us = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def fail(self, reason: str) -> None:
        if not self.error:
            self.error = reason
        if self.transport is not None:
            self.transport.abort()
        self._finish()

    # -- bytes in -----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.bytes += len(data)
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > HEADER_LIMIT:
                    self.fail("response header too long")
                return
            head, data = self.head[:end].decode("latin-1"), self.head[end + 4 :]
            self.head = b""
            self.in_body = True
            lines = head.split("\r\n")
            try:
                self.status = int(lines[0].split()[1])
            except (IndexError, ValueError):
                self.fail(f"bad status line {lines[0]!r}")
                return
            if self.status != 200:
                self.fail(f"HTTP {self.status}")
                return
            self.chunked = any(
                line.lower().startswith("transfer-encoding:") and "chunked" in line.lower()
                for line in lines[1:]
            )
            if not data:
                return
        try:
            if self.chunked:
                for piece in self._dechunk(data):
                    self._tags(self.reader.feed(piece), now)
            else:
                self._tags(self.reader.feed(data), now)
        except Exception as exc:  # a broken stream: record it, drop this viewer only
            self.fail(f"{type(exc).__name__}: {exc}")

    def _dechunk(self, data: bytes) -> list:
        """The body bytes in ``data`` (chunked transfer coding), as memoryview pieces."""
        out = []
        view = memoryview(data)
        pos, n = 0, len(data)
        while pos < n:
            if self.remaining:
                take = min(self.remaining, n - pos)
                out.append(view[pos : pos + take])
                pos += take
                self.remaining -= take
                if not self.remaining:
                    self.skip = 2  # the CRLF after the chunk data
            elif self.skip:
                take = min(self.skip, n - pos)
                pos += take
                self.skip -= take
            else:
                if self.line:
                    data = self.line + bytes(view[pos:])
                    view = memoryview(data)
                    pos, n = 0, len(data)
                    self.line = b""
                end = data.find(b"\r\n", pos)
                if end < 0:
                    self.line = bytes(view[pos:])
                    if len(self.line) > 64:
                        raise ValueError("bad chunk size line")
                    break
                size = int(bytes(view[pos:end]).split(b";")[0], 16)
                pos = end + 2
                if size == 0:
                    self.transport.close()
                    break
                self.remaining = size
        return out

    def _tags(self, tags: list, now: float) -> None:
        if not tags:
            return
        self.tags += len(tags)
        if self.mode == "late":
            for tag_type, _ts, payload in tags:
                if tag_type == 9:
                    _codec, _ft, key, header = flvmux.inspect_video(payload)
                    if key and not header:
                        self.t_keyframe = now
                        self.close()
                        self._finish()
                        return
            return
        if self.t_start <= now < self.t_end:
            lat, lat_t = self.lat, self.lat_t
            for tag_type, ts, _payload in tags:
                if tag_type == 9:
                    self.vframes += 1
                elif tag_type != 8:
                    continue
                lat.append(now - ts * 0.001)
                lat_t.append(now)
                if self.first_ts < 0:
                    self.first_ts = ts
                self.last_ts = ts

    # -- results ------------------------------------------------------------------------------
    def summary(self, hist: Counter) -> dict:
        """This viewer's figures; its added latencies go into the pooled histogram ``hist``."""
        out = {
            "path": self.path,
            "error": self.error,
            "status": self.status,
            "bytes": self.bytes,
            "tags": self.tags,
            "vframes": self.vframes,
            "span_ms": (self.last_ts - self.first_ts) if self.first_ts >= 0 else 0,
            "connected": round(self.t_connected, 6),
            "closed_early": bool(
                self.closed_at and not self.closed_by_us and self.closed_at < self.t_end
            ),
        }
        lat = self.lat
        if lat:
            base = min(lat)
            added = sorted(x - base for x in lat)
            for x in added:
                hist[int(x * BIN)] += 1
            out["added_p50_ms"] = round(added[len(added) // 2] * 1000, 2)
            out["added_p99_ms"] = round(
                added[min(len(added) - 1, int(len(added) * 0.99))] * 1000, 2
            )
            out["added_max_ms"] = round(added[-1] * 1000, 2)
            # the lag at the end of the window: did this viewer fall behind as time went on?
            tail = [x - base for x, t in zip(lat, self.lat_t, strict=True) if t >= self.t_end - 1.0]
            out["end_lag_ms"] = round(sum(tail) / len(tail) * 1000, 2) if tail else None
        return out


async def open_viewer(loop, host: str, port: int, viewer: HttpFlvViewer) -> HttpFlvViewer:
    viewer.t_connect = time.monotonic()
    try:
        await loop.create_connection(lambda: viewer, host, port)
    except OSError as exc:
        viewer.error = f"connect: {exc}"
        viewer._finish()
    return viewer


async def probe_keyframe(host: str, port: int, path: str, timeout: float) -> float:
    """Connect one viewer and wait for its first video keyframe; the seconds it took."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    viewer = HttpFlvViewer(host, port, path, 0, 0, mode="late", done=done)
    try:
        await open_viewer(loop, host, port, viewer)
        await asyncio.wait_for(done, timeout)
    finally:
        viewer.close()
    if not viewer.t_keyframe:
        raise RuntimeError(viewer.error or "no keyframe")
    return viewer.t_keyframe - viewer.t_connect


async def _sleep_until(t: float) -> None:
    # The loop's timers may fire up to a millisecond early: sleep again for what is left.
    for _ in range(100):
        delay = t - time.monotonic()
        if delay <= 0:
            return
        await asyncio.sleep(max(delay, 0.0005))


async def _late_joiner(loop, host, port, path, at: float, timeout: float) -> dict:
    await _sleep_until(at)
    done = loop.create_future()
    viewer = HttpFlvViewer(host, port, path, 0, 0, mode="late", done=done)
    await open_viewer(loop, host, port, viewer)
    try:
        await asyncio.wait_for(done, timeout)
    except TimeoutError:
        viewer.fail(f"no keyframe within {timeout:.0f} s")
    viewer.close()
    ttfk = (viewer.t_keyframe - viewer.t_connect) if viewer.t_keyframe else None
    return {
        "at": at,
        "ttfk_ms": round(ttfk * 1000, 2) if ttfk is not None else None,
        "error": viewer.error,
    }


def viewer_plan(
    server,
    paths: list[str],
    viewers: int,
    *,
    connect_at: float,
    connect_spread: float,
    t_start: float,
    t_end: float,
    late_at: list[float] | None = None,
) -> dict:
    """The plan :func:`run_plan` reads: ``viewers`` viewers of ``server``'s HTTP port, over
    ``paths`` in turn, connecting evenly over ``connect_spread`` s from ``connect_at``, measured
    in ``[t_start, t_end)``; late joiners at the moments ``late_at``."""
    return {
        "host": "127.0.0.1",
        "port": server.http_port,
        "paths": paths,
        "viewers": viewers,
        "connect_at": connect_at,
        "connect_spread": connect_spread,
        "t_start": t_start,
        "t_end": t_end,
        "late_at": late_at or [],
    }


async def run_plan(plan: dict) -> dict:
    """Open the viewers as planned, keep them until the window ends, summarise."""
    loop = asyncio.get_running_loop()
    host, port = plan["host"], plan["port"]
    paths: list[str] = plan["paths"]
    count: int = plan["viewers"]
    t_start, t_end = plan["t_start"], plan["t_end"]
    connect_at, spread = plan["connect_at"], plan["connect_spread"]
    viewers = [
        HttpFlvViewer(host, port, paths[i % len(paths)], t_start, t_end) for i in range(count)
    ]
    deadline = t_end + plan.get("grace", 20.0)

    async def connect_all() -> None:
        # Bounded: one pass over the list, each connect paced to its slot in the spread.
        for i, viewer in enumerate(viewers):
            await _sleep_until(connect_at + spread * i / max(1, count))
            if time.monotonic() > t_end:
                viewer.error = "not connected before the window ended"
                continue
            await open_viewer(loop, host, port, viewer)

    late_tasks = [
        asyncio.ensure_future(
            _late_joiner(loop, host, port, paths[0], at, plan.get("late_timeout", 10.0))
        )
        for at in plan.get("late_at", [])
    ]
    connector = asyncio.ensure_future(connect_all())
    await _sleep_until(t_start)
    cpu0 = sum(os.times()[:2])
    await _sleep_until(t_end)
    cpu1 = sum(os.times()[:2])
    connector.cancel()
    late = []
    if late_tasks:
        done, pending = await asyncio.wait(
            late_tasks, timeout=max(0.1, deadline - time.monotonic())
        )
        for task in pending:
            task.cancel()
        late = [t.result() for t in late_tasks if t.done() and not t.cancelled()]
    for viewer in viewers:
        viewer.close()
    await asyncio.sleep(0.05)
    hist: Counter = Counter()
    rows = [v.summary(hist) for v in viewers]
    return {
        "viewers": rows,
        "hist": {str(k): v for k, v in hist.items()},
        "late": late,
        "load_cpu_s": round(cpu1 - cpu0, 3),
        "window_s": round(t_end - t_start, 3),
        "pid": os.getpid(),
    }


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_load_process(argv: list[str], run_plan) -> int:
    """A load process's body: the plan from ``argv[0]``, run (uvloop when there is one), the
    result written to the plan's ``out`` file."""
    plan = json.loads(argv[0])
    raise_fd_limit()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    write_result(plan, asyncio.run(run_plan(plan)))
    return 0


def write_result(plan: dict, result: dict) -> None:
    """A load process's result, to the plan's ``out`` file: a file, not stdout, because the event
    loop may leave stdout non-blocking, and a big result then stops at the pipe's 64 KiB."""
    out = plan["out"]
    with open(out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out + ".tmp", out)


def main(argv: list[str]) -> int:
    return run_load_process(argv, run_plan)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
