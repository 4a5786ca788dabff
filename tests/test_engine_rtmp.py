"""RTMP details with our own client: Enhanced RTMP (HEVC/AV1) relayed unchanged, fourCcList,
ping, and a player that waits for a host to go live."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import struct

import pytest
from conftest import FlvHttpReader, node_settings, start_ffmpeg_publisher, stop_process, wait_live

from watchbuy.engine.client import RtmpClient, RtmpError
from watchbuy.engine.codecs import amf, flvmux
from watchbuy.engine.node import MediaNode


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


async def test_aggregate_messages_are_unpacked_with_their_timestamps(node):
    publisher = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
    await publisher.publish("key1")
    player = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
    await player.play("show1")
    header = bytes([0x17, 0]) + os.urandom(20)
    frames = [bytes([0x17 if i == 0 else 0x27, 1, 0, 0, 0]) + os.urandom(50) for i in range(3)]
    parts = [(9, 1000, header)] + [(9, 1000 + 40 * i, f) for i, f in enumerate(frames)]
    parts.insert(2, (20, 1000, b"\x02\x00\x04junk"))  # not media: skipped
    body = b"".join(
        bytes([t]) + len(p).to_bytes(3, "big") + ts.to_bytes(3, "big") + b"\0" + b"\0\0\0" + p
        + (11 + len(p)).to_bytes(4, "big") for t, ts, p in parts)
    # the aggregate's own timestamp is 5000: sub-messages keep their offsets from the first
    publisher.send_raw(publisher.out.write(6, 5000, 22, publisher.stream_id, body))
    await publisher.drain()
    got = []
    while len(got) < 4:
        got.append(await player.media())
    assert [g[2] for g in got] == [header, *frames]
    assert [g[0] for g in got[1:]] == [5000, 5040, 5080]
    await player.close()
    await publisher.close()


async def test_commands_before_connect_and_empty_names_get_an_error_status(node):
    for command, args, code in [
        ("publish", ("key1", "live"), "NetStream.Publish.BadConnection"),
        ("play", ("show1",), "NetStream.Play.Failed"),
    ]:
        client = await RtmpClient.open("127.0.0.1", node.rtmp_port)
        client.command(command, None, *args, stream_id=1)
        status = await client.wait_status()
        assert status["code"] == code and "connect" in status["description"]
        with pytest.raises(RtmpError):  # then closed
            await client.next_message(timeout=5)
        await client.close()
    assert node.registry.get("show1") is None
    # rtmp://host/live?key or an empty name: the encoder hears why, then the connection closes
    for name in ("", "?key1", "  "):
        client = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
        with pytest.raises(RtmpError, match="BadName"):
            await client.publish(name)
        assert "stream key" in client.statuses[-1]["description"]
        with pytest.raises(RtmpError):
            await client.next_message(timeout=5)
        await client.close()


async def test_live_viewers_get_no_file_duration_or_size(node):
    publisher = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
    await publisher.publish("key1")
    # what ffmpeg -t 30 writes
    publisher.send_metadata({"duration": 30.0, "filesize": 1234567.0, "width": 320.0,
                             "height": 240.0, "framerate": 25.0, "videocodecid": 7.0,
                             "audiocodecid": 10.0, "encoder": "Lavf"})
    await publisher.drain()
    for _ in range(100):
        if node.registry.get("show1").metadata_tag is not None:
            break
        await asyncio.sleep(0.02)
    viewer = await FlvHttpReader.open(node.http_port, "/live/show1.flv")
    tags = await viewer.tags()
    assert tags[0][0] == flvmux.TAG_SCRIPT
    name, metadata = amf.decode_amf0(tags[0][2])
    assert name == "onMetaData"
    assert "duration" not in metadata and "filesize" not in metadata
    assert metadata["width"] == 320.0 and metadata["encoder"] == "Lavf"
    player = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
    await player.play("show1")
    _ts, type_id, payload = await player.media()
    assert type_id == 18 and "duration" not in amf.decode_amf0(payload)[1]
    await player.close()
    await viewer.close()
    await publisher.close()


@pytest.fixture
async def two_key_node():
    # key1 and other both map to show1: only key1's own reconnect may take over
    media = MediaNode(node_settings(stream_keys={"key1": "show1", "other": "show1"}))
    await media.start()
    yield media
    await media.stop()


@pytest.mark.usefixtures("ffmpeg")
async def test_a_reconnecting_publisher_takes_over_its_silent_session(two_key_node, caplog):
    """OBS reconnects after a network blip before the node noticed the old connection died:
    the same key takes the stream over from its silent session; viewers stay on."""
    node = two_key_node
    caplog.set_level(logging.INFO, logger="watchbuy")
    url = f"rtmp://127.0.0.1:{node.rtmp_port}/live/key1"
    first = await start_ffmpeg_publisher(url, seconds=60)
    second = None
    try:
        await wait_live(node, "show1", frames=10)
        stream = node.registry.get("show1")
        player = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
        await player.play("show1")
        viewer = await FlvHttpReader.open(node.http_port, "/live/show1.flv")
        assert await viewer.tags()
        # while the first one sends, neither its key nor another key may take the name
        for key in ("key1", "other"):
            client = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
            with pytest.raises(RtmpError, match="BadName"):
                await client.publish(key)
            await client.close()
        first.send_signal(signal.SIGSTOP)  # hung: its TCP connection stays open
        loop = asyncio.get_running_loop()
        await asyncio.sleep(1.5)  # past publish_takeover_grace (1 s)
        client = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
        with pytest.raises(RtmpError, match="BadName"):  # another key: still refused
            await client.publish("other")
        await client.close()
        frames = stream.video_frames
        second = await start_ffmpeg_publisher(url, seconds=60)
        deadline = loop.time() + 15
        while stream.video_frames < frames + 25:
            assert loop.time() < deadline, "the second publisher never took over"
            await asyncio.sleep(0.05)
        assert node.registry.get("show1") is stream  # the same stream, viewers attached
        assert any("takes over 'show1'" in r.getMessage() for r in caplog.records)
        # the waiting RTMP player gets the new publisher's frames
        seen = 0
        while seen < 25:
            _ts, type_id, _payload = await player.media(timeout=10)
            seen += type_id == 9
        assert not any(s.get("code") == "NetStream.Play.Stop" for s in player.statuses)
        assert len(stream.viewers) == 2
        first.send_signal(signal.SIGCONT)  # it finds its connection gone and gives up
        assert await asyncio.wait_for(first.wait(), 15) != 0
        assert node.registry.get("show1") is stream
        await player.close()
        await viewer.close()
    finally:
        if first.returncode is None:
            first.send_signal(signal.SIGCONT)
        await stop_process(first)
        if second is not None:
            await stop_process(second)


def test_relay_limits_default_to_the_node_settings_and_follow_them():
    from watchbuy.engine.relay import RelayLimits
    from watchbuy.settings import Settings

    assert RelayLimits() == RelayLimits.from_settings(Settings())  # the defaults live once
    limits = RelayLimits.from_settings(Settings(gop_max_frames=7, stall_timeout=2.5,
                                                metadata_max_bytes=100))
    assert (limits.gop_max_frames, limits.stall_timeout, limits.metadata_max_bytes) == \
        (7, 2.5, 100)
    node = MediaNode(node_settings(out_chunk_size=8192))
    assert node.limits.out_chunk_size == 8192 and node.settings.out_chunk_size == 8192


# -- the command table ------------------------------------------------------------------------
def test_command_decoders_check_and_convert_their_arguments_once():
    from watchbuy.engine.commands import Connect, DeleteStream, Pause, Play, Publish
    from watchbuy.engine.errors import ProtocolError

    cmd = Connect.decode(1.0, {"app": "/live?token=x", "objectEncoding": "3",
                               "fourCcList": []}, [], 0)
    assert (cmd.app, cmd.object_encoding, cmd.lists_fourccs) == ("live", 0.0, True)
    assert Play.decode(2.0, None, ["show1.flv?t=1"], 1).name == "show1"
    assert Publish.decode(2.0, None, ["key1?x", "live"], 1).name == "key1?x"
    assert DeleteStream.decode(3.0, None, [4.0], 1).target == 4
    assert DeleteStream.decode(3.0, None, [], 7).target == 7
    assert Pause.decode(4.0, None, [True, 0.0], 1).pausing is True
    assert Pause.decode(4.0, None, ["yes"], 1).pausing is False
    for decode, args in [(Connect.decode, "not an object"), (Play.decode, [1.0]),
                         (Publish.decode, []), (DeleteStream.decode, [float("nan")])]:
        with pytest.raises(ProtocolError):
            decode(0.0, args, args if isinstance(args, list) else [], 1)


async def test_commands_outside_the_table_are_ignored_even_when_named_like_methods(node):
    """The table replaced ``getattr(self, "cmd_" + name)``: a peer naming a session method (or
    a handler by its Python name) reaches nothing; the connection carries on."""
    from watchbuy.engine.rtmp import COMMANDS

    assert {"connect", "createStream", "publish", "play", "deleteStream"} <= set(COMMANDS)
    client = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
    for name in ("stop_publishing", "drop", "cmd_connect", "close_soon", "__init__",
                 "undefined_result", "on_command"):
        client.command(name, None, "key1")
    result = await client.call("createStream", None)
    assert result[0] == "_result" and result[3] == 1.0  # still served, nothing was dropped
    await client.publish("key1")
    assert node.registry.get("show1") is not None
    await client.close()
