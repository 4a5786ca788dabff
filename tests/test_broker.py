"""The chat delivery broker: both brokers' contract, then Redis as several site processes see it.

The Redis tests use the real server at WATCHBUY_TEST_REDIS_URL (default redis://127.0.0.1:6379/0)
and a fresh channel prefix per test, so parallel runs do not hear each other.  Without Redis they
are skipped loudly -- except in CI (CI=true), where they are mandatory.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import logging
import subprocess
import sys
import textwrap
import time
import uuid
import warnings

import pytest
import redis.asyncio as aioredis
from server_helpers import IN_CI, REDIS_URL, redis_problem

from watchbuy.settings import ConfigError
from watchbuy.site.broker import (
    BrokerUnavailable,
    InMemoryBroker,
    Message,
    RedisBroker,
    Subscription,
    make_broker,
)


@pytest.fixture
def redis_url() -> str:
    problem = redis_problem()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"Redis is mandatory in CI but {REDIS_URL} does not answer: {problem}")
        message = (f"NO REDIS at {REDIS_URL} ({problem}): the Redis broker tests are SKIPPED; "
                   "start redis-server or set WATCHBUY_TEST_REDIS_URL")
        warnings.warn(message, stacklevel=1)  # shows in the summary even without -rs
        pytest.skip(message)
    return REDIS_URL


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"


@pytest.fixture
async def redis_brokers(redis_url: str, prefix: str):
    """A factory of started RedisBrokers on one prefix: each one a site process."""
    brokers: list[RedisBroker] = []

    async def make() -> RedisBroker:
        broker = RedisBroker(redis_url, prefix, ping_interval=1.0)
        await broker.start()
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        await broker.close()


@pytest.fixture
async def plain_redis(redis_url: str):
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.connection_pool.disconnect()  # Redis.aclose() is newer than redis 5.0.0


@pytest.fixture(params=["memory", "redis"])
async def broker(request: pytest.FixtureRequest, prefix: str):
    if request.param == "memory":
        instance = InMemoryBroker()
    else:
        # getfixturevalue: only the redis half needs (or skips for want of) a server
        instance = RedisBroker(request.getfixturevalue("redis_url"), prefix)
    async with instance:
        yield instance


async def next_message(sub: Subscription, timeout: float = 2.0) -> Message:
    return await asyncio.wait_for(anext(sub), timeout)


async def written(broker, topic: str = "room:1") -> None:
    """Until the fan-out's round for ``topic`` has run: the next loop round, or later when the
    last round was long (it rests as long as that one took)."""
    async with asyncio.timeout(2):
        await asyncio.sleep(0)
        while (sinks := broker._topics.get(topic)) is not None and sinks.round is not None:
            await asyncio.sleep(0.001)


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


# the contract, both brokers ---------------------------------------------------------------


async def test_publish_and_receive_in_order(broker) -> None:
    async with broker.subscribe("room:1") as sub:
        for i in range(50):
            await broker.publish("room:1", {"type": "chat", "i": i, "text": "hé ✓"})
        for i in range(50):
            message = await next_message(sub)
            assert message == {"type": "chat", "i": i, "text": "hé ✓"}
            assert isinstance(message, dict)
            # The encoded text rides along, so a websocket need not encode it again.
            assert message.json == f'{{"type":"chat","i":{i},"text":"h\\u00e9 \\u2713"}}'


class SocketEnd:
    """The writing end of a websocket as the fan-out sees it (site/wsframes.FrameWriter's
    interface): ``ready`` is whether its transport would take a frame now.  What it is given is
    parsed as RFC 6455 frames by the websockets library."""

    def __init__(self) -> None:
        self.is_ready = True
        self.data = bytearray()
        self.writes = 0

    def ready(self) -> bool:
        return self.is_ready

    def write(self, frame: bytes) -> bool:
        self.data += frame
        self.writes += 1
        return True

    def send(self, frames: bytes) -> bool:
        return self.ready() and self.write(frames)

    def texts(self) -> list[str]:
        from websockets.frames import Frame, Opcode
        from websockets.streams import StreamReader

        reader = StreamReader()
        reader.feed_data(bytes(self.data))
        texts = []
        while reader.buffer:
            parser = Frame.parse(reader.read_exact, mask=False)
            with pytest.raises(StopIteration) as done:
                next(parser)
            frame = done.value.value
            assert frame.opcode is Opcode.TEXT and frame.fin and not frame.rsv1
            texts.append(frame.data.decode())
        return texts


async def test_write_through_writes_frames_while_the_socket_keeps_up_then_queues(broker) -> None:
    async with broker.subscribe("room:1") as sub:
        end = SocketEnd()
        sub.write_through(end)
        other = broker.subscribe("room:1")  # a plain subscriber beside it gets the same
        await other.ready()
        for i in range(3):
            await broker.publish("room:1", {"type": "chat", "i": i, "text": "hé" * 100 * i})
            assert (await next_message(other))["i"] == i
            await written(broker)  # the fan-out's next round
        # written by the fan-out itself, once per message, in order: nothing queued
        assert [json.loads(t)["i"] for t in end.texts()] == [0, 1, 2] and end.writes == 3
        assert json.loads(end.texts()[2])["text"] == "hé" * 200
        assert not sub._sink.buf
        # the socket cannot take more: queued, and what follows stays behind it, in order
        end.is_ready = False
        await broker.publish("room:1", {"type": "chat", "i": 3})
        assert (await next_message(other))["i"] == 3
        await written(broker)
        end.is_ready = True
        await broker.publish("room:1", {"type": "chat", "i": 4})
        assert (await next_message(other))["i"] == 4
        await written(broker)
        assert [json.loads(t)["i"] for t in end.texts()] == [0, 1, 2]
        assert [(await next_message(sub))["i"] for _ in range(2)] == [3, 4]
        # drained: the fan-out writes again
        await broker.publish("room:1", {"type": "chat", "i": 5})
        assert (await next_message(other))["i"] == 5
        await written(broker)
        assert [json.loads(t)["i"] for t in end.texts()] == [0, 1, 2, 5]
        await other.close()


async def test_a_burst_reaches_a_socket_in_one_write_and_queue_readers_at_once() -> None:
    """Messages published before the fan-out's next round are written to each websocket as one
    write (one system call per viewer, not one per message), in order; a queue reader (the page
    and session caches, which act on what arrived before they answer) has each one as soon as
    publish returns."""
    async with InMemoryBroker() as broker:
        ends = [SocketEnd() for _ in range(3)]
        subs = [broker.subscribe("room:1") for _ in ends]
        for sub, end in zip(subs, ends, strict=True):
            sub.write_through(end)
        reader = broker.subscribe("room:1")
        for i in range(5):
            await broker.publish("room:1", {"type": "chat", "i": i})
            assert reader.get_nowait()["i"] == i
        assert all(end.writes == 0 for end in ends)  # not yet: the round comes after
        await written(broker)
        for end in ends:
            assert end.writes == 1
            assert [json.loads(t)["i"] for t in end.texts()] == [0, 1, 2, 3, 4]
        # a socket that cannot take the round gets the whole round queued, in order; the
        # round coalesces: its two stock states leave one entry, in the first one's place
        ends[0].is_ready = False
        await broker.publish("room:1", {"type": "stock", "stock": 2, "coalesce": "stock:1"})
        await broker.publish("room:1", {"type": "chat", "i": 5})
        await broker.publish("room:1", {"type": "stock", "stock": 1, "coalesce": "stock:1"})
        await written(broker)
        assert ends[0].writes == 1 and ends[1].writes == ends[2].writes == 2
        assert [dict(await next_message(subs[0])) for _ in range(2)] == [
            {"type": "stock", "stock": 1, "coalesce": "stock:1"}, {"type": "chat", "i": 5}]
        # in the round, for each of the three sockets, and in the reader's queue (which had
        # not read them yet)
        assert broker.drops == {"coalesced": 4, "overflow": 0}
        # a round for a topic everyone left meanwhile writes nothing and fails nothing
        await broker.publish("room:1", {"type": "chat", "i": 6})
        sinks = broker._topics["room:1"]
        for sub in [*subs, reader]:
            await sub.close()
        assert "room:1" not in broker._topics
        async with asyncio.timeout(2):
            while sinks.round is not None:  # the round ran (and found nobody)
                await asyncio.sleep(0.001)
        assert ends[1].writes == 2


async def test_what_is_published_while_a_round_rests_goes_out_in_the_next_one() -> None:
    """After a long round the next one rests (as long as that one took): events published
    meanwhile, by other tasks in other loop rounds, reach each viewer in one write."""
    async with InMemoryBroker() as broker:
        end = SocketEnd()
        sub = broker.subscribe("room:1")
        sub.write_through(end)
        loop = asyncio.get_running_loop()
        # as after a round of a crowd's worth of writes (made long here: a loaded machine
        # must not end the rest before the three loop rounds below)
        broker._rest_until = loop.time() + 0.5
        for i in range(3):
            await broker.publish("room:1", {"type": "chat", "i": i})
            await asyncio.sleep(0)
        assert end.writes == 0
        await written(broker)
        assert end.writes == 1 and [json.loads(t)["i"] for t in end.texts()] == [0, 1, 2]
        await sub.close()


async def test_a_viewer_that_joins_while_a_round_is_pending_gets_each_message_once() -> None:
    """A websocket subscribes (a plain queue while it reads the history), messages arrive, then
    its _forward gives the writer while the room's round is still waiting: what it had queued is
    its own to write, and the pending round -- published partly before it subscribed, partly
    already in its queue -- must not be written to it as well (tests/rv dup.py)."""
    async with InMemoryBroker() as broker:
        crowd_end = SocketEnd()
        crowd = broker.subscribe("room:1")
        crowd.write_through(crowd_end)
        loop = asyncio.get_running_loop()
        # a busy room: the round after this publish waits (long here, so a loaded machine does
        # not run it before the newcomer switches over)
        broker._rest_until = loop.time() + 0.5
        await broker.publish("room:1", {"type": "chat", "i": 0})  # before the newcomer came
        newcomer = broker.subscribe("room:1")
        await broker.publish("room:1", {"type": "chat", "i": 1})  # in its join window
        end = SocketEnd()
        # as chat._forward does: the writer, then the queue drained with no await between
        newcomer.write_through(end)
        while (message := newcomer.get_nowait()) is not None:
            end.write(message.frame)
        await written(broker)
        assert [json.loads(t)["i"] for t in crowd_end.texts()] == [0, 1]
        assert [json.loads(t)["i"] for t in end.texts()] == [1]
        # from the next round on the fan-out writes it like everyone else, in order
        await broker.publish("room:1", {"type": "chat", "i": 2})
        await written(broker)
        assert [json.loads(t)["i"] for t in end.texts()] == [1, 2]
        assert newcomer.get_nowait() is None and crowd_end.writes == 2
        assert newcomer._sink in broker._topics["room:1"].direct


async def test_a_round_coalesces_states_and_holds_no_more_than_a_viewers_queue() -> None:
    """A pending round keeps one entry per coalesce key (the newest state, in the first one's
    place), as a viewer's queue does; and it never grows longer than the smallest viewer's
    queue: a flood (tests/rv flood.py: 10 stock states and 5000 chat messages in one rest) is
    written in rounds of at most that many, so viewers that keep up get every message, in
    order, and none is dropped; a viewer that cannot keep up takes its queue's path and is
    dropped (counted) without holding up the others."""
    async with InMemoryBroker() as broker:
        small_end, roomy_end = SocketEnd(), SocketEnd()
        small = broker.subscribe("room:1", queue_size=8)
        small.write_through(small_end)
        roomy = broker.subscribe("room:1", queue_size=64)
        roomy.write_through(roomy_end)
        broker._rest_until = asyncio.get_running_loop().time() + 0.5  # a busy room: it rests
        for stock_left in range(10, 7, -1):
            await broker.publish("room:1", {"type": "stock", "stock": stock_left,
                                            "coalesce": "stock:1"})
            await broker.publish("room:1", {"type": "chat", "i": stock_left})
        await broker.publish("room:1", {"type": "stock", "stock": 5, "coalesce": "stock:2"})
        assert len(broker._topics["room:1"].round) == 5  # 3 chats, one state per product
        await written(broker)
        for end in (small_end, roomy_end):
            assert end.writes == 1
            assert [json.loads(t) for t in end.texts()] == [
                {"type": "stock", "stock": 8, "coalesce": "stock:1"}, {"type": "chat", "i": 10},
                {"type": "chat", "i": 9}, {"type": "chat", "i": 8},
                {"type": "stock", "stock": 5, "coalesce": "stock:2"}]
        assert broker.drops == {"coalesced": 4, "overflow": 0}  # two states, for two viewers
        # the flood, during a rest: written as it comes, 8 messages at a time at most
        broker._rest_until = asyncio.get_running_loop().time() + 0.5
        for i in range(5000):
            await broker.publish("room:1", {"type": "chat", "i": i, "text": "x" * 200})
        await written(broker)
        assert not small.overflowed and not roomy.overflowed
        for end in (small_end, roomy_end):
            chats = [json.loads(t)["i"] for t in end.texts()[5:]]
            assert chats == list(range(5000))
            assert end.writes == 1 + 5000 // 8
        assert broker.drops == {"coalesced": 4, "overflow": 0}
        # a viewer whose socket stops taking frames is dropped once its queue fills; the other
        # still gets everything
        roomy_end.is_ready = False
        for i in range(100):
            await broker.publish("room:1", {"type": "chat", "i": 5000 + i})
        await written(broker)
        assert roomy.overflowed and not small.overflowed
        assert [json.loads(t)["i"] for t in small_end.texts()[-100:]] == list(range(5000, 5100))
        assert broker.drops["overflow"] > 0
        assert broker.local_subscribers("room:1") == 1
        await small.close()


class HoldingSocketEnd(SocketEnd):
    """A socket end whose write holds the loop for ``hold`` seconds, as a round to thousands
    of viewers does; ``written_at``: the loop's time when each write was done."""

    def __init__(self, hold: float = 0.0) -> None:
        super().__init__()
        self.hold = hold
        self.written_at: list[float] = []

    def send(self, frames: bytes) -> bool:
        time.sleep(self.hold)
        self.written_at.append(asyncio.get_running_loop().time())
        return super().send(frames)


