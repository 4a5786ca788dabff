"""The servers under test: a WatchBuy media node and node-media-server, started alike.

Each gets fresh loopback ports, its own log file in bench/work/logs/, optionally a CPU (taskset),
and is stopped by process group at the end.  ``publish_url(i)``/``play_path(i)`` name stream
``i``: WatchBuy maps secret keys to public names (``WATCHBUY_STREAM_KEYS``), node-media-server
plays what was published under the same name.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import (
    NMS_DIR,
    NMS_SCRIPT,
    REPO,
    WORK,
    BenchError,
    TreeMeter,
    free_ports,
    nms_installed,
    spawn,
    stop,
    wait_port,
)

SERVER_NAMES = ("watchbuy", "nms")
LABELS = {"watchbuy": "WatchBuy", "nms": "node-media-server"}


class Server:
    name = "?"

    def __init__(self, streams: int = 1, cpus: str | None = None, workers: int = 1) -> None:
        self.streams = streams
        self.cpus = cpus
        self.workers = workers  # WatchBuy's worker processes (watchbuy media --workers N)
        self.proc = None
        self.rtmp_port = 0
        self.http_port = 0
        self.meter: TreeMeter | None = None
        self._tmp: str | None = None

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def command(self) -> tuple[list[str], dict, Path | None]:
        raise NotImplementedError

    def start(self, run_id: str = "") -> None:
        self.rtmp_port, self.http_port = free_ports(2)
        self._tmp = tempfile.mkdtemp(prefix=f"{self.name}-", dir=WORK)
        cmd, env, cwd = self.command()
        log = f"{self.name}{'-' + run_id if run_id else ''}.log"
        self.proc = spawn(cmd, log_name=log, env=env, cpus=self.cpus, cwd=cwd)
        try:
            wait_port(self.rtmp_port, self.proc)
            wait_port(self.http_port, self.proc)
        except BenchError:
            self.stop()
            raise
        self.meter = TreeMeter(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        code = None
        if self.proc is not None:
            code = stop(self.proc)
            self.proc = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        return code

    # stream names ----------------------------------------------------------------------------
    def key(self, i: int) -> str:
        return f"s{i:05d}"

    def stream_name(self, i: int) -> str:
        return f"s{i:05d}"

    def publish_url(self, i: int) -> str:
        return f"rtmp://127.0.0.1:{self.rtmp_port}/live/{self.key(i)}"

    def play_path(self, i: int) -> str:
        return f"/live/{self.stream_name(i)}.flv"

    def api(self, path: str) -> dict | None:
        return None


class WatchBuy(Server):
    name = "watchbuy"

    def key(self, i: int) -> str:
        return f"k{i:05d}"

    def command(self):
        keys = ",".join(f"{self.key(i)}={self.stream_name(i)}" for i in range(self.streams))
        env = dict(os.environ)
        for var in list(env):
            if var.startswith("WATCHBUY_"):
                del env[var]  # only what we set: defaults otherwise, as users run it
        env.update(
            WATCHBUY_STREAM_KEYS=keys,
            WATCHBUY_RTMP_HOST="127.0.0.1",
            WATCHBUY_HTTP_HOST="127.0.0.1",
            WATCHBUY_DATA_DIR=self._tmp,
            WATCHBUY_NODE_ID="bench",
        )
        cmd = [
            sys.executable,
            "-m",
            "watchbuy",
            "media",
            "--rtmp-port",
            str(self.rtmp_port),
            "--http-port",
            str(self.http_port),
            "--workers",  # one process unless asked: `watchbuy media` uses every core by default
            str(self.workers),
        ]
        return cmd, env, REPO

    def api(self, path: str) -> dict | None:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return None


class Nms(Server):
    name = "nms"

    def command(self):
        if not nms_installed():
            raise BenchError(
                "node-media-server 4.4.3 is not installed: run "
                "`python -m bench.fanout --install-nms` first"
            )
        node = shutil.which("node")
        if not node:
            raise BenchError("node is not installed")
        script = NMS_DIR / "bench_nms.js"
        if not script.exists() or script.read_text() != NMS_SCRIPT:
            script.write_text(NMS_SCRIPT)
        cmd = [node, str(script), str(self.rtmp_port), str(self.http_port), self._tmp]
        return cmd, dict(os.environ), NMS_DIR


def make_server(name: str, streams: int = 1, cpus: str | None = None,
                workers: int = 1) -> Server:
    if name == "watchbuy":
        return WatchBuy(streams, cpus, workers)
    if name == "nms":
        return Nms(streams, cpus)
    raise BenchError(f"unknown server {name!r} (choose from {', '.join(SERVER_NAMES)})")


def wait_stream_live(server: Server, i: int, timeout: float = 20.0) -> float:
    """Block until stream ``i`` plays and a video keyframe arrives; the seconds it took."""
    import asyncio

    from bench.fanout.load import probe_keyframe

    start = time.monotonic()
    deadline = start + timeout
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if not server.alive():
            raise BenchError(f"{server.label} exited (status {server.proc and server.proc.poll()})")
        try:
            asyncio.run(
                probe_keyframe(
                    "127.0.0.1",
                    server.http_port,
                    server.play_path(i),
                    min(5.0, deadline - time.monotonic()),
                )
            )
            return time.monotonic() - start
        except Exception as exc:  # 404 until the publisher is live, timeouts, resets
            last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
    raise BenchError(
        f"stream {server.play_path(i)} on {server.label} not live after "
        f"{timeout:.0f} s ({last_error})"
    )
