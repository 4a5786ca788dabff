"""The least-ingest choice: ask every node's agent at once, pick the lowest rx bytes/s.

One *round* queries every discovered node's ``/status`` concurrently, each under the same short
timeout, so a round lasts at most about the timeout however many nodes hang.  Rounds are cached
for ``cache_ttl`` seconds and shared: callers that arrive while a round is in flight await that
same round (single flight), so a burst of host page loads costs one query per node.

A node is a candidate when its agent answered, its engine is up (``engine_ok``) and it has
fewer publishers than the cap.  Candidates are ordered by rx bytes/s (ingest is what a new host
adds, so the node taking in least has most room), then by publishers, then by id so the order
is stable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field

from watchbuy import urls
from watchbuy.balancer.aws import BalancerError
from watchbuy.balancer.config import BalancerSettings, Node, is_loopback_host
from watchbuy.balancer.discovery import Discovery, discovery_from_settings
from watchbuy.status_agent.client import FetchError, fetch_json
from watchbuy.urls import url_host

log = logging.getLogger("watchbuy.balancer")


class NoHealthyNode(BalancerError):
    """No node can take a new stream; the text says why, node by node."""

    def __init__(self, message: str, statuses: list[NodeStatus] | None = None) -> None:
        super().__init__(message)
        self.statuses = statuses or []


@dataclass
class NodeStatus:
    """One node's answer in a round (or why there was none)."""

    node: Node
    ok: bool  # the agent answered with a usable document
    error: str = ""  # why not, when not ok
    node_id: str = ""  # the configured id, else the one the agent reported, else the host
    rx_bytes_per_s: float = 0.0
    tx_bytes_per_s: float = 0.0
    publishers: int = 0
    viewers: int = 0
    engine_ok: bool = False
    cpu_load: float = 0.0
    elapsed: float = 0.0  # seconds the query took
    raw: dict = field(default_factory=dict)

    def refusal(self, cap: int) -> str:
        """Why this node cannot take a new stream ('' when it can)."""
        if not self.ok:
            return f"unreachable ({self.error})"
        if not self.engine_ok:
            return "engine down"
        if cap and self.publishers >= cap:
            return f"full ({self.publishers}/{cap} publishers)"
        return ""


@dataclass(frozen=True)
class NodeChoice:
    """Where a host publishes and viewers play, for one node."""

    node_id: str
    host: str
    rtmp_url: str  # rtmp://host:port/live: OBS's "Server"; the stream key goes in its own field
    play_base: str  # + "/<name>.flv": the node's HTTP-FLV, or https://<cdn>/<node-id>/live
    agent_url: str
    stats_url: str  # the engine's HTTP base as the site reaches it (+ /api/server, /api/streams)
    rx_bytes_per_s: float | None = None
    publishers: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Round:
    statuses: list[NodeStatus]
    at: float  # monotonic time the round finished
    source: str  # discovery description, for messages


