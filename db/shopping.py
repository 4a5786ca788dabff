"""Queries of one-tap buying: the address book, buy-now orders, flash sales, shipping, the
shopper's saved card and settings.

The rules of db/queries.py hold here: rows come back as plain dicts, every write is a short
transaction run through :meth:`Database.run_transaction` (whose ``work()`` only runs
statements), and everything that could be oversold moves only through conditional UPDATEs
whose affected-row count decides: ``products.stock``/``sold`` as at checkout, and
``flash_sales.sold`` (``sold + q <= quantity``) for the sale's units.
"""

from __future__ import annotations

import sqlalchemy as sa

from watchbuy.db.database import Database, is_duplicate_key, now
from watchbuy.db.queries import (
    OrderLimit,
    OutOfStock,
    as_dict,
    as_dicts,
    check_order_limits,
    compiled,
    product_row,
)
from watchbuy.db.queries import _reserve_query as reserve_query
from watchbuy.db.schema import (
    addresses,
    channels,
    flash_sales,
    order_items,
    orders,
    products,
    users,
)

ADDRESS_FIELDS = ("name", "line1", "line2", "city", "postal_code", "region", "country")
SHIP_COLUMNS = {f"ship_{name}": name for name in ADDRESS_FIELDS}
MAX_ADDRESSES = 20  # per shopper: the book is a short list, not storage


class AddressBookFull(ValueError):
    """The shopper already has MAX_ADDRESSES addresses."""


class SaleLimit(OrderLimit):
    """The shopper already bought as many units at the flash-sale price as one shopper may."""


class PriceChanged(ValueError):
    """The unit price computed in the transaction is not the one the shopper was shown (a
    flash sale sold out or ended, or started, meanwhile): nothing was ordered or charged."""

    def __init__(self, price_minor: int, currency: str) -> None:
        super().__init__("The price changed")
        self.price_minor = price_minor
        self.currency = currency


class AlreadyOrdered(Exception):
    """This Buy-now press (its request key) already made an order: ``order_id``."""

    def __init__(self, order_id: int) -> None:
        super().__init__(f"already ordered: order {order_id}")
        self.order_id = order_id


class SaleExists(ValueError):
    """The product already has a flash sale running."""


# -- the address book -------------------------------------------------------------------------


async def user_addresses(db: Database, user_id: int) -> list[dict]:
    """The shopper's addresses, the default first."""
    return as_dicts(await db.fetch_all(
        addresses.select().where(addresses.c.user_id == user_id)
        .order_by(addresses.c.is_default.desc(), addresses.c.id)))


async def user_address(db: Database, user_id: int, address_id: int) -> dict | None:
    """One of this shopper's addresses (None for another shopper's)."""
    return as_dict(await db.fetch_one(addresses.select().where(
        addresses.c.id == address_id, addresses.c.user_id == user_id)))


async def add_address(db: Database, user_id: int, fields: dict, make_default: bool) -> dict:
    """Adds a (validated) address; the shopper's first one is the default whatever was asked.

    The shopper's own row is written first: it serializes this shopper's concurrent adds (the
    count and the "first one" decision) on MariaDB and takes SQLite's write lock before the
    reads."""
    stamp = now()

    async def work() -> dict:
        await db.execute(users.update().where(users.c.id == user_id)
                         .values(announce_purchases=users.c.announce_purchases))
        count = int(await db.fetch_val(sa.select(sa.func.count()).select_from(addresses)
                                       .where(addresses.c.user_id == user_id)))
        if count >= MAX_ADDRESSES:
            raise AddressBookFull(f"An address book holds at most {MAX_ADDRESSES} addresses: "
                                  "delete one first.")
        default = make_default or count == 0
        if default and count:
            await db.execute(addresses.update().where(addresses.c.user_id == user_id)
                             .values(is_default=False))
        values = {name: fields.get(name) or "" for name in ADDRESS_FIELDS}
        address_id = await db.execute(addresses.insert().values(
            user_id=user_id, is_default=default, created_at=stamp, **values))
        return {"id": address_id, **values, "is_default": default}

    return await db.run_transaction(work)


async def chosen_address(db: Database, user_id: int, address_id: int | None) -> dict | None:
    """The shopper's address ``address_id`` when it is theirs, else their default; None for an
    empty book.  One query (it runs inside the checkout's transaction)."""
    query = addresses.select().where(addresses.c.user_id == user_id)
    if address_id is not None:
        query = query.order_by((addresses.c.id == address_id).desc())
    return as_dict(await db.fetch_one(query.order_by(addresses.c.is_default.desc(),
                                                     addresses.c.id).limit(1)))


