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

log = logging.getLogger("watchbuy.site.media")


class MediaDirectory:
    def __init__(self, settings, balancer=None, local_stats=None, local_server=None,
                 cache_seconds: float = 2.0):
        self.settings = settings
        self.balancer = balancer
        self.local_stats = local_stats  # callable → the in-process node's streams_info()
        self.local_server = local_server  # callable → the in-process node's server_info()
        self.cache_seconds = cache_seconds
        self._stats: dict[str, dict] = {}
        self._stats_at = 0.0
        self._lock = asyncio.Lock()

    def local_ingest(self) -> dict:
        s = self.settings
        port = "" if s.rtmp_port == 1935 else f":{s.rtmp_port}"
        return {
            "node_id": s.node_id,
            "rtmp_url": f"rtmp://{s.public_host}{port}/live",
            "play_base": f"http://{s.public_host}:{s.http_port}/live",
        }

    async def ingest(self) -> dict:
        """The node a host should push to now: ``{node_id, rtmp_url, play_base}``."""
        if self.balancer is None:
            return self.local_ingest()
        choice = await self.balancer.choose()
        return {"node_id": choice.node_id, "rtmp_url": choice.rtmp_url,
                "play_base": choice.play_base}

    async def play_url(self, node_id: str | None, slug: str) -> str:
        if self.balancer is not None and node_id:
            node = await self.balancer.node_for(node_id)
            if node is not None:
                return f"{node.play_base}/{slug}.flv"
        return f"{self.local_ingest()['play_base']}/{slug}.flv"

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

    async def node_stats(self) -> list[dict]:
        """Each media node's traffic and counts (``/api/server``), for the ops dashboard."""
        if self.local_server is not None:
            return [self.local_server()]
        urls = [self.settings.node_stats_url]
        if self.balancer is not None:
            urls = [n.stats_url for n in await self.balancer.known_nodes()]
        found = await asyncio.gather(*(self._fetch(u, "/api/server") for u in urls))
        return [info for info in found if info]

    @staticmethod
    async def _fetch(base_url: str, path: str = "/api/streams") -> dict | None:
        try:
            async with httpx.AsyncClient(timeout=1.0) as client:
                response = await client.get(f"{base_url}{path}")
                return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            log.debug("media node stats at %s unavailable: %s", base_url, exc)
            return None
