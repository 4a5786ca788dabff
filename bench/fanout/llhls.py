"""The LL-HLS viewer process: many low-latency HLS players on one event loop, as hls.js does it.

Run by the harness as ``python -m bench.fanout.llhls '<plan json>'`` (``bench.fanout --protocol
llhls``); writes one JSON object to the plan's ``out`` file.

Each viewer is what hls.js in ``lowLatencyMode`` asks of a node, on one keep-alive HTTP/1.1
connection: the plain playlist once, the init segment, the parts from the playlist's last
independent part on, then for ever a *blocking playlist reload* for the part named by
``EXT-X-PRELOAD-HINT`` (``index.m3u8?_HLS_msn=M&_HLS_part=P``) together with that part itself
(hls.js fetches the hinted part in parallel; here both go pipelined in one write), both held by
the node until the part exists, and a fetch of any other part the playlist lists that this
viewer has not fetched.  Two requests per part and viewer: the node's real LL-HLS work
(holding, waking, answering).

Per viewer: the media seconds (summed part durations) fetched inside the window, the bytes, and
for every part fetched in the window its *delivery delay*: the wall clock when its last byte
arrived minus the wall clock its media ended (the segment's ``EXT-X-PROGRAM-DATE-TIME`` plus the
durations before it and its own).  A part cannot leave before its media ends, so this is what
the node and the network add on top of the part duration.  The histogram (0.1 ms bins) goes
back pooled, as the HTTP-FLV load process does.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from array import array
from collections import Counter, deque
from datetime import datetime

from bench.fanout.load import BIN, _sleep_until, run_load_process

HEAD_LIMIT = 16384


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests may be pipelined, answered in order
    (Content-Length bodies)."""

    def __init__(self, host: str, port: int) -> None:
        self.host_header = f"Host: {host}:{port}\r\n".encode()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1  # body bytes still to come; -1 while the head is awaited
        self.status = 0
        self.body: bytearray | None = None
        self.received = 0
        self.waiting: deque[tuple[asyncio.Future, bool]] = deque()  # (answer, keep the body)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        while self.waiting:
            waiter, _ = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError(str(exc) if exc else "closed by server"))

    def get(self, *requests: tuple[str, bool]) -> list[asyncio.Future]:
        """Send ``GET path`` for each ``(path, keep the body)`` in one write (pipelined); a
        future for each gives ``(status, body or None, body length)``."""
        loop = asyncio.get_running_loop()
        futures = []
        out = b""
        for path, keep in requests:
            futures.append(loop.create_future())
            self.waiting.append((futures[-1], keep))
            out += (b"GET " + path.encode() + b" HTTP/1.1\r\n" + self.host_header
                    + b"User-Agent: watchbuy-bench-llhls\r\n\r\n")
        self.transport.write(out)
        return futures

    async def get1(self, path: str, keep: bool) -> tuple:
        return await self.get((path, keep))[0]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.buf and self.waiting:
            waiter, keep = self.waiting[0]
            if self.need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > HEAD_LIMIT:
                        self.waiting.popleft()
                        waiter.set_exception(ValueError("response head too long"))
                    return
                head = bytes(self.buf[:end]).lower()
                del self.buf[: end + 4]
                self.status = int(head[9:12])
                at = head.find(b"content-length:")
                if at >= 0:
                    end = head.find(b"\r\n", at)
                    self.need = int(head[at + 15 : end if end >= 0 else len(head)])
                else:
                    self.need = 0
                self.body = bytearray() if keep else None
                self.received = 0
            take = min(self.need, len(self.buf))
            if self.body is not None:
                self.body += self.buf[:take]
            del self.buf[:take]
            self.need -= take
            self.received += take
            if self.need:
                return
            self.need = -1
            self.waiting.popleft()
            if not waiter.done():
                waiter.set_result((self.status, self.body, self.received))


_PDT_CACHE: dict[str, float] = {}


def _pdt(text: str) -> float:
    at = _PDT_CACHE.get(text)
    if at is None:
        if len(_PDT_CACHE) > 4096:
            _PDT_CACHE.clear()
        at = _PDT_CACHE[text] = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    return at


def parse_playlist(text: str) -> tuple[list[tuple], tuple[int, int, str] | None]:
    """The parts of a media playlist, ``(msn, index, uri, media end (wall clock), duration,
    independent)`` in order, and the preload hint's ``(msn, index, uri)``."""
    parts: list[tuple] = []
    msn = 0
    index = 0
    clock = 0.0  # the wall clock where the next part's media ends, less its duration
    hint = None
    for line in text.split("\n"):
        if line.startswith("#EXT-X-PART:"):
            at = line.find("DURATION=") + 9
            duration = float(line[at : line.find(",", at)])
            at = line.find('URI="') + 5
            clock += duration
            parts.append((msn, index, line[at : line.find('"', at)], clock, duration,
                          "INDEPENDENT=YES" in line))
            index += 1
        elif line.startswith("#EXT-X-PROGRAM-DATE-TIME:"):
            clock = _pdt(line[25:].strip())
        elif line.startswith("#EXT-X-MEDIA-SEQUENCE:"):
            msn = int(line[22:])
        elif line.startswith("#EXT-X-SKIP:"):
            msn += int(line.split("SKIPPED-SEGMENTS=")[1].split(",")[0])
        elif line.startswith("#EXT-X-PRELOAD-HINT:"):
            at = line.find('URI="') + 5
            hint = (msn, index, line[at : line.find('"', at)])
        elif line and not line.startswith("#"):  # a segment's URI closes it
            msn += 1
            index = 0
    return parts, hint


