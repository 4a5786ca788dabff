"""Where hosts push and where rooms play: the site's view of the media nodes.

One local node by default (``watchbuy serve``, or a node named by WATCHBUY_PUBLIC_HOST and the
ports).  When a balancer is attached (scale-out), new hosts are sent to the least-loaded node and
rooms play from the node their stream is live on, through the CDN when one is configured.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from watchbuy import urls

log = logging.getLogger("watchbuy.site.media")

# The media application rooms play from: the node's first (WATCHBUY_APPS), as the balancer's.
MEDIA_APP = "live"


class MediaDirectory:
    def __init__(self, settings, balancer=None, local_stats=None, local_server=None,
                 local_agent=None, cache_seconds: float = 2.0):
        self.settings = settings
        self.balancer = balancer
        self.local_stats = local_stats  # callable → the in-process node's streams_info()
        self.local_server = local_server  # callable → the in-process node's server_info()
        self.local_agent = local_agent  # callable → the in-process status agent's status
        self.cache_seconds = cache_seconds
        self._stats: dict[str, dict] = {}
        self._stats_at = 0.0
        self._lock = asyncio.Lock()
        self._client: httpx.AsyncClient | None = None

    def local_ingest(self) -> dict:
        s = self.settings
        return {
            "node_id": s.node_id,
            "rtmp_url": urls.rtmp_url(s.public_host, s.rtmp_port, MEDIA_APP),
            "play_base": urls.node_play_base(s.public_host, s.http_port, MEDIA_APP),
        }

    async def ingest(self) -> dict:
        """The node a host should push to now: ``{node_id, rtmp_url, play_base}``."""
        if self.balancer is None:
            return self.local_ingest()
        choice = await self.balancer.choose()
        return {"node_id": choice.node_id, "rtmp_url": choice.rtmp_url,
                "play_base": choice.play_base}

    async def play_url(self, node_id: str | None, slug: str) -> str:
        """The room's HTTP-FLV URL; ``hls_url(play_url)`` is its LL-HLS playlist."""
        if self.balancer is not None and node_id:
            node = await self.balancer.node_for(node_id)
            if node is not None:
                return urls.flv_url(node.play_base, slug)
        return urls.flv_url(self.local_ingest()["play_base"], slug)

    async def node_api(self, node_id: str | None) -> str:
        """The HTTP base (``http://host:port``) of the node a stream is live on, as the site
        reaches it: the balancer's record of it, or the local node."""
        if self.balancer is not None and node_id:
            node = await self.balancer.node_for(node_id)
            if node is not None:
                return node.stats_url
        return self.settings.node_stats_url

    async def cue(self, node_id: str | None, name: str, product_id: int | None) -> int | None:
        """Put a pin into the live stream ``name`` as a cue point (engine/cues.py), signed
        with the hook secret; the stream's media timestamp of it, or None when the node could
        not be asked (the pin still goes out over the websocket)."""
        from watchbuy.engine.cues import cue_target, signed_headers

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=1.0)
        target = cue_target(name, product_id)
        base = await self.node_api(node_id)
        try:
            response = await self._client.post(
                f"{base}{target}", headers=signed_headers(self.settings.hook_secret, target))
            if response.status_code == 200:
                media_ms = response.json().get("media_ms")
                if isinstance(media_ms, int) and not isinstance(media_ms, bool):
                    return media_ms
            log.warning("cue point for %s: node at %s answered %s", name, base,
                        response.status_code)
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("cue point for %s: node at %s unreachable: %s", name, base, exc)
        return None

    async def stream_stats(self) -> dict[str, dict]:
        """Live streams by name with their stats (viewers, bitrate…), cached briefly."""
        if time.monotonic() - self._stats_at < self.cache_seconds:
            return self._stats
        async with self._lock:
            if time.monotonic() - self._stats_at < self.cache_seconds:
                return self._stats
            self._stats = await self._collect()
            self._stats_at = time.monotonic()
        return self._stats

    async def _collect(self) -> dict[str, dict]:
        if self.local_stats is not None:
            infos = [self.local_stats()]
        else:
            urls = [self.settings.node_stats_url]
            if self.balancer is not None:
                urls = [n.stats_url for n in await self.balancer.known_nodes()]
            infos = await asyncio.gather(*(self._fetch(u) for u in urls))
        streams: dict[str, dict] = {}
        for info in infos:
            for stream in (info or {}).get("streams", []):
                streams[stream["name"]] = {**stream, "node_id": info.get("node_id")}
        return streams

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def node_stats(self) -> list[dict]:
        """Each media node's network in/out and counts, for the ops dashboard.

        Network rates come from the node's status agent (the kernel's interface counters, what
        the balancer compares); without an agent, from the engine's own byte counters.
        """
        if self.local_server is not None:
            engine = self.local_server()
            agent = self.local_agent() if self.local_agent is not None else None
            return [_node_row(engine, agent)]
        if self.balancer is None:
            engine = await self._fetch(self.settings.node_stats_url, "/api/server")
            return [_node_row(engine, None)] if engine else []
        nodes = await self.balancer.known_nodes()
        engines = await asyncio.gather(*(self._fetch(n.stats_url, "/api/server") for n in nodes))
        agents = await asyncio.gather(*(self._fetch(n.agent_url, "") for n in nodes))
        return [_node_row(engine, agent, node.node_id)
                for node, engine, agent in zip(nodes, engines, agents, strict=True)
                if engine or agent]

    async def _fetch(self, base_url: str, path: str = "/api/streams") -> dict | None:
        # One client for every poll: a new one per fetch built an SSL context each time.
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=1.0)
        try:
            response = await self._client.get(f"{base_url}{path}")
            return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            log.debug("media node stats at %s unavailable: %s", base_url, exc)
            return None


def _node_row(engine: dict | None, agent: dict | None, node_id: str | None = None) -> dict:
    """One node for the dashboard.  The charts use the engine's own traffic (in grows with
    hosts, out with viewers, whatever the interface); the agent adds the kernel's view of the
    machine's interfaces, which is what the balancer compares."""
    engine = engine or {}
    agent = agent or {}
    return {
        "node_id": node_id or engine.get("node_id") or agent.get("node_id", "?"),
        "publishers": engine.get("publishers", agent.get("publishers", 0)),
        "viewers": engine.get("viewers", agent.get("viewers", 0)),
        "bytes_in_per_s": engine.get("bytes_in_per_s", 0),
        "bytes_out_per_s": engine.get("bytes_out_per_s", 0),
        "net_rx_per_s": agent.get("rx_bytes_per_s"),
        "net_tx_per_s": agent.get("tx_bytes_per_s"),
        "cpu_load": agent.get("cpu_load"),
    }


def hls_url(play_url: str) -> str:
    """The LL-HLS playlist of the stream an HTTP-FLV URL plays: the node serves both from one
    play base (watchbuy/urls.py), so one is derived from the other and both keep one origin,
    which the room's CSP already allows."""
    base, dot, ext = play_url.rpartition(".")
    if not dot or ext != "flv":
        raise ValueError(f"not an HTTP-FLV play URL: {play_url!r}")
    play_base, _, name = base.rpartition("/")
    return urls.hls_url(play_base, name)
