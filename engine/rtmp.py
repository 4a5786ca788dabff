"""RTMP sessions on asyncio: the thin layer between sockets and the socket-free codecs.

One :class:`RtmpSession` per TCP connection.  It runs the handshake, feeds the chunk reader,
answers protocol control, and speaks the NetConnection/NetStream commands that OBS and ffmpeg
send (publish side) and that players send (play side).  Anything malformed raises a
:class:`ProtocolError` somewhere below; the session logs one line and drops this connection only.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from watchbuy.engine.amf_types import UNDEFINED
from watchbuy.engine.codecs import amf, chunk
from watchbuy.engine.commands import (
    Connect,
    DeleteStream,
    Invocation,
    Pause,
    Play,
    Publish,
)
from watchbuy.engine.errors import ProtocolError
from watchbuy.engine.handshake import ServerHandshake
from watchbuy.engine.hooks import PublishRefused, split_key
from watchbuy.engine.relay import LiveStream, Tag, Viewer, short
from watchbuy.engine.session import ViewerSession
from watchbuy.engine.wire import (
    AGGREGATE_PARTS,
    CSID_COMMAND,
    CSID_CONTROL,
    CSID_DATA,
    CSID_STATUS,
    MSG_ACK,
    MSG_AGGREGATE,
    MSG_AUDIO,
    MSG_COMMAND_AMF0,
    MSG_COMMAND_AMF3,
    MSG_DATA_AMF0,
    MSG_DATA_AMF3,
    MSG_SET_CHUNK_SIZE,
    MSG_SET_PEER_BANDWIDTH,
    MSG_USER_CONTROL,
    MSG_VIDEO,
    MSG_WINDOW_ACK_SIZE,
    PLAY_STREAM_ID,
    UC_PING_REQUEST,
    UC_PING_RESPONSE,
    UC_STREAM_BEGIN,
    UC_STREAM_EOF,
)
from watchbuy.logs import LogLimiter

if TYPE_CHECKING:
    from watchbuy.engine.node import MediaNode

log = logging.getLogger("watchbuy.engine.rtmp")

# What decoding peer input may raise besides ProtocolError: bad numbers, depth, text.  Each is
# the peer's fault and costs its connection one log line, never a traceback.
PEER_ERRORS = (ProtocolError, ValueError, OverflowError, RecursionError)

WINDOW_ACK_SIZE = 2_500_000

# Codecs we relay, stated in the connect reply when the client lists its own (Enhanced RTMP).
FOURCC_LIST = ["avc1", "hvc1", "av01", "vp09", "mp4a", "Opus", "fLaC", "ac-3", "ec-3", ".mp3"]


class RtmpViewer(Viewer):
    """An RTMP player: gets the shared format-0 chunk bytes of every tag."""

    kind = "rtmp"

    def __init__(self, session: RtmpSession, msid: int) -> None:
        super().__init__(session)
        self.msid = msid
        self.chunk_size = session.node.limits.out_chunk_size

    def encoding_key(self) -> object:
        return ("rtmp", self.chunk_size, self.msid)

    def encode(self, tags: list[Tag]) -> list[bytes]:
        if self.msid == PLAY_STREAM_ID:
            size = self.chunk_size
            return [tag.rtmp(size) for tag in tags]
        # A player that created more than one stream: its own encoding, not the shared bytes,
        # all on one csid (what nginx-rtmp does for a non-default stream).
        return [
            chunk.encode_message(self.chunk_size, CSID_DATA, t.timestamp, t.type_id, self.msid,
                                 t.payload)
            for t in tags
        ]

    def start(self, stream: LiveStream) -> None:
        self.write(self.encode(stream.startup_tags()))


class RtmpSession(ViewerSession):
    protocol = "rtmp"

    def __init__(self, node: MediaNode) -> None:
        super().__init__(node)
        self.handshake: ServerHandshake | None = ServerHandshake()
        settings = node.settings
        self.reader = chunk.ChunkReader(max_message_size=settings.max_message_size,
                                        max_partial_messages=settings.max_partial_messages,
                                        max_partial_bytes=settings.max_partial_bytes)
        self.partial_held = 0  # this connection's share of node.partial_bytes
        self.writer = chunk.ChunkWriter(128)
        self.closed = False
        self.app = ""
        self.next_stream_id = 1
        self.ack_window = 0
        self.last_ack = 0
        # publishing
        self.publishing: LiveStream | None = None
        self.publish_key = ""
        self.publish_msid = 0
        self.held: list | None = None  # messages that arrived while the publish hook decides
        self.auth_task: asyncio.Task | None = None
        # playing
        self.viewer: RtmpViewer | None = None
        self.play_name = ""
        self.play_msid = 0
        # timeouts, checked by the node's once-a-second sweep (see check_timeouts)
        self.opened_at = 0.0
        self.idle_since = 0.0
        self.messages_in = 0
        self.messages_at_sweep = 0
        self.progress_at = 0.0
        # backpressure: since when the peer has not taken our replies (write buffer above its
        # high-water mark), and since when a close waits for them
        self.write_paused_at: float | None = None
        self.closing_at: float | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self.refused:
            self.closed = True
            return
        self.opened_at = self.idle_since = self.progress_at = time.monotonic()
        self.node.rtmp_sessions.add(self)

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        self.closed = True
        self.hold_partial(0)
        self.node.rtmp_sessions.discard(self)
        self.node.stats.connection_closed("rtmp")
        if self.auth_task is not None and not self.auth_task.done():
            self.auth_task.cancel()
        self.stop_publishing()
        self.stop_playing()

    def data_received(self, data: bytes) -> None:
        self.node.stats.bytes_in += len(data)
        try:
            if self.handshake is not None:
                reply = self.handshake.feed(data)
                if reply:
                    self.send(reply)
                if not self.handshake.done:
                    return
                data = self.handshake.leftover
                self.handshake = None
                if not data:
                    return
            messages = self.reader.feed(data)
            self.messages_in += len(messages)
            self.hold_partial(self.reader.partial_bytes)
            if self.closed:  # over the node's budget for unfinished messages: dropped
                return
            self.acknowledge()
            if self.held is not None:
                self.held.extend(messages)
                return
            self.dispatch(messages)
        except PEER_ERRORS as exc:
            self.protocol_error(exc)
        except Exception:  # a bug must cost this connection only, never the node
            self.log.exception("rtmp %s: internal error", self.peer)
            self.node.stats.protocol_errors["internal"] += 1
            self.drop("internal error")

    # -- plumbing ---------------------------------------------------------------------------
    def hold_partial(self, held: int) -> None:
        """Account this connection's unfinished-message bytes to the node; past the node-wide
        cap the connection that asks for more is dropped, so many connections each under their
        own cap cannot add up to the node's memory."""
        node = self.node
        node.partial_bytes += held - self.partial_held
        grew = held > self.partial_held
        self.partial_held = held
        if grew and node.partial_bytes > node.settings.node_partial_bytes:
            self.drop(f"the node holds {node.partial_bytes} bytes of unfinished messages "
                      "(WATCHBUY_NODE_PARTIAL_BYTES)", node.rtmp_timeout_logs["partial"])

    def decode_amf0(self, payload: bytes) -> list:
        """A command's or data message's values, within the node's AMF budgets."""
        config = self.node.settings
        return amf.decode_amf0(payload, max_nodes=config.amf_max_nodes,
                               max_expanded_size=config.amf_max_expanded_bytes)

    def protocol_error(self, exc: Exception) -> None:
        """The peer broke the protocol: count it (in the handshake or after) and drop."""
        kind = "rtmp_handshake" if self.handshake is not None else "rtmp"
        self.node.stats.protocol_errors[kind] += 1
        self.drop(str(exc) or type(exc).__name__)

    def drop(self, reason: str, limiter: LogLimiter | None = None) -> None:
        """Abort this connection with one log line (through ``limiter`` when a peer could
        make many of them at once)."""
        if not self.closed:
            reason = reason if len(reason) <= 200 else reason[:200] + "..."
            if limiter is None:
                self.log.warning("rtmp %s: dropping connection: %s", self.peer, reason)
            else:
                limiter.log(logging.WARNING, "rtmp %s: dropping connection: %s", self.peer, reason,
                            extra=self.log.extra)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def update_reading(self) -> None:
        """Read from the peer unless the publish hook is deciding (its messages are held) or
        the peer is not taking our replies: a peer that sends commands and never reads the
        answers must not grow our write buffer without bound."""
        if self.transport is None or self.closed:
            return
        if self.held is not None or self.write_paused_at is not None:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        super().pause_writing()  # a playing viewer drops media and resyncs on a keyframe
        if self.write_paused_at is None:
            self.write_paused_at = time.monotonic()
        self.update_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.write_paused_at = None
        self.update_reading()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)
            self.node.stats.bytes_out += len(data)

    def send_message(self, csid: int, type_id: int, payload: bytes, msid: int = 0,
                     timestamp: int = 0) -> None:
        self.send(self.writer.write(csid, timestamp, type_id, msid, payload))

    def send_control(self, type_id: int, payload: bytes) -> None:
        self.send_message(CSID_CONTROL, type_id, payload)

    def send_user_control(self, event: int, value: int) -> None:
        self.send_control(MSG_USER_CONTROL, struct.pack(">HI", event, value))

    def send_command(self, *values, msid: int = 0, csid: int = CSID_COMMAND) -> None:
        self.send_message(csid, MSG_COMMAND_AMF0, amf.encode_amf0(*values), msid)

    def send_status(self, msid: int, level: str, code: str, description: str, **extra) -> None:
        info = {"level": level, "code": code, "description": description, **extra}
        self.send_command("onStatus", 0.0, None, info, msid=msid, csid=CSID_STATUS)

    def acknowledge(self) -> None:
        """Acknowledge received bytes once per window, as the peer asked with Window Ack Size."""
        received = self.reader.bytes_received
        if self.ack_window and received - self.last_ack >= self.ack_window:
            self.last_ack = received
            self.send_control(MSG_ACK, struct.pack(">I", received & 0xFFFFFFFF))

    # -- message dispatch -------------------------------------------------------------------
    def dispatch(self, messages: list) -> None:
        for index, message in enumerate(messages):
            self.on_message(message)
            if self.closed:
                return
            if self.held is not None:  # publish is waiting for the hook: keep the rest
                self.held.extend(messages[index + 1 :])
                return
        if self.publishing is not None:
            self.publishing.flush()

    def on_message(self, message: tuple) -> None:
        _csid, timestamp, type_id, msid, payload = message
        if type_id == MSG_VIDEO or type_id == MSG_AUDIO:
            if self.publishing is not None and msid == self.publish_msid:
                self.publishing.on_media(type_id, timestamp, payload)
        elif type_id == MSG_COMMAND_AMF0:
            self.on_command(self.decode_amf0(payload), msid)
        elif type_id == MSG_COMMAND_AMF3:
            # AMF3 command messages carry a format byte, then AMF0 values.
            self.on_command(self.decode_amf0(payload[1:]), msid)
        elif type_id == MSG_DATA_AMF0:
            self.on_data(timestamp, payload, msid)
        elif type_id == MSG_DATA_AMF3:
            self.on_data(timestamp, payload[1:], msid)
        elif type_id == MSG_USER_CONTROL:
            self.on_user_control(payload)
        elif type_id == MSG_WINDOW_ACK_SIZE:
            if len(payload) >= 4:
                self.ack_window = struct.unpack_from(">I", payload)[0]
        elif type_id == MSG_AGGREGATE:
            self.on_aggregate(timestamp, payload, msid)
        # Set Chunk Size and Abort were applied by the reader; Acknowledgement and Set Peer
        # Bandwidth need nothing from a server that does not throttle its output.

    def on_user_control(self, payload: bytes) -> None:
        if len(payload) < 6:
            return
        event, value = struct.unpack_from(">HI", payload)
        if event == UC_PING_REQUEST:
            self.send_user_control(UC_PING_RESPONSE, value)

    def on_aggregate(self, timestamp: int, payload: bytes, msid: int) -> None:
        """Unpack an aggregate message: FLV-tag-like sub-messages with back pointers.

        One flat walk over a memoryview: only the media and data sub-messages we relay become
        bytes.  An aggregate inside an aggregate is a protocol error (it served only to make us
        copy and recurse), as is a sub-message past the end.
        """
        if self.publishing is None or msid != self.publish_msid:
            return  # only a publisher's media is of use; the rest is not worth parsing
        view = memoryview(payload)
        end = len(view)
        pos = 0
        base = None
        while end - pos >= 11:
            type_id = view[pos]
            size = (view[pos + 1] << 16) | (view[pos + 2] << 8) | view[pos + 3]
            sub_ts = (view[pos + 4] << 16) | (view[pos + 5] << 8) | view[pos + 6] \
                | (view[pos + 7] << 24)
            start = pos + 11
            if start + size > end:
                raise ProtocolError("aggregate message: sub-message past the end")
            if type_id == MSG_AGGREGATE:
                raise ProtocolError("aggregate message inside an aggregate message")
            if base is None:
                base = sub_ts
            if type_id in AGGREGATE_PARTS:
                ts = (timestamp + sub_ts - base) & 0xFFFFFFFF
                self.on_message((0, ts, type_id, msid, bytes(view[start : start + size])))
                if self.closed:
                    return
            pos = start + size + 4

    def on_data(self, timestamp: int, payload: bytes, msid: int) -> None:
        if self.publishing is None or msid != self.publish_msid:
            return
        values = self.decode_amf0(payload)
        if not values:
            return
        if values[0] == "@setDataFrame" or values[0] == "onMetaData":
            self.publishing.on_metadata(values)
        elif values[0] != "@clearDataFrame":
            self.publishing.on_data(timestamp, payload)

    def on_command(self, values: list, msid: int) -> None:
        if not values or not isinstance(values[0], str):
            raise ProtocolError("command message without a command name")
        entry = COMMANDS.get(values[0])
        if entry is None:
            self.log.debug("rtmp %s: ignoring command %s", self.peer, short(values[0]))
            return
        decode, handle = entry
        txn = values[1] if len(values) > 1 and isinstance(values[1], float) else 0.0
        handle(self, decode(txn, values[2] if len(values) > 2 else None, values[3:], msid))

    # -- NetConnection ------------------------------------------------------------------------
    def cmd_connect(self, cmd: Connect) -> None:
        app = cmd.app
        if app not in self.node.settings.apps:
            # The app is the peer's: only a short form goes to the log and back to the peer.
            self.log.info("rtmp %s: connect to unknown app %s refused", self.peer, short(app))
            self.send_command("_error", cmd.txn, None, {
                "level": "error", "code": "NetConnection.Connect.Rejected",
                "description": f"unknown application {short(app)}"})
            self.close_soon()
            return
        self.app = app
        out_size = self.node.limits.out_chunk_size
        self.send_control(MSG_WINDOW_ACK_SIZE, struct.pack(">I", WINDOW_ACK_SIZE))
        self.send_control(MSG_SET_PEER_BANDWIDTH, struct.pack(">IB", WINDOW_ACK_SIZE, 2))
        self.send_control(MSG_SET_CHUNK_SIZE, struct.pack(">I", out_size))
        self.writer.chunk_size = out_size
        properties = {"fmsVer": "FMS/3,0,1,123", "capabilities": 31.0, "mode": 1.0}
        if cmd.lists_fourccs:
            properties["fourCcList"] = list(FOURCC_LIST)
        self.send_command("_result", cmd.txn, properties, {
            "level": "status", "code": "NetConnection.Connect.Success",
            "description": "Connection succeeded.",
            "objectEncoding": cmd.object_encoding})

    def cmd_createStream(self, cmd: Invocation) -> None:
        stream_id = self.next_stream_id
        self.next_stream_id += 1
        self.send_command("_result", cmd.txn, None, float(stream_id))

    def cmd_undefined_result(self, cmd: Invocation) -> None:
        """releaseStream and FCPublish: OBS waits for an answer; there is nothing to say."""
        self.send_command("_result", cmd.txn, None, UNDEFINED)

    def cmd_FCUnpublish(self, cmd: Invocation) -> None:
        self.stop_publishing()

    def cmd_deleteStream(self, cmd: DeleteStream) -> None:
        target = cmd.target
        if self.publishing is not None and target == self.publish_msid:
            self.stop_publishing()
        if self.play_name and target == self.play_msid:
            self.stop_playing()

    def cmd_closeStream(self, cmd: Invocation) -> None:
        msid = cmd.msid
        if self.publishing is not None and msid == self.publish_msid:
            self.stop_publishing()
        if self.play_name and msid == self.play_msid:
            self.stop_playing()

    def cmd_getStreamLength(self, cmd: Invocation) -> None:
        self.send_command("_result", cmd.txn, None, 0.0)

    # -- publishing ---------------------------------------------------------------------------
    def cmd_publish(self, cmd: Publish) -> None:
        msid = cmd.msid
        if not self.app:
            self.refuse_publish("before_connect", msid, "NetStream.Publish.BadConnection",
                                "publish before connect")
            return
        if not split_key(cmd.name):
            # rtmp://host/live or rtmp://host/live?x: tell the encoder why, then close.
            self.refuse_publish("no_key", msid, "NetStream.Publish.BadName",
                                "publish needs a stream key")
            return
        if self.publishing is not None or self.held is not None or self.play_name:
            self.node.stats.publish_refused["busy_connection"] += 1
            self.send_status(msid, "error", "NetStream.Publish.BadConnection",
                             "this connection is already publishing or playing")
            return
        self.publish_key = split_key(cmd.name)
        self.publish_msid = msid
        # Hold the rest of this read and stop reading until the hook has decided: media that
        # ffmpeg sends right after publish must neither be lost nor relayed unauthorised.
        self.held = []
        self.update_reading()
        self.auth_task = asyncio.ensure_future(self.authorize())

    async def authorize(self) -> None:
        key, msid = self.publish_key, self.publish_msid
        try:
            name = await self.node.authorizer.authorize(self.app, key, self.peer.rsplit(":", 1)[0])
        except PublishRefused as exc:
            self.node.stats.publish_refused["unauthorized"] += 1
            if not self.closed:
                self.log.info("rtmp %s: publish refused: %s", self.peer, exc)
                self.send_status(msid, "error", "NetStream.Publish.Unauthorized",
                                 "publishing with this stream key is not allowed")
                self.close_soon()
            return
        except asyncio.CancelledError:
            return
        except Exception:
            self.log.exception("rtmp %s: publish hook failed", self.peer)
            self.node.stats.publish_refused["hook_failed"] += 1
            self.drop("publish hook failed")
            return
        if self.closed:
            await self.node.authorizer.publish_done(self.app, key, name)
            return
        cluster = self.node.cluster  # one worker of several: the name is claimed node-wide
        stream = None
        if cluster is None or cluster.claim(name):
            stream = self.node.registry.start(name, self.app, publisher=self.peer)
            if stream is None:
                stream = self.take_over(name, key)
            if stream is None and cluster is not None:
                cluster.unclaim(name)
        if stream is None:
            self.log.info("rtmp %s: refused second publisher on live stream %r", self.peer, name)
            self.node.stats.publish_refused["already_live"] += 1
            self.send_status(msid, "error", "NetStream.Publish.BadName",
                             f"stream {name!r} is already live")
            self.close_soon()
            return
        self.publishing = stream
        stream.owner = self
        self.log.info("rtmp %s: publishing %r (app %s)", self.peer, name, self.app)
        self.send_user_control(UC_STREAM_BEGIN, msid)
        self.send_status(msid, "status", "NetStream.Publish.Start", f"{name} is now published.")
        held, self.held = self.held or [], None
        try:
            self.dispatch(held)
        except PEER_ERRORS as exc:
            self.protocol_error(exc)
            return
        except Exception:  # as in data_received: a bug costs this connection only
            self.log.exception("rtmp %s: internal error", self.peer)
            self.node.stats.protocol_errors["internal"] += 1
            self.drop("internal error")
            return
        self.update_reading()

    def take_over(self, name: str, key: str) -> LiveStream | None:
        """The live stream ``name`` for this session if its publisher is an earlier session of
        the same key that has sent no media for ``publish_takeover_grace`` seconds: what OBS
        does when it reconnects after a network blip, before we noticed the old connection is
        dead.  The old session is dropped; the stream and its viewers carry on."""
        stream = self.node.registry.get(name)
        old = stream.owner if stream is not None else None
        if not isinstance(old, RtmpSession) or old is self or old.publish_key != key \
                or old.app != self.app:
            return None  # another key (or app) owns this name: refused as before
        silent = time.monotonic() - stream.last_media_at
        if silent < self.node.settings.publish_takeover_grace:
            return None
        self.log.info("rtmp %s: takes over %r from %s, which sent no media for %.1f s",
                 self.peer, name, old.peer, silent)
        old.publishing = None  # so its end neither stops the stream nor reports publish_done
        old.drop(f"stream {name!r} taken over by {self.peer} (same stream key)")
        stream.handover(self, self.peer)
        return stream

    def stop_publishing(self) -> None:
        stream, self.publishing = self.publishing, None
        if stream is None:
            return
        self.log.info("rtmp %s: stopped publishing %r", self.peer, stream.name)
        self.node.registry.stop(stream)
        asyncio.ensure_future(
            self.node.authorizer.publish_done(self.app, self.publish_key, stream.name)
        )

    # -- playing ------------------------------------------------------------------------------
    def cmd_play(self, cmd: Play) -> None:
        msid, name = cmd.msid, cmd.name
        if not self.app:
            self.refuse(msid, "NetStream.Play.Failed", "play before connect")
            return
        if not name:
            self.refuse(msid, "NetStream.Play.StreamNotFound", "play needs a stream name")
            return
        if self.publishing is not None or self.play_name:
            self.send_status(msid, "error", "NetStream.Play.Failed",
                             "this connection is already publishing or playing")
            return
        self.play_name = name
        self.play_msid = msid or 1
        self.send_user_control(UC_STREAM_BEGIN, self.play_msid)
        self.send_status(self.play_msid, "status", "NetStream.Play.Reset",
                         f"Playing and resetting {name}.", details=name)
        self.send_status(self.play_msid, "status", "NetStream.Play.Start",
                         f"Started playing {name}.", details=name)
        self.send_message(CSID_STATUS, MSG_DATA_AMF0,
                          amf.encode_amf0("|RtmpSampleAccess", True, True), self.play_msid)
        stream = self.node.registry.get(name)
        if stream is None:
            # Like nginx-rtmp's idle streams: wait, and start when the host goes live.
            self.node.registry.wait_for(name, self)
        else:
            self.stream_started(stream)

    def stream_started(self, stream: LiveStream) -> None:
        """Called by the registry when the stream we wait for goes live."""
        if self.closed:
            return
        self.node.registry.stop_waiting(stream.name, self)
        self.viewer = RtmpViewer(self, self.play_msid)
        self.playing = stream
        stream.add_viewer(self.viewer)

    def stream_ended(self, viewer: RtmpViewer) -> None:
        """The publisher stopped: tell the player, then wait for the host to return."""
        if self.viewer is not viewer or self.closed:
            return
        self.viewer = None
        msid = self.play_msid
        self.send_user_control(UC_STREAM_EOF, msid)
        self.send_status(msid, "status", "NetStream.Play.UnpublishNotify",
                         f"{self.play_name} is now unpublished.")
        self.send_status(msid, "status", "NetStream.Play.Stop", f"Stopped playing {self.play_name}.")
        self.node.registry.wait_for(self.play_name, self)

    def cmd_pause(self, cmd: Pause) -> None:
        """Pausing a live stream detaches the player; unpausing starts it again from the GOP."""
        if not self.play_name:
            return
        if cmd.pausing and self.viewer is not None:
            self.playing.remove_viewer(self.viewer)
            self.viewer = None
        elif not cmd.pausing and self.viewer is None:
            stream = self.node.registry.get(self.play_name)
            if stream is not None:
                self.stream_started(stream)

    def stop_playing(self) -> None:
        if not self.play_name:
            return
        self.node.registry.stop_waiting(self.play_name, self)
        if self.viewer is not None:
            self.viewer.closed = True
            self.playing.remove_viewer(self.viewer)
            self.viewer = None
        self.playing = None
        self.play_name = ""

    def refuse_publish(self, why: str, msid: int, code: str, reason: str) -> None:
        """Refuse a publish (counted by ``why`` for /metrics) with an error status, then close."""
        self.node.stats.publish_refused[why] += 1
        self.refuse(msid, code, reason)

    def refuse(self, msid: int, code: str, reason: str) -> None:
        """Answer a command we cannot follow with an error status and the reason, then close."""
        self.log.info("rtmp %s: refused: %s", self.peer, reason)
        self.send_status(msid, "error", code, reason)
        self.close_soon()

    # -- timeouts -----------------------------------------------------------------------------
    def check_timeouts(self, now: float) -> None:
        """Called once a second by the node's sweep; drops this connection when it has
        overstayed.  Progress is read from counters the data path keeps anyway."""
        settings = self.node.settings
        limiters = self.node.rtmp_timeout_logs
        timeouts = self.node.stats.timeouts
        drain = settings.drain_timeout
        if self.closed:
            if self.closing_at is not None and now - self.closing_at > drain and \
                    self.transport.get_write_buffer_size():
                timeouts["rtmp_drain"] += 1
                limiters["drain"].log(logging.INFO, "rtmp %s: peer took nothing for %g s after "
                                      "the close: aborting (WATCHBUY_DRAIN_TIMEOUT)", self.peer,
                                      drain, extra=self.log.extra)
                self.transport.abort()
            return
        if self.write_paused_at is not None and self.viewer is None and \
                now - self.write_paused_at > drain:
            # Not a playing viewer (its own stall cut-off applies): a peer that stopped reading
            # our replies.
            timeouts["rtmp_drain"] += 1
            self.drop(f"the peer took none of our replies for {drain:g} s "
                      "(WATCHBUY_DRAIN_TIMEOUT)", limiters["drain"])
            return
        if not self.app:
            if settings.handshake_timeout and now - self.opened_at > settings.handshake_timeout:
                timeouts["rtmp_handshake"] += 1
                self.drop(f"handshake and connect not done within {settings.handshake_timeout:g} s"
                          " (WATCHBUY_HANDSHAKE_TIMEOUT)", limiters["handshake"])
                return
        if self.messages_in != self.messages_at_sweep:
            self.messages_at_sweep = self.messages_in
            self.progress_at = now
        timeout = settings.partial_message_timeout
        if self.reader.partial_count and timeout and now - self.progress_at > timeout:
            timeouts["rtmp_partial_message"] += 1
            self.drop(f"an unfinished message made no progress for {timeout:g} s "
                      "(WATCHBUY_PARTIAL_MESSAGE_TIMEOUT)", limiters["partial"])
            return
        stream = self.publishing
        if stream is not None:
            timeout = settings.publish_idle_timeout
            if timeout and now - stream.last_media_at > timeout:
                # Ended at once, so the host can publish again under the same name.
                timeouts["rtmp_publish_idle"] += 1
                self.drop(f"publisher sent no media for {timeout:g} s, ending {stream.name!r} "
                          "(WATCHBUY_PUBLISH_IDLE_TIMEOUT)")
                self.stop_publishing()
            return
        if self.play_name or self.held is not None or (
                self.auth_task is not None and not self.auth_task.done()):
            self.idle_since = now
            return
        timeout = settings.idle_connection_timeout
        if timeout and now - self.idle_since > timeout:
            timeouts["rtmp_idle"] += 1
            self.drop(f"neither publishing nor playing for {timeout:g} s "
                      "(WATCHBUY_IDLE_CONNECTION_TIMEOUT)", limiters["idle"])

    def close_soon(self) -> None:
        """Close after what we wrote (an error status) has gone out; the sweep aborts a peer
        that does not take it within ``drain_timeout`` (``close()`` alone waits forever)."""
        self.closed = True
        if self.transport is not None:
            self.closing_at = time.monotonic()
            self.transport.close()


# The commands a session answers: name -> (decode its arguments, act on them).  Anything else
# is ignored with a debug line, as nginx-rtmp and SRS do (players send many we need not answer).
COMMANDS: dict[str, tuple[Callable[..., Invocation], Callable[[RtmpSession, Any], None]]] = {
    # NetConnection
    "connect": (Connect.decode, RtmpSession.cmd_connect),
    "createStream": (Invocation.decode, RtmpSession.cmd_createStream),
    "releaseStream": (Invocation.decode, RtmpSession.cmd_undefined_result),
    "FCPublish": (Invocation.decode, RtmpSession.cmd_undefined_result),
    "FCUnpublish": (Invocation.decode, RtmpSession.cmd_FCUnpublish),
    "deleteStream": (DeleteStream.decode, RtmpSession.cmd_deleteStream),
    "getStreamLength": (Invocation.decode, RtmpSession.cmd_getStreamLength),
    # NetStream
    "closeStream": (Invocation.decode, RtmpSession.cmd_closeStream),
    "publish": (Publish.decode, RtmpSession.cmd_publish),
    "play": (Play.decode, RtmpSession.cmd_play),
    "pause": (Pause.decode, RtmpSession.cmd_pause),
}
