"""Fan-out relay: live streams, their GOP cache, and viewers with bounded queues.

Every media message from a publisher becomes one :class:`Tag`.  A tag is encoded at most once per
output format (FLV tag bytes for HTTP-FLV, format-0 chunk bytes for RTMP players) and those very
bytes go to every viewer, as every fast relay does.  The publisher's session hands the tags of one
socket read to :meth:`LiveStream.flush`, which gives each viewer a single ``writelines`` call: the
merged write.

A viewer's queue is its transport's write buffer, capped by ``set_write_buffer_limits``.  While
the transport asks us to pause (the viewer is not draining), new tags for it are dropped and the
viewer waits for the next keyframe, so it resumes on a decodable frame; a viewer that stays
stalled past ``stall_timeout`` is disconnected.  Neither can delay other viewers or grow memory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from watchbuy.engine.amf_types import ECMAArray
from watchbuy.engine.codecs import amf, chunk, flvmux, fmp4
from watchbuy.engine.rates import RateWindow
from watchbuy.engine.wire import (
    CSID_AUDIO,
    CSID_DATA,
    CSID_VIDEO,
    MSG_AUDIO,
    MSG_DATA_AMF0,
    MSG_VIDEO,
    PLAY_STREAM_ID,
)
from watchbuy.settings import Settings

if TYPE_CHECKING:
    from watchbuy.engine.hls import HlsStream
    from watchbuy.engine.record import Recording
    from watchbuy.engine.session import ViewerSession

log = logging.getLogger("watchbuy.engine.relay")

# After a takeover the new session's clock starts over: its first message is placed this long
# after the newest one so far (one frame at 30 fps), so timestamps only go forward.
NOMINAL_FRAME_MS = 33


# The viewer kind of a sibling worker's pull of a stream (engine/interworker.py): on the
# publishing worker it is fed like a viewer, but it is none to the outside.
WORKER_KIND = "worker"


def _setting_default(name: str):
    """The default of :class:`~watchbuy.settings.Settings` field ``name``: the one place the
    relay's bounds are defaulted (``WATCHBUY_<NAME>`` overrides them)."""
    return Settings.__dataclass_fields__[name].default


@dataclass
class RelayLimits:
    """Bounds that keep one stream or one viewer from eating the node.

    Each field is the node setting of the same name; the defaults are the settings' own.
    """

    gop_max_frames: int = _setting_default("gop_max_frames")
    gop_max_bytes: int = _setting_default("gop_max_bytes")
    viewer_queue_bytes: int = _setting_default("viewer_queue_bytes")
    stall_timeout: float = _setting_default("stall_timeout")
    out_chunk_size: int = _setting_default("out_chunk_size")
    metadata_max_fields: int = _setting_default("metadata_max_fields")
    metadata_max_bytes: int = _setting_default("metadata_max_bytes")

    @classmethod
    def from_settings(cls, settings: Settings) -> RelayLimits:
        """The limits a node with ``settings`` applies."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


# onMetaData fields that describe a file, not a live stream: a player given them shows a fixed
# length or reports an incomplete download (ffmpeg -t writes them).  SRS strips them too.
FILE_ONLY_METADATA = ("duration", "filesize")


def short(value: object, limit: int = 80) -> str:
    """A peer-supplied value for a log line or a reply, never longer than about ``limit``.

    Peers choose these values; a log line or an error reply must not grow with what they send,
    and a non-string (a nested object, say) is named by its type only.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value[: limit + 1]).decode("latin-1")
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"
    if len(value) > limit:
        return repr(value[:limit]) + f"...({len(value)} chars)"
    return repr(value)


