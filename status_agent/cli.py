"""``watchbuy status-agent``: the per-node status endpoint for the balancer."""

from __future__ import annotations

import argparse
import asyncio

from watchbuy.settings import load_config
from watchbuy.status_agent.agent import StatusAgent
from watchbuy.status_agent.config import RX_SOURCES, AgentSettings


def settings_from(args: argparse.Namespace) -> AgentSettings:
    interfaces = getattr(args, "interfaces", None)
    return load_config(
        AgentSettings,
        node_id=args.node_id,
        agent_host=args.host,
        agent_port=args.port,
        agent_interfaces=(
            [i.strip() for i in interfaces.split(",") if i.strip()] if interfaces else None
        ),
        agent_include_loopback=True if args.include_loopback else None,
        agent_rx_source=args.rx_source,
        engine_url=args.engine_url,
        agent_interval=args.interval,
    )


def run_status_agent(args: argparse.Namespace) -> int:
    from watchbuy.cli import install_uvloop, run_until_signalled, setup_logging

    settings = settings_from(args)
    setup_logging(settings.log_level)
    install_uvloop()
    agent = StatusAgent(settings)

    async def start() -> None:
        await agent.start()
        # One line tests and ops can read back (the port may have been 0: chosen by the kernel).
        host = "127.0.0.1" if settings.agent_host in ("0.0.0.0", "") else settings.agent_host
        print(f"status agent for node {settings.node_id}: http://{host}:{agent.port}/status",
              flush=True)

    asyncio.run(run_until_signalled(start, agent.stop))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    agent = subparsers.add_parser(
        "status-agent", help="serve this node's traffic and engine counts for the balancer"
    )
    agent.add_argument("--host", help="listen address (default 0.0.0.0; WATCHBUY_AGENT_HOST)")
    agent.add_argument("--port", type=int, help="listen port (default 8090; WATCHBUY_AGENT_PORT)")
    agent.add_argument("--node-id", help="node id to report (default: WATCHBUY_NODE_ID, host name)")
    agent.add_argument(
        "--interfaces", help="comma-separated interfaces to count (default: all but loopback)"
    )
    agent.add_argument("--include-loopback", action="store_true",
                       help="count loopback too (local use)")
    agent.add_argument("--rx-source", choices=RX_SOURCES,
                       help="interfaces (kernel counters, default) or engine (its counted bytes)")
    agent.add_argument("--engine-url", help="the engine's HTTP base (default http://127.0.0.1:8000)")
    agent.add_argument("--interval", type=float, help="sampling interval in seconds (default 1)")
    agent.set_defaults(run=run_status_agent)
