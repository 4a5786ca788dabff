"""The ``watchbuy`` command: one entry point, a subcommand per job.

Each component registers its own subcommands (``register(subparsers)`` in its ``cli`` module,
setting ``run=function(args) -> exit status``), so this file never grows with them.  Every
command reports a configuration problem as one line and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import json
import logging
import signal
import sys

import watchbuy
from watchbuy.settings import PREFIX, ConfigError, read_environment

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


LOG_FORMATS = ("text", "json")
# Record attributes that identify what a line is about: an engine connection (engine/session.py)
# or a site request.  Both formatters print whichever a record carries.
CONTEXT_FIELDS = ("conn_id", "request_id")


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: [conn_id=r00002a] message``: the classic line, with the context."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(context)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.context = "".join(f"[{name}={getattr(record, name)}] " for name in CONTEXT_FIELDS
                                 if getattr(record, name, None) is not None)
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line (``WATCHBUY_LOG_FORMAT=json``), for log shippers: ``time``
    (ISO 8601, UTC), ``level``, ``logger``, ``message``, the context fields a record carries,
    and ``exception`` (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def log_format(environ: dict[str, str] | None = None) -> str:
    """``WATCHBUY_LOG_FORMAT`` (environment, then env file): text (default) or json."""
    value = read_environment(environ).get(PREFIX + "LOG_FORMAT", "").strip().lower() or "text"
    if value not in LOG_FORMATS:
        raise ConfigError(f"{PREFIX}LOG_FORMAT: one of {', '.join(LOG_FORMATS)}, got {value!r}")
    return value


def setup_logging(level: str = "INFO", environ: dict[str, str] | None = None) -> None:
    """Log to stderr at ``level``, as text lines or JSON lines (``WATCHBUY_LOG_FORMAT``)."""
    formatter = JsonFormatter() if log_format(environ) == "json" else TextFormatter()
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler])


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
