"""watchbuy.db: schema, migrations and queries."""
