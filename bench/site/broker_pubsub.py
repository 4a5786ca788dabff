"""``python -m bench.site.broker_pubsub``: the Redis broker's receive path, hand-written pub/sub
client vs redis-py's own ``redis.asyncio`` PubSub, on the same workload in one run.

Issue 12 asks whether :class:`watchbuy.site.broker.redis.RedisBroker` should read Redis pub/sub
through redis-py's ``PubSub`` instead of its own connection handling.  This measures the part
that differs -- turning the pushed replies into local deliveries -- with everything else equal:

* one publisher process (a separate process, so its CPU is not counted) PUBLISHes ``--messages``
  JSON messages of about ``--size`` bytes, round-robin over ``--topics`` topics, pipelined, to
  the Redis at ``--redis`` (loopback by default);
* this process receives them through each variant, which feeds the package's own local fan-out
  (``_FanoutBroker``: same decode, same sinks, same :class:`Subscription`), and one consumer task
  per topic drains its subscription;
* the publisher runs to completion while this process does not read (its messages wait in
  Redis's output buffer for the subscriber), then the receiver drains them all: wall time
  (throughput) and this process's CPU time (``time.process_time``), per message.  Rounds are
  interleaved; the median is reported.

Variants: ``hand-written`` (the shipped RedisBroker), and ``PubSub.listen()`` /
``PubSub.get_message()`` on a ``redis.asyncio.Redis`` client with redis-py's default protocol
(RESP3) and with RESP2 (which the hand-written client uses).  The PubSub variants are only the
receive loop; they do not reconnect, re-subscribe or watch the connection as RedisBroker does.

Redis only on loopback unless told otherwise; every wait is bounded; the publisher is stopped on
any error.  Queues are sized so that no consumer is dropped: drops would measure the consumers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import redis
import redis.asyncio as aioredis

from watchbuy.site.broker import Subscription
from watchbuy.site.broker.memory import _decode, _FanoutBroker
from watchbuy.site.broker.redis import RedisBroker

WAIT = 120.0  # seconds: the most any phase may take


def log(*parts: object) -> None:
    print("[bench.site.broker_pubsub]", *parts, file=sys.stderr, flush=True)


def payload(i: int, size: int) -> str:
    """A chat-like message whose JSON is about ``size`` bytes."""
    base = json.dumps({"type": "chat", "i": i, "user": "viewer42", "text": ""},
                      separators=(",", ":"))
    return json.dumps({"type": "chat", "i": i, "user": "viewer42",
                       "text": "x" * max(0, size - len(base))}, separators=(",", ":"))


def publish(url: str, prefix: str, messages: int, topics: int, size: int) -> None:
    """The publisher process: pipelined PUBLISHes, 500 a round trip."""
    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    for i in range(messages):
        pipe.publish(f"{prefix}room:{i % topics}", payload(i, size))
        if len(pipe) >= 500:
            pipe.execute()
    pipe.execute()
    client.close()


class PubSubBroker(_FanoutBroker):
    """A receive-only broker on redis-py's PubSub: the alternative being measured."""

    def __init__(self, url: str, prefix: str, *, mode: str, protocol: int) -> None:
        super().__init__()
        self._client = aioredis.Redis.from_url(url, protocol=protocol)
        self._pubsub = self._client.pubsub()
        self._prefix = prefix
        self._mode = mode
        self._channels: dict[bytes, str] = {}
        self._confirmed = 0
        self._all_live = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._begin()

    async def listen_to(self, topics: list[str]) -> None:
        self._channels = {(self._prefix + topic).encode(): topic for topic in topics}
        await self._pubsub.subscribe(*self._channels)
        self._reader = asyncio.ensure_future(self._read())
        await asyncio.wait_for(self._all_live.wait(), WAIT)

    async def _read(self) -> None:
        channels = self._channels
        if self._mode == "listen":
            async for item in self._pubsub.listen():
                self._handle(item, channels)
        else:
            get_message = self._pubsub.get_message
            while True:
                item = await get_message(timeout=None)
                if item is not None:
                    self._handle(item, channels)

    def _handle(self, item: dict, channels: dict[bytes, str]) -> None:
        kind = item["type"]
        if kind == "message":
            topic = channels.get(item["channel"])
            if topic is not None:
                # What RedisBroker._deliver does, so that only the reading differs.
                message = _decode(item["data"].decode())
                if message is not None:
                    self._fan_out(topic, message)
        elif kind == "subscribe":
            self._confirmed += 1
            if self._confirmed == len(channels):
                self._all_live.set()

    async def close(self) -> None:
        self._end_all()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._pubsub.aclose()
        await self._client.aclose()