async def set_default_address(db: Database, user_id: int, address_id: int) -> bool:
    async def work() -> bool:
        # (MariaDB's ROW_COUNT() counts changed rows, 0 for the default already: hence a read)
        await db.execute(addresses.update().where(addresses.c.id == address_id,
                                                  addresses.c.user_id == user_id)
                         .values(is_default=True))
        if await user_address(db, user_id, address_id) is None:
            return False  # not theirs: nothing else changes either
        await db.execute(addresses.update().where(addresses.c.user_id == user_id,
                                                  addresses.c.id != address_id)
                         .values(is_default=False))
        return True

    return await db.run_transaction(work)


async def delete_address(db: Database, user_id: int, address_id: int) -> bool:
    """Deletes one of the shopper's addresses (orders keep their own copies); when it was the
    default, the oldest other one becomes the default."""
    async def work() -> bool:
        row = as_dict(await db.fetch_one(addresses.select().where(
            addresses.c.id == address_id, addresses.c.user_id == user_id)))
        if row is None:
            return False
        await db.execute(addresses.delete().where(addresses.c.id == address_id))
        if row["is_default"]:
            oldest = await db.fetch_val(sa.select(sa.func.min(addresses.c.id))
                                        .where(addresses.c.user_id == user_id))
            if oldest is not None:
                await db.execute(addresses.update().where(addresses.c.id == oldest)
                                 .values(is_default=True))
        return True

    return await db.run_transaction(work)


def ship_values(address: dict | None) -> dict:
    """The address as the order's ``ship_*`` columns (a copy: the book may change later)."""
    if address is None:
        return {}
    return {column: address.get(name) or "" for column, name in SHIP_COLUMNS.items()}


def order_address(order: dict) -> dict | None:
    """The address copied onto an order, or None when it has none."""
    if not order.get("ship_line1"):
        return None
    return {name: order.get(column) or "" for column, name in SHIP_COLUMNS.items()}


# -- the shopper's saved card and settings ----------------------------------------------------

PROFILE_COLUMNS = ("display_name", "announce_purchases", "stripe_customer_id",
                   "saved_payment_method", "saved_card_brand", "saved_card_last4")


async def payment_profile(db: Database, user_id: int) -> dict:
    """What one-tap buying knows of the shopper: saved card, Stripe customer, announcing."""
    row = as_dict(await db.fetch_one(sa.select(
        users.c.display_name, users.c.announce_purchases, users.c.stripe_customer_id,
        users.c.saved_payment_method, users.c.saved_card_brand, users.c.saved_card_last4)
        .where(users.c.id == user_id)))
    return row or {}


def _buyer_query() -> sa.Select:
    """The shopper's profile with one address of the book: ``address_id`` when it is theirs,
    else the default, else the oldest (no address: the address columns are NULL)."""
    wanted = sa.bindparam("address_id", type_=sa.Integer)
    return (sa.select(*(users.c[name] for name in PROFILE_COLUMNS),
                      addresses.c.id.label("a_id"), addresses.c.is_default.label("a_is_default"),
                      *(addresses.c[name].label(f"a_{name}") for name in ADDRESS_FIELDS))
            .select_from(users.outerjoin(addresses, addresses.c.user_id == users.c.id))
            .where(users.c.id == sa.bindparam("user_id"))
            # no LIMIT (a compiled statement has no value for it): a book is 20 rows at most
            .order_by((addresses.c.id == wanted).desc(), addresses.c.is_default.desc(),
                      addresses.c.id))


async def buyer(db: Database, user_id: int,
                address_id: int | None = None) -> tuple[dict, dict | None]:
    """(the shopper's :func:`payment_profile`, the address ``address_id`` when it is theirs
    or else their default, None for an empty book): what Buy now needs of the shopper, in one
    query (compiled once: every Buy now runs it)."""
    row = as_dict(await db.fetch_one(compiled(db, "buyer", _buyer_query),
                                     {"user_id": user_id, "address_id": address_id}))
    if row is None:
        return {}, None
    profile = {name: row[name] for name in PROFILE_COLUMNS}
    # a text statement's rows carry the drivers' 0/1 for booleans
    profile["announce_purchases"] = bool(profile["announce_purchases"])
    if row["a_id"] is None:
        return profile, None
    address = {name: row[f"a_{name}"] for name in ADDRESS_FIELDS}
    address.update(id=row["a_id"], user_id=user_id, is_default=bool(row["a_is_default"]))
    return profile, address