class Viewer:
    def __init__(self, base: str, t_start: float, t_end: float) -> None:
        self.base = base  # ".../index.m3u8" without the name
        self.t_start, self.t_end = t_start, t_end
        self.error = ""
        self.status = 0
        self.bytes = 0
        self.parts = 0  # fetched inside the window
        self.media_s = 0.0
        self.reloads = 0
        self.delay = array("d")  # delivery delays (s) of the window's parts
        self.closed_early = False

    async def run(self, loop, host: str, port: int) -> None:
        try:
            _, conn = await loop.create_connection(lambda: HttpConnection(host, port), host, port)
        except OSError as exc:
            self.error = f"connect: {exc}"
            return
        try:
            await self._play(conn)
        except (ConnectionError, OSError) as exc:
            self.error = self.error or f"{type(exc).__name__}: {exc}"
            self.closed_early = time.monotonic() < self.t_end
        except (ValueError, IndexError) as exc:
            self.error = self.error or f"bad answer: {exc}"
        finally:
            conn.transport.close()

    async def _play(self, conn: HttpConnection) -> None:
        status, body, _ = await conn.get1(self.base + "index.m3u8", True)
        self.status = status
        if status != 200:
            self.error = f"HTTP {status} for the playlist"
            return
        parts, hint = parse_playlist(body.decode())
        starts = [i for i, p in enumerate(parts) if p[5]]
        todo = parts[starts[-1] if starts else max(0, len(parts) - 3) :]
        status, _, size = await conn.get1(self.base + "init.mp4", False)
        if status != 200:
            self.error = f"HTTP {status} for init.mp4"
            return
        self.bytes += size
        last = (-1, -1)
        while True:
            for msn, index, uri, end, duration, _ in todo:  # the parts not fetched yet
                if (msn, index) <= last:
                    continue
                status, _, size = await conn.get1(self.base + uri, False)
                if status != 200:
                    self.error = f"HTTP {status} for {uri}"
                    return
                last = (msn, index)
                self._got(size, end, duration)
            if time.monotonic() >= self.t_end:
                return
            if hint is None:
                self.error = "the playlist ended"  # EXT-X-ENDLIST: the stream stopped
                return
            # As hls.js: the blocking reload for the hinted part and the hinted part itself at
            # once (here pipelined on the one connection); both are held until the part exists.
            reload, part = conn.get(
                (f"{self.base}index.m3u8?_HLS_msn={hint[0]}&_HLS_part={hint[1]}", True),
                (self.base + hint[2], False))
            status, body, _ = await reload
            self.reloads += 1
            if status != 200:
                self.error = f"HTTP {status} for a blocking reload"
                return
            part_status, _, size = await part
            todo, next_hint = parse_playlist(body.decode())
            if part_status == 200:
                for msn, index, _, end, duration, _ in todo:
                    if (msn, index) == hint[:2]:
                        last = hint[:2]
                        self._got(size, end, duration)
                        break
            elif part_status != 404:
                # 404: a keyframe closed the segment first, so the hinted part never came
                # (the spec's clients ignore that); the loop above fetches the one that did.
                self.error = f"HTTP {part_status} for the hinted part {hint[2]}"
                return
            hint = next_hint

    def _got(self, size: int, end: float, duration: float) -> None:
        """A part arrived: its bytes, and inside the window its media time and delivery delay."""
        arrived = time.time()
        self.bytes += size
        if self.t_start <= time.monotonic() < self.t_end:
            self.parts += 1
            self.media_s += duration
            self.delay.append(arrived - end)

    def summary(self, hist: Counter) -> dict:
        for x in self.delay:
            hist[max(0, int(x * BIN))] += 1
        delays = sorted(self.delay)
        return {
            "error": self.error,
            "status": self.status,
            "bytes": self.bytes,
            "parts": self.parts,
            "media_s": round(self.media_s, 3),
            "reloads": self.reloads,
            "closed_early": self.closed_early,
            "delay_p50_ms": round(delays[len(delays) // 2] * 1000, 2) if delays else None,
        }


async def run_plan(plan: dict) -> dict:
    loop = asyncio.get_running_loop()
    host, port = plan["host"], plan["port"]
    path: str = plan["paths"][0]
    base = path[: path.rindex("/") + 1]
    count: int = plan["viewers"]
    t_start, t_end = plan["t_start"], plan["t_end"]
    connect_at, spread = plan["connect_at"], plan["connect_spread"]
    viewers = [Viewer(base, t_start, t_end) for _ in range(count)]
    tasks = []
    for i, viewer in enumerate(viewers):
        await _sleep_until(connect_at + spread * i / max(1, count))
        tasks.append(loop.create_task(viewer.run(loop, host, port)))
    await _sleep_until(t_start)
    cpu0 = sum(os.times()[:2])
    await _sleep_until(t_end)
    cpu1 = sum(os.times()[:2])
    # a viewer stops at its first request after the window; one held for a part waits at most
    # a part duration, a few seconds covers every one
    done, pending = await asyncio.wait(tasks, timeout=plan.get("grace", 5.0))
    for task in pending:
        task.cancel()
    hist: Counter = Counter()
    rows = [v.summary(hist) for v in viewers]
    return {
        "viewers": rows,
        "hist": {str(k): v for k, v in hist.items()},
        "late": [],
        "llhls": True,
        "load_cpu_s": round(cpu1 - cpu0, 3),
        "window_s": round(t_end - t_start, 3),
        "pid": os.getpid(),
    }


def main(argv: list[str]) -> int:
    return run_load_process(argv, run_plan)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
