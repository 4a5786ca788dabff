"""The schema: SQLAlchemy Core tables, the one source for SQLite and MySQL/MariaDB.

Hosts and shoppers are one ``users`` table (a host can shop too).  A host's live room is a
``channels`` row that keeps the secret stream key apart from the public stream name, so links can
be shared without letting anyone publish.  Each login is a ``sessions`` row with its own expiry,
so one device can be logged out or time out without touching the others.  Money is integer minor
units plus an ISO currency code, never a float, in 64-bit columns (BIGINT on MySQL, whose INT
stops at 2^31).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# MySQL needs lengths on indexed strings; SQLite ignores them.  Times are Unix seconds in a
# Double: MySQL's FLOAT is single precision, minutes off at today's epoch (and shown to 6 digits).
EMAIL = 254
NAME = 120
TOKEN = 64
ADDRESS_LINE = 200
PATH = 500

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("email", sa.String(EMAIL), nullable=False, unique=True),
    sa.Column("display_name", sa.String(NAME), nullable=False),
    sa.Column("password_hash", sa.String(255), nullable=False),
    sa.Column("is_host", sa.Boolean, nullable=False, default=False),
    sa.Column("is_admin", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Double, nullable=False),
    # "<first name> just bought …" in the room; a shopper can opt out in settings
    sa.Column("announce_purchases", sa.Boolean, nullable=False, server_default=sa.true()),
    # host avatar (a stored image name, as products.image)
    sa.Column("avatar", sa.String(255), nullable=True),
    # one-tap buying: the payment saved after the first successful payment.  Stripe: the
    # Customer and its PaymentMethod; test mode: a test card's brand and last four only.
    sa.Column("stripe_customer_id", sa.String(255), nullable=True),
    sa.Column("saved_payment_method", sa.String(255), nullable=True),
    sa.Column("saved_card_brand", sa.String(20), nullable=True),
    sa.Column("saved_card_last4", sa.String(4), nullable=True),
)

sessions = sa.Table(
    "sessions",
    metadata,
    # sha256 of the cookie value: a leaked table does not leak usable cookies
    sa.Column("id", sa.String(TOKEN), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("csrf_token", sa.String(TOKEN), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("revoked", sa.Boolean, nullable=False, default=False),
)

login_attempts = sa.Table(
    "login_attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(EMAIL + 50), nullable=False, index=True),
    sa.Column("attempted_at", sa.Double, nullable=False),
)

channels = sa.Table(
    "channels",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("host_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
              nullable=False, unique=True),
    # public: in room links and play URLs
    sa.Column("slug", sa.String(64), nullable=False, unique=True),
    sa.Column("title", sa.String(NAME), nullable=False),
    # secret: only in the host studio and OBS
    sa.Column("stream_key", sa.String(TOKEN), nullable=False, unique=True),
    sa.Column("is_live", sa.Boolean, nullable=False, default=False),
    sa.Column("live_node_id", sa.String(64), nullable=True),
    sa.Column("live_since", sa.Double, nullable=True),
    sa.Column("last_live_at", sa.Double, nullable=True),
    sa.Column("pinned_product_id", sa.Integer, nullable=True),
    sa.Column("created_at", sa.Double, nullable=False),
)

products = sa.Table(
    "products",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("host_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("name", sa.String(NAME), nullable=False),
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("price_minor", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("stock", sa.Integer, nullable=False),
    sa.Column("image", sa.String(255), nullable=True),
    sa.Column("shown", sa.Boolean, nullable=False, default=True),  # listed in the live room
    # physical products need a shipping address at checkout
    sa.Column("physical", sa.Boolean, nullable=False, server_default=sa.true()),
    # units sold ("N sold" in the room), moved by the same conditional UPDATE as stock
    sa.Column("sold", sa.Integer, nullable=False, server_default="0"),
    sa.Column("deleted", sa.Boolean, nullable=False, default=False),  # orders keep snapshots
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.CheckConstraint("stock >= 0", name="ck_products_stock_nonnegative"),
    sa.CheckConstraint("price_minor >= 0", name="ck_products_price_nonnegative"),
)

cart_items = sa.Table(
    "cart_items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("product_id", sa.Integer, sa.ForeignKey("products.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("quantity", sa.Integer, nullable=False),
    sa.Column("added_at", sa.Double, nullable=False),
    sa.UniqueConstraint("user_id", "product_id", name="uq_cart_user_product"),
)

orders = sa.Table(
    "orders",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
              nullable=False, index=True),
    # pending → paid | cancelled | expired; stock is reserved while pending.  A payment that
    # arrives for a cancelled/expired order makes it paid again (stock reserved anew) or
    # refunded (sold out meanwhile); status_note says which, for the shopper and the host.
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("total_minor", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("payment_ref", sa.String(255), nullable=True, unique=True),
    sa.Column("payment_mode", sa.String(16), nullable=False),  # stripe | test
    # no real money: the test-card form or Stripe's test keys (kept out of revenue)
    sa.Column("test_mode", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("status_note", sa.String(200), nullable=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("paid_at", sa.Double, nullable=True),
    sa.Column("closed_at", sa.Double, nullable=True),
    # the shipping address, copied from the address book at checkout (the book may change)
    sa.Column("ship_name", sa.String(NAME), nullable=True),
    sa.Column("ship_line1", sa.String(ADDRESS_LINE), nullable=True),
    sa.Column("ship_line2", sa.String(ADDRESS_LINE), nullable=True),
    sa.Column("ship_city", sa.String(NAME), nullable=True),
    sa.Column("ship_postal_code", sa.String(20), nullable=True),
    sa.Column("ship_region", sa.String(NAME), nullable=True),
    sa.Column("ship_country", sa.String(2), nullable=True),
    # paid → shipped: set by the host in Sales
    sa.Column("shipped_at", sa.Double, nullable=True),
    sa.Column("carrier", sa.String(60), nullable=True),
    sa.Column("tracking_number", sa.String(100), nullable=True),
    # Buy now's press: the key the buy sheet made for it, so a press sent again (its answer
    # lost to a dropped connection or a restarted process) finds its order, not a second one
    sa.Column("request_key", sa.String(64), nullable=True),
    sa.Index("ux_orders_user_request", "user_id", "request_key", unique=True),
)

order_items = sa.Table(
    "order_items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("order_id", sa.Integer, sa.ForeignKey("orders.id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("product_id", sa.Integer, nullable=False),
    sa.Column("host_id", sa.Integer, nullable=False, index=True),
    # snapshots: what was bought at what price, whatever happens to the product later
    sa.Column("name", sa.String(NAME), nullable=False),
    sa.Column("unit_price_minor", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("quantity", sa.Integer, nullable=False),
    # the flash sale whose price applied (per-shopper limits count these)
    sa.Column("flash_sale_id", sa.Integer, nullable=True, index=True),
    # shipping is per seller: each host ships their own lines of a multi-seller order (the
    # order's own shipped_at is set once every seller has shipped)
    sa.Column("shipped_at", sa.Double, nullable=True),
    sa.Column("carrier", sa.String(60), nullable=True),
    sa.Column("tracking_number", sa.String(100), nullable=True),
)

chat_messages = sa.Table(
    "chat_messages",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("channel_id", sa.Integer, sa.ForeignKey("channels.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("user_id", sa.Integer, nullable=False),
    sa.Column("display_name", sa.String(NAME), nullable=False),
    sa.Column("text", sa.String(500), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False, default=False),
    sa.Index("ix_chat_channel_id", "channel_id", "id"),
)

chat_mutes = sa.Table(
    "chat_mutes",
    metadata,
    sa.Column("channel_id", sa.Integer, sa.ForeignKey("channels.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("user_id", sa.Integer, primary_key=True),
    sa.Column("created_at", sa.Double, nullable=False),
)

webhook_events = sa.Table(
    "webhook_events",
    metadata,
    # Stripe delivers at least once: the event id makes fulfilment happen exactly once
    sa.Column("id", sa.String(255), primary_key=True),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("received_at", sa.Double, nullable=False),
)

addresses = sa.Table(
    "addresses",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("name", sa.String(NAME), nullable=False),
    sa.Column("line1", sa.String(ADDRESS_LINE), nullable=False),
    sa.Column("line2", sa.String(ADDRESS_LINE), nullable=False, default=""),
    sa.Column("city", sa.String(NAME), nullable=False),
    sa.Column("postal_code", sa.String(20), nullable=False),
    sa.Column("region", sa.String(NAME), nullable=False, default=""),
    sa.Column("country", sa.String(2), nullable=False),  # ISO 3166-1 alpha-2
    sa.Column("is_default", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Double, nullable=False),
)

flash_sales = sa.Table(
    "flash_sales",
    metadata,
    # a timed sale on one product: a sale price and/or a sale quantity, an optional per-shopper
    # limit; the window and the quantity are enforced on the server at checkout
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("channel_id", sa.Integer, sa.ForeignKey("channels.id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("product_id", sa.Integer, sa.ForeignKey("products.id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("sale_price_minor", sa.BigInteger, nullable=True),
    sa.Column("quantity", sa.Integer, nullable=True),  # units at the sale price; None: no cap
    sa.Column("sold", sa.Integer, nullable=False, server_default="0"),
    sa.Column("per_shopper_limit", sa.Integer, nullable=True),
    sa.Column("starts_at", sa.Double, nullable=False),
    sa.Column("ends_at", sa.Double, nullable=False),
    sa.Column("ended_at", sa.Double, nullable=True),
    sa.Column("end_reason", sa.String(16), nullable=True),  # time | sold_out | host
    sa.Column("created_at", sa.Double, nullable=False),
)

shows = sa.Table(
    "shows",
    metadata,
    # a show's life: scheduled → live → ended (a host reconnecting within the grace period
    # resumes the same show)
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("channel_id", sa.Integer, sa.ForeignKey("channels.id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("title", sa.String(NAME), nullable=False),
    sa.Column("scheduled_at", sa.Double, nullable=True),
    sa.Column("cover", sa.String(255), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),  # scheduled | live | ended | cancelled
    sa.Column("started_at", sa.Double, nullable=True),
    sa.Column("ended_at", sa.Double, nullable=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Index("ix_shows_status_scheduled", "status", "scheduled_at"),
)

show_products = sa.Table(
    "show_products",
    metadata,
    sa.Column("show_id", sa.Integer, sa.ForeignKey("shows.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("product_id", sa.Integer, sa.ForeignKey("products.id", ondelete="CASCADE"),
              primary_key=True),
)

follows = sa.Table(
    "follows",
    metadata,
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("host_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Index("ix_follows_host", "host_id"),
)

reminders = sa.Table(
    "reminders",
    metadata,
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("show_id", sa.Integer, sa.ForeignKey("shows.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("notified_at", sa.Double, nullable=True),
    sa.Index("ix_reminders_show", "show_id"),
)

notifications = sa.Table(
    "notifications",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),  # live | reminder | …
    sa.Column("text", sa.String(255), nullable=False),
    sa.Column("url", sa.String(255), nullable=False),
    sa.Column("show_id", sa.Integer, nullable=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("read_at", sa.Double, nullable=True),
    sa.Index("ix_notifications_user", "user_id", "id"),
    # go_live reads a show's notifications (who was told already) under the channel's row lock
    sa.Index("ix_notifications_show", "show_id", "user_id"),
)

recordings = sa.Table(
    "recordings",
    metadata,
    # one publish of a channel, recorded by the node: FLV while live, then a seekable MP4
    # (faststart) in the data folder or S3
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("channel_id", sa.Integer, sa.ForeignKey("channels.id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("show_id", sa.Integer, nullable=True, index=True),
    sa.Column("stream_name", sa.String(64), nullable=False),
    sa.Column("node_id", sa.String(64), nullable=True),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("ended_at", sa.Double, nullable=True),
    sa.Column("duration", sa.Double, nullable=True),  # seconds of media
    sa.Column("status", sa.String(16), nullable=False),  # recording | processing | ready | failed | expired
    sa.Column("url", sa.String(PATH), nullable=True),  # where the replay plays from
    sa.Column("size_bytes", sa.BigInteger, nullable=True),
    sa.Column("error", sa.String(255), nullable=True),
    # the stream's media timestamp (ms) at the file's start: a pin's offset in the replay is
    # its media_ms less this
    sa.Column("media_start_ms", sa.BigInteger, nullable=True),
)

pins = sa.Table(
    "pins",
    metadata,
    # each pin on the stream's media clock (from the node), for in-band cues and replays
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("channel_id", sa.Integer, sa.ForeignKey("channels.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("show_id", sa.Integer, nullable=True, index=True),
    sa.Column("recording_id", sa.Integer, nullable=True, index=True),
    sa.Column("product_id", sa.Integer, nullable=True),  # None: unpinned
    sa.Column("media_ms", sa.BigInteger, nullable=True),  # the stream's timestamp, ms
    sa.Column("pinned_at", sa.Double, nullable=False),
    sa.Index("ix_pins_channel", "channel_id", "id"),
)
