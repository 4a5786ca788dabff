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
import secrets

from watchbuy import urls
from watchbuy.engine.cli import add_node_options, push_line, settings_from

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

    node = MediaNode(media_settings)
    # The node's status agent (kernel interface counters), reading the engine in-process.
    agent = StatusAgent(
        load_config(AgentSettings, node_id=media_settings.node_id, agent_port=args.agent_port,
                    engine_url=""),
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

    async def stop() -> None:
        server.should_exit = True
        for task in tasks:
            await task
        await agent.stop()
        await node.stop()

    asyncio.run(run_until_signalled(start, stop))
    return 0


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
    serve.set_defaults(run=run_serve)
