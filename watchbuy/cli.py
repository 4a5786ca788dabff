"""The ``watchbuy`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import sys
from pathlib import Path

from watchbuy.settings import ConfigError, Settings, load_settings

log = logging.getLogger("watchbuy")


def _install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def standalone_keys(settings: Settings) -> Settings:
    """Without a site or configured keys, make one key (kept in the data folder) to try with."""
    if settings.stream_keys or settings.publish_hook_url:
        return settings
    path = Path(settings.data_dir) / "stream_key"
    try:
        key = path.read_text().strip()
    except OSError:
        key = ""
    if not key:
        key = "wb_" + secrets.token_urlsafe(12)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(key + "\n")
    return settings.replace(stream_keys={key: "demo"})


def print_media_banner(settings: Settings, rtmp_port: int, http_port: int) -> None:
    host = settings.public_host
    app = settings.apps[0]
    rtmp = f"rtmp://{host}:{rtmp_port}/{app}"
    print(f"WatchBuy media node {settings.node_id} is up.", flush=True)
    for key, name in settings.stream_keys.items():
        print(f"\n  OBS: Settings > Stream > Custom: Server {rtmp}  Stream key {key}")
        print("  or publish a test pattern with ffmpeg:")
        print(
            "    ffmpeg -re -f lavfi -i testsrc2=size=1280x720:rate=30 "
            "-f lavfi -i sine=frequency=440 -c:v libx264 -preset veryfast -tune zerolatency "
            f"-g 60 -c:a aac -f flv {rtmp}/{key}"
        )
        print(f"  play: ffplay -fflags nobuffer http://{host}:{http_port}/{app}/{name}.flv")
        print(f"        or rtmp://{host}:{rtmp_port}/{app}/{name}")
    print(f"\n  stats: http://{host}:{http_port}/api/streams  http://{host}:{http_port}/api/server",
          flush=True)


async def _run_until_signalled(start, stop) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, done.set)
        except NotImplementedError:  # pragma: no cover - not on Windows
            pass
    await start()
    try:
        await done.wait()
    finally:
        await stop()


def cmd_media(args: argparse.Namespace, settings: Settings) -> int:
    from watchbuy.engine.node import MediaNode

    settings = standalone_keys(settings)
    node = MediaNode(settings)

    async def start() -> None:
        await node.start()
        print_media_banner(settings, node.rtmp_port, node.http_port)

    asyncio.run(_run_until_signalled(start, node.stop))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="watchbuy", description="WatchBuy live-stream shopping")
    sub = parser.add_subparsers(dest="command", required=True)
    media = sub.add_parser("media", help="run a media node (RTMP ingest, HTTP-FLV playback)")
    media.add_argument("--rtmp-port", type=int, help="RTMP port (default 1935)")
    media.add_argument("--http-port", type=int, help="HTTP-FLV and stats port (default 8000)")
    media.add_argument("--node-id", help="node id used in CDN play paths")
    serve = sub.add_parser("serve", help="all-in-one: media node (and the site when installed)")
    serve.add_argument("--rtmp-port", type=int)
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--node-id")
    return parser


COMMANDS = {"media": cmd_media, "serve": cmd_media}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(
            rtmp_port=getattr(args, "rtmp_port", None),
            http_port=getattr(args, "http_port", None),
            node_id=getattr(args, "node_id", None),
        )
    except ConfigError as exc:
        print(f"watchbuy: configuration error: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _install_uvloop()
    try:
        return COMMANDS[args.command](args, settings)
    except ConfigError as exc:
        print(f"watchbuy: configuration error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"watchbuy: cannot start: {exc}", file=sys.stderr)
        return 1
