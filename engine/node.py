"""A media node: the RTMP and HTTP listeners, the stream registry, auth hooks and stats."""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter
from typing import TYPE_CHECKING

from watchbuy.engine.codecs import implementations
from watchbuy.engine.cues import CueService
from watchbuy.engine.hls_http import HlsService
from watchbuy.engine.hooks import HttpHooks, PublishAuthorizer, StaticKeys
from watchbuy.engine.http import HttpSession
from watchbuy.engine.metrics import node_registry
from watchbuy.engine.rates import RateWindow
from watchbuy.engine.record import Recorder
from watchbuy.engine.relay import RelayLimits, StreamRegistry
from watchbuy.engine.rtmp import RtmpSession
from watchbuy.logs import LogLimiter
from watchbuy.net import in_networks, is_loopback, parse_networks
from watchbuy.settings import Settings

if TYPE_CHECKING:
    from watchbuy.engine.interworker import Cluster

log = logging.getLogger("watchbuy.engine")


class ServerStats:
    """Connection counts and byte counters, with per-second rates over a short window, and the
    event counters ``/metrics`` reports (engine/metrics.py reads them at scrape time).

    Plain ints and Counters that the data path bumps where it already does the work: a scrape
    costs a walk over these, a message costs nothing extra.
    """

    def __init__(self) -> None:
        self.connections: dict[str, int] = {"rtmp": 0, "http": 0}
        self.connections_total = 0
        self.refused_by: Counter[str] = Counter()  # "per_ip", "fd"
        self.bytes_in = 0
        self.bytes_out = 0
        self.viewers_started: Counter[str] = Counter()  # by viewer kind: "flv", "rtmp"
        self.keyframe_resyncs = 0  # a viewer fell behind, lost tags, waits for a keyframe
        self.tags_dropped = 0  # tags not sent to viewers that had fallen behind
        self.viewers_cut_off = 0  # stalled past WATCHBUY_STALL_TIMEOUT: disconnected
        self.publish_refused: Counter[str] = Counter()  # by reason
        self.protocol_errors: Counter[str] = Counter()  # "rtmp_handshake", "rtmp", "http"
        self.timeouts: Counter[str] = Counter()  # by kind: "rtmp_handshake", "http_header", ...
        self._window = RateWindow()  # "bytes": (in, out)

    @property
    def connections_refused(self) -> int:
        return sum(self.refused_by.values())

    def connection_opened(self, kind: str) -> None:
        self.connections[kind] = self.connections.get(kind, 0) + 1
        self.connections_total += 1

    def connection_closed(self, kind: str) -> None:
        self.connections[kind] -= 1

    def open_connections(self) -> int:
        return sum(self.connections.values())

    def sample(self, now: float) -> None:
        self._window.add(now, {"bytes": (self.bytes_in, self.bytes_out)})

    def rates(self) -> tuple[float, float]:
        """(bytes per second in, bytes per second out) over the sampling window."""
        rx, tx = self._window.rate("bytes", 2)
        return rx, tx


