"""Values kept in one site process for as long as a broker topic says they still hold.

The page cache (kept pages, site/pagecache.py), the visitor cache (a shopper's own bits of the
room page, same module) and the session cache (site/security.py) all keep what they read for a
few seconds and drop it the moment an event on their broker topic says it changed, in every
process.  :class:`FollowedCache` is what they share:

* one background task follows the topic (subscribes, applies each event, resubscribes after a
  pause when the subscription ends);
* nothing is kept while that subscription is not live (Redis down, or its connection lost: the
  broker resubscribes by itself and counts it in ``interruptions``, and what was published
  meanwhile never arrived, so everything kept goes);
* a value is kept only when the subscription was live before it was read and no event about
  its *scope* arrived while it was being read: call :meth:`mark` before reading, pass the mark
  to :meth:`put`.  An event that arrives after the put drops the value it applies to.  This
  holds because every event is published after its write has committed: a value read after
  the event reads the new state;
* :meth:`get` first applies what has arrived on the subscription but its task has not read
  yet (an event this very process published a moment ago counts before the next answer).

A subclass says what an event means in :meth:`_apply` (which scopes :meth:`changed`, or
:meth:`forget` everything).  Each value has one scope (a room, a session, a shopper) and any
number of values may share one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from watchbuy.logs import LogLimiter

if TYPE_CHECKING:
    from watchbuy.site.broker import Broker, Subscription

log = logging.getLogger("watchbuy.site.followed")
limited_log = LogLimiter(log, interval=60.0)

RESUBSCRIBE_DELAY = 1.0  # seconds before following the topic again after it broke
# A cache's subscription queue.  Redis delivers what is buffered on the pub/sub connection
# without yielding to the loop, so a burst of events lands in the queue before the follower
# runs; a full queue ends the subscription and everything kept goes for RESUBSCRIBE_DELAY.
# The chat's 256 per viewer is for sockets that may really be slow; a cache's events cost
# microseconds to apply, and 4096 small messages are a few hundred KB at most.
FOLLOW_QUEUE_SIZE = 4096


@dataclass(slots=True)
class _Entry:
    scope: Hashable
    value: Any
    expires: float


class FollowedCache:
    """Values by key, at most ``max_entries`` (the oldest put goes first), each for at most
    ``seconds`` (0: nothing is kept and the topic is not followed), dropped by the events on
    ``topic``.  ``what`` names the cache in its log lines ("page cache")."""

    def __init__(self, broker: Broker, topic: str, seconds: float, max_entries: int,
                 what: str) -> None:
        self.broker = broker
        self.topic = topic
        self.seconds = seconds
        self.max_entries = max_entries
        self.what = what
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._keys: dict[Hashable, set[Hashable]] = {}  # scope → the keys kept under it
        # A counter of everything that decides whether a value may be kept: each event, the
        # subscription going live.  A read notes it first (mark()); put() then knows whether
        # anything happened to the value's scope since.
        self._seq = 0
        self._changed_at: dict[Hashable, int] = {}  # scope → seq of its last change
        self._live_at: int | None = None  # seq when the subscription went live; None: down
        self._sub: Subscription | None = None  # the topic while it is live
        self._interruptions = 0  # the broker's count when the subscription was last live
        self._follower: asyncio.Task | None = None
        self._closed = False  # closed (the lifespan's end): a late request starts no follower
        self._relive: asyncio.Task | None = None
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    async def start(self) -> None:
        """Follows the topic (in the background) when anything is kept at all."""
        self.follow()

    def follow(self) -> None:
        """:meth:`start` for a caller that cannot await (a cache made on first use); does
        nothing once following."""
        if self.enabled and self._follower is None and not self._closed:
            self._follower = asyncio.get_running_loop().create_task(
                self._follow(), name=f"{self.what}-follow")

    @property
    def live(self) -> bool:
        """Whether values may be kept now (the subscription is live)."""
        return self._live_at is not None

    def get(self, key: Hashable) -> Any:
        """The kept value, or None."""
        if not self._entries:  # nothing to answer from: what arrived waits for the next put
            self.misses += 1
            return None
        self._catch_up()
        entry = self._entries.get(key)
        if entry is None or entry.expires <= time.monotonic() or not self._holds(entry.value):
            if entry is not None:
                self._remove(key)
            self.misses += 1
            return None
        self.hits += 1
        return entry.value

    def mark(self) -> int:
        """Call before reading what a value holds; pass the result to :meth:`put`."""
        return self._seq

    def put(self, key: Hashable, scope: Hashable, value: Any, mark: int) -> bool:
        """Keeps ``value`` unless the subscription was not live or an event changed ``scope``
        since ``mark``; True when kept."""
        self._catch_up()
        if (self._live_at is None or self._live_at > mark
                or self._changed_at.get(scope, -1) > mark):
            return False
        self._store(key, scope, value)
        return True

    def _store(self, key: Hashable, scope: Hashable, value: Any) -> None:
        """Keeps ``value``, :meth:`put`'s checks done (an event's own news, from
        :meth:`_apply`, which must not catch up again from inside the catching up)."""
        if key in self._entries:
            self._remove(key)
        self._entries[key] = _Entry(scope, value, time.monotonic() + self.seconds)
        self._keys.setdefault(scope, set()).add(key)
        while len(self._entries) > self.max_entries:
            self._remove(next(iter(self._entries)))

    def changed(self, *scopes: Hashable) -> None:
        """What is kept under ``scopes`` no longer holds: it goes, and so does what is being
        read for them now (its put is refused)."""
        self._seq += 1
        if len(self._changed_at) >= 10 * self.max_entries:
            # bounded: forget old changes, and refuse every read that started before now
            self._changed_at.clear()
            self._live_at = self._seq if self._live_at is not None else None
        for scope in scopes:
            self._changed_at[scope] = self._seq
            for key in self._keys.pop(scope, ()):
                del self._entries[key]

    def forget(self) -> None:
        """Nothing kept holds any more (and nothing being read now is kept)."""
        self._seq += 1
        if self._live_at is not None:
            self._live_at = self._seq
        self._changed_at.clear()
        self._entries.clear()
        self._keys.clear()

    def _holds(self, value: Any) -> bool:
        """Whether a kept value may still be answered (besides its time being up)."""
        return True

    def _apply(self, message: dict) -> None:
        """What one event on the topic changes (calls :meth:`changed` or :meth:`forget`)."""
        raise NotImplementedError

    def _remove(self, key: Hashable) -> None:
        entry = self._entries.pop(key)
        keys = self._keys.get(entry.scope)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys[entry.scope]

    def _catch_up(self) -> None:
        """Applies what arrived but the follower has not read yet, and notices a lost
        connection: Redis dropped our subscription (and resubscribes by itself), so events
        published meanwhile never arrived: everything kept goes, and values are kept again
        only once the subscription is live again."""
        sub = self._sub
        if sub is None:
            return
        if self.broker.interruptions != self._interruptions:
            self._interruptions = self.broker.interruptions
            self._down()
            limited_log.warning(f"{self.what}-interrupted", "%s: events were interrupted; "
                                "everything kept dropped", self.what)
        if self._live_at is None:
            if self._relive is None or self._relive.done():
                self._relive = asyncio.get_running_loop().create_task(self._until_live(sub))
            return
        while (message := sub.get_nowait()) is not None:
            self._apply(message)

    def _down(self) -> None:
        self._seq += 1
        self._live_at = None
        self._changed_at.clear()
        self._entries.clear()
        self._keys.clear()

    async def _until_live(self, sub: Subscription) -> None:
        try:
            await sub.ready()
        except Exception:  # still down: the next get() or put() tries again
            return
        if self._sub is sub and self._live_at is None:
            self._interruptions = self.broker.interruptions
            self._seq += 1
            self._live_at = self._seq

    def _forget_all(self) -> None:
        self._sub = None
        self._down()

    async def _follow(self) -> None:
        while True:
            try:
                async with self.broker.subscribe(self.topic, FOLLOW_QUEUE_SIZE) as sub:
                    self._interruptions = self.broker.interruptions
                    self._seq += 1
                    self._live_at = self._seq
                    self._sub = sub
                    async for message in sub:
                        self._apply(message)
                    self._sub = None
                    if sub.overflowed:
                        limited_log.warning(f"{self.what}-overflow", "%s: fell behind the "
                                            "events; everything kept dropped", self.what)
            except asyncio.CancelledError:
                self._forget_all()
                raise
            except Exception as exc:  # Redis down: nothing is kept until it is back
                limited_log.warning(f"{self.what}-follow", "%s: not following %r, nothing "
                                    "kept meanwhile: %s", self.what, self.topic, exc)
            # Whatever ended the subscription, events may have been missed meanwhile.
            self._forget_all()
            await asyncio.sleep(RESUBSCRIBE_DELAY)

    async def close(self) -> None:
        self._closed = True
        relive, self._relive = self._relive, None
        if relive is not None:
            relive.cancel()
            await asyncio.gather(relive, return_exceptions=True)
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        self._forget_all()
