"""AWS through boto3: the Auto Scaling group's instances, and AWS errors as one-line messages.

boto3 is blocking; the balancer calls into this module from a worker thread.  Credentials and
region come the usual boto3 way (environment, profile, instance role); ``WATCHBUY_AWS_REGION``
or ``--region`` wins over them for the region.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from watchbuy.settings import PREFIX, ConfigError

# Instances that serve (or are about to): the balancer asks for InService only, cdn-sync also
# takes Pending ones, because a new instance triggers cdn-sync from its own user-data while the
# group still lists it as Pending.
IN_SERVICE = frozenset({"InService"})
SERVING_OR_STARTING = frozenset({"Pending", "Pending:Wait", "Pending:Proceed", "InService"})

# Access key ids that only stand-ins accept: moto's documented "testing", the "FOOBARKEY" that
# moto's mock_aws puts in the environment, LocalStack's "test".  A real key id is 16 or more
# upper-case letters and digits (AKIA..., ASIA...), so anything else is not AWS's either.
FAKE_ACCESS_KEY_IDS = frozenset({"testing", "FOOBARKEY", "test"})
REAL_ACCESS_KEY_ID = re.compile(r"[A-Z0-9]{16,128}")
# Hosts of AWS's own API endpoints (VPC interface endpoints included): an endpoint URL outside
# these is a stand-in (moto server, LocalStack) whose instances' addresses are invented.
AWS_API_DOMAINS = (".amazonaws.com", ".amazonaws.com.cn", ".api.aws")


class BalancerError(Exception):
    """Something the site shows the host as a message, not a stack trace."""


class AwsError(BalancerError):
    """An AWS call failed; the text is one line."""


class AwsConfigError(AwsError, ConfigError):
    """AWS is not set up for us (credentials, region, unknown resource)."""


@dataclass(frozen=True)
class Instance:
    instance_id: str
    lifecycle_state: str
    public_dns: str
    public_ip: str
    private_ip: str

    @property
    def public_host(self) -> str:
        return self.public_dns or self.public_ip


class Aws:
    """A boto3 session and its clients, made once: making a client loads the service model,
    which costs more than the call."""

    def __init__(self, region: str | None = None) -> None:
        import boto3

        with aws_errors("AWS session"):
            self.session = boto3.session.Session(region_name=region or None)
        self._clients: dict[str, object] = {}

    @property
    def region(self) -> str:
        return self.session.region_name or "the default region"

    def client(self, service: str):
        """A client that fails in seconds, not botocore's default minutes, when AWS is
        unreachable."""
        if service not in self._clients:
            from botocore.config import Config

            config = Config(connect_timeout=3, read_timeout=10,
                            retries={"mode": "standard", "max_attempts": 3})
            with aws_errors(f"AWS {service}"):
                self._clients[service] = self.session.client(service, config=config)
        return self._clients[service]

    def stand_in(self, service: str = "ec2") -> str:
        """Why ``service``'s answers do not come from AWS ('' when they do, as far as we can
        tell): moto patched into this process, an endpoint URL that is not AWS's, or fake
        credentials.  Blocking (it may resolve credentials), like every call here.

        Addresses in a stand-in's answers are made up (moto hands out 10.x and 54.x addresses
        and ec2-*.compute.amazonaws.com names): they may belong to anybody, so the balancer
        must never connect to them.
        """
        moto = sys.modules.get("moto.core.models")
        if getattr(getattr(moto, "botocore_stubber", None), "enabled", False):
            return "moto's mock_aws answers AWS calls in this process"
        endpoint = getattr(getattr(self.client(service), "meta", None), "endpoint_url", "") or ""
        host = (urlsplit(endpoint).hostname or "").lower()
        if host and not host.endswith(AWS_API_DOMAINS):
            return f"the {service} endpoint {endpoint} is not AWS's"
        with aws_errors("AWS credentials"):
            credentials = self.session.get_credentials()
            key_id = credentials.get_frozen_credentials().access_key if credentials else ""
        if key_id and (key_id in FAKE_ACCESS_KEY_IDS or not REAL_ACCESS_KEY_ID.fullmatch(key_id)):
            return f"the AWS access key id {key_id[:4]}... is a test one"
        return ""


@contextlib.contextmanager
def aws_errors(what: str) -> Iterator[None]:
    """Turn botocore's exceptions into :class:`AwsError`/:class:`AwsConfigError` lines."""
    from botocore import exceptions as bx

    try:
        yield
    except (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError):
        raise AwsConfigError(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE, or run on an instance with a role"
        ) from None
    except bx.NoRegionError:
        raise AwsConfigError(
            f"no AWS region: set {PREFIX}AWS_REGION (or AWS_DEFAULT_REGION), or pass --region"
        ) from None
    except bx.ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code", "Error")
        message = " ".join(str(error.get("Message", exc)).split())
        kind = AwsConfigError if code in (
            "AccessDenied", "AccessDeniedException", "UnauthorizedOperation",
            "InvalidClientTokenId", "AuthFailure", "SignatureDoesNotMatch", "ExpiredToken",
        ) else AwsError
        raise kind(f"{what}: {code}: {message}") from None
    except bx.BotoCoreError as exc:
        raise AwsError(f"{what}: {' '.join(str(exc).split())}") from None


def asg_instances(aws: Aws, asg_name: str,
                  lifecycle_states: Iterable[str] = IN_SERVICE) -> list[Instance]:
    """Running EC2 instances of the group in one of ``lifecycle_states``, by instance id."""
    states = frozenset(lifecycle_states)
    with aws_errors(f"Auto Scaling group {asg_name}"):
        autoscaling = aws.client("autoscaling")
        groups = autoscaling.describe_auto_scaling_groups(
            AutoScalingGroupNames=[asg_name]
        )["AutoScalingGroups"]
    if not groups:
        raise AwsConfigError(f"Auto Scaling group {asg_name!r} not found in {aws.region}")
    lifecycle = {
        item["InstanceId"]: item.get("LifecycleState", "")
        for item in groups[0].get("Instances", [])
        if item.get("LifecycleState") in states
    }
    if not lifecycle:
        return []
    instances = []
    with aws_errors(f"EC2 instances of {asg_name}"):
        ec2 = aws.client("ec2")
        pages = ec2.get_paginator("describe_instances").paginate(InstanceIds=sorted(lifecycle))
        for page in pages:
            for reservation in page.get("Reservations", []):
                for item in reservation.get("Instances", []):
                    if item.get("State", {}).get("Name") != "running":
                        continue
                    instances.append(Instance(
                        instance_id=item["InstanceId"],
                        lifecycle_state=lifecycle.get(item["InstanceId"], ""),
                        public_dns=item.get("PublicDnsName") or "",
                        public_ip=item.get("PublicIpAddress") or "",
                        private_ip=item.get("PrivateIpAddress") or "",
                    ))
    return sorted(instances, key=lambda i: i.instance_id)
