"""Real media nodes and status agents for end-to-end tests: ``watchbuy media`` and ``watchbuy
status-agent`` subprocesses, each node in its own network namespace (``netns``: ``ip netns`` +
a veth pair, 10.200.x.0/30 inside this machine only) or all on loopback with their own ports
(``loopback``: the agents then count their engine's ingest, as loopback's counters are shared).
Used by test_balancer_nodes.py and test_site_ingest.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from watchbuy.balancer import Node
from watchbuy.status_agent.client import FetchError, fetch_json

# The balancer's per-round timeout in these tests.  Each answer comes from a Python agent
# process beside its media node and five ffmpeg encoders, on a machine other test runs share:
# 0.5 s once timed out all three agents at once under load.  The hung-agent check still proves
# a round ends at the timeout.
TIMEOUT = 2.0
PREFIX = f"wb{os.getpid()}"


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def netns_unavailable() -> str:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "network namespaces need root and iproute2"
    probe = f"{PREFIX}probe"
    try:
        run("ip", "netns", "add", probe)
        run("ip", "netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create a network namespace here: {exc}"
    return ""


def remove_stale_namespaces() -> None:
    """Namespaces left by an earlier run of this file that was killed before its teardown."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in re.findall(r"^(wb(\d+)n\d+)\b", listing, re.M):
        namespace, pid = name
        if not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


@dataclass
class MediaHost:
    """One node: a media process and an agent process, maybe inside a namespace."""

    node_id: str
    host: str  # where the balancer and ffmpeg reach it
    rtmp_port: int
    http_port: int
    agent_port: int
    netns: str | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def node(self) -> Node:
        return Node(self.host, self.rtmp_port, self.http_port, self.agent_port, self.node_id)

    def publish_url(self, key: str) -> str:
        return f"rtmp://{self.host}:{self.rtmp_port}/live/{key}"

    def log_tail(self) -> str:
        return "\n".join(f"--- {name}: {path.read_text()[-1500:]}" for name, path in self.logs.items())


class Cluster:
    def __init__(self, layout: str, tmp_path: Path) -> None:
        self.layout = layout
        self.tmp = tmp_path
        self.hosts: list[MediaHost] = []
        self.namespaces: list[str] = []

    def _spawn(self, host: MediaHost, name: str, args: list[str], env: dict[str, str]) -> None:
        command = [sys.executable, "-m", "watchbuy", *args]
        if host.netns:
            command = ["ip", "netns", "exec", host.netns, *command]
        log = self.tmp / f"{host.node_id}-{name}.log"
        host.logs[name] = log
        with open(log, "w") as out:
            host.procs[name] = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, cwd=self.tmp,
            )

    def _make_namespace(self, index: int) -> str:
        namespace, outside, inside = f"{PREFIX}n{index}", f"{PREFIX}h{index}", f"{PREFIX}p{index}"
        octet = (os.getpid() % 60) * 4 + index
        self.namespaces.append(namespace)
        run("ip", "netns", "add", namespace)
        run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        run("ip", "link", "set", inside, "netns", namespace)
        run("ip", "addr", "add", f"10.200.{octet}.1/30", "dev", outside)
        run("ip", "link", "set", outside, "up")
        inns = ["ip", "netns", "exec", namespace]
        run(*inns, "ip", "link", "set", "lo", "up")
        run(*inns, "ip", "link", "set", inside, "name", "eth0")
        run(*inns, "ip", "addr", "add", f"10.200.{octet}.2/30", "dev", "eth0")
        run(*inns, "ip", "link", "set", "eth0", "up")
        return f"10.200.{octet}.2"

    def add(self, node_id: str, keys: dict[str, str]) -> MediaHost:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHBUY_")}
        env.update({
            "WATCHBUY_ENV_FILE": os.devnull,
            "WATCHBUY_NODE_ID": node_id,
            "WATCHBUY_STREAM_KEYS": ",".join(f"{k}={v}" for k, v in keys.items()),
            "WATCHBUY_DATA_DIR": str(self.tmp / node_id),
            "WATCHBUY_LOG_LEVEL": "WARNING",
            "WATCHBUY_WORKERS": "1",  # nodes of one process: the balancer's view is the point
            "WATCHBUY_AGENT_INTERVAL": "0.25",
            "WATCHBUY_AGENT_WINDOW": "2",
        })
        index = len(self.hosts)
        if self.layout == "netns":
            address = self._make_namespace(index)
            host = MediaHost(node_id, address, 1935, 8000, 8090, netns=f"{PREFIX}n{index}")
            agent_args = ["--interfaces", "eth0"]
        else:
            host = MediaHost(node_id, "127.0.0.1", free_port(), free_port(), free_port())
            env.update({"WATCHBUY_RTMP_HOST": "127.0.0.1", "WATCHBUY_HTTP_HOST": "127.0.0.1",
                        "WATCHBUY_AGENT_HOST": "127.0.0.1"})
            agent_args = ["--rx-source", "engine"]
        self.hosts.append(host)
        self._spawn(host, "media", ["media", "--rtmp-port", str(host.rtmp_port),
                                    "--http-port", str(host.http_port)], env)
        self._spawn(host, "agent", ["status-agent", "--port", str(host.agent_port),
                                    "--engine-url", f"http://127.0.0.1:{host.http_port}",
                                    *agent_args], env)
        return host

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        for host in self.hosts:
            while True:
                try:
                    status = await fetch_json(host.host, host.agent_port, "/status", 2)
                    if status["engine_ok"]:
                        break
                except FetchError:
                    pass
                dead = [n for n, p in host.procs.items() if p.poll() is not None]
                if dead or asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"{host.node_id} not ready ({dead} exited)\n"
                                         f"{host.log_tail()}")
                await asyncio.sleep(0.1)

    def close(self) -> None:
        for host in self.hosts:
            for proc in host.procs.values():
                if proc.poll() is None:
                    proc.terminate()
            for proc in host.procs.values():
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for namespace in self.namespaces:
            # Deleting the namespace destroys the veth pair with it.
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
