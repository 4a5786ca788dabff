"""Between the worker processes of one media node: who publishes what, the relay of each
stream to every sibling, and the node-wide stats.

The model is nginx-rtmp's ``rtmp_auto_push``: the worker that accepts a publish announces the
stream to its siblings, and each sibling pulls it once over a Unix socket and fans it out to
its own viewers through its own :class:`~watchbuy.engine.relay.LiveStream` (GOP cache, bounded
viewer queues, LL-HLS muxer: all per worker, as on a single-process node).

Everything lives in Linux's abstract Unix-socket namespace, under a token the supervisor
makes per run, so nothing is left on disk and a killed worker's names vanish with it:

* ``watchbuy.<token>.w<index>``: each worker's control socket.  One JSON line in, one JSON
  line out, then close: ``announce`` (a sibling has a new stream: pull it), ``origins`` (the
  streams this worker publishes: a restarted worker catches up with them), ``stats`` (this
  worker's streams and counters, for the node-wide answers).
* ``watchbuy.<token>.s.<digest of the name>``: one per published stream.  Binding it is the
  node-wide claim of the name (the kernel refuses a second bind, on whichever worker, and
  frees the name when the publishing process dies, even by SIGKILL), and it is where the
  siblings pull from: one JSON line (the LL-HLS MSN to start at, :func:`hls_join_msn`), then
  an FLV header and FLV tags, starting with what a late joiner gets
  (metadata, sequence headers, the GOP so far), so a viewer on any worker starts on a
  keyframe.  On the publishing worker each pull is one more viewer (kind ``worker``) getting
  the very tag bytes HTTP-FLV viewers get; the sibling demuxes them with the FLV reader.

When the publisher stops, or its worker dies, a sibling's pull sees the end of its socket
and ends the stream for its viewers as a publisher stop does.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from watchbuy.engine import metrics
from watchbuy.engine.codecs import amf, flvmux
from watchbuy.engine.relay import WORKER_KIND, LiveStream, Tag, Viewer
from watchbuy.engine.wire import MSG_AUDIO, MSG_DATA_AMF0, MSG_VIDEO
from watchbuy.logs import LogLimiter

if TYPE_CHECKING:
    from watchbuy.engine.node import MediaNode

log = logging.getLogger("watchbuy.engine.workers")
limited = LogLimiter(log)

CONTROL_TIMEOUT = 2.0  # seconds a sibling has to answer a control request
CONTROL_MAX_LINE = 4 * 1024 * 1024  # one stats answer: thousands of streams' info
REPULL_DELAY = 0.2  # after a pull ends, look once more whether its origin is still there
STATS_REUSE = 0.5  # seconds a round of every worker's stats answers node-wide requests


def control_address(token: str, index: int) -> str:
    return f"\0watchbuy.{token}.w{index}"


def stream_address(token: str, name: str) -> str:
    # A digest: stream names may be long or hold any character, an address has 107 bytes.
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return f"\0watchbuy.{token}.s.{digest}"


def same_user(sock) -> bool:
    """Whether the peer of a Unix socket runs as our user.  Abstract names have no file
    permissions and /proc/net/unix lists them to everyone on the machine: without this, any
    local account could read the operator-only stats (publisher addresses) or pull streams."""
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (OSError, AttributeError):
        return False
    return uid == os.getuid()


def unix_socket() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


class RelayOutSession:
    """The publishing worker's end of one sibling's pull: what a :class:`Viewer` needs of a
    session (transport, node, byte count, log context, the end of the stream)."""

    def __init__(self, cluster: Cluster, stream: LiveStream) -> None:
        self.cluster = cluster
        self.node = cluster.node
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self.viewer: WorkerViewer | None = None
        self.log = logging.LoggerAdapter(log, {"conn_id": f"worker-pull:{stream.name}"})

    def count_out(self, n: int) -> None:
        # Between our own processes: not the node's network traffic (bytes_out), which would
        # count the stream once more per sibling.
        self.cluster.relay_bytes_out += n

    def stream_ended(self, viewer: Viewer) -> None:
        if self.transport is not None:
            self.transport.close()  # after the queued tags: the sibling sees the end


class RelayOut(asyncio.Protocol):
    def __init__(self, cluster: Cluster, stream: LiveStream) -> None:
        self.session = RelayOutSession(cluster, stream)

    def connection_made(self, transport) -> None:
        session = self.session
        session.transport = transport
        if not same_user(transport.get_extra_info("socket")):
            limited.log(logging.WARNING, "worker pull of %r from another user refused",
                        session.stream.name)
            transport.abort()
            return
        if session.node.registry.get(session.stream.name) is not session.stream:
            transport.close()  # ended while the sibling was connecting
            return
        transport.write(json.dumps({"hls_msn": hls_join_msn(session.stream)}).encode() + b"\n")
        session.viewer = WorkerViewer(session)
        session.cluster.relay_viewers += 1
        session.stream.add_viewer(session.viewer)

    def data_received(self, data: bytes) -> None:
        pass  # a pull only reads

    def pause_writing(self) -> None:
        if self.session.viewer is not None:
            self.session.viewer.pause_writing()

    def resume_writing(self) -> None:
        if self.session.viewer is not None:
            self.session.viewer.resume_writing()

    def connection_lost(self, exc) -> None:
        viewer, self.session.viewer = self.session.viewer, None
        if viewer is not None:
            self.session.cluster.relay_viewers -= 1
            viewer.closed = True
            self.session.stream.remove_viewer(viewer)


def hls_join_msn(stream: LiveStream) -> int | None:
    """The LL-HLS media sequence number a sibling starting on this stream's cached GOP should
    give its first segment, so that its playlists name segments as ours do: ours before the
    first segment, or the open segment's when that segment starts at the GOP's keyframe (the
    sibling then cuts where we did).  None otherwise (a GOP shorter than the segment target,
    joined mid-segment): the sibling numbers its own from its clock, as a node does, rather
    than give different media the names of ours."""
    hls = stream.hls
    if hls is None:
        return None
    if not hls.segments:
        return hls.first_msn
    segment = hls.segments[-1]
    if stream.gop and stream.gop[0].timestamp == segment.start:
        return segment.msn
    return None


class WorkerViewer(Viewer):
    """A sibling worker pulling a stream: FLV tags, the same bytes HTTP-FLV viewers get."""

    kind = WORKER_KIND

    def __init__(self, session) -> None:
        super().__init__(session)
        # It feeds a whole worker's viewers: it may hold a GOP in its queue before it is
        # treated as stalled (a sibling busy for a moment must not make all its viewers skip).
        limits = self.limits
        self.transport.set_write_buffer_limits(
            high=limits.gop_max_bytes + limits.viewer_queue_bytes)

    def encoding_key(self) -> object:
        return WORKER_KIND

    def encode(self, tags: list[Tag]) -> list[bytes]:
        return [tag.flv for tag in tags]

    def start(self, stream: LiveStream) -> None:
        self.write([flvmux.flv_header(True, True), *(tag.flv for tag in stream.startup_tags())])


class Pull(asyncio.Protocol):
    """A sibling's stream, pulled from its publishing worker and fanned out here."""

    def __init__(self, cluster: Cluster, name: str, app: str) -> None:
        self.cluster = cluster
        self.name = name
        self.app = app
        self.stream: LiveStream | None = None
        self.reader = flvmux.FlvReader(cluster.node.settings.max_message_size)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.head = b""  # until the publishing worker's JSON line has come

    def connection_made(self, transport) -> None:
        self.transport = transport

    def begin(self, line: bytes) -> None:
        """The publishing worker's first line: register the stream here."""
        try:
            msn = json.loads(line).get("hls_msn")
        except (ValueError, AttributeError):
            msn = None
        registry = self.cluster.node.registry
        self.stream = registry.start(self.name, self.app, publisher="",
                                     hls_first_msn=msn if isinstance(msn, int) else None)
        if self.stream is None:  # live here already (a pull that has not seen its end yet)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            self.head += data
            line, newline, data = self.head.partition(b"\n")
            if not newline:
                if len(self.head) > 4096:  # our own sibling wrote it: a bug, one line
                    limited.log(logging.WARNING, "worker %d: pull of %r: no header line",
                                self.cluster.index, self.name)
                    self.transport.abort()
                return
            self.head = None
            self.begin(line)
        stream = self.stream
        if stream is None or not data:
            return
        try:
            tags = self.reader.feed(data)
        except ValueError as exc:  # FLVError: our own sibling wrote it, so a bug; one line
            limited.log(logging.WARNING, "worker %d: pull of %r broken: %s",
                        self.cluster.index, self.name, exc)
            self.transport.abort()
            return
        node = self.cluster.node
        for type_id, timestamp, payload in tags:
            if type_id == MSG_VIDEO or type_id == MSG_AUDIO:
                stream.on_media(type_id, timestamp, payload)
            elif type_id == MSG_DATA_AMF0:
                try:
                    values = amf.decode_amf0(
                        payload, max_nodes=node.settings.amf_max_nodes,
                        max_expanded_size=node.settings.amf_max_expanded_bytes)
                except ValueError:
                    continue
                if values and values[0] == "onMetaData":
                    stream.on_metadata(values)
                else:
                    stream.on_data(timestamp, payload)
        stream.flush()

    def connection_lost(self, exc) -> None:
        self.closed = True
        cluster = self.cluster
        if cluster.pulls.get(self.name) is self:
            del cluster.pulls[self.name]
        stream, self.stream = self.stream, None
        if stream is not None and cluster.node.registry.get(self.name) is stream:
            # The publisher stopped or its worker died: end it here as a publisher stop does.
            cluster.node.registry.stop(stream)
            if not cluster.stopping:
                cluster.spawn(cluster.repull(self.name, self.app))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


