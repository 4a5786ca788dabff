"""Endpoints for machines: the media engine's publish hooks, the ingest choice for hosts.

An engine hook call is refused unless it is signed with the hook secret, its timestamp is within
the window (``WATCHBUY_HOOK_MAX_AGE`` old, ``WATCHBUY_HOOK_MAX_FUTURE`` ahead) and its nonce was
not seen before.  Used nonces are kept for as long as their call could pass the time check:

* with a Redis broker (``WATCHBUY_BROKER_URL=redis://...``, which several site processes need
  anyway to share rooms) in Redis, ``SET NX EX``: atomic, shared by every process, expires by
  itself -- a replay sent to another process is refused as well;
* otherwise in this process, a bounded set (``WATCHBUY_HOOK_NONCE_CAPACITY``): without Redis
  there is one site process.

Not in the database: that would need a schema migration and a pruning job for a table that
only ever holds a few minutes of rows, and Redis is already where processes share state.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchbuy.db import queries
from watchbuy.engine.hooks import (
    NONCE,
    NONCE_FIELD,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    check_signature,
)
from watchbuy.logs import LogLimiter
from watchbuy.site import replays
from watchbuy.site.broker import RedisBroker
from watchbuy.site.chat import publish_room_event
from watchbuy.site.media import hls_url
from watchbuy.site.shows import on_publish, on_publish_done
from watchbuy.site.state import state
from watchbuy.site.web import require_host

log = logging.getLogger("watchbuy.site.hooks")

# Refused calls come from outside: one warning per this many seconds at most, so a flood of
# forged calls cannot fill the log (the next line says how many were not logged).
REFUSAL_LOG_INTERVAL = 10.0


class NonceStoreError(Exception):
    """The replay check cannot be made now (Redis unreachable, or the in-process store full):
    the call is refused, since letting it through could let a replay through."""


class MemoryNonces:
    """Nonces seen by this process in the last ``ttl`` seconds, at most ``capacity`` at once."""

    def __init__(self, ttl: float, capacity: int) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self._seen: set[str] = set()
        # Every nonce gets the same ttl, so the order of arrival is the order of expiry.
        self._expiry: deque[tuple[float, str]] = deque()

    def __len__(self) -> int:
        return len(self._seen)

    async def claim(self, nonce: str) -> bool:
        """True the first time ``nonce`` is seen within ``ttl``; False for a replay."""
        now = time.monotonic()
        expiry, seen = self._expiry, self._seen
        while expiry and expiry[0][0] <= now:
            seen.discard(expiry.popleft()[1])
        if nonce in seen:
            return False
        if len(seen) >= self.capacity:
            # Forgetting a nonce early would let its call be replayed: refuse instead.  Only
            # signed calls get here, so this takes a leaked secret or a runaway engine.
            raise NonceStoreError(
                f"{len(seen)} hook nonces in the last {self.ttl:g} s: "
                "WATCHBUY_HOOK_NONCE_CAPACITY reached")
        seen.add(nonce)
        expiry.append((now + self.ttl, nonce))
        return True


class RedisNonces:
    """Nonces shared by every site process through Redis (``SET key 1 NX EX ttl``).

    A connection per call: hook calls are a few per stream (publish, publish_done) and only
    signed ones get here, so a pool living with the app is not worth tying to its lifespan.
    """

    def __init__(self, url: str, prefix: str, ttl: float, timeout: float = 2.0) -> None:
        self.url = url
        self.prefix = prefix
        self.ttl = max(1, math.ceil(ttl))
        self.timeout = timeout

    async def claim(self, nonce: str) -> bool:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        try:
            async with aioredis.Redis.from_url(
                self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
            ) as client:
                return bool(await client.set(f"{self.prefix}hook-nonce:{nonce}", b"1",
                                             nx=True, ex=self.ttl))
        except (RedisError, OSError) as exc:
            raise NonceStoreError(f"Redis: {str(exc) or type(exc).__name__}") from None


class HookGuard:
    """This process's replay check and refusal log (made when the app starts)."""

    def __init__(self, settings, broker) -> None:
        ttl = settings.hook_max_age + settings.hook_max_future
        if isinstance(broker, RedisBroker):
            self.nonces: MemoryNonces | RedisNonces = RedisNonces(
                settings.broker_url, broker.prefix, ttl)
        else:
            self.nonces = MemoryNonces(ttl, settings.hook_nonce_capacity)
        self.refusals = LogLimiter(log, REFUSAL_LOG_INTERVAL)


