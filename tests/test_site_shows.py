"""Shows (issue 14): scheduling, the home page, reminders and follows, notifications delivered
live and by email, a show's life on the engine's real hook path (grace period, ended event),
and two site processes handling the same publish notifying once.

Every test runs on SQLite and on MariaDB (``db_url``); the engine's hook calls are signed as
the node signs them (hook_helpers); email goes to an SMTP server on loopback (show_helpers).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import re
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from app_helpers import make_user
from browser_helpers import (
    PHONE,
    Publisher,
    Server,
    covered,
    free_port,
    log_in,
    require_browser,
    screenshot,
    sign_up,
    sqlite_of,
)
from hook_helpers import signed_hook
from PIL import Image
from show_helpers import SmtpSink, served

from watchbuy.db import migrations, queries
from watchbuy.db import shows as show_queries
from watchbuy.db.database import Database, now
from watchbuy.db.schema import recordings
from watchbuy.settings import ConfigError
from watchbuy.site import notify, security
from watchbuy.site.broker import RedisBroker
from watchbuy.site.chat import room_topic
from watchbuy.site.config import load_site_settings

pytest_plugins = ["site_fixtures", "browser_fixtures"]


def form_time(stamp: float) -> str:
    """A start time as the datetime-local field sends it (here with tz_offset 0: UTC)."""
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%dT%H:%M")


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 36), (200, 40, 80)).save(out, "PNG")
    return out.getvalue()


async def hook(site, call: str, host: dict) -> httpx.Response:
    signed = signed_hook(site.settings.hook_secret, {
        "call": call, "app": "live", "key": host["channel"]["stream_key"],
        "name": host["channel"]["slug"], "node_id": "local"})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=site.app),
                                 base_url="http://testserver") as client:
        return await client.post("/hooks/rtmp", content=signed["content"],
                                 headers=signed["headers"])


async def schedule(site, host: dict, title: str, starts: float, **extra) -> int:
    browser = await site.browser(host)
    await browser.get("/studio/shows")
    response = await browser.post("/studio/shows/new", {
        "title": title, "starts": form_time(starts), "tz_offset": "0", **extra})
    assert response.status_code == 303, response.text
    listed = await show_queries.channel_shows(site.db, host["channel"]["id"])
    return next(s["id"] for s in listed if s["title"] == title)


async def user_notes(site, user: dict) -> list[dict]:
    return await show_queries.user_notifications(site.db, user["id"])


async def test_host_schedules_edits_and_cancels_a_show(site) -> None:
    host = await site.user("Hana", host=True)
    other = await site.user("Olga", host=True)
    mug = await site.product(host, name="Mug")
    theirs = await site.product(other, name="Not yours")
    browser = await site.browser(host)
    page = await browser.get("/studio")
    assert 'href="/studio/shows"' in page.text
    await browser.get("/studio/shows")
    starts = time.time() + 3 * 3600
    response = await browser.post(
        "/studio/shows/new",
        {"title": "Mugs at noon", "starts": form_time(starts), "tz_offset": "0",
         "products": [str(mug["id"]), str(theirs["id"])]},
        files={"image": ("cover.png", png(), "image/png")})
    assert response.status_code == 303 and response.headers["location"].endswith("scheduled")
    [show] = await show_queries.channel_shows(site.db, host["channel"]["id"])
    assert show["status"] == "scheduled" and show["title"] == "Mugs at noon"
    assert abs(show["scheduled_at"] - starts) < 60 and show["cover"]
    # another host's product is never featured
    assert await show_queries.show_product_ids(site.db, show["id"]) == [mug["id"]]

    home = (await (await site.browser()).get("/")).text
    assert "Mugs at noon" in home and "data-countdown=" in home and "Featuring Mug" in home
    assert site.app.state.storage.url(show["cover"]) in home

    # a browser west of UTC sends its local time and its offset: the same instant is stored
    local = dt.datetime.fromtimestamp(starts, dt.UTC) - dt.timedelta(hours=5)
    response = await browser.post(f"/studio/shows/{show['id']}", {
        "title": "Mugs, later", "starts": local.strftime("%Y-%m-%dT%H:%M"), "tz_offset": "300"})
    assert response.status_code == 303
    edited = await show_queries.show(site.db, show["id"])
    assert edited["title"] == "Mugs, later" and abs(edited["scheduled_at"] - starts) < 60
    assert edited["cover"] == show["cover"]  # no new image: the cover stays
    assert await show_queries.show_product_ids(site.db, show["id"]) == []

    # another host cannot see, edit or cancel it
    intruder = await site.browser(other)
    assert (await intruder.get(f"/studio/shows/{show['id']}")).status_code == 404
    await intruder.get("/studio/shows")
    assert (await intruder.post(f"/studio/shows/{show['id']}/cancel")).status_code == 404

    response = await browser.post(f"/studio/shows/{show['id']}/cancel")
    assert response.status_code == 303
    assert (await show_queries.show(site.db, show["id"]))["status"] == "cancelled"
    assert "Mugs, later" not in (await (await site.browser()).get("/")).text


async def test_bad_show_input_is_explained_beside_the_field_and_nothing_is_stored(site) -> None:
    host = await site.user("Hana", host=True)
    browser = await site.browser(host)
    await browser.get("/studio/shows")
    response = await browser.post(
        "/studio/shows/new",
        {"title": "A fine title", "starts": form_time(time.time() - 86400), "tz_offset": "0"},
        files={"image": ("cover.png", b"not an image", "image/png")})
    assert response.status_code == 400
    assert 'id="starts-error">The start time is in the past.' in response.text
    assert 'id="cover-error">That file is not an image' in response.text
    assert 'value="A fine title"' in response.text  # what was typed stays
    response = await browser.post("/studio/shows/new", {"title": "x", "starts": "tomorrow"})
    assert response.status_code == 400
    assert 'id="title-error"' in response.text and 'id="starts-error"' in response.text
    assert await show_queries.channel_shows(site.db, host["channel"]["id"]) == []


async def test_host_picture_is_checked_and_shown_beside_their_shows(site) -> None:
    host = await site.user("Hana", host=True)
    await schedule(site, host, "Evening show", time.time() + 7200)
    browser = await site.browser(host)
    await browser.get("/studio/shows")
    response = await browser.post("/studio/avatar", files={
        "image": ("me.png", b"GIF89a but not really", "image/png")})
    assert response.status_code == 400 and 'id="avatar-error">' in response.text
    assert (await queries.user_by_id(site.db, host["id"]))["avatar"] is None
    response = await browser.post("/studio/avatar", files={"image": ("me.png", png(), "image/png")})
    assert response.status_code == 303
    avatar = (await queries.user_by_id(site.db, host["id"]))["avatar"]
    assert avatar and avatar.endswith(".png")
    home = (await (await site.browser()).get("/")).text
    assert f'<span class="avatar"><img src="{site.app.state.storage.url(avatar)}"' in home
    shopper = await site.browser(await site.user("Sam"))
    await shopper.get("/")
    assert (await shopper.post("/studio/avatar", files={
        "image": ("me.png", png(), "image/png")})).status_code == 403


async def test_shoppers_remind_and_follow(site) -> None:
    host = await site.user("Hana", host=True)
    shopper = await site.user("Sam")
    show_id = await schedule(site, host, "Evening show", time.time() + 7200)
    browser = await site.browser(shopper)
    home = await browser.get("/")
    assert f'action="/shows/{show_id}/remind"' in home.text and "Remind me" in home.text
    response = await browser.post(f"/shows/{show_id}/remind", {"on": "1", "next": "/#upcoming"})
    assert response.status_code == 303 and response.headers["location"] == "/#upcoming"
    assert "Reminder set" in (await browser.get("/")).text
    await browser.post(f"/shows/{show_id}/remind", {"on": "1"})  # twice: still one reminder
    assert int(await site.db.fetch_val("SELECT COUNT(*) FROM reminders")) == 1
    await browser.post(f"/shows/{show_id}/remind", {"on": "0"})
    assert int(await site.db.fetch_val("SELECT COUNT(*) FROM reminders")) == 0

    slug = host["channel"]["slug"]
    room = await browser.get(f"/room/{slug}")
    # the offline room shows the next show, with its reminder, and a follow button
    assert "Next show: <b>Evening show</b>" in room.text and "Follow Hana" in room.text
    response = await browser.post(f"/room/{slug}/follow", {"on": "1"})
    assert response.status_code == 303 and response.headers["location"] == f"/room/{slug}"
    assert await show_queries.follows_host(site.db, shopper["id"], host["id"])
    assert "Following ✓" in (await browser.get(f"/room/{slug}")).text
    await browser.post(f"/room/{slug}/follow", {"on": "0"})
    assert not await show_queries.follows_host(site.db, shopper["id"], host["id"])
    # the host does not follow themself; anonymous visitors are sent to log in
    own = await site.browser(host)
    await own.get("/")
    assert (await own.post(f"/room/{slug}/follow", {"on": "1"})).status_code == 400
    anonymous = await site.browser()
    await anonymous.get("/")
    response = await anonymous.post(f"/shows/{show_id}/remind", {"on": "1"})
    assert response.status_code == 303 and response.headers["location"].startswith("/login")


async def test_going_live_starts_the_show_and_notifies_followers_and_reminded_once(site) -> None:
    host = await site.user("Hana", host=True)
    follower, reminded, both = (await site.user("Fay"), await site.user("Rex"),
                                await site.user("Bo"))
    show_id = await schedule(site, host, "Launch day", time.time() + 600)
    later_id = await schedule(site, host, "Tomorrow", time.time() + 86400)
    for user in (follower, both):
        await show_queries.set_follow(site.db, user["id"], host["id"], True)
    for user in (reminded, both):
        await show_queries.set_reminder(site.db, user["id"], show_id, True)

    response = await hook(site, "publish", host)
    assert response.json() == {"name": host["channel"]["slug"]}
    assert (await show_queries.show(site.db, show_id))["status"] == "live"
    assert (await show_queries.show(site.db, later_id))["status"] == "scheduled"
    kinds = {name: [(n["kind"], n["text"], n["url"]) for n in await user_notes(site, user)]
             for name, user in (("f", follower), ("r", reminded), ("b", both))}
    room = f"/room/{host['channel']['slug']}"
    assert kinds == {"f": [("live", "Hana is live now: Launch day", room)],
                     "r": [("reminder", "Hana is live now: Launch day", room)],
                     "b": [("reminder", "Hana is live now: Launch day", room)]}
    assert await user_notes(site, host) == []
    # the engine calls again (a retry, with a fresh nonce): nothing new
    assert (await hook(site, "publish", host)).status_code == 200
    assert int(await site.db.fetch_val("SELECT COUNT(*) FROM notifications")) == 3

    # the home page shows the live show's title, the next one is still upcoming
    home = (await (await site.browser(follower)).get("/")).text
    live_part = home.split('id="upcoming"')[0]
    assert "Launch day" in live_part and "LIVE" in live_part
    assert "Tomorrow" in home.split('id="upcoming"')[1]


async def test_an_unscheduled_stream_makes_a_show_and_notifies_followers(site) -> None:
    host = await site.user("Hana", host=True)
    follower = await site.user("Fay")
    await show_queries.set_follow(site.db, follower["id"], host["id"], True)
    # a show scheduled far from now is not the one that starts
    far = await schedule(site, host, "Next week", time.time() + 7 * 86400)
    await hook(site, "publish", host)
    live = await show_queries.live_shows(site.db)
    show = live[host["channel"]["id"]]
    assert show["id"] != far and show["scheduled_at"] is None
    assert show["title"] == host["channel"]["title"]
    [note] = await user_notes(site, follower)
    assert note["kind"] == "live" and note["show_id"] == show["id"]


async def room_events(site, channel_id: int):
    subscription = site.app.state.broker.subscribe(room_topic(channel_id))
    await subscription.ready()
    return subscription


async def next_event(subscription, kind: str, timeout: float = 10.0) -> dict:
    async def find() -> dict:
        async for message in subscription:
            if message["type"] == kind:
                return dict(message)
        raise AssertionError(f"the room's events ended before a {kind!r} event")

    return await asyncio.wait_for(find(), timeout)


async def test_reconnect_within_grace_resumes_and_after_grace_the_show_ends(make_site) -> None:
    site = await make_site(show_end_grace=1.0)
    host = await site.user("Hana", host=True)
    follower = await site.user("Fay")
    await show_queries.set_follow(site.db, follower["id"], host["id"], True)
    show_id = await schedule(site, host, "Morning show", time.time() + 60)
    next_id = await schedule(site, host, "Evening show", time.time() + 86400)
    events = await room_events(site, host["channel"]["id"])

    await hook(site, "publish", host)
    await hook(site, "publish_done", host)  # an OBS hiccup ...
    await next_event(events, "offline")
    await hook(site, "publish", host)  # ... back within the grace period
    await asyncio.sleep(1.5)  # past the grace: the first publish_done's timer finds it live
    resumed = await show_queries.show(site.db, show_id)
    assert resumed["status"] == "live" and resumed["ended_at"] is None
    assert len(await user_notes(site, follower)) == 1  # no second "live" notification
    assert int(await site.db.fetch_val("SELECT COUNT(*) FROM shows")) == 2

    # a recording of this show is ready: the ended event links its replay
    replay_id = await site.db.execute(recordings.insert().values(
        channel_id=host["channel"]["id"], show_id=show_id, stream_name="x", started_at=now(),
        status="ready", url="/recordings/x.mp4"))
    await hook(site, "publish_done", host)
    ended = await next_event(events, "ended")
    assert ended["replay_url"] == f"/replay/{replay_id}"
    assert ended["next_show"]["id"] == next_id and ended["next_show"]["title"] == "Evening show"
    assert (await next_event(events, "viewers"))["count"] == 0
    finished = await show_queries.show(site.db, show_id)
    assert finished["status"] == "ended" and finished["ended_at"] is not None
    # the upkeep rounds and the timer ran again meanwhile: the show ended once
    await asyncio.sleep(1.2)
    await events.close()

    # going live again, a day before the evening show: a new (unscheduled) show, not that one
    await hook(site, "publish", host)
    assert (await show_queries.show(site.db, next_id))["status"] == "scheduled"
    assert len(await user_notes(site, follower)) == 2


async def test_a_resume_racing_the_grace_ender_never_leaves_an_ended_show_open(
        make_site) -> None:
    """The ender ends the show (its row locked, not yet committed) while the host's publish
    reads it as resumable: the resume must see the end and start a new show, never clear the
    ended show's ended_at and leave the live channel without a live show."""
    grace = 30.0
    site = await make_site(show_end_grace=grace)
    host = await site.user("Hana", host=True)
    channel = host["channel"]
    await hook(site, "publish", host)
    await hook(site, "publish_done", host)
    first = (await show_queries.live_shows(site.db))[channel["id"]]
    assert first["ended_at"] is not None
    locked, release = asyncio.Event(), asyncio.Event()

    async def ender() -> None:
        # end_overdue_shows' UPDATE, held open while go_live reads and tries to resume
        async with site.db.transaction():
            await site.db.execute(
                "UPDATE shows SET status = 'ended' WHERE id = :id AND status = 'live'",
                {"id": first["id"]})
            locked.set()
            await release.wait()

    async def publisher():
        await locked.wait()
        channel_row = await queries.channel_by_slug(site.db, channel["slug"])
        return await show_queries.go_live(site.db, channel_row, "local", 600, "Hana", grace)

    ending = asyncio.ensure_future(ender())
    going = asyncio.ensure_future(publisher())
    await locked.wait()
    await asyncio.sleep(0.5)  # go_live reads the snapshot and (MariaDB) waits on the row lock
    release.set()
    await ending
    show, started, _ = await going
    assert started and show["id"] != first["id"]
    rows = await site.db.fetch_all(
        "SELECT id, status, ended_at FROM shows WHERE channel_id = :c ORDER BY id",
        {"c": channel["id"]})
    assert [(r[0], r[1], r[2] is None) for r in rows] == [
        (first["id"], "ended", False), (show["id"], "live", True)]
    assert (await queries.channel_by_slug(site.db, channel["slug"]))["is_live"]

    # a resume after the grace ran out (the ender not yet round): that show ends unannounced
    # and the publish starts a new one, so the ender never sends "ended" over a live room
    await hook(site, "publish_done", host)
    await site.db.execute("UPDATE shows SET ended_at = :t WHERE id = :id",
                          {"t": now() - grace - 1, "id": show["id"]})
    channel_row = await queries.channel_by_slug(site.db, channel["slug"])
    third, started, _ = await show_queries.go_live(site.db, channel_row, "local", 600, "Hana",
                                                   grace)
    assert started and third["id"] != show["id"]
    assert (await show_queries.show(site.db, show["id"]))["status"] == "ended"
    assert await show_queries.end_overdue_shows(site.db, grace) == []


