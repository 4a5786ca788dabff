"""The status agent: a background sampler and an HTTP endpoint that answers from memory.

Measuring inside a request (read the counters, sleep, read again) would make every answer take
the measuring time.  Instead a sampler task reads the kernel's counters once per interval (and
polls the engine's ``/api/server`` on its own schedule), keeps a short window of samples, and
after each sample renders the complete HTTP responses for ``GET /status`` and ``GET /metrics``
(Prometheus, status_agent/metrics.py) once.  A request is answered by writing
those bytes: no JSON encoding, no allocation per request beyond the socket write, which is what
lets one core answer many thousands of requests a second.

``GET /status`` answers::

    {"node_id": "i-0abc", "rx_bytes_per_s": 1234567.0, "tx_bytes_per_s": 2345678.0,
     "cpu_load": 0.42, "load_1m": 0.8, "publishers": 3, "viewers": 120, "engine_ok": true,
     "sampled_at": 1732770000.25, "window_s": 5.0, "rx_source": "interfaces",
     "interfaces": {"eth0": {"rx_bytes_per_s": 1234567.0, "tx_bytes_per_s": 2345678.0}}}

Rates are bytes per second over the window (``window_s``, the span actually covered: 0 until
the second sample).  ``cpu_load`` is the busy fraction of all CPUs over the same window.
``publishers``/``viewers`` are null while the engine does not answer (``engine_ok`` false).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable

from watchbuy.engine.httpparse import HttpError, Request, RequestParser
from watchbuy.engine.rates import RateWindow
from watchbuy.settings import PREFIX, ConfigError
from watchbuy.status_agent.client import FetchError, fetch_json
from watchbuy.status_agent.config import AgentSettings
from watchbuy.status_agent.metrics import METRICS_CONTENT_TYPE, agent_registry, render
from watchbuy.status_agent.procfs import LOOPBACK, ProcReader

log = logging.getLogger("watchbuy.status_agent")

MAX_HEAD_BYTES = 8192
EngineInfo = Callable[[], dict]


def _render(status: int, reason: str, body: bytes, keep_alive: bool,
            content_type: str = "application/json") -> bytes:
    return (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    ).encode() + body


class _Document:
    """One document's answers (GET and HEAD, keep-alive or not), rendered once per sample."""

    __slots__ = ("full", "head")

    def __init__(self, body: bytes, content_type: str) -> None:
        self.full = {k: _render(200, "OK", body, k, content_type) for k in (True, False)}
        self.head = {k: v[: len(v) - len(body)] for k, v in self.full.items()}


class _Responses:
    """Every answer the endpoint can give, rendered ahead of time (documents per sample)."""

    NOT_FOUND = {k: _render(404, "Not Found", b'{"error":"not found"}', k) for k in (True, False)}
    NOT_ALLOWED = {
        k: _render(405, "Method Not Allowed", b'{"error":"method not allowed"}', k)
        for k in (True, False)
    }
    BAD_REQUEST = _render(400, "Bad Request", b'{"error":"bad request"}', False)
    TOO_LARGE = _render(431, "Request Header Fields Too Large", b'{"error":"headers too large"}',
                        False)

    def __init__(self, status: bytes, metrics: bytes = b"") -> None:
        self.documents = {
            "/status": _Document(status, "application/json"),
            "/metrics": _Document(metrics, METRICS_CONTENT_TYPE),
        }


class StatusProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining; GET/HEAD /status and /metrics, nothing else.

    Requests are parsed by the engine's incremental parser (engine/httpparse.py: bounded head,
    bodies refused), the one HTTP/1 request parser of the project.
    """

    def __init__(self, agent: StatusAgent) -> None:
        self.agent = agent
        self.transport: asyncio.Transport | None = None
        self.parser = RequestParser(MAX_HEAD_BYTES, MAX_HEAD_BYTES)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        out = []
        close = False
        for event in self.parser.feed(data):
            if isinstance(event, HttpError):  # always the last event: answer, then close
                out.append(_Responses.TOO_LARGE if event.status == 431 else
                           _Responses.BAD_REQUEST)
                close = True
                break
            answer, keep_alive = self._answer(event)
            out.append(answer)
            if not keep_alive:
                close = True
                break
        if len(out) == 1:
            self.transport.write(out[0])
        elif out:
            self.transport.writelines(out)
        if close:
            self.transport.close()

    def _answer(self, request: Request) -> tuple[bytes, bool]:
        keep_alive = request.keep_alive
        document = self.agent.responses.documents.get(request.path)
        if document is None:
            return _Responses.NOT_FOUND[keep_alive], keep_alive
        if request.method == "GET":
            return document.full[keep_alive], keep_alive
        if request.method == "HEAD":
            return document.head[keep_alive], keep_alive
        return _Responses.NOT_ALLOWED[keep_alive], keep_alive


class StatusAgent:
    """``await agent.start()`` … ``await agent.stop()``.

    ``engine_info``: when the agent runs in the engine's own process (``watchbuy serve``), pass
    ``node.server_info`` and the engine is read directly instead of over HTTP.
    """

    def __init__(
        self,
        settings: AgentSettings,
        engine_info: EngineInfo | None = None,
        proc: ProcReader | None = None,
    ) -> None:
        self.settings = settings
        self.engine_info = engine_info
        self.proc = proc or ProcReader()
        self.interval = settings.agent_interval
        size = round(settings.agent_window / settings.agent_interval) + 1
        self.window = RateWindow(size)  # source name -> cumulative (rx, tx) bytes
        self.cpu_window = RateWindow(size)  # "cpu" -> cumulative (busy, total) jiffies
        self.port = settings.agent_port
        self.status: dict = {}
        self.counters: dict[str, tuple[int, int]] = {}  # the last sample's, for /metrics
        self.responses = _Responses(b"{}")
        self.metrics = agent_registry(self)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: list[asyncio.Task] = []
        # The engine's last good answer and when it came (monotonic), for engine_ok.
        self._engine: dict | None = None
        self._engine_at = float("-inf")
        self._engine_error = "not polled yet"

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._check_interfaces()
        if self.engine_info is None and self.settings.engine is not None:
            # Poll once before the first sample so the first answer already has the counts.
            await self._poll_engine_once()
            self._tasks.append(asyncio.ensure_future(self._poll_engine_forever()))
        self.sample()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: StatusProtocol(self), self.settings.agent_host, self.settings.agent_port,
            reuse_address=True, backlog=4096,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._tasks.append(asyncio.ensure_future(self._sample_forever()))
        log.info("status agent for node %s on %s:%d (rx source: %s, interfaces: %s)",
                 self.settings.node_id, self.settings.agent_host, self.port,
                 self.settings.agent_rx_source, ", ".join(self._interface_names()) or "-")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2)
            except TimeoutError:
                pass
            self._server = None

    # -- sampling -----------------------------------------------------------------------------
    def _interface_names(self, available: dict | None = None) -> list[str]:
        if self.settings.agent_rx_source == "engine":
            return []
        if self.settings.agent_interfaces:
            return list(self.settings.agent_interfaces)
        names = available if available is not None else self.proc.interfaces()
        return [n for n in names if n != LOOPBACK or self.settings.agent_include_loopback]

    def _check_interfaces(self) -> None:
        try:
            available = self.proc.interfaces()
        except OSError as exc:
            raise ConfigError(f"cannot read {self.proc.net_dev}: {exc.strerror}") from None
        missing = [n for n in self.settings.agent_interfaces if n not in available]
        if missing and self.settings.agent_rx_source == "interfaces":
            raise ConfigError(
                f"{PREFIX}AGENT_INTERFACES: no interface {', '.join(missing)} here "
                f"(have: {', '.join(available)})"
            )

    def _counters(self) -> dict[str, tuple[int, int]]:
        if self.settings.agent_rx_source == "engine":
            engine = self._engine if self._engine_fresh() else None
            if engine is None or "bytes_in" not in engine:
                return {}
            return {"engine": (int(engine["bytes_in"]), int(engine.get("bytes_out", 0)))}
        try:
            available = self.proc.interfaces()
        except OSError:
            return {}
        return {n: available[n] for n in self._interface_names(available) if n in available}

    def _engine_fresh(self) -> bool:
        # One missed poll on a busy machine should not flip the node to unhealthy.
        return time.monotonic() - self._engine_at <= 3 * self.interval + 1.0

    def sample(self) -> None:
        """Take one sample and re-render the answer (the sampler task calls this)."""
        if self.engine_info is not None:
            try:
                self._engine = dict(self.engine_info())
                self._engine_at = time.monotonic()
            except Exception as exc:  # the engine's stats must never kill the agent
                self._engine_error = f"engine stats failed: {exc}"
                log.warning("%s", self._engine_error)
        now = time.monotonic()
        self.counters = self._counters()
        self.window.add(now, self.counters)
        self.cpu_window.add(now, {"cpu": self.proc.cpu()})
        rates = self.window.rates()
        engine_ok = self._engine is not None and self._engine_fresh()
        status = {
            "node_id": self.settings.node_id,
            "rx_bytes_per_s": round(sum(r[0] for r in rates.values()), 1),
            "tx_bytes_per_s": round(sum(r[1] for r in rates.values()), 1),
            "cpu_load": round(self.cpu_window.fraction("cpu"), 3),
            "load_1m": round(os.getloadavg()[0], 2),
            "publishers": int(self._engine.get("publishers", 0)) if engine_ok else None,
            "viewers": int(self._engine.get("viewers", 0)) if engine_ok else None,
            "engine_ok": engine_ok,
            "sampled_at": round(time.time(), 3),
            "window_s": round(self.window.span(), 3),
            "rx_source": self.settings.agent_rx_source,
            "interfaces": {
                name: {"rx_bytes_per_s": round(rx, 1), "tx_bytes_per_s": round(tx, 1)}
                for name, (rx, tx) in sorted(rates.items())
            },
        }
        if not engine_ok:
            status["engine_error"] = self._engine_error
        self.status = status
        self.responses = _Responses(json.dumps(status, separators=(",", ":")).encode(),
                                    render(self.metrics))

    async def _sample_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            # A fixed schedule, not sleep(interval) after the work, so samples don't drift.
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if loop.time() - next_at > self.interval:  # the loop was stalled: resynchronise
                next_at = loop.time()
            try:
                self.sample()
            except Exception:  # pragma: no cover - keep answering with the last sample
                log.exception("status sample failed")

    async def _poll_engine_once(self) -> None:
        engine = self.settings.engine
        timeout = max(0.5, min(2.0, self.interval))
        try:
            self._engine = await fetch_json(engine.host, engine.port, engine.path, timeout)
            self._engine_at = time.monotonic()
        except FetchError as exc:
            self._engine_error = f"engine {self.settings.engine_url}: {exc}"
            log.debug("%s", self._engine_error)

    async def _poll_engine_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self._poll_engine_once()
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))
