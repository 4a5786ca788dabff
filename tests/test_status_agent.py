"""The status agent: the real sampler over /proc, answers from memory, engine counts, the CLI."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys

import httpx
import pytest
from conftest import start_ffmpeg_publisher, stop_process, wait_live

from watchbuy.engine.rates import RateWindow
from watchbuy.settings import ConfigError
from watchbuy.status_agent.agent import StatusAgent
from watchbuy.status_agent.client import FetchError, fetch_json
from watchbuy.status_agent.config import AgentSettings, parse_engine_url
from watchbuy.status_agent.procfs import ProcReader, parse_cpu, parse_net_dev

NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 51476937   22328    0    0    0     0          0         0 51476937   22328    0    0    0     0       0          0
  eth0: 115563581    3433    0    0    0     0          0         0   227664    2060    0    0    0     0       0          0
veth-ab12:1234 5 0 0 0 0 0 0 99 1 0 0 0 0 0 0
"""


def agent_settings(**changes) -> AgentSettings:
    base = dict(node_id="agent-test", agent_host="127.0.0.1", agent_port=0,
                agent_include_loopback=True, engine_url="", agent_interval=0.1,
                agent_window=0.5)
    base.update(changes)
    settings = AgentSettings(**base)
    settings.validate()
    return settings


async def status_of(agent: StatusAgent) -> dict:
    return await fetch_json("127.0.0.1", agent.port, "/status", 5)