async def one_run(make: Callable[[], _FanoutBroker], args: argparse.Namespace,
                  prefix: str) -> dict[str, float]:
    broker = make()
    await broker.start()
    publisher: subprocess.Popen[bytes] | None = None
    try:
        topics = [f"room:{t}" for t in range(args.topics)]
        subs = [broker.subscribe(topic, queue_size=args.messages) for topic in topics]
        if isinstance(broker, PubSubBroker):
            await broker.listen_to(topics)
        else:
            await asyncio.wait_for(asyncio.gather(*(sub.ready() for sub in subs)), WAIT)

        expected = args.messages
        received = 0
        done = asyncio.Event()

        async def consume(sub: Subscription) -> None:
            nonlocal received
            async for _message in sub:
                received += 1
                if received == expected:
                    done.set()

        consumers = [asyncio.ensure_future(consume(sub)) for sub in subs]
        publisher = subprocess.Popen(
            [sys.executable, "-m", "bench.site.broker_pubsub", "--publish", "--redis", args.redis,
             "--prefix", prefix, "--messages", str(args.messages), "--topics", str(args.topics),
             "--size", str(args.size)])
        # Blocking the event loop on purpose: nothing here reads while the publisher runs, so
        # every message waits in Redis's output buffer for this client (about messages x size:
        # 5 MB by default, under Redis's 8 MB pub/sub soft limit), and what is timed next is
        # the receiver alone, not the publisher's rate.
        if publisher.wait(timeout=WAIT) != 0:
            raise RuntimeError(f"the publisher failed ({publisher.returncode})")
        publisher = None
        wall0, cpu0 = time.perf_counter(), time.process_time()
        try:
            await asyncio.wait_for(done.wait(), WAIT)
        finally:
            for task in consumers:
                task.cancel()
            await asyncio.gather(*consumers, return_exceptions=True)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        return {"msgs_per_s": expected / wall, "cpu_us_per_msg": cpu / expected * 1e6,
                "cpu_s": cpu, "wall_s": wall}
    finally:
        if publisher is not None:
            publisher.kill()
            publisher.wait()
        await broker.close()


async def main(args: argparse.Namespace) -> None:
    variants: dict[str, Callable[[str], _FanoutBroker]] = {
        "hand-written (RedisBroker)": lambda prefix: RedisBroker(args.redis, prefix),
        "PubSub.listen RESP3": lambda prefix: PubSubBroker(args.redis, prefix, mode="listen",
                                                           protocol=3),
        "PubSub.get_message RESP3": lambda prefix: PubSubBroker(args.redis, prefix,
                                                                mode="get_message", protocol=3),
        "PubSub.listen RESP2": lambda prefix: PubSubBroker(args.redis, prefix, mode="listen",
                                                           protocol=2),
        "PubSub.get_message RESP2": lambda prefix: PubSubBroker(args.redis, prefix,
                                                                mode="get_message", protocol=2),
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for round_no in range(args.rounds):
        for name, factory in variants.items():
            prefix = f"bench:{uuid.uuid4().hex}:"
            result = await one_run(lambda f=factory, p=prefix: f(p), args, prefix)
            results[name].append(result)
            log(f"round {round_no + 1} {name}: {result['msgs_per_s']:,.0f} msg/s, "
                f"{result['cpu_us_per_msg']:.1f} us CPU/msg")
    print(f"{args.messages} messages of ~{args.size} B over {args.topics} topics, "
          f"median of {args.rounds} round(s), receiver draining a full backlog")
    print(f"{'variant':28} {'msg/s':>10} {'CPU us/msg':>11} {'vs hand-written':>16}")
    base = statistics.median(r["cpu_us_per_msg"] for r in results["hand-written (RedisBroker)"])
    for name, runs in results.items():
        rate = statistics.median(r["msgs_per_s"] for r in runs)
        cpu = statistics.median(r["cpu_us_per_msg"] for r in runs)
        print(f"{name:28} {rate:>10,.0f} {cpu:>11.1f} {cpu / base:>15.2f}x")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--topics", type=int, default=50)
    parser.add_argument("--size", type=int, default=200, help="bytes of JSON per message")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--publish", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.publish:
        publish(arguments.redis, arguments.prefix, arguments.messages, arguments.topics,
                arguments.size)
    else:
        asyncio.run(main(arguments))
