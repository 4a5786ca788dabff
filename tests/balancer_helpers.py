"""Helpers of the balancer tests: fake status agents on loopback, and AWS through moto.

``aws`` (a module-scoped moto ``mock_aws``) and ``off_loopback`` (any socket connect or name
lookup to a non-loopback host fails the test before a packet is sent) are fixtures, registered
for every test by ``pytest_plugins`` in conftest.py; the modules that talk to moto use
``off_loopback`` for all their tests (``pytestmark``).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import json
import os
import socket

import boto3
import pytest
from moto import mock_aws

from watchbuy.balancer import Node
from watchbuy.balancer.config import is_loopback_host


class FakeAgent:
    """A real HTTP server on loopback answering GET /status with ``self.status``."""

    def __init__(self, hang: bool = False, **status) -> None:
        self.hang = hang
        self.status = {"node_id": "fake", "rx_bytes_per_s": 0.0, "tx_bytes_per_s": 0.0,
                       "publishers": 0, "viewers": 0, "engine_ok": True, **status}
        self.requests = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._held: list[asyncio.StreamWriter] = []

    async def start(self) -> FakeAgent:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer) -> None:
        self.requests += 1
        if self.hang:
            self._held.append(writer)  # accept, read nothing, answer nothing
            return
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        body = self.status if isinstance(self.status, bytes) else json.dumps(self.status).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    def node(self, node_id: str | None = None) -> Node:
        return Node(host="127.0.0.1", rtmp_port=1935, http_port=8000, agent_port=self.port,
                    node_id=node_id)

    async def stop(self) -> None:
        for writer in self._held:
            writer.close()
        self.server.close()


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


@pytest.fixture
def off_loopback(monkeypatch):
    """Every connect or name lookup to a host that is not loopback: recorded, refused before it
    reaches the network, and a failure of the test at teardown.  The list is the fixture's value
    (a test that provokes an attempt on purpose empties it)."""
    attempts: list[tuple[str, object]] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def refuse(what: str, host: object) -> None:
        if not isinstance(host, str) or not is_loopback_host(host):
            attempts.append((what, host))
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"test guard: {host} is off loopback")

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            refuse("connect", address[0])
        return real_connect(sock, address)

    def connect_ex(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            refuse("connect", address[0])
        return real_connect_ex(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None:
            refuse("getaddrinfo", host.decode() if isinstance(host, bytes) else host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    assert attempts == [], f"tried to reach hosts off loopback: {attempts}"


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
