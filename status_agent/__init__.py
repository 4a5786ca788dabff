"""watchbuy.status_agent: per-node traffic sampler."""
