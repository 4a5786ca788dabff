"""``watchbuy media --workers 2``: real worker processes on shared ports, real ffmpeg
publishers and readers, connections steered to a chosen worker through /proc (which process
holds the server side of a loopback connection)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FFMPEG, FlvHttpReader, start_ffmpeg_publisher, stop_process
from prometheus_client.parser import text_string_to_metric_families
from worker_helpers import children, connection_owner

from watchbuy.engine import interworker
from watchbuy.engine.client import RtmpClient, RtmpError
from watchbuy.engine.codecs import flvmux
from watchbuy.engine.cues import cue_target, signed_headers
from watchbuy.engine.interworker import merge_server, merge_streams
from watchbuy.engine.workers import cores, worker_count

pytestmark = pytest.mark.usefixtures("ffmpeg")

# Publishers run until stopped: on a loaded machine steering connections takes a while, and the
# helper's default of 30 s ended a stream mid-test.
LONG = 600
KEYS = "key1=show1,key2=show2,other1=show1"  # other1: a second host's key on the same name


@dataclass
class Live:
    """A stream ffmpeg publishes to both workers (:meth:`MediaWorkers.live`)."""

    publisher: asyncio.subprocess.Process
    pids: dict[int, int]  # worker index -> pid
    origin: int  # the pid of the worker the publisher reached
    other: int  # the pid of its sibling, which pulls the stream


class MediaWorkers:
    """``watchbuy media --workers 2`` on ports the kernel picks, logging to a file."""

    def __init__(self, tmp_path: Path, **extra: str) -> None:
        env = {name: value for name, value in os.environ.items()
               if not name.startswith("WATCHBUY_")}
        env.update(WATCHBUY_ENV_FILE=os.devnull, WATCHBUY_DATA_DIR=str(tmp_path / "data"),
                   WATCHBUY_STREAM_KEYS=KEYS, WATCHBUY_RTMP_HOST="127.0.0.1",
                   WATCHBUY_HTTP_HOST="127.0.0.1", WATCHBUY_WORKER_RESTART_DELAY="0.2",
                   WATCHBUY_WORKER_DRAIN_SECONDS="30", WATCHBUY_LOG_LEVEL="INFO",
                   PYTHONUNBUFFERED="1")
        env.update(extra)
        self.log_path = tmp_path / "media.log"
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "watchbuy", "media", "--workers", "2", "--rtmp-port", "0",
             "--http-port", "0"], env=env, stdout=subprocess.PIPE, stderr=self.log_file,
            cwd=tmp_path)
        banner = ""
        while "worker processes" not in banner:
            line = self.process.stdout.readline().decode()  # type: ignore[union-attr]
            if not line:
                self.stop()
                raise AssertionError(f"no banner: {banner!r}; log:\n{self.log()}")
            banner += line
        self.rtmp_port = int(re.search(r"rtmp://127\.0\.0\.1:(\d+)/live", banner).group(1))
        self.http_port = int(re.search(r"stats: http://127\.0\.0\.1:(\d+)/", banner).group(1))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> set[int]:
        return children(self.process.pid)

    async def connect(self, port: int, pid: int, tries: int = 200):
        """A connection to ``port`` that the kernel gave to worker ``pid``."""
        for _ in range(tries):
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                owner = None
                for _ in range(20):  # the server side shows up once accepted
                    owner = connection_owner(port, writer.get_extra_info("sockname")[1], {pid})
                    if owner is not None:
                        break
                    await asyncio.sleep(0.01)
                if owner == pid:
                    return reader, writer
                writer.close()
            await asyncio.sleep(0.02)
        raise AssertionError(f"no connection reached worker {pid}; log:\n{self.log()}")

    async def get(self, path: str, pid: int | None = None, raw: bool = False):
        """``GET path`` (on worker ``pid`` when given): the JSON answer, or its text."""
        connection = await self.connect(self.http_port, pid) if pid is not None else \
            await asyncio.open_connection("127.0.0.1", self.http_port)
        reader, writer = connection
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            response = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), response[:200]
        return body.decode() if raw else json.loads(body)

    async def ready(self, timeout: float = 30.0, killed: int | None = None) -> dict[int, int]:
        """Until both workers answer (and a ``killed`` worker has been replaced: until then
        the supervisor may still list it, unreaped); {worker index: pid}."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            assert loop.time() < deadline, f"workers not up; log:\n{self.log()}"
            with contextlib.suppress(OSError, AssertionError, ValueError):
                server = await self.get("/api/server")
                pids = {w["index"]: w["pid"] for w in server["workers"]}
                if len(pids) == 2 and set(pids.values()) == self.workers() and \
                        killed not in pids.values():
                    return pids
            await asyncio.sleep(0.1)

    async def stream(self, name: str, timeout: float = 20.0, uptime: float = 0.0,
                     everywhere: bool = True) -> dict:
        """``name`` in the node's /api/streams, live for ``uptime`` seconds, pulled by every
        worker (when ``everywhere``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            streams = {s["name"]: s for s in (await self.get("/api/streams"))["streams"]}
            info = streams.get(name)
            if info is not None and info["worker"] is not None and info["video_codec"] and \
                    info["uptime"] >= uptime and (not everywhere or
                                                  len(info["viewers_by_worker"]) == 2):
                return info
            assert loop.time() < deadline, f"{name} not live: {streams}; log:\n{self.log()}"
            await asyncio.sleep(0.1)

    @contextlib.asynccontextmanager
    async def live(self, key: str = "key1", name: str = "show1", uptime: float = 0.0,
                   seconds: float = LONG, **ffmpeg) -> AsyncIterator[Live]:
        """Both workers up, ffmpeg publishing ``key`` (``seconds`` long; ``ffmpeg``: gop,
        rate, size) until the block ends; in the block ``name`` is live for ``uptime`` s and
        pulled by both workers."""
        pids = await self.ready()
        publisher = await start_ffmpeg_publisher(
            f"rtmp://127.0.0.1:{self.rtmp_port}/live/{key}", seconds=seconds, **ffmpeg)
        try:
            info = await self.stream(name, uptime=uptime)
            origin = pids[info["worker"]]
            other = next(pid for pid in pids.values() if pid != origin)
            yield Live(publisher, pids, origin, other)
        finally:
            await stop_process(publisher)

    async def gone(self, name: str, timeout: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with contextlib.suppress(OSError, AssertionError):
                names = [s["name"] for s in (await self.get("/api/streams"))["streams"]]
                if name not in names:
                    return
            assert loop.time() < deadline, f"{name} still listed; log:\n{self.log()}"
            await asyncio.sleep(0.1)

    async def viewer(self, name: str, pid: int) -> FlvHttpReader:
        connection = await self.connect(self.http_port, pid)
        viewer = await FlvHttpReader.open(self.http_port, f"/live/{name}.flv", connection)
        assert viewer.status == 200
        return viewer

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # the workers notice their supervisor is gone and stop
            self.process.wait()
        self.log_file.close()


@pytest.fixture
def media_workers(tmp_path):
    node = MediaWorkers(tmp_path)
    workers = set()
    try:
        yield node
        workers = node.workers()
    finally:
        node.stop()
    for pid in workers:  # orphaned workers end themselves within a couple of seconds
        for _ in range(50):
            if not Path(f"/proc/{pid}").exists() or \
                    Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                break
            time.sleep(0.1)


async def read_raw(viewer: FlvHttpReader, seconds: float) -> bytes:
    """The FLV body bytes ``viewer`` receives for ``seconds`` (or until the stream ends)."""
    data = bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        with contextlib.suppress(TimeoutError):
            chunk = await asyncio.wait_for(viewer.reader.read(65536), deadline - loop.time())
            if not chunk:
                viewer.eof = True
                break
            data += chunk
    return bytes(data)


async def read_to_end(viewer: FlvHttpReader, timeout: float = 20.0) -> bytes:
    data = bytearray()
    while True:
        chunk = await asyncio.wait_for(viewer.reader.read(65536), timeout)
        if not chunk:
            return bytes(data)
        data += chunk


async def decode_file(path: Path) -> tuple[int, str, int]:
    """ffmpeg decodes ``path``: (exit code, error output, video frames decoded)."""
    proc = await asyncio.create_subprocess_exec(
        FFMPEG, "-hide_banner", "-loglevel", "error", "-i", str(path), "-map", "0:v",
        "-f", "framemd5", "-", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    frames = sum(1 for line in out.decode().splitlines() if line and not line.startswith("#"))
    return proc.returncode, err.decode(errors="replace"), frames


def tag_kinds(tags: list) -> list[str]:
    kinds = []
    for tag_type, _ts, payload in tags:
        if tag_type == flvmux.TAG_SCRIPT:
            kinds.append("meta")
        elif tag_type == flvmux.TAG_VIDEO:
            _codec, _ft, key, seq = flvmux.inspect_video(payload)
            kinds.append("vseq" if seq else "key" if key else "inter")
        else:
            kinds.append("aseq" if flvmux.inspect_audio(payload)[1] else "audio")
    return kinds


# -- settings and the pure merge functions -------------------------------------------------------

def test_worker_count_auto_is_one_per_core_and_bad_values_are_one_line(tmp_path) -> None:
    assert worker_count("auto", "1") == cores() == len(os.sched_getaffinity(0))
    assert worker_count("", "auto") == cores()
    assert worker_count("", "1") == 1
    assert worker_count("3", "auto") == 3
    env = {name: value for name, value in os.environ.items() if not name.startswith("WATCHBUY_")}
    for bad in ("0", "many", "-2"):
        result = subprocess.run(
            [sys.executable, "-m", "watchbuy", "media"], env={
                **env, "WATCHBUY_WORKERS": bad, "WATCHBUY_ENV_FILE": os.devnull,
                "WATCHBUY_DATA_DIR": str(tmp_path)},
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            f"watchbuy: configuration error: WATCHBUY_WORKERS: 'auto' or a number 1..256, "
            f"got {bad!r}"]


def test_merge_lists_each_stream_once_from_its_publisher_with_summed_viewers() -> None:
    origin = {"name": "show1", "app": "live", "viewers": 3, "bitrate_in": 500_000,
              "viewers_by_kind": {"flv": 2, "rtmp": 0, "worker": 1}, "publisher": "1.2.3.4:5",
              "health": {"dropped_frames": 0}, "origin": True}  # "health": a field we don't know
    pulled = {"name": "show1", "app": "live", "viewers": 4, "bitrate_in": 499_000,
              "viewers_by_kind": {"flv": 3, "rtmp": 1}, "publisher": "", "origin": False}
    workers = [{"index": 2, "streams": [pulled]}, {"index": 1, "streams": [origin]}]
    node = merge_streams("n1", [json.loads(json.dumps(w)) for w in workers], operator=False)
    assert node["workers"] == 2
    [stream] = node["streams"]
    assert stream["viewers"] == 6  # 2 on the publisher's worker (its sibling's pull is no viewer)
    assert stream["viewers_by_worker"] == {"1": 2, "2": 4}
    assert stream["viewers_by_kind"] == {"flv": 5, "rtmp": 1}
    assert stream["worker"] == 1 and stream["bitrate_in"] == 500_000
    assert stream["health"] == {"dropped_frames": 0}
    assert "publisher" not in stream and "origin" not in stream
    operator = merge_streams("n1", [json.loads(json.dumps(w)) for w in workers], operator=True)
    assert operator["streams"][0]["publisher"] == "1.2.3.4:5"

    servers = [{"index": i, "pid": 100 + i, "streams": [], "server": {
        "node_id": "n1", "uptime": 10.0 + i, "connections": {"rtmp": i, "http": 2},
        "connections_total": 5, "connections_refused": 1, "publishers": i - 1, "viewers": 3,
        "bytes_in": 10, "bytes_out": 20, "bytes_in_per_s": 1, "bytes_out_per_s": 2,
        "codecs": {}}} for i in (2, 1)]
    total = merge_server(servers)
    assert total["connections"] == {"rtmp": 3, "http": 4}
    assert (total["viewers"], total["publishers"], total["bytes_out"]) == (6, 1, 40)
    assert total["uptime"] == 12.0
    assert [w["index"] for w in total["workers"]] == [1, 2]


# -- two worker processes ---------------------------------------------------------------------------

async def test_viewers_on_both_workers_decode_and_the_stats_are_node_wide(media_workers,
                                                                         tmp_path) -> None:
    node = media_workers
    async with node.live() as live:
        pids = live.pids
        assert set(pids.values()) == node.workers() and len(pids) == 2
        viewers = {pid: [await node.viewer("show1", pid) for _ in range(2)]
                   for pid in pids.values()}
        recordings = await asyncio.gather(*(read_raw(v, 3.0) for vs in viewers.values()
                                            for v in vs))
        # Every worker answers for the whole node: the stream once, viewers of both summed.
        for pid in pids.values():
            streams = (await node.get("/api/streams", pid))["streams"]
            assert [s["name"] for s in streams] == ["show1"]
            assert streams[0]["viewers"] == 4
            assert streams[0]["viewers_by_worker"] == {"1": 2, "2": 2}
            assert streams[0]["viewers_by_kind"].get("flv") == 4
            assert "publisher" not in streams[0]
            server = await node.get("/api/server", pid)
            assert (server["publishers"], server["viewers"]) == (1, 4)
            assert [(w["index"], w["viewers"]) for w in server["workers"]] == [(1, 2), (2, 2)]
            assert sum(w["publishers"] for w in server["workers"]) == 1
            # /metrics: every worker's series, labelled by worker, whichever answers
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(
                           await node.get("/metrics", pid, raw=True))
                       for s in family.samples}
            for index in ("1", "2"):
                assert samples[("watchbuy_node_viewers",
                                (("protocol", "flv"), ("worker", index)))] == 2
                assert samples[("watchbuy_node_stream_viewers", (
                    ("app", "live"), ("protocol", "flv"), ("stream", "show1"),
                    ("worker", index)))] == 2
                assert ("process_resident_memory_bytes", (("worker", index),)) in samples
            assert sum(v for (name, _), v in samples.items()
                       if name == "watchbuy_node_streams") == 1  # the publisher, counted once
            assert not [key for key in samples if ("protocol", "worker") in key[1]]
        for index, data in enumerate(recordings):
            assert data.startswith(b"FLV")
            path = tmp_path / f"viewer{index}.flv"
            path.write_bytes(data)
            code, errors, frames = await decode_file(path)
            assert code == 0 and errors == "", errors
            assert frames >= 25  # about 3 s at 25 fps, from a keyframe on
        for vs in viewers.values():
            for viewer in vs:
                await viewer.close()


async def test_late_joiner_on_the_other_worker_starts_on_a_keyframe(media_workers) -> None:
    node = media_workers
    # uptime: inside the second 2-second GOP
    async with node.live("key2", "show2", uptime=2.6, gop=50, rate=25) as live:
        viewer = await node.viewer("show2", live.other)
        first = await viewer.tags()
        kinds = tag_kinds(first)
        assert kinds[:3] == ["meta", "vseq", "aseq"], kinds[:5]
        assert next(k for k in kinds[3:] if k in ("key", "inter")) == "key"
        assert kinds.count("inter") >= 1  # the cached GOP came at once, not from the next key
        meta = next(p for t, _ts, p in first if t == flvmux.TAG_SCRIPT)
        assert b"onMetaData" in meta and b"width" in meta
        await viewer.close()


async def test_a_second_publisher_is_refused_on_either_worker(media_workers) -> None:
    node = media_workers
    async with node.live() as live:
        for pid in live.pids.values():
            connection = await node.connect(node.rtmp_port, pid)
            client = await RtmpClient.connect("127.0.0.1", node.rtmp_port,
                                              connection=connection)
            with pytest.raises(RtmpError, match="NetStream.Publish.BadName"):
                await client.publish("other1")
            await client.close()
        assert live.publisher.returncode is None, (await live.publisher.stderr.read()).decode()
        streams = (await node.get("/api/streams"))["streams"]
        assert len(streams) == 1, f"{streams}; log:\n{node.log()}"
        [stream] = streams
        assert stream["name"] == "show1" and stream["video_codec"] == "avc"
        assert node.log().count("refused second publisher on live stream 'show1'") == 2
    # Its name is free again once the publisher stops, on whichever worker.
    await node.gone("show1")
    again = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/other1",
                                           seconds=LONG)
    try:
        await node.stream("show1")
    finally:
        await stop_process(again)


async def test_kill_9_of_the_publishing_worker_ends_the_stream_everywhere(media_workers) -> None:
    node = media_workers
    async with node.live() as live:
        pids, origin = live.pids, live.origin
        viewer = await node.viewer("show1", live.other)
        assert await read_raw(viewer, 1.0)
        os.kill(origin, signal.SIGKILL)
        # The sibling's viewer sees the end, as when a publisher stops: the body ends.
        await read_to_end(viewer, timeout=10)  # a reset would raise, no end would time out
        await node.gone("show1")
        # The supervisor says so and brings the worker back.
        restarted = await node.ready(killed=origin)
        assert origin not in restarted.values() and live.other in restarted.values()
        index = next(i for i, pid in pids.items() if pid == origin)
        assert re.search(rf"media worker {index} \(pid {origin}\) ended with signal 9: "
                         r"restarting in [0-9.]+ s", node.log())
        await asyncio.wait_for(live.publisher.wait(), 20)  # its publisher was cut off


async def test_kill_9_of_the_other_worker_leaves_the_publishers_viewers_playing(
        media_workers, tmp_path) -> None:
    node = media_workers
    async with node.live() as live:
        origin, other = live.origin, live.other
        viewer = await node.viewer("show1", origin)
        doomed = await node.viewer("show1", other)
        before = await read_raw(viewer, 1.0)
        os.kill(other, signal.SIGKILL)
        after = await read_raw(viewer, 3.0)
        assert not viewer.eof and len(after) > 10_000
        path = tmp_path / "survivor.flv"
        path.write_bytes(before + after)
        code, errors, frames = await decode_file(path)
        assert code == 0 and errors == "" and frames >= 75, errors
        await read_to_end(doomed, timeout=10)  # its worker is gone: the kernel closed it
        # The restarted worker pulls the stream again: a viewer there plays.
        restarted = await node.ready(killed=other)
        new = next(pid for pid in restarted.values() if pid != origin)
        assert new != other
        await node.stream("show1")
        late = await node.viewer("show1", new)
        assert tag_kinds(await late.tags())[:3] == ["meta", "vseq", "aseq"]
        await late.close()
        await viewer.close()


async def test_sigterm_drains_until_the_publisher_ends(media_workers) -> None:
    node = media_workers
    async with node.live(seconds=15) as live:
        viewer = await node.viewer("show1", live.other)
        assert await read_raw(viewer, 0.5)
        node.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        # No new connections, on either port ...
        for port in (node.rtmp_port, node.http_port):
            with pytest.raises(OSError):
                _reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
        # ... but the viewer plays on until the publisher ends, then the node stops.
        assert node.process.poll() is None
        rest = await read_to_end(viewer, timeout=20)
        assert len(rest) > 20_000
        assert await asyncio.wait_for(live.publisher.wait(), 20) == 0  # it ended on its own
        code = await asyncio.get_running_loop().run_in_executor(None, node.process.wait, 30)
        assert code == 0
        assert "draining: 1 live streams" in node.log()
        assert "drain time over" not in node.log()


async def test_serve_with_two_media_workers_fires_the_publish_hook_once(tmp_path) -> None:
    from browser_helpers import free_port

    env = {name: value for name, value in os.environ.items() if not name.startswith("WATCHBUY_")}
    env.update(WATCHBUY_ENV_FILE=os.devnull, WATCHBUY_DATA_DIR=str(tmp_path / "data"),
               PYTHONUNBUFFERED="1")
    site_port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "watchbuy", "serve", "--workers", "2", "--rtmp-port", "0",
            "--http-port", "0", "--site-port", str(site_port), "--agent-port",
            str(free_port()), env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
            stderr=log_file)
    publisher = None
    try:
        banner = ""
        while "media: 2 worker processes" not in banner:
            line = (await asyncio.wait_for(process.stdout.readline(), 60.0)).decode()
            assert line, f"serve ended: {banner}{log_path.read_text()}"
            banner += line
        key = re.search(r"Stream key (\S+)", banner).group(1)
        rtmp_port = int(re.search(r"rtmp://127\.0\.0\.1:(\d+)/live", banner).group(1))
        http_port = int(re.search(r"HTTP-FLV http://127\.0\.0\.1:(\d+)/", banner).group(1))
        [media] = children(process.pid)  # the media supervisor, and its two workers
        assert len(children(media)) == 2
        publisher = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{rtmp_port}/live/{key}",
                                           seconds=LONG)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        streams: list = []
        while not streams:
            assert loop.time() < deadline, log_path.read_text()
            await asyncio.sleep(0.2)
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
                writer.write(b"GET /api/streams HTTP/1.0\r\n\r\n")
                body = (await asyncio.wait_for(reader.read(), 10)).partition(b"\r\n\r\n")[2]
                writer.close()
                # Listed once the publisher's worker knows the codecs; the sibling's pull
                # may come a moment later on a busy machine, so wait for both workers.
                streams = [s for s in json.loads(body)["streams"] if s["video_codec"]
                           and set(s["viewers_by_worker"]) == {"1", "2"}]
        assert [s["name"] for s in streams] == ["demo-host"]
        reader, writer = await asyncio.open_connection("127.0.0.1", site_port)
        writer.write(b"GET /room/demo-host HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        page = (await asyncio.wait_for(reader.read(), 10)).decode()
        writer.close()
        assert 'live="true"' in page
        await stop_process(publisher)
        deadline = loop.time() + 20
        while "room demo-host went offline" not in log_path.read_text():
            assert loop.time() < deadline, log_path.read_text()
            await asyncio.sleep(0.2)
        # One publish, one hook call each way, though two workers carried the stream.
        log = log_path.read_text()
        assert log.count("room demo-host is live on node") == 1
        assert log.count("room demo-host went offline") == 1
    finally:
        if publisher is not None:
            await stop_process(publisher)
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 60.0) == 0


PEEK = r"""
import json, os, socket, sys
if len(sys.argv) > 1:  # become that account once Python is loaded (its files are root's)
    os.setgid(int(sys.argv[1]))
    os.setuid(int(sys.argv[1]))
