"""Low-Latency HLS (RFC 8216bis) for one live stream, from memory, without sockets.

:class:`HlsStream` is fed the relay's media as it arrives (``feed(type_id, timestamp_ms,
payload)``, sequence headers included) and keeps a bounded window of CMAF segments made of
parts, muxed by the fMP4 codec (``codecs.fmp4``):

* A segment starts on a keyframe: the first keyframe at least ``segment_target`` after the
  segment's start (less 50 ms of timestamp jitter), so segments follow the publisher's GOP.  A
  publisher that sends no keyframe for ``max_segment_seconds`` gets a segment cut without one
  (logged), so memory and TARGETDURATION stay bounded.
* Parts hold whole frames and last at most ``part_target``: a frame joins the current part only
  if the part still ends within the target once the frame's duration is known, i.e. when the
  next frame arrives; so every sample's duration is exact and a part is published one frame
  after its last frame.  A part that starts on a keyframe is ``INDEPENDENT=YES``.  Audio goes
  into the part being cut when its own successor has arrived (exact durations again).
* ``EXT-X-PROGRAM-DATE-TIME`` on every segment: the wall clock at the first keyframe plus media
  time.
* EXT-X-TARGETDURATION is the segment target, raised (never lowered) to the longest segment
  rounded to the nearest second, the spec's rule, so a 2.001 s segment keeps a target of 2.
* The playlist lists ``window_segments`` complete segments plus the one in progress; parts are
  listed (and kept in memory) for segments less than three target durations from the end, as
  the spec asks; older segments are served whole (their parts joined once, then dropped).
* A sequence header that changes mid-stream (new resolution or codec, audio appearing) takes
  effect at the next keyframe: a new init segment (``init1.mp4`` …), an ``EXT-X-DISCONTINUITY``
  and an ``EXT-X-MAP`` before that segment.
* Blocking playlist reload: :meth:`HlsStream.playlist` answers at once, says "wait" (None) or
  raises :class:`BadRequest` (an ``_HLS_msn`` more than two segments past the last one, an
  ``_HLS_part`` past the Advance Part Limit, ``_HLS_part`` without ``_HLS_msn``).
  :meth:`HlsStream.add_waiter` / :meth:`HlsStream.wait` register interest in (msn, part);
  waiters are answered as soon as that part (or a later one) exists, and all of them when the
  stream ends.  The same rule serves blocking part requests (a preload-hinted part): when the
  waiter fires, the part exists, or it never will (the segment ended sooner: 404).

Wiring (phase 2, not done here):

* A listener on ``StreamRegistry.listeners`` creates an ``HlsStream`` per ``LiveStream`` on
  "start", forwards every ``on_media`` (and ``on_metadata``) to ``feed``/``on_metadata`` and
  calls ``end()`` on "stop"; the stream's HLS state lives as long as the LiveStream.
* HTTP routes on the node's HTTP-FLV server: ``/live/<name>/index.m3u8`` and the CDN form
  ``/<node-id>/live/<name>/index.m3u8``, with ``init.mp4`` (``init<n>.mp4``),
  ``seg<msn>.m4s`` and ``part<msn>.<i>.m4s`` beside them (:func:`parse_resource`).  Query
  ``_HLS_msn``/``_HLS_part``/``_HLS_skip=YES`` go to :meth:`HlsStream.playlist`; a None answer
  awaits :meth:`HlsStream.wait` (bounded by a timeout of about three target durations, then
  503), BadRequest answers 400.  A part request for the part named by the preload hint waits
  the same way, with (msn, index) as the key.
* Headers, per Apple's LL-HLS guidance: playlists ``application/vnd.apple.mpegurl``; a
  playlist without delivery directives ``Cache-Control: max-age=1`` at most (it must stay
  fresh), a blocking one (``_HLS_msn`` in the query, which CDNs must put in the cache key)
  ``max-age`` of six target durations: the answer to that query never changes.  Init, parts
  and segments ``video/mp4`` (``.m4s`` may be ``video/iso.segment``), ``max-age`` of a few
  minutes or more (immutable; their names are never reused within a stream); 404s ``max-age=1``
  at most.  ``Access-Control-Allow-Origin: *`` everywhere (hls.js fetches cross-origin via
  the CDN).

Limits (:class:`HlsConfig`) are meant to become ``Settings`` fields (``WATCHBUY_HLS_*``) when
this is wired in.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from watchbuy.engine.codecs import flvmux, fmp4
from watchbuy.engine.errors import FLVError

log = logging.getLogger(__name__)

TAG_AUDIO = 8
TAG_VIDEO = 9

# Keyframe timestamps jitter by a millisecond or two (ms rounding of 30000/1001 fps and the
# like): a keyframe this close to the segment target still starts a new segment, so a 2 s GOP
# gives 2 s segments rather than 4 s ones.
KEYFRAME_TOLERANCE_MS = 50
# With no video tag and no video header after this many audio frames, the stream is audio-only.
AUDIO_ONLY_AFTER_FRAMES = 10
# How long the very last frame lasts when there is no frame before it to go by.
NOMINAL_FRAME_MS = 33


@dataclass(frozen=True)
class HlsConfig:
    """Knobs of one stream's LL-HLS output (to become ``WATCHBUY_HLS_*`` settings)."""

    part_target: float = 0.334  # seconds; 10 frames at 30 fps, 8 at 25, 20 at 60
    segment_target: float = 2.0  # seconds; segments follow the GOP from here on
    window_segments: int = 10  # complete segments in the playlist and in memory
    max_segment_seconds: float = 10.0  # cut a segment without a keyframe after this long
    max_pending_audio: int = 512  # audio frames waiting for video (~12 s of AAC at 44.1 kHz)

    def check(self) -> None:
        if not 0.1 <= self.part_target <= 2.0:
            raise ValueError(f"part_target {self.part_target} s is outside 0.1..2")
        if not self.part_target * 2 <= self.segment_target <= 10:
            raise ValueError(
                f"segment_target {self.segment_target} s must be 2 part targets .. 10 s"
            )
        if not 3 <= self.window_segments <= 100:
            raise ValueError(f"window_segments {self.window_segments} is outside 3..100")
        if self.max_segment_seconds < self.segment_target:
            raise ValueError("max_segment_seconds must be at least segment_target")
        if self.max_pending_audio < 16:
            raise ValueError("max_pending_audio must be at least 16")