async def save_card(db: Database, user_id: int, brand: str, last4: str,
                    payment_method: str | None = None, customer_id: str | None = None) -> None:
    """Keeps a card's brand and last four digits (never its number) for the next purchase;
    with Stripe also the Customer and PaymentMethod that pay off-session."""
    values: dict = {"saved_card_brand": brand[:20], "saved_card_last4": last4[-4:]}
    if payment_method is not None:
        values["saved_payment_method"] = payment_method
    if customer_id is not None:
        values["stripe_customer_id"] = customer_id

    async def work() -> None:
        await db.execute(users.update().where(users.c.id == user_id).values(**values))

    return await db.run_transaction(work)


async def set_stripe_customer(db: Database, user_id: int, customer_id: str) -> bool:
    """Records the shopper's Stripe Customer once: False when another request recorded one
    first (the caller uses that one)."""
    async def work() -> bool:
        await db.execute(users.update().where(users.c.id == user_id,
                                              users.c.stripe_customer_id.is_(None))
                         .values(stripe_customer_id=customer_id))
        return await db.affected_rows() == 1

    return await db.run_transaction(work)


async def forget_card(db: Database, user_id: int) -> None:
    async def work() -> None:
        await db.execute(users.update().where(users.c.id == user_id).values(
            saved_card_brand=None, saved_card_last4=None, saved_payment_method=None))

    return await db.run_transaction(work)


async def set_announce_purchases(db: Database, user_id: int, announce: bool) -> None:
    async def work() -> None:
        await db.execute(users.update().where(users.c.id == user_id)
                         .values(announce_purchases=announce))

    return await db.run_transaction(work)


async def purchase_announcements(db: Database, order_id: int) -> list[dict]:
    """What the rooms announce of a paid order: per line (product, name, the host's room) with
    the buyer's display name; nothing when the buyer opted out.  One query."""
    # compiled once: every paid order runs it (a Buy-now rush, 300 in a second)
    return as_dicts(await db.fetch_all(compiled(db, "purchase_announcements",
                                                _announcements_query), {"order_id": order_id}))


def _announcements_query() -> sa.Select:
    return (
        sa.select(order_items.c.product_id, order_items.c.name.label("product_name"),
                  channels.c.id.label("channel_id"), users.c.display_name)
        .select_from(order_items.join(orders, orders.c.id == order_items.c.order_id)
                     .join(users, users.c.id == orders.c.user_id)
                     .join(channels, channels.c.host_id == order_items.c.host_id))
        .where(order_items.c.order_id == sa.bindparam("order_id"),
               users.c.announce_purchases == sa.true())
        .order_by(order_items.c.id))


# -- flash sales ------------------------------------------------------------------------------


def _active(at: float):
    return sa.and_(flash_sales.c.ended_at.is_(None), flash_sales.c.starts_at <= at,
                   flash_sales.c.ends_at > at)


async def active_sales(db: Database, channel_id: int) -> list[dict]:
    """The room's flash sales running now, with each product's currency."""
    query = (sa.select(flash_sales, products.c.currency, products.c.price_minor)
             .select_from(flash_sales.join(products, products.c.id == flash_sales.c.product_id))
             .where(flash_sales.c.channel_id == channel_id, _active(now()))
             .order_by(flash_sales.c.id))
    return as_dicts(await db.fetch_all(query))


async def active_sales_for_products(db: Database, product_ids: list[int],
                                    at: float | None = None) -> dict[int, dict]:
    """product id → its flash sale running at ``at`` (default now), for the given products
    (one query)."""
    if not product_ids:
        return {}
    rows = as_dicts(await db.fetch_all(flash_sales.select().where(
        flash_sales.c.product_id.in_(product_ids), _active(now() if at is None else at))))
    return {row["product_id"]: row for row in rows}


async def sale(db: Database, sale_id: int) -> dict | None:
    query = (sa.select(flash_sales, products.c.currency, products.c.price_minor)
             .select_from(flash_sales.join(products, products.c.id == flash_sales.c.product_id))
             .where(flash_sales.c.id == sale_id))
    return as_dict(await db.fetch_one(query))


