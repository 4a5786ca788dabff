"""CloudFront sync: one origin and three cache behaviours per running media node.

Viewers play ``https://<cdn>/<node-id>/live/<name>.flv``; the behaviour ``/<instance-id>/*``
sends that path to the origin ``wb-<instance-id>`` (the instance's public DNS name, HTTP-FLV
port, HTTP only), and the engine serves the path with the node id in it.  This is the seed's
scheme (its "future work"), cleaned up:

* TTL 0 (min, default and max): CloudFront does not keep live content, it revalidates every
  request with the origin (the seed's note on dynamic content);
* query strings and the ``Origin`` and ``Range`` headers are forwarded (CORS for mpegts.js in the
  browser, ranges for players that probe), cookies are not; GET, HEAD and OPTIONS are allowed;
  compression is off (FLV is already compressed, and it would buffer the stream).

LL-HLS (``/<node-id>/live/<name>/index.m3u8`` and the parts, segments and init beside it) is
what the CDN can carry for a crowd, so it gets two more behaviours per node, before the FLV one
(CloudFront takes the first pattern that matches, in order): ``/<node-id>/*.m3u8`` (playlists)
and ``/<node-id>/*.m??`` (``.m4s`` parts and segments, ``.mp4`` init; never an ``.flv`` path,
whose name ends in ``.flv``).  Both use one cache policy, ``watchbuy-ll-hls``, created or
brought up to date here: TTLs from the origin's Cache-Control (min 0, default 0, max one day),
and the ``_HLS_msn``, ``_HLS_part`` and ``_HLS_skip`` query parameters in the cache key, so
every blocking playlist request of an edge for one part is one origin request, and the answer is
shared by all the edge's viewers.  No cookies or headers in the key (the node's CORS answer
is the same for every origin).

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
HLS_CACHE_POLICY = "watchbuy-ll-hls"
HLS_QUERY_KEYS = ["_HLS_msn", "_HLS_part", "_HLS_skip"]
# The most a cached HLS answer may live whatever the origin says (it says at most minutes).
HLS_MAX_TTL = 86400
NEW_POLICY_ID = "(new)"  # a dry run plans with this id when the policy does not exist yet


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

    @property
    def hls_patterns(self) -> list[str]:
        """Playlists, then parts/segments/init: more specific than ``path_pattern``."""
        return [f"/{self.node_id}/*.m3u8", f"/{self.node_id}/*.m??"]


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


def desired_cache_policy() -> dict:
    """The LL-HLS cache policy (a CachePolicyConfig)."""
    return {
        "Name": HLS_CACHE_POLICY,
        "Comment": "WatchBuy LL-HLS: origin Cache-Control, _HLS_* query in the key",
        "MinTTL": 0,
        "DefaultTTL": 0,  # an answer without Cache-Control is not kept
        "MaxTTL": HLS_MAX_TTL,
        "ParametersInCacheKeyAndForwardedToOrigin": {
            "EnableAcceptEncodingGzip": False,
            "EnableAcceptEncodingBrotli": False,
            "HeadersConfig": {"HeaderBehavior": "none"},
            "CookiesConfig": {"CookieBehavior": "none"},
            "QueryStringsConfig": {
                "QueryStringBehavior": "whitelist",
                "QueryStrings": {"Quantity": len(HLS_QUERY_KEYS), "Items": list(HLS_QUERY_KEYS)},
            },
        },
    }


def desired_hls_behaviours(target: CdnTarget, cache_policy_id: str) -> list[dict]:
    behaviours = []
    for pattern in target.hls_patterns:
        behaviours.append({
            "PathPattern": pattern,
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
            "CachePolicyId": cache_policy_id,
        })
    return behaviours


def _same_policy(actual: dict, desired: dict) -> bool:
    """Whether a CachePolicyConfig read back says what ``desired`` does (query strings in any
    order; fields CloudFront adds do not count)."""
    def keys(config: dict) -> list[str]:
        strings = config["ParametersInCacheKeyAndForwardedToOrigin"]["QueryStringsConfig"]
        return sorted((strings.get("QueryStrings") or {}).get("Items") or [])

    plain = copy.deepcopy(desired)
    del plain["ParametersInCacheKeyAndForwardedToOrigin"]["QueryStringsConfig"]["QueryStrings"]
    try:
        return _covers(actual, plain) and keys(actual) == keys(desired)
    except (KeyError, TypeError):
        return False


def ensure_cache_policy(cloudfront, dry_run: bool = False) -> tuple[str, str]:
    """(id, what was done: "kept", "created", "updated", or "would create"/"would update")
    of the LL-HLS cache policy, found by name among the account's custom policies."""
    desired = desired_cache_policy()
    found = None
    marker = None
    while found is None:
        page = cloudfront.list_cache_policies(Type="custom", **({"Marker": marker} if marker
                                                                 else {}))["CachePolicyList"]
        for item in page.get("Items") or []:
            policy = item["CachePolicy"]
            if policy["CachePolicyConfig"]["Name"] == HLS_CACHE_POLICY:
                found = policy
                break
        marker = page.get("NextMarker")
        if not marker:
            break
    if found is None:
        if dry_run:
            return NEW_POLICY_ID, "would create"
        try:
            created = cloudfront.create_cache_policy(CachePolicyConfig=desired)
        except cloudfront.exceptions.CachePolicyAlreadyExists:
            # Another cdn-sync made it between our list and our create: use theirs.
            return ensure_cache_policy(cloudfront, dry_run)
        return created["CachePolicy"]["Id"], "created"
    if _same_policy(found["CachePolicyConfig"], desired):
        return found["Id"], "kept"
    if dry_run:
        return found["Id"], "would update"
    etag = cloudfront.get_cache_policy(Id=found["Id"])["ETag"]
    cloudfront.update_cache_policy(Id=found["Id"], IfMatch=etag, CachePolicyConfig=desired)
    return found["Id"], "updated"


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
    hls: bool = False  # LL-HLS behaviours are part of the plan
    cache_policy: str = ""  # what ensure_cache_policy did, when it was asked

    @property
    def has_changes(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.reordered)

    def describe(self, targets: dict[str, CdnTarget] | None = None) -> list[str]:
        lines = []
        for node_id in self.added:
            where = f" -> {targets[node_id].domain}" if targets and node_id in targets else ""
            hls = f", LL-HLS /{node_id}/*.m3u8 and /{node_id}/*.m??" if self.hls else ""
            lines.append(f"+ {node_id}: origin {ORIGIN_PREFIX}{node_id}{where}, "
                         f"behaviour /{node_id}/*{hls}")
        for node_id in self.changed:
            lines.append(f"~ {node_id}: origin or behaviour brought up to date")
        for node_id in self.removed:
            lines.append(f"- {node_id}: origin {ORIGIN_PREFIX}{node_id} and behaviour /{node_id}/*")
        for origin_id in self.kept:
            lines.append(f"! {origin_id}: instance gone but the default cache behaviour or an "
                         "origin group still uses this origin: left in place")
        if self.reordered:
            lines.append("~ cache behaviours reordered: ours first")
        if self.cache_policy and self.cache_policy != "kept":
            lines.append(f"~ cache policy {HLS_CACHE_POLICY}: {self.cache_policy}")
        return lines


