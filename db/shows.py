"""Queries of shows: scheduling, reminders, follows, a show's life on the engine's hooks, and
the in-site notifications they send.

A show's life: ``scheduled`` → ``live`` → ``ended`` (or ``cancelled`` before it starts).  Who
starts a show, who ends it and who notifies is decided by conditional updates whose
affected-row count answers, so two site processes that get the same hook (an engine retrying,
a second node) start, end and notify once.  While a live show's stream is away, ``ended_at``
holds the moment it left; a host who comes back within the grace period clears it and resumes
the same show, and after the grace period the show becomes ``ended``.
"""

from __future__ import annotations

import sqlalchemy as sa

from watchbuy.db.database import Database, now
from watchbuy.db.queries import as_dict, as_dicts, compiled, upsert
from watchbuy.db.schema import (
    cart_items,
    channels,
    follows,
    notifications,
    products,
    recordings,
    reminders,
    show_products,
    shows,
    users,
)

SCHEDULED, LIVE, ENDED, CANCELLED = "scheduled", "live", "ended", "cancelled"


# -- scheduling -------------------------------------------------------------------------------


async def create_show(db: Database, channel_id: int, title: str, scheduled_at: float,
                      cover: str | None, product_ids: list[int]) -> int:
    async def work():
        show_id = await db.execute(shows.insert().values(
            channel_id=channel_id, title=title, scheduled_at=scheduled_at, cover=cover,
            status=SCHEDULED, created_at=now()))
        await _set_products(db, show_id, product_ids)
        return show_id

    return await db.run_transaction(work)


async def update_show(db: Database, show_id: int, channel_id: int, title: str,
                      scheduled_at: float, cover: str | None, product_ids: list[int]) -> bool:
    """Edit a show that has not started; False when it started or was cancelled meanwhile."""
    async def work():
        await db.execute(shows.update().where(
            shows.c.id == show_id, shows.c.channel_id == channel_id,
            shows.c.status == SCHEDULED).values(title=title, scheduled_at=scheduled_at,
                                                cover=cover))
        if await db.affected_rows() != 1:
            # MariaDB counts changed rows only: an edit that changes nothing is still an edit
            found = await db.fetch_val(sa.select(shows.c.status).where(
                shows.c.id == show_id, shows.c.channel_id == channel_id))
            if found != SCHEDULED:
                return False
        await _set_products(db, show_id, product_ids)
        return True

    return await db.run_transaction(work)


async def _set_products(db: Database, show_id: int, product_ids: list[int]) -> None:
    # the featured list is small (a host's own products): replaced as a whole
    await db.execute(show_products.delete().where(
        show_products.c.show_id == show_id,
        show_products.c.product_id.not_in(product_ids or [-1])))
    for product_id in product_ids:
        await db.execute(upsert(db, show_products, ("show_id", "product_id"),
                                {"show_id": show_id, "product_id": product_id},
                                {"product_id": product_id}))


async def cancel_show(db: Database, show_id: int, channel_id: int) -> bool:
    async def work():
        await db.execute(shows.update().where(
            shows.c.id == show_id, shows.c.channel_id == channel_id,
            shows.c.status == SCHEDULED).values(status=CANCELLED))
        return await db.affected_rows() == 1

    return await db.run_transaction(work)


async def show(db: Database, show_id: int) -> dict | None:
    return as_dict(await db.fetch_one(shows.select().where(shows.c.id == show_id)))


async def show_product_ids(db: Database, show_id: int) -> list[int]:
    rows = await db.fetch_all(sa.select(show_products.c.product_id)
                              .where(show_products.c.show_id == show_id))
    return [row[0] for row in rows]


async def featured_products(db: Database, show_ids: list[int]) -> dict[int, list[dict]]:
    """Per show, the products it features (not deleted), for the cards of upcoming shows."""
    if not show_ids:
        return {}
    rows = await db.fetch_all(
        sa.select(show_products.c.show_id, products.c.id, products.c.name, products.c.image)
        .select_from(show_products.join(products, products.c.id == show_products.c.product_id))
        .where(show_products.c.show_id.in_(show_ids), products.c.deleted == sa.false())
        .order_by(products.c.id))
    found: dict[int, list[dict]] = {}
    for row in rows:
        found.setdefault(row.show_id, []).append(
            {"id": row.id, "name": row.name, "image": row.image})
    return found


def _with_host() -> sa.Select:
    return (sa.select(shows, channels.c.slug, channels.c.host_id,
                      users.c.display_name.label("host_name"), users.c.avatar.label("host_avatar"))
            .select_from(shows.join(channels, channels.c.id == shows.c.channel_id)
                         .join(users, users.c.id == channels.c.host_id)))


