"""Hearts and viewer counts of the live rooms: aggregated per process, shared through Redis.

Thousands of heart taps must never become thousands of messages to every viewer, and a viewer
count must be right for everyone in a room however many site processes serve it.  One
:class:`RoomLive` per site process does both with one background task:

* **Hearts.**  A tap only adds to this process's pending count of its room.  Every
  ``hearts_interval`` the task hands its pending counts on: in memory (one process) it publishes
  ``{"type": "hearts", "count": n}`` itself; with Redis it adds them to the room's shared counter
  and tries to take the room's flush slot (``SET NX PX interval``).  The process that holds the
  slot takes the whole counter and publishes it, so a room gets at most one ``hearts`` event per
  interval across all processes (4 a second by default).  A process that missed the slot keeps
  the room marked and tries again next round: its hearts are in the counter already.
* **Viewers.**  Each process counts its room websockets per room.  With Redis it writes its own
  count into the room's hash (field: this process, value: count and expiry) and reads the sum
  of the unexpired fields, in one script timed by Redis's clock; a process that dies stops
  refreshing its field and drops out of the sum within ``3 × viewers_interval``.  A viewer gets
  the count on arrival (in ``hello`` and a ``viewers`` event), and everyone gets a ``viewers``
  event within ``viewers_interval`` of a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter

from watchbuy.logs import LogLimiter
from watchbuy.site.broker import Broker
from watchbuy.site.chat import publish_room_event
from watchbuy.site.config import SiteSettings, is_redis_url

log = logging.getLogger("watchbuy.site.roomlive")
throttled = LogLimiter(log, interval=10.0)

# KEYS[1] the room's heart counter, KEYS[2] its flush slot; ARGV[1] hearts to add, ARGV[2] the
# slot's length in ms.  Returns the hearts taken (the caller publishes them), or -1 when another
# process holds this interval's slot.
_HEARTS = """
if tonumber(ARGV[1]) > 0 then
  redis.call('INCRBY', KEYS[1], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], 60000)
end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[2]) then
  local n = tonumber(redis.call('GET', KEYS[1]) or '0')
  redis.call('DEL', KEYS[1])
  return n
end
return -1
"""

# KEYS[1] the room's viewer hash; ARGV[1] this process, ARGV[2] its sockets in the room,
# ARGV[3] how long its count stands without a refresh (ms).  Returns the room's total.
_VIEWERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. (now + tonumber(ARGV[3])))
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local total = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local value = all[i + 1]
  local sep = string.find(value, ':', 1, true)
  if tonumber(string.sub(value, sep + 1)) < now then
    redis.call('HDEL', KEYS[1], all[i])
  else
    total = total + tonumber(string.sub(value, 1, sep - 1))
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return total
"""