async def start_sale(db: Database, host_id: int, channel_id: int, product_id: int,
                     sale_price_minor: int | None, quantity: int | None,
                     per_shopper_limit: int | None, duration: float) -> int:
    """Starts a flash sale on one of the host's products, now; its id.

    One running sale per product: the product row is written first (a no-op UPDATE that also
    checks it is this host's), which serializes concurrent starts for one product on MariaDB
    (its row lock) and on SQLite (the write lock), so the check that follows is decisive.
    Raises LookupError for a product that is not this host's, SaleExists for a second sale."""
    stamp = now()

    async def work() -> int:
        await db.execute(products.update().where(
            products.c.id == product_id, products.c.host_id == host_id,
            products.c.deleted == sa.false()).values(updated_at=products.c.updated_at))
        exists = await db.fetch_val(sa.select(sa.func.count()).select_from(products).where(
            products.c.id == product_id, products.c.host_id == host_id,
            products.c.deleted == sa.false()))
        if not exists:
            raise LookupError("No such product.")
        running = await db.fetch_val(sa.select(sa.func.count()).select_from(flash_sales).where(
            flash_sales.c.product_id == product_id, _active(stamp)))
        if running:
            raise SaleExists("This product already has a flash sale running: end it first.")
        return await db.execute(flash_sales.insert().values(
            channel_id=channel_id, product_id=product_id, sale_price_minor=sale_price_minor,
            quantity=quantity, sold=0, per_shopper_limit=per_shopper_limit, starts_at=stamp,
            ends_at=stamp + duration, created_at=stamp))

    return await db.run_transaction(work)


async def end_sale(db: Database, sale_id: int, reason: str, channel_id: int | None = None) -> bool:
    """Ends a running sale; True only for the one call (of any process) that ended it, which
    is the one that announces it.  ``channel_id``: only a sale of that room (the host's)."""
    query = flash_sales.update().where(flash_sales.c.id == sale_id,
                                       flash_sales.c.ended_at.is_(None))
    if channel_id is not None:
        query = query.where(flash_sales.c.channel_id == channel_id)

    async def work() -> bool:
        await db.execute(query.values(ended_at=now(), end_reason=reason))
        return await db.affected_rows() == 1

    return await db.run_transaction(work)


async def due_sales(db: Database) -> list[dict]:
    """Sales not ended yet whose time is up, or whose quantity is all sold."""
    stamp = now()
    return as_dicts(await db.fetch_all(
        sa.select(flash_sales.c.id, flash_sales.c.product_id, flash_sales.c.channel_id,
                  flash_sales.c.ends_at, flash_sales.c.quantity, flash_sales.c.sold)
        .where(flash_sales.c.ended_at.is_(None),
               sa.or_(flash_sales.c.ends_at <= stamp,
                      sa.and_(flash_sales.c.quantity.is_not(None),
                              flash_sales.c.sold >= flash_sales.c.quantity)))))


async def next_sale_end(db: Database) -> float | None:
    """When the next running sale ends (for a timer), or None."""
    value = await db.fetch_val(sa.select(sa.func.min(flash_sales.c.ends_at))
                               .where(flash_sales.c.ended_at.is_(None)))
    return None if value is None else float(value)


def _claim_query() -> sa.Update:
    """A flash sale's units: ``sold + q <= quantity`` (or no cap), only inside the window."""
    stamp = sa.bindparam("stamp")
    return (flash_sales.update()
            .where(flash_sales.c.id == sa.bindparam("sale_id"),
                   flash_sales.c.ended_at.is_(None), flash_sales.c.starts_at <= stamp,
                   flash_sales.c.ends_at > stamp,
                   sa.or_(flash_sales.c.quantity.is_(None),
                          flash_sales.c.sold + sa.bindparam("quantity")
                          <= flash_sales.c.quantity))
            .values(sold=flash_sales.c.sold + sa.bindparam("quantity")))


async def shopper_sale_units(db: Database, user_id: int, sale_id: int) -> int:
    """Units this shopper holds at this sale's price (pending or paid orders)."""
    value = await db.fetch_val(
        sa.select(sa.func.coalesce(sa.func.sum(order_items.c.quantity), 0))
        .select_from(order_items.join(orders, orders.c.id == order_items.c.order_id))
        .where(order_items.c.flash_sale_id == sale_id, orders.c.user_id == user_id,
               orders.c.status.in_(("pending", "paid"))))
    return int(value or 0)