async def channel_shows(db: Database, channel_id: int, limit: int = 50) -> list[dict]:
    """A host's shows for the studio: upcoming and live first (soonest first), then the rest."""
    order = sa.case((shows.c.status.in_([LIVE, SCHEDULED]), 0), else_=1)
    return as_dicts(await db.fetch_all(
        _with_host().where(shows.c.channel_id == channel_id)
        .order_by(order, sa.case((order == 0, shows.c.scheduled_at), else_=-shows.c.created_at),
                  shows.c.id.desc())
        .limit(limit)))


async def upcoming_shows(db: Database, limit: int = 20, channel_id: int | None = None,
                         user_id: int | None = None) -> list[dict]:
    """Scheduled shows, soonest first; ``reminded`` says whether ``user_id`` asked to be."""
    reminded = (sa.exists().where(reminders.c.show_id == shows.c.id,
                                  reminders.c.user_id == user_id)
                if user_id is not None else sa.false())
    query = (_with_host().add_columns(reminded.label("reminded"))
             .where(shows.c.status == SCHEDULED,
                    # a show left scheduled long after its time did not happen
                    sa.func.coalesce(shows.c.scheduled_at, 0) > now() - 6 * 3600)
             .order_by(shows.c.scheduled_at, shows.c.id).limit(limit))
    if channel_id is not None:
        query = query.where(shows.c.channel_id == channel_id)
    return as_dicts(await db.fetch_all(query))


async def next_show(db: Database, channel_id: int) -> dict | None:
    """The channel's next scheduled show, as the ended event and the offline room show it."""
    found = await upcoming_shows(db, 1, channel_id=channel_id)
    if not found:
        return None
    return {"id": found[0]["id"], "title": found[0]["title"],
            "scheduled_at": found[0]["scheduled_at"]}


async def live_shows(db: Database) -> dict[int, dict]:
    """The live show of each channel that has one (by channel id)."""
    rows = as_dicts(await db.fetch_all(shows.select().where(shows.c.status == LIVE)))
    return {row["channel_id"]: row for row in rows}


async def ready_replays(db: Database, limit: int = 12) -> list[dict]:
    """Recordings ready to play, newest first, with their show's title and the host."""
    return as_dicts(await db.fetch_all(
        sa.select(recordings.c.id, recordings.c.started_at, recordings.c.duration,
                  channels.c.slug, channels.c.title.label("channel_title"),
                  shows.c.title.label("show_title"), shows.c.cover,
                  users.c.display_name.label("host_name"), users.c.avatar.label("host_avatar"))
        .select_from(recordings.join(channels, channels.c.id == recordings.c.channel_id)
                     .join(users, users.c.id == channels.c.host_id)
                     .outerjoin(shows, shows.c.id == recordings.c.show_id))
        .where(recordings.c.status == "ready")
        .order_by(recordings.c.started_at.desc(), recordings.c.id.desc()).limit(limit)))


async def replay_of_show(db: Database, show_id: int) -> int | None:
    """The replay a show links: its longest ready recording (the newest of equals).  A host
    whose encoder reconnected within the grace period made two recordings of one show, one of
    them a fragment of seconds; the card and the event carry one link and the replay page
    plays one file with its pins, so the longest (the most of the show) is the one, and the
    others stay on the home page's list of replays."""
    return await db.fetch_val(
        sa.select(recordings.c.id).where(recordings.c.show_id == show_id,
                                         recordings.c.status == "ready")
        .order_by(sa.func.coalesce(recordings.c.duration, 0).desc(), recordings.c.id.desc())
        .limit(1))


async def last_ended_replay(db: Database, channel_id: int) -> dict | None:
    """The channel's most recently ended show with its replay (``{id, title, replay_id}``),
    for the offline room; None when that show has no replay (yet)."""
    last = as_dict(await db.fetch_one(
        sa.select(shows.c.id, shows.c.title).where(shows.c.channel_id == channel_id,
                                                   shows.c.status == ENDED)
        .order_by(shows.c.ended_at.desc(), shows.c.id.desc()).limit(1)))
    if last is None:
        return None
    replay_id = await replay_of_show(db, last["id"])
    return {**last, "replay_id": replay_id} if replay_id is not None else None


async def set_avatar(db: Database, user_id: int, avatar: str) -> None:
    async def work():
        await db.execute(users.update().where(users.c.id == user_id).values(avatar=avatar))

    await db.run_transaction(work)