class BadRequest(Exception):
    """A playlist request the spec says to refuse with 400."""


class Part:
    __slots__ = ("index", "start", "duration", "independent", "data")

    def __init__(self, index: int, start: int, duration: int, independent: bool, data: bytes):
        self.index = index
        self.start = start  # ms, FLV time
        self.duration = duration  # ms
        self.independent = independent
        self.data = data


class Segment:
    __slots__ = ("msn", "start", "end", "parts", "parts_dropped", "data", "pdt", "init",
                 "discontinuity")  # fmt: skip

    def __init__(self, msn: int, start: int, pdt: float, init: int, discontinuity: bool):
        self.msn = msn
        self.start = start  # ms
        self.end: int | None = None  # ms, once complete
        self.parts: list[Part] = []
        self.parts_dropped = False  # parts joined into ``data`` and forgotten
        self.data: bytes | None = None  # the whole segment, joined on first request
        self.pdt = pdt  # wall-clock time of the first sample
        self.init = init  # which init segment (0: init.mp4, n: init<n>.mp4)
        self.discontinuity = discontinuity

    @property
    def complete(self) -> bool:
        return self.end is not None

    @property
    def duration(self) -> int:
        if self.end is not None:
            return self.end - self.start
        return sum(p.duration for p in self.parts)


def init_name(n: int) -> str:
    return "init.mp4" if n == 0 else f"init{n}.mp4"


def segment_name(msn: int) -> str:
    return f"seg{msn}.m4s"


def part_name(msn: int, index: int) -> str:
    return f"part{msn}.{index}.m4s"


