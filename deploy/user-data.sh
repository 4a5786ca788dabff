#!/bin/bash
# Launch-template user data for WatchBuy media nodes (Debian 12 or Ubuntu 24.04 AMIs).
#
# Installs the wheel into /opt/watchbuy/venv, installs and starts the media node and status
# agent units, then runs cdn-sync so CloudFront routes /<instance-id>/* here.  No secrets in
# here: user data is readable by anyone who can describe the launch template.  The hook secret
# comes from SSM Parameter Store through the instance role (deploy/aws/media-node-policy.json).
#
# Release layout under ARTIFACTS (see deploy/README.md, "Releasing"):
#   watchbuy-<version>-<python tag>-<abi>-manylinux_<glibc>_<arch>.whl   make wheel
#   WHEEL                                               the wheel's file name (make wheel)
#   watchbuy-deploy.tar.gz                              tar czf ... deploy
#   watchbuy.env                                        your copy of deploy/watchbuy.env.example
set -euo pipefail
exec > >(tee -a /var/log/watchbuy-user-data.log) 2>&1

# --- edit these in the launch template ---------------------------------------------------------
ARTIFACTS="s3://watchbuy-artifacts/releases/0.1.0"     # or https://… (a plain HTTPS folder)
HOOK_SECRET_PARAMETER="/watchbuy/hook-secret"          # SSM SecureString; empty: no site hook
UV_VERSION="0.13.8"    # installs the wheel's CPython when the AMI's python3 is another one
# ------------------------------------------------------------------------------------------------

PREFIX=/opt/watchbuy
VENV=$PREFIX/venv
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Instance metadata (IMDSv2).
TOKEN=$(curl -sf -X PUT http://169.254.169.254/latest/api/token \
  -H "X-aws-ec2-metadata-token-ttl-seconds: 300")
metadata() {
  curl -sf -H "X-aws-ec2-metadata-token: $TOKEN" "http://169.254.169.254/latest/meta-data/$1"
}
INSTANCE_ID=$(metadata instance-id)
REGION=$(metadata placement/region)
# CloudFront origins must be DNS names: the VPC needs "DNS hostnames" enabled.
PUBLIC_HOST=$(metadata public-hostname || metadata public-ipv4)

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq python3 python3-venv curl >/dev/null

id watchbuy >/dev/null 2>&1 || useradd --system --home-dir /var/lib/watchbuy \
  --shell /usr/sbin/nologin watchbuy
install -d -o watchbuy -g watchbuy -m 0750 /var/lib/watchbuy
install -d -m 0755 $PREFIX /etc/watchbuy

# The wheel's CPython comes from its tag (cp311 → 3.11): the wheel's compiled codecs load in that
# interpreter only.  python3 is 3.11 on Debian 12 but 3.12 on Ubuntu 24.04, so when the AMI's
# python3 is not the wheel's, uv (pinned above, from PyPI) installs that CPython under
# $PREFIX/python (python-build-standalone, the same build on every distribution).
# --- wheel choice (tests/test_packaging.py runs this block against `make wheel`'s output) ---
wheel_python() {  # wheel_python FILE: "3.11" for watchbuy-0.1.0-cp311-cp311-manylinux….whl
  local tag
  tag=$(basename "$1" .whl | cut -d- -f3)
  case "$tag" in
    cp3[0-9]*) echo "3.${tag#cp3}" ;;
    *) echo "user-data: $1 is not a CPython wheel (tag $tag)" >&2; return 1 ;;
  esac
}
python_is() {  # python_is PYTHON VERSION: PYTHON is that CPython (its cache tag cpython-311)
  [ "$("$1" -c 'import sys; print(sys.implementation.cache_tag)' 2>/dev/null)" = \
    "cpython-${2/./}" ]
}
# --- end of wheel choice ---

# A bootstrap venv on the AMI's python3: boto3 fetches the release from S3, uv installs a CPython.
python3 -m venv $PREFIX/bootstrap
$PREFIX/bootstrap/bin/pip install -q --upgrade pip
$PREFIX/bootstrap/bin/pip install -q boto3 "uv==$UV_VERSION"