# -- reminders and follows ----------------------------------------------------------------------


async def set_reminder(db: Database, user_id: int, show_id: int, on: bool) -> None:
    async def work():
        if on:
            await db.execute(upsert(db, reminders, ("user_id", "show_id"),
                                    {"user_id": user_id, "show_id": show_id},
                                    {"created_at": now()}))
        else:
            await db.execute(reminders.delete().where(reminders.c.user_id == user_id,
                                                      reminders.c.show_id == show_id))

    await db.run_transaction(work)


async def set_follow(db: Database, user_id: int, host_id: int, on: bool) -> None:
    async def work():
        if on:
            await db.execute(upsert(db, follows, ("user_id", "host_id"),
                                    {"user_id": user_id, "host_id": host_id},
                                    {"created_at": now()}))
        else:
            await db.execute(follows.delete().where(follows.c.user_id == user_id,
                                                    follows.c.host_id == host_id))

    await db.run_transaction(work)


async def follows_host(db: Database, user_id: int, host_id: int) -> bool:
    return await db.fetch_val(sa.select(sa.func.count()).select_from(follows).where(
        follows.c.user_id == user_id, follows.c.host_id == host_id)) > 0


async def room_visitor(db: Database, user_id: int, host_id: int,
                       show_id: int | None) -> dict:
    """What a logged-in shopper's room page shows of their own, in one read: the units in
    their cart (as :func:`queries.cart` counts them), whether they follow the host and whether
    they asked to be reminded of the show ``show_id`` (the room's next one, if any)."""
    row = await db.fetch_one(compiled(db, "room_visitor", _room_visitor_query),
                             {"user_id": user_id, "host_id": host_id, "show_id": show_id or 0})
    return {"cart_count": int(row["cart_count"] or 0), "following": bool(row["following"]),
            "reminded": bool(row["reminded"])}


def _room_visitor_query() -> sa.Select:
    user_id = sa.bindparam("user_id")
    cart_units = (sa.select(sa.func.coalesce(sa.func.sum(cart_items.c.quantity),
                                             sa.literal_column("0")))
                  .select_from(cart_items.join(products,
                                               products.c.id == cart_items.c.product_id))
                  .where(cart_items.c.user_id == user_id, products.c.deleted == sa.false())
                  .scalar_subquery())
    following = sa.exists().where(follows.c.user_id == user_id,
                                  follows.c.host_id == sa.bindparam("host_id"))
    reminded = sa.exists().where(reminders.c.user_id == user_id,
                                 reminders.c.show_id == sa.bindparam("show_id"))
    return sa.select(cart_units.label("cart_count"), following.label("following"),
                     reminded.label("reminded"))


async def follower_count(db: Database, host_id: int) -> int:
    return int(await db.fetch_val(sa.select(sa.func.count()).select_from(follows)
                                  .where(follows.c.host_id == host_id)))


# -- a show's life on the engine's hooks ---------------------------------------------------------