async def notification_indexes(db) -> set[str]:
    if db.dialect_name == "sqlite":
        return {row[1] for row in await db.fetch_all("PRAGMA index_list(notifications)")}
    return {row[0] for row in await db.fetch_all(
        "SELECT INDEX_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() "
        "AND TABLE_NAME = 'notifications'")}


async def test_notifications_of_a_show_are_indexed_on_new_and_upgraded_databases(site) -> None:
    # go_live reads a show's notifications under the channel's lock: never a table scan
    db = site.db
    assert "ix_notifications_show" in await notification_indexes(db)  # a new database
    # a database that reached version 2 before: migration 3 makes the index
    await db.execute("DROP INDEX ix_notifications_show"
                     + (" ON notifications" if db.dialect_name == "mysql" else ""))
    await db.execute("DELETE FROM schema_version WHERE version > 2")
    assert "ix_notifications_show" not in await notification_indexes(db)
    assert await migrations.upgrade(db) == [m.version for m in migrations.MIGRATIONS
                                            if m.version > 2]
    assert "ix_notifications_show" in await notification_indexes(db)


async def test_the_notification_stream_and_page(make_site) -> None:
    site = await make_site()
    host = await site.user("Hana", host=True)
    follower = await site.user("Fay")
    await show_queries.set_follow(site.db, follower["id"], host["id"], True)
    token = await security.start_session(site.db, follower["id"], 1.0)
    async with served(site.app) as base, httpx.AsyncClient(
            base_url=base, cookies={security.SESSION_COOKIE: token}, timeout=10) as client:
        assert (await httpx.AsyncClient(base_url=base).get("/notifications/events")) \
            .status_code == 401
        async with client.stream("GET", "/notifications/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()

            async def next_data() -> dict:
                async for line in lines:
                    if line.startswith("data: "):
                        return json.loads(line[6:])
                raise AssertionError("the stream ended")

            assert await asyncio.wait_for(next_data(), 10) == {"type": "unread", "count": 0}
            await hook(site, "publish", host)
            event = await asyncio.wait_for(next_data(), 10)
            assert event["type"] == "notification"
            assert event["notification"]["text"].startswith("Hana is live now")
            assert event["notification"]["url"] == f"/room/{host['channel']['slug']}"

    browser = await site.browser(follower)
    page = await browser.get("/notifications")
    assert "Hana is live now" in page.text and 'class="notify-item unread"' in page.text
    assert 'id="notify-badge"' in page.text and "/static/js/notify.js" in page.text
    response = await browser.post("/notifications/read")
    assert response.status_code == 303
    assert await show_queries.unread_count(site.db, follower["id"]) == 0
    assert "notify-item unread" not in (await browser.get("/notifications")).text


async def test_email_goes_out_through_smtp_when_configured(make_site) -> None:
    sink = SmtpSink()
    try:
        site = await make_site(smtp_url=sink.url, smtp_from="WatchBuy <shows@watchbuy.test>",
                               public_url="http://shop.test")
        host = await site.user("Hana", host=True)
        follower = await site.user("Fay")
        quiet = await site.user("Quinn")  # follows nobody: no mail
        await show_queries.set_follow(site.db, follower["id"], host["id"], True)
        await schedule(site, host, "Mail day", time.time() + 60)
        await hook(site, "publish", host)
        [mail] = await sink.wait_for(1)
        assert mail.recipients == [follower["email"]] and quiet["email"] not in mail.recipients
        assert mail.message["Subject"] == "Hana is live: Mail day"
        assert mail.message["From"] == "WatchBuy <shows@watchbuy.test>"
        body = mail.message.get_payload(decode=True).decode()
        assert f"http://shop.test/room/{host['channel']['slug']}" in body
    finally:
        sink.close()


async def test_a_line_break_in_a_title_is_stripped_and_a_bad_mail_costs_only_itself(
        make_site, caplog) -> None:
    sink = SmtpSink()
    try:
        site = await make_site(smtp_url=sink.url, smtp_from="WatchBuy <shows@watchbuy.test>")
        host = await site.user("Hana", host=True)
        # pasted with a line break and a tab: stored on one line
        browser = await site.browser(host)
        await browser.get("/studio/shows")
        response = await browser.post("/studio/shows/new", {
            "title": "Mail\r\nBcc: x@evil.test\tday", "starts": form_time(time.time() + 60),
            "tz_offset": "0"})
        assert response.status_code == 303, response.text
        [stored] = await show_queries.channel_shows(site.db, host["channel"]["id"])
        assert stored["title"] == "Mail Bcc: x@evil.test day"
        await browser.get("/studio")
        await browser.post("/studio/title", {"title": "Late\nnight"})
        channel = await queries.channel_by_slug(site.db, host["channel"]["slug"])
        assert channel["title"] == "Late night"
        # a message EmailMessage refuses (a subject from before this check) is skipped and
        # counted in one line; the rest of the batch goes out
        notify.limited.reset()  # rate-limited per process: the other database's run logged
        mailer = notify.Mailer(sink.url, "WatchBuy <shows@watchbuy.test>")
        mailer.send([("a@watchbuy.test", "Bad\nsubject", "one"),
                     ("b@watchbuy.test", "Good subject", "two")])
        await mailer.drain()
        [mail] = await sink.wait_for(1)
        assert mail.recipients == ["b@watchbuy.test"]
        assert mail.message["Subject"] == "Good subject"
        assert "1 of 2 emails not sent" in caplog.text
    finally:
        sink.close()


async def test_without_smtp_no_mail_is_tried_and_an_unreachable_server_costs_a_log_line(
        make_site, caplog) -> None:
    site = await make_site()
    assert site.app.state.mailer is None
    notify.limited.reset()  # the line is rate-limited per process: the other run's line
    sink = SmtpSink()
    sink.close()  # nothing listens on its port any more
    broken = await make_site(smtp_url=sink.url)
    host = await broken.user("Hana", host=True)
    follower = await broken.user("Fay")
    await show_queries.set_follow(broken.db, follower["id"], host["id"], True)
    assert (await hook(broken, "publish", host)).status_code == 200
    await asyncio.gather(*broken.app.state.show_timers.tasks)  # delivery runs after the answer
    await broken.app.state.mailer.drain()
    assert any("not sent" in r.getMessage() for r in caplog.records)
    assert len(await user_notes(broken, follower)) == 1  # the in-site notification stays


async def test_two_site_processes_getting_the_hook_twice_start_and_notify_once(
        make_site, redis_url) -> None:
    prefix = f"shows-{time.time_ns()}:"
    first = await make_site(broker_url=redis_url, broker_prefix=prefix, show_end_grace=0.5)
    second = await make_site(broker_url=redis_url, broker_prefix=prefix, show_end_grace=0.5)
    host = await first.user("Hana", host=True)
    fans = [await first.user(f"Fan {n}") for n in range(5)]
    show_id = await schedule(first, host, "Big one", time.time() + 60)
    for fan in fans:
        await show_queries.set_follow(first.db, fan["id"], host["id"], True)
        await show_queries.set_reminder(first.db, fan["id"], show_id, True)
    events = await room_events(second, host["channel"]["id"])
    for _ in range(3):  # three rounds of the same publish reaching both processes at once
        answers = await asyncio.gather(hook(first, "publish", host),
                                       hook(second, "publish", host))
        assert [a.status_code for a in answers] == [200, 200]
    assert int(await first.db.fetch_val("SELECT COUNT(*) FROM notifications")) == len(fans)
    assert int(await first.db.fetch_val(
        "SELECT COUNT(*) FROM shows WHERE status = 'live'")) == 1
    # both processes end it after the grace; the room hears "ended" once
    await asyncio.gather(hook(first, "publish_done", host), hook(second, "publish_done", host))
    await next_event(events, "ended")
    with pytest.raises(TimeoutError):
        await next_event(events, "ended", timeout=1.5)
    await events.close()


class SiteProcess:
    """One ``watchbuy site`` process (its own event loop, database pool and Redis connection)."""

    def __init__(self, workdir, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("WATCHBUY_")}
        environ.update(WATCHBUY_ENV_FILE=os.devnull, WATCHBUY_DATA_DIR=str(workdir),
                       WATCHBUY_SITE_HOST="127.0.0.1", **env)
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "site.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "watchbuy", "site", "--port", str(self.port)],
                env=environ, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)

    async def ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url) as client:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/login")).status_code == 200:
                        return
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the site did not start: {self.log_path.read_text()}")
                await asyncio.sleep(0.2)

    async def hook(self, secret: str, call: str, host: dict) -> int:
        signed = signed_hook(secret, {"call": call, "app": "live",
                                      "key": host["channel"]["stream_key"], "node_id": "n1"})
        async with httpx.AsyncClient(base_url=self.url, timeout=20) as client:
            response = await client.post("/hooks/rtmp", content=signed["content"],
                                         headers=signed["headers"])
            return response.status_code

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