_RESOURCE = re.compile(
    r"(?:init([1-9]\d{0,8})?\.mp4|seg(0|[1-9]\d{0,17})\.m4s"
    r"|part(0|[1-9]\d{0,17})\.(0|[1-9]\d{0,5})\.m4s)",
    re.ASCII,  # \d: ASCII digits only, so one resource has one name (and one CDN cache key)
)


def parse_resource(name: str) -> tuple[str, int, int] | None:
    """``("init", n, 0)``, ``("segment", msn, 0)`` or ``("part", msn, index)`` for a resource
    name, None for anything else."""
    m = _RESOURCE.fullmatch(name)
    if m is None:
        return None
    init, seg, part_msn, part_index = m.groups()
    if seg is not None:
        return ("segment", int(seg), 0)
    if part_msn is not None:
        return ("part", int(part_msn), int(part_index))
    return ("init", int(init) if init else 0, 0)


def _coded_video(payload: bytes) -> bool:
    """Whether a video payload carries coded frames the muxer takes (not a sequence end,
    metadata, a command or multitrack); the muxer still checks the rest."""
    if len(payload) < 2:
        return False
    b0 = payload[0]
    if not b0 & 0x80:
        return b0 & 0x0F in (7, 12, 13) and payload[1] == 1
    return b0 & 0x0F in (1, 3, 7) and (b0 >> 4) & 0x07 != 5


def _rounded_seconds(segment: Segment) -> int:
    """A segment's duration rounded to the nearest second: what the spec compares with
    EXT-X-TARGETDURATION (so a 2.001 s segment keeps a target of 2)."""
    return (segment.duration + 500) // 1000


def _format_pdt(when: float) -> str:
    stamp = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


class _Sample:
    __slots__ = ("ts", "payload", "key")

    def __init__(self, ts: int, payload: bytes, key: bool) -> None:
        self.ts = ts
        self.payload = payload
        self.key = key


