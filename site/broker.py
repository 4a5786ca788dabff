"""Chat delivery broker: how every site process hears what is said in a room.

A *topic* (an opaque string; the chat uses ``room:<channel id>``) has local subscribers, one per
websocket.  Both brokers share the local fan-out: each process keeps topic -> set of subscriber
queues, and a message is put in every queue of its topic.  Queues are bounded, as every fast relay
bounds a viewer's queue: a subscriber whose queue is full is a *slow consumer* and is dropped (its
iterator ends and ``overflowed`` is set, so the websocket can tell the browser to reconnect and
resync) -- it never grows the server's memory and never blocks a publisher.

* :class:`InMemoryBroker` -- one process (``watchbuy serve``, the laptop default).
* :class:`RedisBroker` -- several site processes share each room through Redis pub/sub: one
  pub/sub connection per process (not one per websocket), one Redis channel per topic that has
  local subscribers, and a reader task that fans each message out locally.  A process's own
  messages come back to it through Redis, so every subscriber gets each message exactly once.

Messages are JSON-serialisable dicts.  They are encoded once per publish, and every subscriber
of a process receives the same decoded :class:`Message` -- a dict that also carries ``.json``,
the encoded text, so a websocket can forward it with ``send_text(message.json)`` instead of
encoding it again per viewer.  Treat delivered messages as read-only: they are shared.  The
in-memory broker encodes and decodes too, so that what works on a laptop works with Redis (a
``datetime`` fails in both; tuples arrive as lists in both; the publisher's dict is never shared).

Usage::

    broker = make_broker(settings.broker_url)
    await broker.start()
    async with broker.subscribe("room:7") as sub:   # with Redis: waits until the channel is live
        async for message in sub:
            await websocket.send_text(message.json)
    if sub.overflowed: ...                          # too slow: close, let the browser reconnect
    await broker.publish("room:7", {"type": "chat", "text": "hi"})
    await broker.close()
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import weakref
from collections import deque
from collections.abc import Awaitable, Generator
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from watchbuy.settings import ConfigError

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

log = logging.getLogger("watchbuy.site.broker")

DEFAULT_QUEUE_SIZE = 256

# Reconnect backoff for the Redis pub/sub connection: quick after a one-off drop, never a tight
# loop against a server that is down; jittered so a fleet of site processes does not stampede.
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 5.0
# A session shorter than this does not reset the backoff (a server that accepts and then
# immediately drops us would otherwise be hammered every _BACKOFF_MIN seconds).
_STABLE_SESSION = 5.0


class BrokerUnavailable(ConnectionError):
    """The broker's backend (Redis) cannot be reached; chat is down until it comes back."""


class Message(dict):
    """A delivered message: the published dict, plus ``json``, its encoded text.

    One instance is shared by every local subscriber of the topic, so do not mutate it.
    """

    __slots__ = ("json",)
    json: str


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
    return message


