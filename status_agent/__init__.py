"""watchbuy.status_agent: per-node traffic sampler and ``GET /status`` endpoint.

In the engine's own process (``watchbuy serve``)::

    from watchbuy.settings import load_config
    from watchbuy.status_agent import AgentSettings, StatusAgent

    agent = StatusAgent(load_config(AgentSettings, node_id=node.settings.node_id),
                        engine_info=node.server_info)   # read in-process, not over HTTP
    await agent.start()   # … await agent.stop()
"""

from watchbuy.status_agent.agent import StatusAgent
from watchbuy.status_agent.config import AgentSettings

__all__ = ["AgentSettings", "StatusAgent"]