class Tag:
    """One media message, encoded lazily and at most once per output format."""

    __slots__ = ("type_id", "timestamp", "payload", "keyframe", "_flv", "_rtmp", "_chunk_size")

    def __init__(self, type_id: int, timestamp: int, payload: bytes, keyframe: bool) -> None:
        self.type_id = type_id
        self.timestamp = timestamp
        self.payload = payload
        self.keyframe = keyframe  # a point a viewer may start from
        self._flv: bytes | None = None
        self._rtmp: bytes | None = None
        self._chunk_size = 0

    @property
    def flv(self) -> bytes:
        if self._flv is None:
            self._flv = flvmux.flv_tag(self.type_id, self.timestamp, self.payload)
        return self._flv

    def rtmp(self, chunk_size: int) -> bytes:
        if self._rtmp is None or self._chunk_size != chunk_size:
            csid = (
                CSID_VIDEO
                if self.type_id == MSG_VIDEO
                else CSID_AUDIO
                if self.type_id == MSG_AUDIO
                else CSID_DATA
            )
            self._rtmp = chunk.encode_message(
                chunk_size, csid, self.timestamp, self.type_id, PLAY_STREAM_ID, self.payload
            )
            self._chunk_size = chunk_size
        return self._rtmp


class Viewer:
    """Base of HTTP-FLV and RTMP viewers: bounded queue, keyframe resync, stall cut-off.

    Subclasses say how a batch of tags becomes bytes (:meth:`encode`) and how a stream starts
    and ends for their protocol.
    """

    kind = "viewer"

    def __init__(self, session: ViewerSession) -> None:
        self.session = session
        self.transport = transport = session.transport
        self.limits = limits = session.node.limits
        self.on_bytes = session.count_out
        self.stats = stats = session.node.stats
        stats.viewers_started[self.kind] += 1
        self.paused_since: float | None = None
        self.waiting_keyframe = False
        self.closed = False
        self.tags_sent = 0
        self.tags_dropped = 0
        self.started = time.monotonic()
        try:
            transport.set_write_buffer_limits(high=limits.viewer_queue_bytes)
        except (AttributeError, NotImplementedError):  # pragma: no cover - every loop has it
            pass

    # -- what subclasses provide ------------------------------------------------------------
    def encode(self, tags: list[Tag]) -> list[bytes]:
        raise NotImplementedError

    def start(self, stream: LiveStream) -> None:
        """Send what a new viewer needs before the live tags: headers and the GOP."""
        raise NotImplementedError

    def end(self) -> None:
        """The publisher stopped: this viewer gets nothing more, and its session says so to
        its player in its protocol's way."""
        self.closed = True
        self.session.stream_ended(self)

    # -- flow control, called by the protocol that owns the transport ------------------------
    def pause_writing(self) -> None:
        if self.paused_since is None:
            self.paused_since = time.monotonic()

    def resume_writing(self) -> None:
        self.paused_since = None

    def close(self) -> None:
        self.closed = True

    def encoding_key(self) -> object:
        """Viewers with equal keys get byte-identical encodings of a batch, so the batch is
        encoded (framing included) and measured once for all of them."""
        return id(self)

    def deliver(self, tags: list[Tag], shared: dict | None = None) -> None:
        """Give this viewer one batch (one publisher read) in a single merged write.

        ``shared`` caches the batch's encodings by :meth:`encoding_key` across the viewers of
        one flush; a viewer resyncing on a keyframe encodes its own slice instead.
        """
        if self.closed:
            return
        if self.paused_since is not None:
            self.tags_dropped += len(tags)
            self.stats.tags_dropped += len(tags)
            if not self.waiting_keyframe:
                self.waiting_keyframe = True
                self.stats.keyframe_resyncs += 1
            if time.monotonic() - self.paused_since > self.limits.stall_timeout:
                log.info("%s %s stalled for %.0f s: disconnecting", self.kind,
                         self.peer(), self.limits.stall_timeout, extra=self.session.log.extra)
                self.stats.viewers_cut_off += 1
                self.closed = True
                self.transport.abort()
            return
        if self.waiting_keyframe:
            for index, tag in enumerate(tags):
                if tag.keyframe:
                    self.tags_dropped += index
                    self.stats.tags_dropped += index
                    tags = tags[index:]
                    self.waiting_keyframe = False
                    break
            else:
                self.tags_dropped += len(tags)
                self.stats.tags_dropped += len(tags)
                return
            self.write(self.encode(tags))
        elif shared is None:
            self.write(self.encode(tags))
        else:
            key = self.encoding_key()
            encoded = shared.get(key)
            if encoded is None:
                chunks = self.encode(tags)
                encoded = shared[key] = (chunks, sum(map(len, chunks)))
            self.write(*encoded)
        self.tags_sent += len(tags)

    def write(self, chunks: list[bytes], size: int | None = None) -> None:
        if not chunks:
            return
        self.transport.writelines(chunks)
        self.on_bytes(sum(map(len, chunks)) if size is None else size)

    def peer(self) -> str:
        try:
            host, port = self.transport.get_extra_info("peername")[:2]
            return f"{host}:{port}"
        except (TypeError, ValueError):
            return "?"