async def test_busy_rooms_share_one_rest_and_it_is_capped() -> None:
    """The rest after a round is the process's: after one room's long round, another room's
    round waits as well (their rounds do not run back to back, each room resting on its own),
    and rounds due together are written in one go.  The rest is capped: a very long round
    does not make the next one wait as long (bigger rounds, longer rests, bigger rounds)."""
    from watchbuy.site.broker.memory import ROUND_REST_MAX

    async with InMemoryBroker() as broker:
        loop = asyncio.get_running_loop()
        hold = 0.03  # under the cap
        busy, quiet = HoldingSocketEnd(hold), HoldingSocketEnd()
        subs = [broker.subscribe("room:a"), broker.subscribe("room:b")]
        for sub, end in zip(subs, (busy, quiet), strict=True):
            sub.write_through(end)
        await broker.publish("room:a", {"i": 0})
        await written(broker, "room:a")
        assert busy.writes == 1
        await broker.publish("room:b", {"i": 0})
        await written(broker, "room:b")
        # room b had been quiet, yet its round came only after room a's round's rest (at least
        # as long as that round held the loop; the loop's clock may run a tick early)
        assert quiet.written_at[0] >= busy.written_at[0] + hold - 0.002
        # both rooms due during a rest: written by the same callback, one after the other
        await broker.publish("room:a", {"i": 1})
        await broker.publish("room:b", {"i": 1})
        assert broker._topics["room:b"].round is not None
        await written(broker, "room:a")
        assert broker._topics["room:b"].round is None and quiet.writes == 2
        # a round longer than the cap rests the cap, not as long as it took
        busy.hold = ROUND_REST_MAX + 0.05
        await broker.publish("room:a", {"i": 2})
        await written(broker, "room:a")
        assert busy.writes == 3
        assert broker._rest_until - loop.time() <= ROUND_REST_MAX