async def claim_sale_units(db: Database, user_id: int, sale: dict, quantity: int,
                           stamp: float, product_name: str) -> bool:
    """Inside a checkout transaction that already serializes this shopper (their row locked on
    MariaDB, SQLite's write lock): True when ``quantity`` units at the sale's price were
    claimed; False when the sale ended or its units are gone (the regular price applies).
    Raises SaleLimit past the per-shopper limit."""
    limit = sale["per_shopper_limit"]
    if limit is not None:
        held = await shopper_sale_units(db, user_id, sale["id"])
        if held + quantity > limit:
            raise SaleLimit(f"at most {limit} of {product_name} per shopper in this flash sale"
                            + (f" (you have {held})" if held else ""))
    await db.execute(compiled(db, "flash_claim", _claim_query),
                     {"sale_id": sale["id"], "quantity": quantity, "stamp": stamp})
    return await db.affected_rows() == 1


# -- buy now ----------------------------------------------------------------------------------


def _product_room_query() -> sa.Select:
    return (sa.select(products, channels.c.id.label("channel_id"))
            .select_from(products.outerjoin(channels, channels.c.host_id == products.c.host_id))
            .where(products.c.id == sa.bindparam("product_id"),
                   products.c.deleted == sa.false()))


async def product_with_room(db: Database, product_id: int) -> dict | None:
    """The product as :func:`queries.product` gives it, with ``channel_id``, its host's room
    (None without one): what Buy now needs, the room being where the purchase is announced.
    One query, compiled once."""
    return product_row(as_dict(await db.fetch_one(
        compiled(db, "product_with_room", _product_room_query), {"product_id": product_id})))


def _order_insert_query() -> sa.Insert:
    """A one-line order with its shipping columns (NULL without an address)."""
    return orders.insert().values(
        user_id=sa.bindparam("user_id"), status=sa.bindparam("status"),
        total_minor=sa.bindparam("total_minor"), currency=sa.bindparam("currency"),
        payment_mode=sa.bindparam("payment_mode"), created_at=sa.bindparam("created_at"),
        paid_at=sa.bindparam("paid_at"), test_mode=sa.bindparam("test_mode"),
        request_key=sa.bindparam("request_key"),
        **{column: sa.bindparam(column) for column in SHIP_COLUMNS})


def _item_insert_query() -> sa.Insert:
    return order_items.insert().values(**{name: sa.bindparam(name) for name in (
        "order_id", "product_id", "host_id", "name", "unit_price_minor", "currency", "quantity",
        "flash_sale_id")})


def _product_sale_query() -> sa.Select:
    """The flash sale of one product running at ``stamp`` (at most one runs: start_sale)."""
    stamp = sa.bindparam("stamp")
    return flash_sales.select().where(
        flash_sales.c.product_id == sa.bindparam("product_id"),
        flash_sales.c.ended_at.is_(None), flash_sales.c.starts_at <= stamp,
        flash_sales.c.ends_at > stamp)


