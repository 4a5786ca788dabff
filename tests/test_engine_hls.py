"""LL-HLS on the node, end to end: real ffmpeg publishing and reading, the project's RTMP client
publishing recorded media at the pace a test chooses, and a raw HTTP/1.1 client."""

from __future__ import annotations

import asyncio
import json
import logging

import hls_validator
import pytest
from conftest import (
    FFMPEG,
    FFPROBE,
    FlvHttpReader,
    node_settings,
    start_ffmpeg_publisher,
    stop_process,
    wait_live,
)
from media_helpers import decode_errors, ffmpeg_flv, ffprobe_json, hevc_ertmp_media, split_flv

from watchbuy.engine.client import RtmpClient
from watchbuy.engine.codecs import flvmux
from watchbuy.engine.node import MediaNode
from watchbuy.settings import ConfigError, load_settings

pytestmark = pytest.mark.usefixtures("ffmpeg")


# -- a raw HTTP/1.1 client: keep-alive, pipelining, exact headers ------------------------------
class Http:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Http:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send(self, *targets: str, method: str = "GET") -> None:
        """One write holding a request per target (pipelined)."""
        self.writer.write(b"".join(
            f"{method} {t} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() for t in targets))

    async def response(self, timeout: float = 15.0, head_only: bool = False
                       ) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        size = 0 if head_only else int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(size), timeout)
        return int(lines[0].split()[1]), headers, body

    async def get(self, target: str, timeout: float = 15.0) -> tuple[int, dict[str, str], bytes]:
        self.send(target)
        return await self.response(timeout)

    async def close(self) -> None:
        self.writer.close()


BASE = "/live/show1/"
CDN_BASE = "/test-node/live/show1/"


async def fetch_all(http: Http, base: str, pl: hls_validator.Playlist) -> dict[str, bytes]:
    """Every resource a playlist names, pipelined on one connection."""
    names = {pl.segments[0].map_uri}
    for segment in pl.segments:
        names.update(p.uri for p in segment.parts)
        if segment.uri:
            names.add(segment.uri)
    names = sorted(names)
    http.send(*(base + n for n in names))
    got = {}
    for name in names:
        status, _headers, body = await http.response()
        if status == 200:
            got[name] = body
    return got


async def wait_hls(node: MediaNode, name: str, segments: int = 1, timeout: float = 30.0):
    """The stream's HlsStream once it has ``segments`` complete segments."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        hls = node.hls.get(name)
        if hls is not None and sum(s.complete for s in hls.segments) >= segments:
            return hls
        assert loop.time() < deadline, f"{name}: no {segments} HLS segments in {timeout} s"
        await asyncio.sleep(0.05)


async def run(*args: str, timeout: float = 90) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


# -- ffmpeg publishes, ffmpeg and ffprobe read the HLS ------------------------------------------
async def test_ffmpeg_reads_the_live_hls_and_the_fmp4_keeps_dts_and_keyframes(node, tmp_path):
    pub = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/key1",
                                       seconds=40, gop=25, rate=25)  # fmt: skip
    flv = None
    try:
        await wait_live(node, "show1")
        # What the FLV viewers get, to compare keyframe flags with.
        flv = await FlvHttpReader.open(node.http_port, "/live/show1.flv")
        flv_video: dict[int, bool] = {}

        async def collect() -> None:
            while True:
                tags = await flv.tags()
                if not tags:
                    return
                for kind, ts, payload in tags:
                    if kind == flvmux.TAG_VIDEO:
                        _c, _f, key, seq = flvmux.inspect_video(payload)
                        if not seq:
                            flv_video[ts] = key

        collector = asyncio.ensure_future(collect())
        await wait_hls(node, "show1", segments=2)
        port = node.http_port
        for base in (BASE, CDN_BASE):
            code, _out, err = await run(FFMPEG, "-hide_banner", "-loglevel", "error",
                                        "-i", f"http://127.0.0.1:{port}{base}index.m3u8",
                                        "-t", "4", "-f", "null", "-")  # fmt: skip
            assert code == 0 and err == "", err
        code, out, err = await run(FFPROBE, "-v", "error", "-show_streams", "-of", "json",
                                   f"http://127.0.0.1:{port}{BASE}index.m3u8")  # fmt: skip
        assert code == 0, err
        streams = {s["codec_type"]: s for s in json.loads(out)["streams"]}
        assert streams["video"]["codec_name"] == "h264"
        assert (streams["video"]["width"], streams["video"]["height"]) == (320, 240)
        assert streams["audio"]["codec_name"] == "aac"

        # The fMP4 as a file: init and the complete segments, then ffprobe's packets.
        await wait_hls(node, "show1", segments=5)
        http = await Http.open(port)
        status, _h, text = await http.get(BASE + "index.m3u8")
        assert status == 200
        pl = hls_validator.parse(text.decode())
        got = await fetch_all(http, BASE, pl)
        await http.close()
        complete = [s for s in pl.segments if s.uri]
        path = tmp_path / "live.mp4"
        path.write_bytes(got[pl.segments[0].map_uri] + b"".join(got[s.uri] for s in complete))
        assert decode_errors(path) == ""
        packets = ffprobe_json(path, "-show_packets")["packets"]
        by_stream: dict[int, list[dict]] = {}
        for packet in packets:
            by_stream.setdefault(packet["stream_index"], []).append(packet)
        assert len(by_stream) == 2
        for stream_packets in by_stream.values():
            dts = [int(p["dts"]) for p in stream_packets]
            assert all(a < b for a, b in zip(dts, dts[1:], strict=False)), "DTS must increase"
        video = next(ps for ps in by_stream.values() if ps[0]["codec_type"] == "video")
        compared = 0
        keyframes = 0
        for packet in video:
            ms = round(float(packet["dts_time"]) * 1000)
            if ms in flv_video:
                compared += 1
                key = "K" in packet["flags"]
                keyframes += key
                assert key == flv_video[ms], f"keyframe flag differs at {ms} ms"
        assert compared >= 50 and keyframes >= 2, (compared, keyframes)
        collector.cancel()
    finally:
        if flv is not None:
            await flv.close()
        await stop_process(pub)


async def test_live_playlist_validates_blocks_briefly_refuses_too_far_and_deltas(tmp_path):
    # 1 s segments so the playlist grows past CAN-SKIP-UNTIL (6 target durations) quickly.
    media = MediaNode(node_settings(hls_segment_target=1.0))
    await media.start()
    pub = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{media.rtmp_port}/live/key1",
                                       seconds=60, gop=25, rate=25)  # fmt: skip
    http = None
    try:
        await wait_hls(media, "show1", segments=1)
        http = await Http.open(media.http_port)
        # The playlist and everything it names, at several moments.
        for _sweep in range(4):
            status, headers, text = await http.get(CDN_BASE + "index.m3u8")
            assert status == 200
            pl = hls_validator.parse(text.decode())
            got = await fetch_all(http, CDN_BASE, pl)
            hls_validator.validate(pl, got.get)
            await asyncio.sleep(0.7)

        # Blocking reload of the preload-hinted part: answered when that part exists and
        # before the next one, so the answer's newest part is the one asked for (or, when the
        # segment ended first, the next segment's first part).
        for _ in range(6):
            status, _h, text = await http.get(BASE + "index.m3u8")
            pl = hls_validator.parse(text.decode())
            msn, part = pl.last_part()
            status, headers, text = await http.get(
                f"{BASE}index.m3u8?_HLS_msn={msn}&_HLS_part={part + 1}")
            assert status == 200
            assert headers["cache-control"].startswith("public, max-age=")
            answer = hls_validator.parse(text.decode())
            hls_validator.validate(answer)
            assert answer.last_part() in ((msn, part + 1), (msn + 1, 0)), \
                (msn, part, answer.last_part())

        # 400 where the spec says so, and only there.
        status, _h, text = await http.get(BASE + "index.m3u8")
        pl = hls_validator.parse(text.decode())
        msn, part = pl.last_part()
        for query_msn, query_part in ((pl.last_msn + 3, None), (msn, part + 20),
                                      (msn + 1, 15)):  # fmt: skip
            assert hls_validator.too_far(pl, query_msn, query_part)
            query = f"_HLS_msn={query_msn}" + ("" if query_part is None
                                               else f"&_HLS_part={query_part}")
            status, headers, _body = await http.get(f"{BASE}index.m3u8?{query}")
            assert status == 400, query
            assert headers["cache-control"] == "no-store"
        for bad in ("_HLS_part=1", "_HLS_msn=-1", "_HLS_msn=x", "_HLS_skip=maybe"):
            status, _h, _b = await http.get(f"{BASE}index.m3u8?{bad}")
            assert status == 400, bad

        # A delta update, asked in the same write as the full playlist (same moment).
        for _ in range(60):
            status, _h, text = await http.get(BASE + "index.m3u8")
            if "CAN-SKIP-UNTIL" in text.decode():
                break
            await asyncio.sleep(0.25)
        http.send(BASE + "index.m3u8", BASE + "index.m3u8?_HLS_skip=YES")
        full = hls_validator.parse((await http.response())[2].decode())
        delta = hls_validator.parse((await http.response())[2].decode())
        hls_validator.validate(full)
        hls_validator.validate(delta)
        hls_validator.check_delta(full, delta)
    finally:
        if http is not None:
            await http.close()
        await stop_process(pub)
        await media.stop()


# -- the project's client publishing recorded media at the test's pace ------------------------
@pytest.fixture(scope="module")
def h264(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "h264.flv"
    return split_flv(ffmpeg_flv(path, seconds=6, size="320x240", rate=25, gop=25))


class Publisher:
    """Sends a recording's tags on demand: the stream advances only when the test says."""

    def __init__(self, client: RtmpClient, media) -> None:
        self.client = client
        self.media = media
        self.next = 0

    @classmethod
    async def start(cls, node: MediaNode, media, key: str = "key1", **extra) -> Publisher:
        client = await RtmpClient.connect("127.0.0.1", node.rtmp_port, **extra)
        await client.publish(key)
        if media.video_header:
            client.send_media(9, 0, media.video_header)
        if media.audio_header:
            client.send_media(8, 0, media.audio_header)
        return cls(client, media)

    async def send(self, count: int) -> None:
        for kind, ts, payload, _key in self.media.tags[self.next:self.next + count]:
            self.client.send_media(kind, ts, payload)
        self.next += count
        await self.client.drain()

    async def until(self, node: MediaNode, ready, name: str = "show1") -> None:
        """Send tags one by one until ``ready(hls)`` holds."""
        for _ in range(len(self.media.tags) - self.next):
            hls = node.hls.get(name)
            if hls is not None and ready(hls):
                return
            await self.send(1)
            await asyncio.sleep(0.005)
        raise AssertionError("the recording ran out")


async def test_blocked_requests_wait_past_the_keepalive_timeout_and_answer_in_order(h264):
    media = MediaNode(node_settings(keepalive_timeout=0.2, header_timeout=0.2))
    await media.start()
    pub = await Publisher.start(media, h264)
    try:
        # At a segment's first part, so the next part is in the same segment.
        await pub.until(media, lambda hls: hls.available and hls._last_part()[1] == 0)
        hls = media.hls.get("show1")
        msn, part = hls._last_part()
        http = await Http.open(media.http_port)
        # A blocking reload for the next part, the hinted part itself, a plain playlist.
        http.send(f"{BASE}index.m3u8?_HLS_msn={msn}&_HLS_part={part + 1}",
                  f"{BASE}part{msn}.{part + 1}.m4s", BASE + "index.m3u8")
        with pytest.raises(TimeoutError):  # held: no answer, and not cut, past 0.2 s idle
            await http.response(timeout=0.8)
        other = await Http.open(media.http_port)  # the loop serves others meanwhile
        assert (await other.get("/healthz"))[0] == 200
        await other.close()
        await pub.until(media, lambda h: h._last_part() > (msn, part))
        status, _h, text = await http.response()
        assert status == 200
        assert f"part{msn}.{part + 1}.m4s" in text.decode()
        status, headers, body = await http.response()
        assert status == 200 and body == hls.part(msn, part + 1)
        assert headers["content-type"] == "video/iso.segment"
        status, _h, text = await http.response()
        assert status == 200 and text.startswith(b"#EXTM3U")
        assert hls.waiter_count == 0
        await http.close()
    finally:
        await pub.client.close()
        await media.stop()


async def test_unsatisfied_blocking_request_gets_503_with_one_line(h264, caplog):
    caplog.set_level(logging.INFO, logger="watchbuy")
    media = MediaNode(node_settings(hls_block_timeout=0.3))
    await media.start()
    pub = await Publisher.start(media, h264)
    try:
        await pub.until(media, lambda hls: hls.available)
        hls = media.hls.get("show1")
        msn, part = hls._last_part()
        http = await Http.open(media.http_port)
        status, headers, _b = await http.get(f"{BASE}index.m3u8?_HLS_msn={msn}&_HLS_part={part + 1}")
        assert status == 503 and headers["cache-control"] == "no-store"
        assert hls.waiter_count == 0
        assert caplog.text.count("blocking request not satisfied") == 1
        assert not any(r.exc_info for r in caplog.records)
        assert (await http.get(BASE + "index.m3u8"))[0] == 200  # the connection goes on
        await http.close()
    finally:
        await pub.client.close()
        await media.stop()


async def test_stream_end_adds_endlist_answers_waiters_then_is_dropped(h264):
    media = MediaNode(node_settings(hls_ended_keep=0.5))
    await media.start()
    pub = await Publisher.start(media, h264)
    try:
        await pub.until(media, lambda hls: sum(s.complete for s in hls.segments) >= 1)
        hls = media.hls.get("show1")
        msn, part = hls._last_part()
        waiting = []
        # Further ahead than the end's flush reaches (it makes at most two parts).
        for target in (f"{BASE}index.m3u8?_HLS_msn={msn + 1}&_HLS_part=3",
                       f"{BASE}index.m3u8?_HLS_msn={msn + 2}",
                       f"{BASE}part{msn + 1}.4.m4s"):  # fmt: skip
            http = await Http.open(media.http_port)
            http.send(target)
            waiting.append(http)
        for _ in range(100):
            if hls.waiter_count == 3:
                break
            await asyncio.sleep(0.01)
        assert hls.waiter_count == 3
        await pub.client.close()  # the publisher leaves
        for http in waiting[:2]:
            status, _h, text = await http.response()
            assert status == 200
            pl = hls_validator.parse(text.decode())
            assert pl.endlist, (msn, part, text.decode())
            hls_validator.validate(pl)
        status, _h, _b = await waiting[2].response()
        assert status in (200, 404)  # answered: the part was the last one made, or never was
        status, _h, text = await waiting[0].get(BASE + "index.m3u8")
        assert status == 200 and b"#EXT-X-ENDLIST" in text
        assert media.registry.get("show1") is None
        for _ in range(200):
            if media.hls.get("show1") is None:
                break
            await asyncio.sleep(0.01)
        assert media.hls.get("show1") is None  # kept briefly, then dropped
        assert (await waiting[0].get(BASE + "index.m3u8"))[0] == 404
        for http in waiting:
            await http.close()
    finally:
        await media.stop()


async def test_headers_per_resource_both_path_forms_and_head_options(node, h264):
    pub = await Publisher.start(node, h264)
    try:
        await pub.until(node, lambda hls: sum(s.complete for s in hls.segments) >= 1)
        hls = node.hls.get("show1")
        http = await Http.open(node.http_port)
        msn = hls.segments[0].msn
        expected = {
            "index.m3u8": ("application/vnd.apple.mpegurl", "no-cache"),
            "init.mp4": ("video/mp4", "public, max-age=2"),
            f"seg{msn}.m4s": ("video/iso.segment", "public, max-age=300"),
            f"part{msn}.0.m4s": ("video/iso.segment", "public, max-age=300"),
        }
        for base in (BASE, CDN_BASE):
            for name, (content_type, cache) in expected.items():
                status, headers, body = await http.get(base + name)
                assert status == 200, base + name
                assert headers["content-type"] == content_type
                assert headers["cache-control"] == cache
                assert headers["access-control-allow-origin"] == "*"
                assert int(headers["content-length"]) == len(body) > 0
                http.send(base + name, method="HEAD")
                status, head_headers, _ = await http.response(head_only=True)
                assert status == 200 and head_headers["content-length"] == str(len(body))
        assert (await http.get(f"{BASE}init.mp4"))[2] == hls.init(0)
        assert (await http.get(f"{BASE}seg{msn}.m4s"))[2] == hls.segment(msn)
        status, headers, _b = await http.get(f"{BASE}index.m3u8?_HLS_msn={msn}")
        assert status == 200 and headers["cache-control"] == "public, max-age=12"
        http.send(BASE + "index.m3u8", method="OPTIONS")
        status, headers, _b = await http.response()
        assert status == 204 and "GET" in headers["access-control-allow-methods"]
        for path in ("/live/nobody/index.m3u8", "/other-node/live/show1/index.m3u8",
                     "/nope/show1/index.m3u8", f"{BASE}seg{msn - 1}.m4s", f"{BASE}init7.mp4",
                     f"{BASE}part{msn}.x.m4s", f"{BASE}index.mp4"):  # fmt: skip
            status, headers, _b = await http.get(path)
            assert status == 404, path
            assert headers["cache-control"] == "public, max-age=1"
        await http.close()
    finally:
        await pub.client.close()


async def test_hls_off_means_no_muxing_and_no_routes(h264):
    media = MediaNode(node_settings(hls=False))
    await media.start()
    pub = await Publisher.start(media, h264)
    try:
        await pub.send(60)
        await wait_live(media, "show1", frames=10)
        assert media.hls is None and media.registry.get("show1").hls is None
        http = await Http.open(media.http_port)
        assert (await http.get(BASE + "index.m3u8"))[0] == 404
        await http.close()
    finally:
        await pub.client.close()
        await media.stop()


async def test_republished_name_starts_at_a_new_media_sequence(node, h264):
    first = await Publisher.start(node, h264)
    await first.until(node, lambda hls: hls.available)
    old = node.hls.get("show1")
    old_last = old._last_part()[0]
    await first.client.close()
    for _ in range(200):
        if node.registry.get("show1") is None:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # the base is tenths of a second: a later publish is later
    second = await Publisher.start(node, h264)
    try:
        await second.until(node, lambda hls: hls is not old and hls.available)
        assert old.ended
        assert node.hls.get("show1").segments[0].msn > old_last  # a CDN cannot mix them
    finally:
        await second.client.close()


async def test_a_reconnecting_publisher_continues_the_same_playlist(h264):
    # OBS after a network blip: the same key takes the stream over, its clock starting at 0.
    media = MediaNode(node_settings(publish_takeover_grace=0.2))
    await media.start()
    first = await Publisher.start(media, h264)
    second = None
    try:
        await first.until(media, lambda hls: sum(s.complete for s in hls.segments) >= 1)
        hls = media.hls.get("show1")
        before = sum(s.complete for s in hls.segments)
        await asyncio.sleep(0.4)  # silent past the grace
        second = await Publisher.start(media, h264)
        await second.until(media, lambda h: sum(s.complete for s in h.segments) >= before + 2)
        assert media.hls.get("show1") is hls and not hls.ended
        assert hls.dropped_samples == 0  # nothing lost to the restarted clock
        http = await Http.open(media.http_port)
        status, _h, text = await http.get(BASE + "index.m3u8")
        pl = hls_validator.parse(text.decode())
        hls_validator.validate(pl, (await fetch_all(http, BASE, pl)).get)
        await http.close()
    finally:
        await first.client.close()
        if second is not None:
            await second.client.close()
        await media.stop()


# -- HEVC over Enhanced RTMP -------------------------------------------------------------------
async def test_hevc_from_enhanced_rtmp_comes_out_as_hvc1_that_ffprobe_reads(node, tmp_path):
    media = hevc_ertmp_media(tmp_path / "hevc.h265", seconds=3, size="320x240", rate=25, gop=25)
    pub = await Publisher.start(node, media, connect_extra={"fourCcList": ["hvc1"]})
    try:
        await pub.send(len(media.tags))
        await pub.client.close()  # the end flushes the last part
        hls = None
        for _ in range(300):
            hls = node.hls.get("show1")
            if hls is not None and hls.ended:
                break
            await asyncio.sleep(0.02)
        assert hls is not None and hls.ended
        http = await Http.open(node.http_port)
        status, _h, text = await http.get(BASE + "index.m3u8")
        assert status == 200
        pl = hls_validator.parse(text.decode())
        got = await fetch_all(http, BASE, pl)
        hls_validator.validate(pl, got.get)
        await http.close()
        path = tmp_path / "hevc.mp4"
        path.write_bytes(got["init.mp4"] + b"".join(got[s.uri] for s in pl.segments))
        info = ffprobe_json(path, "-show_streams")["streams"]
        assert [(s["codec_name"], s["codec_tag_string"]) for s in info] == [("hevc", "hvc1")]
        assert (info[0]["width"], info[0]["height"]) == (320, 240)
        assert decode_errors(path) == ""
        frames = ffprobe_json(path, "-count_packets", "-show_streams")["streams"][0]
        assert int(frames["nb_read_packets"]) == len(media.tags)
    finally:
        await pub.client.close()


# -- settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "value", "message"), [
    ("HLS_PART_TARGET", "0.01", "WATCHBUY_HLS_PART_TARGET: part_target"),
    ("HLS_SEGMENT_TARGET", "nan", "WATCHBUY_HLS_SEGMENT_TARGET: must be a finite number"),
    ("HLS_WINDOW_SEGMENTS", "2", "WATCHBUY_HLS_WINDOW_SEGMENTS: window_segments 2"),
    ("HLS_MAX_SEGMENT_SECONDS", "1", "WATCHBUY_HLS_MAX_SEGMENT_SECONDS: max_segment_seconds"),
    ("HLS_MAX_PENDING_AUDIO", "3", "WATCHBUY_HLS_MAX_PENDING_AUDIO: max_pending_audio"),
    ("HLS_BLOCK_TIMEOUT", "-1", "WATCHBUY_HLS_BLOCK_TIMEOUT: must be 0..3600"),
    ("HLS_ENDED_KEEP", "nan", "WATCHBUY_HLS_ENDED_KEEP: must be 0..3600"),
    ("HLS", "perhaps", "WATCHBUY_HLS: expected true or false"),
])  # fmt: skip
def test_bad_hls_setting_is_one_clear_line(name, value, message):
    with pytest.raises(ConfigError) as info:
        load_settings({"WATCHBUY_" + name: value, "WATCHBUY_ENV_FILE": "/dev/null"})
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_hls_settings_map_onto_the_muxer_config():
    settings = load_settings({"WATCHBUY_HLS_PART_TARGET": "0.25",
                              "WATCHBUY_HLS_SEGMENT_TARGET": "4",
                              "WATCHBUY_HLS_WINDOW_SEGMENTS": "6",
                              "WATCHBUY_ENV_FILE": "/dev/null"})  # fmt: skip
    from watchbuy.settings import hls_config

    config = hls_config(settings)
    assert (config.part_target, config.segment_target, config.window_segments) == (0.25, 4, 6)
    assert settings.hls is True  # on by default


def test_hls_setting_defaults_are_the_muxers_defaults():
    from watchbuy.engine.hls import HlsConfig
    from watchbuy.settings import Settings, hls_config

    assert hls_config(Settings()) == HlsConfig()
