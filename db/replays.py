"""Queries of replays: the recordings the nodes report and the pins on the media clock.

Writes are short transactions through :meth:`Database.run_transaction` (re-run on a lock
conflict); a recording is one insert plus one UPDATE that files the pins made while it was
live under it, so a replay and its timeline appear together.
"""

from __future__ import annotations

import sqlalchemy as sa

from watchbuy.db.database import Database, now
from watchbuy.db.queries import as_dict, as_dicts
from watchbuy.db.schema import channels, pins, products, recordings, shows, users

# A pin a moment before the node started its file (clocks of two machines) still belongs to it.
PIN_SLACK_SECONDS = 5.0


async def live_show_id(db: Database, channel_id: int) -> int | None:
    """The channel's show that is live now, if the host runs shows."""
    return await db.fetch_val(
        sa.select(shows.c.id).where(shows.c.channel_id == channel_id, shows.c.status == "live")
        .order_by(shows.c.id.desc()).limit(1))


async def add_pin(db: Database, channel_id: int, product_id: int | None,
                  media_ms: int | None) -> int:
    """One pin (``product_id`` None: an unpin) at the stream's ``media_ms``; its id."""
    show_id = await live_show_id(db, channel_id)

    async def work():
        return await db.execute(pins.insert().values(
            channel_id=channel_id, show_id=show_id, recording_id=None, product_id=product_id,
            media_ms=media_ms, pinned_at=now()))

    return await db.run_transaction(work)


async def add_recording(db: Database, channel_id: int, values: dict) -> int:
    """File a recording the node reported and put under it the channel's pins (with a media
    time) made while it was live; the recording's id (the existing one for a report made
    again)."""
    started, ended = values["started_at"], values["ended_at"]
    show_id = await db.fetch_val(
        sa.select(shows.c.id).where(
            shows.c.channel_id == channel_id, shows.c.started_at.is_not(None),
            shows.c.started_at <= ended,
            sa.or_(shows.c.ended_at.is_(None), shows.c.ended_at >= started))
        .order_by(shows.c.id.desc()).limit(1))

    async def work():
        # the node retries a report whose answer it did not get: the same publish (its node,
        # stream and start) is filed once; the channel's row locked first, so a retry that
        # crosses the first report waits for it and then finds its row
        await db.fetch_val(sa.select(channels.c.id).where(channels.c.id == channel_id)
                           .with_for_update())
        recording_id = await db.fetch_val(
            sa.select(recordings.c.id).where(
                recordings.c.channel_id == channel_id, recordings.c.node_id == values["node_id"],
                recordings.c.stream_name == values["stream_name"],
                recordings.c.started_at == started).limit(1))
        if recording_id is not None:
            return recording_id
        recording_id = await db.execute(recordings.insert().values(
            channel_id=channel_id, show_id=show_id, **values))
        if values["status"] == "ready":
            await db.execute(
                pins.update().where(
                    pins.c.channel_id == channel_id, pins.c.recording_id.is_(None),
                    pins.c.media_ms.is_not(None),
                    pins.c.pinned_at >= started - PIN_SLACK_SECONDS,
                    pins.c.pinned_at <= ended + PIN_SLACK_SECONDS)
                .values(recording_id=recording_id))
        return recording_id

    return await db.run_transaction(work)


async def recording(db: Database, recording_id: int) -> dict | None:
    """A recording with its channel's slug and title and the host's name."""
    return as_dict(await db.fetch_one(
        sa.select(recordings, channels.c.slug, channels.c.title, channels.c.host_id,
                  users.c.display_name.label("host_name"))
        .select_from(recordings.join(channels, channels.c.id == recordings.c.channel_id)
                     .join(users, users.c.id == channels.c.host_id))
        .where(recordings.c.id == recording_id)))


async def recording_pins(db: Database, recording_id: int) -> list[dict]:
    """The pins of a recording in media order, with their products (None for an unpin or a
    product deleted since)."""
    rows = as_dicts(await db.fetch_all(
        sa.select(pins.c.id, pins.c.product_id, pins.c.media_ms, pins.c.pinned_at,
                  products.c.id.label("found_id"), products.c.deleted)
        .select_from(pins.outerjoin(products, products.c.id == pins.c.product_id))
        .where(pins.c.recording_id == recording_id, pins.c.media_ms.is_not(None))
        .order_by(pins.c.media_ms, pins.c.id)))
    for row in rows:
        if row.pop("found_id") is None or row.pop("deleted", False):
            row["product_id"] = None
        row.pop("deleted", None)
    return rows


async def channel_replays(db: Database, channel_id: int, limit: int = 20) -> list[dict]:
    """A channel's ready replays, newest first."""
    return as_dicts(await db.fetch_all(
        recordings.select().where(recordings.c.channel_id == channel_id,
                                  recordings.c.status == "ready")
        .order_by(recordings.c.id.desc()).limit(limit)))


async def expired_recordings(db: Database, before: float, limit: int = 100,
                             after_id: int = 0) -> list[dict]:
    """Ready recordings that started before ``before`` (the retention cut-off), by id from
    ``after_id`` on: the expiry job pages on with the last id it saw, so a row it could not
    delete is passed over, not read again in every batch."""
    return as_dicts(await db.fetch_all(
        recordings.select().where(recordings.c.status == "ready",
                                  recordings.c.started_at < before,
                                  recordings.c.id > after_id)
        .order_by(recordings.c.id).limit(limit)))


async def mark_expired(db: Database, recording_id: int) -> None:
    async def work():
        await db.execute(recordings.update().where(recordings.c.id == recording_id,
                                                   recordings.c.status == "ready")
                         .values(status="expired"))

    await db.run_transaction(work)
