"""The balancer's choice, cache and URLs against agents that are real asyncio HTTP servers.

Each fake agent serves a status document the test sets (and counts the requests); a hanging one
accepts and never answers.  The end-to-end test with real engines, agents and ffmpeg publishers
is test_balancer_nodes.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys

import pytest
from balancer_helpers import FakeAgent

from watchbuy.balancer import (
    Balancer,
    BalancerSettings,
    Node,
    NoHealthyNode,
    StaticDiscovery,
    parse_node_entry,
)
from watchbuy.settings import ConfigError, load_config


@pytest.fixture
async def agents():
    started: list[FakeAgent] = []

    async def make(**kwargs) -> FakeAgent:
        agent = await FakeAgent(**kwargs).start()
        started.append(agent)
        return agent

    yield make
    for agent in started:
        await agent.stop()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def balancer_for(nodes, **kwargs) -> Balancer:
    kwargs.setdefault("timeout", 0.5)
    kwargs.setdefault("cache_ttl", 0)
    return Balancer(StaticDiscovery(nodes), **kwargs)


# -- configuration ----------------------------------------------------------------------------
def test_node_entries():
    assert parse_node_entry("10.0.0.5") == Node("10.0.0.5")
    assert parse_node_entry("a-1=media1.example.com") == Node("media1.example.com", node_id="a-1")
    assert parse_node_entry("b=127.0.0.1:19350:18000:18090", 1, 2, 3) == Node(
        "127.0.0.1", 19350, 18000, 18090, "b")
    assert parse_node_entry("[::1]:1:2:3") == Node("::1", 1, 2, 3)
    assert parse_node_entry("host", 1936, 8001, 8091) == Node("host", 1936, 8001, 8091)
    for bad in ["", "bad id=host", "host:1935", "host:1:2:99999", "[::1", "ho st", "x=h:a:b:c"]:
        with pytest.raises(ConfigError):
            parse_node_entry(bad)


def test_settings_from_the_environment():
    env = {"WATCHBUY_ENV_FILE": os.devnull,
           "WATCHBUY_BALANCER_NODES": "a=10.0.0.1, b=10.0.0.2:1:2:3",
           "WATCHBUY_BALANCER_TIMEOUT": "0.25", "WATCHBUY_PUBLISHER_CAP": "3",
           "WATCHBUY_CDN_DOMAIN": "https://d111.cloudfront.net/"}
    settings = load_config(BalancerSettings, env)
    assert [n.node_id for n in settings.static_nodes()] == ["a", "b"]
    assert settings.static_nodes()[1].agent_port == 3
    assert settings.balancer_timeout == 0.25 and settings.publisher_cap == 3
    assert settings.cdn_domain == "d111.cloudfront.net"
    default = load_config(BalancerSettings, {"WATCHBUY_ENV_FILE": os.devnull})
    assert default.static_nodes() == [Node("127.0.0.1")]


@pytest.mark.parametrize("env, needle", [
    ({"WATCHBUY_BALANCER_NODES": ""}, "no media nodes configured"),
    ({"WATCHBUY_BALANCER_NODES": "a=h1,a=h2"}, "unique"),
    ({"WATCHBUY_BALANCER_NODES": "h:1"}, "host:rtmp_port:http_port:agent_port"),
    ({"WATCHBUY_BALANCER_TIMEOUT": "0"}, "WATCHBUY_BALANCER_TIMEOUT"),
    ({"WATCHBUY_PUBLISHER_CAP": "-1"}, "WATCHBUY_PUBLISHER_CAP"),
    ({"WATCHBUY_CDN_DOMAIN": "not a domain"}, "WATCHBUY_CDN_DOMAIN"),
])
def test_bad_settings_are_one_line(env, needle):
    with pytest.raises(ConfigError) as info:
        load_config(BalancerSettings, {"WATCHBUY_ENV_FILE": os.devnull, **env})
    assert needle in str(info.value) and "\n" not in str(info.value)


# -- the choice -------------------------------------------------------------------------------
async def test_picks_the_lowest_rx_not_the_fewest_publishers(agents):
    busy = await agents(rx_bytes_per_s=5_000_000, publishers=1)
    light = await agents(rx_bytes_per_s=200_000, publishers=3)
    middle = await agents(rx_bytes_per_s=900_000, publishers=0)
    balancer = balancer_for([busy.node("busy"), light.node("light"), middle.node("middle")])
    choice = await balancer.choose()
    assert choice.node_id == "light"
    assert choice.rx_bytes_per_s == 200_000 and choice.publishers == 3
    assert choice.agent_url == f"http://127.0.0.1:{light.port}/status"


async def test_ties_on_rx_go_to_fewer_publishers(agents):
    two = await agents(rx_bytes_per_s=1000, publishers=2)
    one = await agents(rx_bytes_per_s=1000, publishers=1)
    assert (await balancer_for([two.node("two"), one.node("one")]).choose()).node_id == "one"


async def test_skips_unreachable_unhealthy_full_and_garbled_nodes(agents):
    down_engine = await agents(rx_bytes_per_s=0, engine_ok=False)
    full = await agents(rx_bytes_per_s=0, publishers=4)
    garbled = await agents()
    garbled.status = b"<html>not json</html>"
    no_rx = await agents()
    del no_rx.status["rx_bytes_per_s"]
    good = await agents(rx_bytes_per_s=9_000_000, publishers=3)
    nodes = [down_engine.node("engine-down"), full.node("full"), garbled.node("garbled"),
             no_rx.node("no-rx"), Node("127.0.0.1", agent_port=closed_port(), node_id="gone"),
             good.node("good")]
    choice = await balancer_for(nodes, publisher_cap=4).choose()
    assert choice.node_id == "good"


async def test_no_healthy_node_says_why_for_each(agents):
    full = await agents(publishers=2)
    down = await agents(engine_ok=False)
    gone = Node("127.0.0.1", agent_port=closed_port(), node_id="gone")
    balancer = balancer_for([full.node("full"), down.node("down"), gone], publisher_cap=2)
    with pytest.raises(NoHealthyNode) as info:
        await balancer.choose()
    message = str(info.value)
    assert "full: full (2/2 publishers)" in message
    assert "down: engine down" in message
    assert "gone: unreachable (connection refused)" in message
    assert "\n" not in message and len(info.value.statuses) == 3
    with pytest.raises(NoHealthyNode, match="none found in the static node list"):
        await balancer_for([]).choose()


async def test_no_cap_when_cap_is_zero(agents):
    crowded = await agents(publishers=500)
    assert (await balancer_for([crowded.node("c")], publisher_cap=0).choose()).node_id == "c"


async def test_a_hanging_agent_does_not_hold_the_answer_past_the_timeout(agents):
    hanging = await agents(hang=True)
    good = await agents(rx_bytes_per_s=5)
    balancer = balancer_for([hanging.node("hang"), good.node("good")], timeout=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    choice = await balancer.choose()
    elapsed = loop.time() - started
    assert choice.node_id == "good"
    assert hanging.requests == 1  # it was asked, and waited for up to the timeout
    assert 0.25 <= elapsed < 0.3 + 1.0  # generous bound on a busy machine
    statuses = {s.node_id: s for s in balancer._round.statuses}
    assert statuses["hang"].error == "no answer within 0.3 s"


# -- cache and single flight ------------------------------------------------------------------
async def test_a_burst_of_callers_shares_one_round_and_the_cache(agents):
    fleet = [await agents(rx_bytes_per_s=i * 1000) for i in range(5)]
    hanging = await agents(hang=True)  # makes the round last the timeout: callers overlap
    balancer = balancer_for([a.node(f"n{i}") for i, a in enumerate(fleet)] + [hanging.node("h")],
                            timeout=0.3, cache_ttl=60)
    choices = await asyncio.gather(*(balancer.choose() for _ in range(25)))
    assert {c.node_id for c in choices} == {"n0"}
    assert [a.requests for a in fleet] == [1] * 5 and balancer.rounds == 1
    await balancer.choose()  # from the cache
    assert balancer.rounds == 1 and fleet[0].requests == 1
    balancer.invalidate()
    await balancer.choose()
    assert balancer.rounds == 2 and fleet[0].requests == 2


async def test_the_cache_expires(agents):
    agent = await agents(rx_bytes_per_s=1)
    balancer = balancer_for([agent.node("a")], cache_ttl=1.0)
    await balancer.choose()
    await balancer.choose()
    assert agent.requests == 1
    await asyncio.sleep(1.1)
    await balancer.choose()
    assert agent.requests == 2


async def test_a_caller_giving_up_does_not_cancel_the_shared_round(agents):
    hanging = await agents(hang=True)
    good = await agents(rx_bytes_per_s=1)
    balancer = balancer_for([hanging.node("h"), good.node("g")], timeout=0.3, cache_ttl=60)
    impatient = asyncio.ensure_future(balancer.choose())
    patient = asyncio.ensure_future(balancer.choose())
    await asyncio.sleep(0.05)
    impatient.cancel()
    assert (await patient).node_id == "g"
    assert balancer.rounds == 1


# -- URLs -------------------------------------------------------------------------------------
async def test_urls_for_the_node_and_behind_a_cdn(agents):
    agent = await agents()
    node = Node("media1.example.com", 1935, 8000, agent.port, "i-0abc", agent_host="127.0.0.1")
    plain = balancer_for([node])
    choice = await plain.choose()
    assert choice.rtmp_url == "rtmp://media1.example.com/live"  # RTMP's own port left out
    assert choice.play_base == "http://media1.example.com:8000/live"
    assert choice.agent_url == f"http://127.0.0.1:{agent.port}/status"
    assert choice.stats_url == "http://127.0.0.1:8000"  # the engine, where the agent is asked
    cdn = balancer_for([node], cdn_domain="d111.cloudfront.net")
    assert (await cdn.choose()).play_base == "https://d111.cloudfront.net/i-0abc/live"
    v6 = plain.choice_for(Node("::1", 1, 2, 3, "v6"))
    assert v6.rtmp_url == "rtmp://[::1]:1/live" and v6.play_base == "http://[::1]:2/live"
    assert choice.to_dict()["node_id"] == "i-0abc"


async def test_node_for_by_configured_or_reported_id(agents):
    named = await agents(node_id="agent-says-a")
    unnamed = await agents(node_id="host-b")
    balancer = balancer_for([named.node("a"), unnamed.node(None)])
    assert (await balancer.node_for("a")).play_base == "http://127.0.0.1:8000/live"
    found = await balancer.node_for("host-b")
    assert found is not None and found.agent_url.endswith(f":{unnamed.port}/status")
    assert await balancer.node_for("agent-says-a") is None  # configured ids win
    assert await balancer.node_for("nope") is None
    # An unnamed node is chosen under the id its agent reports.
    only_unnamed = balancer_for([unnamed.node(None)])
    assert (await only_unnamed.choose()).node_id == "host-b"

    known = await balancer.known_nodes()
    assert [n.node_id for n in known] == ["a", "host-b"]
    assert known[1].stats_url == "http://127.0.0.1:8000"
    assert [n.node_id for n in await balancer_for([unnamed.node(None)]).known_nodes()] == [
        "127.0.0.1"]  # no round yet: known by host


# -- the command ------------------------------------------------------------------------------
def cli_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHBUY_")}
    env["WATCHBUY_ENV_FILE"] = os.devnull
    env.update(extra)
    return env


async def run_cli(*args, **env) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "watchbuy", *args, env=cli_env(**env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def test_cli_pick_prints_the_choice_as_json(agents):
    light = await agents(rx_bytes_per_s=10, node_id="x")
    heavy = await agents(rx_bytes_per_s=10_000)
    nodes = f"light=127.0.0.1:1935:8000:{light.port},heavy=127.0.0.1:1935:8000:{heavy.port}"
    code, out, err = await run_cli("balancer", "pick", "--nodes", nodes)
    assert code == 0, err
    choice = json.loads(out)
    assert choice["node_id"] == "light" and choice["rtmp_url"] == "rtmp://127.0.0.1/live"
    code, out, err = await run_cli("balancer", "status", WATCHBUY_BALANCER_NODES=nodes)
    assert code == 0, err
    assert [json.loads(line)["node_id"] for line in out.splitlines()] == ["light", "heavy"]


async def test_cli_no_nodes_configured_is_one_line():
    code, out, err = await run_cli("balancer", "pick", WATCHBUY_BALANCER_NODES="")
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [
        "watchbuy: configuration error: WATCHBUY_BALANCER_NODES: no media nodes configured "
        "(list host or node_id=host entries, or name an Auto Scaling group in "
        "WATCHBUY_BALANCER_ASG)"
    ]


async def test_cli_no_healthy_node_is_one_line():
    code, out, err = await run_cli(
        "balancer", "pick", "--nodes", f"a=127.0.0.1:1:2:{closed_port()}", "--timeout", "0.3")
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "a: unreachable (connection refused)" in lines[0]
