"""Prometheus metrics of a media node, served at ``GET /metrics`` on its HTTP port.

Through ``prometheus-client``, but with a custom collector: the counters are the ones the data
path keeps anyway (:class:`~watchbuy.engine.node.ServerStats`, the stream registry), read when
Prometheus scrapes.  Nothing is incremented through a prometheus-client object per message or per
connection, so metrics cost the hot path nothing; a scrape costs a walk over the live streams.

Every node has its own :class:`CollectorRegistry` (tests and ``watchbuy serve`` run several
nodes, and the status agent, in one process), with the standard ``process_*`` metrics of this
process added.  Every name starts ``watchbuy_node_``; deploy/grafana/watchbuy.json charts them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from watchbuy.engine.codecs import implementations
from watchbuy.engine.relay import WORKER_KIND

if TYPE_CHECKING:
    from watchbuy.engine.node import MediaNode

# The text format every Prometheus version reads (prometheus-client's generate_latest writes it).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
PREFIX = "watchbuy_node_"
VIEWER_KINDS = ("flv", "rtmp")  # always reported, so a dashboard's series exist at 0
TIMEOUT_KINDS = ("rtmp_handshake", "rtmp_partial_message", "rtmp_publish_idle", "rtmp_idle",
                 "rtmp_drain", "http_header", "http_keepalive", "http_drain")


def _labelled(family, items, defaults: tuple[str, ...] = ()):
    """Fill a one-label family from ``{label: value}``, with ``defaults`` present at 0."""
    values = dict.fromkeys(defaults, 0)
    values.update(items)
    for label, value in sorted(values.items()):
        family.add_metric([label], value)
    return family


class NodeCollector:
    """Reads a :class:`MediaNode`'s counters at scrape time."""

    def __init__(self, node: MediaNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        stats = node.stats
        streams = list(node.registry.streams.values())
        # One worker of several: publishers and their bytes where they publish (a sibling's copy
        # would count them once per worker); viewers wherever they watch, without the pulls.
        cluster = node.cluster
        published = streams if cluster is None else \
            [s for s in streams if s.name in cluster.claims]
        info = GaugeMetricFamily(PREFIX + "info", "This media node: its id and codecs (always 1)",
                                 labels=["node_id", "chunk", "amf", "flvmux"])
        codecs = implementations()
        info.add_metric([node.settings.node_id, codecs["chunk"], codecs["amf"],
                         codecs["flvmux"]], 1)
        yield info
        yield GaugeMetricFamily(PREFIX + "streams", "Live streams (publishers) on this node",
                                value=len(published))
        viewers: dict[str, int] = {}
        per_stream = GaugeMetricFamily(PREFIX + "stream_viewers", "Viewers of each live stream",
                                       labels=["app", "stream", "protocol"])
        received = CounterMetricFamily(PREFIX + "stream_received_bytes",
                                       "Media bytes received from each live stream's publisher",
                                       labels=["app", "stream"])
        for stream in streams:
            kinds = dict.fromkeys(VIEWER_KINDS, 0)
            for viewer in stream.viewers:
                if viewer.kind != WORKER_KIND:
                    kinds[viewer.kind] = kinds.get(viewer.kind, 0) + 1
            for kind, count in kinds.items():
                per_stream.add_metric([stream.app, stream.name, kind], count)
                viewers[kind] = viewers.get(kind, 0) + count
        for stream in published:
            received.add_metric([stream.app, stream.name], stream.bytes_in)
        yield _labelled(GaugeMetricFamily(PREFIX + "viewers", "Viewers playing, by protocol",
                                          labels=["protocol"]), viewers, VIEWER_KINDS)
        yield per_stream
        yield received
        yield GaugeMetricFamily(PREFIX + "rtmp_players_waiting",
                                "RTMP players waiting for a stream to go live",
                                value=sum(len(s) for s in node.registry.waiting.values()))
        yield _labelled(CounterMetricFamily(PREFIX + "viewers_started",
                                            "Viewers that started playing, by protocol",
                                            labels=["protocol"]),
                        {kind: count for kind, count in stats.viewers_started.items()
                         if kind != WORKER_KIND}, VIEWER_KINDS)
        yield _labelled(GaugeMetricFamily(PREFIX + "connections", "Open connections by protocol",
                                          labels=["protocol"]), stats.connections)
        yield CounterMetricFamily(PREFIX + "connections_accepted", "Connections accepted",
                                  value=stats.connections_total)
        yield _labelled(CounterMetricFamily(
            PREFIX + "connections_refused",
            "Connections refused: per_ip (WATCHBUY_MAX_CONNECTIONS_PER_IP) or fd (open-file "
            "limit less WATCHBUY_FD_RESERVE)", labels=["reason"]),
            stats.refused_by, ("per_ip", "fd"))
        yield CounterMetricFamily(PREFIX + "received_bytes", "Bytes received on all connections",
                                  value=stats.bytes_in)
        yield CounterMetricFamily(PREFIX + "sent_bytes", "Bytes sent on all connections",
                                  value=stats.bytes_out)
        yield CounterMetricFamily(PREFIX + "viewer_keyframe_resyncs",
                                  "Times a viewer fell behind, lost tags and waited for the "
                                  "next keyframe", value=stats.keyframe_resyncs)
        yield CounterMetricFamily(PREFIX + "viewer_tags_dropped",
                                  "Media tags not sent to viewers that had fallen behind",
                                  value=stats.tags_dropped)
        yield CounterMetricFamily(PREFIX + "viewers_cut_off",
                                  "Viewers disconnected after stalling past "
                                  "WATCHBUY_STALL_TIMEOUT", value=stats.viewers_cut_off)
        yield _labelled(CounterMetricFamily(PREFIX + "publish_refused",
                                            "Publishes refused, by reason", labels=["reason"]),
                        stats.publish_refused, ("unauthorized", "already_live"))
        yield _labelled(CounterMetricFamily(
            PREFIX + "protocol_errors",
            "Connections dropped for malformed input: rtmp_handshake, rtmp, http (internal: a "
            "bug of ours)", labels=["kind"]),
            stats.protocol_errors, ("rtmp_handshake", "rtmp", "http"))
        yield _labelled(CounterMetricFamily(PREFIX + "timeouts",
                                            "Connections ended by a timeout, by kind",
                                            labels=["kind"]), stats.timeouts, TIMEOUT_KINDS)
        yield GaugeMetricFamily(PREFIX + "open_file_budget",
                                "Connections the open-file limit allows (0: no limit)",
                                value=node.fd_budget)
        recorder = node.recorder  # engine/record.py; None without a data folder
        if recorder is not None:
            yield _labelled(CounterMetricFamily(
                PREFIX + "recordings", "Recordings finished: ready (MP4 made, uploaded when "
                "S3 is set) or failed (a write error, WATCHBUY_RECORD_MAX_BUFFER, the remux)",
                labels=["result"]), {"ready": recorder.ready, "failed": recorder.failures})
        yield CounterMetricFamily(PREFIX + "cue_points", "Cue points (pins) put into live streams",
                                  value=node.cues.inserted)


def node_registry(node: MediaNode) -> CollectorRegistry:
    """A registry for one node: its collector and this process's ``process_*`` metrics."""
    registry = CollectorRegistry()
    registry.register(NodeCollector(node))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format."""
    return generate_latest(registry)