class Claim:
    """This worker publishes ``name``: the bound abstract socket, and its server once the
    stream is live."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.stream: LiveStream | None = None
        self.server: asyncio.AbstractServer | None = None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.sock.close()


class Cluster:
    """This worker's part of the node: claims, pulls, control socket, node-wide stats."""

    def __init__(self, node: MediaNode, token: str, index: int, count: int) -> None:
        self.node = node
        self.token = token
        self.index = index
        self.count = count
        self.claims: dict[str, Claim] = {}
        self.pulls: dict[str, Pull] = {}
        self.relay_bytes_out = 0
        self.relay_viewers = 0  # siblings' pulls of our streams: viewers the node must not count
        self.stopping = False
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stats_round: asyncio.Future | None = None
        self._stats_at = 0.0
        node.registry.listeners.append(self.on_stream)

    def siblings(self) -> list[int]:
        return [i for i in range(1, self.count + 1) if i != self.index]

    def spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- life ---------------------------------------------------------------------------------
    async def start(self) -> None:
        sock = unix_socket()
        # A restarted worker: its killed predecessor's name is freed with its process, but a
        # stopping one may hold it for a moment.
        for _ in range(50):
            try:
                sock.bind(control_address(self.token, self.index))
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                await asyncio.sleep(0.1)
        else:
            sock.close()
            raise OSError(f"media worker {self.index}: control socket still in use")
        self._server = await asyncio.start_unix_server(self._control, sock=sock,
                                                       limit=CONTROL_MAX_LINE)
        # Streams the siblings publish already (we were restarted, or started late).
        answers = await asyncio.gather(*(self.request(i, {"op": "origins"})
                                         for i in self.siblings()))
        for answer in answers:
            for item in (answer or {}).get("streams", ()):
                self.pull(str(item["name"]), str(item["app"]))

    async def close(self) -> None:
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for pull in list(self.pulls.values()):
            pull.close()
        for claim in self.claims.values():
            claim.close()
        self.claims.clear()
        for task in list(self._tasks):
            task.cancel()

    # -- claims: one publisher per name on the whole node -------------------------------------
    def claim(self, name: str) -> bool:
        """Claim ``name`` for a publisher on this worker: False when another worker publishes
        it.  True when it is this worker's already (the registry and the same-key take-over
        decide, as on one process)."""
        if name in self.claims:
            return True
        sock = unix_socket()
        try:
            sock.bind(stream_address(self.token, name))
            sock.listen(64)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
        self.claims[name] = Claim(sock)
        pull = self.pulls.pop(name, None)
        if pull is not None:
            # The name's earlier publisher (on a sibling) is gone, or we could not have bound
            # it; our copy has not seen its end yet: end it before the new publish registers.
            pull.close()
            stream = self.node.registry.get(name)
            if stream is not None and pull.stream is stream:
                pull.stream = None
                self.node.registry.stop(stream)
        return True

    def unclaim(self, name: str) -> None:
        """A claim that did not become a publish (the publish was refused after all)."""
        claim = self.claims.get(name)
        if claim is not None and claim.stream is None:
            del self.claims[name]
            claim.close()

    def on_stream(self, event: str, stream: LiveStream) -> None:
        """Registry listener: our publishes are served to, and announced to, the siblings."""
        claim = self.claims.get(stream.name)
        if claim is None:
            return  # a pulled stream: its end is the pull's business
        if event == "publish" and claim.stream is None:
            claim.stream = stream
            self.spawn(self._serve(claim, stream))
            for index in self.siblings():
                self.spawn(self.request(index, {"op": "announce", "name": stream.name,
                                                "app": stream.app}))
        elif event == "publish_done" and claim.stream is stream:
            del self.claims[stream.name]
            claim.close()

    async def _serve(self, claim: Claim, stream: LiveStream) -> None:
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_unix_server(lambda: RelayOut(self, stream),
                                                   sock=claim.sock)
        except OSError:  # the claim was closed (the stream ended) while the server started
            return
        if self.claims.get(stream.name) is not claim:
            server.close()  # the stream ended while the server was starting
            return
        claim.server = server

    # -- pulls --------------------------------------------------------------------------------
    def pull(self, name: str, app: str) -> None:
        if name in self.pulls or name in self.claims or self.stopping:
            return
        sock = unix_socket()
        try:
            sock.connect(stream_address(self.token, name))
        except OSError:
            sock.close()  # ended already (ECONNREFUSED) or not served yet (EAGAIN): an
            return        # announce, or the next restart's catch-up, brings it
        pull = Pull(self, name, app)
        self.pulls[name] = pull
        self.spawn(self._connect(pull, sock))

    async def _connect(self, pull: Pull, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_unix_connection(lambda: pull, sock=sock)
        except OSError:
            sock.close()
            if self.pulls.get(pull.name) is pull:
                del self.pulls[pull.name]

    async def repull(self, name: str, app: str) -> None:
        """A pull ended: the publisher stopped, its worker died, or our link was cut as a
        stalled viewer.  In the last case the stream is still served: pull it again."""
        await asyncio.sleep(REPULL_DELAY)
        self.pull(name, app)

    # -- control requests ---------------------------------------------------------------------
    async def request(self, index: int, message: dict) -> dict | None:
        """Ask sibling ``index``; None when it is not there (restarting) or does not answer."""
        sock = unix_socket()
        writer = None
        try:
            async with asyncio.timeout(CONTROL_TIMEOUT):
                await asyncio.get_running_loop().sock_connect(
                    sock, control_address(self.token, index))
                reader, writer = await asyncio.open_unix_connection(sock=sock,
                                                                    limit=CONTROL_MAX_LINE)
                writer.write(json.dumps(message).encode() + b"\n")
                line = await reader.readline()
            return json.loads(line) if line else None
        except (OSError, TimeoutError, ValueError):
            return None
        finally:
            if writer is not None:
                writer.close()
            else:
                sock.close()

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not same_user(writer.get_extra_info("socket")):
            limited.log(logging.WARNING, "control request from another user refused")
            writer.close()
            return
        try:
            line = await asyncio.wait_for(reader.readline(), CONTROL_TIMEOUT)
            message = json.loads(line)
            op = message.get("op")
            answer: dict = {"ok": True}
            if op == "announce":
                self.pull(str(message["name"]), str(message["app"]))
            elif op == "origins":
                answer["streams"] = [{"name": c.stream.name, "app": c.stream.app}
                                     for c in self.claims.values() if c.stream is not None]
            elif op == "stats":
                answer = self.local_stats()
            elif op == "metrics":
                answer = {"index": self.index, "text": self.local_metrics()}
            elif op == "cue":  # a pin for a stream published here (engine/cues.py)
                name = str(message["name"])
                product_id = message.get("product_id")
                nonce = message.get("nonce")
                answer = (self.node.cues.insert(name, product_id if isinstance(product_id, int)
                                                else None, nonce if isinstance(nonce, str)
                                                else None)
                          if name in self.claims else {"ok": False})
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError, ValueError, KeyError, AttributeError):
            pass  # only our own processes reach this socket; a broken request just ends
        finally:
            writer.close()

    async def forward_cue(self, name: str, product_id: int | None,
                          nonce: str | None = None) -> dict | None:
        """A cue point for ``name`` put in by the sibling that publishes it (which claims the
        signed call's ``nonce`` in its per-stream table): its answer (a refusal included), or
        None when no sibling holds the stream."""
        answers = await asyncio.gather(*(self.request(i, {"op": "cue", "name": name,
                                                           "product_id": product_id,
                                                           "nonce": nonce})
                                         for i in self.siblings()))
        return next((a for a in answers if a and ("media_ms" in a or "error" in a)), None)

    # -- node-wide stats ----------------------------------------------------------------------
    def local_stats(self) -> dict:
        streams = []
        for stream in self.node.registry.streams.values():
            info = stream.info()
            info["origin"] = stream.name in self.claims
            streams.append(info)
        return {"index": self.index, "pid": os.getpid(), "streams": streams,
                "server": self.node.server_info()}

    async def gather_stats(self) -> list[dict]:
        """Every worker's stats: this worker's as they are now, the siblings' from a round
        that requests arriving together share and that is reused for ``STATS_REUSE`` seconds
        (/api/streams is public, and each round costs a request to every sibling).

        Only the siblings' part is reused: a reused local part made a worker answer from
        before a publish it had itself registered (each worker has its own round), so the
        node said "live" on one worker and "not live" on the other moments later."""
        loop = asyncio.get_running_loop()
        if self._stats_round is None or (self._stats_round.done() and
                                         loop.time() - self._stats_at > STATS_REUSE):
            self._stats_at = loop.time()
            self._stats_round = asyncio.ensure_future(self._siblings_stats())
        # shield: one caller's closed connection must not cancel the others' round
        siblings = json.loads(json.dumps(await asyncio.shield(self._stats_round)))
        return [self.local_stats(), *siblings]

    async def _siblings_stats(self) -> list[dict]:
        answers = await asyncio.gather(*(self.request(i, {"op": "stats"})
                                         for i in self.siblings()))
        return [a for a in answers if a and "streams" in a]

    def local_metrics(self) -> str:
        return metrics.render(self.node.metrics).decode()

    async def metrics_text(self) -> bytes:
        """``/metrics`` for the node: every worker's series, each with a ``worker`` label, so
        a scrape reads the same series whichever worker answers (sum them by instance)."""
        answers = await asyncio.gather(*(self.request(i, {"op": "metrics"})
                                         for i in self.siblings()))
        texts = [(self.index, self.local_metrics()),
                 *((a["index"], a["text"]) for a in answers if a and "text" in a)]
        return merge_metrics(texts)

    async def streams_info(self, operator: bool) -> dict:
        return merge_streams(self.node.settings.node_id, await self.gather_stats(), operator)

    async def server_info(self) -> dict:
        return merge_server(await self.gather_stats())


