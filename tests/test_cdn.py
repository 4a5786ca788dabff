"""CloudFront sync: the plan on its own, then cdn-sync against moto (`mock_aws`).

moto's CloudFront accepts any IfMatch and never changes a distribution's ETag (its docstring
says so).  CloudFront does both, and the stale-ETag retry is the point of one test, so the
``strict_etags`` fixture makes moto's update behave as CloudFront's: a new ETag per update and
PreconditionFailed (HTTP 412) for a stale one.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import boto3
import pytest
from balancer_helpers import (
    REGION,
    aws_client,
    group_instance_ids,
    make_media_asg,
    terminate,
)
from moto.cloudfront import models as cloudfront_models
from moto.cloudfront import responses as cloudfront_responses
from moto.cloudfront import urls as cloudfront_urls
from moto.cloudfront.exceptions import CloudFrontException
from moto.core.responses import ActionResult

from watchbuy.balancer import AwsConfigError, AwsError
from watchbuy.balancer.cdn import (
    HLS_CACHE_POLICY,
    CdnTarget,
    desired_cache_policy,
    ensure_cache_policy,
    plan_sync,
    sync_distribution,
)
from watchbuy.cli import main

# No test here may reach an address off this machine (see balancer_helpers.off_loopback).
pytestmark = pytest.mark.usefixtures("off_loopback")

USER_BEHAVIOUR = {
    "PathPattern": "/static/*", "TargetOriginId": "site", "ViewerProtocolPolicy": "allow-all",
    "MinTTL": 0, "DefaultTTL": 86400, "MaxTTL": 31536000,
    "ForwardedValues": {"QueryString": False, "Cookies": {"Forward": "none"}},
}


def base_config(**extra) -> dict:
    config = {
        "CallerReference": "watchbuy-test", "Comment": "shop", "Enabled": True,
        "Origins": {"Quantity": 1, "Items": [{
            "Id": "site", "DomainName": "shop.example.com",
            "CustomOriginConfig": {"HTTPPort": 80, "HTTPSPort": 443,
                                   "OriginProtocolPolicy": "https-only"},
        }]},
        "DefaultCacheBehavior": {"TargetOriginId": "site", "ViewerProtocolPolicy": "allow-all"},
        "CacheBehaviors": {"Quantity": 1, "Items": [USER_BEHAVIOUR]},
    }
    config.update(extra)
    return config


class PreconditionFailed(CloudFrontException):
    code = "PreconditionFailed"
    message = "The precondition given in one or more of the request-header fields evaluated to false."


@pytest.fixture
def strict_etags(monkeypatch):
    original = cloudfront_models.CloudFrontBackend.update_distribution

    def update_distribution(self, dist_config, _id, if_match):
        dist = self.distributions.get(_id)
        if dist is not None and if_match != dist.etag:
            raise PreconditionFailed()
        result = original(self, dist_config, _id, if_match)
        dist.etag = cloudfront_models.random_id()
        return result[0], result[1], dist.etag

    monkeypatch.setattr(cloudfront_models.CloudFrontBackend, "update_distribution",
                        update_distribution)


class NoSuchCachePolicy(CloudFrontException):
    code = "NoSuchCachePolicy"
    message = "The cache policy does not exist."


class CachePolicyAlreadyExists(CloudFrontException):
    code = "CachePolicyAlreadyExists"
    message = "A cache policy with this name already exists."


@pytest.fixture(autouse=True)
def moto_cache_policies(monkeypatch):
    """moto 5.2.5's CloudFront has no cache policy API (ListCachePolicies answers 404 there).
    This gives it one for the test: the four calls cdn-sync makes, routed, parsed and answered
    by moto's own machinery from botocore's CloudFront model (so requests and answers have the
    real API's shape), with CloudFront's ETag rule on update.  ``{id: [config, etag]}``."""
    policies: dict[str, list] = {}
    base = "{0}/2020-05-31/cache-policy"
    for path in (base + "$", base + "/(?P<Id>[^/]+)$", base + "/(?P<Id>[^/]+)/config$"):
        monkeypatch.setitem(cloudfront_urls.url_paths, path,
                            cloudfront_responses.CloudFrontResponse.dispatch)

    def summary(policy_id: str) -> dict:
        return {"Id": policy_id, "LastModifiedTime": datetime.now(UTC),
                "CachePolicyConfig": policies[policy_id][0]}

    def create_cache_policy(self):
        config = self._get_param("CachePolicyConfig")
        if any(c["Name"] == config["Name"] for c, _etag in policies.values()):
            raise CachePolicyAlreadyExists()
        policy_id = str(uuid.uuid4())
        policies[policy_id] = [config, cloudfront_models.random_id()]
        return ActionResult({"CachePolicy": summary(policy_id), "ETag": policies[policy_id][1],
                             "Location": f"https://cloudfront.amazonaws.com/{policy_id}"})

    def list_cache_policies(self):
        kind = self._get_param("Type")
        items = [] if kind == "managed" else \
            [{"Type": "custom", "CachePolicy": summary(i)} for i in policies]
        return ActionResult({"CachePolicyList": {"MaxItems": 100, "Quantity": len(items),
                                                 "Items": items}})

    def get_cache_policy(self):
        policy_id = self._get_param("Id")
        if policy_id not in policies:
            raise NoSuchCachePolicy()
        return ActionResult({"CachePolicy": summary(policy_id), "ETag": policies[policy_id][1]})

    def update_cache_policy(self):
        policy_id = self._get_param("Id")
        if policy_id not in policies:
            raise NoSuchCachePolicy()
        if self._get_param("IfMatch") != policies[policy_id][1]:
            raise PreconditionFailed()
        policies[policy_id] = [self._get_param("CachePolicyConfig"),
                               cloudfront_models.random_id()]
        return ActionResult({"CachePolicy": summary(policy_id), "ETag": policies[policy_id][1]})

    for function in (create_cache_policy, list_cache_policies, get_cache_policy,
                     update_cache_policy):
        monkeypatch.setattr(cloudfront_responses.CloudFrontResponse, function.__name__,
                            function, raising=False)
    return policies


@pytest.fixture
def cloudfront(aws, strict_etags):
    client = boto3.client("cloudfront", region_name=REGION)
    client.calls = {"GetDistributionConfig": 0, "UpdateDistribution": 0}

    def count(model, **kwargs):
        client.calls[model.name] = client.calls.get(model.name, 0) + 1

    client.meta.events.register("before-call.cloudfront.*", count)
    return client


@pytest.fixture
def distribution(cloudfront) -> str:
    # Tests share one moto (see test_balancer_aws.aws): a caller reference of its own each.
    config = base_config(CallerReference=f"watchbuy-test-{uuid.uuid4()}")
    return cloudfront.create_distribution(DistributionConfig=config)["Distribution"]["Id"]


def read(cloudfront, distribution_id: str) -> tuple[dict, str]:
    answer = cloudfront.get_distribution_config(Id=distribution_id)
    return answer["DistributionConfig"], answer["ETag"]


def managed(config: dict) -> tuple[list[str], list[str]]:
    origins = [o["Id"] for o in config["Origins"]["Items"] if o["Id"].startswith("wb-")]
    patterns = [b["PathPattern"] for b in config["CacheBehaviors"].get("Items") or []]
    return origins, patterns


def node_patterns(node_id: str) -> list[str]:
    """A node's behaviours with LL-HLS, in CloudFront's order: most specific first."""
    return [f"/{node_id}/*.m3u8", f"/{node_id}/*.m??", f"/{node_id}/*"]


def public_dns(instance_id: str) -> str:
    ec2 = aws_client("ec2")
    reservation = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
    return reservation["Instances"][0]["PublicDnsName"]


# -- the plan ---------------------------------------------------------------------------------
def test_plan_adds_one_origin_and_behaviour_per_node_ours_first():
    targets = [CdnTarget("i-b", "b.example.com"), CdnTarget("i-a", "a.example.com")]
    plan = plan_sync(base_config(), targets, http_port=8000)
    assert plan.added == ["i-a", "i-b"] and plan.has_changes
    origins, patterns = managed(plan.config)
    assert origins == ["wb-i-a", "wb-i-b"]
    assert patterns == ["/i-a/*", "/i-b/*", "/static/*"]
    origin = plan.config["Origins"]["Items"][1]
    assert origin["DomainName"] == "a.example.com"
    assert origin["CustomOriginConfig"]["HTTPPort"] == 8000
    assert origin["CustomOriginConfig"]["OriginProtocolPolicy"] == "http-only"
    behaviour = plan.config["CacheBehaviors"]["Items"][0]
    assert (behaviour["MinTTL"], behaviour["DefaultTTL"], behaviour["MaxTTL"]) == (0, 0, 0)
    assert behaviour["ForwardedValues"]["QueryString"] is True
    assert behaviour["ForwardedValues"]["Headers"]["Items"] == ["Origin", "Range"]
    assert behaviour["AllowedMethods"]["Items"] == ["GET", "HEAD", "OPTIONS"]
    assert plan.config["CacheBehaviors"]["Items"][2] == USER_BEHAVIOUR


def test_plan_is_empty_when_in_sync_even_with_cloudfronts_extra_fields():
    targets = [CdnTarget("i-a", "a.example.com")]
    first = plan_sync(base_config(), targets).config
    # CloudFront answers with defaults we never set; they must not look like a change.
    for origin in first["Origins"]["Items"]:
        origin["OriginShield"] = {"Enabled": False}
    first["CacheBehaviors"]["Items"][0]["CachePolicyId"] = ""
    again = plan_sync(first, targets)
    assert not again.has_changes and again.config == first


def test_plan_removes_gone_nodes_updates_moved_ones_and_keeps_referenced_origins():
    start = plan_sync(base_config(), [CdnTarget("i-a", "a.example.com"),
                                      CdnTarget("i-b", "b.example.com")]).config
    moved = plan_sync(start, [CdnTarget("i-b", "b2.example.com")])
    assert moved.removed == ["i-a"] and moved.changed == ["i-b"] and moved.added == []
    assert managed(moved.config) == (["wb-i-b"], ["/i-b/*", "/static/*"])

    # The default behaviour pointed at a node's origin by hand: the origin must stay.
    pinned = copy.deepcopy(start)
    pinned["DefaultCacheBehavior"]["TargetOriginId"] = "wb-i-a"
    plan = plan_sync(pinned, [CdnTarget("i-b", "b.example.com")])
    assert plan.kept == ["wb-i-a"] and plan.removed == ["i-a"]
    assert managed(plan.config) == (["wb-i-a", "wb-i-b"], ["/i-b/*", "/static/*"])
    assert not plan_sync(plan.config, [CdnTarget("i-b", "b.example.com")]).has_changes


def test_plan_puts_our_behaviours_before_a_users_broad_pattern():
    config = plan_sync(base_config(), [CdnTarget("i-a", "a.example.com")]).config
    items = config["CacheBehaviors"]["Items"]
    config["CacheBehaviors"]["Items"] = items[1:] + items[:1]  # someone moved ours last
    plan = plan_sync(config, [CdnTarget("i-a", "a.example.com")])
    assert plan.reordered and not (plan.added or plan.removed or plan.changed)
    assert managed(plan.config)[1] == ["/i-a/*", "/static/*"]


# -- against moto -----------------------------------------------------------------------------
def test_sync_adds_removes_and_is_idempotent(cloudfront, distribution):
    group, ids = make_media_asg(count=2)
    targets = [CdnTarget(i, public_dns(i)) for i in ids]
    result = sync_distribution(cloudfront, distribution, targets)
    assert result.updated and result.plan.added == ids
    config, etag = read(cloudfront, distribution)
    assert managed(config) == ([f"wb-{i}" for i in ids],
                               [p for i in ids for p in node_patterns(i)] + ["/static/*"])
    assert config["Origins"]["Items"][0]["Id"] == "site"  # the user's origin, untouched
    assert config["Comment"] == "shop" and etag == result.etag

    # Second run, nothing changed: no update, same ETag.
    calls = cloudfront.calls["UpdateDistribution"]
    again = sync_distribution(cloudfront, distribution, targets)
    assert not again.updated and cloudfront.calls["UpdateDistribution"] == calls
    assert read(cloudfront, distribution)[1] == etag

    # One instance terminated, the group scales out by one: one behaviour out, one in.
    terminate(ids[0])
    aws_client("autoscaling").set_desired_capacity(
        AutoScalingGroupName=group, DesiredCapacity=2)
    now = group_instance_ids(group)
    assert ids[0] not in now and len(now) == 2
    result = sync_distribution(cloudfront, distribution, [CdnTarget(i, public_dns(i)) for i in now])
    assert result.plan.removed == [ids[0]] and result.plan.added == [i for i in now if i != ids[1]]
    config, _ = read(cloudfront, distribution)
    assert managed(config) == ([f"wb-{i}" for i in now],
                               [p for i in now for p in node_patterns(i)] + ["/static/*"])


def test_stale_etag_is_reread_and_retried_not_overwritten(cloudfront, distribution):
    other = aws_client("cloudfront")
    interfered = []

    def someone_else_edits(**kwargs):
        # Between our read and our write, another admin changes the comment.
        if not interfered:
            interfered.append(True)
            config, etag = read(other, distribution)
            config["Comment"] = "edited meanwhile"
            other.update_distribution(Id=distribution, IfMatch=etag, DistributionConfig=config)

    cloudfront.meta.events.register("after-call.cloudfront.GetDistributionConfig",
                                    someone_else_edits)
    result = sync_distribution(cloudfront, distribution, [CdnTarget("i-a", "a.example.com")],
                               sleep=lambda s: None)
    assert result.updated and result.attempts == 2
    assert cloudfront.calls["UpdateDistribution"] == 2  # the stale write, then the good one
    config, _ = read(cloudfront, distribution)
    assert config["Comment"] == "edited meanwhile"  # their change survived ours
    assert managed(config)[0] == ["wb-i-a"]


def test_gives_up_when_the_etag_is_stale_every_time(cloudfront, distribution):
    other = aws_client("cloudfront")

    def always_edit(**kwargs):
        config, etag = read(other, distribution)
        config["Comment"] += "!"
        other.update_distribution(Id=distribution, IfMatch=etag, DistributionConfig=config)

    cloudfront.meta.events.register("after-call.cloudfront.GetDistributionConfig", always_edit)
    with pytest.raises(AwsError, match="kept changing") as info:
        sync_distribution(cloudfront, distribution, [CdnTarget("i-a", "a.example.com")],
                          attempts=3, sleep=lambda s: None)
    assert "\n" not in str(info.value)
    assert managed(read(other, distribution)[0])[0] == []  # we never wrote


def test_unknown_distribution(cloudfront):
    with pytest.raises(AwsConfigError, match="CloudFront distribution E000000000000 not found"):
        sync_distribution(cloudfront, "E000000000000", [])


# -- the command ------------------------------------------------------------------------------
def cdn_sync(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["cdn-sync", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def no_watchbuy_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("WATCHBUY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WATCHBUY_ENV_FILE", os.devnull)


def test_cli_twice_makes_one_update_then_none(cloudfront, distribution, capsys, no_watchbuy_env):
    group, ids = make_media_asg(count=2)
    args = ["--distribution-id", distribution, "--asg", group, "--region", REGION]
    code, out, err = cdn_sync(capsys, *args, "--dry-run")
    assert code == 0 and err == ""
    assert f"+ {ids[0]}: origin wb-{ids[0]} -> {public_dns(ids[0])}, behaviour /{ids[0]}/*" in out
    assert "dry run" in out and "would update" in out
    assert managed(read(cloudfront, distribution)[0])[0] == []  # nothing written

    code, out, err = cdn_sync(capsys, *args)
    assert code == 0 and f"updated distribution {distribution} for 2 nodes" in out
    code, out, err = cdn_sync(capsys, *args)
    assert code == 0 and "is up to date (2 nodes): no update made" in out
    assert cloudfront.calls["UpdateDistribution"] == 0  # the CLI used its own client
    config, _ = read(cloudfront, distribution)
    assert managed(config)[0] == [f"wb-{i}" for i in ids]


def test_cli_bad_configuration_is_one_line(cloudfront, distribution, capsys, no_watchbuy_env):
    group, _ = make_media_asg(count=1)
    for args, expected in [
        (["--distribution-id", "E000000000000", "--asg", group],
         "watchbuy: configuration error: CloudFront distribution E000000000000 not found"),
        (["--distribution-id", distribution, "--asg", "nope"],
         f"watchbuy: configuration error: Auto Scaling group 'nope' not found in {REGION}"),
        (["--asg", group],
         "watchbuy: configuration error: --distribution-id (or WATCHBUY_CDN_DISTRIBUTION_ID) "
         "is required"),
    ]:
        code, out, err = cdn_sync(capsys, *args, "--region", REGION)
        assert (code, out, err.strip().splitlines()) == (1, "", [expected])


def test_cli_refuses_an_empty_group_unless_told(cloudfront, distribution, capsys,
                                                 no_watchbuy_env):
    group, ids = make_media_asg(count=1)
    args = ["--distribution-id", distribution, "--asg", group, "--region", REGION]
    assert cdn_sync(capsys, *args)[0] == 0
    terminate(ids[0])
    code, out, err = cdn_sync(capsys, *args)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"no running instances found in Auto Scaling group {group}" in err
    assert managed(read(cloudfront, distribution)[0])[0] == [f"wb-{ids[0]}"]
    code, out, err = cdn_sync(capsys, *args, "--allow-empty")
    assert code == 0 and f"- {ids[0]}" in out
    assert managed(read(cloudfront, distribution)[0]) == ([], ["/static/*"])


def test_cli_missing_credentials_is_one_line(tmp_path):
    # A real process with no credentials anywhere: no env, no files, no metadata service.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "WATCHBUY_"))}
    env.update({"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "WATCHBUY_ENV_FILE": os.devnull,
                "HOME": str(tmp_path)})
    command = [sys.executable, "-m", "watchbuy", "cdn-sync", "--distribution-id", "E1",
               "--asg", "wb-media"]
    result = subprocess.run([*command, "--region", REGION], capture_output=True, text=True,
                            env=env, timeout=60, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "watchbuy: configuration error: no AWS credentials found: set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or run on an instance with a role"
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "watchbuy: configuration error: no AWS region: set WATCHBUY_AWS_REGION "
        "(or AWS_DEFAULT_REGION), or pass --region"
    ]


# -- LL-HLS: a cache policy and two behaviours per node ----------------------------------------
def test_plan_with_hls_puts_the_hls_behaviours_before_the_nodes_flv_one():
    targets = [CdnTarget("i-a", "a.example.com")]
    plan = plan_sync(base_config(), targets, hls_cache_policy_id="policy-1")
    assert managed(plan.config)[1] == [*node_patterns("i-a"), "/static/*"]
    playlist, media, flv = plan.config["CacheBehaviors"]["Items"][:3]
    for behaviour in (playlist, media):
        assert behaviour["CachePolicyId"] == "policy-1"
        assert "ForwardedValues" not in behaviour and "MinTTL" not in behaviour
        assert behaviour["TargetOriginId"] == "wb-i-a"
        assert behaviour["AllowedMethods"]["CachedMethods"]["Items"] == ["GET", "HEAD"]
    # HTTP-FLV stays uncached.
    assert (flv["MinTTL"], flv["DefaultTTL"], flv["MaxTTL"]) == (0, 0, 0)
    assert "CachePolicyId" not in flv
    assert not plan_sync(plan.config, targets, hls_cache_policy_id="policy-1").has_changes
    # Another policy id, or HLS turned off, is a change for the node, and only its behaviours.
    assert plan_sync(plan.config, targets, hls_cache_policy_id="policy-2").changed == ["i-a"]
    off = plan_sync(plan.config, targets)
    assert off.changed == ["i-a"] and managed(off.config)[1] == ["/i-a/*", "/static/*"]


def test_path_patterns_route_hls_and_flv_as_cloudfront_would():
    # CloudFront path patterns: '*' any run of characters (slashes too), '?' one character;
    # the first behaviour in order whose pattern matches the whole path wins.
    import fnmatch

    behaviours = plan_sync(base_config(), [CdnTarget("i-a", "a.example.com")],
                           hls_cache_policy_id="p").config["CacheBehaviors"]["Items"]

    def behaviour(path: str) -> str:
        return next(b["PathPattern"] for b in behaviours
                    if fnmatch.fnmatchcase(path, b["PathPattern"]))

    assert behaviour("/i-a/live/show1/index.m3u8") == "/i-a/*.m3u8"
    for name in ("part17960036657.3.m4s", "seg17960036657.m4s", "init.mp4", "init2.mp4"):
        assert behaviour(f"/i-a/live/show1/{name}") == "/i-a/*.m??"
    for path in ("/i-a/live/show1.flv", "/i-a/live/my.mp4.show.flv", "/i-a/api/streams"):
        assert behaviour(path) == "/i-a/*"


def test_sync_creates_the_cache_policy_once_and_stays_idempotent(cloudfront, distribution,
                                                                 moto_cache_policies):
    targets = [CdnTarget("i-a", "a.example.com"), CdnTarget("i-b", "b.example.com")]
    dry = sync_distribution(cloudfront, distribution, targets, dry_run=True)
    assert dry.plan.cache_policy == "would create" and moto_cache_policies == {}
    result = sync_distribution(cloudfront, distribution, targets)
    assert result.updated and result.plan.cache_policy == "created"
    [(policy_id, (config, _etag))] = moto_cache_policies.items()
    assert config["Name"] == HLS_CACHE_POLICY
    assert (config["MinTTL"], config["DefaultTTL"]) == (0, 0) and config["MaxTTL"] >= 300
    keys = config["ParametersInCacheKeyAndForwardedToOrigin"]["QueryStringsConfig"]
    assert keys["QueryStringBehavior"] == "whitelist"
    assert sorted(keys["QueryStrings"]["Items"]) == ["_HLS_msn", "_HLS_part", "_HLS_skip"]
    distribution_config, etag = read(cloudfront, distribution)
    hls = [b for b in distribution_config["CacheBehaviors"]["Items"] if b.get("CachePolicyId")]
    assert [b["PathPattern"] for b in hls] == ["/i-a/*.m3u8", "/i-a/*.m??",
                                               "/i-b/*.m3u8", "/i-b/*.m??"]  # fmt: skip
    assert {b["CachePolicyId"] for b in hls} == {policy_id}

    # Again: nothing written, neither the distribution nor the policy.
    calls = dict(cloudfront.calls)
    again = sync_distribution(cloudfront, distribution, targets)
    assert not again.updated and again.plan.cache_policy == "kept"
    assert read(cloudfront, distribution)[1] == etag
    for call in ("UpdateDistribution", "CreateCachePolicy", "UpdateCachePolicy"):
        assert cloudfront.calls.get(call, 0) == calls.get(call, 0), call
    assert len(moto_cache_policies) == 1


def test_a_cache_policy_edited_by_hand_is_brought_back(cloudfront, moto_cache_policies):
    policy_id, action = ensure_cache_policy(cloudfront)
    assert action == "created"
    edited = desired_cache_policy()
    edited["ParametersInCacheKeyAndForwardedToOrigin"]["QueryStringsConfig"] = {
        "QueryStringBehavior": "none"}
    etag = cloudfront.get_cache_policy(Id=policy_id)["ETag"]
    cloudfront.update_cache_policy(Id=policy_id, IfMatch=etag, CachePolicyConfig=edited)
    assert ensure_cache_policy(cloudfront, dry_run=True) == (policy_id, "would update")
    assert ensure_cache_policy(cloudfront) == (policy_id, "updated")
    assert ensure_cache_policy(cloudfront) == (policy_id, "kept")
    config = moto_cache_policies[policy_id][0]
    keys = config["ParametersInCacheKeyAndForwardedToOrigin"]["QueryStringsConfig"]
    assert sorted(keys["QueryStrings"]["Items"]) == ["_HLS_msn", "_HLS_part", "_HLS_skip"]
