"""``watchbuy media --workers N``: one media node as N worker processes, one per core.

One engine process uses one core.  Here the supervisor (watchbuy/supervise.py, shared with
``watchbuy site --workers N``) keeps N ordinary ``watchbuy media`` processes running; they
share the RTMP and HTTP ports (SO_REUSEPORT, the kernel spreads connections over them) and
relay each stream between them (engine/interworker.py), so the node looks like one node to
encoders, players, the balancer and the site.  SIGTERM drains: every worker stops accepting
and waits for its publishers (and the siblings' publishers it relays) to end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys

from watchbuy.settings import Settings
from watchbuy.supervise import Supervisor, reuse_port_socket, watch_supervisor

log = logging.getLogger("watchbuy.engine.workers")


def cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def worker_count(value: str | int | None, default: str) -> int:
    """Worker processes for ``--workers``/``WATCHBUY_WORKERS`` (``auto``: one per core), or
    ``default`` when neither says.  Settings.validate has checked the setting's text."""
    text = str(value).strip().lower() if value not in (None, "") else default
    return cores() if text == "auto" else int(text)


def worker_command(settings: Settings, rtmp_port: int, http_port: int, token: str,
                   count: int, index: int) -> list[str]:
    # The settings reach the worker as they reached us (environment, env file) plus the ports,
    # now resolved; a generated stream key is a file in the data folder, written already.
    return [sys.executable, "-m", "watchbuy", "media", "--rtmp-port", str(rtmp_port),
            "--http-port", str(http_port), "--node-id", settings.node_id,
            "--workers", str(count), "--worker", str(index), "--cluster", token,
            "--supervisor", str(os.getpid())]


def supervise_media(settings: Settings, count: int, banner) -> int:
    """Hold both ports, start ``count`` workers on them and keep them running."""
    rtmp_holder = reuse_port_socket(settings.rtmp_host, settings.rtmp_port)
    try:
        http_holder = reuse_port_socket(settings.http_host, settings.http_port)
    except BaseException:
        rtmp_holder.close()
        raise
    try:
        rtmp_port = rtmp_holder.getsockname()[1]
        http_port = http_holder.getsockname()[1]
        # Names the workers' abstract Unix sockets: two nodes on one machine (tests, a
        # restart overlapping its predecessor) never see each other's.
        token = secrets.token_hex(8)
        banner(settings, rtmp_port, http_port)
        print(f"  {count} worker processes", flush=True)
        supervisor = Supervisor(
            "media worker", count,
            lambda index: worker_command(settings, rtmp_port, http_port, token, count, index),
            settings.worker_drain_seconds, settings.worker_restart_delay,
            settings.worker_restart_delay_max, log)
        return asyncio.run(supervisor.run())
    finally:
        rtmp_holder.close()
        http_holder.close()


async def run_worker(settings: Settings, index: int, count: int, token: str,
                     supervisor: int | None) -> None:
    """One worker: a media node on the shared ports, in the node's cluster; SIGTERM drains."""
    from watchbuy.engine.interworker import Cluster
    from watchbuy.engine.node import MediaNode

    node = MediaNode(settings)
    node.cluster = Cluster(node, token, index, count)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    watch = None
    if supervisor is not None:
        def orphaned() -> None:
            log.warning("media worker %d: supervisor %s gone, stopping", index, supervisor)
            done.set()

        watch = asyncio.ensure_future(watch_supervisor(supervisor, orphaned))
    await node.start()
    log.info("media worker %d of %d up (pid %d)", index, count, os.getpid())
    try:
        await done.wait()
    finally:
        if watch is not None:
            watch.cancel()
        await node.drain(settings.worker_drain_seconds)