def merge_streams(node_id: str, workers: list[dict], operator: bool) -> dict:
    """``/api/streams`` for the node from every worker's answer: each stream once, described
    by the worker that has its publisher (every field it gives, including ones this code does
    not know), with the viewers of all workers summed and counted per worker."""
    merged: dict[str, dict] = {}
    for worker in workers:
        for info in worker["streams"]:
            origin = info.pop("origin", False)
            by_kind = dict(info.get("viewers_by_kind") or {})
            relays = by_kind.pop(WORKER_KIND, 0)
            entry = merged.get(info["name"])
            if entry is None or (origin and not entry["origin"]):
                totals = entry["totals"] if entry else {"viewers": 0, "by_kind": {},
                                                        "by_worker": {}}
                entry = merged[info["name"]] = {"info": info, "origin": origin,
                                                "totals": totals}
            totals = entry["totals"]
            here = info.get("viewers", 0) - relays
            totals["viewers"] += here
            totals["by_worker"][str(worker["index"])] = here
            for kind, count in by_kind.items():
                totals["by_kind"][kind] = totals["by_kind"].get(kind, 0) + count
            if origin:
                entry["worker"] = worker["index"]
    streams = []
    for entry in merged.values():
        info = dict(entry["info"])
        totals = entry["totals"]
        info["viewers"] = totals["viewers"]
        info["viewers_by_kind"] = totals["by_kind"]
        info["viewers_by_worker"] = totals["by_worker"]
        info["worker"] = entry.get("worker")
        if not operator:  # a publisher's IP:port is a host's home address: operators only
            info.pop("publisher", None)
        streams.append(info)
    return {"node_id": node_id, "streams": streams, "workers": len(workers)}


