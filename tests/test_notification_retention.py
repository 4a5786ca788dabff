"""Notification retention: notifications older than WATCHBUY_NOTIFICATION_RETENTION_DAYS (read
or not) and the reminders of shows that ended that long ago are deleted by an upkeep job, in
bounded batches of short transactions, once each when two site processes prune at once.

Every test runs on SQLite and on MariaDB (``db_url``).
"""

from __future__ import annotations

import asyncio
import time

import pytest
import sqlalchemy as sa

from watchbuy.db import shows as show_queries
from watchbuy.db.database import now
from watchbuy.db.schema import notifications, reminders, shows
from watchbuy.settings import ConfigError
from watchbuy.site import notify
from watchbuy.site.config import load_site_settings
from watchbuy.site.state import app_state

pytest_plugins = ["site_fixtures"]

DAY = 86400.0


async def add_notes(db, user_id: int, created_at: float, count: int, read: bool = False,
                    text: str = "old") -> None:
    for n in range(count):
        await db.execute(notifications.insert().values(
            user_id=user_id, kind="live", text=f"{text} {n}", url="/", show_id=None,
            created_at=created_at, read_at=created_at + 1 if read else None))


async def note_texts(db) -> list[str]:
    rows = await db.fetch_all(notifications.select().order_by(notifications.c.id))
    return [row._mapping["text"] for row in rows]


async def add_show(db, channel_id: int, status: str, scheduled_at: float | None,
                   ended_at: float | None) -> int:
    return int(await db.execute(shows.insert().values(
        channel_id=channel_id, title=f"{status} show", scheduled_at=scheduled_at, status=status,
        started_at=None, ended_at=ended_at, created_at=now() - 90 * DAY)))


async def reminded_shows(db) -> set[int]:
    return {row[0] for row in await db.fetch_all(sa.select(reminders.c.show_id))}


async def test_old_notifications_go_read_or_not_in_batches_and_new_ones_stay(site) -> None:
    shopper = await site.user("Sam")
    other = await site.user("Olga")
    await add_notes(site.db, shopper["id"], now() - 40 * DAY, 4, read=True, text="old read")
    await add_notes(site.db, other["id"], now() - 31 * DAY, 3, read=False, text="old unread")
    await add_notes(site.db, shopper["id"], now() - 29 * DAY, 2, read=False, text="recent")
    await add_notes(site.db, other["id"], now(), 1, read=True, text="today")
    # batches of 2: seven old rows take four rounds, and every one of them goes
    deleted = await show_queries.prune_notifications(site.db, now() - 30 * DAY, batch=2)
    assert deleted == 7
    assert await note_texts(site.db) == ["recent 0", "recent 1", "today 0"]
    # nothing older left: a second run deletes nothing
    assert await show_queries.prune_notifications(site.db, now() - 30 * DAY, batch=2) == 0
    # what is left still reads as before (the badge counts unread ones)
    assert await show_queries.unread_count(site.db, shopper["id"]) == 2


async def test_reminders_of_shows_long_ended_or_cancelled_go_others_stay(site) -> None:
    host = await site.user("Hana", host=True)
    fans = [await site.user(f"Fan {n}") for n in range(3)]
    channel = host["channel"]["id"]
    long_ago, lately = now() - 45 * DAY, now() - 2 * DAY
    gone = {
        await add_show(site.db, channel, "ended", long_ago - DAY, long_ago),
        await add_show(site.db, channel, "cancelled", long_ago, None),
        await add_show(site.db, channel, "cancelled", None, None),  # created 90 days ago
    }
    kept = {
        await add_show(site.db, channel, "ended", long_ago, lately),  # ended lately
        await add_show(site.db, channel, "cancelled", lately, None),
        # still scheduled long past its time, or live for ever: the host may yet go live
        await add_show(site.db, channel, "scheduled", long_ago, None),
        await add_show(site.db, channel, "live", long_ago, None),
    }
    for show_id in gone | kept:
        for fan in fans:
            await show_queries.set_reminder(site.db, fan["id"], show_id, True)
    deleted = await show_queries.prune_reminders(site.db, now() - 30 * DAY, batch=2)
    assert deleted == len(gone) * len(fans)
    assert await reminded_shows(site.db) == kept
    assert int(await site.db.fetch_val(
        "SELECT COUNT(*) FROM reminders")) == len(kept) * len(fans)
    assert await show_queries.prune_reminders(site.db, now() - 30 * DAY, batch=2) == 0
    # the shows themselves stay (their pages, replays and orders refer to them)
    assert int(await site.db.fetch_val("SELECT COUNT(*) FROM shows")) == len(gone | kept)


