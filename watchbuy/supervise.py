"""Several processes on one port: a SO_REUSEPORT socket, and the small supervisor that keeps N
worker processes running, restarts one that dies (with backoff and a log line) and stops them
all on SIGTERM/SIGINT.  ``watchbuy site --workers N`` (site/cli.py) and ``watchbuy media
--workers N`` (engine/workers.py) both use it; each says how to start a worker and how long a
stopping worker may take.

Each worker is an ordinary ``watchbuy`` process with its own event loop, bound with
SO_REUSEPORT: Linux spreads new connections over the group's listening sockets by a hash of
the connection, rather than waking whichever process is first (one shared listening socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with SO_REUSEPORT, so that every worker binds the
    port, and not listening yet: Linux hands a connection only to a listening socket of the
    group, so a worker's socket receives none until it listens, which it does once its start-up
    is done (a worker being restarted queues nobody meanwhile).  The supervisor keeps one such
    socket that never listens: it holds the port while workers come and go, and tells a port-0
    run which port it got."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


async def watch_supervisor(supervisor: int, on_gone: Callable[[], None]) -> None:
    """Call ``on_gone`` once the supervisor ``supervisor`` (our parent) is gone: a worker whose
    supervisor was killed (not stopped) stops rather than serving on unsupervised."""
    while os.getppid() == supervisor:
        await asyncio.sleep(1.0)
    on_gone()


class Supervisor:
    """Keeps ``count`` worker processes running: ``command(index)`` starts worker ``index``
    (1-based).  A worker that ends is restarted after ``restart_delay`` seconds, doubled while
    it keeps dying, up to ``restart_delay_max``.  On SIGTERM/SIGINT every worker gets SIGTERM
    and ``stop_seconds`` to end; one still running after that is killed."""

    def __init__(self, label: str, count: int, command: Callable[[int], list[str]],
                 stop_seconds: float, restart_delay: float, restart_delay_max: float,
                 log: logging.Logger) -> None:
        self.label = label  # "site worker", "media worker": how log lines name a worker
        self.count = count
        self.command = command
        self.stop_seconds = stop_seconds
        self.restart_delay = restart_delay
        self.restart_delay_max = restart_delay_max
        self.log = log
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        keepers = [asyncio.ensure_future(self.keep(index)) for index in range(1, self.count + 1)]
        await self.stopping.wait()
        self.log.info("stopping %d %ss (at most %g s)", len(self.processes), self.label,
                      self.stop_seconds)
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        # The workers' own bound, and a few seconds for their shutdown; a worker still running
        # after that is killed.
        await asyncio.wait(keepers, timeout=self.stop_seconds + 10.0)
        for process in self.processes.values():
            if process.returncode is None:
                self.log.warning("%s pid %d did not stop in time: killed", self.label,
                                 process.pid)
                process.kill()
        await asyncio.gather(*keepers, return_exceptions=True)
        return 0

    async def keep(self, index: int) -> None:
        """Run worker ``index``; restart it with backoff whenever it ends, until stopping."""
        loop = asyncio.get_running_loop()
        delay = self.restart_delay
        while not self.stopping.is_set():
            process = await asyncio.create_subprocess_exec(*self.command(index))
            self.processes[index] = process
            started = loop.time()
            self.log.info("%s %d started (pid %d)", self.label, index, process.pid)
            if self.stopping.is_set():  # stopped while it was being started: missed the signal
                process.send_signal(signal.SIGTERM)
            code = await process.wait()
            if self.stopping.is_set():
                break
            if loop.time() - started > self.restart_delay_max:
                # It had been running for longer than the longest wait: a fresh failure, not a
                # crash loop, so it comes back quickly.
                delay = self.restart_delay
            how = f"signal {-code}" if code < 0 else f"exit status {code}"
            self.log.warning("%s %d (pid %d) ended with %s: restarting in %.1f s",
                             self.label, index, process.pid, how, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            delay = min(delay * 2, self.restart_delay_max)