async def go_live(db: Database, channel: dict, node_id: str | None, start_window: float,
                  host_name: str, grace: float) -> tuple[dict | None, bool, list[dict]]:
    """The channel went live: ``(show, started, notes)``.

    ``started`` is False for a duplicate hook (the channel was live already) and for a host
    who came back within the grace period (the same show resumes); only a start notifies, and
    ``notes`` are the notifications that start stored (one per user: followers and those
    reminded).  The channel row's conditional update decides, so two processes handling the
    publish start the show once.  A resume is a conditional update too (the show still live,
    its stream away for less than ``grace``): when the ender won, a new show starts."""
    async def work():
        stamp = now()
        await db.execute(channels.update().where(
            channels.c.id == channel["id"], channels.c.is_live == sa.false()).values(
            is_live=True, live_node_id=node_id, live_since=stamp, last_live_at=stamp))
        first = await db.affected_rows() == 1
        if not first:
            await db.execute(channels.update().where(channels.c.id == channel["id"])
                             .values(live_node_id=node_id))
        current = as_dict(await db.fetch_one(shows.select().where(
            shows.c.channel_id == channel["id"], shows.c.status == LIVE)
            .order_by(shows.c.id.desc()).limit(1)))
        if current is not None and current["ended_at"] is None:
            return current, False, []  # a duplicate hook: the show runs
        if current is not None:
            # back within the grace period: resume only if the ender has not ended it since
            # the read above (the same conditions as end_overdue_shows, reversed), else the
            # show would be ended with ended_at NULL and the host live with no live show
            await db.execute(shows.update().where(
                shows.c.id == current["id"], shows.c.status == LIVE,
                shows.c.ended_at.is_not(None), shows.c.ended_at > stamp - grace)
                .values(ended_at=None))
            if await db.affected_rows() == 1:
                return {**current, "ended_at": None}, False, []
            # the ender won, or the grace ran out before it came: a show whose grace is over
            # ends here unannounced (the room hears "live" now, never "ended" after it), and
            # the call that turned the channel live starts a new one
            await db.execute(shows.update().where(
                shows.c.id == current["id"], shows.c.status == LIVE,
                shows.c.ended_at.is_not(None), shows.c.ended_at <= stamp - grace)
                .values(status=ENDED))
        if not first:
            return None, False, []
        scheduled = as_dict(await db.fetch_one(shows.select().where(
            shows.c.channel_id == channel["id"], shows.c.status == SCHEDULED,
            shows.c.scheduled_at.between(stamp - start_window, stamp + start_window))
            .order_by(sa.func.abs(shows.c.scheduled_at - stamp)).limit(1)))
        if scheduled is not None:
            await db.execute(shows.update().where(shows.c.id == scheduled["id"],
                                                  shows.c.status == SCHEDULED)
                             .values(status=LIVE, started_at=stamp))
            if await db.affected_rows() != 1:
                return None, False, []  # another call started it: it notifies, not this one
            current = {**scheduled, "status": LIVE, "started_at": stamp}
        else:  # an unscheduled show: followers hear of it all the same
            show_id = await db.execute(shows.insert().values(
                channel_id=channel["id"], title=channel["title"], scheduled_at=None,
                status=LIVE, started_at=stamp, created_at=stamp))
            current = as_dict(await db.fetch_one(shows.select().where(shows.c.id == show_id)))
        notes = await _notify_start(db, current, channel, host_name, stamp)
        return current, True, notes

    return await db.run_transaction(work)


async def _notify_start(db: Database, show_row: dict, channel: dict, host_name: str,
                        stamp: float) -> list[dict]:
    """One notification per user (a follower who also asked to be reminded gets the reminder),
    made by INSERT ... SELECT in the database: this transaction holds the channel's row lock,
    and 2000 followers inserted one by one held it ~3.5 s on MariaDB."""
    show_id, host_id = show_row["id"], channel["host_id"]
    fixed = {"text": sa.literal(f"{host_name} is live now: {show_row['title']}"[:255]),
             "url": sa.literal(f"/room/{channel['slug']}"), "show_id": sa.literal(show_id),
             "created_at": sa.literal(stamp)}
    columns = ["user_id", "kind", *fixed]
    await db.execute(notifications.insert().from_select(columns, sa.select(
        reminders.c.user_id, sa.literal("reminder"), *fixed.values()).where(
        reminders.c.show_id == show_id, reminders.c.notified_at.is_(None),
        reminders.c.user_id != host_id)))
    await db.execute(reminders.update().where(reminders.c.show_id == show_id,
                                              reminders.c.notified_at.is_(None))
                     .values(notified_at=stamp))
    told = sa.select(notifications.c.id).where(notifications.c.show_id == show_id,
                                               notifications.c.user_id == follows.c.user_id)
    await db.execute(notifications.insert().from_select(columns, sa.select(
        follows.c.user_id, sa.literal("live"), *fixed.values()).where(
        follows.c.host_id == host_id, follows.c.user_id != host_id, ~told.exists())))
    # a show starts once (scheduled → live happens once), so its notifications are these
    return as_dicts(await db.fetch_all(notifications.select().where(
        notifications.c.show_id == show_id).order_by(notifications.c.id)))


async def stream_left(db: Database, channel_id: int) -> dict | None:
    """The stream ended (publish_done): the channel is offline and its live show waits for the
    grace period before it ends.  Returns that show, or None."""
    async def work():
        stamp = now()
        await db.execute(channels.update().where(channels.c.id == channel_id).values(
            is_live=False, live_node_id=None, last_live_at=stamp))
        await db.execute(shows.update().where(
            shows.c.channel_id == channel_id, shows.c.status == LIVE,
            shows.c.ended_at.is_(None)).values(ended_at=stamp))
        return as_dict(await db.fetch_one(shows.select().where(
            shows.c.channel_id == channel_id, shows.c.status == LIVE)
            .order_by(shows.c.id.desc()).limit(1)))

    return await db.run_transaction(work)