names = [line.split()[-1] for line in open("/proc/net/unix") if "@watchbuy." in line]
answers = []
for control in [name for name in names if name.endswith(".w1")]:  # any node's worker 1
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect("\0" + control[1:])
        sock.sendall(json.dumps({"op": "stats"}).encode() + b"\n")
        answers.append(len(sock.recv(65536)))
    except OSError:  # closed at once: our request unsent or unread (EPIPE, ECONNRESET)
        answers.append(0)
print(max(answers))
"""


async def test_another_local_account_gets_nothing_from_the_workers_sockets(media_workers) -> None:
    # Abstract Unix socket names are listed in /proc/net/unix to every account on the machine
    # and have no file permissions: the workers answer only their own user (SO_PEERCRED).
    if os.getuid() != 0:
        pytest.skip("needs root to run a peek as another account (nobody)")
    node = media_workers
    await node.ready()

    def peek(uid: int | None) -> str:
        return subprocess.run(
            [sys.executable, "-c", PEEK, *([str(uid)] if uid is not None else [])],
            capture_output=True, text=True, timeout=30, check=True).stdout.strip()

    loop = asyncio.get_running_loop()
    assert int(await loop.run_in_executor(None, peek, None)) > 100  # our own user: the stats
    assert await loop.run_in_executor(None, peek, 65534) == "0"  # nobody: closed at once
    assert "control request from another user refused" in node.log()


def segments(playlist: str) -> dict[str, str]:
    """{segment URI: its EXTINF} of a media playlist."""
    lines = playlist.splitlines()
    return {line: lines[i - 1] for i, line in enumerate(lines)
            if line.startswith("seg") and lines[i - 1].startswith("#EXTINF")}


async def test_ll_hls_playlists_name_the_same_segments_on_both_workers(media_workers) -> None:
    # A keyframe every 2 s, the segment target: every keyframe starts a segment, so a worker
    # that pulls the stream later (restarted) cuts where the publishing worker does.
    node = media_workers
    async with node.live(uptime=7, gop=50, rate=25) as live:
        origin, other = live.origin, live.other
        path = "/live/show1/index.m3u8"
        first = segments(await node.get(path, origin, raw=True))
        second = segments(await node.get(path, other, raw=True))  # a segment may end meanwhile
        common = first.keys() & second.keys()
        assert len(common) >= 2 and all(first[uri] == second[uri] for uri in common)
        os.kill(other, signal.SIGKILL)  # it comes back and pulls the stream mid-way
        restarted = await node.ready(killed=other)
        new = next(pid for pid in restarted.values() if pid != origin)
        await node.stream("show1")
        await asyncio.sleep(5)  # two complete segments there
        late = segments(await node.get(path, new, raw=True))
        ours = segments(await node.get(path, origin, raw=True))
        assert len(late) >= 2
        # every segment the restarted worker lists, the publishing worker lists by that name
        assert all(ours.get(uri) == extinf for uri, extinf in late.items()), \
            f"restarted worker {late}, publishing worker {ours}; log:\n{node.log()[-3000:]}"


async def post_cue(node: MediaWorkers, pid: int, name: str, product_id: int) -> dict:
    """A pin to worker ``pid`` with the operator token (no signature)."""
    status, answer = await send_cue(node, pid, f"/api/streams/{name}/cue?product_id={product_id}",
                                    {"Authorization": f"Bearer {OPERATOR}"})
    assert status == 200, answer
    return answer


async def send_cue(node: MediaWorkers, pid: int, target: str,
                   headers: dict[str, str]) -> tuple[int, dict]:
    """``POST target`` with ``headers`` to worker ``pid``: (status, answer)."""
    reader, writer = await node.connect(node.http_port, pid)
    try:
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"POST {target} HTTP/1.0\r\nHost: x\r\n{lines}"
                     f"Content-Length: 0\r\n\r\n".encode())
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


OPERATOR = "operator-token-for-the-cue-test"
CUE_SECRET = "hook-secret-for-the-cue-test"


async def test_a_cue_sent_to_either_worker_goes_in_where_the_stream_comes_in(tmp_path) -> None:
    # The site's pin may reach any worker: the cue is put into the stream by the worker that
    # publishes it, so every worker's viewers get it in order, and the stream is recorded once
    # (by that worker; the sibling's pulled copy is not recorded again).
    node = MediaWorkers(tmp_path, WATCHBUY_OPERATOR_TOKEN=OPERATOR,
                        WATCHBUY_HOOK_SECRET=CUE_SECRET)
    try:
        async with node.live(uptime=1.0) as live:
            origin, other = live.origin, live.other
            viewers = {pid: await node.viewer("show1", pid) for pid in (origin, other)}
            for pid in viewers:
                await viewers[pid].tags()  # past the start-up tags
            answers = [await post_cue(node, pid, "show1", product)
                       for pid, product in ((other, 41), (origin, 42))]
            assert all(isinstance(a["media_ms"], int) for a in answers), answers
            # the site's signed call: its nonce is claimed by the publishing worker, so the same
            # call replayed to either worker is refused (each worker keeping its own would not)
            target = cue_target("show1", 43)
            signed = signed_headers(CUE_SECRET, target)
            status, answer = await send_cue(node, other, target, signed)
            assert status == 200 and isinstance(answer["media_ms"], int), answer
            answers.append(answer)
            for pid in (origin, other):
                assert await send_cue(node, pid, target, signed) == (
                    401, {"error": "replayed call"})
            for pid, viewer in viewers.items():
                cues = []
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                while len(cues) < 3 and loop.time() < deadline:
                    for tag_type, timestamp, payload in await viewer.tags():
                        if tag_type == flvmux.TAG_SCRIPT and b"onCuePoint" in payload:
                            cues.append((timestamp, payload))
                assert [ts for ts, _ in cues] == [a["media_ms"] for a in answers], (pid, cues)
                assert b"product_id" in cues[0][1]
                await viewer.close()
        # the block ended: its publisher is stopped
        await node.gone("show1")
        folder = tmp_path / "data" / "recordings"
        for _ in range(300):  # the remux after the end
            made = sorted(p.name for p in folder.glob("*") if p.suffix in (".flv", ".mp4"))
            if made and all(name.endswith(".mp4") for name in made):
                break
            await asyncio.sleep(0.1)
        assert len(made) == 1 and made[0].endswith(".mp4"), (made, node.log())
    finally:
        node.stop()


async def test_a_worker_answers_with_its_own_streams_as_they_are_now(node, monkeypatch) -> None:
    """The cause of the second-publisher test's flake: each worker reused its whole stats
    round, its own part included, so a worker asked just after a publish it had registered
    itself answered from before it (the node said "live" on one worker and nothing on the
    other).  Only the siblings' answers may be reused."""
    monkeypatch.setattr(interworker, "STATS_REUSE", 3600.0)  # any round would be reused
    cluster = interworker.Cluster(node, f"test{os.getpid()}", 1, 2)  # its sibling is absent
    try:
        assert (await cluster.streams_info(operator=False))["streams"] == []
        stream = node.registry.start("show1", "live")
        assert stream is not None
        [info] = (await cluster.streams_info(operator=False))["streams"]
        assert info["name"] == "show1" and info["viewers_by_worker"] == {"1": 0}
        node.registry.stop(stream)
        assert (await cluster.streams_info(operator=False))["streams"] == []
    finally:
        node.registry.listeners.remove(cluster.on_stream)