async def create_buy_now_order(db: Database, user_id: int, product_id: int, payment_mode: str,
                               test_mode: bool, address: dict | None,
                               max_pending: int | None, max_units: int | None,
                               expected_price_minor: int | None = None,
                               product: dict | None = None, paid: bool = False,
                               flash_sale: bool = True, request_key: str | None = None
                               ) -> dict:
    """One unit of one product → an order (the cart untouched), with the address copied onto
    it and the flash-sale price when a sale runs: all or nothing, in one transaction.
    Pending (its payment follows), or with ``paid`` already paid (test mode: the test card
    was checked, so the order is paid in the transaction that makes it, not in a second one).
    ``flash_sale=False`` (bought from a replay: a flash sale is a live-room offer) prices it
    at the regular price whatever sale runs, and takes none of the sale's units; while a sale
    limited per shopper runs it refuses (OrderLimit), so the limit cannot be sidestepped.

    As :func:`queries.create_order_from_cart`: sold out is answered from a plain read first
    (``product``: the caller's read of it, as :func:`queries.product` returns it, saves that
    read); on MariaDB the shopper's row is locked first (their limits and sale units are
    counted decisively) and the product's conditional UPDATE comes last, so the hot row is
    locked for one statement and the commit; on SQLite it comes first.  Unlike the cart's
    checkout there is no read of the stock after the lock: Buy now's callers let buyers in a
    few at a time (site/shop.py ``SoldOutBoard.gate``), so the UPDATE refusing the few in
    flight when the last unit goes costs less than a read for every buyer.  A paid order
    holds no stock unpaid, so the unpaid-order limits (``max_pending``, ``max_units``) apply
    to pending ones only.  Every statement is compiled once.
    With ``expected_price_minor`` (the unit price the shopper was shown) a different price,
    decided inside the transaction, raises :class:`PriceChanged` and rolls everything back:
    the shopper confirms the new price before anything is charged.
    ``request_key`` (the buy sheet's key for this press): a second order with the same key
    for this shopper is refused by the unique index and rolled back whole, raising
    :class:`AlreadyOrdered` with the first one's id (a released order gave its key up, so
    the same press may order again).
    Raises OutOfStock (``stock_seen`` 0 when it is sold out), LookupError (not for sale),
    OrderLimit / SaleLimit, PriceChanged, AlreadyOrdered."""
    from watchbuy.db.queries import lock_shopper  # shared with the cart's checkout

    item = product
    if item is None:
        from watchbuy.db.queries import product as read_product

        item = await read_product(db, product_id)
    if item is None or item["id"] != product_id or not item["shown"]:
        raise LookupError("That product is not for sale.")
    if item["stock"] < 1:
        raise OutOfStock(item["name"], product_id, item["stock"])
    stamp = now()

    async def reserve() -> None:
        await db.execute(compiled(db, "reserve", reserve_query), {
            "product_id": product_id, "quantity": 1, "stamp": stamp})
        if await db.affected_rows() != 1:
            # one unit asked: none left (or hidden meanwhile, refused all the same)
            raise OutOfStock(item["name"], product_id, 0)

    async def work() -> dict:
        nonlocal stamp
        if db.dialect_name == "mysql":
            await lock_shopper(db, user_id)
        else:
            await reserve()
        # the time the sale's window is checked against: taken in the transaction once its
        # first lock is held, so a buyer who waited past the sale's end pays the regular price
        stamp = now()
        if not paid:
            line = {"product_id": product_id, "quantity": 1, "name": item["name"]}
            await check_order_limits(db, user_id, [line], max_pending, max_units)
        running = as_dict(await db.fetch_one(compiled(db, "product_sale", _product_sale_query),
                                             {"product_id": product_id, "stamp": stamp}))
        if running is not None and not flash_sale:
            if running["per_shopper_limit"] is not None:
                # a drop limited per shopper is running: a replay's regular-price unit would
                # sidestep that limit (a bot taking a limited drop through the replay page)
                raise OrderLimit(f"{item['name']} is in a live flash sale limited per "
                                 "shopper right now: buy it in the live room")
            running = None
        price = item["price_minor"]
        if running is not None and running["sale_price_minor"] is not None:
            price = running["sale_price_minor"]
        if expected_price_minor is not None and price != expected_price_minor:
            # checked before the claim: a refused shopper takes none of the sale's units
            raise PriceChanged(price, item["currency"])
        sale_id = None
        if running is not None:
            if await claim_sale_units(db, user_id, running, 1, stamp, item["name"]):
                sale_id = running["id"]
            elif price != item["price_minor"]:
                # the sale's units went: the regular price, unless the shopper saw another
                price = item["price_minor"]
                if expected_price_minor is not None:
                    raise PriceChanged(price, item["currency"])
        ship = ship_values(address)
        order_id = await db.execute(compiled(db, "buy_now_order", _order_insert_query), {
            "user_id": user_id, "status": "paid" if paid else "pending", "total_minor": price,
            "currency": item["currency"], "payment_mode": payment_mode, "created_at": stamp,
            "paid_at": stamp if paid else None, "test_mode": int(test_mode),
            "request_key": request_key, **{column: ship.get(column) for column in SHIP_COLUMNS}})
        items = [{"order_id": order_id, "product_id": product_id, "host_id": item["host_id"],
                  "name": item["name"], "unit_price_minor": price,
                  "currency": item["currency"], "quantity": 1, "flash_sale_id": sale_id}]
        await db.execute(compiled(db, "buy_now_item", _item_insert_query), items[0])
        if db.dialect_name == "mysql":
            await reserve()  # the hot row last, locked until the commit
        return {"id": order_id, "user_id": user_id, "status": "paid" if paid else "pending",
                "total_minor": price, "currency": item["currency"],
                "payment_mode": payment_mode, "payment_ref": None, "created_at": stamp,
                "paid_at": stamp if paid else None, "test_mode": test_mode, "items": items,
                **ship}

    try:
        return await db.run_transaction(work)
    except Exception as exc:
        if request_key is None or not is_duplicate_key(exc):
            raise
    first = await order_for_request(db, user_id, request_key)
    if first is None:  # the unique refusal came from elsewhere: not ours to answer
        raise LookupError("That product is not for sale.")
    raise AlreadyOrdered(first)