async def end_overdue_shows(db: Database, grace: float) -> list[dict]:
    """Shows whose stream left more than ``grace`` seconds ago become ``ended``; returns those
    this call ended (each by a conditional update: one process ends each show)."""
    cutoff = now() - grace
    candidates = as_dicts(await db.fetch_all(shows.select().where(
        shows.c.status == LIVE, shows.c.ended_at.is_not(None), shows.c.ended_at <= cutoff)))
    ended = []
    for row in candidates:
        async def work(show_id=row["id"]):
            await db.execute(shows.update().where(
                shows.c.id == show_id, shows.c.status == LIVE,
                shows.c.ended_at.is_not(None), shows.c.ended_at <= cutoff).values(status=ENDED))
            return await db.affected_rows() == 1

        if await db.run_transaction(work):
            ended.append({**row, "status": ENDED})
    return ended


# -- notifications ----------------------------------------------------------------------------


async def user_notifications(db: Database, user_id: int, limit: int = 50) -> list[dict]:
    return as_dicts(await db.fetch_all(
        notifications.select().where(notifications.c.user_id == user_id)
        .order_by(notifications.c.id.desc()).limit(limit)))


async def unread_count(db: Database, user_id: int) -> int:
    return int(await db.fetch_val(sa.select(sa.func.count()).select_from(notifications).where(
        notifications.c.user_id == user_id, notifications.c.read_at.is_(None))))


async def mark_read(db: Database, user_id: int) -> None:
    async def work():
        await db.execute(notifications.update().where(
            notifications.c.user_id == user_id, notifications.c.read_at.is_(None))
            .values(read_at=now()))

    await db.run_transaction(work)


async def emails(db: Database, user_ids: list[int]) -> dict[int, str]:
    if not user_ids:
        return {}
    rows = await db.fetch_all(sa.select(users.c.id, users.c.email)
                              .where(users.c.id.in_(user_ids)))
    return {row[0]: row[1] for row in rows}


# -- retention ----------------------------------------------------------------------------------

# Rows deleted per transaction: short enough that a prune never holds locks a page waits on,
# and one round's statements stay small (the ids go in an IN list).
PRUNE_BATCH = 500


async def prune_notifications(db: Database, created_before: float,
                              batch: int = PRUNE_BATCH) -> int:
    """Delete notifications created before ``created_before``, read or not, ``batch`` rows per
    short transaction; how many this call deleted.

    The batch's ids are picked outside the transaction (lowest ids first: the oldest rows, so
    the scan stops early) and deleted by id with the age condition again, so two site processes
    pruning at once delete each row once and never a newer one.  A portable bounded delete:
    SQLite has no DELETE … LIMIT in its default build.
    """
    deleted = 0
    while True:
        ids = [row[0] for row in await db.fetch_all(
            sa.select(notifications.c.id).where(notifications.c.created_at < created_before)
            .order_by(notifications.c.id).limit(batch))]
        if not ids:
            return deleted

        async def work(ids=ids):
            await db.execute(notifications.delete().where(
                notifications.c.id.in_(ids), notifications.c.created_at < created_before))
            return await db.affected_rows()

        deleted += await db.run_transaction(work)
        if len(ids) < batch:
            return deleted


async def prune_reminders(db: Database, ended_before: float, batch: int = PRUNE_BATCH) -> int:
    """Delete reminders of shows that ended (or were cancelled) before ``ended_before``,
    ``batch`` rows per short transaction; how many this call deleted.

    A cancelled show never started, so its end is its scheduled time (its creation when it
    had none).  Reminders of shows still scheduled or live stay, however old.
    """
    ended = sa.or_(
        sa.and_(shows.c.status == ENDED, shows.c.ended_at < ended_before),
        sa.and_(shows.c.status == CANCELLED,
                sa.func.coalesce(shows.c.scheduled_at, shows.c.created_at) < ended_before))
    old_shows = sa.select(shows.c.id).where(ended)
    deleted = 0
    while True:
        keys = [(row[0], row[1]) for row in await db.fetch_all(
            sa.select(reminders.c.user_id, reminders.c.show_id)
            .where(reminders.c.show_id.in_(old_shows))
            .order_by(reminders.c.show_id, reminders.c.user_id).limit(batch))]
        if not keys:
            return deleted

        async def work(keys=keys):
            # the show condition again: nothing but these shows' reminders, whatever changed
            await db.execute(reminders.delete().where(
                sa.tuple_(reminders.c.user_id, reminders.c.show_id).in_(keys),
                reminders.c.show_id.in_(old_shows)))
            return await db.affected_rows()

        deleted += await db.run_transaction(work)
        if len(keys) < batch:
            return deleted
