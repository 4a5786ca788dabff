"""watchbuy.balancer: node discovery and least-ingest choice."""
