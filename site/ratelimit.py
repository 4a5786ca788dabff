"""Rate limits: at most ``count`` events per ``window`` seconds per key, as a sliding window.

Two implementations of one job, with the same ``claim`` API (one test suite runs over both):

* :class:`RateLimiter` -- in this process.  Enough with one site process, and for limits that
  are per process or per socket by nature (websocket frames, log lines); its ``allow`` is the
  synchronous form for those hot paths.
* :class:`RedisRateLimiter` -- shared by every site process through Redis, for limits that must
  hold however many processes a user's requests land on (the per-user chat rate with
  ``watchbuy site --workers N``).  One round trip per event: a Lua script keeps a sorted set of
  event times per key (trim, count, add), timed by the Redis server's clock so that processes
  on hosts with different clocks agree.

:func:`make_rate_limiter` picks the one a deployment needs from the broker URL: a Redis broker
means several processes may serve, so the limit is kept in that Redis.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Hashable
from typing import Protocol

from watchbuy.logs import LogLimiter
from watchbuy.site.config import is_redis_url

log = logging.getLogger("watchbuy.site.ratelimit")
# Redis trouble could log once per chat message: a line per 10 s at most.
limited_log = LogLimiter(log, interval=10.0)


class SharedLimit(Protocol):
    """What a per-user limit offers its callers, whichever implementation keeps it."""

    async def claim(self, key: Hashable) -> bool: ...

    async def close(self) -> None: ...


class RateLimiter:
    """At most ``count`` events per ``window`` seconds per key, in this process.

    A refused event is not counted (a user who keeps trying is let in again once the window has
    moved past their earlier events)."""

    def __init__(self, count: int, window: float) -> None:
        self.count = count
        self.window = window
        self._events: dict[Hashable, deque[float]] = {}
        # Keys whose events have all expired are swept once a window, so a limiter keyed by user
        # does not keep an entry for everyone who ever chatted.
        self._next_sweep = time.monotonic() + window

    def allow(self, key: Hashable) -> bool:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        events = self._events.get(key)
        if events is None:
            events = self._events[key] = deque()
        while events and now - events[0] > self.window:
            events.popleft()
        if len(events) >= self.count:
            return False
        events.append(now)
        return True

    async def claim(self, key: Hashable) -> bool:
        """:meth:`allow`, with the API of :class:`RedisRateLimiter`."""
        return self.allow(key)

    async def close(self) -> None:
        """Nothing to release; the API of :class:`RedisRateLimiter`."""

    def __len__(self) -> int:
        """Keys remembered now (bounded by the keys active within the last two windows)."""
        return len(self._events)

    def _sweep(self, now: float) -> None:
        self._events = {key: events for key, events in self._events.items()
                        if events and now - events[-1] <= self.window}
        self._next_sweep = now + self.window


# KEYS[1]: the key's sorted set; ARGV: count, window (ms), a member unique to this event.
# Milliseconds, because Lua 5.1 prints numbers with 14 significant digits: a time in
# microseconds would be cut when the trim bound is made into a string.
_SLIDING_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - window))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window + 1000)
return 1
"""


class RedisRateLimiter:
    """The same limit kept in Redis, shared by every process using the same ``url`` and
    ``prefix``: keys ``<prefix>ratelimit:<name>:<key>``, each expiring a second after its
    window.

    While Redis cannot be reached the limit falls back to this process's own
    :class:`RateLimiter` (with N processes a user may then get up to N times the rate) rather
    than refusing every message or letting every one through; one warning per 10 s says so.
    """

    def __init__(self, count: int, window: float, url: str, prefix: str = "watchbuy:",
                 name: str = "limit", timeout: float = 1.0) -> None:
        import redis.asyncio as aioredis

        self.count = count
        self.window = window
        self.name = name
        self._key_prefix = f"{prefix}ratelimit:{name}:"
        self._window_ms = max(1, math.ceil(window * 1000))
        # Short timeouts: a chat message waits on this; the fallback takes over when Redis is slow.
        self._client = aioredis.Redis.from_url(url, socket_timeout=timeout,
                                               socket_connect_timeout=timeout)
        self._script = self._client.register_script(_SLIDING_WINDOW)
        # Sorted-set members must be unique per event: this process's id and a counter.
        self._member_prefix = f"{os.getpid()}-{os.urandom(4).hex()}-"
        self._serial = itertools.count()
        self._fallback = RateLimiter(count, window)

    async def claim(self, key: Hashable) -> bool:
        """True when the event is within the limit (and counted), False when refused."""
        from redis.exceptions import RedisError

        member = f"{self._member_prefix}{next(self._serial)}"
        try:
            allowed = await self._script(keys=[f"{self._key_prefix}{key}"],
                                         args=[self.count, self._window_ms, member])
        except (RedisError, OSError) as exc:
            limited_log.warning(f"redis-{self.name}", "rate limit %r kept in this process "
                                "only: Redis unavailable (%s)", self.name,
                                str(exc) or type(exc).__name__)
            return self._fallback.allow(key)
        return bool(allowed)

    async def close(self) -> None:
        await self._client.aclose()


def make_rate_limiter(count: int, window: float, broker_url: str, prefix: str,
                      name: str) -> RateLimiter | RedisRateLimiter:
    """A limit shared by every site process when the broker is Redis (several processes may
    serve), else kept in this process."""
    if is_redis_url(broker_url):
        return RedisRateLimiter(count, window, broker_url.strip(), prefix, name)
    return RateLimiter(count, window)