def _referenced_origins(config: dict) -> set[str]:
    used = {config.get("DefaultCacheBehavior", {}).get("TargetOriginId", "")}
    for group in (config.get("OriginGroups") or {}).get("Items") or []:
        for member in (group.get("Members") or {}).get("Items") or []:
            used.add(member.get("OriginId", ""))
    return used


def plan_sync(config: dict, targets: list[CdnTarget], http_port: int = 8000,
              hls_cache_policy_id: str | None = None) -> SyncPlan:  # fmt: skip
    """What to change in ``config`` (a DistributionConfig) for exactly ``targets``; with a
    cache policy id, each node's LL-HLS behaviours too (without, none)."""
    plan = SyncPlan(hls=hls_cache_policy_id is not None)
    new = copy.deepcopy(config)
    wanted = {t.origin_id: t for t in sorted(targets, key=lambda t: t.node_id)}
    origins = (config.get("Origins") or {}).get("Items") or []
    behaviours = (config.get("CacheBehaviors") or {}).get("Items") or []
    current_origins = {o["Id"]: o for o in origins if o["Id"].startswith(ORIGIN_PREFIX)}
    current_behaviours: dict[str, dict[str, dict]] = {}  # origin id -> pattern -> behaviour
    for b in behaviours:
        if b.get("TargetOriginId", "").startswith(ORIGIN_PREFIX):
            current_behaviours.setdefault(b["TargetOriginId"], {})[b.get("PathPattern")] = b
    referenced = _referenced_origins(config)

    managed_origins = []
    managed_behaviours = []
    for origin_id, target in wanted.items():
        want_origin = desired_origin(target, http_port)
        # Most specific first: CloudFront takes the first pattern that matches.
        want_behaviours = [] if hls_cache_policy_id is None else \
            desired_hls_behaviours(target, hls_cache_policy_id)
        want_behaviours.append(desired_behaviour(target))
        have_origin = current_origins.get(origin_id)
        have_behaviours = current_behaviours.get(origin_id, {})
        up_to_date = _covers(have_origin, want_origin) and \
            set(have_behaviours) == {b["PathPattern"] for b in want_behaviours} and \
            all(_covers(have_behaviours.get(b["PathPattern"]), b) for b in want_behaviours)
        if have_origin is None and not have_behaviours:
            plan.added.append(target.node_id)
        elif not up_to_date:
            plan.changed.append(target.node_id)
        # Keep CloudFront's own copy when it already says what we want: no spurious diff.
        managed_origins.append(have_origin if _covers(have_origin, want_origin) else want_origin)
        for want in want_behaviours:
            have = have_behaviours.get(want["PathPattern"])
            managed_behaviours.append(have if _covers(have, want) else want)
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
    hls: bool = True,
) -> SyncResult:
    """Bring the distribution's managed origins/behaviours to exactly ``targets`` (with the
    LL-HLS cache policy and behaviours unless ``hls`` is False)."""
    policy: tuple[str, str] | None = None
    for attempt in range(1, attempts + 1):
        with aws_errors(f"CloudFront distribution {distribution_id}"):
            try:
                answer = cloudfront.get_distribution_config(Id=distribution_id)
            except cloudfront.exceptions.NoSuchDistribution:
                raise AwsConfigError(
                    f"CloudFront distribution {distribution_id} not found"
                ) from None
        etag = answer["ETag"]
        if hls and policy is None:  # once the distribution is known to exist
            with aws_errors(f"CloudFront cache policy {HLS_CACHE_POLICY}"):
                policy = ensure_cache_policy(cloudfront, dry_run)
        plan = plan_sync(answer["DistributionConfig"], targets, http_port,
                         policy[0] if policy else None)
        plan.cache_policy = policy[1] if policy else ""
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