async def test_two_real_site_processes_on_mariadb_notify_once(
        fresh_mariadb_url, redis_url, tmp_path) -> None:
    """The hook reaching two separate ``watchbuy site`` processes at once (an engine retry that
    the load balancer sends elsewhere): one show, one notification per fan, one "ended"."""
    env = {"WATCHBUY_DATABASE_URL": fresh_mariadb_url, "WATCHBUY_BROKER_URL": redis_url,
           "WATCHBUY_BROKER_PREFIX": f"shows-{uuid.uuid4().hex}:",
           "WATCHBUY_HOOK_SECRET": "shared-hook-secret", "WATCHBUY_SECRET_KEY": "k" * 32,
           "WATCHBUY_SHOW_END_GRACE": "1"}
    db = Database(fresh_mariadb_url)
    listener = RedisBroker(redis_url, prefix=env["WATCHBUY_BROKER_PREFIX"])
    first = SiteProcess(tmp_path / "a", **env)
    second = None
    try:
        await first.ready()  # the first migrates the new database (as `watchbuy db upgrade`)
        second = SiteProcess(tmp_path / "b", **env)
        await second.ready()
        await db.connect()
        await listener.start()
        host = await make_user(db, "Hana", host=True)
        fans = [await make_user(db, f"Fan {n}") for n in range(6)]
        show_id = await show_queries.create_show(db, host["channel"]["id"], "Big one",
                                                 time.time() + 60, None, [])
        for fan in fans:
            await show_queries.set_follow(db, fan["id"], host["id"], True)
            await show_queries.set_reminder(db, fan["id"], show_id, True)
        events = listener.subscribe(room_topic(host["channel"]["id"]))
        await events.ready()
        secret = env["WATCHBUY_HOOK_SECRET"]
        for _ in range(3):
            codes = await asyncio.gather(first.hook(secret, "publish", host),
                                         second.hook(secret, "publish", host))
            assert codes == [200, 200]
        assert int(await db.fetch_val("SELECT COUNT(*) FROM notifications")) == len(fans)
        assert int(await db.fetch_val("SELECT COUNT(*) FROM shows")) == 1
        assert (await show_queries.show(db, show_id))["status"] == "live"
        await asyncio.gather(first.hook(secret, "publish_done", host),
                             second.hook(secret, "publish_done", host))
        await next_event(events, "ended")
        with pytest.raises(TimeoutError):
            await next_event(events, "ended", timeout=2.5)
        assert (await show_queries.show(db, show_id))["status"] == "ended"
        await events.close()
    finally:
        first.stop()
        if second is not None:
            second.stop()
        await listener.close()
        await db.disconnect()


