"""The media node with real peers: Debian's ffmpeg publishes as OBS does, ffmpeg/ffprobe play."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from conftest import (
    FFMPEG,
    FFPROBE,
    FlvHttpReader,
    start_ffmpeg_publisher,
    stop_process,
    wait_live,
)

from watchbuy.engine.codecs import flvmux

pytestmark = pytest.mark.usefixtures("ffmpeg")


async def decode(url: str, frames: int = 40) -> tuple[int, str]:
    """Decode ``frames`` video frames of ``url`` with ffmpeg; (exit code, error output)."""
    proc = await asyncio.create_subprocess_exec(
        FFMPEG, "-hide_banner", "-loglevel", "error", "-i", url, "-frames:v", str(frames),
        "-f", "null", "-",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, err.decode(errors="replace")


async def probe(url: str) -> dict:
    proc = await asyncio.create_subprocess_exec(
        FFPROBE, "-hide_banner", "-v", "error", "-show_streams", "-of", "json", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def test_ffmpeg_publish_then_http_flv_and_rtmp_play_decode(node):
    pub = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/key1", size="320x240")
    try:
        await wait_live(node, "show1")
        flv_url = f"http://127.0.0.1:{node.http_port}/live/show1.flv"
        cdn_url = f"http://127.0.0.1:{node.http_port}/test-node/live/show1.flv"
        rtmp_url = f"rtmp://127.0.0.1:{node.rtmp_port}/live/show1"
        results = await asyncio.gather(decode(flv_url), decode(cdn_url), decode(rtmp_url))
        for code, errors in results:
            assert code == 0 and errors == "", errors
        info = await probe(flv_url)
        codecs = {s["codec_type"]: s for s in info["streams"]}
        assert codecs["video"]["codec_name"] == "h264"
        assert (codecs["video"]["width"], codecs["video"]["height"]) == (320, 240)
        assert codecs["audio"]["codec_name"] == "aac"
        streams = node.streams_info()["streams"]
        assert streams[0]["name"] == "show1"
        assert streams[0]["video_codec"] == "avc" and streams[0]["audio_codec"] == "aac"
        assert (streams[0]["width"], streams[0]["height"]) == (320, 240)
    finally:
        await stop_process(pub)


async def test_late_joiner_gets_headers_and_gop_starting_on_a_keyframe(node):
    # GOP of 2 s: joining mid-GOP must still start on a keyframe, without waiting for the next.
    pub = await start_ffmpeg_publisher(
        f"rtmp://127.0.0.1:{node.rtmp_port}/live/key2", gop=50, rate=25
    )
    try:
        await wait_live(node, "show2", frames=60)  # somewhere inside the second GOP
        viewer = await FlvHttpReader.open(node.http_port, "/live/show2.flv")
        assert viewer.status == 200
        assert viewer.headers["content-type"] == "video/x-flv"
        assert viewer.headers["access-control-allow-origin"] == "*"
        assert "no-cache" in viewer.headers["cache-control"]
        first = await viewer.tags()
        kinds = []
        for tag_type, _ts, payload in first:
            if tag_type == flvmux.TAG_SCRIPT:
                kinds.append("meta")
            elif tag_type == flvmux.TAG_VIDEO:
                _codec, _ft, key, seq = flvmux.inspect_video(payload)
                kinds.append("vseq" if seq else "key" if key else "inter")
            else:
                kinds.append("aseq" if flvmux.inspect_audio(payload)[1] else "audio")
        assert kinds[:3] == ["meta", "vseq", "aseq"], kinds[:5]
        first_video = next(k for k in kinds[3:] if k in ("key", "inter"))
        assert first_video == "key"
        # the cached GOP came at once: more than just the keyframe was in the first read
        assert kinds.count("inter") >= 1
        await viewer.close()
    finally:
        await stop_process(pub)


async def test_bad_key_is_refused(node, caplog):
    caplog.set_level(logging.INFO, logger="watchbuy")
    proc = await asyncio.create_subprocess_exec(
        FFMPEG, "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi",
        "-i", "testsrc2=size=160x120:rate=10", "-t", "5", "-c:v", "libx264",
        "-f", "flv", f"rtmp://127.0.0.1:{node.rtmp_port}/live/not-a-key",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0
    assert node.registry.streams == {}
    assert "publish refused" in caplog.text
    assert "stream key is not allowed" in err.decode()  # ffmpeg shows the host our reason


async def test_second_publisher_on_a_live_name_is_refused(node):
    first = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/key3")
    try:
        await wait_live(node, "show3")
        stream = node.registry.get("show3")
        # same key again (the same host with OBS open twice): refused, first keeps going
        second = await start_ffmpeg_publisher(
            f"rtmp://127.0.0.1:{node.rtmp_port}/live/key3", seconds=5
        )
        _, err = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode != 0
        assert node.registry.get("show3") is stream
        frames = stream.video_frames
        await asyncio.sleep(0.5)
        assert stream.video_frames > frames
    finally:
        await stop_process(first)


async def test_publisher_stop_ends_players(node):
    pub = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/key4", seconds=60)
    await wait_live(node, "show4")
    http_viewer = await FlvHttpReader.open(node.http_port, "/live/show4.flv")
    assert await http_viewer.tags()
    rtmp_player = await asyncio.create_subprocess_exec(
        FFMPEG, "-hide_banner", "-loglevel", "error",
        "-i", f"rtmp://127.0.0.1:{node.rtmp_port}/live/show4", "-f", "null", "-",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    for _ in range(100):
        if len(node.registry.get("show4").viewers) == 2:
            break
        await asyncio.sleep(0.1)
    assert len(node.registry.get("show4").viewers) == 2
    await stop_process(pub)  # the host stops streaming
    while not http_viewer.eof:
        await http_viewer.tags(timeout=10)
    await asyncio.wait_for(rtmp_player.wait(), 15)  # ffmpeg saw the stream end and exited
    assert node.registry.get("show4") is None


async def test_stats_api_over_http(node):
    pub = await start_ffmpeg_publisher(f"rtmp://127.0.0.1:{node.rtmp_port}/live/key5")
    try:
        await wait_live(node, "show5", frames=30)
        await asyncio.sleep(2.2)  # two samples for the rates
        reader, writer = await asyncio.open_connection("127.0.0.1", node.http_port)
        writer.write(b"GET /api/streams HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /api/server HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        bodies = [json.loads(part.split(b"\r\n\r\n", 1)[1]) for part in
                  raw.split(b"HTTP/1.1 200 OK")[1:]]
        streams, server = bodies
        (stream,) = streams["streams"]
        assert stream["name"] == "show5"
        assert stream["bitrate_in"] > 10_000
        assert 15 <= stream["fps"] <= 35
        assert stream["uptime"] > 1
        assert server["publishers"] == 1
        assert server["bytes_in_per_s"] > 1000
        assert server["connections"]["rtmp"] >= 1
    finally:
        await stop_process(pub)