async def test_two_site_processes_pruning_at_once_delete_each_row_once(make_site) -> None:
    first = await make_site()
    second = await make_site()
    host = await first.user("Hana", host=True)
    fans = [await first.user(f"Fan {n}") for n in range(4)]
    for fan in fans:
        await add_notes(first.db, fan["id"], now() - 60 * DAY, 15, read=fan["id"] % 2 == 0)
        await add_notes(first.db, fan["id"], now(), 1, text="new")
    ended = await add_show(first.db, host["channel"]["id"], "ended", None, now() - 60 * DAY)
    for fan in fans:
        await show_queries.set_reminder(first.db, fan["id"], ended, True)
    cutoff = now() - 30 * DAY
    notes = await asyncio.gather(
        show_queries.prune_notifications(first.db, cutoff, batch=7),
        show_queries.prune_notifications(second.db, cutoff, batch=7),
        show_queries.prune_notifications(first.db, cutoff, batch=5))
    kept_reminders = await asyncio.gather(
        show_queries.prune_reminders(first.db, cutoff, batch=3),
        show_queries.prune_reminders(second.db, cutoff, batch=3))
    # the rows went once: the counts the runs report add up to the rows there were
    assert sum(notes) == 15 * len(fans)
    assert sum(kept_reminders) == len(fans)
    assert await note_texts(second.db) == ["new 0"] * len(fans)
    assert await reminded_shows(second.db) == set()


async def test_the_upkeep_job_prunes_at_start_with_the_configured_retention(make_site) -> None:
    first = await make_site(notification_retention_days=0)  # 0: nothing is ever pruned
    fan = await first.user("Fan")
    await add_notes(first.db, fan["id"], now() - 400 * DAY, 3, text="ancient")
    await add_notes(first.db, fan["id"], now() - 8 * DAY, 2, text="last week")
    await add_notes(first.db, fan["id"], now(), 1, text="today")
    assert await notify.prune(app_state(first.app)) == (0, 0)
    assert len(await note_texts(first.db)) == 6
    # a site process with a week's retention: its upkeep's first round runs at start
    await make_site(notification_retention_days=7)
    deadline = time.monotonic() + 30
    while len(await note_texts(first.db)) > 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await note_texts(first.db) == ["today 0"]


def test_notification_retention_setting_is_checked() -> None:
    base = {"WATCHBUY_ENV_FILE": "/dev/null", "WATCHBUY_DATA_DIR": "/tmp/wb-retention-config"}
    assert load_site_settings(base).notification_retention_days == 30.0
    assert load_site_settings(
        {**base, "WATCHBUY_NOTIFICATION_RETENTION_DAYS": "0"}).notification_retention_days == 0
    assert load_site_settings(
        {**base, "WATCHBUY_NOTIFICATION_RETENTION_DAYS": "7.5"}).notification_retention_days == 7.5
    for value in ("-1", "soon", "nan"):
        with pytest.raises(ConfigError) as caught:
            load_site_settings({**base, "WATCHBUY_NOTIFICATION_RETENTION_DAYS": value})
        message = str(caught.value)
        assert "WATCHBUY_NOTIFICATION_RETENTION_DAYS" in message and "\n" not in message
