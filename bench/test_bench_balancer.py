"""Balancer and status agent speed (issue 4's targets).

Run with ``pytest bench/test_bench_balancer.py --benchmark-only`` (a few seconds each):

* a decision over 50 nodes, 5 of which accept and never answer: p99 ≤ timeout + 50 ms (the
  round waits out the hung ones; everything else must fit in that margin);
* the same decision from the cache: ≤ 20 ms;
* ``GET /status`` requests per second against a real ``watchbuy status-agent`` process, from a
  load client in another process (wrk when installed, else a small asyncio client): ≥ 5000.

The fake agents run in their own process, as remote agents would: real asyncio servers on 50
loopback ports.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from watchbuy.balancer import Balancer, Node, StaticDiscovery

TIMEOUT = 0.5
NODES, HUNG = 50, 5

FAKE_AGENTS = textwrap.dedent("""
    import asyncio, json, random, sys
    try:
        import uvloop; uvloop.install()
    except ImportError:
        pass

    answering, hanging = int(sys.argv[1]), int(sys.argv[2])
    held = []

    class Agent(asyncio.Protocol):
        def __init__(self, index):
            self.body = json.dumps({"node_id": f"n{index}", "rx_bytes_per_s": random.random() * 1e7,
                                    "tx_bytes_per_s": 0, "publishers": index % 4, "viewers": 0,
                                    "engine_ok": True}).encode()
        def connection_made(self, transport):
            self.transport = transport
        def data_received(self, data):
            if b"\\r\\n\\r\\n" in data:
                self.transport.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\n"
                                     b"Content-Length: %d\\r\\nConnection: close\\r\\n\\r\\n%s"
                                     % (len(self.body), self.body))
                self.transport.close()

    class Hung(asyncio.Protocol):
        def connection_made(self, transport):
            held.append(transport)  # accept, never answer

    async def main():
        loop = asyncio.get_running_loop()
        ports = {"answering": [], "hanging": []}
        for i in range(answering):
            server = await loop.create_server(lambda i=i: Agent(i), "127.0.0.1", 0, backlog=512)
            ports["answering"].append(server.sockets[0].getsockname()[1])
        for _ in range(hanging):
            server = await loop.create_server(Hung, "127.0.0.1", 0, backlog=512)
            ports["hanging"].append(server.sockets[0].getsockname()[1])
        print(json.dumps(ports), flush=True)
        await loop.connect_read_pipe(asyncio.Protocol, sys.stdin)  # keep the pipe open
        while sys.stdin.readable():
            await asyncio.sleep(3600)

    asyncio.run(main())
