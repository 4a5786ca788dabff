"""Recording and cue points on a real node: ffmpeg publishes, ffprobe reads what we wrote."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path

import httpx
import pytest
from conftest import FlvHttpReader, node_settings, start_ffmpeg_publisher, stop_process, wait_live
from media_helpers import decode_errors, ffprobe_json
from moto import mock_aws

from watchbuy.engine import metrics, record
from watchbuy.engine.codecs import amf, flvmux
from watchbuy.engine.cues import cue_target, signed_headers
from watchbuy.engine.hooks import StaticKeys
from watchbuy.engine.node import MediaNode

pytestmark = pytest.mark.usefixtures("ffmpeg")

SECRET = "cue-test-secret"


class ReportingKeys(StaticKeys):
    """Static keys that keep the recording reports a site would get through its hook."""

    def __init__(self) -> None:
        super().__init__({"key1": "show1", "key2": "show2", "key3": "show3"})
        self.reports: list[tuple[str, dict]] = []
        self.reported = asyncio.Event()

    async def recording(self, call: str, app: str, key: str, info: dict) -> bool:
        self.reports.append((call, {"key": key, **info}))
        self.reported.set()
        return True


async def recording_node(tmp_path: Path, **changes) -> tuple[MediaNode, ReportingKeys]:
    keys = ReportingKeys()
    node = MediaNode(node_settings(record_dir=str(tmp_path / "rec"), hook_secret=SECRET,
                                   operator_token="op-token", **changes), authorizer=keys)
    await node.start()
    return node, keys


async def post_cue(node: MediaNode, product_id: int | None, headers: dict | None = None,
                   target: str | None = None) -> httpx.Response:
    target = target or cue_target("show1", product_id)
    if headers is None:
        headers = signed_headers(SECRET, target)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.http_port}") as client:
        return await client.post(target, headers=headers)


def cue_points(tags) -> list[tuple[int, dict]]:
    found = []
    for tag_type, timestamp, payload in tags:
        if tag_type == flvmux.TAG_SCRIPT:
            values = amf.decode_amf0(bytes(payload))
            if values and values[0] == "onCuePoint":
                found.append((timestamp, dict(values[1])))
    return found


async def test_cue_points_reach_flv_viewers_in_order_and_the_recording_becomes_a_clean_mp4(
        tmp_path):
    node, keys = await recording_node(tmp_path)
    pub = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/key1",
                                       seconds=6, size="160x120")
    try:
        await wait_live(node, "show1", frames=10)
        viewer = await FlvHttpReader.open(node.http_port, "/live/show1.flv")
        tags = await viewer.tags()
        answers = []
        for product_id in (7, 8, None):
            await asyncio.sleep(1.0)
            response = await post_cue(node, product_id)
            assert response.status_code == 200, response.text
            answers.append(response.json()["media_ms"])
            tags += await viewer.tags()
        while len(cue_points(tags)) < 3:
            tags += await viewer.tags()
        cues = cue_points(tags)
        assert [c[0] for c in cues] == answers  # at the media timestamp the node answered
        assert [c[1].get("product_id") for c in cues] == [7, 8, None]
        assert [c[1]["name"] for c in cues] == ["pin", "pin", "unpin"]
        assert [c[1]["time"] for c in cues] == [ms / 1000 for ms in answers]
        assert answers[0] < answers[1] < answers[2]
        # in order: each cue comes right after the media it was stamped with
        for index, (tag_type, timestamp, _payload) in enumerate(tags):
            if tag_type == flvmux.TAG_SCRIPT and timestamp in answers:
                media_before = [t[1] for t in tags[:index] if t[0] != flvmux.TAG_SCRIPT]
                assert media_before[-1] == timestamp
        # the recording on disk (still being written) carries the cues too
        recording = node.recorder.recordings["show1"]
        await asyncio.sleep(record.WRITE_INTERVAL * 3)
        on_disk = flvmux.FlvReader().feed(recording.path.read_bytes())
        assert [c[0] for c in cue_points(on_disk)] == answers
        await viewer.close()
        await asyncio.wait_for(pub.wait(), 30)
        await asyncio.wait_for(keys.reported.wait(), 60)
    finally:
        await stop_process(pub)
        await node.stop()
    call, info = keys.reports[0]
    assert call == "recording_ready", info
    assert info["key"] == "key1" and info["name"] == "show1" and info["url"] == ""
    scrape = metrics.render(node.metrics).decode()
    assert 'watchbuy_node_recordings_total{result="ready"} 1.0' in scrape
    assert "watchbuy_node_cue_points_total 3.0" in scrape
    mp4 = tmp_path / "rec" / info["file"]
    assert mp4.suffix == ".mp4" and mp4.stat().st_size == info["size"]
    assert not mp4.with_suffix(".flv").exists()  # the MP4 has everything
    assert decode_errors(mp4) == ""
    probe = ffprobe_json(mp4, "-show_format", "-show_streams")
    assert {s["codec_type"] for s in probe["streams"]} == {"video", "audio"}
    assert 5.0 <= info["duration"] <= 7.0
    assert abs(float(probe["format"]["duration"]) - info["duration"]) < 0.01
    # faststart: the index (moov) comes before the media (mdat)
    head = mp4.read_bytes()[:4096]
    assert head.find(b"moov") != -1 and (head.find(b"mdat") == -1 or
                                        head.find(b"moov") < head.find(b"mdat"))
    assert info["start_ms"] == 0 and info["ended_at"] > info["started_at"]


async def test_cue_calls_need_the_hook_signature_or_the_operator_token(tmp_path):
    node, _keys = await recording_node(tmp_path)
    pub = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/key1",
                                       seconds=10, size="160x120")
    try:
        await wait_live(node, "show1")
        target = cue_target("show1", 3)
        assert (await post_cue(node, 3, headers={}, target=target)).status_code == 401
        forged = signed_headers("not-the-secret", target)
        assert (await post_cue(node, 3, headers=forged, target=target)).status_code == 401
        good = signed_headers(SECRET, target)
        assert (await post_cue(node, 3, headers=good, target=target)).status_code == 200
        replayed = await post_cue(node, 3, headers=good, target=target)
        assert replayed.status_code == 401 and replayed.json()["error"] == "replayed call"
        operator = {"Authorization": "Bearer op-token"}
        answer = await post_cue(node, 4, headers=operator, target="/api/streams/show1/cue?product_id=4")
        assert answer.status_code == 200 and answer.json()["stream"] == "show1"
        bad = await post_cue(node, None, headers=operator,
                             target="/api/streams/show1/cue?product_id=x1")
        assert bad.status_code == 400
        missing = await post_cue(node, None, headers=operator, target="/api/streams/nope/cue")
        assert missing.status_code == 404
    finally:
        await stop_process(pub)
        await node.stop()


async def test_a_full_disk_stops_the_recording_with_one_line_and_viewers_keep_playing(
        tmp_path, monkeypatch, caplog):
    writes = 0
    real_write = record.write_all

    def full_disk(handle, chunks):
        # the first batch fits, then the disk is full, as a filling tmpfs answers
        nonlocal writes
        writes += 1
        if writes > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(handle, chunks)

    monkeypatch.setattr(record, "write_all", full_disk)
    caplog.set_level(logging.INFO, logger="watchbuy.engine.record")
    node, keys = await recording_node(tmp_path)
    pub = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/key1",
                                       seconds=30, size="160x120")
    try:
        await wait_live(node, "show1")
        viewer = await FlvHttpReader.open(node.http_port, "/live/show1.flv")
        await asyncio.wait_for(keys.reported.wait(), 20)  # the failure is reported at once
        stream = node.registry.get("show1")
        assert stream is not None and stream.recording.failed
        # the viewer keeps getting video after the recording stopped
        frames_then, media_then = stream.video_frames, stream.media_ms
        got = []
        while len([t for t in got if t[0] == flvmux.TAG_VIDEO and t[1] > media_then]) < 25:
            got += await viewer.tags()
        assert stream.video_frames >= frames_then + 25
        assert not viewer.eof
        await viewer.close()
    finally:
        await stop_process(pub)
        await node.stop()
    lines = [r.getMessage() for r in caplog.records if "recording stopped" in r.getMessage()]
    assert len(lines) == 1, lines
    scrape = metrics.render(node.metrics).decode()
    assert 'watchbuy_node_recordings_total{result="failed"} 1.0' in scrape
    assert 'watchbuy_node_recordings_total{result="ready"} 0.0' in scrape
    assert "No space left on device" in lines[0] and "the live stream goes on" in lines[0]
    call, info = keys.reports[0]
    assert call == "recording_failed" and "No space left on device" in info["error"]
    assert len(keys.reports) == 1
    assert list((tmp_path / "rec").glob("*")) == []  # the partial file is removed


async def test_the_mp4_goes_to_s3_and_the_report_has_its_url(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        import boto3

        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="wb-replays")
        node, keys = await recording_node(tmp_path, record_s3_bucket="wb-replays")
        pub = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/key1",
                                           seconds=3, size="160x120")
        try:
            await asyncio.wait_for(pub.wait(), 30)
            await asyncio.wait_for(keys.reported.wait(), 60)
        finally:
            await stop_process(pub)
            await node.stop()
        call, info = keys.reports[0]
        assert call == "recording_ready", info
        key = f"recordings/{info['file']}"
        assert info["url"] == f"https://wb-replays.s3.amazonaws.com/{key}"
        stored = s3.get_object(Bucket="wb-replays", Key=key)
        assert stored["ContentType"] == "video/mp4"
        body = stored["Body"].read()
        assert len(body) == info["size"]
        local = tmp_path / "copy.mp4"
        local.write_bytes(body)
        assert decode_errors(local) == ""
        assert list((tmp_path / "rec").glob("*")) == []  # uploaded: nothing kept locally


async def test_a_disk_that_falls_behind_stops_the_recording_at_the_buffer_cap(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="watchbuy.engine.record")
    node, keys = await recording_node(tmp_path, record_max_buffer=4096)
    pub = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/key1",
                                       seconds=30, size="160x120")
    try:
        await wait_live(node, "show1")
        # more than 4 KiB arrives between two of the writer's half-second turns
        await asyncio.wait_for(keys.reported.wait(), 20)
        stream = node.registry.get("show1")
        assert stream is not None and "WATCHBUY_RECORD_MAX_BUFFER" in stream.recording.failed
        assert stream.recording.chunks == [] and stream.recording.buffered == 0
        await wait_live(node, "show1", frames=stream.video_frames + 10)  # live goes on
    finally:
        await stop_process(pub)
        await node.stop()
    assert keys.reports[0][0] == "recording_failed"
    assert len([r for r in caplog.records if "recording stopped" in r.getMessage()]) == 1


def test_recording_settings_are_checked_and_a_node_without_a_data_folder_records_nothing():
    from watchbuy.settings import ConfigError, load_settings
    from watchbuy.site.config import load_site_settings

    with pytest.raises(ConfigError, match="WATCHBUY_RECORD_MAX_BUFFER"):
        load_settings({"WATCHBUY_RECORD_MAX_BUFFER": "0", "WATCHBUY_ENV_FILE": "/dev/null"})
    with pytest.raises(ConfigError, match="WATCHBUY_RECORD_RETENTION_DAYS"):
        load_site_settings({"WATCHBUY_RECORD_RETENTION_DAYS": "-1",
                            "WATCHBUY_ENV_FILE": "/dev/null"})
    for name, value in (("RECORD_RETENTION_DAYS", "-1"), ("RECORD_REMUX_CONCURRENCY", "0"),
                        ("CUE_MAX_AGE", "0"), ("CUE_MAX_AGE", "301"), ("CUE_MAX_AGE", "nan"),
                        ("CUE_NONCES_PER_STREAM", "0")):
        with pytest.raises(ConfigError, match=f"WATCHBUY_{name}"):  # the node's own
            load_settings({f"WATCHBUY_{name}": value, "WATCHBUY_ENV_FILE": "/dev/null"})
    defaults = load_settings({"WATCHBUY_ENV_FILE": "/dev/null"})
    assert (defaults.record_retention_days, defaults.record_remux_concurrency,
            defaults.cue_max_age, defaults.cue_nonces_per_stream) == (30.0, 2, 30.0, 1024)
    assert load_settings({"WATCHBUY_RECORD": "0", "WATCHBUY_ENV_FILE": "/dev/null"}).record is False
    assert MediaNode(node_settings()).recorder is None  # data_dir "": tests and benchmarks
    assert MediaNode(node_settings(data_dir="/nonexistent", record=False)).recorder is None


async def test_an_rtmp_player_gets_the_cue_point_in_order_with_the_media(tmp_path):
    from watchbuy.engine.client import RtmpClient
    from watchbuy.engine.wire import MSG_DATA_AMF0

    node, _keys = await recording_node(tmp_path, record=False)
    pub = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/key1",
                                       seconds=10, size="160x120")
    player = None
    try:
        await wait_live(node, "show1", frames=5)
        player = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
        await player.play("show1")
        last_media = None
        for _ in range(20):  # the start-up tags and some live ones
            timestamp, type_id, _payload = await player.media()
            if type_id != MSG_DATA_AMF0:
                last_media = timestamp
        response = await post_cue(node, 42)
        assert response.status_code == 200
        media_ms = response.json()["media_ms"]
        while True:
            timestamp, type_id, payload = await player.media()
            if type_id == MSG_DATA_AMF0:
                values = amf.decode_amf0(payload)
                if values[0] == "onCuePoint":
                    break
            else:
                last_media = timestamp
        assert timestamp == media_ms == last_media  # right after the media it was stamped with
        assert values[1]["product_id"] == 42 and values[1]["name"] == "pin"
    finally:
        if player is not None:
            await player.close()
        await stop_process(pub)
        await node.stop()


async def test_a_takeover_continues_the_clock_for_viewers_the_recording_and_cue_points(tmp_path):
    """An encoder that hangs and reconnects (the same key takes its silent session over): the
    new session's clock starts at 0, but the stream goes on from where it was, so an HTTP-FLV
    viewer never sees a timestamp go back, a pin after the takeover is later than one before,
    and the MP4 covers both parts."""
    import signal

    node, keys = await recording_node(tmp_path, publish_takeover_grace=1.0)
    url = f"rtmp://127.0.0.1:{node.rtmp_port}/live/key1"
    first = await start_ffmpeg_publisher(url, seconds=60, size="160x120")
    second = None
    loop = asyncio.get_running_loop()
    try:
        await wait_live(node, "show1", frames=10)
        stream = node.registry.get("show1")
        viewer = await FlvHttpReader.open(node.http_port, "/live/show1.flv")
        tags = await viewer.tags()
        await asyncio.sleep(2.0)
        before = (await post_cue(node, 7)).json()["media_ms"]
        first.send_signal(signal.SIGSTOP)  # hung: its TCP connection stays open
        await asyncio.sleep(1.5)  # past the grace
        first_part_ms = stream.media_ms
        frames = stream.video_frames
        second = await start_ffmpeg_publisher(url, seconds=3, size="160x120")
        deadline = loop.time() + 15
        while stream.video_frames < frames + 25:
            assert loop.time() < deadline, "the second publisher never took over"
            tags += await viewer.tags()
        after = (await post_cue(node, 8)).json()["media_ms"]
        while not viewer.eof:  # the second publisher ends the stream
            tags += await viewer.tags(timeout=20)
        await asyncio.wait_for(keys.reported.wait(), 60)
        await viewer.close()
    finally:
        if first.returncode is None:
            first.send_signal(signal.SIGCONT)
        await stop_process(first)
        if second is not None:
            await stop_process(second)
        await node.stop()
    assert first_part_ms < after and before < after
    for kind in (flvmux.TAG_VIDEO, flvmux.TAG_AUDIO, flvmux.TAG_SCRIPT):
        stamps = [t[1] for t in tags if t[0] == kind]
        backwards = [(a, b) for a, b in zip(stamps, stamps[1:], strict=False) if b < a]
        assert not backwards, (kind, backwards[:5])
    # across tracks only the encoder's own interleaving (ffmpeg flushing at its end), never
    # a jump back to the new session's 0
    stamps = [t[1] for t in tags]
    assert all(b >= a - 200 for a, b in zip(stamps, stamps[1:], strict=False))
    assert [c[0] for c in cue_points(tags)] == [before, after]
    last_ms = max(t[1] for t in tags)
    assert last_ms > first_part_ms + 2500  # about 3 s of the second session after the first
    call, info = keys.reports[0]
    assert call == "recording_ready", info
    mp4 = tmp_path / "rec" / info["file"]
    duration = float(ffprobe_json(mp4, "-show_format")["format"]["duration"])
    # both parts: what the viewer saw from the start of the file to the end
    assert duration >= (last_ms - info["start_ms"]) / 1000 - 0.5, (duration, last_ms)
    assert decode_errors(mp4) == ""
    assert stream.ts_offset > 0  # the second session was rebased


async def test_one_stream_pinning_fast_cannot_block_cue_points_of_the_others(tmp_path, caplog):
    """Cue nonces are kept per stream (at most WATCHBUY_CUE_NONCES_PER_STREAM) for a short
    window: a host that fills its own stream's table is refused, the node's other streams are
    not, and a signed call older than WATCHBUY_CUE_MAX_AGE is stale."""
    import time

    from watchbuy.engine.client import RtmpClient
    from watchbuy.engine.hooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

    node, _keys = await recording_node(tmp_path, cue_nonces_per_stream=3, cue_max_age=30.0)
    caplog.set_level(logging.WARNING, logger="watchbuy.engine.cues")
    publishers = []
    try:
        for key in ("key1", "key2"):
            client = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
            await client.publish(key)
            publishers.append(client)
        busy = [await post_cue(node, 1, target=cue_target("show1", 1)) for _ in range(3)]
        assert [r.status_code for r in busy] == [200, 200, 200]
        refused = await post_cue(node, 1, target=cue_target("show1", 1))
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"] == "too many cue calls for this stream"
        assert node.cues.refused_full == 1
        assert sum("WATCHBUY_CUE_NONCES_PER_STREAM" in r.getMessage()
                   for r in caplog.records) == 1
        # the other stream is not affected
        other = await post_cue(node, 2, target=cue_target("show2", 2))
        assert other.status_code == 200, other.text
        # a full table still refuses a replay as a replay, and the operator is not counted
        target = cue_target("show2", 2)
        headers = signed_headers(SECRET, target)
        assert (await post_cue(node, 2, headers=headers, target=target)).status_code == 200
        again = await post_cue(node, 2, headers=headers, target=target)
        assert again.json()["error"] == "replayed call"
        operator = {"Authorization": "Bearer op-token"}
        assert (await post_cue(node, 1, headers=operator,
                               target="/api/streams/show1/cue?product_id=1")).status_code == 200
        # the window is short: a call signed 31 s ago is stale (the hooks accept 300 s)
        target = cue_target("show2", 2)
        stamp = str(int(time.time()) - 31)
        stale = {TIMESTAMP_HEADER: stamp,
                 SIGNATURE_HEADER: sign(SECRET, stamp, f"POST {target}".encode())}
        answer = await post_cue(node, 2, headers=stale, target=target)
        assert answer.status_code == 401 and answer.json()["error"] == "stale timestamp"
        # a stream that ends takes its table with it
        await publishers.pop(0).close()
        deadline = asyncio.get_running_loop().time() + 10
        while node.registry.get("show1") is not None:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        assert (await post_cue(node, 2, target=cue_target("show2", 2))).status_code == 200
        assert set(node.cues._nonces) == {"show2"}
    finally:
        for client in publishers:
            await client.close()
        await node.stop()


async def test_the_node_sweeps_left_over_flvs_and_mp4s_past_its_retention(tmp_path, caplog):
    """At start (and hourly): FLVs no recording writes (a failed remux, a node stopped
    mid-publish) and MP4s older than WATCHBUY_RECORD_RETENTION_DAYS go, with one line; the
    FLV of a live recording stays however old its last write."""
    import os
    import time

    caplog.set_level(logging.INFO, logger="watchbuy.engine.record")
    folder = tmp_path / "rec"
    folder.mkdir()
    now = time.time()
    ages = {"stopped.flv": 2 * 3600, "writing-elsewhere.flv": 10, "old.mp4": 3 * 86400,
            "recent.mp4": 86400 / 2}
    for name, age in ages.items():
        (folder / name).write_bytes(b"x" * 1000)
        os.utime(folder / name, (now - age, now - age))
    node, _keys = await recording_node(tmp_path, record_retention_days=1.0)
    pub = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/key1",
                                       seconds=30, size="160x120")
    try:
        await wait_live(node, "show1", frames=10)
        assert sorted(p.name for p in folder.iterdir() if p.name in ages) == [
            "recent.mp4", "writing-elsewhere.flv"]
        lines = [r.getMessage() for r in caplog.records if "swept" in r.getMessage()]
        assert len(lines) == 1 and "1 left-over FLVs and 1 MP4s older than 1 days" in lines[0]
        live = node.recorder.recordings["show1"].path
        while not live.exists():
            await asyncio.sleep(0.1)
        os.utime(live, (now - 7200, now - 7200))
        (folder / "writing-elsewhere.flv").touch()
        os.utime(folder / "writing-elsewhere.flv", (now - 7200, now - 7200))
        assert await node.recorder.sweep() == (1, 0)
        assert live.exists() and not (folder / "writing-elsewhere.flv").exists()
    finally:
        await stop_process(pub)
        await node.stop()


async def test_streams_ending_together_remux_a_few_at_a_time(tmp_path, monkeypatch):
    """WATCHBUY_RECORD_REMUX_CONCURRENCY: three streams end at once, one ffmpeg runs at a
    time, and all three recordings become ready."""
    running = peak = 0
    real_run_tool = record.run_tool

    async def counted(tool: str, *args: str) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            out = await real_run_tool(tool, *args)
            await asyncio.sleep(0.3)  # long enough that remuxes not held back would overlap
            return out
        finally:
            running -= 1

    monkeypatch.setattr(record, "run_tool", counted)
    node, keys = await recording_node(tmp_path, record_remux_concurrency=1)
    publishers = [await start_ffmpeg_publisher(
        f"rtmp://127.0.0.1:{node.rtmp_port}/live/key{i}", seconds=30, size="160x120")
        for i in (1, 2, 3)]
    try:
        for i in (1, 2, 3):
            await wait_live(node, f"show{i}", frames=10)
        for pub in publishers:  # all three end at once
            pub.terminate()
        deadline = asyncio.get_running_loop().time() + 60
        while len(keys.reports) < 3:
            assert asyncio.get_running_loop().time() < deadline, keys.reports
            await asyncio.sleep(0.1)
    finally:
        for pub in publishers:
            await stop_process(pub)
        await node.stop()
    assert [call for call, _info in keys.reports] == ["recording_ready"] * 3
    assert peak == 1
