"""``watchbuy media``: a media node on its own."""

from __future__ import annotations

import argparse
import asyncio
import secrets

from watchbuy import urls
from watchbuy.settings import Settings, load_settings, persistent_secret


def add_node_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rtmp-port", type=int, help="RTMP port (default 1935)")
    parser.add_argument("--http-port", type=int, help="HTTP-FLV and stats port (default 8000)")
    parser.add_argument("--node-id", help="node id, used in CDN play paths")


def add_workers_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--workers", help=f"media worker processes on the ports: a number or "
                        f"'auto', one per core (WATCHBUY_WORKERS; default {default})")


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(
        rtmp_port=getattr(args, "rtmp_port", None),
        http_port=getattr(args, "http_port", None),
        node_id=getattr(args, "node_id", None),
        workers=getattr(args, "workers", None),
    )


def standalone_keys(settings: Settings) -> Settings:
    """Without a site or configured keys, make one key (kept in the data folder) to try with."""
    if settings.stream_keys or settings.publish_hook_url:
        return settings
    key = persistent_secret(settings.data_dir, "stream_key",
                            lambda: "wb_" + secrets.token_urlsafe(12))
    return settings.replace(stream_keys={key: "demo"})


def push_line(rtmp_base: str, key: str) -> str:
    """An ffmpeg command that publishes a test pattern the way OBS would."""
    return (
        "ffmpeg -re -f lavfi -i testsrc2=size=1280x720:rate=30 -f lavfi -i sine=frequency=440 "
        "-c:v libx264 -preset veryfast -tune zerolatency -g 60 -c:a aac "
        f"-f flv {rtmp_base}/{key}"
    )


def print_media_banner(settings: Settings, rtmp_port: int, http_port: int) -> None:
    host = settings.public_host
    rtmp = urls.rtmp_url(host, rtmp_port, settings.apps[0])
    play_base = urls.node_play_base(host, http_port, settings.apps[0])
    print(f"WatchBuy media node {settings.node_id} is up.", flush=True)
    for key, name in settings.stream_keys.items():
        print(f"\n  OBS: Settings > Stream > Custom: Server {rtmp}  Stream key {key}")
        print("  or publish a test pattern with ffmpeg:")
        print(f"    {push_line(rtmp, key)}")
        print(f"  play: ffplay -fflags nobuffer {urls.flv_url(play_base, name)}")
        print(f"        or {rtmp}/{name}, or LL-HLS {urls.hls_url(play_base, name)}")
    print(f"\n  stats: http://{host}:{http_port}/api/streams  http://{host}:{http_port}/api/server",
          f"\n  metrics: http://{host}:{http_port}/metrics", flush=True)


def run_media(args: argparse.Namespace) -> int:
    from watchbuy.cli import install_uvloop, run_until_signalled, setup_logging
    from watchbuy.engine.node import MediaNode
    from watchbuy.engine.workers import run_worker, supervise_media, worker_count

    settings = standalone_keys(settings_from(args))
    setup_logging(settings.log_level)
    count = worker_count(settings.workers, "auto")  # --workers, WATCHBUY_WORKERS, or per core
    if args.worker is not None:
        install_uvloop()
        asyncio.run(run_worker(settings, args.worker, count, args.cluster, args.supervisor))
        return 0
    if count > 1:
        return supervise_media(settings, count, print_media_banner)
    install_uvloop()
    node = MediaNode(settings)

    async def start() -> None:
        await node.start()
        print_media_banner(settings, node.rtmp_port, node.http_port)

    asyncio.run(run_until_signalled(start, node.stop))
    return 0


def register(subparsers) -> None:
    media = subparsers.add_parser("media", help="run a media node (RTMP ingest, HTTP-FLV playback)")
    add_node_options(media)
    add_workers_option(media, "auto")
    # Set by the supervisor on the worker processes it starts, not by people.
    media.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    media.add_argument("--cluster", help=argparse.SUPPRESS)
    media.add_argument("--supervisor", type=int, help=argparse.SUPPRESS)
    media.set_defaults(run=run_media)
