"""Auto Scaling discovery against moto (`mock_aws`): no request leaves this process.

moto hands out made-up instance addresses (10.x private, 54.x and ec2-*.amazonaws.com public)
that may be anybody's.  The balancer refuses to query them (it knows it talks to a stand-in of
AWS), and the autouse ``off_loopback`` fixture makes any socket connect or name lookup to a
non-loopback host in these tests fail the test, before a packet is sent.  Where a test needs the
balancer to query moto-discovered nodes, it points them at loopback agents first.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
from balancer_helpers import (
    REGION,
    FakeAgent,
    aws_client,
    make_media_asg,
    terminate,
)

from watchbuy.balancer import (
    AsgDiscovery,
    AwsConfigError,
    Balancer,
    BalancerSettings,
    NoHealthyNode,
)
from watchbuy.balancer.aws import IN_SERVICE, Aws, asg_instances
from watchbuy.balancer.discovery import discovery_from_settings

# No test here may reach an address off this machine (see balancer_helpers.off_loopback).
pytestmark = pytest.mark.usefixtures("off_loopback")


def describe(instance_id: str) -> dict:
    ec2 = aws_client("ec2")
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


def test_instances_of_the_group(aws):
    group, ids = make_media_asg(count=3)
    instances = asg_instances(Aws(REGION), group, IN_SERVICE)
    assert [i.instance_id for i in instances] == ids
    first = describe(ids[0])
    assert instances[0].public_dns == first["PublicDnsName"] != ""
    assert instances[0].private_ip == first["PrivateIpAddress"]
    assert {i.lifecycle_state for i in instances} == {"InService"}


def test_discovery_gives_running_in_service_instances_with_id_and_addresses(aws):
    group, ids = make_media_asg(count=3)
    discovery = AsgDiscovery(group, region=REGION, rtmp_port=1936, http_port=8001,
                             agent_port=8091, ttl=0)
    nodes = discovery.nodes_now()
    assert [n.node_id for n in nodes] == ids
    first = describe(ids[0])
    assert nodes[0].host == first["PublicDnsName"]
    assert nodes[0].agent_host == first["PrivateIpAddress"]  # asked inside the VPC
    assert (nodes[0].rtmp_port, nodes[0].http_port, nodes[0].agent_port) == (1936, 8001, 8091)

    terminate(ids[0])
    aws_client("ec2").stop_instances(InstanceIds=[ids[1]])
    assert [n.node_id for n in discovery.nodes_now()] == [ids[2]]  # running only

    public = AsgDiscovery(group, region=REGION, agent_address="public")
    assert public.nodes_now()[0].agent_host is None


async def test_discovery_is_cached_and_survives_an_aws_failure(aws, caplog):
    group, ids = make_media_asg(count=2)
    discovery = AsgDiscovery(group, region=REGION, ttl=60)
    assert len(await discovery.nodes()) == 2
    terminate(ids[0])
    assert len(await discovery.nodes()) == 2  # within the TTL: AWS not asked again

    discovery.ttl = 0
    assert [n.node_id for n in await discovery.nodes()] == [ids[1]]
    aws_client("autoscaling").delete_auto_scaling_group(
        AutoScalingGroupName=group, ForceDelete=True)
    with caplog.at_level(logging.WARNING, logger="watchbuy.balancer"):
        assert [n.node_id for n in await discovery.nodes()] == [ids[1]]  # the last good answer
    assert "not found" in caplog.text

    fresh = AsgDiscovery(group, region=REGION)
    with pytest.raises(AwsConfigError, match=f"Auto Scaling group '{group}' not found"):
        await fresh.nodes()


async def test_balancer_from_settings_builds_urls_for_instances(aws):
    group, ids = make_media_asg(count=2)
    settings = BalancerSettings(balancer_asg=group, aws_region=REGION,
                                cdn_domain="d111111abcdef8.cloudfront.net")
    settings.validate()
    assert isinstance(discovery_from_settings(settings), AsgDiscovery)
    balancer = Balancer(settings)
    choice = await balancer.node_for(ids[1])
    public_dns = describe(ids[1])["PublicDnsName"]
    assert choice.node_id == ids[1] and choice.host == public_dns
    assert choice.rtmp_url == f"rtmp://{public_dns}/live"
    assert choice.play_base == f"https://d111111abcdef8.cloudfront.net/{ids[1]}/live"
    assert await balancer.node_for("i-00000000000000000") is None


def test_unknown_group_is_a_config_error(aws):
    with pytest.raises(AwsConfigError) as info:
        asg_instances(Aws(REGION), "nope")
    assert str(info.value) == f"Auto Scaling group 'nope' not found in {REGION}"


# -- the off-loopback guard -------------------------------------------------------------------
async def test_the_guard_catches_an_attempt_off_loopback(off_loopback):
    """The fixture the other tests rely on does catch a query to a made-up address."""
    from watchbuy.status_agent.client import FetchError, fetch_json

    with pytest.raises(FetchError, match="refused"):
        await fetch_json("10.0.0.7", 8090, "/status", 1)  # TEST: never leaves this process
    with pytest.raises(FetchError):
        await fetch_json("ec2-54-1-2-3.eu-west-1.compute.amazonaws.com", 8090, "/status", 1)
    assert off_loopback == [("connect", "10.0.0.7"),
                            ("getaddrinfo", "ec2-54-1-2-3.eu-west-1.compute.amazonaws.com")]
    off_loopback.clear()


@pytest.mark.parametrize("agent_address", ["private", "public"])
async def test_balancer_never_queries_addresses_moto_made_up(aws, caplog, off_loopback,
                                                             agent_address):
    group, ids = make_media_asg(count=2)
    settings = BalancerSettings(balancer_asg=group, aws_region=REGION,
                                balancer_agent_address=agent_address, balancer_cache_ttl=0)
    settings.validate()
    balancer = Balancer(settings)
    with caplog.at_level(logging.WARNING, logger="watchbuy.balancer"):
        with pytest.raises(NoHealthyNode) as info:
            await balancer.choose()
        await balancer.statuses(fresh=True)  # a second round: no second log line
        assert await balancer.known_nodes() == []  # the site polls these: none to poll
    assert balancer.rounds == 2
    assert [s.node_id for s in info.value.statuses] == ids
    assert {s.error for s in info.value.statuses} == {
        "not queried: its address came from a stand-in of AWS"}
    refusals = [r.getMessage() for r in caplog.records if "stand-in of AWS" in r.getMessage()]
    assert len(refusals) == 1 and "moto" in refusals[0] and group in refusals[0]
    # URLs for hosts and viewers are still given: the site does not connect to them.
    assert (await balancer.node_for(ids[0])).node_id == ids[0]
    assert off_loopback == []


async def test_moto_discovered_nodes_with_loopback_agents_are_queried(aws, off_loopback):
    """What a test that needs a choice among discovered nodes does: loopback agents."""
    group, ids = make_media_asg(count=2)
    busy = await FakeAgent(rx_bytes_per_s=9_000_000).start()
    light = await FakeAgent(rx_bytes_per_s=1_000).start()
    try:
        discovery = AsgDiscovery(group, region=REGION, ttl=0)
        asked = discovery.nodes_now
        ports = {ids[0]: busy.port, ids[1]: light.port}

        def on_loopback():
            return [replace(n, agent_host="127.0.0.1", agent_port=ports[n.node_id])
                    for n in asked()]

        discovery.nodes_now = on_loopback
        balancer = Balancer(discovery, cache_ttl=0)
        choice = await balancer.choose()
        assert discovery.stand_in  # still a stand-in: loopback is what made the query allowed
        assert choice.node_id == ids[1] and (busy.requests, light.requests) == (1, 1)
        assert [n.node_id for n in await balancer.known_nodes()] == ids
    finally:
        await busy.stop()
        await light.stop()


def test_stand_ins_are_recognised(aws, monkeypatch):
    assert "moto" in Aws(REGION).stand_in()
    # As in a process without moto: fake keys and endpoints that are not AWS's are told apart
    # from AWS itself.  Only a client is made and credentials read: no call is sent.
    import moto.core.models

    monkeypatch.setattr(moto.core.models.botocore_stubber, "enabled", False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")  # the form of a real one
    assert Aws(REGION).stand_in() == ""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5000")  # moto server, LocalStack
    assert "is not AWS's" in Aws(REGION).stand_in()
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    for fake in ("testing", "FOOBARKEY", "test", "my-key"):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", fake)
        assert "is a test one" in Aws(REGION).stand_in()