def _refuse(guard: HookGuard, request: Request, status: int, error: str) -> JSONResponse:
    guard.refusals.warning("refused", "refused an engine hook call from %s: %s",
                           request.client.host if request.client else "?", error)
    return JSONResponse({"error": error}, status_code=status)


async def rtmp_hook(request: Request):
    """on_publish / on_publish_done from a media node (HMAC-signed, see engine/hooks.py)."""
    site = state(request)
    settings = site["settings"]
    guard = site["hook_guard"]
    body = await request.body()
    problem = check_signature(
        settings.hook_secret, request.headers.get(TIMESTAMP_HEADER, ""), body,
        request.headers.get(SIGNATURE_HEADER, ""),
        max_age=settings.hook_max_age, max_future=settings.hook_max_future)
    if problem:  # bad signature, stale timestamp, timestamp in the future
        return _refuse(guard, request, 401, problem)
    try:
        call = json.loads(body)
        kind, key, node_id = call["call"], str(call["key"]), str(call.get("node_id") or "")
    except (ValueError, KeyError, TypeError):
        return _refuse(guard, request, 400, "malformed hook call")
    nonce = call.get(NONCE_FIELD)
    if not isinstance(nonce, str) or not NONCE.fullmatch(nonce):
        return _refuse(guard, request, 400, "hook call without a nonce")
    try:
        fresh = await guard.nonces.claim(nonce)
    except NonceStoreError as exc:
        guard.refusals.warning("refused",
                               "cannot check engine hook calls for replays, refusing them: %s",
                               exc)
        return JSONResponse({"error": "replay check unavailable"}, status_code=503)
    if not fresh:
        return _refuse(guard, request, 409, "replayed hook call")
    db = site["db"]
    channel = await queries.channel_by_key(db, key)
    if channel is None and kind in ("publish_done", "recording_ready", "recording_failed") \
            and call.get("name"):
        # The host may have regenerated the key while live: the stream that ends still carries
        # the old key, and its room must not stay "live" forever.  The call is signed, and the
        # engine reports only names that publish granted.
        channel = await queries.channel_by_slug(db, str(call["name"]))
    if channel is None:
        return JSONResponse({"error": "unknown stream key"}, status_code=403)
    if kind == "publish":
        await on_publish(site, channel, node_id)  # the channel goes live and its show starts
        play_url = await site["media"].play_url(node_id, channel["slug"])
        await publish_room_event(site["broker"], channel["id"], {
            "type": "live", "play_url": play_url, "hls_url": hls_url(play_url)})
        log.info("room %s is live on node %s", channel["slug"], node_id)
        return JSONResponse({"name": channel["slug"]})
    if kind == "publish_done":
        await on_publish_done(site, channel)  # offline now; the show ends after the grace
        await publish_room_event(site["broker"], channel["id"], {"type": "offline"})
        log.info("room %s went offline", channel["slug"])
        return JSONResponse({"ok": True})
    if kind in ("recording_ready", "recording_failed"):
        return await replays.recording_hook(site, channel, call)  # a replay (site/replays.py)
    return JSONResponse({"error": f"unknown call {kind!r}"}, status_code=400)


async def ingest(request: Request):
    """``{node_id, rtmp_url, play_base}``: where this host should point OBS now."""
    require_host(request)
    try:
        return JSONResponse(await state(request)["media"].ingest())
    except Exception as exc:
        return JSONResponse({"error": f"no media node can take a stream now: {exc}"},
                            status_code=503)


routes = [
    Route("/hooks/rtmp", rtmp_hook, methods=["POST"]),
    Route("/api/ingest", ingest),
]
