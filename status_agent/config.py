"""The status agent's settings (``WATCHBUY_AGENT_*``, plus the shared ``WATCHBUY_NODE_ID``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from watchbuy.settings import PREFIX, ConfigError, _default_node_id

RX_SOURCES = ("interfaces", "engine")


@dataclass(frozen=True)
class EngineAddress:
    host: str
    port: int
    path: str  # the engine's stats document, e.g. /api/server


def parse_engine_url(url: str) -> EngineAddress:
    """``http://host:port[/prefix]`` → where the engine's ``/api/server`` is."""
    parts = urlsplit(url)
    try:
        port = parts.port or 80
    except ValueError:
        raise ConfigError(f"{PREFIX}ENGINE_URL: bad port in {url!r}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(f"{PREFIX}ENGINE_URL: expected http://host:port, got {url!r}")
    return EngineAddress(parts.hostname, port, parts.path.rstrip("/") + "/api/server")


@dataclass
class AgentSettings:
    # Same variable as the media node's, so an agent and its engine report one id.
    node_id: str = field(default_factory=_default_node_id)
    agent_host: str = "0.0.0.0"
    agent_port: int = 8090
    # Interfaces whose counters are summed; empty means every interface except loopback.
    agent_interfaces: list[str] = field(default_factory=list)
    # Count loopback too when the interface list is automatic (a laptop, or tests on lo).
    agent_include_loopback: bool = False
    # "interfaces": the kernel's counters; "engine": the engine's own counted bytes, for several
    # nodes sharing one host's interfaces (all on loopback) where kernel counters can't tell
    # them apart.
    agent_rx_source: str = "interfaces"
    # The engine's HTTP port beside this agent; empty when no engine runs here.
    engine_url: str = "http://127.0.0.1:8000"
    agent_interval: float = 1.0
    agent_window: float = 5.0
    log_level: str = "INFO"

    def validate(self) -> None:
        if not 0 <= self.agent_port <= 65535:
            raise ConfigError(f"{PREFIX}AGENT_PORT: port {self.agent_port} is out of range 0..65535")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.node_id):
            raise ConfigError(f"{PREFIX}NODE_ID: use letters, digits, '-' and '_' only")
        if self.agent_rx_source not in RX_SOURCES:
            raise ConfigError(
                f"{PREFIX}AGENT_RX_SOURCE: one of {', '.join(RX_SOURCES)}, "
                f"got {self.agent_rx_source!r}"
            )
        if not 0.01 <= self.agent_interval <= 60:
            raise ConfigError(f"{PREFIX}AGENT_INTERVAL: between 0.01 and 60 seconds")
        if self.agent_window < 2 * self.agent_interval:
            raise ConfigError(
                f"{PREFIX}AGENT_WINDOW: at least two sampling intervals "
                f"({2 * self.agent_interval:g} s)"
            )
        if self.engine_url:
            parse_engine_url(self.engine_url)
        elif self.agent_rx_source == "engine":
            raise ConfigError(f"{PREFIX}ENGINE_URL: required when {PREFIX}AGENT_RX_SOURCE=engine")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"{PREFIX}LOG_LEVEL: one of DEBUG, INFO, WARNING, ERROR")

    @property
    def engine(self) -> EngineAddress | None:
        return parse_engine_url(self.engine_url) if self.engine_url else None
