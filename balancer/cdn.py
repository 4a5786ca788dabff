"""CloudFront sync: one origin and one cache behaviour per running media node.

Viewers play ``https://<cdn>/<node-id>/live/<name>.flv``; the behaviour ``/<instance-id>/*``
sends that path to the origin ``wb-<instance-id>`` (the instance's public DNS name, HTTP-FLV
port, HTTP only), and the engine serves the path with the node id in it.  The behaviour is set up
for live content:

* TTL 0 (min, default and max): CloudFront does not keep live content, it revalidates every
  request with the origin (a live stream is dynamic content: a cached copy is already stale);
* query strings and the ``Origin`` and ``Range`` headers are forwarded (CORS for mpegts.js in the
  browser, ranges for players that probe), cookies are not; GET, HEAD and OPTIONS are allowed;
  compression is off (FLV is already compressed, and it would buffer the stream).

What we manage is recognisable by the origin id prefix ``wb-``: origins with that id and the
cache behaviours that target them.  Everything else in the distribution is left as it is.  Our
behaviours go first, in instance id order, because CloudFront uses the first pattern that
matches and a user's broad pattern (``*.flv``) must not shadow them.

The update is written with the ETag we read (``IfMatch``).  When someone else changed the
distribution in between, CloudFront answers PreconditionFailed: we read it again, plan again on
top of their change, and retry, a few times; never a blind overwrite.  When nothing differs, no
update is made at all.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from watchbuy.balancer.aws import (
    SERVING_OR_STARTING,
    Aws,
    AwsConfigError,
    AwsError,
    Instance,
    asg_instances,
    aws_errors,
)

log = logging.getLogger("watchbuy.balancer.cdn")

ORIGIN_PREFIX = "wb-"
FORWARDED_HEADERS = ["Origin", "Range"]


@dataclass(frozen=True)
class CdnTarget:
    """A node CloudFront should route to: its id (the path prefix) and public DNS name."""

    node_id: str
    domain: str

    @property
    def origin_id(self) -> str:
        return ORIGIN_PREFIX + self.node_id

    @property
    def path_pattern(self) -> str:
        return f"/{self.node_id}/*"


def desired_origin(target: CdnTarget, http_port: int) -> dict:
    return {
        "Id": target.origin_id,
        "DomainName": target.domain,
        "OriginPath": "",
        "CustomHeaders": {"Quantity": 0},
        "CustomOriginConfig": {
            "HTTPPort": http_port,
            "HTTPSPort": 443,
            "OriginProtocolPolicy": "http-only",
            "OriginSslProtocols": {"Quantity": 1, "Items": ["TLSv1.2"]},
            # Seconds between bytes from the origin; a live stream sends several a second.
            "OriginReadTimeout": 30,
            "OriginKeepaliveTimeout": 5,
        },
        "ConnectionAttempts": 3,
        "ConnectionTimeout": 10,
    }


def desired_behaviour(target: CdnTarget) -> dict:
    return {
        "PathPattern": target.path_pattern,
        "TargetOriginId": target.origin_id,
        "ViewerProtocolPolicy": "redirect-to-https",
        "AllowedMethods": {
            "Quantity": 3,
            "Items": ["GET", "HEAD", "OPTIONS"],
            "CachedMethods": {"Quantity": 2, "Items": ["GET", "HEAD"]},
        },
        "SmoothStreaming": False,
        "Compress": False,
        "TrustedSigners": {"Enabled": False, "Quantity": 0},
        "LambdaFunctionAssociations": {"Quantity": 0},
        "FieldLevelEncryptionId": "",
        "ForwardedValues": {
            "QueryString": True,
            "Cookies": {"Forward": "none"},
            "Headers": {"Quantity": len(FORWARDED_HEADERS), "Items": list(FORWARDED_HEADERS)},
            "QueryStringCacheKeys": {"Quantity": 0},
        },
        "MinTTL": 0,
        "DefaultTTL": 0,
        "MaxTTL": 0,
    }


def _covers(actual, desired) -> bool:
    """Whether ``actual`` has every value ``desired`` sets (CloudFront adds defaults of its own,
    which must not count as a difference, or every run would update)."""
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(
            _covers(actual.get(key), value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (isinstance(actual, list) and len(actual) == len(desired)
                and all(_covers(a, d) for a, d in zip(actual, desired, strict=True)))
    return actual == desired


@dataclass
class SyncPlan:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # gone, but still referenced: left in place
    reordered: bool = False
    config: dict = field(default_factory=dict)  # the distribution config to write

    @property
    def has_changes(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.reordered)

    def describe(self, targets: dict[str, CdnTarget] | None = None) -> list[str]:
        lines = []
        for node_id in self.added:
            where = f" -> {targets[node_id].domain}" if targets and node_id in targets else ""
            lines.append(f"+ {node_id}: origin {ORIGIN_PREFIX}{node_id}{where}, "
                         f"behaviour /{node_id}/*")
        for node_id in self.changed:
            lines.append(f"~ {node_id}: origin or behaviour brought up to date")
        for node_id in self.removed:
            lines.append(f"- {node_id}: origin {ORIGIN_PREFIX}{node_id} and behaviour /{node_id}/*")
        for origin_id in self.kept:
            lines.append(f"! {origin_id}: instance gone but the default cache behaviour or an "
                         "origin group still uses this origin: left in place")
        if self.reordered:
            lines.append("~ cache behaviours reordered: ours first")
        return lines


def _referenced_origins(config: dict) -> set[str]:
    used = {config.get("DefaultCacheBehavior", {}).get("TargetOriginId", "")}
    for group in (config.get("OriginGroups") or {}).get("Items") or []:
        for member in (group.get("Members") or {}).get("Items") or []:
            used.add(member.get("OriginId", ""))
    return used


def plan_sync(config: dict, targets: list[CdnTarget], http_port: int = 8000) -> SyncPlan:
    """What to change in ``config`` (a DistributionConfig) for exactly ``targets``."""
    plan = SyncPlan()
    new = copy.deepcopy(config)
    wanted = {t.origin_id: t for t in sorted(targets, key=lambda t: t.node_id)}
    origins = (config.get("Origins") or {}).get("Items") or []
    behaviours = (config.get("CacheBehaviors") or {}).get("Items") or []
    current_origins = {o["Id"]: o for o in origins if o["Id"].startswith(ORIGIN_PREFIX)}
    current_behaviours = {
        b["TargetOriginId"]: b for b in behaviours
        if b.get("TargetOriginId", "").startswith(ORIGIN_PREFIX)
    }
    referenced = _referenced_origins(config)

    managed_origins = []
    managed_behaviours = []
    for origin_id, target in wanted.items():
        want_origin = desired_origin(target, http_port)
        want_behaviour = desired_behaviour(target)
        have_origin = current_origins.get(origin_id)
        have_behaviour = current_behaviours.get(origin_id)
        if have_origin is None and have_behaviour is None:
            plan.added.append(target.node_id)
        elif not (_covers(have_origin, want_origin) and _covers(have_behaviour, want_behaviour)):
            plan.changed.append(target.node_id)
        # Keep CloudFront's own copy when it already says what we want: no spurious diff.
        managed_origins.append(have_origin if _covers(have_origin, want_origin) else want_origin)
        managed_behaviours.append(
            have_behaviour if _covers(have_behaviour, want_behaviour) else want_behaviour
        )
    for origin_id in sorted(set(current_origins) | set(current_behaviours)):
        if origin_id in wanted:
            continue
        node_id = origin_id[len(ORIGIN_PREFIX):]
        keep_origin = origin_id in referenced and origin_id in current_origins
        if keep_origin:
            # Removing it would make the update invalid; its behaviour still goes.
            plan.kept.append(origin_id)
            managed_origins.append(current_origins[origin_id])
        if origin_id in current_behaviours or not keep_origin:
            plan.removed.append(node_id)

    managed_origins.sort(key=lambda o: o["Id"])  # origin order means nothing; keep it stable
    user_origins = [o for o in origins if not o["Id"].startswith(ORIGIN_PREFIX)]
    user_behaviours = [
        b for b in behaviours if not b.get("TargetOriginId", "").startswith(ORIGIN_PREFIX)
    ]
    new_origins = user_origins + managed_origins
    new_behaviours = managed_behaviours + user_behaviours
    if not plan.added and not plan.removed and not plan.changed:
        # Same members: anything left to do is only order (ours first, by instance id).
        plan.reordered = [b.get("PathPattern") for b in behaviours] != [
            b.get("PathPattern") for b in new_behaviours
        ]
    new["Origins"] = {"Quantity": len(new_origins), "Items": new_origins}
    new["CacheBehaviors"] = {"Quantity": len(new_behaviours)}
    if new_behaviours:
        new["CacheBehaviors"]["Items"] = new_behaviours
    plan.config = new
    return plan


@dataclass
class SyncResult:
    plan: SyncPlan
    updated: bool
    etag: str
    attempts: int


def sync_distribution(
    cloudfront,
    distribution_id: str,
    targets: list[CdnTarget],
    *,
    http_port: int = 8000,
    dry_run: bool = False,
    attempts: int = 5,
    sleep: Callable[[float], None] = time.sleep,
) -> SyncResult:
    """Bring the distribution's managed origins/behaviours to exactly ``targets``."""
    for attempt in range(1, attempts + 1):
        with aws_errors(f"CloudFront distribution {distribution_id}"):
            try:
                answer = cloudfront.get_distribution_config(Id=distribution_id)
            except cloudfront.exceptions.NoSuchDistribution:
                raise AwsConfigError(
                    f"CloudFront distribution {distribution_id} not found"
                ) from None
        etag = answer["ETag"]
        plan = plan_sync(answer["DistributionConfig"], targets, http_port)
        if dry_run or not plan.has_changes:
            return SyncResult(plan, updated=False, etag=etag, attempts=attempt)
        with aws_errors(f"CloudFront distribution {distribution_id}"):
            try:
                written = cloudfront.update_distribution(
                    Id=distribution_id, IfMatch=etag, DistributionConfig=plan.config
                )
            except cloudfront.exceptions.PreconditionFailed:
                # Someone changed it since we read it: read it again (below), never force.
                log.info("distribution %s changed under us (ETag %s is stale): retrying",
                         distribution_id, etag)
                written = None
        if written is not None:
            return SyncResult(plan, updated=True, etag=written.get("ETag", ""), attempts=attempt)
        sleep(min(2.0, 0.1 * 2 ** attempt) * random.uniform(0.5, 1.0))
    raise AwsError(
        f"CloudFront distribution {distribution_id} kept changing while we updated it: "
        f"gave up after {attempts} tries; run cdn-sync again"
    )


def targets_from_instances(instances: list[Instance]) -> tuple[list[CdnTarget], list[str]]:
    """CloudFront targets, and the ids of instances skipped for want of a public DNS name."""
    targets, skipped = [], []
    for instance in instances:
        # A CloudFront custom origin must be a domain name: an IP address is not accepted.
        if instance.public_dns:
            targets.append(CdnTarget(instance.instance_id, instance.public_dns))
        else:
            skipped.append(instance.instance_id)
    return targets, skipped


def asg_targets(aws: Aws, asg_name: str) -> tuple[list[CdnTarget], list[str]]:
    instances = asg_instances(aws, asg_name, SERVING_OR_STARTING)
    return targets_from_instances(instances)