class LiveStream:
    """One live stream: its publisher's tags, the cached start-up data and its viewers."""

    def __init__(self, name: str, app: str, limits: RelayLimits, publisher: str = "") -> None:
        self.name = name
        self.app = app
        self.limits = limits
        self.publisher = publisher
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.owner: object = None  # the publishing session
        self.last_media_at = self.started_mono  # updated per publisher read, not per message
        self._media_seen = 0
        self._metadata_trim_logged = False
        self.metadata: dict = {}
        self.metadata_tag: Tag | None = None
        self.video_header: Tag | None = None
        self.audio_header: Tag | None = None
        self.gop: list[Tag] = []
        self.gop_bytes = 0
        self.viewers: set[Viewer] = set()
        self.pending: list[Tag] = []
        self.video_codec = ""
        self.audio_codec = ""
        self.has_video = False
        self.bytes_in = 0
        self.audio_bytes = 0  # of bytes_in: the rest is video (health shows both bitrates)
        self.video_frames = 0
        # Stream health (the studio's "keyframe every N s"): measured from the timestamps of
        # the keyframes themselves, not from what the encoder's metadata claims.
        self.last_keyframe_ts: int | None = None
        self.keyframe_interval_ms: int | None = None  # between the last two keyframes
        self.last_video_ts = 0
        self.video_size: tuple[int, int] | None = None  # from the SPS: what the encoder sends
        self._window = RateWindow()  # "in": (bytes in, video frames, audio bytes)
        # The stream's LL-HLS muxer (engine/hls_http.py sets it at publish when HLS is on):
        # fed here, once per message, whatever the number of viewers.
        self.hls: HlsStream | None = None
        # The recording of this publish (engine/record.py sets it when recording is on): given
        # each flushed batch after the viewers, written off the event loop.
        self.recording: Recording | None = None
        self.media_ms = 0  # the newest audio/video timestamp: where a cue point goes
        # Added to every timestamp the publisher sends: 0 until a takeover (handover), then
        # what keeps the new session's clock going on from the old one's, for every output
        # (viewers, LL-HLS, the recording, cue points) at once.
        self.ts_offset = 0
        self._rebase = False  # set by handover: the next message fixes ts_offset
        self._latest_ts = 0  # the newest (rebased) audio/video timestamp
        # The LL-HLS media sequence number to start at, when not the node's clock: a worker
        # pulling a sibling's stream numbers its segments as the publishing worker does.
        self.hls_first_msn: int | None = None

    def _rebased(self, timestamp: int) -> int:
        if self._rebase:
            self._rebase = False
            self.ts_offset = self._latest_ts + NOMINAL_FRAME_MS - timestamp
        return max(0, timestamp + self.ts_offset)

    # -- input from the publisher --------------------------------------------------------------
    def on_media(self, type_id: int, timestamp: int, payload: bytes) -> None:
        self.bytes_in += len(payload)
        timestamp = self._rebased(timestamp)
        self.media_ms = timestamp
        if timestamp > self._latest_ts:
            self._latest_ts = timestamp
        if type_id == MSG_VIDEO:
            codec, _frame_type, keyframe, sequence_header = flvmux.inspect_video(payload)
            if codec:
                self.video_codec = codec
                self.has_video = True
            tag = Tag(MSG_VIDEO, timestamp, payload, keyframe)
            if sequence_header:
                self.video_header = tag
                self.video_size = _picture_size(payload)
            else:
                self.video_frames += 1
                self.last_video_ts = timestamp
                if keyframe:
                    last = self.last_keyframe_ts
                    if last is not None and timestamp > last:
                        self.keyframe_interval_ms = timestamp - last
                    self.last_keyframe_ts = timestamp
                self._cache(tag, keyframe)
        elif type_id == MSG_AUDIO:
            self.audio_bytes += len(payload)
            codec, sequence_header = flvmux.inspect_audio(payload)
            if codec:
                self.audio_codec = codec
            # In an audio-only stream every audio frame is a fine place to start.
            tag = Tag(MSG_AUDIO, timestamp, payload, not self.has_video)
            if sequence_header:
                self.audio_header = tag
            else:
                self._cache(tag, False)
        else:
            return
        self.pending.append(tag)
        if self.hls is not None:
            try:
                self.hls.feed(type_id, timestamp, payload)
            except Exception as exc:  # a muxer bug must not cost the publisher or FLV viewers
                log.warning("stream %s: LL-HLS muxing failed, HLS off for this stream: %s: %s",
                            self.name, type(exc).__name__, exc)
                self.hls.end()
                self.hls = None

    def on_metadata(self, values: list) -> None:
        """``@setDataFrame onMetaData {...}`` from the publisher: keep it for late joiners."""
        if values and values[0] == "@setDataFrame":
            values = values[1:]
        if len(values) < 2 or values[0] != "onMetaData" or not isinstance(values[1], dict):
            return
        self.metadata, skipped = live_metadata(
            values[1], self.limits.metadata_max_fields, self.limits.metadata_max_bytes)
        if skipped and not self._metadata_trim_logged:
            self._metadata_trim_logged = True  # publishers may resend metadata at any rate
            log.info("stream %s: publisher metadata trimmed: %d fields not kept (nested, too "
                     "long or past WATCHBUY_METADATA_MAX_FIELDS/_BYTES)", self.name, skipped)
        if self.hls is not None:
            self.hls.on_metadata(self.metadata)
        self.metadata["server"] = "WatchBuy"
        payload = amf.encode_amf0("onMetaData", ECMAArray(self.metadata))
        self.metadata_tag = Tag(MSG_DATA_AMF0, 0, payload, False)
        if self.viewers:
            # a late joiner gets it first (at 0); live it goes at the stream's current time,
            # never back to 0 (a publisher resends it mid-stream, a new session always does)
            self.pending.append(Tag(MSG_DATA_AMF0, self.media_ms, payload, False)
                                if self.media_ms else self.metadata_tag)

    def on_data(self, timestamp: int, payload: bytes) -> None:
        """Other script data (cue points, captions): relayed as is."""
        self.pending.append(Tag(MSG_DATA_AMF0, self._rebased(timestamp), payload, False))

    def _cache(self, tag: Tag, keyframe: bool) -> None:
        limits = self.limits
        if keyframe:
            self.gop = [tag]
            self.gop_bytes = len(tag.payload)
            return
        if not self.gop:
            return
        if len(self.gop) >= limits.gop_max_frames or \
                self.gop_bytes + len(tag.payload) > limits.gop_max_bytes:
            # Too long a GOP to hold: late joiners wait for the next keyframe instead.
            self.gop = []
            self.gop_bytes = 0
            return
        self.gop.append(tag)
        self.gop_bytes += len(tag.payload)

    def flush(self) -> None:
        """Send the tags gathered from one publisher read to every viewer, one write each."""
        tags = self.pending
        if not tags:
            return
        self.pending = []
        if self.bytes_in != self._media_seen:  # once per publisher read: the silence clock
            self._media_seen = self.bytes_in
            self.last_media_at = time.monotonic()
        shared: dict = {}
        for viewer in tuple(self.viewers):
            viewer.deliver(tags, shared)
            if viewer.closed:
                self.viewers.discard(viewer)
        if self.recording is not None:
            self.recording.add(tags)

    def insert_cue(self, payload_at: Callable[[int], bytes]) -> int:
        """Put a script-data message (``payload_at(timestamp)``, a cue point) into the stream
        at the newest media timestamp, to every viewer and the recording; that timestamp."""
        timestamp = self.media_ms
        self.pending.append(Tag(MSG_DATA_AMF0, timestamp, payload_at(timestamp), False))
        self.flush()
        return timestamp

    # -- viewers ---------------------------------------------------------------------------
    def startup_tags(self) -> list[Tag]:
        """What a late joiner gets at once: metadata, sequence headers, the GOP so far."""
        tags = [t for t in (self.metadata_tag, self.video_header, self.audio_header) if t]
        if self.has_video:
            tags.extend(self.gop)
        return tags

    def add_viewer(self, viewer: Viewer) -> None:
        self.viewers.add(viewer)
        viewer.start(self)
        if self.has_video and not self.gop:
            viewer.waiting_keyframe = True

    def remove_viewer(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)

    def handover(self, owner: object, publisher: str) -> None:
        """A new session of the same publisher (its key) continues this stream after the old
        one went silent, as OBS does when it reconnects.  Viewers stay attached; the new
        publisher's sequence headers and first keyframe replace the old ones as they come, and
        late joiners get no GOP from the old session.  The new session's clock starts over:
        its first message fixes an offset that puts it one frame after the newest timestamp
        so far, so the stream's timestamps never go back (viewers, the recording and its
        remux, LL-HLS, cue points' media_ms)."""
        self.owner = owner
        self.publisher = publisher
        self.gop = []
        self.gop_bytes = 0
        self.pending = []
        self.last_media_at = time.monotonic()
        self.last_keyframe_ts = None  # the new session's clock: intervals start over
        self.keyframe_interval_ms = None
        self._rebase = True

    def end(self) -> None:
        for viewer in tuple(self.viewers):
            try:
                viewer.end()
            except Exception:  # a broken viewer must not keep the others from ending
                log.exception("ending viewer %s", viewer.peer())
        self.viewers.clear()

    # -- stats -----------------------------------------------------------------------------
    def sample(self, now: float) -> None:
        self._window.add(now, {"in": (self.bytes_in, self.video_frames, self.audio_bytes)})

    def rates(self) -> tuple[float, float]:
        """(bits per second in, video frames per second) over the sampling window."""
        bytes_per_s, fps, _ = self._window.rate("in", 3)
        return bytes_per_s * 8, fps

    def keyframe_interval(self) -> float | None:
        """Seconds between keyframes: the last measured interval, or the time since the last
        keyframe when that is longer already (a 10 s GOP shows before its second keyframe)."""
        if self.last_keyframe_ts is None:
            return None
        since = self.last_video_ts - self.last_keyframe_ts
        interval = max(self.keyframe_interval_ms or 0, since)
        return round(interval / 1000, 2) if interval > 0 else None

    def info(self) -> dict:
        bytes_per_s, fps, audio_per_s = self._window.rate("in", 3)
        bitrate = bytes_per_s * 8
        meta = self.metadata
        return {
            "name": self.name,
            "app": self.app,
            "video_codec": self.video_codec,
            "audio_codec": self.audio_codec,
            "width": self.video_size[0] if self.video_size else _int(meta.get("width")),
            "height": self.video_size[1] if self.video_size else _int(meta.get("height")),
            "fps": round(fps, 2) if fps else _float(meta.get("framerate")),
            "bitrate_in": int(bitrate),
            "video_bitrate": int((bytes_per_s - audio_per_s) * 8),
            "audio_bitrate": int(audio_per_s * 8),
            "keyframe_interval": self.keyframe_interval(),
            "has_audio": bool(self.audio_codec or self.audio_header),
            "viewers": len(self.viewers),
            "viewers_by_kind": _count_kinds(self.viewers),
            "uptime": round(time.monotonic() - self.started_mono, 1),
            "started_at": self.started_at,
            "publisher": self.publisher,
        }