class BrokenSocketEnd(SocketEnd):
    """A socket end whose ``send`` raises (a bug or a transport in a state nobody expected);
    its ``write``, which the viewer's own reader uses, works."""

    def send(self, frames: bytes) -> bool:
        raise RuntimeError("transport in an unexpected state")


async def test_a_viewer_whose_write_raises_does_not_cost_the_others_their_round(caplog) -> None:
    """The round goes on to every other viewer; the one that raised is moved to its queue (its
    reader writes through its own path from then on), nothing lost, and it is logged."""
    async with InMemoryBroker() as broker:
        ends = [SocketEnd(), BrokenSocketEnd(), SocketEnd(), SocketEnd()]
        subs = [broker.subscribe("room:1") for _ in ends]
        for sub, end in zip(subs, ends, strict=True):
            sub.write_through(end)
        with caplog.at_level(logging.ERROR, logger="watchbuy.site.broker"):
            await broker.publish("room:1", {"type": "chat", "i": 0})
            await written(broker)
            await broker.publish("room:1", {"type": "chat", "i": 1})
            await written(broker)
        for end in (ends[0], *ends[2:]):
            assert [json.loads(t)["i"] for t in end.texts()] == [0, 1]
        broken = subs[1]
        assert [broken.get_nowait()["i"] for _ in range(2)] == [0, 1]
        assert broken.get_nowait() is None and not broken.overflowed
        assert broken._sink in broker._topics["room:1"].plain
        assert any("transport in an unexpected state" in record.exc_text
                   for record in caplog.records if record.exc_text)


