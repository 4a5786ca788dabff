"""Where the media nodes are: a static list, or an Auto Scaling group's instances."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Protocol

from watchbuy.balancer.aws import IN_SERVICE, Aws, BalancerError, asg_instances
from watchbuy.balancer.config import BalancerSettings, Node, parse_node_entry

log = logging.getLogger("watchbuy.balancer")


class Discovery(Protocol):
    async def nodes(self) -> list[Node]:
        """The nodes to consider now."""

    def describe(self) -> str:
        """Where the nodes come from, for messages ("Auto Scaling group media")."""

    # Why the nodes' addresses are not to be trusted ('' when they are): set when discovery
    # talks to a stand-in of AWS (moto, fake credentials), whose addresses are invented.  The
    # balancer then queries loopback agents only.  Optional: a discovery without it is trusted.
    stand_in: str


class StaticDiscovery:
    """A fixed list: :class:`Node` objects or entries as in ``WATCHBUY_BALANCER_NODES``."""

    stand_in = ""  # ops typed these addresses: trusted

    def __init__(self, nodes: Iterable[Node | str]) -> None:
        self._nodes = [n if isinstance(n, Node) else parse_node_entry(n) for n in nodes]

    async def nodes(self) -> list[Node]:
        return list(self._nodes)

    def describe(self) -> str:
        return "the static node list"


class AsgDiscovery:
    """The group's InService, running instances; instance id as node id.

    AWS is asked at most once per ``ttl`` seconds (and once at a time); when AWS fails and an
    earlier answer exists, that answer is used and the failure logged, so a throttled or briefly
    unreachable API does not stop hosts from getting a node.
    """

    def __init__(
        self,
        asg_name: str,
        *,
        region: str | None = None,
        rtmp_port: int = 1935,
        http_port: int = 8000,
        agent_port: int = 8090,
        agent_address: str = "private",
        ttl: float = 30.0,
        aws: Aws | None = None,
    ) -> None:
        self.asg_name = asg_name
        self.region = region
        self.ports = (rtmp_port, http_port, agent_port)
        self.agent_address = agent_address
        self.ttl = ttl
        self._aws = aws
        self.stand_in = ""  # set by each ask: see Discovery.stand_in
        self._nodes: list[Node] | None = None
        self._at = float("-inf")
        self._lock: asyncio.Lock | None = None

    def describe(self) -> str:
        return f"Auto Scaling group {self.asg_name}"

    def nodes_now(self) -> list[Node]:
        """Ask AWS (blocking)."""
        if self._aws is None:
            self._aws = Aws(self.region)
        rtmp_port, http_port, agent_port = self.ports
        nodes = []
        instances = asg_instances(self._aws, self.asg_name, IN_SERVICE)
        # Asked after the call that succeeded, so a set-up without credentials still gets the
        # usual "no AWS credentials" message rather than a stand-in check failing first.
        self.stand_in = self._aws.stand_in("ec2")
        for instance in instances:
            if not instance.public_host:
                log.warning("instance %s has no public address: skipped", instance.instance_id)
                continue
            agent_host = instance.private_ip if self.agent_address == "private" else ""
            nodes.append(Node(
                host=instance.public_host, rtmp_port=rtmp_port, http_port=http_port,
                agent_port=agent_port, node_id=instance.instance_id,
                agent_host=agent_host or None,
            ))
        return nodes

    async def nodes(self) -> list[Node]:
        if self._nodes is not None and time.monotonic() - self._at < self.ttl:
            return list(self._nodes)
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._nodes is not None and time.monotonic() - self._at < self.ttl:
                return list(self._nodes)
            try:
                self._nodes = await asyncio.to_thread(self.nodes_now)
            except BalancerError as exc:
                if self._nodes is None:
                    raise
                log.warning("%s; using the instances found %.0f s ago", exc,
                            time.monotonic() - self._at)
                # Ask again in a few seconds, not on every round while AWS is failing.
                self._at = time.monotonic() - self.ttl + min(self.ttl, 5.0)
                return list(self._nodes)
            self._at = time.monotonic()
            return list(self._nodes)


def discovery_from_settings(settings: BalancerSettings) -> Discovery:
    if settings.balancer_asg:
        return AsgDiscovery(
            settings.balancer_asg,
            region=settings.aws_region or None,
            rtmp_port=settings.rtmp_port,
            http_port=settings.http_port,
            agent_port=settings.agent_port,
            agent_address=settings.balancer_agent_address,
            ttl=settings.balancer_discovery_ttl,
        )
    return StaticDiscovery(settings.static_nodes())