def test_show_settings_are_checked() -> None:
    base = {"WATCHBUY_ENV_FILE": "/dev/null", "WATCHBUY_DATA_DIR": "/tmp/wb-shows-config"}
    assert load_site_settings(base).show_end_grace == 30.0
    for name, value in (("WATCHBUY_SHOW_END_GRACE", "0"), ("WATCHBUY_SHOW_START_WINDOW", "-1"),
                        ("WATCHBUY_SMTP_URL", "mail.example.com:25")):
        with pytest.raises(ConfigError) as caught:
            load_site_settings({**base, name: value})
        assert name in str(caught.value) and "\n" not in str(caught.value)


# -- in Chromium, against a real ``watchbuy serve`` and ffmpeg --------------------------------------

HOST_EMAIL = "host@watchbuy.local"
GRACE = 3.0  # the served site's WATCHBUY_SHOW_END_GRACE: short, so the test sees the end


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """This module's ``watchbuy serve`` (browser_fixtures.py's, with a short show-end grace):
    the shared ``browser``, ``new_context`` and ``phone`` fixtures run against it."""
    require_browser()
    srv = Server(tmp_path_factory.mktemp("watchbuy-shows"),
                 env={"WATCHBUY_SHOW_END_GRACE": str(GRACE)}).start()
    yield srv
    srv.stop()


