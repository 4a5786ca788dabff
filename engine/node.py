"""A media node: the RTMP and HTTP listeners, the stream registry, auth hooks and stats."""

from __future__ import annotations

import asyncio
import logging
import time

from watchbuy.engine.codecs import implementations
from watchbuy.engine.hooks import HttpHooks, PublishAuthorizer, StaticKeys
from watchbuy.engine.http import HttpSession
from watchbuy.engine.relay import CounterWindow, RelayLimits, StreamRegistry
from watchbuy.engine.rtmp import RtmpSession
from watchbuy.settings import Settings

log = logging.getLogger("watchbuy.engine")


class ServerStats:
    """Connection counts and byte counters, with per-second rates over a short window."""

    def __init__(self) -> None:
        self.connections: dict[str, int] = {"rtmp": 0, "http": 0}
        self.connections_total = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._window = CounterWindow()  # bytes in, bytes out

    def connection_opened(self, kind: str) -> None:
        self.connections[kind] = self.connections.get(kind, 0) + 1
        self.connections_total += 1

    def connection_closed(self, kind: str) -> None:
        self.connections[kind] -= 1

    def sample(self, now: float) -> None:
        self._window.add(now, self.bytes_in, self.bytes_out)

    def rates(self) -> tuple[float, float]:
        """(bytes per second in, bytes per second out) over the sampling window."""
        rx, tx = self._window.rates(2)
        return rx, tx


def make_authorizer(settings: Settings) -> PublishAuthorizer:
    if settings.publish_hook_url:
        return HttpHooks(settings.publish_hook_url, settings.hook_secret, settings.node_id)
    return StaticKeys(settings.stream_keys)


class MediaNode:
    """Owns the listeners; ``await node.start()``, then ``await node.stop()``."""

    def __init__(self, settings: Settings, authorizer: PublishAuthorizer | None = None) -> None:
        self.config = settings
        self.limits = RelayLimits(
            gop_max_frames=settings.gop_max_frames,
            gop_max_bytes=settings.gop_max_bytes,
            viewer_queue_bytes=settings.viewer_queue_bytes,
            stall_timeout=settings.stall_timeout,
            out_chunk_size=settings.out_chunk_size,
        )
        self.registry = StreamRegistry(self.limits)
        self.authorizer = authorizer or make_authorizer(settings)
        self.stats = ServerStats()
        self.started_mono = time.monotonic()
        self._servers: list[asyncio.base_events.Server] = []
        self._sampler: asyncio.Task | None = None
        self.rtmp_port = settings.rtmp_port
        self.http_port = settings.http_port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        rtmp = await loop.create_server(
            lambda: RtmpSession(self), self.config.rtmp_host, self.config.rtmp_port,
            reuse_address=True, backlog=1024,
        )
        http = await loop.create_server(
            lambda: HttpSession(self), self.config.http_host, self.config.http_port,
            reuse_address=True, backlog=4096,
        )
        self._servers = [rtmp, http]
        # Port 0 in tests: read back the ports the kernel chose.
        self.rtmp_port = rtmp.sockets[0].getsockname()[1]
        self.http_port = http.sockets[0].getsockname()[1]
        self._sampler = asyncio.ensure_future(self._sample_forever())
        log.info("media node %s: RTMP on %s:%d, HTTP-FLV on %s:%d (codecs: %s)",
                 self.config.node_id, self.config.rtmp_host, self.rtmp_port,
                 self.config.http_host, self.http_port, implementations())

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        for server in self._servers:
            server.close()
        for stream in list(self.registry.streams.values()):
            self.registry.stop(stream)
        for server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 2)
            except TimeoutError:
                pass
        await self.authorizer.close()

    async def _sample_forever(self) -> None:
        while True:
            now = time.monotonic()
            self.stats.sample(now)
            for stream in self.registry.streams.values():
                stream.sample(now)
            await asyncio.sleep(1.0)

    # -- stats for the HTTP API ---------------------------------------------------------------
    def streams_info(self, operator: bool = False) -> dict:
        streams = [s.info() for s in self.registry.streams.values()]
        if not operator:  # a publisher's IP:port is a host's home address: operators only
            for info in streams:
                info.pop("publisher", None)
        return {"node_id": self.config.node_id, "streams": streams}

    def server_info(self) -> dict:
        rx, tx = self.stats.rates()
        return {
            "node_id": self.config.node_id,
            "uptime": round(time.monotonic() - self.started_mono, 1),
            "connections": dict(self.stats.connections),
            "connections_total": self.stats.connections_total,
            "publishers": len(self.registry.streams),
            "viewers": self.registry.viewer_count(),
            "bytes_in": self.stats.bytes_in,
            "bytes_out": self.stats.bytes_out,
            "bytes_in_per_s": round(rx),
            "bytes_out_per_s": round(tx),
            "codecs": implementations(),
        }
