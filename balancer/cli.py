"""``watchbuy balancer pick|status`` and ``watchbuy cdn-sync``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from watchbuy.balancer.aws import BalancerError
from watchbuy.balancer.config import BalancerSettings
from watchbuy.settings import PREFIX, ConfigError, load_config


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def balancer_settings(args: argparse.Namespace) -> BalancerSettings:
    return load_config(
        BalancerSettings,
        balancer_nodes=_split(getattr(args, "nodes", None)),
        balancer_asg=getattr(args, "asg", None),
        aws_region=getattr(args, "region", None),
        balancer_timeout=getattr(args, "timeout", None),
        publisher_cap=getattr(args, "cap", None),
        cdn_domain=getattr(args, "cdn_domain", None),
        cdn_distribution_id=getattr(args, "distribution_id", None),
        http_port=getattr(args, "http_port", None),
    )


def _fail(message: str) -> int:
    print(f"watchbuy: {message}", file=sys.stderr)
    return 1


def run_pick(args: argparse.Namespace) -> int:
    from watchbuy.balancer.core import Balancer

    balancer = Balancer(balancer_settings(args))
    try:
        choice = asyncio.run(balancer.choose())
    except ConfigError:
        raise
    except BalancerError as exc:
        return _fail(str(exc))
    print(json.dumps(choice.to_dict()))
    return 0


def run_status(args: argparse.Namespace) -> int:
    from watchbuy.balancer.core import Balancer

    balancer = Balancer(balancer_settings(args))
    try:
        current = asyncio.run(balancer.statuses())
    except ConfigError:
        raise
    except BalancerError as exc:
        return _fail(str(exc))
    for status in current.statuses:
        print(json.dumps({
            "node_id": status.node_id,
            "agent_url": balancer.choice_for(status.node, status.node_id).agent_url,
            "ok": status.ok,
            "refusal": status.refusal(balancer.publisher_cap),
            "rx_bytes_per_s": status.rx_bytes_per_s,
            "publishers": status.publishers,
            "viewers": status.viewers,
            "elapsed_ms": round(status.elapsed * 1000, 1),
        }))
    return 0


def run_cdn_sync(args: argparse.Namespace) -> int:
    from watchbuy.balancer import aws, cdn

    settings = balancer_settings(args)
    distribution_id = settings.cdn_distribution_id
    if not distribution_id:
        raise ConfigError(f"--distribution-id (or {PREFIX}CDN_DISTRIBUTION_ID) is required")
    if not settings.balancer_asg:
        raise ConfigError(f"--asg (or {PREFIX}BALANCER_ASG) is required")
    try:
        connection = aws.Aws(settings.aws_region or None)
        targets, skipped = cdn.asg_targets(connection, settings.balancer_asg)
        for instance_id in skipped:
            print(f"watchbuy: instance {instance_id} has no public DNS name: not routed "
                  "(enable DNS hostnames in its VPC)", file=sys.stderr)
        if not targets and not args.allow_empty:
            return _fail(
                f"no running instances found in Auto Scaling group {settings.balancer_asg}: "
                "nothing changed (pass --allow-empty to remove every node's behaviour)"
            )
        cloudfront = connection.client("cloudfront")
        result = cdn.sync_distribution(
            cloudfront, distribution_id, targets, http_port=settings.http_port,
            dry_run=args.dry_run,
        )
    except ConfigError:
        raise
    except BalancerError as exc:
        return _fail(str(exc))
    lines = result.plan.describe({t.node_id: t for t in targets})
    for line in lines:
        print(line)
    nodes = len(targets)
    if args.dry_run:
        verdict = "would update" if result.plan.has_changes else "is up to date; would not update"
        print(f"dry run: distribution {distribution_id} {verdict} ({nodes} nodes)")
    elif result.updated:
        print(f"updated distribution {distribution_id} for {nodes} nodes "
              f"(ETag {result.etag}, attempt {result.attempts})")
    else:
        print(f"distribution {distribution_id} is up to date ({nodes} nodes): no update made")
    return 0


def _add_discovery_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", help="static nodes, comma-separated "
                        "[node_id=]host[:rtmp:http:agent] (WATCHBUY_BALANCER_NODES)")
    parser.add_argument("--asg", help="Auto Scaling group to discover (WATCHBUY_BALANCER_ASG)")
    parser.add_argument("--region", help="AWS region (WATCHBUY_AWS_REGION)")
    parser.add_argument("--timeout", type=float, help="per-round agent timeout, s (0.5)")
    parser.add_argument("--cap", type=int, help="publishers per node, 0 = no cap (10)")
    parser.add_argument("--cdn-domain", help="CloudFront domain for play URLs (WATCHBUY_CDN_DOMAIN)")


def register(subparsers: argparse._SubParsersAction) -> None:
    balancer = subparsers.add_parser("balancer", help="ask the media nodes; pick one for a host")
    commands = balancer.add_subparsers(dest="balancer_command", required=True, metavar="COMMAND")
    pick = commands.add_parser("pick", help="print the least-loaded healthy node as JSON")
    _add_discovery_options(pick)
    pick.set_defaults(run=run_pick)
    status = commands.add_parser("status", help="print every node's status, one JSON line each")
    _add_discovery_options(status)
    status.set_defaults(run=run_status)

    sync = subparsers.add_parser(
        "cdn-sync", help="make the CloudFront distribution route /<instance-id>/* to each node"
    )
    sync.add_argument("--distribution-id", help="CloudFront distribution (WATCHBUY_CDN_DISTRIBUTION_ID)")
    sync.add_argument("--asg", help="the media nodes' Auto Scaling group (WATCHBUY_BALANCER_ASG)")
    sync.add_argument("--region", help="the group's AWS region (WATCHBUY_AWS_REGION)")
    sync.add_argument("--http-port", type=int, help="the nodes' HTTP-FLV port (8000)")
    sync.add_argument("--dry-run", action="store_true", help="print the change, make none")
    sync.add_argument("--allow-empty", action="store_true",
                      help="with no running instance, remove every managed origin and behaviour")
    sync.set_defaults(run=run_cdn_sync)