# the screenshots of this module are taken at one device pixel per CSS pixel
SCALE = {"device_scale_factor": 1}


def local_time_in(page, seconds_ahead: float) -> str:
    """What the datetime-local field takes for now + ``seconds_ahead``, in the page's zone."""
    return page.evaluate("""(ahead) => {
      const d = new Date(Date.now() + ahead * 1000), p = (n) => String(n).padStart(2, "0");
      return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + "T" +
             p(d.getHours()) + ":" + p(d.getMinutes());
    }""", seconds_ahead)


def schedule_in_page(page, base: str, title: str, seconds_ahead: float,
                     cover: bytes | None = None) -> None:
    page.goto(f"{base}/studio/shows")
    page.fill("#show-form input[name=title]", title)
    page.fill("#show-form input[name=starts]", local_time_in(page, seconds_ahead))
    for box in page.locator("#show-form input[name=products]").all()[:2]:
        box.check()
    if cover is not None:
        page.set_input_files("#show-form input[name=image]", files=[
            {"name": "cover.png", "mimeType": "image/png", "buffer": cover}])
    with page.expect_navigation():
        page.click("#show-form button[type=submit]")
    assert "Show scheduled" in page.inner_text("main"), page.inner_text("main")[:400]


def no_sideways_scroll(page) -> None:
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], \
        f"{page.url} scrolls sideways on a phone"