async def test_a_burst_a_slow_socket_cannot_hold_ends_it_and_counts_the_lost() -> None:
    async with InMemoryBroker() as broker:
        end = SocketEnd()
        end.is_ready = False
        sub = broker.subscribe("room:1", queue_size=4)
        sub.write_through(end)
        for i in range(3):
            await broker.publish("room:1", {"type": "chat", "i": i})
        await written(broker)
        assert len(sub._sink.buf) == 3 and not sub.overflowed
        for i in range(3, 6):
            await broker.publish("room:1", {"type": "chat", "i": i})
        await written(broker)
        # 4 held, then full: the viewer is dropped, its backlog (4) and the 2 it did not take
        assert sub.overflowed and broker.local_subscribers("room:1") == 0
        assert broker.drops == {"coalesced": 0, "overflow": 6}
        with pytest.raises(StopAsyncIteration):
            await next_message(sub)


async def test_topics_are_isolated(broker) -> None:
    async with broker.subscribe("room:a") as a, broker.subscribe("room:b") as b:
        await broker.publish("room:a", {"n": "a1"})
        await broker.publish("room:b", {"n": "b1"})
        await broker.publish("room:c", {"n": "c1"})  # nobody listens: no error
        await broker.publish("room:a", {"n": "a2"})
        assert [await next_message(a), await next_message(a)] == [{"n": "a1"}, {"n": "a2"}]
        assert await next_message(b) == {"n": "b1"}
        await broker.publish("room:b", {"n": "b2"})
        assert await next_message(b) == {"n": "b2"}  # not a1/a2/c1 in between