def merge_metrics(texts: list[tuple[int, str]]) -> bytes:
    """Prometheus text from several workers' texts: each family once, every sample with the
    label ``worker`` (its worker's index) added."""
    families: dict[str, Metric] = {}
    for index, text in sorted(texts):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = family
                samples = []
            else:
                samples = merged.samples
            samples.extend(s._replace(labels={**s.labels, "worker": str(index)})
                           for s in family.samples)
            merged.samples = samples
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families:
    """A collector giving back metric families already made (prometheus-client's way in)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


SUMMED = ("connections_total", "connections_refused", "viewers", "bytes_in", "bytes_out",
          "bytes_in_per_s", "bytes_out_per_s")


def merge_server(workers: list[dict]) -> dict:
    """``/api/server`` for the node: counters summed over the workers, publishers counted once
    (where they publish), viewers without the siblings' pulls, and a line per worker."""
    first = workers[0]["server"]
    total = dict(first)
    for name in SUMMED:
        total[name] = sum(w["server"].get(name, 0) for w in workers)
    connections: dict[str, int] = {}
    for worker in workers:
        for kind, count in worker["server"].get("connections", {}).items():
            connections[kind] = connections.get(kind, 0) + count
    total["connections"] = connections
    total["uptime"] = max(w["server"].get("uptime", 0) for w in workers)
    total["publishers"] = sum(w["server"].get("publishers", 0) for w in workers)
    total["workers"] = [
        {"index": w["index"], "pid": w["pid"], "viewers": w["server"].get("viewers", 0),
         "publishers": w["server"].get("publishers", 0),
         "connections": w["server"].get("connections", {})}
        for w in sorted(workers, key=lambda w: w["index"])]
    return total

