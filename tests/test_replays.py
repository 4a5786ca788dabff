"""Replays and pins on the media clock: the site with a real node (ffmpeg publishing), the
recording hook, the replay page, retention, S3 through moto, and Chromium playing a replay."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import httpx
import pytest
from app_helpers import make_product
from conftest import node_settings, start_ffmpeg_publisher, stop_process, wait_live
from hook_helpers import signed_hook
from media_helpers import decode_errors, ffprobe_json
from moto import mock_aws

from watchbuy.db import queries
from watchbuy.db import replays as db_replays
from watchbuy.db.schema import pins, recordings
from watchbuy.engine.codecs import amf, flvmux
from watchbuy.engine.hooks import StaticKeys
from watchbuy.engine.node import MediaNode
from watchbuy.site.replays import expire_recordings
from watchbuy.site.state import app_state

pytest_plugins = ["site_fixtures"]


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
def test_publish_with_three_pins_then_the_replay_plays_and_seeks_to_each_card(tmp_path):
    from browser_helpers import (
        CHROMIUM,
        CHROMIUM_ARGS,
        PHONE,
        Server,
        covered,
        log_in,
        require_browser,
        screenshot,
        wait_until,
    )
    from playwright.sync_api import sync_playwright

    require_browser()
    (tmp_path / "serve").mkdir()
    server = Server(tmp_path / "serve").start()
    publisher = None
    try:
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                  headless=True, timeout=60_000)
            violations: list[str] = []
            host = chromium.new_context(viewport=PHONE)
            host.on("console", lambda m: violations.append(m.text)
                    if "Content Security Policy" in m.text else None)
            studio = host.new_page()
            log_in(studio, server.url, "host@watchbuy.local", server.password, "/studio")
            studio.goto(server.url + "/studio")
            csrf = studio.locator('meta[name="csrf-token"]').get_attribute("content")
            names = ["Ceramic mug", "Linen tote bag", "Scented candle"]
            ids = [int(studio.locator(".studio-product", has_text=n).locator("button[data-pin]")
                       .get_attribute("data-pin")) for n in names]
            # a shopper watching live: the room's player takes the cues in band
            shopper = chromium.new_context(viewport=PHONE)
            shopper.on("console", lambda m: violations.append(m.text)
                       if "Content Security Policy" in m.text else None)
            room = shopper.new_page()
            publisher = subprocess.Popen(
                [shutil.which("ffmpeg"), "-hide_banner", "-loglevel", "error", "-re",
                 "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25",
                 "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100", "-t", "20",
                 "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "25",
                 "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "64k", "-f", "flv",
                 server.rtmp_url],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
            publisher = None

            def replay_ready():
                page = studio.request.get(server.url + "/replay/1")
                return page.ok

            wait_until(replay_ready, 90, lambda: "no replay:\n" + server.output())
            files = list((tmp_path / "serve" / "data" / "recordings").glob("*.mp4"))
            assert len(files) == 1, files
            assert decode_errors(files[0]) == ""
            probe = ffprobe_json(files[0], "-show_format")
            assert 18.0 <= float(probe["format"]["duration"]) <= 22.0

            viewer = chromium.new_context(viewport=PHONE)
            viewer.on("console", lambda m: violations.append(m.text)
                      if "Content Security Policy" in m.text else None)
            replay = viewer.new_page()
            replay.goto(server.url + "/replay/1")
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
            assert covered(replay, "#pinned [data-add]") == []  # the card's own buy button
            replay.wait_for_function(
                "() => !document.getElementById('replay-video').seeking")
            screenshot(replay, "replay-timeline.png")
            # wide: the products beside the video; the timeline and the card still reachable
            replay.set_viewport_size({"width": 1280, "height": 800})
            assert covered(replay, ".timeline-item, #pinned [data-add]") == []
            screenshot(replay, "replay-timeline-wide.png")
            assert not violations, violations
            chromium.close()
    finally:
        if publisher is not None:
            publisher.kill()
            publisher.wait()
        server.stop()


def test_replay_files_are_named_for_the_site(tmp_path):
    # the names engine/record.py makes are the names the site serves
    from watchbuy.engine.record import safe_name
    from watchbuy.site.replays import FILE_NAME

    for name in ("show1", "a-b_c", "weird/../name", "x" * 200):
        made = f"{safe_name(name)}-20260101T000000-abcdef.mp4"
        assert FILE_NAME.fullmatch(made), made