fetch() {  # fetch NAME: one file of the release into $WORK
  case "$ARTIFACTS" in
    s3://*)
      AWS_DEFAULT_REGION=$REGION $PREFIX/bootstrap/bin/python - "$ARTIFACTS/$1" "$WORK/$1" <<'PY'
import sys
from urllib.parse import urlsplit

import boto3

url, target = sys.argv[1], sys.argv[2]
parts = urlsplit(url)
boto3.client("s3").download_file(parts.netloc, parts.path.lstrip("/"), target)
PY
      ;;
    *) curl -sf -o "$WORK/$1" "$ARTIFACTS/$1" ;;
  esac
}

# The wheel's file name carries its version and tags; the release folder lists it in WHEEL.
fetch WHEEL
WHEEL=$(tr -d '[:space:]' < "$WORK/WHEEL")
fetch "$WHEEL"
fetch watchbuy-deploy.tar.gz
fetch watchbuy.env
PYTHON_VERSION=$(wheel_python "$WHEEL")
if python_is python3 "$PYTHON_VERSION"; then
  python3 -m venv $VENV
else
  echo "python3 is not CPython $PYTHON_VERSION (the wheel's $WHEEL): installing it with uv"
  # explicit folders: user data may run without HOME, where uv keeps its cache by default
  export UV_PYTHON_INSTALL_DIR=$PREFIX/python UV_CACHE_DIR=$WORK/uv-cache
  $PREFIX/bootstrap/bin/uv python install "$PYTHON_VERSION"
  $PREFIX/bootstrap/bin/uv venv --seed --managed-python --python "$PYTHON_VERSION" $VENV
fi
python_is $VENV/bin/python "$PYTHON_VERSION" || {   # pip would refuse the wheel: say why
  echo "user-data: $VENV/bin/python is not CPython $PYTHON_VERSION, which $WHEEL needs"; exit 1; }
$VENV/bin/python -m pip install -q --upgrade pip
$VENV/bin/python -m pip install -q "$WORK/$WHEEL"
tar -xzf "$WORK/watchbuy-deploy.tar.gz" -C $PREFIX    # → /opt/watchbuy/deploy/…

# Settings: the release's env file, with this instance's id, address and region.
ENV_FILE=/etc/watchbuy/watchbuy.env
install -m 0640 -o root -g watchbuy "$WORK/watchbuy.env" $ENV_FILE
set_env() {  # set_env NAME VALUE: drop any NAME= line, add ours (no sed on the value)
  sed -i "/^$1=/d" $ENV_FILE
  printf '%s=%s\n' "$1" "$2" >> $ENV_FILE
}
set_env WATCHBUY_NODE_ID "$INSTANCE_ID"
set_env WATCHBUY_PUBLIC_HOST "$PUBLIC_HOST"
set_env WATCHBUY_AWS_REGION "$REGION"
if [ -n "$HOOK_SECRET_PARAMETER" ]; then
  SECRET=$(AWS_DEFAULT_REGION=$REGION $VENV/bin/python -c '
import sys, boto3
print(boto3.client("ssm").get_parameter(Name=sys.argv[1], WithDecryption=True)["Parameter"]["Value"])
' "$HOOK_SECRET_PARAMETER")
  set_env WATCHBUY_HOOK_SECRET "$SECRET"
  unset SECRET
fi

# Units: media node, status agent, CloudFront sync (at launch, periodically, at shutdown).
install -m 0644 $PREFIX/deploy/systemd/watchbuy-media.service \
  $PREFIX/deploy/systemd/watchbuy-status-agent.service \
  $PREFIX/deploy/systemd/watchbuy-cdn-sync.service \
  $PREFIX/deploy/systemd/watchbuy-cdn-sync.timer \
  $PREFIX/deploy/systemd/watchbuy-cdn-sync-on-stop.service \
  /etc/systemd/system/
systemctl daemon-reload
systemctl enable --now watchbuy-media.service watchbuy-status-agent.service \
  watchbuy-cdn-sync.timer watchbuy-cdn-sync-on-stop.service

# Wait for the node to answer before routing viewers to it.
HTTP_PORT=$(sed -n 's/^WATCHBUY_HTTP_PORT=//p' $ENV_FILE | tail -n1)
for _ in $(seq 60); do
  curl -sf "http://127.0.0.1:${HTTP_PORT:-8000}/healthz" >/dev/null && break
  sleep 1
done

# Route /<instance-id>/* to this instance now (the group lists it as Pending, which cdn-sync
# includes).  A failure is not fatal: the timer tries again within minutes.
systemctl start watchbuy-cdn-sync.service || echo "cdn-sync failed; the timer will retry"
echo "WatchBuy media node $INSTANCE_ID is up"