async def test_close_unsubscribes(broker) -> None:
    keep = broker.subscribe("room:1")
    await keep.ready()
    # close(): the iterator ends; idempotent
    sub = broker.subscribe("room:1")
    assert broker.local_subscribers("room:1") == 2
    await sub.close()
    await sub.close()
    assert broker.local_subscribers("room:1") == 1
    with pytest.raises(StopAsyncIteration):
        await next_message(sub)
    # leaving the context
    async with broker.subscribe("room:1"):
        assert broker.local_subscribers("room:1") == 2
    assert broker.local_subscribers("room:1") == 1
    # a subscription dropped without close(): unsubscribed once it is garbage
    abandoned = broker.subscribe("room:1")
    assert broker.local_subscribers("room:1") == 2
    del abandoned
    gc.collect()
    await asyncio.sleep(0)  # the removal is scheduled on the loop, never done inside GC
    assert broker.local_subscribers("room:1") == 1
    await keep.close()
    assert broker.local_subscribers("room:1") == 0


async def test_slow_consumer_is_dropped_others_still_receive(broker, caplog) -> None:
    caplog.set_level(logging.INFO, "watchbuy.site.broker")
    async with broker.subscribe("room:1") as fast, \
            broker.subscribe("room:1", queue_size=4) as slow:
        # Neither reads while 10 messages arrive: 10 fit the fast queue, not the slow one.
        for i in range(10):
            await broker.publish("room:1", {"i": i})
        assert [(await next_message(fast))["i"] for _ in range(10)] == list(range(10))
        assert slow.overflowed
        assert [m async for m in slow] == []  # ended, its backlog freed
        assert broker.local_subscribers("room:1") == 1
        await broker.publish("room:1", {"i": 10})
        assert await next_message(fast) == {"i": 10}
        assert not fast.overflowed
    assert "dropped 1 slow subscriber" in caplog.text


