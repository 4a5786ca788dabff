"""Auto Scaling discovery against moto (`mock_aws`): no request leaves this process.

These tests never call ``choose()`` on AWS-discovered nodes: that would send status queries to
the made-up instance addresses moto hands out.  The choice itself is tested on loopback
(test_balancer.py, test_balancer_nodes.py); here: which nodes, under which ids and addresses.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os

import boto3
import pytest
from moto import mock_aws

from watchbuy.balancer import AsgDiscovery, AwsConfigError, Balancer, BalancerSettings
from watchbuy.balancer.aws import IN_SERVICE, Aws, asg_instances
from watchbuy.balancer.discovery import discovery_from_settings

REGION = "eu-west-1"


@pytest.fixture(scope="module")
def aws():
    """Fake credentials and a region, nothing from ~/.aws, no instance metadata service.

    One mock per module: starting and resetting moto's EC2 costs seconds, so tests share it and
    keep apart by naming their own groups and distributions.
    """
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                patch.delenv(name)
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", REGION)
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("AWS_CONFIG_FILE", os.devnull)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        with mock_aws():
            yield


_groups = itertools.count(1)


@functools.cache
def aws_client(service: str):
    # Clients are slow to make (botocore loads the service model); the tests share them.
    return boto3.client(service, region_name=REGION)


def make_media_asg(count: int = 3) -> tuple[str, list[str]]:
    """A new Auto Scaling group of ``count`` instances: its name and their ids."""
    from moto.ec2.models.amis import AMIS

    name = f"wb-media-{next(_groups)}"
    ec2 = aws_client("ec2")
    ec2.create_launch_template(
        LaunchTemplateName=f"{name}-lt",
        LaunchTemplateData={"ImageId": AMIS[0]["ami_id"], "InstanceType": "c7g.large"},
    )
    autoscaling = aws_client("autoscaling")
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=name, MinSize=0, MaxSize=10, DesiredCapacity=count,
        LaunchTemplate={"LaunchTemplateName": f"{name}-lt", "Version": "$Latest"},
        AvailabilityZones=[f"{REGION}a"],
    )
    return name, group_instance_ids(name)


def group_instance_ids(name: str) -> list[str]:
    autoscaling = aws_client("autoscaling")
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])
    return sorted(i["InstanceId"] for i in group["AutoScalingGroups"][0]["Instances"])


def terminate(instance_id: str) -> None:
    aws_client("autoscaling").terminate_instance_in_auto_scaling_group(
        InstanceId=instance_id, ShouldDecrementDesiredCapacity=True)


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
    assert choice.rtmp_url == f"rtmp://{public_dns}:1935/live"
    assert choice.play_base == f"https://d111111abcdef8.cloudfront.net/{ids[1]}/live"
    assert await balancer.node_for("i-00000000000000000") is None


def test_unknown_group_is_a_config_error(aws):
    with pytest.raises(AwsConfigError) as info:
        asg_instances(Aws(REGION), "nope")
    assert str(info.value) == f"Auto Scaling group 'nope' not found in {REGION}"
