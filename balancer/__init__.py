"""watchbuy.balancer: node discovery, least-ingest choice, CloudFront sync.

For the site::

    from watchbuy.balancer import Balancer, BalancerSettings, NoHealthyNode
    from watchbuy.settings import load_config

    balancer = Balancer(load_config(BalancerSettings))   # once, at start-up
    try:
        choice = await balancer.choose()        # /api/ingest: choice.node_id, .rtmp_url, .play_base
    except BalancerError as exc:                # NoHealthyNode, or AWS trouble: str(exc) is one line
        ...
    node = await balancer.node_for(node_id)     # room page: node.play_base + f"/{name}.flv"
"""

from watchbuy.balancer.aws import AwsConfigError, AwsError, BalancerError
from watchbuy.balancer.config import BalancerSettings, Node, parse_node_entry
from watchbuy.balancer.core import Balancer, NodeChoice, NodeStatus, NoHealthyNode, Round
from watchbuy.balancer.discovery import AsgDiscovery, Discovery, StaticDiscovery

__all__ = [
    "AsgDiscovery",
    "AwsConfigError",
    "AwsError",
    "Balancer",
    "BalancerError",
    "BalancerSettings",
    "Discovery",
    "NoHealthyNode",
    "Node",
    "NodeChoice",
    "NodeStatus",
    "Round",
    "StaticDiscovery",
    "parse_node_entry",
]