def live_metadata(source: dict, max_fields: int, max_bytes: int) -> tuple[dict, int]:
    """The publisher's onMetaData fields we keep and pass on, and how many we left out.

    Only scalars (numbers, booleans, strings) are kept, within ``max_fields`` fields and
    ``max_bytes`` of keys and strings, so what a publisher sends cannot grow what every late
    joiner is sent; the file-only fields (duration, filesize) are dropped for live viewers.
    """
    kept: dict = {}
    size = 0
    skipped = 0
    for key, value in source.items():
        if key in FILE_ONLY_METADATA:
            continue
        if isinstance(value, str):
            cost = len(key) + len(value)
        elif isinstance(value, (bool, int, float)):
            cost = len(key) + 8
        else:
            skipped += 1
            continue
        if len(kept) >= max_fields or size + cost > max_bytes:
            skipped += 1
            continue
        kept[key] = value
        size += cost
    return kept, skipped


def _picture_size(sequence_header: bytes) -> tuple[int, int] | None:
    """The picture size in a video sequence header's parameter sets (once per header, not per
    frame); None when it cannot be read, and the publisher's metadata is shown instead."""
    try:
        track = fmp4.video_track(sequence_header)
    except Exception:  # noqa: BLE001 - shown to the host only: never cost the publisher
        return None
    return (track.width, track.height) if track.width and track.height else None


