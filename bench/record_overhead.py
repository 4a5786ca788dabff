"""What recording a publish costs the event loop that does the fan-out.

engine/record.py keeps the tags' FLV bytes (the ones HTTP-FLV viewers get, encoded once) and
writes them in a worker thread.  This feeds the same 20 s stream (bench/common.py's
``INGEST_FLV``: 360p30 H.264 + AAC, ~600 kb/s) through a ``LiveStream`` with ``--viewers``
in-process FLV viewers, once without a recording and once with one, alternating ``--rounds``
times, and reports the event-loop thread's CPU time of each (``time.thread_time``, the best
round of each) and their ratio, plus the whole process's CPU (the writer thread included).
The viewers encode and measure their writes as ``Viewer.deliver`` does, without sockets: the
fan-out's own cost is the baseline the recording is compared with, in one run.

    python bench/record_overhead.py [--viewers 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import INGEST_FLV, loopback_node_settings, make_flv, read_flv_tags  # noqa: E402
from watchbuy.engine.node import MediaNode  # noqa: E402
from watchbuy.engine.relay import Tag  # noqa: E402

BATCH = 4  # tags per publisher read, about what ffmpeg's 30 fps + AAC gives per socket read


class SinkViewer:
    """An FLV viewer without a socket: encodes each batch once per key, as the relay shares."""

    closed = False

    def __init__(self) -> None:
        self.bytes = 0

    def deliver(self, tags: list[Tag], shared: dict | None = None) -> None:
        encoded = shared.get("flv") if shared is not None else None
        if encoded is None:
            chunks = [tag.flv for tag in tags]
            encoded = (chunks, sum(map(len, chunks)))
            if shared is not None:
                shared["flv"] = encoded
        self.bytes += encoded[1]

    def end(self) -> None:
        self.closed = True


async def one_run(tags: list, viewers: int, record: bool, folder: Path) -> tuple[float, float]:
    """(event-loop thread CPU s, process CPU s) for feeding ``tags`` through one stream."""
    settings = loopback_node_settings("bench-record", {}, record=record,
                                      record_dir=str(folder) if record else "")
    node = MediaNode(settings)
    stream = node.registry.start("bench", "live")
    for _ in range(viewers):
        stream.viewers.add(SinkViewer())
    thread0, process0 = time.thread_time(), time.process_time()
    for start in range(0, len(tags), BATCH):
        for tag_type, timestamp, payload in tags[start:start + BATCH]:
            stream.on_media(tag_type, timestamp, payload)
        stream.flush()
        await asyncio.sleep(0)  # the loop turns between publisher reads, as it does live
    thread_cpu = time.thread_time() - thread0
    recording, stream.recording = stream.recording, None
    if recording is not None:
        # the live path only: the remux after the show is ffmpeg's, not the loop's
        async def no_remux(_recording) -> None:
            return None

        node.recorder.finish = no_remux
        recording.finish()  # the writer writes what is left, then ends
        await asyncio.wait_for(recording.task, 120)
        assert not recording.failed, recording.failed
    process_cpu = time.process_time() - process0
    node.registry.stop(stream)
    return thread_cpu, process_cpu


async def main(viewers: int, rounds: int) -> None:
    tags = [t for t in read_flv_tags(make_flv(INGEST_FLV)) if t[0] in (8, 9)]
    print(f"{len(tags)} tags of {INGEST_FLV.name}, {viewers} viewers, {rounds} rounds")
    best = {False: (float("inf"), 0.0), True: (float("inf"), 0.0)}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(rounds):
            for record in (False, True):
                folder = Path(tmp) / f"r{index}"
                result = await one_run(tags, viewers, record, folder)
                if result[0] < best[record][0]:
                    best[record] = result
    off, on = best[False], best[True]
    print(f"event loop CPU, no recording:   {off[0] * 1000:8.1f} ms")
    print(f"event loop CPU, recording:      {on[0] * 1000:8.1f} ms  "
          f"(x{on[0] / off[0]:.3f} of the fan-out alone)")
    print(f"process CPU (writer included): {off[1] * 1000:8.1f} ms -> {on[1] * 1000:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--viewers", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.viewers, args.rounds))