async def wait_for_status(agent: StatusAgent, check, timeout: float = 15.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status = await status_of(agent)
        if check(status):
            return status
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"status never matched within {timeout} s: {status}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def agent_factory():
    agents = []

    async def make(engine_info=None, **changes) -> StatusAgent:
        agent = StatusAgent(agent_settings(**changes), engine_info=engine_info)
        await agent.start()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        await agent.stop()


# -- counters and windows ---------------------------------------------------------------------
def test_parse_net_dev_reads_rx_and_tx_bytes_per_interface():
    counters = parse_net_dev(NET_DEV)
    assert counters == {"lo": (51476937, 51476937), "eth0": (115563581, 227664),
                        "veth-ab12": (1234, 99)}


def test_parse_cpu_counts_idle_and_iowait_as_not_busy():
    busy, total = parse_cpu("cpu  100 5 50 800 40 3 2 0 0 0\ncpu0 1 2 3 4 5 6 7 8\n")
    assert (busy, total) == (160, 1000)


def test_proc_reader_reads_this_machines_counters():
    reader = ProcReader()
    assert "lo" in reader.interfaces()
    busy, total = reader.cpu()
    assert 0 <= busy <= total and total > 0


def test_rate_window_skips_a_counter_that_went_backwards():
    window = RateWindow(5)
    window.add(0.0, {"eth0": (1000, 0), "veth1": (5000, 0)})
    window.add(2.0, {"eth0": (3000, 400), "veth1": (10, 0)})
    assert window.rates() == {"eth0": (1000.0, 200.0)}
    assert window.rate("veth1", 2) == (0.0, 0.0)
    cpu = RateWindow(5)
    cpu.add(0.0, {"cpu": (0, 100)})
    assert cpu.fraction("cpu") == 0.0  # one sample: no rate yet
    cpu.add(2.0, {"cpu": (50, 200)})
    assert cpu.fraction("cpu") == 0.5


def test_status_agent_does_not_load_the_engine_codecs():
    # The agent runs beside the engine, often as its own process: the shared rate window must
    # not pull in the relay and the compiled codecs.
    code = ("import sys, watchbuy.status_agent.agent; "
            "print(any(m.startswith(('watchbuy.engine.codecs', 'watchbuy.engine.relay')) "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_settings_refuse_bad_values_with_one_line():
    for changes, variable in [
        ({"agent_rx_source": "wifi"}, "WATCHBUY_AGENT_RX_SOURCE"),
        ({"agent_window": 0.1}, "WATCHBUY_AGENT_WINDOW"),
        ({"engine_url": "ftp://x"}, "WATCHBUY_ENGINE_URL"),
        ({"engine_url": "", "agent_rx_source": "engine"}, "WATCHBUY_ENGINE_URL"),
        ({"agent_port": 70000}, "WATCHBUY_AGENT_PORT"),
    ]:
        with pytest.raises(ConfigError) as info:
            agent_settings(**changes)
        assert variable in str(info.value) and "\n" not in str(info.value)
    assert parse_engine_url("http://10.0.0.5:8001/base/").port == 8001
    assert parse_engine_url("http://h").path == "/api/server"


# -- the real sampler -------------------------------------------------------------------------
async def test_sampler_measures_real_loopback_traffic(agent_factory):
    agent = await agent_factory(agent_interfaces=["lo"])
    server_got = 0

    async def sink(reader, writer):
        nonlocal server_got
        while data := await reader.read(1 << 20):
            server_got += len(data)
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk = b"x" * (1 << 20)

    async def pump():
        while True:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.01)

    pumping = asyncio.ensure_future(pump())
    try:
        # Loopback is shared with whatever else runs here, so only a floor can be asserted.
        status = await wait_for_status(agent, lambda s: s["rx_bytes_per_s"] > 5_000_000)
    finally:
        pumping.cancel()
        writer.close()
        server.close()
    assert set(status["interfaces"]) == {"lo"}
    assert status["interfaces"]["lo"]["rx_bytes_per_s"] == status["rx_bytes_per_s"]
    assert status["tx_bytes_per_s"] > 0
    assert 0 < status["window_s"] <= 0.5 + 0.5
    assert 0.0 <= status["cpu_load"] <= 1.0
    assert server_got > 0


async def test_automatic_interfaces_leave_loopback_out_unless_asked(agent_factory):
    without = await agent_factory(agent_include_loopback=False)
    with_lo = await agent_factory(agent_include_loopback=True)
    assert "lo" not in (await status_of(without))["interfaces"]
    assert "lo" in (await status_of(with_lo))["interfaces"]


async def test_answers_come_from_memory_not_from_a_fresh_sample(agent_factory):
    # Sampling every 5 s: an agent that sampled per request (a second between two reads) would
    # take seconds and give a new sampled_at every time.
    agent = await agent_factory(agent_interval=5.0, agent_window=10.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with httpx.AsyncClient() as client:
        answers = [
            (await client.get(f"http://127.0.0.1:{agent.port}/status")).json() for _ in range(50)
        ]
    elapsed = loop.time() - started
    assert len({a["sampled_at"] for a in answers}) <= 2  # at most one sample boundary crossed
    assert elapsed < 2.5  # generous: 50 answers, far under one sampling interval


async def test_unknown_configured_interface_is_a_config_error():
    agent = StatusAgent(agent_settings(agent_interfaces=["nope0"]))
    with pytest.raises(ConfigError, match="nope0"):
        await agent.start()


# -- HTTP -------------------------------------------------------------------------------------
async def raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    received = await asyncio.wait_for(reader.read(-1), 10)  # until the agent closes
    writer.close()
    return received


async def test_keep_alive_pipelining_and_errors(agent_factory):
    agent = await agent_factory()
    pipelined = (b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"HEAD /status?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
                 b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    received = await raw_exchange(agent.port, pipelined)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", received)
    assert statuses == [b"200", b"200", b"404", b"405", b"200"]
    assert received.count(b'"node_id":"agent-test"') == 2  # HEAD has no body

    http10 = await raw_exchange(agent.port, b"GET /status HTTP/1.0\r\n\r\n")
    assert http10.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in http10

    bad = await raw_exchange(agent.port, b"NONSENSE\r\n\r\n")
    assert bad.startswith(b"HTTP/1.1 400")
    with_body = await raw_exchange(agent.port, b"GET /status HTTP/1.1\r\nContent-Length: 5\r\n\r\n")
    assert with_body.startswith(b"HTTP/1.1 400")
    huge = await raw_exchange(agent.port, b"GET /status HTTP/1.1\r\nX: " + b"a" * 10000)
    assert huge.startswith(b"HTTP/1.1 431")


async def test_many_keep_alive_requests_on_one_connection(agent_factory):
    agent = await agent_factory()
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            response = await client.get(f"http://127.0.0.1:{agent.port}/status")
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/json"


# -- the engine beside it ---------------------------------------------------------------------
async def test_engine_counts_from_a_real_engine_beside_it(node, agent_factory, ffmpeg):
    agent = await agent_factory(engine_url=f"http://127.0.0.1:{node.http_port}")
    idle = await status_of(agent)
    assert idle["engine_ok"] is True and idle["publishers"] == 0 and idle["viewers"] == 0
    publisher = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/key1",
                                             seconds=20)
    try:
        await wait_live(node, "show1")
        status = await wait_for_status(agent, lambda s: s["publishers"] == 1)
        assert status["engine_ok"] is True and status["node_id"] == "agent-test"
    finally:
        await stop_process(publisher)


async def test_rx_source_engine_counts_the_engines_ingest(node, agent_factory, ffmpeg):
    agent = await agent_factory(engine_url=f"http://127.0.0.1:{node.http_port}",
                                agent_rx_source="engine")
    publisher = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/key2",
                                             seconds=20)
    try:
        await wait_live(node, "show2")
        # The engine's counts lag its live state by up to a poll: wait for both.
        status = await wait_for_status(
            agent, lambda s: s["publishers"] == 1 and s["rx_bytes_per_s"] > 20_000)
        assert set(status["interfaces"]) == {"engine"} and status["rx_source"] == "engine"
    finally:
        await stop_process(publisher)


async def test_in_process_engine_hook(node, agent_factory):
    agent = await agent_factory(engine_info=node.server_info, engine_url="")
    status = await status_of(agent)
    assert status["engine_ok"] is True and status["publishers"] == 0


async def test_engine_down_means_engine_ok_false(agent_factory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    agent = await agent_factory(engine_url=f"http://127.0.0.1:{closed_port}")
    status = await status_of(agent)
    assert status["engine_ok"] is False
    assert status["publishers"] is None and status["viewers"] is None
    assert "refused" in status["engine_error"]


async def test_fetch_json_reports_failures_in_words():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with pytest.raises(FetchError, match="refused"):
        await fetch_json("127.0.0.1", closed_port, "/status", 2)


# -- the command ------------------------------------------------------------------------------
def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHBUY_")}
    env["WATCHBUY_ENV_FILE"] = os.devnull
    env.update(extra)
    return env


def test_cli_serves_status_and_stops_on_sigterm(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "watchbuy", "status-agent", "--host", "127.0.0.1", "--port", "0",
         "--include-loopback", "--engine-url", "", "--node-id", "cli-node"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
        cwd=tmp_path,
    )
    try:
        line = proc.stdout.readline()
        assert "status agent for node cli-node" in line, proc.stderr.read()
        url = line.rsplit(" ", 1)[1].strip()
        answer = httpx.get(url, timeout=10).json()
        assert answer["node_id"] == "cli-node" and "lo" in answer["interfaces"]
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0


@pytest.mark.parametrize("args, env, needle", [
    ([], {"WATCHBUY_AGENT_RX_SOURCE": "wifi"}, "WATCHBUY_AGENT_RX_SOURCE"),
    (["--interfaces", "nope0"], {}, "nope0"),
    (["--port", "99999"], {}, "WATCHBUY_AGENT_PORT"),
])
def test_cli_bad_configuration_is_one_line(tmp_path, args, env, needle):
    result = subprocess.run(
        [sys.executable, "-m", "watchbuy", "status-agent", "--host", "127.0.0.1", *args],
        capture_output=True, text=True, env=clean_env(**env), cwd=tmp_path, timeout=30,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


async def test_metrics_are_served_from_the_last_sample_in_prometheus_text(agent_factory):
    from prometheus_client.parser import text_string_to_metric_families

    agent = await agent_factory(engine_info=lambda: {"publishers": 2, "viewers": 7,
                                                     "bytes_in": 1, "bytes_out": 2},
                                agent_interfaces=["lo"])
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{agent.port}/metrics")
        head = await client.head(f"http://127.0.0.1:{agent.port}/metrics")
    assert response.status_code == 200 and head.status_code == 200 and head.content == b""
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text)
               for s in family.samples}
    assert samples[("watchbuy_agent_info", (("node_id", "agent-test"),
                                            ("rx_source", "interfaces")))] == 1
    assert samples[("watchbuy_agent_receive_bytes_total", (("source", "lo"),))] > 0
    assert samples[("watchbuy_agent_engine_up", ())] == 1
    assert samples[("watchbuy_agent_engine_viewers", ())] == 7
    assert 0 <= samples[("watchbuy_agent_cpu_load", ())] <= 1
    assert ("process_cpu_seconds_total", ()) in samples


async def test_client_reads_response_headers_with_the_request_parsers_rules():
    async def answer(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nno colon here\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(FetchError, match="malformed header line"):
            await fetch_json("127.0.0.1", port, "/status", 5)
    finally:
        server.close()
        await server.wait_closed()
