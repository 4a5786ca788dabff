"""Prometheus metrics of the status agent, served at ``GET /metrics`` beside ``/status``.

The agent renders them once per sample, with the ``/status`` document, from what the sample just
measured; a scrape is answered from memory like any status request.  Names start
``watchbuy_agent_``; the kernel's byte counters are exposed as counters (``*_bytes_total``) so
Prometheus can take its own rates, and the agent's windowed rates as gauges.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from watchbuy.status_agent.agent import StatusAgent

PREFIX = "watchbuy_agent_"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes


class AgentCollector:
    """Reads the agent's last sample (``agent.status`` and ``agent.counters``)."""

    def __init__(self, agent: StatusAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        status = agent.status
        info = GaugeMetricFamily(PREFIX + "info", "This status agent: node id and rx source "
                                 "(always 1)", labels=["node_id", "rx_source"])
        info.add_metric([agent.settings.node_id, agent.settings.agent_rx_source], 1)
        yield info
        if not status:
            return
        received = CounterMetricFamily(PREFIX + "receive_bytes",
                                       "Bytes received, by counted source (interface or engine)",
                                       labels=["source"])
        sent = CounterMetricFamily(PREFIX + "transmit_bytes",
                                   "Bytes sent, by counted source (interface or engine)",
                                   labels=["source"])
        for name, (rx, tx) in sorted(agent.counters.items()):
            received.add_metric([name], rx)
            sent.add_metric([name], tx)
        yield received
        yield sent
        yield GaugeMetricFamily(PREFIX + "receive_bytes_per_second",
                                "Bytes received per second over the agent's window (all sources)",
                                value=status["rx_bytes_per_s"])
        yield GaugeMetricFamily(PREFIX + "transmit_bytes_per_second",
                                "Bytes sent per second over the agent's window (all sources)",
                                value=status["tx_bytes_per_s"])
        yield GaugeMetricFamily(PREFIX + "cpu_load", "Busy fraction of all CPUs over the window",
                                value=status["cpu_load"])
        yield GaugeMetricFamily(PREFIX + "load1", "One-minute load average",
                                value=status["load_1m"])
        yield GaugeMetricFamily(PREFIX + "engine_up",
                                "1 while the engine beside the agent answers, else 0",
                                value=1 if status["engine_ok"] else 0)
        if status["engine_ok"]:
            yield GaugeMetricFamily(PREFIX + "engine_publishers", "Live streams the engine has",
                                    value=status["publishers"])
            yield GaugeMetricFamily(PREFIX + "engine_viewers", "Viewers the engine serves",
                                    value=status["viewers"])


def agent_registry(agent: StatusAgent) -> CollectorRegistry:
    """A registry for one agent: its collector and this process's ``process_*`` metrics."""
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