class _Sink:
    """One subscriber's bounded queue.  The broker holds sinks, never Subscriptions, so that a
    Subscription nobody references any more can be garbage-collected and unsubscribed."""

    __slots__ = ("buf", "maxsize", "waiter", "closed", "overflowed")

    def __init__(self, maxsize: int) -> None:
        # A deque plus one waiter future rather than asyncio.Queue: putting is an append and at
        # most one set_result, and ending the stream needs no free slot for a sentinel (a full
        # queue is exactly when a slow consumer must be ended).
        self.buf: deque[Message] = deque()
        self.maxsize = maxsize
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.overflowed = False

    def end(self) -> None:
        self.closed = True
        # Free the backlog now: a dropped consumer must not keep up to maxsize messages alive.
        self.buf.clear()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Done:
    """What Subscription.close() returns: awaiting it is allowed and finishes at once."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # makes this a generator function: `await` gets an iterator that is already done


_DONE = _Done()


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

    async def __anext__(self) -> Message:
        sink = self._sink
        while True:
            if sink.buf:
                return sink.buf.popleft()
            if sink.closed:
                raise StopAsyncIteration
            if sink.waiter is not None:
                raise RuntimeError("another task is already reading this subscription")
            waiter = sink.waiter = self._broker._loop.create_future()  # type: ignore[union-attr]
            try:
                await waiter
            finally:
                sink.waiter = None

    async def ready(self, timeout: float | None = None) -> None:
        """Wait until messages published from now on will reach this subscription.

        Raises :class:`BrokerUnavailable` when Redis does not confirm in time (default: the
        broker's ``ready_timeout``).  Immediate with the in-memory broker.
        """
        if not self._sink.closed:
            await self._broker._until_live(self.topic, timeout)

    def close(self) -> Awaitable[None]:
        """Unsubscribe now; the iterator ends.  Idempotent.

        It takes effect immediately; the result may be awaited (``await sub.close()``) for
        symmetry with :meth:`Broker.close`, but need not be.
        """
        if self._finalizer.detach() is not None:
            self._broker._discard(self.topic, self._sink)
        return _DONE

    async def __aenter__(self) -> Subscription:
        try:
            await self.ready()
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "overflowed" if self.overflowed else "closed" if self.closed else "open"
        return f"<Subscription {self.topic!r} {state}, {len(self._sink.buf)} queued>"


class Broker(Protocol):
    """Publish/subscribe of JSON-serialisable dicts on opaque string topics."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, topic: str, message: dict) -> None: ...

    def subscribe(self, topic: str, queue_size: int = DEFAULT_QUEUE_SIZE) -> Subscription: ...


class _FanoutBroker(Broker):
    """The local fan-out both brokers share: topic -> set of subscriber queues."""

    def __init__(self) -> None:
        self._topics: dict[str, set[_Sink]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"  # -> "running" -> "closed"

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
        for sinks in topics.values():
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
            sinks = self._topics[topic] = set()
            sinks.add(subscription._sink)
            self._topic_added(topic)
        else:
            sinks.add(subscription._sink)
        return subscription

    def local_subscribers(self, topic: str) -> int:
        """How many subscriptions to ``topic`` this process has (not other processes)."""
        return len(self._topics.get(topic, ()))

    def _discard(self, topic: str, sink: _Sink) -> None:
        sink.end()
        sinks = self._topics.get(topic)
        if sinks is None or sink not in sinks:
            return
        sinks.remove(sink)
        if not sinks:
            del self._topics[topic]
            self._topic_removed(topic)

    def _fan_out(self, topic: str, message: Message) -> None:
        sinks = self._topics.get(topic)
        if not sinks:
            return
        slow: list[_Sink] | None = None
        # The hot loop: an append and, for a consumer that is waiting, one set_result.
        for sink in sinks:
            buf = sink.buf
            if len(buf) < sink.maxsize:
                buf.append(message)
                waiter = sink.waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif slow is None:
                slow = [sink]
            else:
                slow.append(sink)
        if slow is not None:
            # Removed after the loop: the set must not change while it is being iterated.
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


class RedisBroker(_FanoutBroker):
    """Several site processes on one Redis: PUBLISH to ``prefix + topic``; one pub/sub
    connection per process subscribes to the channels of the topics it has subscribers for.

    ``start()`` fails fast (:class:`BrokerUnavailable`) when Redis cannot be reached.  Later
    drops are survived: the reader reconnects with backoff and re-subscribes every topic;
    messages published during the outage are lost (a warning is logged).  ``publish`` raises
    :class:`BrokerUnavailable` while Redis is unreachable.
    """

    def __init__(self, url: str, prefix: str = "watchbuy:", *, ready_timeout: float = 5.0,
                 ping_interval: float = 10.0, connect_timeout: float = 5.0) -> None:
        super().__init__()
        # Imported here: the laptop default (in-memory) should not pay for importing redis.
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        self.prefix = prefix
        self.ready_timeout = ready_timeout
        self.ping_interval = ping_interval
        self.connect_timeout = connect_timeout
        self._unavailable_errors = (RedisConnectionError, RedisTimeoutError, OSError)
        # Publishing: a small pool.  Two quick retries cover a pooled connection that went stale
        # (server restart, idle proxy), without keeping a chat message waiting for long.
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=5.0, socket_connect_timeout=connect_timeout,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        )
        # The pub/sub connection is made from its own pool's settings (auth, TLS, db from the
        # URL) but managed here, not by redis-py's PubSub, whose built-in reconnect-and-replay
        # would race with ours.  RESP2 so that pushed messages are plain replies; bytes, not
        # str, so channel names are looked up without decoding; no read timeout because it idles
        # between messages (the PING watchdog notices a dead peer instead).
        overrides: dict[str, Any] = {"protocol": 2, "decode_responses": False,
                                     "socket_timeout": None}
        self._sub_pool = aioredis.ConnectionPool.from_url(
            url, socket_connect_timeout=connect_timeout, socket_keepalive=True, **overrides)
        kwargs = self._sub_pool.connection_kwargs
        if any(kwargs.get(name) != value for name, value in overrides.items()):
            # The URL's query (?protocol=3, ...) overrode ours.  redis-py 8 then also set up
            # RESP3-only maintenance notifications, which a RESP2 connection refuses.
            kwargs.update(overrides)
            kwargs.pop("maint_notifications_pool_handler", None)
            kwargs.pop("maint_notifications_config", None)
        self._where = f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}" \
                      f"/{kwargs.get('db', 0)}"
        #: The server's id of the current pub/sub connection (CLIENT ID), for ops and tests.
        self.pubsub_client_id: int | None = None
        self._runner: asyncio.Task[None] | None = None
        self._connection: AbstractConnection | None = None  # the current pub/sub connection
        self._dirty = asyncio.Event()  # local topics changed: the control task re-syncs
        self._last_rx = 0.0
        # Per pub/sub connection (reset on reconnect):
        self._sent: set[str] = set()  # topics whose SUBSCRIBE was sent and not undone
        self._live: set[str] = set()  # ... and confirmed by Redis
        self._pending: dict[bytes, int] = {}  # channel -> (UN)SUBSCRIBE replies still due
        self._channels: dict[bytes, str] = {}  # channel -> topic, for the reader
        self._ready_waiters: dict[str, list[asyncio.Future[None]]] = {}

    # lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._begin()
        try:
            connection = await self._open()
        except BaseException as exc:
            self._state = "new"
            if isinstance(exc, Exception):
                raise BrokerUnavailable(
                    f"cannot reach Redis at {self._where}: {_reason(exc)}") from exc
            raise
        self._connection = connection
        self._runner = self._loop.create_task(self._run(connection),  # type: ignore[union-attr]
                                              name="watchbuy-broker-redis")

    async def close(self) -> None:
        if self._state == "closed":
            return
        self._end_all()
        self._wake_ready_waiters(None)
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except asyncio.CancelledError:
                pass
            self._runner = None
        if self._connection is not None:  # the runner was cancelled before it even started
            await self._connection.disconnect(nowait=True)
            self._connection = None
        # The pool's disconnect, not Redis.aclose(): same effect here (the client owns its pool),
        # and it exists in every redis-py 5.x.
        await self._client.connection_pool.disconnect()
        await self._sub_pool.disconnect()

    # publishing ----------------------------------------------------------------------------

    async def publish(self, topic: str, message: dict) -> None:
        """PUBLISH the message; subscribers here get it back through Redis, like everyone."""
        self._check_running()
        text = _encode(message)
        try:
            await self._client.publish(self.prefix + topic, text)
        except self._unavailable_errors as exc:
            raise BrokerUnavailable(f"cannot publish to Redis at {self._where}: "
                                    f"{_reason(exc)}") from exc

    # subscribing ---------------------------------------------------------------------------

    def _topic_added(self, topic: str) -> None:
        self._dirty.set()

    def _topic_removed(self, topic: str) -> None:
        self._dirty.set()

    async def _until_live(self, topic: str, timeout: float | None) -> None:
        if topic in self._live or self._state != "running":
            return
        waiter = self._loop.create_future()  # type: ignore[union-attr]
        waiters = self._ready_waiters.setdefault(topic, [])
        waiters.append(waiter)
        if timeout is None:
            timeout = self.ready_timeout
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise BrokerUnavailable(f"Redis at {self._where} did not confirm the subscription "
                                    f"to {topic!r} within {timeout:g} s") from None
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters and self._ready_waiters.get(topic) is waiters:
                del self._ready_waiters[topic]

    def _wake_ready_waiters(self, topic: str | None) -> None:
        if topic is None:
            groups = list(self._ready_waiters.values())
            self._ready_waiters.clear()
        else:
            groups = [self._ready_waiters.pop(topic, [])]
        for waiters in groups:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    # the pub/sub connection ----------------------------------------------------------------

    async def _open(self) -> AbstractConnection:
        from redis.exceptions import ResponseError

        connection = self._sub_pool.make_connection()
        try:
            # Bounded: the handshake's reads have no socket timeout on this connection.
            await asyncio.wait_for(connection.connect(), self.connect_timeout)
            try:
                await connection.send_command("CLIENT", "ID")
                self.pubsub_client_id = int(
                    await asyncio.wait_for(connection.read_response(), self.connect_timeout))
            except ResponseError:  # an ACL may forbid CLIENT; the id is only informative
                self.pubsub_client_id = None
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        return connection

    async def _run(self, connection: AbstractConnection | None) -> None:
        """The supervisor: serve a connection until it fails, then reconnect with backoff."""
        loop = asyncio.get_running_loop()
        delay = _BACKOFF_MIN
        lost_at: float | None = None
        while True:
            if connection is None:
                try:
                    connection = self._connection = await self._open()
                except Exception as exc:
                    log.debug("Redis pub/sub reconnect to %s failed: %s", self._where,
                              _reason(exc))
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, _BACKOFF_MAX)
                    continue
            if lost_at is not None:
                log.warning("Redis pub/sub at %s reconnected after %.1f s; re-subscribing %d "
                            "topic(s)", self._where, loop.time() - lost_at, len(self._topics))
            started = loop.time()
            try:
                await self._serve(connection)
            except Exception as exc:
                lost_at = loop.time()
                log.warning("Redis pub/sub connection to %s lost (%s); reconnecting -- chat "
                            "messages published until then are lost", self._where, _reason(exc))
            finally:
                self._reset_session()
                await connection.disconnect(nowait=True)
                self._connection = None
            connection = None
            if loop.time() - started >= _STABLE_SESSION:
                delay = _BACKOFF_MIN
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, _BACKOFF_MAX)

    async def _serve(self, connection: AbstractConnection) -> None:
        """Read and control one connection until either fails (raises) or we are cancelled."""
        self._last_rx = asyncio.get_running_loop().time()
        self._dirty.set()  # subscribe every topic that has local subscribers
        reader = asyncio.ensure_future(self._read(connection))
        control = asyncio.ensure_future(self._control(connection))
        try:
            done, _ = await asyncio.wait((reader, control), return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            control.cancel()
            await asyncio.gather(reader, control, return_exceptions=True)
        for task in done:
            task.result()  # raises the failure
        raise ConnectionError("pub/sub task ended")  # not reached: both loop forever

    def _reset_session(self) -> None:
        self._sent.clear()
        self._live.clear()
        self._pending.clear()
        self._channels.clear()

    async def _read(self, connection: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        channels = self._channels
        while True:
            reply = await connection.read_response()
            self._last_rx = loop.time()
            if type(reply) is not list:  # b"PONG" when not subscribed to anything
                continue
            kind = reply[0]
            if kind == b"message":
                topic = channels.get(reply[1])
                if topic is not None:  # None: unsubscribed since (a message already in flight)
                    self._deliver(topic, reply[2])
            elif kind == b"subscribe" or kind == b"unsubscribe":
                self._acknowledged(reply[1])
            # b"pong": the watchdog only needed _last_rx

    def _deliver(self, topic: str, data: bytes) -> None:
        try:
            message = _decode(data.decode())
        except UnicodeDecodeError:
            message = None
        if message is None:
            # Someone else published on our channel; never let it kill the reader.
            log.warning("ignoring a message on %r that is not a JSON object", topic)
            return
        self._fan_out(topic, message)

    def _acknowledged(self, channel: bytes) -> None:
        # Redis answers (UN)SUBSCRIBEs in order, one reply per channel; the channel is live once
        # every command sent for it has been answered and the last one was a SUBSCRIBE.
        due = self._pending.get(channel, 0) - 1
        if due > 0:
            self._pending[channel] = due
            return
        self._pending.pop(channel, None)
        topic = self._channels.get(channel)
        if topic is not None and topic in self._sent:
            self._live.add(topic)
            self._wake_ready_waiters(topic)

    async def _control(self, connection: AbstractConnection) -> None:
        """Send SUBSCRIBE/UNSUBSCRIBE as local topics come and go; PING to detect a dead peer."""
        loop = asyncio.get_running_loop()
        ping_due = loop.time() + self.ping_interval
        ping_sent: float | None = None
        while True:
            wait = ping_due - loop.time()
            if wait > 0 and not self._dirty.is_set():
                try:
                    await asyncio.wait_for(self._dirty.wait(), wait)
                except TimeoutError:
                    pass
            if self._dirty.is_set():
                self._dirty.clear()
                await self._sync_channels(connection)
            now = loop.time()
            if now >= ping_due:
                if ping_sent is not None and self._last_rx < ping_sent:
                    raise ConnectionError(f"no reply to PING within {self.ping_interval:g} s")
                await connection.send_command("PING")
                ping_sent = now
                ping_due = now + self.ping_interval

    async def _sync_channels(self, connection: AbstractConnection) -> None:
        # Diff wanted (topics with local subscribers) against sent, batching every change since
        # the last sync into one SUBSCRIBE and one UNSUBSCRIBE: a thousand viewers joining at once
        # cost one command.  State is updated before sending, so replies always find it.
        wanted, sent, pending = self._topics, self._sent, self._pending
        add = [topic for topic in wanted if topic not in sent]
        remove = [topic for topic in sent if topic not in wanted]
        if add:
            channels = []
            for topic in add:
                channel = (self.prefix + topic).encode()
                self._channels[channel] = topic
                sent.add(topic)
                pending[channel] = pending.get(channel, 0) + 1
                channels.append(channel)
            await connection.send_command("SUBSCRIBE", *channels)
        if remove:
            channels = []
            for topic in remove:
                channel = (self.prefix + topic).encode()
                self._channels.pop(channel, None)
                sent.discard(topic)
                self._live.discard(topic)
                pending[channel] = pending.get(channel, 0) + 1
                channels.append(channel)
            await connection.send_command("UNSUBSCRIBE", *channels)


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _redacted(url: str) -> str:
    # Broker URLs carry Redis passwords; an error message must not print them.
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            user = f"{parts.username}:" if parts.username else ":"
            return parts._replace(netloc=f"{user}***@{host}").geturl()
    except ValueError:
        pass
    return url


def make_broker(url: str | None, prefix: str = "watchbuy:") -> Broker:
    """The broker for ``WATCHBUY_BROKER_URL``: empty or ``memory://`` -> in-memory (one
    process); ``redis://`` or ``rediss://`` (TLS) -> Redis, its channels named ``prefix`` +
    topic (``WATCHBUY_BROKER_PREFIX``: deployments sharing one Redis stay apart).
    Raises :class:`ConfigError`."""
    if url is None or url.strip() in ("", "memory://"):
        return InMemoryBroker()
    url = url.strip()
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in ("redis", "rediss"):
        try:
            return RedisBroker(url, prefix=prefix)
        except ValueError as exc:  # redis-py's URL parsing: bad port, bad db, ...
            raise ConfigError(f"WATCHBUY_BROKER_URL: {exc} in {_redacted(url)!r}") from None
    raise ConfigError("WATCHBUY_BROKER_URL: expected empty, memory://, redis://host:6379/0 or "
                      f"rediss://..., got {_redacted(url)!r}")