class RoomLive:
    """This process's hearts and viewer counts (see the module's docstring)."""

    def __init__(self, settings: SiteSettings, broker: Broker) -> None:
        self.settings = settings
        self.broker = broker
        self.pending_hearts: Counter[int] = Counter()  # room -> taps not yet handed on
        self.unflushed: set[int] = set()  # rooms whose hearts wait in Redis for the slot
        self.local_viewers: Counter[int] = Counter()  # room -> sockets open in this process
        self.changed: set[int] = set()  # rooms whose local count changed since the last round
        self.published: dict[int, int] = {}  # room -> the total this process last published
        self.member = f"{os.uname().nodename}:{os.getpid()}:{os.urandom(3).hex()}"
        # The broker's own prefix (as the hook nonces use it): deployments sharing a Redis, and
        # parallel test runs, keep their counters apart.
        self._prefix = getattr(broker, "prefix", settings.broker_prefix)
        self._redis = None
        self._hearts_script = self._viewers_script = None
        if is_redis_url(settings.broker_url):
            import redis.asyncio as aioredis

            # Short timeouts: a viewer's hello waits on the count; a slow Redis falls back to
            # this process's own count for that moment.
            self._redis = aioredis.Redis.from_url(settings.broker_url.strip(), socket_timeout=1.0,
                                                  socket_connect_timeout=1.0)
            self._hearts_script = self._redis.register_script(_HEARTS)
            self._viewers_script = self._redis.register_script(_VIEWERS)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task
        if self._redis is not None:
            # Leave every room's sum now rather than after the expiry.
            for channel_id in list(self.local_viewers):
                self.local_viewers[channel_id] = 0
                with contextlib.suppress(Exception):
                    await self._shared_total(channel_id)
            await self._redis.aclose()

    async def _run(self) -> None:
        hearts_every = self.settings.hearts_interval
        viewers_every = self.settings.viewers_interval
        loop = asyncio.get_running_loop()
        next_viewers = loop.time()
        while not self._stopping.is_set():
            try:
                await self.flush_hearts()
                if loop.time() >= next_viewers:
                    next_viewers = loop.time() + viewers_every
                    await self.publish_viewers()
            except Exception:
                log.exception("room hearts and viewer counts: a round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), hearts_every)

    # -- hearts ----------------------------------------------------------------------------

    def heart(self, channel_id: int, count: int) -> None:
        """Taps from one viewer; they reach the room with the next round's ``hearts`` event."""
        self.pending_hearts[channel_id] += count

    async def flush_hearts(self) -> None:
        pending, self.pending_hearts = self.pending_hearts, Counter()
        if self._redis is None:
            for channel_id, count in pending.items():
                await self._publish(channel_id, {"type": "hearts", "count": count})
            return
        from redis.exceptions import RedisError

        slot_ms = max(1, int(self.settings.hearts_interval * 1000))
        for channel_id in set(pending) | self.unflushed:
            base = f"{self._prefix}hearts:{channel_id}"
            try:
                taken = await self._hearts_script(keys=[base, base + ":slot"],
                                                  args=[pending.get(channel_id, 0), slot_ms])
            except (RedisError, OSError) as exc:
                # Hearts are decoration: lose this round's rather than pile them up.
                throttled.warning("hearts-redis", "hearts not shared: Redis unavailable (%s)",
                                  str(exc) or type(exc).__name__)
                continue
            if taken < 0:
                self.unflushed.add(channel_id)  # another process publishes this interval
                continue
            self.unflushed.discard(channel_id)
            if taken > 0:
                await self._publish(channel_id, {"type": "hearts", "count": int(taken)})

    # -- viewers ---------------------------------------------------------------------------

    async def join(self, channel_id: int) -> int:
        """Counts a room socket in; the room's viewer count with it."""
        self.local_viewers[channel_id] += 1
        self.changed.add(channel_id)
        return await self.total(channel_id)

    def leave(self, channel_id: int) -> None:
        self.local_viewers[channel_id] -= 1
        self.changed.add(channel_id)

    async def total(self, channel_id: int) -> int:
        """The room's viewers in every site process (this process's own when Redis fails)."""
        if self._redis is None:
            return self.local_viewers[channel_id]
        return await self._shared_total(channel_id)

    async def _shared_total(self, channel_id: int) -> int:
        from redis.exceptions import RedisError

        ttl_ms = max(1000, int(self.settings.viewers_interval * 3000))
        try:
            return int(await self._viewers_script(
                keys=[f"{self._prefix}viewers:{channel_id}"],
                args=[self.member, self.local_viewers[channel_id], ttl_ms]))
        except (RedisError, OSError) as exc:
            throttled.warning("viewers-redis", "viewer counts from this process only: Redis "
                              "unavailable (%s)", str(exc) or type(exc).__name__)
            return self.local_viewers[channel_id]

    async def publish_viewers(self) -> None:
        # With Redis every room with local sockets is refreshed each round (its field would
        # expire otherwise, and other processes' viewers come and go); in memory only the rooms
        # whose count changed.
        rooms = set(self.changed)
        if self._redis is not None:
            rooms |= set(self.local_viewers)
        self.changed.clear()
        for channel_id in rooms:
            total = await self.total(channel_id)
            if self.local_viewers[channel_id] <= 0:
                del self.local_viewers[channel_id]
            if self.published.get(channel_id) != total:
                self.published[channel_id] = total
                await self._publish(channel_id, {"type": "viewers", "count": total,
                                                 "coalesce": "viewers"})
            if channel_id not in self.local_viewers:
                self.published.pop(channel_id, None)  # nobody here hears it any more

    async def _publish(self, channel_id: int, event: dict) -> None:
        await publish_room_event(self.broker, channel_id, event)
