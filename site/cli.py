"""``watchbuy site``: the shop on its own (media nodes run elsewhere)."""

from __future__ import annotations

import argparse
import asyncio

from watchbuy.site.config import load_site_settings


def uvicorn_server(app, host: str, port: int, log_level: str = "info"):
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(),
                            proxy_headers=True, ws="websockets-sansio", lifespan="on",
                            access_log=False)
    return uvicorn.Server(config)


def run_site(args: argparse.Namespace) -> int:
    from watchbuy.cli import install_uvloop, setup_logging
    from watchbuy.site.app import create_app

    settings = load_site_settings(site_port=args.port)
    setup_logging(settings.log_level)
    install_uvloop()
    app = create_app(settings)
    server = uvicorn_server(app, settings.site_host, settings.site_port, settings.log_level)
    print(f"WatchBuy site on {settings.public_url}", flush=True)
    asyncio.run(server.serve())
    return 0


def register(subparsers) -> None:
    site = subparsers.add_parser("site", help="run the shop site (Starlette)")
    site.add_argument("--port", type=int, help="site port (default 8080)")
    site.set_defaults(run=run_site)