""")

LOAD_CLIENT = textwrap.dedent("""
    import asyncio, sys, time
    try:
        import uvloop; uvloop.install()
    except ImportError:
        pass

    port, connections, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    REQUEST = b"GET /status HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n"
    done = 0

    class Client(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buffer = transport, b""
            transport.write(REQUEST)
        def data_received(self, data):
            global done
            self.buffer += data
            while True:
                end = self.buffer.find(b"\\r\\n\\r\\n")
                if end < 0:
                    return
                length = int(self.buffer[:end].split(b"Content-Length: ")[1].split(b"\\r\\n")[0])
                if len(self.buffer) < end + 4 + length:
                    return
                self.buffer = self.buffer[end + 4 + length:]
                done += 1
                if time.monotonic() < stop_at:
                    self.transport.write(REQUEST)
                else:
                    self.transport.close()

    async def main():
        global stop_at
        loop = asyncio.get_running_loop()
        stop_at = time.monotonic() + seconds
        started = time.monotonic()
        for _ in range(connections):
            await loop.create_connection(Client, "127.0.0.1", port)
        await asyncio.sleep(seconds + 0.2)
        print(done / (time.monotonic() - started - 0.2))

    asyncio.run(main())
""")


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


@pytest.fixture(scope="module")
def fake_fleet():
    proc = subprocess.Popen([sys.executable, "-c", FAKE_AGENTS, str(NODES - HUNG), str(HUNG)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ports = json.loads(proc.stdout.readline())
        nodes = [Node("127.0.0.1", 1935, 8000, port, f"n{i}")
                 for i, port in enumerate(ports["answering"])]
        nodes += [Node("127.0.0.1", 1935, 8000, port, f"hung{i}")
                  for i, port in enumerate(ports["hanging"])]
        yield nodes
    finally:
        proc.kill()
        proc.wait()


def percentile(data: list[float], fraction: float) -> float:
    ordered = sorted(data)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def test_decision_50_nodes_5_hung(benchmark, fake_fleet):
    loop = new_loop()
    balancer = Balancer(StaticDiscovery(fake_fleet), timeout=TIMEOUT, cache_ttl=0)
    try:
        choice = loop.run_until_complete(balancer.choose())
        assert choice.node_id.startswith("n")
        benchmark.pedantic(lambda: loop.run_until_complete(balancer.choose()),
                           rounds=10, warmup_rounds=1)
        statuses = balancer._round.statuses
        assert sum(not s.ok for s in statuses) == HUNG
    finally:
        loop.close()
    data = benchmark.stats.stats.data
    p99 = percentile(data, 0.99)
    benchmark.extra_info.update(p99_s=p99, target_s=TIMEOUT + 0.05)
    print(f"\ndecision over {NODES} nodes ({HUNG} hung), timeout {TIMEOUT} s: "
          f"p99 {p99 * 1000:.1f} ms, target <= {(TIMEOUT + 0.05) * 1000:.0f} ms")
    assert p99 <= TIMEOUT + 0.05


def test_decision_from_cache(benchmark, fake_fleet):
    loop = new_loop()
    balancer = Balancer(StaticDiscovery(fake_fleet), timeout=TIMEOUT, cache_ttl=3600)
    try:
        loop.run_until_complete(balancer.choose())
        benchmark(lambda: loop.run_until_complete(balancer.choose()))
        assert balancer.rounds == 1
    finally:
        loop.close()
    p99 = percentile(benchmark.stats.stats.data, 0.99)
    benchmark.extra_info.update(p99_s=p99, target_s=0.02)
    print(f"\ndecision from the cache: p99 {p99 * 1e6:.0f} us, target <= 20 ms")
    assert p99 <= 0.02


def load_with_wrk(url: str, seconds: int) -> float:
    out = subprocess.run(["wrk", "-t1", "-c50", f"-d{seconds}s", url], capture_output=True,
                         text=True, timeout=seconds + 30).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def load_with_python(port: int, seconds: int) -> float:
    out = subprocess.run([sys.executable, "-c", LOAD_CLIENT, str(port), "50", str(seconds)],
                         capture_output=True, text=True, timeout=seconds + 30)
    return float(out.stdout.strip())


@pytest.mark.parametrize("client", ["wrk", "python"])
def test_status_endpoint_requests_per_second(benchmark, client, tmp_path):
    if client == "wrk" and shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHBUY_")}
    env["WATCHBUY_ENV_FILE"] = os.devnull
    agent = subprocess.Popen(
        [sys.executable, "-m", "watchbuy", "status-agent", "--host", "127.0.0.1", "--port", "0",
         "--include-loopback", "--engine-url", "", "--node-id", "bench"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path,
    )
    try:
        url = agent.stdout.readline().rsplit(" ", 1)[1].strip()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        seconds = 3
        rates = []

        def load() -> None:
            rates.append(load_with_wrk(url, seconds) if client == "wrk"
                         else load_with_python(port, seconds))

        benchmark.pedantic(load, rounds=1, iterations=1)
    finally:
        agent.terminate()
        agent.wait(10)
    benchmark.extra_info.update(requests_per_s=rates[0], client=client)
    print(f"\nGET /status with {client}, 50 keep-alive connections: {rates[0]:.0f} requests/s "
          "(target >= 5000)")
    assert rates[0] >= 5000
