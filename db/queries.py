"""Every query the site runs, in one place, on top of :class:`~watchbuy.db.database.Database`.

Rows come back as plain dicts.  Writes run in transactions; stock changes only through
conditional updates (``stock = stock - q WHERE stock >= q``) whose affected-row count decides,
so concurrent buyers can never oversell, on SQLite and on MySQL alike.

Each write function puts its transaction's statements in an inner ``work()`` and hands it to
:meth:`Database.run_transaction`, which runs it again from the start when MariaDB picks it as
a deadlock victim: so ``work()`` only runs statements and returns, with no effect outside the
database.  Rows that may already exist are written with one upsert (:func:`upsert`), never a
delete then an insert.
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa

from watchbuy.db.database import Database, is_duplicate_key, now
from watchbuy.db.schema import (
    cart_items,
    channels,
    chat_messages,
    chat_mutes,
    flash_sales,
    login_attempts,
    order_items,
    orders,
    products,
    sessions,
    users,
    webhook_events,
)


class OutOfStock(Exception):
    """A product in the cart does not have the quantity asked for."""

    def __init__(self, product_name: str, product_id: int | None = None,
                 stock_seen: int | None = None) -> None:
        super().__init__(f"not enough {product_name} in stock")
        self.product_name = product_name
        self.product_id = product_id
        self.stock_seen = stock_seen  # the stock the refusal read, when it read one
        # the shopper's cart as read before any transaction, when the refusal came from that
        # read: the sold-out answer shows it without reading it again (the rush's common case)
        self.lines: list[dict] | None = None


class NotForSale(ValueError):
    """A product in the cart was hidden by its host: it cannot be ordered."""

    def __init__(self, product_name: str) -> None:
        super().__init__(f"{product_name} is not for sale any more: remove it from your cart")
        self.product_name = product_name


class OrderLimit(ValueError):
    """The shopper holds as many unpaid orders or units as one shopper may (stock hoarding)."""


class AddressRequired(ValueError):
    """A physical product is ordered without a shipping address."""

    def __init__(self, product_name: str) -> None:
        super().__init__(f"{product_name} is shipped: add a shipping address")


def as_dict(row) -> dict | None:
    return None if row is None else dict(row._mapping)


def as_dicts(rows) -> list[dict]:
    return [dict(row._mapping) for row in rows]


_compiled: dict[tuple[str, str], str] = {}


def compiled(db: Database, name: str, build) -> str:
    """The SQL text of the statement ``build()`` makes (named ``:parameters`` from its
    ``sa.bindparam``s), compiled once per dialect and kept: ``databases`` compiles every
    SQLAlchemy statement it runs, every time, and on the checkout path that compiling was
    the largest single cost (bench/site/rush.py --profile); a text statement costs it next to
    nothing.  Only for statements whose shape never changes."""
    key = (db.dialect_name, name)
    sql = _compiled.get(key)
    if sql is None:
        if db.dialect_name == "mysql":
            from sqlalchemy.dialects.mysql import dialect
        else:
            from sqlalchemy.dialects.sqlite import dialect
        sql = _compiled[key] = str(build().compile(dialect=dialect(paramstyle="named")))
    return sql


def upsert(db: Database, table: sa.Table, keys: tuple[str, ...], key_values: dict,
           changes: dict) -> sa.Insert:
    """INSERT of ``key_values | changes`` that, when a row with the same unique ``keys``
    exists, updates that row with ``changes`` instead: one statement, in each dialect's own
    syntax (ON DUPLICATE KEY UPDATE on MySQL, ON CONFLICT ... DO UPDATE on SQLite)."""
    values = {**key_values, **changes}
    if db.dialect_name == "mysql":
        from sqlalchemy.dialects.mysql import insert as mysql_insert

        return mysql_insert(table).values(**values).on_duplicate_key_update(**changes)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).values(**values).on_conflict_do_update(
        index_elements=list(keys), set_=changes)


# -- users and sessions ---------------------------------------------------------------------


async def create_user(db: Database, email: str, display_name: str, password_hash: str,
                      is_host: bool, is_admin: bool = False) -> int:
    async def work():
        return await db.execute(users.insert().values(
            email=email.lower(), display_name=display_name, password_hash=password_hash,
            is_host=is_host, is_admin=is_admin, created_at=now()))

    return await db.run_transaction(work)


async def user_by_email(db: Database, email: str) -> dict | None:
    return as_dict(await db.fetch_one(users.select().where(users.c.email == email.lower())))


async def user_by_id(db: Database, user_id: int) -> dict | None:
    return as_dict(await db.fetch_one(users.select().where(users.c.id == user_id)))


async def set_password_hash(db: Database, user_id: int, password_hash: str) -> None:
    async def work():
        await db.execute(users.update().where(users.c.id == user_id)
                         .values(password_hash=password_hash))

    return await db.run_transaction(work)


async def make_host(db: Database, user_id: int) -> None:
    async def work():
        await db.execute(users.update().where(users.c.id == user_id).values(is_host=True))

    return await db.run_transaction(work)


async def create_session(db: Database, session_hash: str, user_id: int, csrf_token: str,
                         lifetime: float) -> None:
    created = now()
    async def work():
        await db.execute(sessions.insert().values(
            id=session_hash, user_id=user_id, csrf_token=csrf_token, created_at=created,
            expires_at=created + lifetime, revoked=False))

    return await db.run_transaction(work)


async def session_user(db: Database, session_hash: str) -> tuple[dict, dict] | None:
    """(session, user) for a live session, or None when unknown, expired or revoked."""
    # Every logged-in request runs this first (AuthMiddleware): compiled once (see compiled())
    row = as_dict(await db.fetch_one(compiled(db, "session_user", _session_user_query),
                                     {"session_id": session_hash, "now": now()}))
    if row is None:
        return None
    user = {"id": row["user_id"], "email": row["email"], "display_name": row["display_name"],
            "is_host": bool(row["is_host"]), "is_admin": bool(row["is_admin"])}
    return row, user


def _session_user_query() -> sa.Select:
    return (
        sa.select(sessions, users.c.email, users.c.display_name, users.c.is_host,
                  users.c.is_admin)
        .select_from(sessions.join(users, users.c.id == sessions.c.user_id))
        .where(sessions.c.id == sa.bindparam("session_id"), sessions.c.revoked == sa.false(),
               sessions.c.expires_at > sa.bindparam("now"))
    )


async def revoke_session(db: Database, session_hash: str) -> None:
    async def work():
        await db.execute(sessions.update().where(sessions.c.id == session_hash)
                         .values(revoked=True))

    return await db.run_transaction(work)


async def prune_sessions(db: Database) -> int:
    """Delete sessions that can never be used again (expired or revoked); returns how many."""
    async def work():
        await db.execute(sessions.delete().where(
            sa.or_(sessions.c.expires_at <= now(), sessions.c.revoked == sa.true())))
        return await db.affected_rows()

    return await db.run_transaction(work)


async def record_login_attempt(db: Database, key: str) -> int:
    """Records an attempt (before it is checked, so concurrent ones count each other)."""
    async def work():
        return await db.execute(login_attempts.insert().values(key=key, attempted_at=now()))

    return await db.run_transaction(work)


async def login_attempt_window(db: Database, key: str, window: float,
                               attempt_id: int) -> tuple[int, float | None, float | None]:
    """(attempts in the window including ``attempt_id``, the oldest one's time, the latest
    other one's time) for ``key``."""
    since = now() - window
    row = await db.fetch_one(
        sa.select(sa.func.count(), sa.func.min(login_attempts.c.attempted_at))
        .where(login_attempts.c.key == key, login_attempts.c.attempted_at > since))
    count, oldest = row[0], row[1]
    latest = await db.fetch_val(
        sa.select(sa.func.max(login_attempts.c.attempted_at))
        .where(login_attempts.c.key == key, login_attempts.c.attempted_at > since,
               login_attempts.c.id != attempt_id))
    return int(count or 0), oldest, latest


async def forget_login_attempt(db: Database, *attempt_ids: int) -> None:
    """Undo :func:`record_login_attempt` for attempts that were refused or succeeded."""
    async def work():
        await db.execute(login_attempts.delete().where(login_attempts.c.id.in_(attempt_ids)))

    return await db.run_transaction(work)


async def recent_login_attempts(db: Database, key: str, window: float) -> int:
    return int(await db.fetch_val(
        sa.select(sa.func.count()).select_from(login_attempts)
        .where(login_attempts.c.key == key, login_attempts.c.attempted_at > now() - window)))


async def clear_login_attempts(db: Database, *keys: str) -> None:
    async def work():
        await db.execute(login_attempts.delete().where(login_attempts.c.key.in_(keys)))

    return await db.run_transaction(work)


async def prune_login_attempts(db: Database, older_than: float) -> int:
    """Delete attempts made more than ``older_than`` seconds ago; returns how many."""
    async def work():
        await db.execute(login_attempts.delete().where(
            login_attempts.c.attempted_at < now() - older_than))
        return await db.affected_rows()

    return await db.run_transaction(work)


# -- channels (a host's live room) ----------------------------------------------------------


def new_stream_key() -> str:
    return "wb_" + secrets.token_urlsafe(24)


async def create_channel(db: Database, host_id: int, slug: str, title: str) -> int:
    async def work():
        return await db.execute(channels.insert().values(
            host_id=host_id, slug=slug, title=title, stream_key=new_stream_key(),
            is_live=False, created_at=now()))

    return await db.run_transaction(work)


async def channel_by_host(db: Database, host_id: int) -> dict | None:
    return as_dict(await db.fetch_one(channels.select().where(channels.c.host_id == host_id)))


async def channel_by_slug(db: Database, slug: str) -> dict | None:
    return as_dict(await db.fetch_one(channels.select().where(channels.c.slug == slug)))


async def channel_by_key(db: Database, stream_key: str) -> dict | None:
    return as_dict(await db.fetch_one(
        channels.select().where(channels.c.stream_key == stream_key)))


async def channel_by_id(db: Database, channel_id: int) -> dict | None:
    return as_dict(await db.fetch_one(channels.select().where(channels.c.id == channel_id)))


async def regenerate_stream_key(db: Database, host_id: int) -> str:
    key = new_stream_key()
    async def work():
        await db.execute(channels.update().where(channels.c.host_id == host_id)
                         .values(stream_key=key))

    await db.run_transaction(work)
    return key


async def update_channel_title(db: Database, host_id: int, title: str) -> None:
    async def work():
        await db.execute(channels.update().where(channels.c.host_id == host_id)
                         .values(title=title))

    return await db.run_transaction(work)


async def set_live(db: Database, channel_id: int, live: bool, node_id: str | None) -> None:
    stamp = now()
    values = {"is_live": live, "live_node_id": node_id if live else None, "last_live_at": stamp}
    if live:
        values["live_since"] = stamp
    async def work():
        await db.execute(channels.update().where(channels.c.id == channel_id).values(**values))

    return await db.run_transaction(work)


async def set_pinned(db: Database, channel_id: int, product_id: int | None) -> None:
    async def work():
        await db.execute(channels.update().where(channels.c.id == channel_id)
                         .values(pinned_product_id=product_id))

    return await db.run_transaction(work)


async def list_rooms(db: Database, limit: int = 50) -> list[dict]:
    """Live rooms first (newest live first), then recently live, then the rest."""
    query = (
        sa.select(channels, users.c.display_name.label("host_name"),
                  users.c.avatar.label("host_avatar"))
        .select_from(channels.join(users, users.c.id == channels.c.host_id))
        .order_by(channels.c.is_live.desc(), sa.func.coalesce(channels.c.last_live_at, 0).desc(),
                  channels.c.id.desc())
        .limit(limit)
    )
    return as_dicts(await db.fetch_all(query))


# -- products ---------------------------------------------------------------------------------


async def create_product(db: Database, host_id: int, name: str, description: str,
                         price_minor: int, currency: str, stock: int,
                         image: str | None) -> int:
    stamp = now()
    async def work():
        return await db.execute(products.insert().values(
            host_id=host_id, name=name, description=description, price_minor=price_minor,
            currency=currency, stock=stock, image=image, shown=True, deleted=False,
            created_at=stamp, updated_at=stamp))

    return await db.run_transaction(work)


def product_row(row: dict | None) -> dict | None:
    """A product read by a compiled text statement, its booleans made bool (such rows carry
    the drivers' 0/1)."""
    if row is not None:
        for name in ("shown", "physical", "deleted"):
            row[name] = bool(row[name])
    return row


async def product(db: Database, product_id: int) -> dict | None:
    # compiled once: every Buy now and every cart change reads it
    return product_row(as_dict(await db.fetch_one(compiled(db, "product", _product_query),
                                                  {"product_id": product_id})))


def _product_query() -> sa.Select:
    return products.select().where(products.c.id == sa.bindparam("product_id"),
                                   products.c.deleted == sa.false())


async def product_stock_room(db: Database,
                             product_id: int) -> tuple[int, int | None, int, str] | None:
    """(stock, the id of its host's room or None, units sold, name) of a product on sale;
    None when it is hidden or gone.  One query: what a stock event needs."""
    row = await db.fetch_one(compiled(db, "product_stock_room", _stock_room_query),
                             {"product_id": product_id})
    return None if row is None else (int(row[0]), None if row[1] is None else int(row[1]),
                                     int(row[2]), row[3])


def _stock_room_query() -> sa.Select:
    return (sa.select(products.c.stock, channels.c.id, products.c.sold, products.c.name)
            .select_from(products.outerjoin(channels, channels.c.host_id == products.c.host_id))
            .where(products.c.id == sa.bindparam("product_id"),
                   products.c.deleted == sa.false(), products.c.shown == sa.true()))


async def host_products(db: Database, host_id: int, shown_only: bool = False) -> list[dict]:
    query = products.select().where(products.c.host_id == host_id,
                                    products.c.deleted == sa.false())
    if shown_only:
        query = query.where(products.c.shown == sa.true())
    return as_dicts(await db.fetch_all(query.order_by(products.c.id)))


async def update_product(db: Database, host_id: int, product_id: int,
                         stock_delta: int | None = None, **values) -> bool:
    """Changes a product of this host; False when it is not theirs (or gone).

    ``stock_delta`` changes the stock relative to what it is now, in the same conditional
    update that guards checkouts (never below zero), so a host's edit and concurrent sales
    both count; False when the stock would go negative.
    """
    values["updated_at"] = now()
    query = products.update().where(
        products.c.id == product_id, products.c.host_id == host_id,
        products.c.deleted == sa.false())
    if stock_delta is not None:
        query = query.where(products.c.stock + stock_delta >= 0)
        values["stock"] = products.c.stock + stock_delta
    async def work():
        await db.execute(query.values(**values))
        return await db.affected_rows() == 1

    return await db.run_transaction(work)


async def set_product_shown(db: Database, host_id: int, product_id: int,
                            shown: bool) -> tuple[bool, list[int]]:
    """Shows or hides a product of this host: (changed, ids of channels it was unpinned from).

    A hidden product is not for sale, so it cannot stay pinned: the same transaction unpins it
    (the caller tells those rooms)."""
    async def work():
        await db.execute(products.update().where(
            products.c.id == product_id, products.c.host_id == host_id,
            products.c.deleted == sa.false()).values(shown=shown, updated_at=now()))
        if await db.affected_rows() != 1:
            return False, []
        unpinned: list[int] = []
        if not shown:
            unpinned = [int(row[0]) for row in await db.fetch_all(
                sa.select(channels.c.id).where(channels.c.pinned_product_id == product_id))]
            if unpinned:
                await db.execute(channels.update().where(channels.c.id.in_(unpinned))
                                 .values(pinned_product_id=None))
        return True, unpinned

    return await db.run_transaction(work)


async def delete_product(db: Database, host_id: int, product_id: int) -> bool:
    async def work():
        await db.execute(products.update().where(
            products.c.id == product_id, products.c.host_id == host_id,
            products.c.deleted == sa.false()).values(deleted=True, shown=False,
                                                     updated_at=now()))
        changed = await db.affected_rows() == 1
        if changed:
            await db.execute(cart_items.delete().where(cart_items.c.product_id == product_id))
            await db.execute(channels.update().where(
                channels.c.pinned_product_id == product_id).values(pinned_product_id=None))
        return changed

    return await db.run_transaction(work)


# -- cart ---------------------------------------------------------------------------------------


def _cart_query() -> sa.Select:
    return (
        sa.select(cart_items.c.product_id, cart_items.c.quantity, products.c.name,
                  products.c.price_minor, products.c.currency, products.c.stock,
                  products.c.image, products.c.host_id, products.c.shown, products.c.physical)
        .select_from(cart_items.join(products, products.c.id == cart_items.c.product_id))
        .where(cart_items.c.user_id == sa.bindparam("user_id"),
               products.c.deleted == sa.false())
        .order_by(cart_items.c.id)
    )


async def cart(db: Database, user_id: int) -> list[dict]:
    # read two or three times a checkout: compiled once (see compiled())
    return as_dicts(await db.fetch_all(compiled(db, "cart", _cart_query),
                                       {"user_id": user_id}))


async def set_cart_quantity(db: Database, user_id: int, product_id: int, quantity: int) -> None:
    """Sets (or with 0 removes) a cart line; the caller has validated against stock.

    One statement either way: an upsert on the (user, product) key, not a delete then an
    insert, whose gap locks on the cart index deadlocked shoppers adding to their own carts at
    the same moment on MariaDB."""
    async def work() -> None:
        if quantity > 0:
            await db.execute(upsert(db, cart_items, ("user_id", "product_id"),
                                    {"user_id": user_id, "product_id": product_id},
                                    {"quantity": quantity, "added_at": now()}))
        else:
            await db.execute(cart_items.delete().where(cart_items.c.user_id == user_id,
                                                       cart_items.c.product_id == product_id))

    return await db.run_transaction(work)


async def cart_quantity(db: Database, user_id: int, product_id: int) -> int:
    value = await db.fetch_val(sa.select(cart_items.c.quantity).where(
        cart_items.c.user_id == user_id, cart_items.c.product_id == product_id))
    return int(value or 0)


# -- orders -------------------------------------------------------------------------------------


async def pending_holdings(db: Database, user_id: int) -> tuple[int, dict[int, int]]:
    """(unpaid orders, units per product they hold) of this shopper: one query for both
    per-shopper limits (they are checked inside the checkout transaction, so every statement
    there counts)."""
    rows = await db.fetch_all(compiled(db, "pending_holdings", _holdings_query),
                              {"user_id": user_id})
    order_ids: set[int] = set()
    units: dict[int, int] = {}
    for row in rows:  # by index: a databases Record iterates over its keys
        order_id, product_id, quantity = row[0], row[1], row[2]
        order_ids.add(int(order_id))
        if product_id is not None:
            units[int(product_id)] = units.get(int(product_id), 0) + int(quantity)
    return len(order_ids), units


def _holdings_query() -> sa.Select:
    return (sa.select(orders.c.id, order_items.c.product_id, order_items.c.quantity)
            .select_from(orders.outerjoin(order_items, order_items.c.order_id == orders.c.id))
            # a literal, not a bound value: a compiled statement carries no values of its own
            .where(orders.c.user_id == sa.bindparam("user_id"),
                   orders.c.status == sa.literal_column("'pending'")))


async def pending_units(db: Database, user_id: int) -> dict[int, int]:
    """Units per product that this shopper's unpaid orders hold."""
    return (await pending_holdings(db, user_id))[1]


async def check_order_limits(db: Database, user_id: int, lines: list[dict],
                             max_pending: int | None, max_units: int | None) -> None:
    """Raises :class:`OrderLimit` when this cart would make the shopper hold more unpaid
    orders, or more units of one product, than one shopper may."""
    if max_pending is None and max_units is None:
        return
    pending, held = await pending_holdings(db, user_id)
    if max_pending is not None and pending >= max_pending:
        raise OrderLimit(f"you already have {pending} unpaid orders: pay or cancel one "
                         "before checking out again")
    if max_units is not None:
        for line in lines:
            have = held.get(line["product_id"], 0)
            if have + line["quantity"] > max_units:
                raise OrderLimit(f"at most {max_units} of {line['name']} per shopper"
                                 + (f" (your unpaid orders hold {have})" if have else ""))


def _check_cart(lines: list[dict]) -> str:
    """The cart's one currency; ValueError / NotForSale / OutOfStock for a cart that cannot
    become an order as read."""
    if not lines:
        raise ValueError("your cart is empty")
    currencies = {line["currency"] for line in lines}
    if len(currencies) != 1:
        raise ValueError("items in different currencies must be bought separately")
    for line in lines:
        if not line["shown"]:
            raise NotForSale(line["name"])
    return currencies.pop()


def _reserve_query() -> sa.Update:
    """The hot-row statement: ``stock = stock - q`` only where ``stock >= q``."""
    return (products.update()
            .where(products.c.id == sa.bindparam("product_id"),
                   products.c.stock >= sa.bindparam("quantity"),
                   # hidden since the cart was read: refused in the same statement
                   products.c.shown == sa.true(), products.c.deleted == sa.false())
            .values(stock=products.c.stock - sa.bindparam("quantity"),
                    # "N sold" moves with the stock, in the same statement
                    sold=products.c.sold + sa.bindparam("quantity"),
                    updated_at=sa.bindparam("stamp")))


def _stock_query() -> sa.Select:
    return sa.select(products.c.stock).where(products.c.id == sa.bindparam("product_id"))


async def stock_left(db: Database, product_id: int) -> int:
    """The product's stock now (0 for a product gone): read inside a checkout's transaction."""
    left = await db.fetch_val(compiled(db, "stock", _stock_query), {"product_id": product_id})
    return int(left or 0)


def _lock_shopper_query() -> sa.Select:
    return sa.select(users.c.id).where(users.c.id == sa.bindparam("user_id")).with_for_update()


async def lock_shopper(db: Database, user_id: int) -> None:
    """MariaDB, inside a checkout's transaction: the shopper's own row locked, so that one
    checkout per shopper runs at a time (their limits count their other pending orders).
    Before any plain read: InnoDB takes the transaction's snapshot at the first one, which must
    come after this lock for the counts to see the shopper's other checkouts."""
    await db.fetch_val(compiled(db, "lock_shopper", _lock_shopper_query), {"user_id": user_id})


async def create_order_from_cart(db: Database, user_id: int, payment_mode: str,
                                 test_mode: bool | None = None, max_pending: int | None = None,
                                 max_units: int | None = None, needs_address: bool = False,
                                 address_id: int | None = None) -> dict:
    """Cart → pending order with price snapshots, stock reserved, cart emptied: all or nothing.

    Raises :class:`OutOfStock` (and changes nothing) when any line cannot be reserved,
    :class:`NotForSale` for a hidden product, :class:`OrderLimit` past ``max_pending`` unpaid
    orders or ``max_units`` units of one product held by this shopper, and ValueError for an
    empty cart or mixed currencies.  ``test_mode`` (default: payment_mode "test") marks orders
    that are no real money.  With ``needs_address`` the shopper's address ``address_id`` (or
    their default) is copied onto the order, and a physical product without one raises
    :class:`AddressRequired`.
    A product with a flash sale running is priced at the sale's price for as many units as
    the sale still has (db/shopping.py ``claim_sale_units``, inside the transaction), past
    its per-shopper limit refused (``SaleLimit``, an OrderLimit).

    The hot-row design (a rush: thousands of shoppers, one product; figures in
    site/shop.py's docstring):

    * Sold out is answered without a write.  The cart is read (with each product's stock)
      before any transaction, and a line asking for more than is left is refused there.  The
      shoppers who read "in stock" just before the last unit went (in a rush: nearly all of
      them, they all read at once) are refused by the transaction's first statements: on
      MariaDB a plain read of the stock right after the shopper's own row lock, on SQLite the
      conditional UPDATE itself (see ``work``).  No order row is written and rolled back.
    * On MariaDB the product row is locked as briefly as possible: every other statement
      (limits, the order and its items, emptying the cart) comes first, and the conditional
      ``stock = stock - q WHERE stock >= q`` runs last, just before COMMIT, so the hot row's
      lock is held for one statement and the commit, not the whole transaction.  (SQLite
      locks the whole database per write transaction: there the UPDATE goes first.)
    * Each limit query is one statement, the items one multi-row INSERT.
    * The order is returned as built here, not read back (two queries fewer a checkout).
    """
    from watchbuy.db import shopping  # it builds on this module

    lines = await cart(db, user_id)
    currency = _check_cart(lines)
    for line in lines:
        if line["stock"] < line["quantity"]:
            # the cheap answer the sold-out crowd gets
            refusal = OutOfStock(line["name"], line["product_id"], line["stock"])
            refusal.lines = lines
            raise refusal
    # taken again at the start of each attempt of ``work()``: a checkout that waited for a lock
    # past a flash sale's end pays the regular price (the window is checked against it)
    stamp = now()
    is_test = payment_mode == "test" if test_mode is None else test_mode

    wanted = sorted((line["product_id"], line["quantity"]) for line in lines)
    by_product = {line["product_id"]: line for line in lines}

    async def reserve() -> None:
        # In one global order (product id) so that concurrent checkouts of several products
        # never deadlock.
        for product_id, quantity in wanted:
            await db.execute(compiled(db, "reserve", _reserve_query), {
                "product_id": product_id, "quantity": quantity, "stamp": stamp})
            if await db.affected_rows() != 1:
                name = by_product[product_id]["name"]
                now_shown = await db.fetch_val(sa.select(products.c.shown).where(
                    products.c.id == product_id, products.c.deleted == sa.false()))
                if not now_shown:
                    raise NotForSale(name)
                # refused with stock < quantity: for one unit that proves none is left (the
                # rush's case, whose rooms are told "sold out" at once); for more it does not
                raise OutOfStock(name, product_id, 0 if quantity == 1 else None)  # rolls back

    async def work() -> tuple[int, list[dict], dict | None]:
        nonlocal stamp
        if db.dialect_name == "mysql":
            # One checkout per shopper at a time: the limits below count this shopper's
            # pending orders, and two concurrent checkouts must not both pass the count.  Only
            # the shopper's own row (no contention between shoppers).  Before any plain read:
            # InnoDB takes the transaction's snapshot at the first one, which must come after
            # this lock for the count to see the shopper's other checkouts.
            await lock_shopper(db, user_id)
            stamp = now()  # after the wait for the lock: see ``stamp`` above
            # The crowd that read "in stock" before the last unit went leaves here, with no
            # write and no lock on the product row.
            for product_id, quantity in wanted:
                left = await stock_left(db, product_id)
                if left < quantity:
                    raise OutOfStock(by_product[product_id]["name"], product_id, left)
        else:
            # SQLite: one writer at a time, so the order of the statements does not change how
            # long anything is locked: the conditional UPDATE comes first, and the crowd that
            # read "in stock" before the last unit went leaves after this one statement.  Being
            # a write, it also takes the write lock before anything is read: a transaction
            # that reads first and writes later cannot wait for the lock when another process
            # wrote meanwhile (it fails at once, SQLITE_BUSY_SNAPSHOT), so several site
            # processes on one SQLite file queue (busy_timeout) instead of failing.
            await reserve()
            stamp = now()  # after the wait for the write lock: see ``stamp`` above
        # read again inside the transaction: the cart may have changed since the first read
        current = await cart(db, user_id)
        if _check_cart(current) != currency or wanted != sorted(
                (line["product_id"], line["quantity"]) for line in current):
            raise ValueError("your cart changed during checkout: check it and try again")
        await check_order_limits(db, user_id, current, max_pending, max_units)
        # Read in the transaction, not before it: on SQLite a statement outside one costs a
        # connection of its own (db/database.py), the bulk of a checkout's time in a rush.
        address = None
        if needs_address:
            address = await shopping.chosen_address(db, user_id, address_id)
            for line in current:
                if address is None and line["physical"]:
                    raise AddressRequired(line["name"])  # rolls everything back
        await db.execute(cart_items.delete().where(cart_items.c.user_id == user_id))
        # The sale's row is locked from its claim to the commit: the claim comes after every
        # statement that does not need its outcome (the order's price does), just before the
        # products' rows, which every path locks after flash_sales (see release_order).
        sales = await shopping.active_sales_for_products(
            db, [line["product_id"] for line in current], stamp)
        prices = {line["product_id"]: (line["price_minor"], None) for line in current}
        for line in current:
            sale = sales.get(line["product_id"])
            if sale is not None and await shopping.claim_sale_units(
                    db, user_id, sale, line["quantity"], stamp, line["name"]):
                prices[line["product_id"]] = (
                    line["price_minor"] if sale["sale_price_minor"] is None
                    else sale["sale_price_minor"], sale["id"])
        total = sum(prices[line["product_id"]][0] * line["quantity"] for line in current)
        order_id = await db.execute(orders.insert().values(
            user_id=user_id, status="pending", total_minor=total, currency=currency,
            payment_mode=payment_mode, created_at=stamp, test_mode=is_test,
            **shopping.ship_values(address)))
        items = [{"order_id": order_id, "product_id": line["product_id"],
                  "host_id": line["host_id"], "name": line["name"],
                  "unit_price_minor": prices[line["product_id"]][0],
                  "currency": line["currency"], "quantity": line["quantity"],
                  "flash_sale_id": prices[line["product_id"]][1]} for line in current]
        await db.execute(order_items.insert().values(items))
        if db.dialect_name == "mysql":
            await reserve()  # the hot rows last, locked until the commit that follows
        return order_id, items, address

    order_id, items, address = await db.run_transaction(work)
    return {"id": order_id, "user_id": user_id, "status": "pending",
            "total_minor": sum(i["unit_price_minor"] * i["quantity"] for i in items),
            "currency": currency, "payment_mode": payment_mode, "payment_ref": None,
            "created_at": stamp, "paid_at": None, "closed_at": None, "status_note": None,
            "test_mode": is_test, "items": items, **shopping.ship_values(address)}


async def order(db: Database, order_id: int) -> dict | None:
    row = as_dict(await db.fetch_one(orders.select().where(orders.c.id == order_id)))
    if row is not None:
        row["items"] = as_dicts(await db.fetch_all(
            order_items.select().where(order_items.c.order_id == order_id)
            .order_by(order_items.c.id)))
    return row


async def set_payment_ref(db: Database, order_id: int, payment_ref: str) -> None:
    async def work():
        await db.execute(orders.update().where(orders.c.id == order_id)
                         .values(payment_ref=payment_ref))

    return await db.run_transaction(work)


async def order_by_payment_ref(db: Database, payment_ref: str) -> dict | None:
    row = as_dict(await db.fetch_one(orders.select().where(orders.c.payment_ref == payment_ref)))
    return None if row is None else await order(db, row["id"])


async def mark_paid(db: Database, order_id: int) -> bool:
    """pending → paid, once: True only for the call that made the change."""
    async def work():
        await db.execute(orders.update().where(orders.c.id == order_id,
                                               orders.c.status == "pending")
                         .values(status="paid", paid_at=now()))
        return await db.affected_rows() == 1

    return await db.run_transaction(work)


async def release_order(db: Database, order_id: int, status: str) -> bool:
    """pending → cancelled/expired, once, giving the reserved stock back.

    A Buy-now order also gives up its press's ``request_key``: the press bought nothing, so
    the buy sheet's key (kept after a failed payment) may make a new order, where the unique
    (user, key) index would otherwise answer every later press with the released order."""
    async def work():
        await db.execute(orders.update().where(orders.c.id == order_id,
                                               orders.c.status == "pending")
                         .values(status=status, closed_at=now(), request_key=None))
        if await db.affected_rows() != 1:
            return False
        items = await db.fetch_all(order_items.select().where(order_items.c.order_id == order_id))
        # The lock order of every path: flash_sales rows (by id), then products rows (by id).
        # A checkout claims the sale's units before it reserves the product; taking them the
        # other way round here deadlocked a sale rush on MariaDB (1213).
        for item in sorted(items, key=lambda item: item["flash_sale_id"] or 0):
            if item["flash_sale_id"] is not None:  # the sale's units go back to it too
                await db.execute(flash_sales.update()
                                 .where(flash_sales.c.id == item["flash_sale_id"])
                                 .values(sold=flash_sales.c.sold - item["quantity"]))
        for item in sorted(items, key=lambda item: item["product_id"]):
            await db.execute(products.update().where(products.c.id == item["product_id"])
                             .values(stock=products.c.stock + item["quantity"],
                                     sold=products.c.sold - item["quantity"]))
        return True

    return await db.run_transaction(work)


class _CannotReserve(Exception):
    """Rolls back a re-reservation that found too little stock."""


SALE_UNITS_GONE = "the flash sale's units were gone by then: sold above its quantity"


async def reopen_paid_order(db: Database, order_id: int) -> str | None:
    """A payment arrived for a cancelled/expired order: reserve its stock again and make it
    paid, all or nothing.  Returns the order's new status note, or None (nothing changed) when
    the stock is gone or the order is not cancelled/expired (any more).

    Lines bought at a flash sale's price take their units of the sale back too (the release
    gave them back), conditionally as a checkout does, but regardless of the sale's window:
    they were priced inside it.  When the sale's units are gone the shopper has paid the sale
    price already, so the order is kept and its note says so (:data:`SALE_UNITS_GONE`, the
    caller logs it) rather than refunding a payment the shop accepted.
    Locks flash_sales rows before products rows, as every path does (release_order)."""
    async def work() -> str | None:
        row = as_dict(await db.fetch_one(orders.select().where(orders.c.id == order_id)))
        if row is None or row["status"] not in ("cancelled", "expired"):
            return None
        items = as_dicts(await db.fetch_all(order_items.select()
                                            .where(order_items.c.order_id == order_id)))
        note = f"paid after it was {row['status']}; stock reserved again"
        for item in sorted(items, key=lambda item: item["flash_sale_id"] or 0):
            if item["flash_sale_id"] is None:
                continue
            await db.execute(flash_sales.update().where(
                flash_sales.c.id == item["flash_sale_id"],
                sa.or_(flash_sales.c.quantity.is_(None),
                       flash_sales.c.sold + item["quantity"] <= flash_sales.c.quantity))
                .values(sold=flash_sales.c.sold + item["quantity"]))
            if await db.affected_rows() != 1:
                note = f"{note}; {SALE_UNITS_GONE}"
        for item in sorted(items, key=lambda item: item["product_id"]):
            await db.execute(products.update().where(
                products.c.id == item["product_id"], products.c.deleted == sa.false(),
                products.c.stock >= item["quantity"])
                .values(stock=products.c.stock - item["quantity"],
                        sold=products.c.sold + item["quantity"], updated_at=now()))
            if await db.affected_rows() != 1:
                raise _CannotReserve
        await db.execute(orders.update().where(orders.c.id == order_id,
                                               orders.c.status == row["status"])
                         .values(status="paid", paid_at=now(), status_note=note))
        if await db.affected_rows() != 1:
            raise _CannotReserve  # changed meanwhile: undo the reservations
        return note

    try:
        return await db.run_transaction(work)
    except _CannotReserve:
        return None


async def mark_refunded(db: Database, order_id: int, note: str) -> bool:
    """cancelled/expired → refunded (the payment that came late went back), once."""
    async def work():
        await db.execute(orders.update().where(
            orders.c.id == order_id, orders.c.status.in_(("cancelled", "expired")))
            .values(status="refunded", status_note=note, closed_at=now()))
        return await db.affected_rows() == 1

    return await db.run_transaction(work)


async def user_orders(db: Database, user_id: int) -> list[dict]:
    """This shopper's orders, newest first, each with its items: two queries, however many
    orders (the items of all of them in one)."""
    rows = as_dicts(await db.fetch_all(
        orders.select().where(orders.c.user_id == user_id).order_by(orders.c.id.desc())))
    if not rows:
        return rows
    by_id = {row["id"]: row for row in rows}
    for row in rows:
        row["items"] = []
    items = as_dicts(await db.fetch_all(
        order_items.select()
        .select_from(order_items.join(orders, orders.c.id == order_items.c.order_id))
        .where(orders.c.user_id == user_id).order_by(order_items.c.id)))
    for item in items:
        by_id[item["order_id"]]["items"].append(item)
    return rows


async def stale_pending_orders(db: Database, created_before: float,
                               payment_mode: str) -> list[int]:
    """Ids of orders still pending (stock reserved) that were created before a time."""
    rows = await db.fetch_all(sa.select(orders.c.id).where(
        orders.c.status == "pending", orders.c.payment_mode == payment_mode,
        orders.c.created_at < created_before))
    return [int(row[0]) for row in rows]


async def host_sales(db: Database, host_id: int) -> list[dict]:
    """Lines of orders that contain this host's products (never other hosts' lines)."""
    query = (
        # shipped_at/carrier/tracking_number are the line's own: this host's shipping state,
        # whatever the other sellers of the order did
        sa.select(order_items, orders.c.status, orders.c.created_at, orders.c.paid_at,
                  orders.c.test_mode, orders.c.status_note, orders.c.ship_name,
                  orders.c.ship_line1, orders.c.ship_line2, orders.c.ship_city,
                  orders.c.ship_postal_code, orders.c.ship_region, orders.c.ship_country,
                  users.c.display_name.label("buyer"))
        .select_from(order_items.join(orders, orders.c.id == order_items.c.order_id)
                     .join(users, users.c.id == orders.c.user_id))
        .where(order_items.c.host_id == host_id)
        .order_by(order_items.c.order_id.desc())
    )
    return as_dicts(await db.fetch_all(query))


async def record_webhook_event(db: Database, event_id: str, event_type: str) -> bool:
    """True the first time an event id is seen; False for a redelivery."""
    async def work() -> None:
        await db.execute(webhook_events.insert().values(
            id=event_id, type=event_type, received_at=now()))

    try:
        await db.run_transaction(work)
    except Exception as exc:
        if is_duplicate_key(exc):  # the primary key refused the id: delivered before
            return False
        raise
    return True


async def forget_webhook_event(db: Database, event_id: str) -> None:
    """Undo :func:`record_webhook_event` for an event that could not be applied."""
    async def work():
        await db.execute(webhook_events.delete().where(webhook_events.c.id == event_id))

    return await db.run_transaction(work)


async def order_counts(db: Database, test_mode: bool | None = None) -> dict:
    """Orders per status; only real (False) or only test-mode (True) orders when asked."""
    query = sa.select(orders.c.status, sa.func.count()).group_by(orders.c.status)
    if test_mode is not None:
        query = query.where(orders.c.test_mode == (sa.true() if test_mode else sa.false()))
    rows = await db.fetch_all(query)
    return {row[0]: int(row[1]) for row in rows}


async def paid_revenue(db: Database) -> dict[str, int]:
    """Minor units per currency of paid orders that were real money (no test-mode order)."""
    rows = await db.fetch_all(
        sa.select(orders.c.currency, sa.func.sum(orders.c.total_minor))
        .where(orders.c.status == "paid", orders.c.test_mode == sa.false())
        .group_by(orders.c.currency))
    return {row[0]: int(row[1]) for row in rows}


# -- dashboard --------------------------------------------------------------------------------

async def live_show_sales(db: Database) -> list[tuple[str, str, int, int]]:
    """``(room slug, currency, paid orders, revenue in minor units)`` of each live room's show
    so far: orders placed since the stream started (``live_since``, set by the publish hook)
    that hold the host's products.  Test-mode orders are left out."""
    query = (
        sa.select(channels.c.slug, order_items.c.currency,
                  sa.func.count(sa.distinct(orders.c.id)),
                  sa.func.sum(order_items.c.unit_price_minor * order_items.c.quantity))
        .select_from(channels
                     .join(order_items, order_items.c.host_id == channels.c.host_id)
                     .join(orders, orders.c.id == order_items.c.order_id))
        .where(channels.c.is_live == sa.true(), orders.c.status == "paid",
               orders.c.test_mode == sa.false(), orders.c.created_at >= channels.c.live_since)
        .group_by(channels.c.slug, order_items.c.currency))
    return [(row[0], row[1], int(row[2]), int(row[3])) for row in await db.fetch_all(query)]


# -- chat ---------------------------------------------------------------------------------------


async def add_chat_message(db: Database, channel_id: int, user_id: int, display_name: str,
                           text: str) -> dict:
    stamp = now()
    async def work() -> int:
        return await db.execute(chat_messages.insert().values(
            channel_id=channel_id, user_id=user_id, display_name=display_name, text=text,
            created_at=stamp, deleted=False))

    message_id = await db.run_transaction(work)
    return {"id": message_id, "channel_id": channel_id, "user_id": user_id,
            "display_name": display_name, "text": text, "created_at": stamp}


async def recent_chat(db: Database, channel_id: int, limit: int = 50) -> list[dict]:
    rows = as_dicts(await db.fetch_all(
        chat_messages.select().where(chat_messages.c.channel_id == channel_id,
                                     chat_messages.c.deleted == sa.false())
        .order_by(chat_messages.c.id.desc()).limit(limit)))
    return rows[::-1]


async def delete_chat_message(db: Database, channel_id: int, message_id: int) -> bool:
    async def work():
        await db.execute(chat_messages.update().where(
            chat_messages.c.id == message_id, chat_messages.c.channel_id == channel_id)
            .values(deleted=True))
        return await db.affected_rows() == 1

    return await db.run_transaction(work)


async def mute(db: Database, channel_id: int, user_id: int) -> None:
    async def work() -> None:  # an upsert, for the reason given in set_cart_quantity
        await db.execute(upsert(db, chat_mutes, ("channel_id", "user_id"),
                                {"channel_id": channel_id, "user_id": user_id},
                                {"created_at": now()}))

    return await db.run_transaction(work)


async def is_muted(db: Database, channel_id: int, user_id: int) -> bool:
    return await db.fetch_one(chat_mutes.select().where(
        chat_mutes.c.channel_id == channel_id, chat_mutes.c.user_id == user_id)) is not None