class Balancer:
    """``await balancer.choose()`` → the least-loaded healthy node.

    ``source`` is a :class:`BalancerSettings` (discovery, timeout, cache, cap and CDN from it) or
    any discovery object with ``async nodes()`` and ``describe()``; keyword arguments override
    the settings.
    """

    def __init__(
        self,
        source: BalancerSettings | Discovery,
        *,
        timeout: float | None = None,
        cache_ttl: float | None = None,
        publisher_cap: int | None = None,
        cdn_domain: str | None = None,
        app: str | None = None,
    ) -> None:
        if isinstance(source, BalancerSettings):
            settings = source
            self.discovery = discovery_from_settings(settings)
        else:
            settings = BalancerSettings()
            self.discovery = source
        self.timeout = settings.balancer_timeout if timeout is None else timeout
        self.cache_ttl = settings.balancer_cache_ttl if cache_ttl is None else cache_ttl
        self.publisher_cap = settings.publisher_cap if publisher_cap is None else publisher_cap
        self.cdn_domain = settings.cdn_domain if cdn_domain is None else cdn_domain
        self.app = app or settings.apps[0]
        self.rounds = 0  # how many rounds of queries ran (for tests and the dashboard)
        self._round: Round | None = None
        self._inflight: asyncio.Future | None = None
        self._stand_in_logged = False

    # -- public API ---------------------------------------------------------------------------
    async def choose(self) -> NodeChoice:
        """The node a new host should publish to; :class:`NoHealthyNode` when there is none."""
        current = await self.statuses()
        candidates = [s for s in current.statuses if not s.refusal(self.publisher_cap)]
        if not candidates:
            raise NoHealthyNode(self._no_node_message(current), current.statuses)
        best = min(candidates, key=lambda s: (s.rx_bytes_per_s, s.publishers, s.node_id))
        return self.choice_for(best.node, best.node_id, best)

    async def node_for(self, node_id: str) -> NodeChoice | None:
        """URLs of the node with this id (the one a stream is live on), healthy or not."""
        nodes = await self.discovery.nodes()
        for node in nodes:
            if node.node_id == node_id:
                return self.choice_for(node, node_id)
        if any(node.node_id is None for node in nodes):
            # Static entries without an id are known by what their agents report.
            for status in (await self.statuses()).statuses:
                if status.node.node_id is None and status.ok and status.node_id == node_id:
                    return self.choice_for(status.node, node_id, status)
        return None

    async def known_nodes(self) -> list[NodeChoice]:
        """Every discovered node's URLs, healthy or not (stats pages, the ops dashboard), except
        those :meth:`may_query` forbids: callers connect to these URLs.

        Asks no agent: unnamed static nodes carry the id their agent gave in the last round.
        """
        nodes = await self.discovery.nodes()
        reported = {}
        if self._round is not None:
            reported = {s.node: s.node_id for s in self._round.statuses if s.ok}
        return [self.choice_for(node, reported.get(node)) for node in nodes
                if self.may_query(node)]

    def may_query(self, node: Node) -> bool:
        """False when the node's status address is not to be connected to: discovery talked
        to a stand-in of AWS (moto, fake credentials), which invents instance addresses that
        may be anybody's, and the address is not loopback.  Logged once per balancer.

        Tests give such nodes loopback agent addresses; real AWS never gets here.
        """
        stand_in = getattr(self.discovery, "stand_in", "")
        if not stand_in or is_loopback_host(node.status_host):
            return True
        if not self._stand_in_logged:
            self._stand_in_logged = True
            log.warning("%s comes from a stand-in of AWS (%s): its nodes' agents are not "
                        "queried except on loopback addresses", self.discovery.describe(),
                        stand_in)
        return False

    async def statuses(self, fresh: bool = False) -> Round:
        """The cached round, or a new one (shared with concurrent callers)."""
        if not fresh and self._round is not None:
            if time.monotonic() - self._round.at < self.cache_ttl:
                return self._round
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._run_round())
        # shield: one caller giving up (a closed page) must not cancel everyone's round.
        return await asyncio.shield(self._inflight)

    def invalidate(self) -> None:
        """Forget the cached round (the next call queries again)."""
        self._round = None

    def choice_for(self, node: Node, node_id: str | None = None,
                   status: NodeStatus | None = None) -> NodeChoice:
        node_id = node_id or node.label
        if self.cdn_domain:
            play_base = urls.cdn_play_base(self.cdn_domain, node_id, self.app)
        else:
            play_base = urls.node_play_base(node.host, node.http_port, self.app)
        return NodeChoice(
            node_id=node_id,
            host=node.host,
            rtmp_url=urls.rtmp_url(node.host, node.rtmp_port, self.app),
            play_base=play_base,
            agent_url=f"http://{url_host(node.status_host)}:{node.agent_port}/status",
            stats_url=f"http://{url_host(node.status_host)}:{node.http_port}",
            rx_bytes_per_s=status.rx_bytes_per_s if status else None,
            publishers=status.publishers if status else None,
        )

    # -- rounds -------------------------------------------------------------------------------
    async def _run_round(self) -> Round:
        nodes = await self.discovery.nodes()
        deadline = asyncio.get_running_loop().time() + self.timeout
        statuses = list(await asyncio.gather(*(self._query(node, deadline) for node in nodes)))
        self.rounds += 1
        self._round = Round(statuses, time.monotonic(), self.discovery.describe())
        for status in statuses:
            if not status.ok:
                log.info("node %s: %s", status.node_id, status.error)
        return self._round

    async def _query(self, node: Node, deadline: float) -> NodeStatus:
        loop = asyncio.get_running_loop()
        started = loop.time()
        label = node.label
        if not self.may_query(node):
            return NodeStatus(node, ok=False, node_id=label,
                              error="not queried: its address came from a stand-in of AWS")
        try:
            doc = await fetch_json(node.status_host, node.agent_port, "/status", self.timeout,
                                   deadline)
        except FetchError as exc:
            return NodeStatus(node, ok=False, error=str(exc), node_id=label,
                              elapsed=loop.time() - started)
        elapsed = loop.time() - started
        try:
            reported = str(doc.get("node_id") or "")
            status = NodeStatus(
                node,
                ok=True,
                node_id=node.node_id or reported or node.host,
                rx_bytes_per_s=float(doc["rx_bytes_per_s"]),
                tx_bytes_per_s=float(doc.get("tx_bytes_per_s") or 0.0),
                publishers=int(doc.get("publishers") or 0),
                viewers=int(doc.get("viewers") or 0),
                engine_ok=doc.get("engine_ok") is True,
                cpu_load=float(doc.get("cpu_load") or 0.0),
                elapsed=elapsed,
                raw=doc,
            )
        except (KeyError, TypeError, ValueError):
            return NodeStatus(node, ok=False, error="agent answered without rx_bytes_per_s",
                              node_id=label, elapsed=elapsed)
        if node.node_id and reported and reported != node.node_id:
            log.warning("node %s: its agent reports node id %s", node.node_id, reported)
        return status

    def _no_node_message(self, current: Round) -> str:
        if not current.statuses:
            return f"no media node is available: none found in {current.source}"
        reasons = "; ".join(
            f"{s.node_id}: {s.refusal(self.publisher_cap)}" for s in current.statuses
        )
        return f"no media node can take a new stream right now ({reasons})"