async def test_a_thousand_subscribers_each_receive(broker) -> None:
    subs = [broker.subscribe("room:big") for _ in range(1000)]
    await subs[0].ready()  # one Redis channel for all of them
    await broker.publish("room:big", {"type": "pinned", "product": 42})
    received = [await next_message(sub) for sub in subs]
    assert all(message == {"type": "pinned", "product": 42} for message in received)
    # Encoded and decoded once per process, whatever the number of subscribers: all 1000 got
    # the very same Message, carrying the one JSON text a websocket forwards as is.
    assert len({id(message) for message in received}) == 1
    assert json.loads(received[0].json) == {"type": "pinned", "product": 42}
    for sub in subs:
        await sub.close()
    assert broker.local_subscribers("room:big") == 0


async def test_lifecycle_and_bad_input(broker) -> None:
    sub = broker.subscribe("room:1")
    await sub.ready()
    with pytest.raises(TypeError):
        await broker.publish("room:1", ["not", "a", "dict"])
    with pytest.raises(TypeError):
        await broker.publish("room:1", {"at": object()})
    with pytest.raises(ValueError):
        broker.subscribe("room:1", queue_size=0)
    await broker.close()
    with pytest.raises(StopAsyncIteration):  # closing the broker ends every subscription
        await next_message(sub)
    with pytest.raises(RuntimeError, match="closed"):
        await broker.publish("room:1", {})
    await broker.close()  # idempotent


async def test_not_started() -> None:
    broker = InMemoryBroker()
    with pytest.raises(RuntimeError, match="not started"):
        broker.subscribe("room:1")
    with pytest.raises(RuntimeError, match="not started"):
        await broker.publish("room:1", {})


# Redis: several site processes -------------------------------------------------------------


async def test_two_processes_each_message_exactly_once(redis_brokers) -> None:
    one, two = await redis_brokers(), await redis_brokers()
    async with one.subscribe("room:1") as one_a, one.subscribe("room:1") as one_b, \
            two.subscribe("room:1") as two_a:
        await one.publish("room:1", {"n": 1})
        await two.publish("room:1", {"n": 2})
        await one.publish("room:1", {"n": "end"})
        for sub in (one_a, one_b, two_a):
            # Exactly once: a duplicate (local delivery plus Redis) would come before "end".
            assert [await next_message(sub) for _ in range(3)] == \
                [{"n": 1}, {"n": 2}, {"n": "end"}]


async def test_last_local_unsubscribe_unsubscribes_the_channel(redis_brokers, plain_redis,
                                                               prefix) -> None:
    one, two = await redis_brokers(), await redis_brokers()
    channel = f"{prefix}room:1"

    async def numsub() -> int:
        return (await plain_redis.pubsub_numsub(channel))[0][1]

    first = one.subscribe("room:1")
    second = one.subscribe("room:1")
    other = two.subscribe("room:1")
    await first.ready()
    await other.ready()
    assert await numsub() == 2  # one connection per process, not one per subscriber
    await first.close()
    await asyncio.sleep(0.1)
    assert await numsub() == 2  # `second` still listens in process one
    await second.close()
    await until(lambda: _equals(numsub(), 1))
    await other.close()
    await until(lambda: _equals(numsub(), 0))
    assert await plain_redis.pubsub_channels(f"{prefix}*") == []
    # and subscribing again works
    async with one.subscribe("room:1") as again:
        assert await numsub() == 1
        await two.publish("room:1", {"back": True})
        assert await next_message(again) == {"back": True}


async def _equals(awaitable, expected) -> bool:
    return await awaitable == expected