def _float(value) -> float | None:
    """A finite number from a metadata value, or None: the stats API must stay valid JSON,
    which has no Infinity or NaN."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return round(number, 2) if math.isfinite(number) else None


def _int(value) -> int | None:
    number = _float(value)
    return int(number) if number is not None else None


def _count_kinds(viewers: Iterable[Viewer]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for viewer in viewers:
        counts[viewer.kind] = counts.get(viewer.kind, 0) + 1
    return counts


class StreamRegistry:
    """The live streams of a node, by name, plus RTMP players waiting for a name to go live."""

    def __init__(self, limits: RelayLimits) -> None:
        self.limits = limits
        self.streams: dict[str, LiveStream] = {}
        self.waiting: dict[str, set] = {}  # name -> sessions of RTMP players waiting for it
        self.listeners: list[Callable[[str, LiveStream], None]] = []

    def get(self, name: str) -> LiveStream | None:
        return self.streams.get(name)

    def start(self, name: str, app: str, publisher: str = "",
              hls_first_msn: int | None = None) -> LiveStream | None:
        """A new live stream, or None when ``name`` is live already."""
        if name in self.streams:
            return None
        stream = LiveStream(name, app, self.limits, publisher)
        stream.hls_first_msn = hls_first_msn
        self.streams[name] = stream
        for session in tuple(self.waiting.pop(name, ())):
            session.stream_started(stream)
        self._notify("publish", stream)
        return stream

    def stop(self, stream: LiveStream) -> None:
        if self.streams.get(stream.name) is stream:
            del self.streams[stream.name]
        stream.end()
        self._notify("publish_done", stream)

    def wait_for(self, name: str, session) -> None:
        self.waiting.setdefault(name, set()).add(session)

    def stop_waiting(self, name: str, session) -> None:
        waiters = self.waiting.get(name)
        if waiters is not None:
            waiters.discard(session)
            if not waiters:
                del self.waiting[name]

    def _notify(self, event: str, stream: LiveStream) -> None:
        for listener in self.listeners:
            try:
                listener(event, stream)
            except Exception:
                log.exception("stream listener failed on %s", event)

    def viewer_count(self) -> int:
        return sum(len(s.viewers) for s in self.streams.values())
