"""The status agent: a background sampler and an HTTP endpoint that answers from memory.

Sampling inside a request (read the counters, sleep a second, read them again) would make every
answer take a second.
Here a sampler task reads the kernel's counters once per interval (and polls the engine's
``/api/server`` on its own schedule), keeps a short window of samples, and after each sample
renders the complete HTTP response for ``GET /status`` once.  A request is answered by writing
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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from watchbuy.settings import PREFIX, ConfigError
from watchbuy.status_agent.client import FetchError, fetch_json
from watchbuy.status_agent.config import AgentSettings
from watchbuy.status_agent.procfs import LOOPBACK, ProcReader

log = logging.getLogger("watchbuy.status_agent")

MAX_HEAD_BYTES = 8192
EngineInfo = Callable[[], dict]


@dataclass
class Sample:
    at: float  # monotonic seconds
    counters: dict[str, tuple[int, int]]  # source name -> cumulative (rx, tx) bytes
    cpu: tuple[int, int]  # cumulative (busy, total) jiffies


class RateWindow:
    """Samples over a short window; rates are taken between its oldest and newest sample."""

    def __init__(self, size: int) -> None:
        self.samples: deque[Sample] = deque(maxlen=max(2, size))

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def span(self) -> float:
        return self.samples[-1].at - self.samples[0].at if len(self.samples) >= 2 else 0.0

    def rates(self) -> dict[str, tuple[float, float]]:
        span = self.span()
        if span <= 0:
            return {name: (0.0, 0.0) for name in self.samples[-1].counters} if self.samples else {}
        first, last = self.samples[0], self.samples[-1]
        rates = {}
        for name, (rx, tx) in last.counters.items():
            old = first.counters.get(name)
            # A counter that went backwards belongs to a re-created interface (or a restarted
            # engine): leave it out until its old sample has left the window.
            if old is None or rx < old[0] or tx < old[1]:
                continue
            rates[name] = ((rx - old[0]) / span, (tx - old[1]) / span)
        return rates

    def cpu_load(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        busy0, total0 = self.samples[0].cpu
        busy1, total1 = self.samples[-1].cpu
        total = total1 - total0
        return round(min(1.0, max(0.0, (busy1 - busy0) / total)), 3) if total > 0 else 0.0


def _render(status: int, reason: str, body: bytes, keep_alive: bool) -> bytes:
    return (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    ).encode() + body


class _Responses:
    """Every answer the endpoint can give, rendered ahead of time (status ones per sample)."""

    NOT_FOUND = {k: _render(404, "Not Found", b'{"error":"not found"}', k) for k in (True, False)}
    NOT_ALLOWED = {
        k: _render(405, "Method Not Allowed", b'{"error":"method not allowed"}', k)
        for k in (True, False)
    }
    BAD_REQUEST = _render(400, "Bad Request", b'{"error":"bad request"}', False)
    TOO_LARGE = _render(431, "Request Header Fields Too Large", b'{"error":"headers too large"}',
                        False)

    def __init__(self, body: bytes) -> None:
        self.full = {k: _render(200, "OK", body, k) for k in (True, False)}
        self.head = {k: v[: len(v) - len(body)] for k, v in self.full.items()}


class StatusProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining; GET/HEAD /status, nothing else."""

    def __init__(self, agent: StatusAgent) -> None:
        self.agent = agent
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        out = []
        close = False
        start = 0
        while True:
            end = buffer.find(b"\r\n\r\n", start)
            if end < 0:
                break
            answer, keep_alive = self._answer(buffer[start:end])
            out.append(answer)
            start = end + 4
            if not keep_alive:
                close = True
                break
        self.buffer = b"" if close else buffer[start:]
        if len(self.buffer) > MAX_HEAD_BYTES:
            out.append(_Responses.TOO_LARGE)
            close = True
        if len(out) == 1:
            self.transport.write(out[0])
        elif out:
            self.transport.writelines(out)
        if close:
            self.transport.close()

    def _answer(self, head: bytes) -> tuple[bytes, bool]:
        line_end = head.find(b"\r\n")
        request_line = head if line_end < 0 else head[:line_end]
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _Responses.BAD_REQUEST, False
        method, target, version = parts
        lowered = head[line_end:].lower() if line_end >= 0 else b""
        # Only bodiless requests are served: a body we don't read would be parsed as the next
        # request, so refuse and close instead.
        at = lowered.find(b"\ncontent-length:")
        if at >= 0 and lowered[at + 16:].split(b"\r", 1)[0].strip() != b"0":
            return _Responses.BAD_REQUEST, False
        if b"\ntransfer-encoding:" in lowered:
            return _Responses.BAD_REQUEST, False
        if version == b"HTTP/1.1":
            keep_alive = b"\nconnection: close" not in lowered
        else:
            keep_alive = b"\nconnection: keep-alive" in lowered
        path = target.split(b"?", 1)[0]
        if path != b"/status":
            return _Responses.NOT_FOUND[keep_alive], keep_alive
        responses = self.agent.responses
        if method == b"GET":
            return responses.full[keep_alive], keep_alive
        if method == b"HEAD":
            return responses.head[keep_alive], keep_alive
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
        self.config = settings
        self.engine_info = engine_info
        self.proc = proc or ProcReader()
        self.interval = settings.agent_interval
        self.window = RateWindow(round(settings.agent_window / settings.agent_interval) + 1)
        self.port = settings.agent_port
        self.status: dict = {}
        self.responses = _Responses(b"{}")
        self._server: asyncio.base_events.Server | None = None
        self._tasks: list[asyncio.Task] = []
        # The engine's last good answer and when it came (monotonic), for engine_ok.
        self._engine: dict | None = None
        self._engine_at = float("-inf")
        self._engine_error = "not polled yet"

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._check_interfaces()
        if self.engine_info is None and self.config.engine is not None:
            # Poll once before the first sample so the first answer already has the counts.
            await self._poll_engine_once()
            self._tasks.append(asyncio.ensure_future(self._poll_engine_forever()))
        self.sample()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: StatusProtocol(self), self.config.agent_host, self.config.agent_port,
            reuse_address=True, backlog=4096,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._tasks.append(asyncio.ensure_future(self._sample_forever()))
        log.info("status agent for node %s on %s:%d (rx source: %s, interfaces: %s)",
                 self.config.node_id, self.config.agent_host, self.port,
                 self.config.agent_rx_source, ", ".join(self._interface_names()) or "-")

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
        if self.config.agent_rx_source == "engine":
            return []
        if self.config.agent_interfaces:
            return list(self.config.agent_interfaces)
        names = available if available is not None else self.proc.interfaces()
        return [n for n in names if n != LOOPBACK or self.config.agent_include_loopback]

    def _check_interfaces(self) -> None:
        try:
            available = self.proc.interfaces()
        except OSError as exc:
            raise ConfigError(f"cannot read {self.proc.net_dev}: {exc.strerror}") from None
        missing = [n for n in self.config.agent_interfaces if n not in available]
        if missing and self.config.agent_rx_source == "interfaces":
            raise ConfigError(
                f"{PREFIX}AGENT_INTERFACES: no interface {', '.join(missing)} here "
                f"(have: {', '.join(available)})"
            )

    def _counters(self) -> dict[str, tuple[int, int]]:
        if self.config.agent_rx_source == "engine":
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
        self.window.add(Sample(time.monotonic(), self._counters(), self.proc.cpu()))
        rates = self.window.rates()
        engine_ok = self._engine is not None and self._engine_fresh()
        status = {
            "node_id": self.config.node_id,
            "rx_bytes_per_s": round(sum(r[0] for r in rates.values()), 1),
            "tx_bytes_per_s": round(sum(r[1] for r in rates.values()), 1),
            "cpu_load": self.window.cpu_load(),
            "load_1m": round(os.getloadavg()[0], 2),
            "publishers": int(self._engine.get("publishers", 0)) if engine_ok else None,
            "viewers": int(self._engine.get("viewers", 0)) if engine_ok else None,
            "engine_ok": engine_ok,
            "sampled_at": round(time.time(), 3),
            "window_s": round(self.window.span(), 3),
            "rx_source": self.config.agent_rx_source,
            "interfaces": {
                name: {"rx_bytes_per_s": round(rx, 1), "tx_bytes_per_s": round(tx, 1)}
                for name, (rx, tx) in sorted(rates.items())
            },
        }
        if not engine_ok:
            status["engine_error"] = self._engine_error
        self.status = status
        self.responses = _Responses(json.dumps(status, separators=(",", ":")).encode())

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
        engine = self.config.engine
        timeout = max(0.5, min(2.0, self.interval))
        try:
            self._engine = await fetch_json(engine.host, engine.port, engine.path, timeout)
            self._engine_at = time.monotonic()
        except FetchError as exc:
            self._engine_error = f"engine {self.config.engine_url}: {exc}"
            log.debug("%s", self._engine_error)

    async def _poll_engine_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self._poll_engine_once()
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))