def fd_budget(reserve: int) -> int:
    """How many connections the node may hold open: the soft RLIMIT_NOFILE less a reserve of
    ``reserve`` or 5 % of it, whichever is more, for listeners, logs and hook requests; 0 for
    no limit.  Past it, accept() would fail with EMFILE for everyone, publishers included."""
    if reserve <= 0:
        return 0
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(soft - max(reserve, soft // 20), soft // 2)


def make_authorizer(settings: Settings) -> PublishAuthorizer:
    if settings.publish_hook_url:
        return HttpHooks(settings.publish_hook_url, settings.hook_secret, settings.node_id)
    return StaticKeys(settings.stream_keys)


class MediaNode:
    """Owns the listeners; ``await node.start()``, then ``await node.stop()``."""

    def __init__(self, settings: Settings, authorizer: PublishAuthorizer | None = None) -> None:
        self.settings = settings
        self.limits = RelayLimits.from_settings(settings)
        self.registry = StreamRegistry(self.limits)
        self.authorizer = authorizer or make_authorizer(settings)
        self.stats = ServerStats()
        self.per_ip_exempt = parse_networks(settings.per_ip_exempt, "WATCHBUY_PER_IP_EXEMPT")
        self.rtmp_sessions: set[RtmpSession] = set()  # swept once a second for timeouts
        self.partial_bytes = 0  # unfinished RTMP messages, all connections (node_partial_bytes)
        self.per_ip: dict[str, set] = {}  # open sessions by peer address, where capped
        self.fd_budget = 0
        self._fd_refusals = LogLimiter(log)
        self._ip_refusals = LogLimiter(log)
        # Timeouts a peer can cause by the thousand: at most a line per kind every few seconds.
        rtmp_log = logging.getLogger("watchbuy.engine.rtmp")
        self.rtmp_timeout_logs = {kind: LogLimiter(rtmp_log) for kind in
                                  ("handshake", "partial", "idle", "drain")}
        self.started_mono = time.monotonic()
        self._servers: list[asyncio.base_events.Server] = []
        self._sampler: asyncio.Task | None = None
        self.rtmp_port = settings.rtmp_port
        self.http_port = settings.http_port
        self.metrics = node_registry(self)  # GET /metrics (engine/metrics.py)
        # LL-HLS of every live stream (engine/hls_http.py), muxed from publish on.
        self.hls = HlsService(self) if settings.hls else None
        self.cues = CueService(self)  # POST /api/streams/<name>/cue (engine/cues.py)
        # every publish recorded to the data folder, then a faststart MP4 (engine/record.py);
        # a node without a data folder (tests, benchmarks: data_dir "") records nothing
        self.recorder = Recorder(self) if settings.record and \
            (settings.record_dir or settings.data_dir) else None
        # One worker of several (engine/workers.py): claims, pulls between the workers and the
        # node-wide stats (engine/interworker.py); None for a node in one process.
        self.cluster: Cluster | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.fd_budget = fd_budget(self.settings.fd_reserve)
        if self.cluster is not None:
            await self.cluster.start()  # before listening: the siblings' streams are pulled
        # Workers share the ports: the kernel spreads connections over them (SO_REUSEPORT).
        shared = self.cluster is not None
        rtmp = await loop.create_server(
            lambda: RtmpSession(self), self.settings.rtmp_host, self.settings.rtmp_port,
            reuse_address=True, reuse_port=shared, backlog=1024,
        )
        http = await loop.create_server(
            lambda: HttpSession(self), self.settings.http_host, self.settings.http_port,
            reuse_address=True, reuse_port=shared, backlog=4096,
        )
        self._servers = [rtmp, http]
        # Port 0 in tests: read back the ports the kernel chose.
        self.rtmp_port = rtmp.sockets[0].getsockname()[1]
        self.http_port = http.sockets[0].getsockname()[1]
        self._sampler = asyncio.ensure_future(self._sample_forever())
        if self.recorder is not None:
            self.recorder.start()  # pending reports of an earlier run, the folder sweep
        log.info("media node %s: RTMP on %s:%d, HTTP-FLV on %s:%d (codecs: %s)",
                 self.settings.node_id, self.settings.rtmp_host, self.rtmp_port,
                 self.settings.http_host, self.http_port, implementations())

    async def drain(self, seconds: float) -> None:
        """Stop accepting connections, then wait (at most ``seconds``) until every stream here
        has ended: its publisher stops, or for a stream pulled from a sibling, the sibling's
        publisher.  Viewers keep playing meanwhile.  Then :meth:`stop`."""
        for server in self._servers:
            server.close()
        if self.registry.streams:
            log.info("draining: %d live streams, waiting up to %g s for their publishers "
                     "to end (WATCHBUY_WORKER_DRAIN_SECONDS)", len(self.registry.streams),
                     seconds)
        deadline = time.monotonic() + seconds
        while self.registry.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.registry.streams:
            log.warning("drain time over: ending %d live streams", len(self.registry.streams))
        await self.stop()

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        for server in self._servers:
            server.close()
        if self.cluster is not None:
            await self.cluster.close()
        for stream in list(self.registry.streams.values()):
            self.registry.stop(stream)
        if self.hls is not None:
            self.hls.close()
        if self.recorder is not None:
            await self.recorder.close()
        for server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 2)
            except TimeoutError:
                pass
        await self.authorizer.close()

    async def _sample_forever(self) -> None:
        while True:
            now = time.monotonic()
            self.stats.sample(now)
            for stream in self.registry.streams.values():
                stream.sample(now)
            self.sweep(now)
            await asyncio.sleep(1.0)

    def sweep(self, now: float) -> None:
        """Once a second: the RTMP sessions' timeouts (handshake, partial message, publisher
        silence, idle), so no timer is armed or moved per message."""
        for session in tuple(self.rtmp_sessions):
            try:
                session.check_timeouts(now)
            except Exception:  # a bug in one session must not stop the sampler
                session.log.exception("rtmp %s: timeout check failed", session.peer)

    # -- admission ----------------------------------------------------------------------------
    def admit(self, session) -> bool:
        """Whether a new connection (already counted as open) may stay."""
        settings = self.settings
        if self.fd_budget and self.stats.open_connections() > self.fd_budget:
            self.stats.refused_by["fd"] += 1
            self._fd_refusals.log(logging.WARNING, "refusing %s connection from %s: %d "
                                  "connections open, the most the open-file limit allows "
                                  "(RLIMIT_NOFILE less WATCHBUY_FD_RESERVE=%d)", session.protocol,
                                  session.peer, self.fd_budget, settings.fd_reserve,
                                  extra=session.log.extra)
            return False
        cap = settings.max_connections_per_ip
        host = session.peer_host
        if cap and host and (settings.per_ip_limit_loopback or not is_loopback(host)) and \
                not in_networks(host, self.per_ip_exempt):
            sessions = self.per_ip.setdefault(host, set())
            if len(sessions) >= cap:
                # release() normally keeps this exact; should a close ever miss it, the
                # sessions whose transports are closed must not count against the address.
                sessions.difference_update([s for s in sessions if s.transport.is_closing()])
            if len(sessions) >= cap:
                self.stats.refused_by["per_ip"] += 1
                self._ip_refusals.log(logging.WARNING, "refusing %s connection from %s: %d open "
                                      "from that address (WATCHBUY_MAX_CONNECTIONS_PER_IP)",
                                      session.protocol, session.peer, len(sessions),
                                      extra=session.log.extra)
                return False
            sessions.add(session)
            session.ip_slot = host
        return True

    def release(self, session) -> None:
        """A connection closed: give back its place in its address's count."""
        host, session.ip_slot = session.ip_slot, ""
        sessions = self.per_ip.get(host) if host else None
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self.per_ip[host]

    # -- stats for the HTTP API ---------------------------------------------------------------
    def streams_info(self, operator: bool = False) -> dict:
        streams = [s.info() for s in self.registry.streams.values()]
        if not operator:  # a publisher's IP:port is a host's home address: operators only
            for info in streams:
                info.pop("publisher", None)
        return {"node_id": self.settings.node_id, "streams": streams}

    def server_info(self) -> dict:
        """This process's counters: the node's, unless it is one worker of several (then the
        node's are :meth:`Cluster.server_info`, which sums every worker's of these)."""
        rx, tx = self.stats.rates()
        cluster = self.cluster
        relays = cluster.relay_viewers if cluster is not None else 0
        publishers = len(self.registry.streams) if cluster is None else \
            sum(1 for claim in cluster.claims.values() if claim.stream is not None)
        return {
            "node_id": self.settings.node_id,
            "uptime": round(time.monotonic() - self.started_mono, 1),
            "connections": dict(self.stats.connections),
            "connections_total": self.stats.connections_total,
            "connections_refused": self.stats.connections_refused,
            "publishers": publishers,
            "viewers": self.registry.viewer_count() - relays,
            "bytes_in": self.stats.bytes_in,
            "bytes_out": self.stats.bytes_out,
            "bytes_in_per_s": round(rx),
            "bytes_out_per_s": round(tx),
            "codecs": implementations(),
        }
