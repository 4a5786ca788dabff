"""The ``watchbuy`` command: one entry point, a subcommand per job.

Each component registers its own subcommands (``register(subparsers)`` in its ``cli`` module,
setting ``run=function(args) -> exit status``), so this file never grows with them.  Every
command reports a configuration problem as one line and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import sys

import watchbuy
from watchbuy.settings import ConfigError

COMPONENT_CLIS = (
    "watchbuy.engine.cli",
    "watchbuy.serve",
    "watchbuy.db.cli",
    "watchbuy.status_agent.cli",
    "watchbuy.balancer.cli",
    "watchbuy.site.cli",
)


def install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


async def run_until_signalled(start, stop) -> None:
    """``await start()``, wait for SIGINT/SIGTERM, then ``await stop()``."""
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


def add_version_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {watchbuy.__version__}",
                        help="print the installed version and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="watchbuy", description="WatchBuy live-stream shopping")
    add_version_option(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMPONENT_CLIS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # that component has no commands (yet)
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # `--version` is answered before the components' commands are imported, so it works even
    # where a component's dependencies are missing or broken (a wheel installed --no-deps).
    early = argparse.ArgumentParser(prog="watchbuy", add_help=False, allow_abbrev=False)
    add_version_option(early)
    early.parse_known_args(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ConfigError as exc:
        print(f"watchbuy: configuration error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"watchbuy: cannot start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
