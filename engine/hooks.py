"""Publish authentication: who may publish, and under which public stream name.

As nginx-rtmp's ``on_publish``: when a publisher sends ``publish <key>``, the engine asks an HTTP
endpoint (the site) whether the secret stream key may publish and which public name the stream
gets; when it stops, the engine reports ``publish_done``.  Requests are HMAC-SHA256 signed over
``"<timestamp>.<body>"`` so the site can tell them from forgeries; the JSON body carries a random
one-use ``nonce`` (signed with it), so that the site can also refuse a call replayed while its
timestamp is still fresh.  The site accepts a timestamp up to ``MAX_AGE_SECONDS`` old and at most
``MAX_FUTURE_SECONDS`` ahead of its own clock, and remembers nonces that long.

Standalone, without a site, :class:`StaticKeys` maps keys to names from configuration.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from typing import Protocol

log = logging.getLogger("watchbuy.engine.hooks")

SIGNATURE_HEADER = "X-WatchBuy-Signature"
TIMESTAMP_HEADER = "X-WatchBuy-Timestamp"
NONCE_FIELD = "nonce"
# Defaults of the verifier's window (the site's WATCHBUY_HOOK_MAX_AGE / WATCHBUY_HOOK_MAX_FUTURE):
# a call is accepted from its timestamp on for MAX_AGE_SECONDS; a timestamp ahead of the
# verifier's clock only by MAX_FUTURE_SECONDS (clock skew between machines), since a timestamp
# far in the future would keep a captured call fresh for as long.
MAX_AGE_SECONDS = 300
MAX_FUTURE_SECONDS = 30
# What a nonce looks like: the engine sends 32 hex digits; the verifier takes 16-128 URL-safe
# characters, so a short guessable value (or a huge key for the nonce store) is refused.
NONCE = re.compile(r"[A-Za-z0-9_-]{16,128}")


class PublishRefused(Exception):
    """This key may not publish (unknown key, or the hook said no or did not answer)."""


def sign(secret: str, timestamp: str, body: bytes) -> str:
    message = timestamp.encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def new_nonce() -> str:
    return secrets.token_hex(16)


def check_signature(
    secret: str, timestamp: str, body: bytes, signature: str, now: float | None = None,
    max_age: float = MAX_AGE_SECONDS, max_future: float = MAX_FUTURE_SECONDS,
) -> str:
    """Why this call is refused ('' when the signature is ours and the timestamp fresh).

    The signature is checked first: only the holder of the secret learns that a timestamp was
    the problem.  Replays within the window are the caller's to refuse (by the body's nonce).
    """
    if not secret or not timestamp or not signature:
        return "bad signature"
    # isascii: str.isdigit() also accepts digits of other scripts, which int() then refuses;
    # bytes: compare_digest raises on a str with non-ASCII characters.
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
        return "bad signature"
    if not hmac.compare_digest(sign(secret, timestamp, body).encode(),
                               signature.encode("utf-8", "replace")):
        return "bad signature"
    age = (time.time() if now is None else now) - int(timestamp)
    if age > max_age:
        return "stale timestamp"
    if age < -max_future:
        return "timestamp in the future"
    return ""


def verify(
    secret: str, timestamp: str, body: bytes, signature: str, now: float | None = None,
    max_age: float = MAX_AGE_SECONDS, max_future: float = MAX_FUTURE_SECONDS,
) -> bool:
    """True when ``signature`` is ours for this body and the timestamp is fresh."""
    return not check_signature(secret, timestamp, body, signature, now, max_age, max_future)


def split_key(publish_name: str) -> str:
    """The stream key from a publish name: OBS and ffmpeg may append ``?query`` arguments."""
    return publish_name.split("?", 1)[0].strip()


class PublishAuthorizer(Protocol):
    async def authorize(self, app: str, key: str, addr: str) -> str:
        """The public stream name for ``key``; raises :class:`PublishRefused`."""

    async def publish_done(self, app: str, key: str, name: str) -> None: ...

    async def close(self) -> None: ...


class StaticKeys:
    """Keys from configuration: ``{key: public name}``."""

    def __init__(self, keys: dict[str, str]) -> None:
        self.keys = dict(keys)

    async def authorize(self, app: str, key: str, addr: str) -> str:
        name = self.keys.get(key)
        if name is None:
            raise PublishRefused("unknown stream key")
        return name

    async def publish_done(self, app: str, key: str, name: str) -> None:
        return None

    async def close(self) -> None:
        return None


class HttpHooks:
    """Asks an HTTP endpoint (``POST <url>``, JSON, HMAC-signed) as nginx-rtmp's on_publish.

    Request body: ``{"call": "publish"|"publish_done", "app", "key", "addr", "node_id",
    "nonce"[, "name"]}``.  A 2xx answer to ``publish`` must carry ``{"name": "<public stream
    name>"}``; anything else (4xx, 5xx, timeout, unreachable) refuses the publisher.

    ``transport`` is an httpx transport to send through instead of the network (tests).
    """

    def __init__(self, url: str, secret: str, node_id: str, timeout: float = 5.0,
                 transport=None) -> None:
        import httpx

        self.url = url
        self.secret = secret
        self.node_id = node_id
        self._client = httpx.AsyncClient(timeout=timeout, transport=transport)

    async def _call(self, payload: dict):
        import httpx

        # A new nonce per call, retries included: the site accepts each one once.
        payload = {**payload, NONCE_FIELD: new_nonce()}
        body = json.dumps(payload, separators=(",", ":")).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self.secret, timestamp, body),
        }
        try:
            return await self._client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise PublishRefused(f"publish hook unreachable: {exc!r}") from exc

    async def authorize(self, app: str, key: str, addr: str) -> str:
        response = await self._call(
            {"call": "publish", "app": app, "key": key, "addr": addr, "node_id": self.node_id}
        )
        if response.status_code // 100 != 2:
            raise PublishRefused(f"publish hook answered {response.status_code}")
        try:
            name = response.json()["name"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PublishRefused("publish hook answer has no stream name") from exc
        if not isinstance(name, str) or not name or "/" in name:
            raise PublishRefused(f"publish hook gave an unusable stream name {name!r}")
        return name

    async def publish_done(self, app: str, key: str, name: str) -> None:
        try:
            response = await self._call(
                {"call": "publish_done", "app": app, "key": key, "name": name,
                 "node_id": self.node_id, "addr": ""}
            )
            if response.status_code // 100 != 2:
                log.warning("publish_done hook for %s answered %s", name, response.status_code)
        except PublishRefused as exc:
            log.warning("publish_done hook for %s failed: %s", name, exc)

    async def recording(self, call: str, app: str, key: str, info: dict) -> bool:
        """``recording_ready`` / ``recording_failed`` (engine/record.py): the site files the
        replay.  True when the site took it, or refused it for good (a 4xx other than 408 and
        429: sending it again would not change that); False when it is worth retrying
        (unreachable, a timeout, a 5xx: a site restarting).  Logged, never raised."""
        try:
            response = await self._call({"call": call, "app": app, "key": key,
                                         "node_id": self.node_id, "addr": "", **info})
        except PublishRefused as exc:
            log.warning("%s hook for %s failed: %s", call, info.get("name"), exc)
            return False
        status = response.status_code
        if status // 100 == 2:
            return True
        log.warning("%s hook for %s answered %s", call, info.get("name"), status)
        return status // 100 == 4 and status not in (408, 429)

    async def close(self) -> None:
        await self._client.aclose()
