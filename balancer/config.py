"""The balancer's settings, and the static node list's entry syntax.

Ports are the same variables the media node and the agent read (``WATCHBUY_RTMP_PORT``,
``WATCHBUY_HTTP_PORT``, ``WATCHBUY_AGENT_PORT``): in the all-in-one process and on a fleet
configured from one env file, the balancer then assumes what the nodes actually use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from watchbuy.net import is_loopback
from watchbuy.settings import PREFIX, ConfigError, check_ranges

NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Node:
    """A media node as the balancer knows it before asking its agent anything.

    ``host`` is what hosts and viewers connect to (public DNS or IP); ``agent_host`` is where the
    balancer asks for status (in AWS the private address, which the site reaches inside the
    VPC).  ``node_id`` is None for a static entry without one: the agent's answer names it.
    """

    host: str
    rtmp_port: int = 1935
    http_port: int = 8000
    agent_port: int = 8090
    node_id: str | None = None
    agent_host: str | None = None

    @property
    def status_host(self) -> str:
        return self.agent_host or self.host

    @property
    def label(self) -> str:
        return self.node_id or self.host


# Names are never resolved (watchbuy.net): a made-up DNS name may resolve to somebody's real
# machine, which is exactly what the stand-in guard keeps the balancer away from.
is_loopback_host = is_loopback


def _port(entry: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise ConfigError(f"{PREFIX}BALANCER_NODES: bad port {text!r} in {entry!r}")
    return int(text)


def parse_node_entry(entry: str, rtmp_port: int = 1935, http_port: int = 8000,
                     agent_port: int = 8090) -> Node:
    """``[node_id=]host[:rtmp_port:http_port:agent_port]`` → :class:`Node`.

    ``host`` may be a name, an IPv4 address or a bracketed IPv6 address (``[::1]``).  Ports are
    all three or none (the defaults): several nodes on one machine differ in all of them.
    """
    text = entry.strip()
    node_id = None
    if "=" in text:
        node_id, _, text = text.partition("=")
        node_id = node_id.strip()
        if not NODE_ID.fullmatch(node_id):
            raise ConfigError(
                f"{PREFIX}BALANCER_NODES: node id {node_id!r} in {entry!r}: use letters, digits, "
                "'-' and '_' only"
            )
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ConfigError(f"{PREFIX}BALANCER_NODES: unclosed '[' in {entry!r}")
        ports = rest[1:].split(":") if rest.startswith(":") else ([] if not rest else None)
    else:
        host, *ports = text.split(":")
    if not host or ports is None or not re.fullmatch(r"[A-Za-z0-9.:_-]+", host):
        raise ConfigError(f"{PREFIX}BALANCER_NODES: bad host in {entry!r}")
    if ports:
        if len(ports) != 3:
            raise ConfigError(
                f"{PREFIX}BALANCER_NODES: {entry!r}: give host alone or "
                "host:rtmp_port:http_port:agent_port"
            )
        rtmp_port, http_port, agent_port = (_port(entry, p) for p in ports)
    return Node(host=host, rtmp_port=rtmp_port, http_port=http_port, agent_port=agent_port,
                node_id=node_id)


@dataclass
class BalancerSettings:
    # Static discovery: entries "[node_id=]host[:rtmp:http:agent]"; the default is this machine,
    # which is what `watchbuy serve` runs.  Ignored when an Auto Scaling group is named.
    balancer_nodes: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    # AWS discovery: the group's in-service instances (boto3; credentials the usual way).
    balancer_asg: str = ""
    aws_region: str = ""
    # Ask agents at the instances' private addresses (site in the VPC) or public ones.
    balancer_agent_address: str = "private"
    balancer_timeout: float = 0.5
    balancer_cache_ttl: float = 3.0
    balancer_discovery_ttl: float = 30.0
    # A node with this many publishers takes no more; 0 = no cap.
    publisher_cap: int = 10
    rtmp_port: int = 1935
    http_port: int = 8000
    agent_port: int = 8090
    apps: list[str] = field(default_factory=lambda: ["live"])
    # CloudFront: the viewers' domain (play URLs) and the distribution cdn-sync maintains.
    cdn_domain: str = ""
    cdn_distribution_id: str = ""

    def validate(self) -> None:
        for name in ("rtmp_port", "http_port", "agent_port"):
            port = getattr(self, name)
            if not 0 < port <= 65535:
                raise ConfigError(f"{PREFIX}{name.upper()}: port {port} is out of range 1..65535")
        if not self.balancer_asg and not self.balancer_nodes:
            raise ConfigError(
                f"{PREFIX}BALANCER_NODES: no media nodes configured (list host or node_id=host "
                f"entries, or name an Auto Scaling group in {PREFIX}BALANCER_ASG)"
            )
        if not self.balancer_asg:
            self.static_nodes()  # raises on a bad entry
            ids = [n.node_id for n in self.static_nodes() if n.node_id]
            if len(ids) != len(set(ids)):
                raise ConfigError(f"{PREFIX}BALANCER_NODES: node ids must be unique")
        if self.balancer_agent_address not in ("private", "public"):
            raise ConfigError(f"{PREFIX}BALANCER_AGENT_ADDRESS: private or public")
        if not 0 < self.balancer_timeout <= 30:
            raise ConfigError(f"{PREFIX}BALANCER_TIMEOUT: between 0 and 30 seconds")
        check_ranges(self, off_or_positive=("balancer_cache_ttl", "balancer_discovery_ttl",
                                            "publisher_cap"))
        if not self.apps:
            raise ConfigError(f"{PREFIX}APPS: at least one application name is needed")
        # Accept "https://d123.cloudfront.net/" as well as the bare domain.
        self.cdn_domain = re.sub(r"^https?://", "", self.cdn_domain.strip()).rstrip("/")
        if self.cdn_domain and not re.fullmatch(r"[A-Za-z0-9.-]+(:\d+)?", self.cdn_domain):
            raise ConfigError(f"{PREFIX}CDN_DOMAIN: expected a domain name such as "
                              f"d111111abcdef8.cloudfront.net, got {self.cdn_domain!r}")

    def static_nodes(self) -> list[Node]:
        return [
            parse_node_entry(entry, self.rtmp_port, self.http_port, self.agent_port)
            for entry in self.balancer_nodes
        ]
