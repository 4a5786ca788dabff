"""Chat delivery broker: how every site process hears what is said in a room.

A *topic* (an opaque string; the chat uses ``room:<channel id>``) has local subscribers, one per
websocket.  Two backends implement :class:`Broker`:

* :class:`InMemoryBroker` (:mod:`.memory`) -- one process (``watchbuy serve``, the laptop
  default).  The module also holds what both backends share: the bounded subscriber queues, the
  local fan-out that drops a slow consumer instead of growing memory, and :class:`Subscription`.
* :class:`RedisBroker` (:mod:`.redis`) -- several site processes share each room through Redis
  pub/sub: one pub/sub connection per process, feeding the same local fan-out.

Messages are JSON-serialisable dicts.  They are encoded once per publish, and every subscriber
of a process receives the same decoded :class:`Message` -- a dict that also carries ``.json``,
the encoded text, so a websocket can forward it with ``send_text(message.json)`` instead of
encoding it again per viewer.  Treat delivered messages as read-only: they are shared.

Usage::

    broker = make_broker(settings.broker_url)
    await broker.start()
    async with broker.subscribe("room:7") as sub:   # with Redis: waits until the channel is live
        async for message in sub:
            await websocket.send_text(message.json)
    if sub.overflowed: ...                          # too slow: close, let the browser reconnect
    await broker.publish("room:7", {"type": "chat", "text": "hi"})
    await sub.close()                               # or leave the `async with`
    await broker.close()

Every ``close()`` here is a coroutine: ``await`` it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from watchbuy.settings import ConfigError
from watchbuy.site.broker.memory import (
    DEFAULT_QUEUE_SIZE,
    InMemoryBroker,
    Message,
    Subscription,
)

if TYPE_CHECKING:
    from watchbuy.site.broker.redis import RedisBroker

__all__ = [
    "DEFAULT_QUEUE_SIZE",
    "Broker",
    "BrokerUnavailable",
    "InMemoryBroker",
    "Message",
    "RedisBroker",
    "Subscription",
    "make_broker",
]


class BrokerUnavailable(ConnectionError):
    """The broker's backend (Redis) cannot be reached; chat is down until it comes back."""


class Broker(Protocol):
    """Publish/subscribe of JSON-serialisable dicts on opaque string topics."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, topic: str, message: dict) -> None: ...

    def subscribe(self, topic: str, queue_size: int = DEFAULT_QUEUE_SIZE) -> Subscription: ...


def __getattr__(name: str) -> object:
    # RedisBroker is loaded on first use, so a process on the in-memory broker never loads the
    # Redis backend; and .redis imports BrokerUnavailable from this module, which is complete by
    # the time anything asks for RedisBroker.
    if name == "RedisBroker":
        from watchbuy.site.broker.redis import RedisBroker

        return RedisBroker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        # Not the module's name: __getattr__ above serves importers, not this module's globals.
        from watchbuy.site.broker.redis import RedisBroker

        try:
            return RedisBroker(url, prefix=prefix)
        except ValueError as exc:  # redis-py's URL parsing: bad port, bad db, ...
            raise ConfigError(f"WATCHBUY_BROKER_URL: {exc} in {_redacted(url)!r}") from None
    raise ConfigError("WATCHBUY_BROKER_URL: expected empty, memory://, redis://host:6379/0 or "
                      f"rediss://..., got {_redacted(url)!r}")
