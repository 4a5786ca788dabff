"""End to end: real media nodes and status agents (`watchbuy media`, `watchbuy status-agent`
subprocesses), loaded by real ffmpeg publishers; the balancer sends the next host to the node
with the least ingest, skips a killed agent and does not wait past its timeout for a hung one.

Two layouts, the same test:

* ``netns``: each node in its own network namespace made here (``ip netns`` + a veth pair,
  10.200.x.0/30 inside this machine only).  The agent counts the namespace's own interface
  with the kernel's counters, as on a real fleet.  Needs root and iproute2; skipped otherwise.
* ``loopback``: every node on 127.0.0.1 with its own ports.  Loopback's counters are shared by
  all of them, so the agents use ``WATCHBUY_AGENT_RX_SOURCE=engine`` (the engine's counted
  ingest bytes) to tell the nodes apart.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import start_ffmpeg_publisher, stop_process
from node_cluster import TIMEOUT, Cluster, netns_unavailable, remove_stale_namespaces

from watchbuy import urls
from watchbuy.balancer import Balancer, Node, StaticDiscovery

pytestmark = pytest.mark.usefixtures("ffmpeg")

@pytest.fixture(params=["netns", "loopback"])
def cluster(request, tmp_path):
    if request.param == "netns":
        reason = netns_unavailable()
        if reason:
            pytest.skip(reason)
        remove_stale_namespaces()
    group = Cluster(request.param, tmp_path)
    yield group
    group.close()


class HangingServer:
    """Accepts connections and never answers: an agent stuck in a bad state."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.accepted = 0

    async def start(self) -> int:
        async def hold(reader, writer):
            self.accepted += 1
            self.writers.append(writer)

        self.server = await asyncio.start_server(hold, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.server.close()


async def test_least_ingest_node_wins_killed_and_hung_agents_are_skipped(cluster):
    heavy = cluster.add("heavy", {"kh1": "big1", "kh2": "big2"})
    light = cluster.add("light", {"kl1": "small1", "kl2": "small2"})
    medium = cluster.add("medium", {"km": "mid"})
    await cluster.wait_ready()

    # Inbound loads: two 640x360 publishers; two tiny ones; one 320x240.  The light node has
    # more publishers than the medium one: rx bytes/s decides, not the publisher count.
    publishers = [
        await start_ffmpeg_publisher(heavy.publish_url("kh1"), 60, "640x360", 25, 25),
        await start_ffmpeg_publisher(heavy.publish_url("kh2"), 60, "640x360", 25, 25),
        await start_ffmpeg_publisher(light.publish_url("kl1"), 60, "128x96", 5, 5),
        await start_ffmpeg_publisher(light.publish_url("kl2"), 60, "128x96", 5, 5),
        await start_ffmpeg_publisher(medium.publish_url("km"), 60, "320x240", 25, 25),
    ]
    balancer = Balancer(StaticDiscovery([h.node() for h in cluster.hosts]),
                        timeout=TIMEOUT, cache_ttl=0)
    try:
        # Until every publisher is live and the agents' windows have seen the loads settle.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 40
        while True:
            round_ = await balancer.statuses(fresh=True)
            by_id = {s.node_id: s for s in round_.statuses}
            counts = {n: s.publishers for n, s in by_id.items()}
            rx = {n: s.rx_bytes_per_s for n, s in by_id.items()}
            if (counts == {"heavy": 2, "light": 2, "medium": 1}
                    and rx["light"] < rx["medium"] < rx["heavy"]):
                break
            if loop.time() > deadline:
                raise AssertionError(f"loads never showed: publishers {counts}, rx {rx}\n"
                                     + "\n".join(h.log_tail() for h in cluster.hosts))
            await asyncio.sleep(0.25)
        for status in round_.statuses:
            if cluster.layout == "netns":
                assert set(status.raw["interfaces"]) == {"eth0"}  # the namespace's own NIC

        # The node with the least ingest wins, although it has the most publishers.
        choice = await balancer.choose()
        assert choice.node_id == "light", rx
        assert choice.rtmp_url == urls.rtmp_url(light.host, light.rtmp_port, "live")

        # Its agent dies: the next round skips it within the timeout.
        light.procs["agent"].kill()
        light.procs["agent"].wait()
        started = loop.time()
        choice = await balancer.choose()
        assert choice.node_id == "medium"
        assert loop.time() - started < TIMEOUT + 1.0  # generous bound on a busy machine

        # An agent that accepts and never answers does not hold the answer past the timeout.
        hanging = HangingServer()
        hang_port = await hanging.start()
        try:
            with_hung = Balancer(
                StaticDiscovery([h.node() for h in cluster.hosts]
                                + [Node("127.0.0.1", 1, 2, hang_port, "hung")]),
                timeout=TIMEOUT, cache_ttl=0,
            )
            started = loop.time()
            choice = await with_hung.choose()
            elapsed = loop.time() - started
            assert choice.node_id == "medium" and hanging.accepted == 1
            assert elapsed < TIMEOUT + 1.0  # generous bound on a busy machine
            hung = next(s for s in with_hung._round.statuses if s.node_id == "hung")
            assert not hung.ok and "no answer" in hung.error
        finally:
            hanging.close()
    finally:
        for publisher in publishers:
            await stop_process(publisher)

