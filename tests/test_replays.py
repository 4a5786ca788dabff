"""Replays and pins on the media clock: the site with a real node (ffmpeg publishing), the
recording hook, the replay page, retention, S3 through moto, and Chromium playing a replay."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import subprocess
import time
import uuid
from urllib.parse import quote

import httpx
import pytest
from app_helpers import make_product, table_counts
from browser_helpers import (
    PHONE,
    covered,
    fill_first_purchase,
    log_in,
    room_state,
    screenshot,
    sqlite_of,
    thank_you,
    wait_until,
)
from conftest import node_settings, start_ffmpeg_publisher, stop_process, wait_live
from hook_helpers import signed_hook
from media_helpers import decode_errors, ffprobe_json
from moto import mock_aws
from shop_helpers import buy

from watchbuy.db import queries, shopping
from watchbuy.db import replays as db_replays
from watchbuy.db import shows as show_queries
from watchbuy.db.schema import pins, recordings
from watchbuy.engine.codecs import amf, flvmux
from watchbuy.engine.hooks import StaticKeys
from watchbuy.engine.node import MediaNode
from watchbuy.site.chat import room_topic
from watchbuy.site.replays import MEDIA_PREFIX, expire_recordings
from watchbuy.site.state import app_state

pytest_plugins = ["site_fixtures", "browser_fixtures"]

HOST_EMAIL = "host@watchbuy.local"  # watchbuy serve's demo host
PASSWORD = "correct horse 42"


async def live_site(make_site, tmp_path):
    """A site and a real node on loopback that trust the same hook secret; the host's channel
    is published by ffmpeg and live on the node.  (site, node, host, channel, publisher)"""
    secret = "replay-test-secret"
    # the node first: the site asks it for cue points at its HTTP port
    node = MediaNode(node_settings(hook_secret=secret, stream_keys={}),
                     authorizer=StaticKeys({}))
    await node.start()
    site = await make_site(hook_secret=secret, node_stats_url=f"http://127.0.0.1:{node.http_port}")
    host = await site.user("Hana Host", host=True)
    channel = host["channel"]
    node.authorizer.keys[channel["stream_key"]] = channel["slug"]
    publisher = await start_ffmpeg_publisher(
        f"rtmp://127.0.0.1:{node.rtmp_port}/live/{channel['stream_key']}", seconds=30,
        size="160x120")
    await wait_live(node, channel["slug"])
    await queries.set_live(site.db, channel["id"], True, "test-node")
    return site, node, host, channel, publisher


async def test_pins_while_live_go_in_band_and_are_stored_on_the_media_clock(make_site, tmp_path):
    site, node, host, channel, publisher = await live_site(make_site, tmp_path)
    try:
        products = [await make_product(site.db, host, name=f"Thing {i}") for i in range(3)]
        studio = await site.browser(host)
        await studio.get("/studio")
        viewer_reader = await asyncio.open_connection("127.0.0.1", node.http_port)
        reader, writer = viewer_reader
        writer.write(f"GET /live/{channel['slug']}.flv HTTP/1.0\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        answers = []
        for product in (*products, None):
            response = await studio.fetch("/studio/pin", {
                "product_id": str(product["id"]) if product else ""})
            assert response.status_code == 200, response.text
            answers.append(response.json()["media_ms"])
            await asyncio.sleep(0.3)
        assert all(isinstance(ms, int) for ms in answers) and answers == sorted(answers)
        # the HTTP-FLV viewer got each cue at the timestamp the site stored
        demuxer, cues = flvmux.FlvReader(), []
        while len(cues) < 4:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data
            for tag_type, timestamp, payload in demuxer.feed(data):
                if tag_type == flvmux.TAG_SCRIPT:
                    values = amf.decode_amf0(bytes(payload))
                    if values[0] == "onCuePoint":
                        cues.append((timestamp, values[1].get("product_id")))
        writer.close()
        assert cues == [(ms, p["id"] if p else None)
                        for ms, p in zip(answers, (*products, None), strict=True)]
        rows = [dict(r._mapping) for r in await site.db.fetch_all(
            pins.select().where(pins.c.channel_id == channel["id"]).order_by(pins.c.id))]
        assert [r["media_ms"] for r in rows] == answers
        assert [r["product_id"] for r in rows] == [p["id"] for p in products] + [None]
        assert all(r["recording_id"] is None for r in rows)
    finally:
        await stop_process(publisher)
        await node.stop()


async def test_a_pin_while_offline_is_not_kept_and_a_node_that_cannot_cue_still_pins(site):
    host = await site.user("Olga Offline", host=True)
    product = await site.product(host)
    studio = await site.browser(host)
    response = await studio.fetch("/studio/pin", {"product_id": str(product["id"])})
    assert response.status_code == 200 and response.json()["media_ms"] is None
    assert await site.db.fetch_val("SELECT COUNT(*) FROM pins") == 0
    # live, but no node answers at node_stats_url: the websocket pin still goes out
    await queries.set_live(site.db, host["channel"]["id"], True, "gone-node")
    response = await studio.fetch("/studio/pin", {"product_id": str(product["id"])})
    assert response.status_code == 200 and response.json()["pinned"]["id"] == product["id"]
    assert response.json()["media_ms"] is None
    row = dict((await site.db.fetch_one(pins.select()))._mapping)
    assert row["product_id"] == product["id"] and row["media_ms"] is None


async def recording_call(site, channel: dict, **fields) -> httpx.Response:
    started = time.time() - 30
    payload = {"call": "recording_ready", "app": "live", "key": channel["stream_key"],
               "name": channel["slug"], "node_id": "test-node", "addr": "",
               "started_at": started, "ended_at": started + 25, "start_ms": 1000,
               "file": "show-1.mp4", "url": "", "duration": 20.0, "size": 12345, **fields}
    client = await site.browser()
    return await client.http.post("/hooks/rtmp", **signed_hook(site.settings.hook_secret, payload))


async def test_recording_hook_files_the_replay_with_its_pins_and_retention_expires_it(site):
    host = await site.user("Rita Replay", host=True)
    channel = host["channel"]
    mug = await site.product(host, name="Blue mug")
    tote = await site.product(host, name="Canvas tote")
    # pins made concurrently while live (and one of another channel, one before the show)
    other = await site.user("Other Host", host=True)
    await db_replays.add_pin(site.db, channel["id"], mug["id"], 900)  # before the file starts
    await asyncio.gather(
        db_replays.add_pin(site.db, channel["id"], tote["id"], 6000),
        db_replays.add_pin(site.db, channel["id"], None, 16000),
        db_replays.add_pin(site.db, channel["id"], mug["id"], 11000),
        db_replays.add_pin(site.db, other["channel"]["id"], mug["id"], 5000))
    folder = site.settings.recordings_dir
    folder.mkdir(parents=True)
    (folder / "show-1.mp4").write_bytes(b"\0" * 64)
    response = await recording_call(site, channel)
    assert response.status_code == 200, response.text
    recording_id = response.json()["recording_id"]
    row = await db_replays.recording(site.db, recording_id)
    assert row["status"] == "ready" and row["url"] == "/replays/media/show-1.mp4"
    assert row["media_start_ms"] == 1000 and row["size_bytes"] == 12345
    filed = await db_replays.recording_pins(site.db, recording_id)
    assert [p["media_ms"] for p in filed] == [900, 6000, 11000, 16000]
    page = await (await site.browser()).get(f"/replay/{recording_id}")
    assert page.status_code == 200
    timeline = json.loads(page.text.split('id="replay-timeline">')[1].split("</script>")[0])
    assert [(i["offset"], i["product"] and i["product"]["name"]) for i in timeline] == [
        (0.0, "Blue mug"), (5.0, "Canvas tote"), (10.0, "Blue mug"), (15.0, None)]
    # each product pinned in the show is for sale on the page, through the cart at its price
    for product in (mug, tote):
        assert f'data-add="{product["id"]}"' in page.text
    shopper = await site.browser(await site.user("Sue Shopper"))
    await shopper.get(f"/replay/{recording_id}")
    added = await shopper.fetch("/cart/add", {"product_id": str(tote["id"]), "quantity": "1",
                                              "source": "replay"})
    assert added.status_code == 200 and added.json()["ok"], added.text
    cart = await shopper.get("/cart")
    assert "Canvas tote" in cart.text and "$18.00" in cart.text
    media = await (await site.browser()).get("/replays/media/show-1.mp4",
                                             headers={"Range": "bytes=10-19"})
    assert media.status_code == 206 and media.content == b"\0" * 10
    for bad in ("../watchbuy.db", "show-1.flv", "nope.mp4"):
        assert (await (await site.browser()).get(f"/replays/media/{bad}")).status_code == 404
    # a forged or malformed report files nothing
    assert (await recording_call(site, channel, file="../../etc/passwd")).status_code == 400
    assert (await recording_call(site, channel, duration=-1)).status_code == 400
    assert await site.db.fetch_val("SELECT COUNT(*) FROM recordings") == 1
    # retention: a replay older than WATCHBUY_RECORD_RETENTION_DAYS is deleted and expired
    site.settings.record_retention_days = 1
    assert await expire_recordings(app_state(site.app)) == 0
    await site.db.execute(recordings.update().where(recordings.c.id == recording_id)
                          .values(started_at=time.time() - 2 * 86400))
    assert await expire_recordings(app_state(site.app)) == 1
    assert not (folder / "show-1.mp4").exists()
    assert (await db_replays.recording(site.db, recording_id))["status"] == "expired"
    assert (await (await site.browser()).get(f"/replay/{recording_id}")).status_code == 404


async def test_buy_now_from_a_replay_pays_the_regular_price_while_the_room_pays_the_sale(site):
    """Issue 14: buying from the replay works as in the live room, at the regular price.  With
    a flash sale running on the product, Buy now from the replay (``source=replay``) pays the
    regular price and takes none of the sale's units; Buy now in the room pays the sale's."""
    host = await site.user("Sam Sale", host=True)
    channel = host["channel"]
    mug = await site.product(host, name="Sale mug", price_minor=1800, stock=10)
    await db_replays.add_pin(site.db, channel["id"], mug["id"], 6000)
    folder = site.settings.recordings_dir
    folder.mkdir(parents=True)
    (folder / "show-1.mp4").write_bytes(b"\0" * 64)
    recording_id = (await recording_call(site, channel)).json()["recording_id"]
    sale_id = await shopping.start_sale(site.db, host["id"], channel["id"], mug["id"], 900, 5,
                                        None, 600)
    shoppers = []
    for name in ("Rae Replay", "Liv Live"):
        user = await site.user(name)
        await shopping.save_card(site.db, user["id"], "visa", "4242")
        shoppers.append(await site.browser(user))
    replay, room = shoppers
    # the replay page sells at the regular price, with Buy now beside Add to cart
    page = await replay.get(f"/replay/{recording_id}")
    assert page.status_code == 200
    assert f'data-buy="{mug["id"]}"' in page.text and 'data-source="replay"' in page.text
    [item] = json.loads(page.text.split('id="replay-timeline">')[1].split("</script>")[0])
    assert (item["product"]["price_minor"], item["product"]["sale"]) == (1800, None)
    before = await table_counts(site.db)
    # a sheet that showed the sale's price is told the replay's (nothing ordered)
    refused = await buy(replay, mug["id"], source="replay", expected_price_minor=900)
    assert refused.status_code == 409, refused.text
    assert (refused.json()["field"], refused.json()["price_minor"]) == ("price", 1800)
    bad = await buy(replay, mug["id"], source="rerun", expected_price_minor=1800)
    assert bad.status_code == 400 and bad.json()["field"] == "source", bad.text
    assert await table_counts(site.db) == before
    # the replay's Buy now and the room's, concurrently: each pays its own price
    bought = await asyncio.gather(
        buy(replay, mug["id"], source="replay", expected_price_minor=1800),
        buy(room, mug["id"], source="room", expected_price_minor=900))
    assert [b.status_code for b in bought] == [200, 200], [b.text for b in bought]
    from_replay, from_room = (b.json()["order"] for b in bought)
    assert (from_replay["total"], from_replay["items"][0]["flash_sale_id"]) == ("$18.00", None)
    assert (from_room["total"], from_room["items"][0]["flash_sale_id"]) == ("$9.00", sale_id)
    # only the room's unit came out of the sale's five; the stock gave one to each
    assert (await shopping.sale(site.db, sale_id))["sold"] == 1
    assert (await queries.product(site.db, mug["id"]))["stock"] == 8
    # a request without a source is the room's (pages from before the replay had Buy now)
    legacy = (await buy(room, mug["id"])).json()["order"]
    assert legacy["total"] == "$9.00" and legacy["items"][0]["flash_sale_id"] == sale_id


async def test_a_replay_cannot_sidestep_a_running_drop_limited_per_shopper(site):
    """A drop of one per shopper at the regular price (no sale price) runs on the product: the
    replay's regular-price Buy now would let one shopper take the whole drop, so it is refused
    with the reason while the sale runs; the room sells each shopper their one unit."""
    host = await site.user("Dee Drop", host=True)
    channel = host["channel"]
    mug = await site.product(host, name="Drop mug", price_minor=1800, stock=3)
    sale_id = await shopping.start_sale(site.db, host["id"], channel["id"], mug["id"], None, 3,
                                        1, 600)
    user = await site.user("Bo Bot")
    await shopping.save_card(site.db, user["id"], "visa", "4242")
    bot = await site.browser(user)
    first = await buy(bot, mug["id"], source="room", expected_price_minor=1800)
    assert first.status_code == 200, first.text
    again = await buy(bot, mug["id"], source="room", expected_price_minor=1800)
    assert again.status_code == 409 and "per shopper" in again.json()["error"], again.text
    before = await table_counts(site.db)
    sidestep = await buy(bot, mug["id"], source="replay", expected_price_minor=1800)
    assert sidestep.status_code == 409, sidestep.text
    assert "live room" in sidestep.json()["error"] and sidestep.json()["field"] == "product_id"
    assert await table_counts(site.db) == before
    assert (await queries.product(site.db, mug["id"]))["stock"] == 2
    # once the drop has ended the replay sells at the regular price again
    assert await shopping.end_sale(site.db, sale_id, "host")
    after = await buy(bot, mug["id"], source="replay", expected_price_minor=1800)
    assert after.status_code == 200, after.text
    assert after.json()["order"]["items"][0]["flash_sale_id"] is None


async def test_a_report_made_again_files_one_replay_and_a_file_not_here_is_failed(site,
                                                                                caplog):
    """The node retries a report whose answer it did not get (even while the first is being
    filed): one row.  A node elsewhere without S3 reports a local file this site does not
    have: filed as failed with why, never listed as a replay that cannot play."""
    host = await site.user("Ray Retry", host=True)
    channel = host["channel"]
    folder = site.settings.recordings_dir
    folder.mkdir(parents=True)
    (folder / "show-1.mp4").write_bytes(b"\0" * 64)
    started = time.time() - 30
    answers = await asyncio.gather(*(recording_call(site, channel, started_at=started,
                                                    ended_at=started + 25) for _ in range(3)))
    assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
    assert len({a.json()["recording_id"] for a in answers}) == 1
    assert await site.db.fetch_val("SELECT COUNT(*) FROM recordings") == 1
    caplog.set_level(logging.WARNING, logger="watchbuy.site.replays")
    missing = await recording_call(site, channel, file="elsewhere-1.mp4",
                                   started_at=started + 100, ended_at=started + 120)
    assert missing.status_code == 200, missing.text  # taken: the node stops retrying
    row = await db_replays.recording(site.db, missing.json()["recording_id"])
    assert row["status"] == "failed" and row["url"] is None
    assert "elsewhere-1.mp4 is not in this site's record folder" in row["error"]
    assert sum("WATCHBUY_RECORD_S3_BUCKET" in r.getMessage() for r in caplog.records) == 1
    assert [r["id"] for r in await db_replays.channel_replays(site.db, channel["id"])] == [
        answers[0].json()["recording_id"]]
    assert (await (await site.browser()).get(f"/replay/{row['id']}")).status_code == 404


async def test_expiry_pages_through_every_old_replay_and_skips_one_it_cannot_delete(
        site, caplog):
    host = await site.user("Otto Old", host=True)
    folder = site.settings.recordings_dir
    folder.mkdir(parents=True)
    ids = []
    for n in range(7):
        name = f"old-{n}.mp4"
        if n == 0:
            (folder / name).mkdir()  # the oldest cannot be unlinked: a directory
        else:
            (folder / name).write_bytes(b"\0")
        ids.append(await site.db.execute(recordings.insert().values(
            channel_id=host["channel"]["id"], stream_name="x", status="ready",
            started_at=time.time() - 3 * 86400, ended_at=time.time() - 3 * 86400 + 60,
            url=f"/replays/media/{name}")))
    site.settings.record_retention_days = 1
    caplog.set_level("WARNING", "watchbuy.site.replays")
    # batches of 3: the undeletable row first in the first batch, six expire all the same
    assert await expire_recordings(app_state(site.app), batch=3) == 6
    statuses = {r[0]: r[1] for r in await site.db.fetch_all("SELECT id, status FROM recordings")}
    assert statuses == {ids[0]: "ready", **{i: "expired" for i in ids[1:]}}
    assert sorted(p.name for p in folder.iterdir()) == ["old-0.mp4"]
    lines = [r.getMessage() for r in caplog.records if "could not delete" in r.getMessage()]
    assert len(lines) == 1 and "could not delete 1 expired replays" in lines[0]
    assert "old-0.mp4" in lines[0]


async def publish_hook(site, call: str, channel: dict) -> None:
    client = await site.browser()
    response = await client.http.post("/hooks/rtmp", **signed_hook(site.settings.hook_secret, {
        "call": call, "app": "live", "key": channel["stream_key"], "name": channel["slug"],
        "node_id": "local"}))
    assert response.status_code == 200, response.text


async def next_of(subscription, kind: str, timeout: float = 10.0) -> dict:
    async def find() -> dict:
        async for message in subscription:
            if message["type"] == kind:
                return dict(message)
        raise AssertionError(f"no {kind!r} event")

    return await asyncio.wait_for(find(), timeout)


async def test_a_replay_ready_after_the_show_ended_reaches_the_room_and_its_page(make_site):
    site = await make_site(show_end_grace=0.2)
    host = await site.user("Rhea Late", host=True)
    channel = host["channel"]
    events = site.app.state.broker.subscribe(room_topic(channel["id"]))
    await events.ready()
    await publish_hook(site, "publish", channel)
    await publish_hook(site, "publish_done", channel)
    ended = await next_of(events, "ended")
    assert ended["replay_url"] is None  # the node is still remuxing
    [show] = [s for s in await show_queries.channel_shows(site.db, channel["id"])]
    visitor = await site.browser()
    page = await visitor.get(f"/room/{channel['slug']}")
    assert 'id="offline-replay"' in page.text and "Watch the replay:" not in page.text

    # an OBS reconnect within the grace made two recordings: a fragment and the show (the
    # node's files beside the site: a report of a file the site does not have is filed failed)
    span = {"started_at": show["started_at"], "ended_at": show["ended_at"]}
    folder = site.settings.recordings_dir
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("frag.mp4", "whole.mp4", "tail.mp4", "live.mp4"):
        (folder / name).write_bytes(b"\0" * 64)
    fragment = await recording_call(site, channel, duration=3.0, file="frag.mp4", **span)
    fragment_id = fragment.json()["recording_id"]
    event = await next_of(events, "replay")
    assert event["replay_url"] == f"/replay/{fragment_id}" and event["show_id"] == show["id"]
    whole = await recording_call(site, channel, duration=20.0, file="whole.mp4", **span)
    whole_id = whole.json()["recording_id"]
    assert (await next_of(events, "replay"))["replay_url"] == f"/replay/{whole_id}"
    # a later fragment does not take the link from the longest
    await recording_call(site, channel, duration=2.0, file="tail.mp4", **span)
    assert (await next_of(events, "replay"))["replay_url"] == f"/replay/{whole_id}"
    assert await show_queries.replay_of_show(site.db, show["id"]) == whole_id
    # the offline room links it from the database (the kept page was dropped by the event)
    page = await visitor.get(f"/room/{channel['slug']}")
    assert f'href="/replay/{whole_id}"' in page.text and "Watch the replay:" in page.text
    # a recording of a show still within its grace sends nothing: the ender links it
    await publish_hook(site, "publish", channel)
    live = (await show_queries.live_shows(site.db))[channel["id"]]
    await recording_call(site, channel, duration=5.0, file="live.mp4",
                         started_at=live["started_at"], ended_at=live["started_at"] + 1)
    with pytest.raises(TimeoutError):
        await next_of(events, "replay", timeout=1.0)
    await events.close()


async def test_a_failed_recording_is_filed_as_failed_without_a_replay(site):
    host = await site.user("Fay Failed", host=True)
    response = await recording_call(site, host["channel"], call="recording_failed",
                                    error="cannot write: No space left on device")
    assert response.status_code == 200, response.text
    row = await db_replays.recording(site.db, response.json()["recording_id"])
    assert row["status"] == "failed" and "No space left" in row["error"]
    assert (await (await site.browser()).get(f"/replay/{row['id']}")).status_code == 404


async def test_an_s3_replay_plays_from_the_bucket_and_expires_there(site, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    host = await site.user("Sam S3", host=True)
    with mock_aws():
        import boto3

        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="wb-replays")
        s3.put_object(Bucket="wb-replays", Key="recordings/show-2.mp4", Body=b"mp4")
        url = "https://wb-replays.s3.amazonaws.com/recordings/show-2.mp4"
        response = await recording_call(site, host["channel"], url=url, file="show-2.mp4")
        recording_id = response.json()["recording_id"]
        page = await (await site.browser()).get(f"/replay/{recording_id}")
        assert page.status_code == 200 and f'src="{url}"' in page.text
        csp = page.headers["content-security-policy"]
        media_src = next(p for p in csp.split("; ") if p.startswith("media-src"))
        assert "https://wb-replays.s3.amazonaws.com" in media_src
        site.settings.record_retention_days = 1
        await site.db.execute(recordings.update().where(recordings.c.id == recording_id)
                              .values(started_at=time.time() - 2 * 86400))
        assert await expire_recordings(app_state(site.app)) == 1
        assert s3.list_objects_v2(Bucket="wb-replays").get("KeyCount", 0) == 0


# -- the whole way, in Chromium -------------------------------------------------------------------


@pytest.mark.ffmpeg
@pytest.mark.timeout(240)
def test_replay_files_are_named_for_the_site(tmp_path):
    # the names engine/record.py makes are the names the site serves
    from watchbuy.engine.record import safe_name
    from watchbuy.site.replays import FILE_NAME

    for name in ("show1", "a-b_c", "weird/../name", "x" * 200):
        made = f"{safe_name(name)}-20260101T000000-abcdef.mp4"
        assert FILE_NAME.fullmatch(made), made


class SiteHookKeys(StaticKeys):
    """A node's keys, with recording reports sent to the site by the engine's own hook client
    (engine/hooks.py HttpHooks) at ``url``, through ``transport`` when given."""

    def __init__(self, keys: dict, url: str, secret: str, transport=None) -> None:
        from watchbuy.engine.hooks import HttpHooks

        super().__init__(keys)
        self.hooks = HttpHooks(url, secret, "test-node", timeout=2.0, transport=transport)
        self.recording = self.hooks.recording

    async def close(self) -> None:
        await self.hooks.close()


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_report_the_site_misses_is_retried_and_survives_a_node_restart(
        make_site, tmp_path, monkeypatch):
    """The site is down when the recording is ready: the node retries in the background and
    keeps the report in its record folder; restarted, it sends it again and the site files
    the replay."""
    from watchbuy.engine import record

    monkeypatch.setattr(record, "REPORT_RETRY_BASE", 0.2)
    secret = "retry-secret"
    rec = tmp_path / "rec"
    site = await make_site(hook_secret=secret, record_dir=str(rec))
    host = await site.user("Rhea Restart", host=True)
    channel = host["channel"]
    keys = {channel["stream_key"]: channel["slug"]}
    down = SiteHookKeys(keys, f"http://127.0.0.1:{closed_port()}/hooks/rtmp", secret)
    node = MediaNode(node_settings(record_dir=str(rec), stream_keys={}), authorizer=down)
    await node.start()
    pending = rec / record.PENDING_FILE
    try:
        publisher = await start_ffmpeg_publisher(
            f"rtmp://127.0.0.1:{node.rtmp_port}/live/{channel['stream_key']}", seconds=2,
            size="160x120")
        assert await asyncio.wait_for(publisher.wait(), 30) == 0
        deadline = asyncio.get_running_loop().time() + 60
        while not node.recorder.pending or node.recorder.pending[0]["attempts"] < 3:
            assert asyncio.get_running_loop().time() < deadline, node.recorder.pending
            await asyncio.sleep(0.1)
        kept = json.loads(pending.read_text())
        assert [e["call"] for e in kept] == ["recording_ready"]
    finally:
        await node.stop()
        await down.close()
    assert await site.db.fetch_val("SELECT COUNT(*) FROM recordings") == 0
    kept = json.loads(pending.read_text())  # stopped with the report still waiting
    assert len(kept) == 1 and kept[0]["info"]["name"] == channel["slug"]
    mp4 = rec / kept[0]["info"]["file"]
    assert mp4.is_file()
    # the node comes back, the site is up: the report from before the restart is filed
    up = SiteHookKeys(keys, "http://site/hooks/rtmp", secret,
                      transport=httpx.ASGITransport(app=site.app))
    node = MediaNode(node_settings(record_dir=str(rec), stream_keys={}), authorizer=up)
    await node.start()
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while pending.exists():
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
    finally:
        await node.stop()
        await up.close()
    rows = await db_replays.channel_replays(site.db, channel["id"])
    assert len(rows) == 1 and rows[0]["url"] == f"/replays/media/{mp4.name}"
    assert rows[0]["size_bytes"] == mp4.stat().st_size and rows[0]["node_id"] == "test-node"


# -- in Chromium, against a real ``watchbuy serve`` (browser_fixtures.py) ----------------------
# Last in the module: the shared browser's Playwright loop runs until the module ends, and no
# asyncio test may come after it.


@pytest.mark.ffmpeg
@pytest.mark.timeout(240)
def test_publish_with_three_pins_then_the_replay_plays_and_seeks_to_each_card(server,
                                                                              new_context):
    host = new_context(viewport=PHONE)
    studio = host.new_page()
    log_in(studio, server.url, HOST_EMAIL, server.password, "/studio")
    studio.goto(server.url + "/studio")
    csrf = studio.locator('meta[name="csrf-token"]').get_attribute("content")
    names = ["Ceramic mug", "Linen tote bag", "Scented candle"]
    ids = [int(studio.locator(".studio-product", has_text=n).locator("button[data-pin]")
               .get_attribute("data-pin")) for n in names]
    with contextlib.closing(sqlite_of(server)) as db:
        [(before,)] = db.execute("SELECT COALESCE(MAX(id), 0) FROM recordings").fetchall()
    # a shopper watching live: the room's player takes the cues in band
    room = new_context(viewport=PHONE).new_page()
    publisher = subprocess.Popen(
        [shutil.which("ffmpeg"), "-hide_banner", "-loglevel", "error", "-re",
         "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25",
         "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100", "-t", "20",
         "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "25",
         "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "64k", "-f", "flv",
         server.rtmp_url],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        started = time.monotonic()
        room.goto(server.room_url)
        room.wait_for_function("() => document.getElementById('video').currentTime > 0.5",
                               timeout=30_000)
        pinned_at, media = [], []
        for index, product_id in enumerate(ids):
            # pins at about 4, 9 and 14 s into the show
            time.sleep(max(0.0, started + 4 + 5 * index - time.monotonic()))
            answer = studio.request.post(
                server.url + "/studio/pin", form={"product_id": str(product_id)},
                headers={"X-CSRF-Token": csrf, "Accept": "application/json"})
            assert answer.ok, answer.text()
            pinned_at.append(time.monotonic())
            media.append(answer.json()["media_ms"])
            assert isinstance(media[-1], int), answer.json()
            # the live room shows the card when its video reaches the cue (in band)
            room.wait_for_function(
                "ms => document.documentElement.dataset.lastCue === String(ms)",
                arg=media[-1], timeout=10_000)
            assert names[index] in room.locator("#pinned").inner_text()
        # the stream's clock moved as the wall clock did between the pins
        for i in (1, 2):
            assert abs((media[i] - media[i - 1]) / 1000 -
                       (pinned_at[i] - pinned_at[i - 1])) < 1.0, (media, pinned_at)
        assert publisher.wait(60) == 0, publisher.stderr.read().decode()
    finally:
        if publisher.poll() is None:
            publisher.kill()
        publisher.wait()

    def replay_ready():
        with contextlib.closing(sqlite_of(server)) as db:
            return db.execute("SELECT id, url FROM recordings WHERE id > ? AND "
                              "status = 'ready'", (before,)).fetchone()

    replay_id, url = wait_until(replay_ready, 90, lambda: "no replay:\n" + server.output())
    made = server.workdir / "data" / "recordings" / url.rsplit("/", 1)[-1]
    assert decode_errors(made) == ""
    probe = ffprobe_json(made, "-show_format")
    assert 18.0 <= float(probe["format"]["duration"]) <= 22.0

    replay = new_context(viewport=PHONE).new_page()
    replay.goto(f"{server.url}/replay/{replay_id}")
    replay.wait_for_function(
        "() => document.getElementById('replay-video').readyState >= 2", timeout=30_000)
    replay.evaluate("() => { const v = document.getElementById('replay-video');"
                    " v.muted = true; return v.play(); }")
    replay.wait_for_function(
        "() => document.getElementById('replay-video').currentTime > 0.3")
    items = json.loads(replay.locator("#replay-timeline").text_content())
    assert [i["product"]["name"] for i in items] == names
    offsets = [i["offset"] for i in items]
    for i in (1, 2):
        assert abs(offsets[i] - offsets[i - 1] - (media[i] - media[i - 1]) / 1000) < 0.01
    # seeking the video to each pin's moment shows that pin's card
    for index, offset in enumerate(offsets):
        replay.evaluate("t => { document.getElementById('replay-video').currentTime = t; }",
                        offset + 0.5)
        replay.wait_for_function(
            "i => document.querySelector('.replay').dataset.shownIndex === String(i)",
            arg=index)
        assert names[index] in replay.locator("#pinned").inner_text()
    # before the first pin there is no card; a tap on the timeline jumps to its moment
    replay.evaluate("() => { const v = document.getElementById('replay-video');"
                    " v.pause(); v.currentTime = 0; }")
    replay.wait_for_selector("#pinned", state="hidden")
    assert covered(replay, ".timeline-item") == []
    replay.locator(".timeline-item").nth(1).click()
    replay.wait_for_function(
        "t => Math.abs(document.getElementById('replay-video').currentTime - t) < 0.6",
        arg=offsets[1])
    assert names[1] in replay.locator("#pinned").inner_text()
    assert covered(replay, "#pinned [data-buy], #pinned [data-add]") == []  # the card's own
    replay.wait_for_function(
        "() => !document.getElementById('replay-video').seeking")
    screenshot(replay, "replay-timeline.png")
    # wide: the products beside the video; the timeline and the card still reachable
    replay.set_viewport_size({"width": 1280, "height": 800})
    assert covered(replay, ".timeline-item, #pinned [data-buy], #pinned [data-add]") == []
    screenshot(replay, "replay-timeline-wide.png")


def make_replay(server, pins: list[tuple[str, int]], seconds: int = 8) -> int:
    """A replay of the demo room as the node leaves one: an MP4 that browsers seek in (ffmpeg,
    faststart) in the site's record folder, filed with ``pins`` (product name, media ms) as
    the recording hook files them; its id."""
    folder = server.workdir / "data" / "recordings"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"made-{uuid.uuid4().hex[:8]}.mp4"
    subprocess.run(
        [shutil.which("ffmpeg"), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
         f"testsrc2=size=320x240:rate=25:duration={seconds}", "-c:v", "libx264", "-preset",
         "ultrafast", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(folder / name)],
        check=True, capture_output=True, timeout=60)
    stamp = time.time() - seconds
    with contextlib.closing(sqlite_of(server)) as db, db:
        [(channel_id,)] = db.execute("SELECT id FROM channels WHERE slug = ?",
                                     (server.room_slug,)).fetchall()
        recording_id = db.execute(
            "INSERT INTO recordings (channel_id, stream_name, node_id, started_at, ended_at, "
            "duration, status, url, size_bytes, media_start_ms) VALUES (?, ?, 'local', ?, ?, "
            "?, 'ready', ?, ?, 0)",
            (channel_id, server.room_slug, stamp, stamp + seconds, float(seconds),
             MEDIA_PREFIX + name, (folder / name).stat().st_size)).lastrowid
        for product, media_ms in pins:
            [(product_id,)] = db.execute("SELECT id FROM products WHERE name = ?",
                                         (product,)).fetchall()
            db.execute("INSERT INTO pins (channel_id, recording_id, product_id, media_ms, "
                       "pinned_at) VALUES (?, ?, ?, ?, ?)",
                       (channel_id, recording_id, product_id, media_ms, stamp))
    return recording_id


@pytest.mark.ffmpeg
@pytest.mark.timeout(180)
def test_in_chromium_a_visitor_buys_from_the_replay_with_buy_now_at_the_regular_price(
        server, phone, new_context):
    """Issue 14's "shoppers buy from the replay": on a phone, a visitor taps Buy now on the card
    of the moment, signs up, comes back to the replay with the sheet open, types the address
    and the test card and pays the regular price, though a flash sale runs in the room."""
    recording_id = make_replay(server, [("Ceramic mug", 1000), ("Linen tote bag", 4000)])
    host = new_context().new_page()
    log_in(host, server.url, HOST_EMAIL, server.password, "/studio")
    csrf = host.locator('meta[name="csrf-token"]').get_attribute("content")
    headers = {"X-CSRF-Token": csrf, "Accept": "application/json"}
    mug = next(p for p in room_state(server)["products"] if p["name"] == "Ceramic mug")
    started = host.request.post(server.url + "/studio/flash", headers=headers, form={
        "product_id": str(mug["id"]), "sale_price": "9.00", "duration_seconds": "600"})
    assert started.ok, started.text()
    sale_id = started.json()["sale"]["id"]
    try:
        page = phone(device_scale_factor=1).new_page()
        page.goto(f"{server.url}/replay/{recording_id}")
        page.locator(".timeline-item").first.tap()
        page.wait_for_selector("#pinned [data-buy]")
        assert "Ceramic mug" in page.inner_text("#pinned")
        assert "$18.00" in page.inner_text("#pinned") and "$9.00" not in page.inner_text("main")
        assert covered(page, "#pinned [data-buy], #pinned [data-add]") == []
        with page.expect_navigation():
            page.locator("#pinned [data-buy]").tap()
        back = quote(f"/replay/{recording_id}?buy={mug['id']}", safe="")
        assert page.url == f"{server.url}/login?next={back}", page.url
        # signs up from the log-in page, then logs in: back on the replay, the sheet open
        with page.expect_navigation():
            page.click("main >> text=Sign up")
        email = f"rae-{uuid.uuid4().hex[:8]}@example.com"
        page.fill('input[name="email"]', email)
        page.fill('input[name="display_name"]', "Rae")
        page.fill('input[name="password"]', PASSWORD)
        with page.expect_navigation():
            page.click('form[action="/signup"] button[type="submit"]')
        page.fill('input[name="email"]', email)
        page.fill('input[name="password"]', PASSWORD)
        with page.expect_navigation():
            page.click('form[action="/login"] button[type="submit"]')
        page.wait_for_selector("#buy-sheet #buy-confirm")
        assert page.url == f"{server.url}/replay/{recording_id}", "?buy= is used once"
        assert "Ceramic mug" in page.inner_text("#buy-sheet")
        assert page.inner_text("#buy-sheet .total strong") == "$18.00"  # not the sale's $9.00
        fill_first_purchase(page)
        page.tap("#buy-confirm")
        order_id, text = thank_you(page)
        assert "1 × Ceramic mug — $18.00" in text and "Total $18.00" in text, text
        screenshot(page, "replay-buy-thanks-phone.png")
        with contextlib.closing(sqlite_of(server)) as db:
            assert db.execute("SELECT unit_price_minor, flash_sale_id FROM order_items "
                              "WHERE order_id = ?", (order_id,)).fetchall() == [(1800, None)]
        page.tap("#buy-sheet button:text('Keep watching')")
        page.wait_for_selector("#buy-sheet", state="hidden")
        # the list's Buy now too: the saved address and card, one tap (clicked: a tap's
        # highlight would linger in the screenshot)
        page.locator(".replay-products .product", has_text="Linen tote bag").locator(
            "[data-buy]").click()
        page.wait_for_selector("#buy-sheet #buy-confirm")
        assert page.locator('#buy-sheet input[name="card"]').count() == 0
        assert page.inner_text("#buy-sheet .saved-card") == "Visa ending in 4242"
        assert page.inner_text("#buy-sheet .total strong") == "$24.00"
        screenshot(page, "replay-buy-sheet-phone.png")
        page.tap("#buy-confirm")
        _, text = thank_you(page)
        assert "1 × Linen tote bag — $24.00" in text, text
    finally:
        ended = host.request.post(f"{server.url}/studio/flash/{sale_id}/end", headers=headers)
        assert ended.ok, ended.text()
