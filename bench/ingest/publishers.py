"""The publisher load process: K RTMP publishers on one asyncio loop, each at real time.

Run by the ingest harness as ``python -m bench.ingest.publishers '<plan json>'``; writes one JSON
object to the plan's ``out`` file.  Every publisher is a
:class:`watchbuy.engine.client.RtmpClient` (handshake, connect, releaseStream, FCPublish,
createStream, publish: the command flow OBS uses) that then replays the tags of one FLV file
(~600 kb/s) in a loop, paced by their timestamps from the moment it started publishing:
``@setDataFrame onMetaData`` and both sequence headers first, then audio and video, the
timestamps running on across loops.  One scheduler tick every 20 ms sends each publisher the tags
that are due, as one write of ChunkWriter-encoded chunks (format 1-3 headers, 4096-byte chunks,
as ffmpeg sends them).

Per publisher the result holds the bytes it handed to its socket inside the window, the bytes
still queued in user space (the transport's write buffer) at the end, and errors: a server that
stops reading shows up as a growing queue, a refused or dropped publish as an error.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from watchbuy.engine.client import RtmpClient
from watchbuy.engine.codecs import amf, flvmux

TICK = 0.020
CSID = {8: 4, 9: 6, 18: 5}


def load_flv(path: str) -> dict:
    """The file split into what is sent once (metadata, sequence headers) and the looped media."""
    tags = flvmux.FlvReader().feed(open(path, "rb").read())
    metadata = None
    headers = []
    media = []
    for tag_type, ts, payload in tags:
        if tag_type == 18:
            if metadata is None:
                metadata = amf.encode_amf0("@setDataFrame") + payload
            continue
        if tag_type == 9 and flvmux.inspect_video(payload)[3]:
            headers.append((9, payload))
            continue
        if tag_type == 8 and flvmux.inspect_audio(payload)[1]:
            headers.append((8, payload))
            continue
        if tag_type in (8, 9):
            media.append((tag_type, ts, payload))
    base = media[0][1]
    media = [(t, ts - base, p) for t, ts, p in media]
    frame_ms = 1000 // 30
    loop_ms = media[-1][1] + frame_ms
    loop_bytes = sum(len(p) for _, _, p in media)
    return {
        "metadata": metadata,
        "headers": headers,
        "media": media,
        "loop_ms": loop_ms,
        "kbit_per_s": loop_bytes * 8 / loop_ms,
    }


class Publisher:
    def __init__(self, key: str) -> None:
        self.key = key
        self.client: RtmpClient | None = None
        self.t0 = 0.0
        self.index = 0
        self.loops = 0
        self.error = ""
        self.sent_window = 0
        self.sent_total = 0
        self.queued_end = 0
        self.queued_max = 0
        self.connected_at = 0.0
        self.published_at = 0.0
        self.behind_ms = 0.0  # how far this publisher's sending lags its schedule at the end


async def start_publisher(pub: Publisher, host: str, port: int, flv: dict) -> None:
    try:
        pub.client = client = await asyncio.wait_for(RtmpClient.connect(host, port, "live"), 15)
        pub.connected_at = time.monotonic()
        await asyncio.wait_for(client.publish(pub.key), 15)
    except Exception as exc:  # refused, reset, timed out: this publisher failed
        pub.error = f"publish: {type(exc).__name__}: {exc}"
        if pub.client is not None:
            pub.client.writer.transport.abort()
        return
    out = client.out
    sid = client.stream_id
    chunks = []
    if flv["metadata"]:
        chunks.append(out.write(CSID[18], 0, 18, sid, flv["metadata"]))
    for tag_type, payload in flv["headers"]:
        chunks.append(out.write(CSID[tag_type], 0, tag_type, sid, payload))
    client.writer.writelines(chunks)
    pub.published_at = pub.t0 = time.monotonic()


async def drain_reader(pub: Publisher) -> None:
    """Read (and drop) what the server sends after publish: acks, pings, status."""
    reader = pub.client.reader
    try:
        while await reader.read(65536):
            pass
    except (ConnectionError, OSError):
        pass
    if not pub.error:
        pub.error = "server closed the connection"


def tick(pubs: list[Publisher], flv: dict, now: float, in_window: bool) -> None:
    media = flv["media"]
    count = len(media)
    loop_ms = flv["loop_ms"]
    for pub in pubs:
        client = pub.client
        if client is None or pub.error or not pub.t0:
            continue
        transport = client.writer.transport
        if transport.is_closing():
            pub.error = pub.error or "connection closed"
            continue
        due = (now - pub.t0) * 1000.0
        out = client.out
        sid = client.stream_id
        chunks = []
        size = 0
        # bounded: at most one loop's worth of tags per tick
        for _ in range(count):
            tag_type, ts, payload = media[pub.index]
            ts += pub.loops * loop_ms
            if ts > due:
                break
            chunks.append(out.write(CSID[tag_type], ts, tag_type, sid, payload))
            size += len(payload)
            pub.index += 1
            if pub.index == count:
                pub.index = 0
                pub.loops += 1
        if chunks:
            transport.writelines(chunks)
            pub.sent_total += size
            if in_window:
                pub.sent_window += size
        queued = transport.get_write_buffer_size()
        if queued > pub.queued_max:
            pub.queued_max = queued


async def run_plan(plan: dict) -> dict:
    host, port = plan["host"], plan["port"]
    flv = load_flv(plan["flv"])
    pubs = [Publisher(key) for key in plan["keys"]]
    t_start, t_end = plan["t_start"], plan["t_end"]
    connect_at = plan["connect_at"]
    limit = asyncio.Semaphore(plan.get("concurrency", 32))
    readers = []

    async def one(pub: Publisher) -> None:
        async with limit:
            if time.monotonic() > t_start:
                pub.error = "not connected before the window"
                return
            await start_publisher(pub, host, port, flv)
            if pub.client is not None and not pub.error:
                readers.append(asyncio.ensure_future(drain_reader(pub)))

    delay = connect_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    starter = asyncio.ensure_future(asyncio.gather(*(one(p) for p in pubs)))
    cpu0 = None
    ticks = late_ticks = 0
    next_tick = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= t_end:
            break
        in_window = now >= t_start
        if in_window and cpu0 is None:
            cpu0 = sum(os.times()[:2])
        tick(pubs, flv, now, in_window)
        ticks += 1
        next_tick += TICK
        delay = next_tick - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            late_ticks += 1
            next_tick = time.monotonic()
            await asyncio.sleep(0)
    cpu1 = sum(os.times()[:2])
    now = time.monotonic()
    tick(pubs, flv, now, True)  # the last due tags, then: is each publisher on schedule?
    media, loop_ms = flv["media"], flv["loop_ms"]
    for pub in pubs:
        if pub.client is not None:
            pub.queued_end = pub.client.writer.transport.get_write_buffer_size()
            if pub.t0 and not pub.error:
                next_ts = media[pub.index][1] + pub.loops * loop_ms
                pub.behind_ms = max(0.0, (now - pub.t0) * 1000.0 - next_ts)
    starter.cancel()
    for pub in pubs:
        if not pub.published_at and not pub.error:
            pub.error = "still connecting when the window ended"
    for task in readers:
        task.cancel()
    for pub in pubs:
        if pub.client is not None:
            pub.client.writer.transport.abort()
    await asyncio.sleep(0.05)
    window = t_end - t_start
    return {
        "publishers": [
            {
                "key": p.key,
                "error": p.error,
                "sent_window": p.sent_window,
                "sent_total": p.sent_total,
                "queued_end": p.queued_end,
                "queued_max": p.queued_max,
                "published_at": round(p.published_at, 4),
                "behind_ms": round(p.behind_ms, 1),
            }
            for p in pubs
        ],
        "kbit_per_s": flv["kbit_per_s"],
        "window_s": window,
        "load_cpu_s": round(cpu1 - (cpu0 if cpu0 is not None else cpu1), 3),
        "ticks": ticks,
        "late_ticks": late_ticks,
    }


def main(argv: list[str]) -> int:
    from bench.fanout.load import run_load_process

    return run_load_process(argv, run_plan)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
