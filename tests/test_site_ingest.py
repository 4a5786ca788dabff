"""Scale-out seen from the site: two real media nodes (with their status agents), one under
load from ffmpeg; the host studio and ``/api/ingest`` hand a new host the other node, and the
room plays from the node its stream is live on (through the CDN when one is configured)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from app_helpers import make_user, site_settings, start_session
from conftest import start_ffmpeg_publisher, stop_process
from node_cluster import Cluster
from page_helpers import Browser

from watchbuy.balancer import Balancer, StaticDiscovery
from watchbuy.db import queries
from watchbuy.site.app import create_app
from watchbuy.site.media import MediaDirectory

pytestmark = pytest.mark.usefixtures("ffmpeg")


@contextlib.asynccontextmanager
async def site_with(balancer: Balancer, data_dir):
    settings = site_settings(data_dir, f"sqlite:///{data_dir}/site.db")
    app = create_app(settings, media=MediaDirectory(settings, balancer=balancer,
                                                    cache_seconds=0))
    async with app.router.lifespan_context(app):
        yield app


async def test_studio_hands_a_new_host_the_less_loaded_node(tmp_path):
    cluster = Cluster("loopback", tmp_path)
    busy = cluster.add("node-busy", {"busykey": "busy-show"})
    idle = cluster.add("node-idle", {})
    publisher = None
    try:
        await cluster.wait_ready()
        publisher = await start_ffmpeg_publisher(busy.publish_url("busykey"), seconds=60,
                                                 size="640x360")
        nodes = [busy.node(), idle.node()]
        balancer = Balancer(StaticDiscovery(nodes), timeout=0.5, cache_ttl=0.0)
        # wait until the busy node's agent reports its ingest
        for _ in range(100):
            statuses = {s.node.node_id: s for s in (await balancer.statuses(fresh=True)).statuses}
            if (statuses["node-busy"].rx_bytes_per_s or 0) > 20_000:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"the busy node never showed ingest: {statuses}")

        async with site_with(balancer, tmp_path / "site") as app:
            db = app.state.db
            host = await make_user(db, "New Host", host=True)
            browser = Browser(app)
            browser.login_with(await start_session(db, host))
            ingest = (await browser.get("/api/ingest")).json()
            assert ingest["node_id"] == "node-idle"
            assert ingest["rtmp_url"] == f"rtmp://127.0.0.1:{idle.rtmp_port}/live"
            studio = await browser.get("/studio")
            assert f"rtmp://127.0.0.1:{idle.rtmp_port}/live" in studio.text
            assert f":{busy.rtmp_port}/" not in studio.text
            # the preview, opened before going live, plays from that node, and the CSP lets it
            idle_origin = f"http://127.0.0.1:{idle.http_port}"
            assert f'data-play-url="{idle_origin}/live/' in studio.text
            media_src = next(p for p in studio.headers["content-security-policy"].split("; ")
                             if p.startswith("media-src"))
            assert idle_origin in media_src

            # the room plays from the node the stream is live on
            channel = await queries.channel_by_host(db, host["id"])
            await queries.set_live(db, channel["id"], True, "node-idle")
            state = (await browser.get(f"/api/rooms/{channel['slug']}")).json()
            assert state["play_url"] == \
                f"http://127.0.0.1:{idle.http_port}/live/{channel['slug']}.flv"
            await browser.aclose()

        # behind a CDN the play URL carries the node: /<node-id>/live/<name>.flv
        cdn = Balancer(StaticDiscovery(nodes), timeout=0.5, cache_ttl=0.0,
                       cdn_domain="d111111abcdef8.cloudfront.net")
        async with site_with(cdn, tmp_path / "site2") as app:
            url = await app.state.media.play_url("node-busy", "busy-show")
            assert url == "https://d111111abcdef8.cloudfront.net/node-busy/live/busy-show.flv"
    finally:
        if publisher is not None:
            await stop_process(publisher)
        cluster.close()