async def test_reconnects_after_the_server_kills_the_connection(redis_brokers, plain_redis,
                                                                caplog) -> None:
    caplog.set_level(logging.WARNING, "watchbuy.site.broker")
    one, two = await redis_brokers(), await redis_brokers()
    async with one.subscribe("room:1") as sub, one.subscribe("room:2") as sub2:
        await one.publish("room:1", {"n": "before"})
        assert await next_message(sub) == {"n": "before"}
        old_id = one.pubsub_client_id
        assert old_id is not None
        # TYPE pubsub as asked, narrowed to this broker's connection so other runs are spared
        killed = await plain_redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub",
                                                   "ID", str(old_id))
        assert killed == 1

        async def reconnected() -> bool:
            return one.pubsub_client_id not in (None, old_id)

        await until(reconnected)
        await sub.ready()  # live again once Redis confirms the re-subscription
        await sub2.ready()
        await two.publish("room:1", {"n": "after"})
        await one.publish("room:2", {"n": "after2"})
        assert await next_message(sub) == {"n": "after"}
        assert await next_message(sub2) == {"n": "after2"}
        assert not sub.closed
    assert "connection to" in caplog.text and "lost" in caplog.text
    assert "reconnected" in caplog.text


async def test_a_foreign_non_json_message_does_not_stop_the_reader(redis_brokers, plain_redis,
                                                                   prefix, caplog) -> None:
    one = await redis_brokers()
    async with one.subscribe("room:1") as sub:
        await plain_redis.publish(f"{prefix}room:1", b"\xffnot json")
        await plain_redis.publish(f"{prefix}room:1", b"[1, 2]")
        await one.publish("room:1", {"ok": True})
        assert await next_message(sub) == {"ok": True}
    assert "not a JSON object" in caplog.text


async def test_redis_start_fails_fast_when_unreachable() -> None:
    broker = RedisBroker("redis://127.0.0.1:1/0", connect_timeout=1.0)
    with pytest.raises(BrokerUnavailable, match="cannot reach Redis at 127.0.0.1:1/0"):
        await broker.start()
    await broker.close()


# make_broker --------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [None, "", "  ", "memory://"])
def test_make_broker_memory(url) -> None:
    assert isinstance(make_broker(url), InMemoryBroker)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "redis://:secret@redis.internal",
                                 "rediss://user:secret@redis.example.com:6380/2"])
def test_make_broker_redis(url) -> None:
    broker = make_broker(url)  # no connection yet: start() connects
    assert isinstance(broker, RedisBroker)
    assert broker.prefix == "watchbuy:"


@pytest.mark.parametrize("url", ["http://example.com", "memory://elsewhere", "redis",
                                 "localhost:6379", "nats://x:4222", "redis://host:notaport",
                                 "redis+sentinel://:hunter2@host"])
def test_make_broker_rejects(url) -> None:
    with pytest.raises(ConfigError) as caught:
        make_broker(url)
    text = str(caught.value)
    assert text.startswith("WATCHBUY_BROKER_URL: ")
    assert "\n" not in text
    assert "hunter2" not in text  # never print a password


# the package layout ---------------------------------------------------------------------------


async def test_every_close_is_a_coroutine(broker) -> None:
    # Plainly async: no close() that returns an already-finished awaitable or None by turns.
    sub = broker.subscribe("room:1")
    closing = sub.close()
    assert inspect.iscoroutine(closing)
    await closing
    assert sub.closed and broker.local_subscribers("room:1") == 0
    assert inspect.iscoroutinefunction(type(broker).close)


def test_backend_module_named_redis_does_not_shadow_the_library() -> None:
    # A fresh interpreter: the in-memory path loads neither the Redis backend nor redis-py; the
    # backend module, imported first, still gets the real library for its `import redis...`.
    script = textwrap.dedent("""
        import sys
        from watchbuy.site.broker import make_broker
        make_broker("")
        assert "watchbuy.site.broker.redis" not in sys.modules
        assert "redis" not in sys.modules, "the in-memory broker loaded redis-py"
        from watchbuy.site.broker.redis import RedisBroker
        from watchbuy.site.broker import RedisBroker as exported
        assert exported is RedisBroker
        broker = RedisBroker("redis://127.0.0.1:6379/0")  # runs the backend's redis imports
        import redis, redis.asyncio
        import watchbuy.site.broker.redis as backend
        assert redis is not backend and redis.__name__ == "redis", redis.__file__
        assert hasattr(redis, "Redis") and hasattr(redis, "__version__"), redis.__file__
        assert isinstance(broker._client, redis.asyncio.Redis)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