@pytest.mark.ffmpeg
@pytest.mark.timeout(180)
def test_in_chromium_schedule_remind_follow_live_badge_and_ended_card(
        server, phone, new_context, tmp_path) -> None:
    host = phone(**SCALE).new_page()
    log_in(host, server.url, HOST_EMAIL, server.password, "/studio")
    assert host.locator("#shows a[href='/studio/shows']").count() >= 1
    host.goto(f"{server.url}/studio/shows")
    picture = io.BytesIO()
    Image.new("RGB", (128, 128), (232, 56, 79)).save(picture, "PNG")
    host.set_input_files("#avatar-form input[name=image]", files=[
        {"name": "me.png", "mimeType": "image/png", "buffer": picture.getvalue()}])
    with host.expect_navigation():
        host.click("#avatar-form button[type=submit]")
    assert "Your picture is saved" in host.inner_text("main")
    out = io.BytesIO()
    Image.new("RGB", (640, 360), (40, 60, 160)).save(out, "PNG")
    schedule_in_page(host, server.url, "Spring mugs launch", 600, cover=out.getvalue())
    schedule_in_page(host, server.url, "Scarves for winter", 86400 + 3600)
    no_sideways_scroll(host)
    host.locator(".show-list").scroll_into_view_if_needed()
    screenshot(host, "studio-shows-phone.png")

    shopper = phone(**SCALE).new_page()
    sign_up(shopper, server.url, f"fay-{uuid.uuid4().hex[:6]}@example.test", "Fay",
            "correct horse battery")
    shopper.goto(server.url + "/")
    launch = shopper.locator(".show-card", has_text="Spring mugs launch")
    assert re.search(r"\bin \d+ min \d\d s\b", launch.inner_text()), launch.inner_text()
    with shopper.expect_navigation():
        launch.locator("button", has_text="Remind me").click()
    assert "Reminder set" in shopper.locator(
        ".show-card", has_text="Spring mugs launch").inner_text()
    shopper.goto(server.room_url)
    assert "Spring mugs launch" in shopper.inner_text("#next-show")
    assert covered(shopper, "#next-show button") == []
    screenshot(shopper, "room-next-show-phone.png")
    with shopper.expect_navigation():
        shopper.locator("#next-show .follow-form button").click()
    assert "Following" in shopper.inner_text("#next-show")

    # The shopper waits on the home page; the host starts streaming (ffmpeg, the real hook).
    shopper.goto(server.url + "/")
    shopper.evaluate("window.__sameDocument = true")
    assert shopper.locator("#notify-badge").is_hidden()
    publisher = Publisher(server.rtmp_url, tmp_path / "ffmpeg.log").start()
    try:
        shopper.wait_for_selector("#notify-badge", state="visible", timeout=30_000)
        assert shopper.inner_text("#notify-badge") == "1"  # reminded and following: one
        assert shopper.evaluate("window.__sameDocument === true"), "the page reloaded"
        assert "Hana" in shopper.inner_text(".notify-toast") or \
            "is live now: Spring mugs launch" in shopper.inner_text(".notify-toast")

        with sqlite_of(server) as db:
            show_id, channel_id = db.execute(
                "SELECT id, channel_id FROM shows WHERE status = 'live'").fetchone()
            # a finished recording (the replays engineer's node writes these): on the home
            # page, and linked from the ended card
            db.execute(
                "INSERT INTO recordings (channel_id, show_id, stream_name, started_at, "
                "duration, status, url) VALUES (?, ?, 'demo', ?, 754, 'ready', '/r.mp4')",
                (channel_id, show_id, time.time()))
        shopper.goto(server.url + "/")
        assert "Spring mugs launch" in shopper.inner_text(".room-card.live")
        assert "Scarves for winter" in shopper.inner_text(".upcoming")
        assert shopper.locator(".replay-card").count() == 1
        assert shopper.locator(".room-card.live .avatar img").count() == 1
        no_sideways_scroll(shopper)
        screenshot(shopper, "home-shows-phone.png")
        wide = new_context(viewport={"width": 1280, "height": 1500}).new_page()
        wide.goto(server.url + "/")
        screenshot(wide, "home-shows.png")

        shopper.goto(server.url + "/notifications")
        assert "Spring mugs launch" in shopper.inner_text(".notify-list")
        no_sideways_scroll(shopper)
        screenshot(shopper, "notifications-phone.png")

        shopper.goto(server.room_url)
        shopper.wait_for_selector("#live-badge.live")
        assert shopper.inner_text("#follow-live") == "Following ✓"  # over the live player
        assert covered(shopper, "#follow-live button") == []  # not under the room head
        screenshot(shopper, "room-follow-live-phone.png")
        shopper.evaluate("window.__sameDocument = true")
    finally:
        publisher.stop()
    # offline at once, ended after the grace period: the card, the next show, the replay
    shopper.wait_for_selector("#show-ended", state="visible", timeout=(GRACE + 20) * 1000)
    card = shopper.inner_text("#show-ended")
    assert "The show has ended" in card and "Scarves for winter" in card, card
    assert shopper.get_attribute("#show-ended-replay", "href").startswith("/replay/")
    assert shopper.inner_text("#viewer-count") == "0"
    assert shopper.locator("#follow-live").is_hidden()
    assert shopper.evaluate("window.__sameDocument === true"), "the room reloaded"
    no_sideways_scroll(shopper)
    # every action on the card can be tapped: not under the dock, the rail or the room head
    ended_actions = "#show-ended .show-ended-actions a, #show-ended .show-ended-actions button"
    assert covered(shopper, ended_actions) == []
    screenshot(shopper, "show-ended-phone.png")
    for size in ({"width": 844, "height": 390}, {"width": 1280, "height": 800}):
        shopper.set_viewport_size(size)
        assert covered(shopper, ended_actions) == [], size
    shopper.set_viewport_size({"width": 844, "height": 390})
    screenshot(shopper, "show-ended-landscape.png")
    with sqlite_of(server) as db:
        assert db.execute("SELECT status FROM shows WHERE id = ?", (show_id,)).fetchone() == \
            ("ended",)