class HlsStream:
    """LL-HLS state of one live stream: feed it media, ask it for playlists and resources."""

    def __init__(
        self,
        name: str = "",
        config: HlsConfig | None = None,
        clock: Callable[[], float] = time.time,
        first_msn: int = 0,
    ) -> None:
        self.name = name
        # A node starts each publish of a name at a new MSN, so a CDN never serves a part or
        # a blocking playlist cached from an earlier publish of the same name.
        self.first_msn = first_msn
        self.config = config or HlsConfig()
        self.config.check()
        self._clock = clock
        self._part_ms = round(self.config.part_target * 1000)
        self._segment_ms = round(self.config.segment_target * 1000)
        self._max_segment_ms = round(self.config.max_segment_seconds * 1000)

        # Sequence headers as last seen, and the ones the current muxer was built from.
        self._video_header: bytes | None = None
        self._audio_header: bytes | None = None
        self._saw_video = False
        self._metadata_size = (0, 0)
        self._muxer_headers: tuple[bytes | None, bytes | None] = (None, None)
        self._muxer = None
        self._drives_video = True  # parts and segments are cut on the video track
        self._inits: dict[int, bytes] = {}
        self._init_id = -1
        self._config_changed = False

        self.segments: list[Segment] = []  # the window, oldest first; the last may be open
        self._discontinuity_sequence = 0
        self._t0 = 0  # ms of the first keyframe, the stream's media-time origin
        self._wall0 = 0.0
        self._started = False
        self.ended = False
        self._target_duration = max(1, math.ceil(self.config.segment_target))

        self._pending: _Sample | None = None  # last driver sample, its duration unknown yet
        self._last_duration = 0  # ms, of the driver sample before it
        self._part: list[_Sample] = []  # driver samples of the part being filled
        self._part_start = 0
        self._audio: list[_Sample] = []  # audio waiting for a part (video-driven streams)
        self._last_audio_ts = -1
        self._stall_logged = False
        self._fragment_seq = 0

        # Blocking requests: (msn, part, id, callback) heaps for parts and whole segments.
        self._part_waiters: list[tuple[int, int, int, Callable[[], None]]] = []
        self._segment_waiters: list[tuple[int, int, int, Callable[[], None]]] = []
        self._waiter_ids = itertools.count()
        self._playlist_cache: dict[bool, str] = {}
        self.dropped_samples = 0
        self.bad_samples = 0
        self.forced_cuts = 0

    # -- input ---------------------------------------------------------------------------------
    def on_metadata(self, metadata: dict) -> None:
        """onMetaData's width/height: used when the SPS cannot be parsed."""
        try:
            self._metadata_size = (int(metadata.get("width") or 0),
                                   int(metadata.get("height") or 0))  # fmt: skip
        except (TypeError, ValueError, OverflowError):
            self._metadata_size = (0, 0)

    def feed(self, type_id: int, timestamp: int, payload: bytes) -> None:
        """One media message from the publisher (sequence headers included), on the stream's
        clock (after a takeover the relay has rebased the new session's timestamps)."""
        if self.ended:
            return
        if type_id == TAG_VIDEO:
            self._saw_video = True
            _codec, _frame_type, key, seq = flvmux.inspect_video(payload)
            if seq:
                self._header(True, payload)
            elif self._drives_video and _coded_video(payload):
                self._driver_sample(timestamp, payload, key)
        elif type_id == TAG_AUDIO:
            codec, seq = flvmux.inspect_audio(payload)
            if seq:
                self._header(False, payload)
            elif codec == "aac":
                self._audio_sample(timestamp, payload)

    def _header(self, video: bool, payload: bytes) -> None:
        if video:
            self._video_header = payload
        else:
            self._audio_header = payload
        if self._started and (self._video_header, self._audio_header) != self._muxer_headers:
            # Takes effect at the next keyframe, with a discontinuity.
            self._config_changed = True

    def _new_muxer(self) -> bool:
        """A muxer for the current headers; False (logged) when they cannot be used."""
        video = audio = None
        if self._video_header is not None:
            try:
                video = fmp4.video_track(self._video_header)
            except FLVError as exc:
                w, h = self._metadata_size
                try:
                    video = fmp4.video_track(self._video_header, w, h) if w and h else None
                except FLVError:
                    video = None
                if video is None:
                    log.warning("hls %s: unusable video sequence header: %s", self.name, exc)
                    return False
        if self._audio_header is not None:
            try:
                audio = fmp4.audio_track(self._audio_header)
            except FLVError as exc:
                log.warning("hls %s: unusable audio sequence header: %s", self.name, exc)
        if video is None and audio is None:
            return False
        if self._started and (video is not None) != self._drives_video:
            # Video appearing in an audio-only stream (or vanishing): the track that cuts the
            # segments would change, which a live playlist cannot follow.
            log.warning("hls %s: the stream's tracks changed; HLS output ends", self.name)
            self.end()
            return False
        self._muxer = fmp4.Muxer(video, audio)
        self._drives_video = video is not None
        self._muxer_headers = (self._video_header, self._audio_header)
        self._init_id += 1
        self._inits[self._init_id] = self._muxer.init_segment()
        return True

    def _audio_sample(self, ts: int, payload: bytes) -> None:
        if not self._drives_video:
            self._driver_sample(ts, payload, True)
            return
        if ts < self._last_audio_ts:
            self._drop("audio timestamp went backwards")
            return
        self._last_audio_ts = ts
        self._audio.append(_Sample(ts, payload, True))
        if not self._started and not self._saw_video and self._video_header is None \
                and len(self._audio) >= AUDIO_ONLY_AFTER_FRAMES:
            # No video at all so far: an audio-only stream, cut on the audio frames.
            queued = self._audio
            self._audio = []
            self._drives_video = False
            for sample in queued:
                self._driver_sample(sample.ts, sample.payload, True)
            return
        if len(self._audio) > self.config.max_pending_audio:
            # Video stalled while audio flows: keep the newest half; one line per stall.
            excess = len(self._audio) - self.config.max_pending_audio // 2
            del self._audio[:excess]
            self.dropped_samples += excess
            if not self._stall_logged:
                self._stall_logged = True
                log.warning("hls %s: video stalled, audio frames without video dropped "
                            "(max_pending_audio=%d)", self.name, self.config.max_pending_audio)

    def _drop(self, why: str) -> None:
        self.dropped_samples += 1
        # One line for the first and then every 1000th: a broken clock must not flood the log.
        if self.dropped_samples == 1 or self.dropped_samples % 1000 == 0:
            log.warning("hls %s: sample dropped (%s), %d so far", self.name, why,
                        self.dropped_samples)  # fmt: skip

    def _start(self, ts: int) -> bool:
        if not self._new_muxer():
            return False
        self._started = True
        self._t0 = ts
        self._wall0 = self._clock()
        self._open_segment(ts, discontinuity=False)
        return True

    def _driver_sample(self, ts: int, payload: bytes, key: bool) -> None:
        if not self._started:
            if not key or not self._start(ts):
                return
            self._audio = [a for a in self._audio if a.ts >= ts]
            self._pending = _Sample(ts, payload, key)
            return
        pending = self._pending
        assert pending is not None
        if ts < pending.ts:
            self._drop("timestamp went backwards")
            return
        # The pending sample now has its duration: it joins the current part if the part
        # still fits the target with it, else the part closes before it.
        if self._part and ts - self._part_start > self._part_ms:
            self._close_part(pending.ts)
        if not self._part:
            self._part_start = pending.ts
        self._part.append(pending)
        self._last_duration = ts - pending.ts
        self._pending = _Sample(ts, payload, key)

        segment = self.segments[-1]
        elapsed = ts - segment.start
        if key and (self._config_changed or elapsed >= self._segment_ms - KEYFRAME_TOLERANCE_MS):
            self._cut_segment(ts)
        elif elapsed >= self._max_segment_ms:
            self.forced_cuts += 1
            log.warning("hls %s: no keyframe for %d ms, segment cut without one", self.name,
                        elapsed)  # fmt: skip
            self._cut_segment(ts)

    def _cut_segment(self, ts: int) -> None:
        self._close_part(ts)
        segment = self.segments[-1]
        segment.end = ts
        self._target_duration = max(self._target_duration, _rounded_seconds(segment))
        discontinuity = False
        if self._config_changed:
            self._config_changed = False  # one attempt per change, whatever its outcome
            old = self._init_id
            if self._new_muxer():
                discontinuity = self._init_id != old
            if self.ended:
                return
        self._open_segment(ts, discontinuity)
        self._trim()
        self._publish()

    def _open_segment(self, ts: int, discontinuity: bool) -> None:
        msn = self.segments[-1].msn + 1 if self.segments else self.first_msn
        pdt = self._wall0 + (ts - self._t0) / 1000
        self.segments.append(Segment(msn, ts, pdt, self._init_id, discontinuity))

    def _close_part(self, end: int, flush: bool = False) -> None:
        """Mux the gathered samples into the next part of the open segment, ending at ``end``
        (``flush``: the stream ends, take all the audio there is)."""
        if not self._part:
            return
        samples = self._part
        self._part = []
        self._stall_logged = False
        audio: list[_Sample] = []
        audio_end = -1
        if self._drives_video and self._muxer.audio is not None:
            if flush:
                audio, self._audio = self._audio, []
            else:
                # Audio frames whose successor has arrived and which start before the end.
                k = 0
                while k + 1 < len(self._audio) and self._audio[k].ts < end:
                    k += 1
                audio = self._audio[:k]
                del self._audio[:k]
                audio_end = self._audio[0].ts if audio else -1
        elif self._drives_video:
            self._audio.clear()  # no audio track in this init segment
        data = self._fragment(samples, audio, end, audio_end)
        if data is None:
            return
        segment = self.segments[-1]
        segment.parts.append(Part(len(segment.parts), self._part_start, end - self._part_start,
                                  samples[0].key, data))  # fmt: skip
        self._trim()
        self._publish()
    def _fragment(
        self, samples: list[_Sample], audio: list[_Sample], end: int, audio_end: int
    ) -> bytes | None:
        driver = [(s.ts, s.payload) for s in samples]
        other = [(s.ts, s.payload) for s in audio]
        video, sound = (driver, other) if self._drives_video else (other, driver)
        vend, aend = (end, audio_end) if self._drives_video else (audio_end, end)
        self._fragment_seq += 1
        try:
            return self._muxer.fragment(self._fragment_seq, video, sound, vend, aend)
        except FLVError as exc:
            # A malformed frame loses itself, not the part: mux again without the bad ones
            # (found one by one, only on this rare path).
            bad_video = [s for s in video if not self._muxes(s, True)]
            bad_sound = [s for s in sound if not self._muxes(s, False)]
            count = len(bad_video) + len(bad_sound)
            before = self.bad_samples
            self.bad_samples += count
            if before == 0 or before // 100 != self.bad_samples // 100:  # rate-limited
                log.warning("hls %s: %d malformed frames left out (%s), %d so far", self.name,
                            count, exc, self.bad_samples)  # fmt: skip
            video = [s for s in video if s not in bad_video]
            sound = [s for s in sound if s not in bad_sound]
            if not video and not sound:
                return None
            return self._muxer.fragment(self._fragment_seq, video, sound, vend, aend)

    def _muxes(self, sample: tuple[int, bytes], video: bool) -> bool:
        try:
            if video:
                self._muxer.fragment(0, [sample], [])
            else:
                self._muxer.fragment(0, [], [sample])
        except FLVError:
            return False
        return True

    def _trim(self) -> None:
        """Keep ``window_segments`` complete segments, and parts only near the end."""
        complete = sum(1 for s in self.segments if s.complete)
        excess = complete - self.config.window_segments
        if excess > 0:
            for segment in self.segments[:excess]:
                if segment.discontinuity:
                    self._discontinuity_sequence += 1
            del self.segments[:excess]
            used = {s.init for s in self.segments}
            for n in [n for n in self._inits if n not in used]:
                del self._inits[n]
        # The spec drops parts three target durations from the end of the playlist; their
        # bytes live on in the segment, joined once.
        horizon = self._playlist_end() - 3 * self._target_duration * 1000
        for segment in self.segments:
            if segment.complete and not segment.parts_dropped and segment.end < horizon:
                if segment.data is None:
                    segment.data = b"".join(p.data for p in segment.parts)
                segment.parts_dropped = True
                segment.parts = []

    def _playlist_end(self) -> int:
        if not self.segments:
            return 0
        last = self.segments[-1]
        return last.end if last.end is not None else last.start + last.duration

    def end(self) -> None:
        """The publisher left: flush what is pending, add ENDLIST, answer every waiter."""
        if self.ended:
            return
        pending = self._pending
        if self._started and pending is not None:
            self._pending = None
            # The last frame lasts as long as the one before it.
            end = pending.ts + (self._last_duration or NOMINAL_FRAME_MS)
            if self._part and end - self._part_start > self._part_ms:
                self._close_part(pending.ts)
            if not self._part:
                self._part_start = pending.ts
            self._part.append(pending)
            self._close_part(end, flush=True)
            segment = self.segments[-1]
            if segment.parts:
                segment.end = segment.parts[-1].start + segment.parts[-1].duration
                self._target_duration = max(self._target_duration, _rounded_seconds(segment))
            else:
                self.segments.pop()
        self.ended = True
        self._publish()

    # -- requests ------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """Whether there is a playlist to serve (the first part exists)."""
        return bool(self.segments and (self.segments[0].parts or self.segments[0].complete))

    def _last_part(self) -> tuple[int, int]:
        """(msn, index) of the newest published part; (-1, -1) before the first."""
        for segment in reversed(self.segments):
            if segment.parts:
                return segment.msn, len(segment.parts) - 1
        return -1, -1

    def _last_complete_msn(self) -> int:
        for segment in reversed(self.segments):
            if segment.complete:
                return segment.msn
        return -1

    def ready(self, msn: int, part: int | None = None) -> bool:
        """Whether a playlist holding segment ``msn`` (complete, when ``part`` is None) or its
        part ``part`` (or anything later) exists now."""
        if self.ended:
            return True
        if part is None:
            return msn <= self._last_complete_msn()
        return (msn, part) <= self._last_part()

    def advance_part_limit(self) -> int:
        t = self.config.part_target
        return math.ceil(3 / t) if t < 1 else 3

    def too_far(self, msn: int, part: int | None = None) -> bool:
        """The spec's 400 rule: ``_HLS_msn`` more than two past the last segment, or
        ``_HLS_part`` more than the Advance Part Limit past the last part."""
        # The last segment the playlist lists: a segment just opened has no line in it yet.
        last_msn = max(self._last_part()[0], self._last_complete_msn(), self.first_msn)
        if msn > last_msn + 2:
            return True
        if part is None:
            return False
        limit = self.advance_part_limit()
        cur_msn, cur_part = self._last_part()
        if msn == cur_msn:
            return part - cur_part > limit
        if msn > cur_msn:
            # At least part + 1 parts past the last one, whatever the current segment holds.
            return part + 1 > limit
        return False

    def playlist(self, msn: int | None = None, part: int | None = None,
                 skip: bool = False) -> str | None:  # fmt: skip
        """The media playlist, or None when a blocking request must wait (see ``wait``).

        Raises BadRequest for requests the spec answers with 400.
        """
        if part is not None and msn is None:
            raise BadRequest("_HLS_part without _HLS_msn")
        if (msn is not None and msn < 0) or (part is not None and part < 0):
            raise BadRequest("negative _HLS_msn or _HLS_part")
        if msn is not None:
            if not self.ended and self.too_far(msn, part):
                raise BadRequest(f"_HLS_msn={msn} _HLS_part={part} is too far ahead")
            if not self.ready(msn, part):
                return None
        if not self.available:
            return None
        skip = skip and self.can_skip_until() > 0
        text = self._playlist_cache.get(skip)
        if text is None:
            text = self._render(skip)
            self._playlist_cache[skip] = text
        return text

    def can_skip_until(self) -> float:
        """CAN-SKIP-UNTIL in seconds (six target durations), or 0 while the playlist is too
        short for delta updates to save anything."""
        until = 6 * self._target_duration
        listed = sum(s.duration for s in self.segments if s.complete) / 1000
        return until if listed > until else 0

    def _render(self, skip: bool) -> str:
        cfg = self.config
        skip_until = self.can_skip_until()
        lines = [
            "#EXTM3U",
            f"#EXT-X-VERSION:{9 if skip_until else 6}",
            f"#EXT-X-TARGETDURATION:{self._target_duration}",
        ]
        control = f"#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK={3 * cfg.part_target:.3f}"
        if skip_until:
            control += f",CAN-SKIP-UNTIL={skip_until:.1f}"
        lines.append(control)
        lines.append(f"#EXT-X-PART-INF:PART-TARGET={cfg.part_target:.3f}")
        segments = self.segments
        lines.append(f"#EXT-X-MEDIA-SEQUENCE:{segments[0].msn}")
        if self._discontinuity_sequence:
            lines.append(f"#EXT-X-DISCONTINUITY-SEQUENCE:{self._discontinuity_sequence}")
        skipped = 0
        if skip:
            end = self._playlist_end()
            while (skipped < len(segments) and segments[skipped].complete
                   and end - segments[skipped].start > skip_until * 1000):  # fmt: skip
                skipped += 1
        first = segments[skipped] if skipped < len(segments) else segments[-1]
        lines.append(f'#EXT-X-MAP:URI="{init_name(first.init)}"')
        if skipped:
            lines.append(f"#EXT-X-SKIP:SKIPPED-SEGMENTS={skipped}")
        current_init = first.init
        for segment in segments[skipped:]:
            if not segment.parts and not segment.complete:
                continue  # just opened: nothing to list yet (the preload hint names it)
            if segment.discontinuity:  # kept on the first segment too, until it leaves
                lines.append("#EXT-X-DISCONTINUITY")
            if segment.init != current_init:
                lines.append(f'#EXT-X-MAP:URI="{init_name(segment.init)}"')
                current_init = segment.init
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_format_pdt(segment.pdt)}")
            if not segment.parts_dropped:
                for p in segment.parts:
                    independent = ",INDEPENDENT=YES" if p.independent else ""
                    lines.append(f'#EXT-X-PART:DURATION={p.duration / 1000:.3f},'
                                 f'URI="{part_name(segment.msn, p.index)}"{independent}')  # fmt: skip
            if segment.complete:
                lines.append(f"#EXTINF:{segment.duration / 1000:.3f},")
                lines.append(segment_name(segment.msn))
        if self.ended:
            lines.append("#EXT-X-ENDLIST")
        else:
            last = segments[-1]
            lines.append(f'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="{part_name(last.msn, len(last.parts))}"')
        return "\n".join(lines) + "\n"

    # -- resources -----------------------------------------------------------------------------
    def init(self, n: int = 0) -> bytes | None:
        return self._inits.get(n)

    def _segment(self, msn: int) -> Segment | None:
        if not self.segments:
            return None
        i = msn - self.segments[0].msn
        return self.segments[i] if 0 <= i < len(self.segments) else None

    def part(self, msn: int, index: int) -> bytes | None:
        segment = self._segment(msn)
        if segment is None or segment.parts_dropped or not 0 <= index < len(segment.parts):
            return None
        return segment.parts[index].data

    def segment(self, msn: int) -> bytes | None:
        """A complete segment: its parts' fragments one after the other."""
        segment = self._segment(msn)
        if segment is None or not segment.complete:
            return None
        if segment.data is None:
            segment.data = b"".join(p.data for p in segment.parts)
        return segment.data

    def resource(self, name: str) -> bytes | None:
        what = parse_resource(name)
        if what is None:
            return None
        kind, a, b = what
        if kind == "init":
            return self.init(a)
        if kind == "segment":
            return self.segment(a)
        return self.part(a, b)

    # -- waiting -------------------------------------------------------------------------------
    def add_waiter(self, msn: int, part: int | None, callback: Callable[[], None]) -> bool:
        """Call ``callback`` once (msn, part) is ready (or the stream ended).  Returns False,
        without registering, when it is ready already."""
        if self.ready(msn, part):
            return False
        if part is None:
            heapq.heappush(self._segment_waiters, (msn, 0, next(self._waiter_ids), callback))
        else:
            heapq.heappush(self._part_waiters, (msn, part, next(self._waiter_ids), callback))
        return True

    def remove_waiter(self, callback: Callable[[], None]) -> None:
        for heap in (self._part_waiters, self._segment_waiters):
            kept = [w for w in heap if w[3] is not callback]
            if len(kept) != len(heap):
                heap[:] = kept
                heapq.heapify(heap)

    @property
    def waiter_count(self) -> int:
        return len(self._part_waiters) + len(self._segment_waiters)

    async def wait(self, msn: int, part: int | None = None, timeout: float | None = None) -> bool:
        """Wait until (msn, part) is ready (True) or ``timeout`` seconds pass (False)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        if not self.add_waiter(msn, part, wake):
            return True
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            if not (future.done() and not future.cancelled()):
                self.remove_waiter(wake)  # timed out or cancelled: forget it

    def _publish(self) -> None:
        """Something new exists: the playlist changes and ready waiters are answered."""
        self._playlist_cache.clear()
        due: list[Callable[[], None]] = []
        if self.ended:
            due = [w[3] for w in sorted(self._part_waiters + self._segment_waiters)]
            self._part_waiters.clear()
            self._segment_waiters.clear()
        else:
            last = self._last_part()
            heap = self._part_waiters
            while heap and (heap[0][0], heap[0][1]) <= last:
                due.append(heapq.heappop(heap)[3])
            complete = self._last_complete_msn()
            heap = self._segment_waiters
            while heap and heap[0][0] <= complete:
                due.append(heapq.heappop(heap)[3])
        for callback in due:
            try:
                callback()
            except Exception:  # one broken waiter must not keep the others waiting
                log.exception("hls %s: waiter failed", self.name)
