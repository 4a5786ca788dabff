"""``watchbuy serve``: everything in one process on embedded defaults.

A media node, the site and (when installed) the status agent share one event loop.  The node
asks the site whether a stream key may publish exactly as it would across machines (an
HMAC-signed HTTP hook to ``/hooks/rtmp``), so the all-in-one runs the production code paths.
On the first start it creates a demo host with products and prints how to log in and stream.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys

from watchbuy import urls
from watchbuy.engine.cli import add_node_options, add_workers_option, push_line, settings_from

log = logging.getLogger("watchbuy.serve")

DEMO_PRODUCTS = [
    ("Ceramic mug", "Hand-glazed, 350 ml. Shown live in the kitchen set.", 1800, 25),
    ("Linen tote bag", "Natural linen, fits a laptop.", 2400, 15),
    ("Scented candle", "Cedar and orange, 40 hours.", 1500, 40),
]


async def seed_demo(app) -> dict | None:
    """A demo host (also an operator) with products, on an empty database only."""
    from watchbuy.db import queries
    from watchbuy.site.accounts import create_account

    db = app.state.db
    if await db.fetch_val("SELECT COUNT(*) FROM users"):
        return None
    password = secrets.token_urlsafe(9)
    email = "host@watchbuy.local"
    user_id = await create_account(db, email, "Demo Host", password, is_host=True,
                                   is_admin=True)
    currency = app.state.settings.currency
    for name, description, price, stock in DEMO_PRODUCTS:
        await queries.create_product(db, user_id, name, description, price, currency, stock,
                                     None)
    channel = await queries.channel_by_host(db, user_id)
    return {"email": email, "password": password, "channel": channel}


def run_serve(args: argparse.Namespace) -> int:
    from watchbuy.cli import install_uvloop, run_until_signalled, setup_logging
    from watchbuy.engine.node import MediaNode
    from watchbuy.settings import load_config
    from watchbuy.site.app import create_app
    from watchbuy.site.cli import uvicorn_server
    from watchbuy.site.config import load_site_settings
    from watchbuy.site.media import MediaDirectory
    from watchbuy.status_agent.agent import StatusAgent
    from watchbuy.status_agent.config import AgentSettings

    media_settings = settings_from(args)
    from watchbuy.engine.workers import worker_count

    workers = worker_count(media_settings.workers, "1")  # embedded defaults: one process
    holders = []
    if workers > 1:
        # The node's ports, held (never listening) so the site knows them before the media
        # supervisor binds them too (SO_REUSEPORT); port 0 resolved here.
        from watchbuy.supervise import reuse_port_socket

        holders = [reuse_port_socket(media_settings.rtmp_host, media_settings.rtmp_port),
                   reuse_port_socket(media_settings.http_host, media_settings.http_port)]
        media_settings = media_settings.replace(
            rtmp_port=holders[0].getsockname()[1], http_port=holders[1].getsockname()[1])
    site_settings = load_site_settings(
        site_port=args.site_port, rtmp_port=media_settings.rtmp_port,
        http_port=media_settings.http_port, node_id=media_settings.node_id,
        public_host=media_settings.public_host, data_dir=media_settings.data_dir,
        site_workers=1)  # one process: the node and the site share its event loop
    media_settings = media_settings.replace(
        publish_hook_url=f"http://127.0.0.1:{site_settings.site_port}/hooks/rtmp",
        hook_secret=site_settings.hook_secret, stream_keys={})
    setup_logging(site_settings.log_level)
    install_uvloop()

    if workers > 1:
        # The node as worker processes (engine/workers.py) under a media supervisor of its own;
        # the site and the agent read its node-wide stats API like any node's.
        node = MediaWorkersProcess(media_settings, workers)
        agent = StatusAgent(load_config(
            AgentSettings, node_id=media_settings.node_id, agent_port=args.agent_port,
            engine_url=f"http://127.0.0.1:{media_settings.http_port}"))
        media = MediaDirectory(site_settings, local_agent=lambda: agent.status)
    else:
        node = MediaNode(media_settings)
        # The node's status agent (kernel interface counters), reading the engine in-process.
        agent = StatusAgent(
            load_config(AgentSettings, node_id=media_settings.node_id,
                        agent_port=args.agent_port, engine_url=""),
            engine_info=node.server_info)
        media = MediaDirectory(site_settings, local_stats=node.streams_info,
                               local_server=node.server_info, local_agent=lambda: agent.status)
    app = create_app(site_settings, media=media)
    server = uvicorn_server(app, site_settings)
    tasks: list[asyncio.Task] = []

    async def start() -> None:
        await node.start()
        await agent.start()
        tasks.append(asyncio.ensure_future(server.serve()))
        while not server.started:
            if tasks[0].done():
                tasks[0].result()  # raises why the site could not start
                raise OSError("the site stopped during start-up")
            await asyncio.sleep(0.05)
        demo = await seed_demo(app)
        print_banner(site_settings, node, demo)
        print(f"  status agent: http://{site_settings.public_host}:{agent.port}/status",
              flush=True)
        if workers > 1:
            print(f"  media: {workers} worker processes", flush=True)

    async def stop() -> None:
        server.should_exit = True
        for task in tasks:
            await task
        await agent.stop()
        await node.stop()

    try:
        asyncio.run(run_until_signalled(start, stop))
    finally:
        for holder in holders:
            holder.close()
    return 0


class MediaWorkersProcess:
    """``watchbuy media --workers N`` as a child of ``watchbuy serve``, started and stopped
    like the in-process node (``start``/``stop``, ``settings``, ports)."""

    def __init__(self, settings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self.rtmp_port = settings.rtmp_port
        self.http_port = settings.http_port
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        s = self.settings
        # The site's hook and secret reach the media processes as settings do: the environment.
        env = {**os.environ, "WATCHBUY_PUBLISH_HOOK_URL": s.publish_hook_url,
               "WATCHBUY_HOOK_SECRET": s.hook_secret, "WATCHBUY_STREAM_KEYS": ""}
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "watchbuy", "media", "--workers", str(self.workers),
            "--rtmp-port", str(self.rtmp_port), "--http-port", str(self.http_port),
            "--node-id", s.node_id, env=env, stdout=asyncio.subprocess.DEVNULL)
        # Up once both ports accept (a worker listens), so the banner's URLs work when shown.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60.0
        for host, port in ((s.rtmp_host, self.rtmp_port), (s.http_host, self.http_port)):
            host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
            while True:
                if self.process.returncode is not None:
                    raise OSError(f"the media workers exited with status "
                                  f"{self.process.returncode}")
                try:
                    _reader, writer = await asyncio.open_connection(host, port)
                    writer.close()
                    break
                except OSError:
                    if loop.time() > deadline:
                        raise OSError(f"the media workers did not listen on port {port} "
                                      f"within 60 s") from None
                    await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """SIGTERM: the workers drain (WATCHBUY_WORKER_DRAIN_SECONDS), then end."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), self.settings.worker_drain_seconds + 20)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