def other_dst_date(zone: str) -> dt.datetime:
    """A date at 20:00 in ``zone`` whose UTC offset differs from today's (across a
    daylight-saving change from now), more than two days ahead and well within a year."""
    from zoneinfo import ZoneInfo

    tz = ZoneInfo(zone)
    today = dt.datetime.now(tz)
    for year in (today.year, today.year + 1):
        for month in (1, 7):
            at = dt.datetime(year, month, 15, 20, 0, tzinfo=tz)
            if at - today > dt.timedelta(days=2) and at.utcoffset() != today.utcoffset():
                return at
    raise AssertionError("no date across a daylight-saving change within a year")


@pytest.mark.timeout(120)
def test_in_chromium_a_show_across_a_daylight_saving_change_starts_at_the_local_time_chosen(
        server, phone) -> None:
    # the browser in Berlin; the start time is on the other side of a DST change from today
    page = phone(timezone_id="Europe/Berlin", locale="en-GB", **SCALE).new_page()
    log_in(page, server.url, HOST_EMAIL, server.password, "/studio/shows")
    starts = other_dst_date("Europe/Berlin")
    title = f"Across DST {uuid.uuid4().hex[:6]}"
    page.goto(f"{server.url}/studio/shows")
    page.fill("#show-form input[name=title]", title)
    page.fill("#show-form input[name=starts]", starts.strftime("%Y-%m-%dT%H:%M"))
    with page.expect_navigation():
        page.click("#show-form button[type=submit]")
    assert "Show scheduled" in page.inner_text("main"), page.inner_text("main")[:400]
    with contextlib.closing(sqlite_of(server)) as db:
        [(show_id, stored)] = db.execute(
            "SELECT id, scheduled_at FROM shows WHERE title = ?", (title,)).fetchall()
    # 20:00 in Berlin on that day (CET or CEST as that day has it), not today's offset
    assert stored == starts.timestamp(), (
        dt.datetime.fromtimestamp(stored, dt.UTC), starts.astimezone(dt.UTC))
    # the edit form shows it back as 20:00 local time on that day
    page.goto(f"{server.url}/studio/shows/{show_id}")
    shown = page.input_value("input[type=datetime-local]")
    assert shown == starts.strftime("%Y-%m-%dT%H:%M")
    # saved again unchanged, it stays where it was
    with page.expect_navigation():
        page.locator("input[type=datetime-local]").locator(
            "xpath=ancestor::form").locator("button[type=submit]").first.click()
    with contextlib.closing(sqlite_of(server)) as db:
        [(again,)] = db.execute("SELECT scheduled_at FROM shows WHERE id = ?",
                                (show_id,)).fetchall()
    assert again == starts.timestamp()