def _order_for_request_query() -> sa.Select:
    return sa.select(orders.c.id).where(orders.c.user_id == sa.bindparam("user_id"),
                                        orders.c.request_key == sa.bindparam("key"))


async def order_for_request(db: Database, user_id: int, request_key: str) -> int | None:
    """The id of the order this shopper's Buy-now press with this key made, if it made one
    that was not released since (a released order gives its key up: queries.release_order)."""
    value = await db.fetch_val(compiled(db, "order_for_request", _order_for_request_query),
                               {"user_id": user_id, "key": request_key})
    return int(value) if value is not None else None


# -- shipping ---------------------------------------------------------------------------------


async def mark_shipped(db: Database, host_id: int, order_id: int, carrier: str,
                       tracking_number: str) -> bool:
    """This host's lines of a paid order → shipped, once; the order itself is shipped when
    every seller's lines are.  False when the order is not paid, holds none of this host's
    unshipped lines (another seller cannot ship them).

    The order's row is written first: it serializes its sellers' concurrent shipments (MariaDB
    row lock, SQLite's write lock), so the last one sees every other's lines shipped."""
    async def work() -> bool:
        stamp = now()
        await db.execute(orders.update().where(orders.c.id == order_id)
                         .values(status=orders.c.status))
        status = await db.fetch_val(sa.select(orders.c.status).where(orders.c.id == order_id))
        if status != "paid":
            return False
        await db.execute(order_items.update().where(
            order_items.c.order_id == order_id, order_items.c.host_id == host_id,
            order_items.c.shipped_at.is_(None)).values(
                shipped_at=stamp, carrier=carrier or None,
                tracking_number=tracking_number or None))
        if not await db.affected_rows():
            return False
        rows = await db.fetch_all(sa.select(order_items.c.host_id, order_items.c.shipped_at)
                                  .where(order_items.c.order_id == order_id))
        if all(row[1] is not None for row in rows):
            # one seller: the order carries its carrier and number too (older pages read them)
            single = len({row[0] for row in rows}) == 1
            await db.execute(orders.update().where(orders.c.id == order_id,
                                                   orders.c.shipped_at.is_(None)).values(
                shipped_at=stamp, carrier=(carrier or None) if single else None,
                tracking_number=(tracking_number or None) if single else None))
        return True

    return await db.run_transaction(work)


async def order_shipments(db: Database, order_ids: list[int]) -> dict[int, list[dict]]:
    """order id → per seller of it: {seller, shipped_at, carrier, tracking_number} (one query;
    a seller's lines are shipped together)."""
    if not order_ids:
        return {}
    rows = as_dicts(await db.fetch_all(
        sa.select(order_items.c.order_id, order_items.c.host_id,
                  users.c.display_name.label("seller"), order_items.c.shipped_at,
                  order_items.c.carrier, order_items.c.tracking_number)
        .select_from(order_items.join(users, users.c.id == order_items.c.host_id))
        .where(order_items.c.order_id.in_(order_ids)).order_by(order_items.c.id)))
    shipments: dict[int, dict[int, dict]] = {}
    for row in rows:
        order_id, host_id = row.pop("order_id"), row.pop("host_id")
        shipments.setdefault(order_id, {}).setdefault(host_id, row)
    return {order_id: list(by_host.values()) for order_id, by_host in shipments.items()}


async def order_sellers(db: Database, order_ids: list[int]) -> dict[int, list[str]]:
    """order id → the display names of the hosts it bought from (one query)."""
    if not order_ids:
        return {}
    rows = await db.fetch_all(
        sa.select(order_items.c.order_id, users.c.display_name).distinct()
        .select_from(order_items.join(users, users.c.id == order_items.c.host_id))
        .where(order_items.c.order_id.in_(order_ids)))
    sellers: dict[int, list[str]] = {}
    for row in rows:
        sellers.setdefault(int(row[0]), []).append(row[1])
    return sellers