def print_banner(site_settings, node, demo: dict | None) -> None:
    url = site_settings.public_url
    host = site_settings.public_host
    app = node.settings.apps[0]
    rtmp = urls.rtmp_url(host, node.rtmp_port, app)
    play_base = urls.node_play_base(host, node.http_port, app)
    print(f"\nWatchBuy is up: open {url}", flush=True)
    if demo is not None:
        key = demo["channel"]["stream_key"]
        print(f"\n  Demo host (also operator): {demo['email']}  password: {demo['password']}")
        print("  (shown once; sign up at /signup for more accounts)")
        print(f"  Host studio: {url}/studio   Room: {url}/room/{demo['channel']['slug']}")
        print(f"\n  OBS: Settings > Stream > Custom: Server {rtmp}  Stream key {key}")
        print("  or publish a test pattern with ffmpeg:")
        print(f"    {push_line(rtmp, key)}")
    else:
        print(f"  Hosts find their stream server and key in {url}/studio")
    print(f"\n  media node {node.settings.node_id}: RTMP {rtmp}, HTTP-FLV "
          f"{urls.flv_url(play_base, '<name>')}, LL-HLS {urls.hls_url(play_base, '<name>')}",
          flush=True)


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="all-in-one: media node, site and status agent")
    add_node_options(serve)
    serve.add_argument("--site-port", type=int, help="site port (default 8080)")
    serve.add_argument("--agent-port", type=int, help="status agent port (default 8090)")
    add_workers_option(serve, "1")
    serve.set_defaults(run=run_serve)