@pytest.mark.timeout(120)
def test_in_chromium_a_replay_ready_after_the_end_joins_the_card_and_the_offline_room(
        tmp_path, phone) -> None:
    """The node remuxes (and uploads) after the stream left, so the recording is usually ready
    after the show ended: the open room's card gains the link, a new visitor finds it."""
    secret = "late-replay-secret"
    # a site of its own: one that trusts the test's hook secret
    server = Server(tmp_path, env={"WATCHBUY_HOOK_SECRET": secret,
                                   "WATCHBUY_SHOW_END_GRACE": "1"}).start()

    def call(name: str, **fields) -> None:
        signed = signed_hook(secret, {"call": name, "app": "live", "key": server.stream_key,
                                      "name": server.room_slug, "node_id": "local", **fields})
        response = httpx.post(f"{server.url}/hooks/rtmp", content=signed["content"],
                              headers=signed["headers"])
        assert response.status_code == 200, response.text

    try:
        page = phone(**SCALE).new_page()
        page.goto(server.room_url)
        page.wait_for_function("window.WatchBuyRoom !== undefined")
        call("publish")
        page.wait_for_selector("#live-badge.live")
        call("publish_done")
        page.wait_for_selector("#show-ended", state="visible")
        assert page.locator("#show-ended-replay").is_hidden()  # not remuxed yet
        with contextlib.closing(sqlite_of(server)) as db:
            started, ended = db.execute("SELECT started_at, ended_at FROM shows "
                                        "WHERE status = 'ended'").fetchone()
        # the node's MP4 beside the site (watchbuy serve): a report of a file the site does
        # not have is filed as failed, never linked
        recordings = server.workdir / "data" / "recordings"
        recordings.mkdir(parents=True, exist_ok=True)
        (recordings / "late-show.mp4").write_bytes(b"\0" * 64)
        call("recording_ready", addr="", started_at=started, ended_at=ended, start_ms=0,
             file="late-show.mp4", url="", duration=42.0, size=1000)
        page.wait_for_selector("#show-ended-replay", state="visible")
        with contextlib.closing(sqlite_of(server)) as db:
            [(replay_id,)] = db.execute("SELECT id FROM recordings").fetchall()
        assert page.get_attribute("#show-ended-replay", "href") == f"/replay/{replay_id}"
        no_sideways_scroll(page)
        screenshot(page, "show-ended-late-replay-phone.png")
        # a visitor who comes later: the offline room links it from the database
        page.goto(server.room_url)
        page.wait_for_selector("#offline-replay", state="visible")
        assert page.get_attribute("#offline-replay", "href") == f"/replay/{replay_id}"
        no_sideways_scroll(page)
        screenshot(page, "room-offline-replay-phone.png")
    finally:
        server.stop()
