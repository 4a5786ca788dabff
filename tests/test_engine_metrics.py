"""``GET /metrics`` on a media node: live Prometheus counters with real peers (ffmpeg publishing,
an HTTP-FLV and an RTMP viewer), read back with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from conftest import FlvHttpReader, start_ffmpeg_publisher, stop_process, wait_live
from prometheus_client.parser import text_string_to_metric_families

from watchbuy.engine.client import RtmpClient, RtmpError

pytestmark = pytest.mark.usefixtures("ffmpeg")


async def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` from the node's /metrics."""
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def send_garbage(port: int, data: bytes) -> None:
    """Send bytes that break the protocol and wait until the node drops the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        pass
    writer.close()


async def test_metrics_show_live_streams_viewers_bytes_and_refusals(node):
    pub = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/key1")
    rtmp_viewer = None
    try:
        await wait_live(node, "show1")
        before = await scrape(node.http_port)
        assert value(before, "watchbuy_node_streams") == 1
        assert value(before, "watchbuy_node_viewers", protocol="flv") == 0
        flv_viewer = await FlvHttpReader.open(node.http_port, "/live/show1.flv")
        assert await flv_viewer.tags()
        rtmp_viewer = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
        await rtmp_viewer.play("show1")
        await rtmp_viewer.media()
        # refusals a real encoder meets: a wrong key, and a second publisher on a live stream
        for key, code in (("nokey", "Unauthorized"), ("key1", "BadName")):
            intruder = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
            with pytest.raises(RtmpError, match=code):
                await intruder.publish(key)
            await intruder.close()
        await send_garbage(node.rtmp_port, b"\x09" + bytes(1536))  # RTMP version 9: no handshake
        await send_garbage(node.http_port, b"GARBAGE\r\n\r\n")
        await asyncio.sleep(0.5)  # more media flows
        after = await scrape(node.http_port)

        info = [dict(labels) for (name, labels), v in after.items()
                if name == "watchbuy_node_info" and v == 1]
        assert [i["node_id"] for i in info] == ["test-node"]
        assert value(after, "watchbuy_node_streams") == 1
        assert value(after, "watchbuy_node_viewers", protocol="flv") == 1
        assert value(after, "watchbuy_node_viewers", protocol="rtmp") == 1
        assert value(after, "watchbuy_node_stream_viewers", app="live", stream="show1",
                     protocol="rtmp") == 1
        assert value(after, "watchbuy_node_viewers_started_total", protocol="flv") == 1
        # the counters are live: they grew between the two scrapes
        for name in ("watchbuy_node_received_bytes_total", "watchbuy_node_sent_bytes_total"):
            assert value(after, name) > value(before, name) > 0, name
        assert value(after, "watchbuy_node_stream_received_bytes_total", app="live",
                     stream="show1") > value(before, "watchbuy_node_stream_received_bytes_total",
                                              app="live", stream="show1")
        assert value(after, "watchbuy_node_publish_refused_total", reason="unauthorized") == 1
        assert value(after, "watchbuy_node_publish_refused_total", reason="already_live") == 1
        assert value(after, "watchbuy_node_protocol_errors_total", kind="rtmp_handshake") == 1
        assert value(after, "watchbuy_node_protocol_errors_total", kind="http") == 1
        assert value(after, "watchbuy_node_connections", protocol="rtmp") >= 2  # pub + player
        assert value(after, "watchbuy_node_connections_refused_total", reason="per_ip") == 0
        assert value(after, "process_resident_memory_bytes") > 0
        await flv_viewer.close()
    finally:
        if rtmp_viewer is not None:
            await rtmp_viewer.close()
        await stop_process(pub)


async def test_metrics_count_timeouts_by_kind(node):
    node.settings.header_timeout = 0.3  # an HTTP client that never finishes its head
    sock = socket.create_connection(("127.0.0.1", node.http_port))
    sock.sendall(b"GET /healthz HTTP/1.1\r\n")
    try:
        for _ in range(100):
            if node.stats.timeouts["http_header"]:
                break
            await asyncio.sleep(0.05)
        samples = await scrape(node.http_port)
        assert value(samples, "watchbuy_node_timeouts_total", kind="http_header") == 1
        assert value(samples, "watchbuy_node_timeouts_total", kind="rtmp_idle") == 0
    finally:
        sock.close()


async def test_the_grafana_dashboard_charts_only_metrics_that_exist(node):
    """deploy/grafana/watchbuy.json must not chart a node or agent metric we do not export (a
    renamed counter would leave a panel silently empty)."""
    import json
    import re
    from pathlib import Path

    from watchbuy.status_agent import AgentSettings, StatusAgent

    dashboard = json.loads((Path(__file__).resolve().parents[1] / "deploy" / "grafana" /
                            "watchbuy.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    charted = set(re.findall(r"\b(watchbuy_(?:node|agent)_[a-z_]+)", " ".join(exprs)))
    assert len(charted) >= 15, charted

    agent = StatusAgent(AgentSettings(node_id="dash", agent_host="127.0.0.1", agent_port=0,
                                      engine_url="", agent_include_loopback=True),
                        engine_info=node.server_info)
    await agent.start()
    try:
        exported = set()
        for port in (node.http_port, agent.port):
            async with httpx.AsyncClient() as client:
                text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            for family in text_string_to_metric_families(text):
                exported.add(family.name + ("_total" if family.type == "counter" else ""))
    finally:
        await agent.stop()
    assert charted - exported == set()
    # the site's row is there for the site's metrics, named as documented
    assert any("watchbuy_site_requests_total" in e for e in exprs)
