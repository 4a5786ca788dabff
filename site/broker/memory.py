"""Local delivery, which every site process runs: topic -> bounded subscriber queues.

Both brokers deliver through the same fan-out (:class:`_FanoutBroker`): each process keeps topic ->
set of subscriber queues (*sinks*), and a message is put in every queue of its topic -- or, for a
websocket that gave a frame writer (:meth:`Subscription.write_through`), written to its socket
in the loop's next round, with the topic's other messages of that round in one write (every
topic's rounds in one callback, which then rests as long as it took, up to ``ROUND_REST_MAX``).
A round is held to a viewer's bound too: states coalesce in it, and a round that reaches the
smallest viewer queue of its room is written at once (a flood goes out in bounded rounds).  Queues are
bounded, as every fast relay bounds a viewer's queue: a subscriber whose queue is full is a *slow
consumer* and is dropped (its iterator ends and ``overflowed`` is set, so the websocket can tell
the browser to reconnect and resync) -- it never grows the server's memory and never blocks a
publisher.

:class:`InMemoryBroker` is that fan-out with a direct ``publish``: one process (``watchbuy
serve``, the laptop default).  The Redis broker (:mod:`.redis`) is the same fan-out fed by a Redis
pub/sub reader.  The fan-out lives here, beside the sinks and :class:`Subscription`, rather than in
a module of its own, because the three are one mechanism that calls into each other's private
parts (``_sink``, ``_discard``, ``_until_live``); one module keeps that protocol in one file.

Messages are encoded once per publish (:func:`_encode`) and every subscriber of a process
receives the same decoded :class:`Message`.  The in-memory broker encodes and decodes too, so
that what works on a laptop works with Redis (a ``datetime`` fails in both; tuples arrive as lists
in both; the publisher's dict is never shared).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

# One logger for the whole package (both backends): ops filter on this name.
log = logging.getLogger("watchbuy.site.broker")

DEFAULT_QUEUE_SIZE = 256
# The longest the fan-out rests after its rounds (as long as they took, up to this), so that a
# round slowed down (a busy core) does not hold every room's next events back as long again.
# Not shorter: 5000 viewers take ~50 ms a round on a core of their own and more on a shared
# one, where a 50 ms cap left the chat path starved and cost a busy room 1.5x the CPU per
# delivery and 3x its p99 (bench/RESULTS.md "after the review fixes").  250 ms is the
# issue's p99 target; a round's size is bounded by each viewer's queue anyway.
ROUND_REST_MAX = 0.25


class Message(dict):
    """A delivered message: the published dict, plus ``json``, its encoded text.

    One instance is shared by every local subscriber of the topic, so do not mutate it.

    ``coalesce`` is the message's ``"coalesce"`` field when it is a string (e.g.
    ``"stock:7"``): a state that replaces the last one (a product's stock), not an event that
    must be seen (chat).  A subscriber's queue holds at most one message per coalesce key: a
    newer one takes the older one's place (the older one is dropped and counted), so a viewer
    that reads slowly gets the latest stock, never a backlog of stale ones.
    """

    __slots__ = ("json", "coalesce", "_frame")
    json: str
    coalesce: str | None

    @property
    def frame(self) -> bytes:
        """``json`` as one websocket text frame, built on first use and then shared by every
        viewer of this process (site/wsframes.py)."""
        frame = self._frame
        if frame is None:
            from watchbuy.site.wsframes import text_frame

            frame = self._frame = text_frame(self.json)
        return frame


class FrameWriterLike(Protocol):
    """What the fan-out needs of a socket it writes to (site/wsframes.FrameWriter)."""

    def ready(self) -> bool: ...

    def write(self, frame: bytes) -> bool: ...

    def send(self, frames: bytes) -> bool:
        """Write now when ``ready()``, in one call (the fan-out's step per viewer); False when
        nothing was written."""
        ...


class _Topic:
    """A topic's local subscribers: ``plain`` ones read their queue; ``direct`` ones gave a
    writer (:meth:`Subscription.write_through`) and are written in rounds (``round``: the
    messages waiting for the next one, None when none is pending; ``round_keys``: coalesce key
    -> the index of its message in ``round``, as a queue's slots).  ``joining``: plain sinks
    that gave a writer while a round was pending, made direct once it is written.  Iterating
    it gives every sink."""

    __slots__ = ("plain", "direct", "joining", "round", "round_keys", "round_cap")

    def __init__(self) -> None:
        self.plain: set[_Sink] = set()
        self.direct: set[_Sink] = set()
        self.joining: set[_Sink] = set()
        self.round: list[Message] | None = None
        self.round_keys: dict[str, int] = {}
        self.round_cap = 0  # the round is written at once when it holds this many messages

    def __len__(self) -> int:
        return len(self.plain) + len(self.direct)

    def __iter__(self) -> Iterator[_Sink]:
        return itertools.chain(self.plain, self.direct)

    def __contains__(self, sink: object) -> bool:
        return sink in self.plain or sink in self.direct

    def remove(self, sink: _Sink) -> None:
        self.plain.discard(sink)
        self.direct.discard(sink)
        self.joining.discard(sink)


class _Slot:
    """A queue entry for a coalescable message; the newest message of its key replaces
    ``message`` in place, so the entry keeps its position and the queue does not grow."""

    __slots__ = ("key", "message")

    def __init__(self, key: str, message: Message) -> None:
        self.key = key
        self.message = message


def _encode(message: dict) -> str:
    if not isinstance(message, dict):
        raise TypeError(f"a broker message is a dict, not {type(message).__name__}")
    # ensure_ascii (the default) keeps the text valid UTF-8 even when a client managed to send a
    # lone surrogate; allow_nan=False because browsers' JSON.parse rejects NaN and Infinity.
    return json.dumps(message, separators=(",", ":"), allow_nan=False)


def _decode(text: str) -> Message | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    message = Message(value)
    message.json = text
    message._frame = None
    key = value.get("coalesce")
    message.coalesce = key if isinstance(key, str) else None
    return message


class _Sink:
    """One subscriber's bounded queue.  The broker holds sinks, never Subscriptions, so that a
    Subscription nobody references any more can be garbage-collected and unsubscribed."""

    __slots__ = ("buf", "slots", "maxsize", "waiter", "closed", "overflowed", "writer", "send")

    def __init__(self, maxsize: int) -> None:
        # A deque plus one waiter future rather than asyncio.Queue: putting is an append and at
        # most one set_result, and ending the stream needs no free slot for a sentinel (a full
        # queue is exactly when a slow consumer must be ended).
        self.buf: deque[Message | _Slot] = deque()
        self.slots: dict[str, _Slot] = {}  # coalesce key -> its entry queued in buf
        self.maxsize = maxsize
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.overflowed = False
        # A FrameWriter (site/wsframes.py) when the subscriber asked the fan-out to write
        # frames to its socket itself while its queue is empty and the socket keeps up; ``send``
        # is its bound ``send`` (looked up once, not once per message).
        self.writer: FrameWriterLike | None = None
        self.send: Callable[[bytes], bool] | None = None

    def end(self) -> None:
        self.closed = True
        # Free the backlog now: a dropped consumer must not keep up to maxsize messages alive.
        self.buf.clear()
        self.slots.clear()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _release_abandoned(loop: asyncio.AbstractEventLoop, broker: _FanoutBroker, topic: str,
                       sink: _Sink) -> None:
    # Runs when a Subscription is garbage-collected without close().  GC can run anywhere --
    # in another thread, or in the middle of a fan-out loop over this very set -- so only
    # schedule the removal on the broker's loop.
    try:
        loop.call_soon_threadsafe(broker._discard, topic, sink)
    except RuntimeError:  # the loop is closed: nothing is left to unsubscribe from
        pass


class Subscription:
    """Messages of one topic for one consumer: ``async for message in sub``.

    ``async with broker.subscribe(topic) as sub`` also waits until the subscription is live
    (with Redis: until Redis has confirmed the channel), so nothing published afterwards is
    missed, and closes it on exit.  The iterator ends when the subscription is closed, when the
    broker closes, or when the consumer was too slow (then ``overflowed`` is True).
    """

    __slots__ = ("topic", "_broker", "_sink", "_finalizer", "__weakref__")

    def __init__(self, broker: _FanoutBroker, topic: str, queue_size: int) -> None:
        self.topic = topic
        self._broker = broker
        self._sink = _Sink(queue_size)
        assert broker._loop is not None
        self._finalizer = weakref.finalize(self, _release_abandoned, broker._loop, broker, topic,
                                           self._sink)
        self._finalizer.atexit = False

    @property
    def overflowed(self) -> bool:
        """True when the broker dropped this subscriber for not keeping up."""
        return self._sink.overflowed

    @property
    def closed(self) -> bool:
        return self._sink.closed

    def __aiter__(self) -> Subscription:
        return self

    def get_nowait(self) -> Message | None:
        """The next message if one has arrived, else None; never suspends (for a consumer
        that must act on what arrived before it answers, e.g. the page cache)."""
        sink = self._sink
        if not sink.buf:
            return None
        item = sink.buf.popleft()
        if type(item) is _Slot:
            del sink.slots[item.key]
            return item.message
        return item

    async def __anext__(self) -> Message:
        sink = self._sink
        while True:
            if sink.buf:
                return self.get_nowait()  # type: ignore[return-value]
            if sink.closed:
                raise StopAsyncIteration
            if sink.waiter is not None:
                raise RuntimeError("another task is already reading this subscription")
            waiter = sink.waiter = self._broker._loop.create_future()  # type: ignore[union-attr]
            try:
                await waiter
            finally:
                sink.waiter = None

    def write_through(self, writer: FrameWriterLike) -> None:
        """Let the fan-out write messages' frames to ``writer`` itself, in its one loop,
        whenever nothing is queued here and ``writer`` takes them (``send``); otherwise they are
        queued as before and this subscription's reader writes them (to the same writer, so the
        order holds).  The reader must not await between taking a message and writing it.

        The fan-out writes such subscribers in rounds: a message is written in the event loop's
        next round (``call_soon``; later while the fan-out rests after a long round), together
        with every other message of the topic published before that round came, as one write
        per viewer.  Called while a round is pending, it takes effect once that round is written
        (the round holds messages from before this subscription and ones already queued here):
        until then messages keep coming through the queue.  A writer whose ``send`` raises is
        not given rounds again: its messages are queued from then on."""
        sink = self._sink
        sink.writer = writer
        sink.send = writer.send
        self._broker._made_direct(self.topic, sink)

    async def ready(self, timeout: float | None = None) -> None:
        """Wait until messages published from now on will reach this subscription.

        Raises :class:`~watchbuy.site.broker.BrokerUnavailable` when Redis does not confirm in
        time (default: the broker's ``ready_timeout``).  Immediate with the in-memory broker.
        """
        if not self._sink.closed:
            await self._broker._until_live(self.topic, timeout)

    async def close(self) -> None:
        """Unsubscribe; the iterator ends.  Idempotent.

        A coroutine like :meth:`Broker.close`, so every ``close()`` of the package is awaited the
        same way.  It never suspends today; being async leaves room for a backend that must wait
        for its server to confirm.
        """
        self._release()

    def _release(self) -> None:
        # The synchronous core of close(), for __aenter__'s error path, which may be running a
        # cancellation and should not start awaiting anything.
        if self._finalizer.detach() is not None:
            self._broker._discard(self.topic, self._sink)

    async def __aenter__(self) -> Subscription:
        try:
            await self.ready()
        except BaseException:
            self._release()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "overflowed" if self.overflowed else "closed" if self.closed else "open"
        return f"<Subscription {self.topic!r} {state}, {len(self._sink.buf)} queued>"


class _FanoutBroker:
    """The local fan-out both brokers share: topic -> set of subscriber queues."""

    def __init__(self) -> None:
        self._topics: dict[str, _Topic] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"  # -> "running" -> "closed"
        # messages not delivered, by reason (site metrics: watchbuy_site_ws_dropped_total):
        # "coalesced" a queued state replaced by a newer one of its key, "overflow" a queued
        # message lost with a subscriber dropped for a full queue
        self.drops: dict[str, int] = {"coalesced": 0, "overflow": 0}
        # times delivery from other processes stopped (a lost Redis connection): whatever was
        # published until it was back never arrived (a cache kept by events must start over)
        self.interruptions = 0
        # Every topic's pending round, written by one callback (_write_rounds) that then rests
        # as long as it took: the fan-out's budget is the process's, whatever the rooms.
        self._due: dict[str, _Topic] = {}
        self._rounds: asyncio.Handle | None = None  # the callback, when scheduled
        self._rest_until = 0.0  # loop time before which the next callback may not run

    # lifecycle -----------------------------------------------------------------------------

    def _begin(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"broker already {self._state}")
        self._loop = asyncio.get_running_loop()
        self._state = "running"

    def _check_running(self) -> None:
        # Both brokers insist on start() so that code tested with the in-memory broker does not
        # break the day it runs against Redis.
        if self._state != "running":
            raise RuntimeError("broker not started" if self._state == "new" else "broker closed")

    def _end_all(self) -> None:
        self._state = "closed"
        topics, self._topics = self._topics, {}
        self._due.clear()
        if self._rounds is not None:
            self._rounds.cancel()
            self._rounds = None
        for sinks in topics.values():
            sinks.round = None
            for sink in sinks:
                sink.end()

    async def __aenter__(self) -> _FanoutBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # subscribers ---------------------------------------------------------------------------

    def subscribe(self, topic: str, queue_size: int = DEFAULT_QUEUE_SIZE) -> Subscription:
        """A new subscription to ``topic``; see :class:`Subscription`."""
        self._check_running()
        if not isinstance(topic, str):
            raise TypeError("a topic is a str")
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        subscription = Subscription(self, topic, queue_size)
        sinks = self._topics.get(topic)
        if sinks is None:
            sinks = self._topics[topic] = _Topic()
            sinks.plain.add(subscription._sink)
            self._topic_added(topic)
        else:
            sinks.plain.add(subscription._sink)
        return subscription

    def _made_direct(self, topic: str, sink: _Sink) -> None:
        # Subscription.write_through: from now on this sink is written in rounds.
        sinks = self._topics.get(topic)
        if sinks is None or sink not in sinks.plain:
            return
        if sinks.round is not None:
            # A round is pending: it holds messages published before this sink subscribed and
            # ones already in its queue.  Written to it as well, they would arrive twice and
            # out of order; so it stays plain (its reader writes what it is given) until that
            # round is written, and is direct from the next one, which holds only newer ones.
            sinks.joining.add(sink)
        else:
            sinks.plain.remove(sink)
            sinks.direct.add(sink)

    def local_subscribers(self, topic: str) -> int:
        """How many subscriptions to ``topic`` this process has (not other processes)."""
        return len(self._topics.get(topic, ()))

    def _discard(self, topic: str, sink: _Sink) -> None:
        sink.end()
        sinks = self._topics.get(topic)
        if sinks is None or sink not in sinks:
            return
        sinks.remove(sink)
        if not len(sinks):
            del self._topics[topic]
            # its pending round has nobody to go to (if the topic comes back, it is a new one)
            sinks.round = None
            if self._due.get(topic) is sinks:
                del self._due[topic]
            self._topic_removed(topic)

    def _fan_out(self, topic: str, message: Message) -> None:
        sinks = self._topics.get(topic)
        if sinks is None:
            return
        if sinks.direct:
            # Websockets are written in the loop's next round (or after the fan-out's rest,
            # _write_rounds), every message that came until then in one write per viewer: a
            # burst (a sale's stock, sold-out and chat; a batch read from Redis) costs each
            # viewer one write() instead of one per message.
            pending = sinks.round
            key = message.coalesce
            if pending is None:
                sinks.round = [message]
                if key is not None:
                    sinks.round_keys[key] = 0
                # the smallest direct viewer's queue: a round that fills it is written at once
                # (below), never made longer than a viewer that keeps up may be handed
                sinks.round_cap = min(sink.maxsize for sink in sinks.direct)
                self._due[topic] = sinks
                if self._rounds is None:  # else the callback already scheduled writes it
                    loop: asyncio.AbstractEventLoop = self._loop  # type: ignore[assignment]
                    rest = self._rest_until - loop.time()
                    if rest > 0:
                        self._rounds = loop.call_later(rest, self._write_rounds)
                    else:
                        self._rounds = loop.call_soon(self._write_rounds)
            elif key is None:
                pending.append(message)
                if len(pending) >= sinks.round_cap:
                    # a flood (a chat storm, a batch read from Redis) during the rest: written
                    # now rather than made longer than the viewers' queues, which would drop
                    # every viewer of the room though each keeps up
                    self._due.pop(topic, None)
                    self._write_round(topic, sinks)
            else:
                # A state (stock, counts) replaces the round's older one of its key in place,
                # as in a viewer's queue: a busy round carries the latest stock once, not every
                # step of it.  Each direct viewer misses the older one: counted per viewer.
                index = sinks.round_keys.get(key)
                if index is None:
                    sinks.round_keys[key] = len(pending)
                    pending.append(message)
                else:
                    pending[index] = message
                    self.drops["coalesced"] += len(sinks.direct)
        if sinks.plain:
            # Queue readers (the page and session caches act on what arrived before they
            # answer: get_nowait) get it now.
            self._enqueue(topic, sinks.plain, (message,))

    def _write_rounds(self) -> None:
        """Every due round, then a rest as long as they took (at most ``ROUND_REST_MAX``).

        A round blocks the loop (5000 viewers: ~50 ms).  The rest after it lets the chat, joins
        and pages move on, and what they publish meanwhile goes out together in the next
        round (one write per viewer): in a storm of events the fan-out takes about half the
        process, however many rooms are busy -- their rounds share one callback and one rest,
        not one each back to back.  A lone event, after a quiet while, goes at once."""
        self._rounds = None
        due, self._due = self._due, {}
        began = time.monotonic()
        for topic, sinks in due.items():
            try:
                self._write_round(topic, sinks)
            except Exception:  # one room's failure must not hold back the others' rounds
                log.exception("fan-out round of %r failed", topic)
        took = time.monotonic() - began
        self._rest_until = self._loop.time() + min(took, ROUND_REST_MAX)  # type: ignore[union-attr]

    def _write_round(self, topic: str, sinks: _Topic) -> None:
        messages, sinks.round = sinks.round, None
        sinks.round_keys.clear()
        if self._topics.get(topic) is not sinks or not messages:
            return  # closed, or everyone left (their sinks were ended) since it was scheduled
        try:
            self._write_to_direct(topic, sinks, messages)
        finally:
            # Those who gave a writer while this round was pending: what it held was theirs
            # through their queue (or from before they came); the next round is theirs.
            if sinks.joining:
                for sink in sinks.joining:
                    if sink in sinks.plain:
                        sinks.plain.remove(sink)
                        sinks.direct.add(sink)
                sinks.joining.clear()

    def _write_to_direct(self, topic: str, sinks: _Topic, messages: list[Message]) -> None:
        count = len(messages)
        frames = messages[0].frame if count == 1 else \
            b"".join([message.frame for message in messages])
        behind: list[_Sink] | None = None
        # The hot loop: for a socket that keeps up and has nothing queued, one write of the
        # frames built once for everyone (no task wakes up, no lookup but the sink's own).  A
        # round longer than a viewer's queue is not written to it either: it takes the queue's
        # path, which drops the viewer (counted) as it would a backlog that long, so a round
        # never hands a socket more than its bound.
        failed: list[_Sink] | None = None
        error: Exception | None = None
        for sink in sinks.direct:
            try:  # free when nothing raises (Python 3.11's zero-cost exceptions)
                if sink.buf or sink.maxsize < count or not sink.send(frames):  # type: ignore[misc]
                    if behind is None:
                        behind = [sink]
                    else:
                        behind.append(sink)
            except Exception as exc:  # one viewer's writer must not cost the others the round
                error = exc
                if failed is None:
                    failed = [sink]
                else:
                    failed.append(sink)
        if failed is not None:
            # Not written by the fan-out again (whatever broke may break again): back to their
            # queues, which their own readers write through their own path; this round too.
            for sink in failed:
                sinks.direct.discard(sink)
                sinks.plain.add(sink)
            behind = failed if behind is None else behind + failed
            log.error("fan-out: writing %d viewer(s) of %r raised; they are on their queues now",
                      len(failed), topic, exc_info=error)
        if behind is not None:  # queued for their own readers, which write them once drained
            self._enqueue(topic, behind, messages)

    def _enqueue(self, topic: str, sinks: Iterable[_Sink], messages: Sequence[Message]) -> None:
        """Put ``messages`` in each sink's bounded queue: a coalescable one replaces its key's
        queued entry; a sink whose queue is full is dropped (a slow consumer)."""
        slow: list[_Sink] | None = None
        coalesced = overflow = 0
        for sink in sinks:
            buf, slots, maxsize = sink.buf, sink.slots, sink.maxsize
            for index, message in enumerate(messages):
                key = message.coalesce
                if key is not None:
                    slot = slots.get(key)
                    if slot is not None:  # an older state of the same thing still queued
                        slot.message = message
                        coalesced += 1
                        continue
                if len(buf) >= maxsize:
                    # its backlog and what of this batch it did not take
                    overflow += len(buf) + len(messages) - index
                    if slow is None:
                        slow = [sink]
                    else:
                        slow.append(sink)
                    break
                if key is not None:
                    slot = slots[key] = _Slot(key, message)
                    buf.append(slot)
                else:
                    buf.append(message)
            waiter = sink.waiter
            if buf and waiter is not None and not waiter.done():
                waiter.set_result(None)
        if coalesced:
            self.drops["coalesced"] += coalesced
        if slow is not None:
            # Removed after the loop: the set must not change while it is being iterated.
            self.drops["overflow"] += overflow
            for sink in slow:
                sink.overflowed = True
                self._discard(topic, sink)
            log.info("dropped %d slow subscriber(s) of %r (queue full)", len(slow), topic)

    # hooks for RedisBroker: the first local subscriber of a topic arrived / the last one left
    def _topic_added(self, topic: str) -> None:
        pass

    def _topic_removed(self, topic: str) -> None:
        pass

    async def _until_live(self, topic: str, timeout: float | None) -> None:
        pass


class InMemoryBroker(_FanoutBroker):
    """One process: publish fans out to the local subscribers directly."""

    async def start(self) -> None:
        self._begin()

    async def close(self) -> None:
        self._end_all()

    async def publish(self, topic: str, message: dict) -> None:
        self._check_running()
        # Encoded (always: a message Redis would refuse fails here too) and decoded like the
        # Redis broker does; see the module docstring.
        text = _encode(message)
        if topic in self._topics:
            decoded = _decode(text)
            assert decoded is not None
            self._fan_out(topic, decoded)


