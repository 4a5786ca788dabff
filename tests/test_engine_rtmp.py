"""RTMP details with our own client: Enhanced RTMP (HEVC/AV1) relayed unchanged, fourCcList,
ping, and a player that waits for a host to go live."""

from __future__ import annotations

import asyncio
import os
import struct

from conftest import FlvHttpReader

from watchbuy.engine.client import RtmpClient
from watchbuy.engine.codecs import flvmux


def ex_video(frame_type: int, packet_type: int, fourcc: bytes, body: bytes) -> bytes:
    """An Enhanced RTMP video payload: ExVideoTagHeader (IsExHeader bit), FourCC, body."""
    return bytes([0x80 | (frame_type << 4) | packet_type]) + fourcc + body


async def test_enhanced_rtmp_hevc_relayed_unchanged_with_keyframe_detection(node):
    publisher = await RtmpClient.connect(
        "127.0.0.1", node.rtmp_port, connect_extra={"fourCcList": ["hvc1", "av01"]}
    )
    # Enhanced RTMP: a client listing fourCcList hears ours back
    assert "hvc1" in publisher.connect_result[2]["fourCcList"]
    await publisher.publish("key1")
    publisher.send_metadata({"width": 1920.0, "height": 1080.0, "videocodecid": 1752589105.0})
    config = ex_video(1, 0, b"hvc1", os.urandom(40))          # SequenceStart
    frames = []
    for i in range(12):
        key = i % 6 == 0
        # PacketType 1 (CodedFrames, with composition time) or 3 (CodedFramesX)
        frames.append(ex_video(1 if key else 2, 1 if i % 2 else 3, b"hvc1",
                               os.urandom(500 if key else 80)))
    publisher.send_media(9, 0, config)
    for i, payload in enumerate(frames[:8]):
        publisher.send_media(9, i * 40, payload)
    await publisher.drain()
    for _ in range(100):
        stream = node.registry.get("show1")
        if stream is not None and stream.video_frames == 8:
            break
        await asyncio.sleep(0.02)
    info = stream.info()
    assert info["video_codec"] == "hevc" and info["width"] == 1920
    # a late joiner: sequence header then the GOP from the last keyframe (frame 6)
    viewer = await FlvHttpReader.open(node.http_port, "/live/show1.flv")
    got = []
    while len(got) < 4:
        got += await viewer.tags()
    assert got[0][0] == flvmux.TAG_SCRIPT
    assert got[1][2] == config  # unchanged bytes
    assert [t[2] for t in got[2:4]] == frames[6:8]
    assert flvmux.inspect_video(got[2][2])[2] is True  # keyframe
    # and the live frames that follow, unchanged, to an RTMP player too
    player = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
    await player.play("show1")
    for i, payload in enumerate(frames[8:], start=8):
        publisher.send_media(9, i * 40, payload)
    await publisher.drain()
    seen = []
    while len(seen) < 8:  # metadata, config, 2 cached frames, 4 live
        ts, type_id, payload = await player.media()
        seen.append(payload)
    assert seen[1] == config and seen[2:] == frames[6:12]
    more = []
    while len(more) < 4:
        more += await viewer.tags()
    assert [t[2] for t in more[:4]] == frames[8:12]
    await viewer.close()
    await player.close()
    await publisher.close()


async def test_ping_request_gets_a_response(node):
    client = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
    client.send_raw(client.out.write(2, 0, 4, 0, struct.pack(">HI", 6, 123456)))
    while True:
        message = await client.next_message()
        if message[2] == 4 and struct.unpack(">H", message[4][:2])[0] == 7:
            assert struct.unpack(">I", message[4][2:6])[0] == 123456
            break
    await client.close()


async def test_player_waits_for_the_host_and_starts_when_live(node):
    player = await RtmpClient.connect("127.0.0.1", node.rtmp_port, digest=False)
    await player.play("show2")  # not live yet: the player waits, like nginx-rtmp idle streams
    publisher = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
    await publisher.publish("key2")
    publisher.send_media(9, 0, bytes([0x17, 0]) + os.urandom(30))       # AVC sequence header
    publisher.send_media(8, 0, bytes([0xAF, 0]) + b"\x12\x10")          # AAC sequence header
    keyframe = bytes([0x17, 1, 0, 0, 0]) + os.urandom(300)
    publisher.send_media(9, 40, keyframe)
    await publisher.drain()
    payloads = []
    while len(payloads) < 3:
        payloads.append((await player.media())[2])
    assert payloads[2] == keyframe
    await publisher.close()
    # the host leaves: the player hears the stream stop
    for _ in range(100):
        if any(s.get("code") == "NetStream.Play.Stop" for s in player.statuses):
            break
        try:
            await player.media(timeout=0.1)
        except TimeoutError:
            pass
    assert any(s.get("code") == "NetStream.Play.UnpublishNotify" for s in player.statuses)
    await player.close()
