"""An LL-HLS media playlist validator (RFC 8216bis), independent of ``engine/hls.py``.

``parse(text)`` reads a media playlist strictly; ``validate(playlist, fetch)`` checks the rules a
low-latency origin must keep, raising AssertionError with what is wrong:

* part durations <= PART-TARGET, and >= 85 % of it (``min_part_ratio``) except a segment's
  last part and parts that are INDEPENDENT; segment EXTINF, rounded, <= TARGETDURATION;
* MSN and part continuity (``seg<msn>.m4s``, ``part<msn>.<i>.m4s`` from 0, no gaps), parts listed
  for a run of segments at the end only, a segment's parts adding up to its EXTINF;
* PART-HOLD-BACK >= 3 x PART-TARGET, CAN-SKIP-UNTIL >= 6 x TARGETDURATION, VERSION >= 9 where
  EXT-X-SKIP is used; PRELOAD-HINT names the next part; ENDLIST only after a complete segment;
* EXT-X-PROGRAM-DATE-TIME on each segment, advancing by the segment durations;
* with ``fetch`` (name → bytes or None): every listed part and segment exists, and a part is
  INDEPENDENT exactly when its first video sample is a sync sample (and every segment's first
  part is, unless ``keyframe_segments`` is False).

``check_delta(full, delta)`` checks an ``_HLS_skip=YES`` answer against the full playlist, and
``too_far(playlist, msn, part)`` says whether the spec wants 400 for a blocking request, so
end-to-end tests can hold a server's answers to it.  Usable on any server's output: phase 2's
HTTP tests fetch with a real client.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from media_helpers import parse_fragment

TOLERANCE = 0.0005  # durations are written with 3 decimals


@dataclass
class Part:
    duration: float
    uri: str
    independent: bool


@dataclass
class Segment:
    msn: int
    duration: float | None = None  # None: in progress (parts only)
    uri: str | None = None
    parts: list[Part] = field(default_factory=list)
    pdt: datetime | None = None
    discontinuity: bool = False
    map_uri: str = ""


@dataclass
class Playlist:
    version: int = 0
    target_duration: int = 0
    part_target: float = 0.0
    server_control: dict[str, str] = field(default_factory=dict)
    media_sequence: int = 0
    discontinuity_sequence: int = 0
    skipped: int = 0
    segments: list[Segment] = field(default_factory=list)
    preload_hint: str | None = None
    endlist: bool = False

    @property
    def last_msn(self) -> int:
        return self.segments[-1].msn if self.segments else self.media_sequence - 1

    def last_part(self) -> tuple[int, int]:
        for segment in reversed(self.segments):
            if segment.parts:
                return segment.msn, len(segment.parts) - 1
        return -1, -1


_ATTR = re.compile(r'([A-Z0-9-]+)=("[^"]*"|[^,]*)')


def attributes(text: str) -> dict[str, str]:
    out = {}
    pos = 0
    while pos < len(text):
        m = _ATTR.match(text, pos)
        assert m, f"bad attribute list at {text[pos:]!r}"
        out[m.group(1)] = m.group(2).strip('"')
        pos = m.end()
        if pos < len(text):
            assert text[pos] == ",", f"bad attribute list {text!r}"
            pos += 1
    return out


def parse(text: str) -> Playlist:
    lines = text.split("\n")
    assert lines[0] == "#EXTM3U", "a playlist starts with #EXTM3U"
    assert text.endswith("\n") and lines[-1] == "", "the last line ends with a newline"
    pl = Playlist()
    msn = None
    current: Segment | None = None
    pending_pdt = None
    pending_disc = False
    map_uri = ""
    for line in lines[1:-1]:
        assert line and line == line.strip(), f"blank or padded line {line!r}"
        tag, _, value = line.partition(":")
        if not line.startswith("#"):
            assert current is not None and current.duration is not None and current.uri is None, \
                f"URI {line!r} without an EXTINF"
            current.uri = line
            pl.segments.append(current)
            current = None
            continue
        if tag == "#EXT-X-VERSION":
            pl.version = int(value)
        elif tag == "#EXT-X-TARGETDURATION":
            pl.target_duration = int(value)
        elif tag == "#EXT-X-SERVER-CONTROL":
            pl.server_control = attributes(value)
        elif tag == "#EXT-X-PART-INF":
            pl.part_target = float(attributes(value)["PART-TARGET"])
        elif tag == "#EXT-X-MEDIA-SEQUENCE":
            pl.media_sequence = int(value)
        elif tag == "#EXT-X-DISCONTINUITY-SEQUENCE":
            pl.discontinuity_sequence = int(value)
        elif tag == "#EXT-X-MAP":
            map_uri = attributes(value)["URI"]
        elif tag == "#EXT-X-SKIP":
            assert not pl.segments and current is None, "EXT-X-SKIP comes before the segments"
            pl.skipped = int(attributes(value)["SKIPPED-SEGMENTS"])
        elif tag == "#EXT-X-DISCONTINUITY":
            pending_disc = True
        elif tag == "#EXT-X-PROGRAM-DATE-TIME":
            pending_pdt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        elif tag in ("#EXT-X-PART", "#EXTINF"):
            if current is None:
                if msn is None:
                    msn = pl.media_sequence + pl.skipped
                current = Segment(msn, pdt=pending_pdt, discontinuity=pending_disc,
                                  map_uri=map_uri)  # fmt: skip
                msn += 1
                pending_pdt = None
                pending_disc = False
            if tag == "#EXT-X-PART":
                attrs = attributes(value)
                assert set(attrs) <= {"DURATION", "URI", "INDEPENDENT"}, attrs
                current.parts.append(Part(float(attrs["DURATION"]), attrs["URI"],
                                          attrs.get("INDEPENDENT") == "YES"))  # fmt: skip
            else:
                assert value.endswith(","), f"EXTINF {value!r}"
                current.duration = float(value[:-1])
        elif tag == "#EXT-X-PRELOAD-HINT":
            attrs = attributes(value)
            assert attrs["TYPE"] == "PART", attrs
            pl.preload_hint = attrs["URI"]
        elif tag == "#EXT-X-ENDLIST":
            pl.endlist = True
        else:
            raise AssertionError(f"unexpected line {line!r}")
    if current is not None:
        assert current.duration is None, "EXTINF without a URI"
        pl.segments.append(current)  # the segment in progress
    return pl


def validate(
    pl: Playlist,
    fetch: Callable[[str], bytes | None] | None = None,
    keyframe_segments: bool = True,
    min_part_ratio: float | None = 0.85,
) -> None:
    assert pl.version >= 6, "EXT-X-PART needs version 6 or later"
    if pl.skipped:
        assert pl.version >= 9, "EXT-X-SKIP needs version 9"
    assert pl.target_duration >= 1
    assert pl.part_target > 0, "EXT-X-PART-INF:PART-TARGET is required with parts"
    control = pl.server_control
    assert control.get("CAN-BLOCK-RELOAD") == "YES"
    assert float(control["PART-HOLD-BACK"]) >= 3 * pl.part_target - TOLERANCE
    if "CAN-SKIP-UNTIL" in control:
        assert float(control["CAN-SKIP-UNTIL"]) >= 6 * pl.target_duration
    else:
        assert not pl.skipped, "EXT-X-SKIP without CAN-SKIP-UNTIL"
    assert pl.segments, "an empty playlist"

    with_parts = [i for i, s in enumerate(pl.segments) if s.parts]
    if with_parts:
        assert with_parts == list(range(with_parts[0], len(pl.segments))), \
            "parts are listed for the last segments only, without gaps"
    expected_msn = pl.media_sequence + pl.skipped
    previous_end = None
    for n, segment in enumerate(pl.segments):
        assert segment.msn == expected_msn
        expected_msn += 1
        complete = segment.duration is not None
        assert complete or n == len(pl.segments) - 1, "only the last segment may be in progress"
        if complete:
            assert segment.uri == f"seg{segment.msn}.m4s", segment.uri
            assert segment.duration > 0
            assert round(segment.duration) <= pl.target_duration, \
                f"seg{segment.msn}: EXTINF {segment.duration} > TARGETDURATION"
        for i, part in enumerate(segment.parts):
            assert part.uri == f"part{segment.msn}.{i}.m4s", part.uri
            assert 0 < part.duration <= pl.part_target + TOLERANCE, \
                f"{part.uri}: {part.duration} s > PART-TARGET {pl.part_target}"
            # Exempt: INDEPENDENT parts and a segment's last part (for the segment in progress,
            # its newest part may turn out to be the last).
            if min_part_ratio and not part.independent and i < len(segment.parts) - 1:
                assert part.duration >= min_part_ratio * pl.part_target - TOLERANCE, \
                    f"{part.uri}: {part.duration} s < {min_part_ratio:.0%} of PART-TARGET"
        if complete and segment.parts:
            total = sum(p.duration for p in segment.parts)
            assert math.isclose(total, segment.duration, abs_tol=TOLERANCE * len(segment.parts)), \
                f"seg{segment.msn}: parts add up to {total}, EXTINF says {segment.duration}"
        if keyframe_segments and segment.parts:
            assert segment.parts[0].independent, f"seg{segment.msn} does not start independent"
        assert segment.pdt is not None, f"seg{segment.msn} has no PROGRAM-DATE-TIME"
        if previous_end is not None and not segment.discontinuity:
            gap = abs((segment.pdt - previous_end).total_seconds())
            assert gap <= 0.002, f"seg{segment.msn}: PROGRAM-DATE-TIME off by {gap} s"
        if complete:
            previous_end = segment.pdt + timedelta(seconds=segment.duration)
        assert segment.map_uri, "EXT-X-MAP is required for fMP4"

    last = pl.segments[-1]
    if pl.endlist:
        assert last.duration is not None, "ENDLIST after a segment in progress"
        assert pl.preload_hint is None
    else:
        assert last.parts or last.duration is not None
        if last.duration is None:
            assert pl.preload_hint == f"part{last.msn}.{len(last.parts)}.m4s", pl.preload_hint
        else:
            assert pl.preload_hint == f"part{last.msn + 1}.0.m4s", pl.preload_hint

    if fetch is None:
        return
    for segment in pl.segments:
        if segment.duration is not None:
            assert fetch(segment.uri), f"{segment.uri} is listed but missing"
        for part in segment.parts:
            data = fetch(part.uri)
            assert data, f"{part.uri} is listed but missing"
            fragment = parse_fragment(data)
            if 1 in fragment:  # a video track: INDEPENDENT exactly on keyframes
                first_flags = fragment[1]["samples"][0][2]
                sync = first_flags & 0x00010000 == 0
                assert sync == part.independent, f"{part.uri}: INDEPENDENT={part.independent}"
    assert fetch(pl.segments[0].map_uri), "the init segment is missing"


def check_delta(full: Playlist, delta: Playlist) -> None:
    """An ``_HLS_skip=YES`` answer against the full playlist of the same moment."""
    assert delta.skipped > 0, "a delta update skips something"
    until = float(full.server_control["CAN-SKIP-UNTIL"])
    assert delta.media_sequence == full.media_sequence
    assert delta.segments == full.segments[delta.skipped :]
    assert delta.preload_hint == full.preload_hint and delta.endlist == full.endlist
    end = sum(s.duration or sum(p.duration for p in s.parts) for s in full.segments)
    start = 0.0
    for segment in full.segments[: delta.skipped]:
        assert segment.duration is not None
        assert end - start > until - TOLERANCE, f"seg{segment.msn} is too recent to skip"
        start += segment.duration


def too_far(pl: Playlist, msn: int, part: int | None) -> bool:
    """Whether the spec wants 400 for ``_HLS_msn=msn[&_HLS_part=part]`` against ``pl``: an MSN
    more than two past the last segment, or a part more than the Advance Part Limit ahead."""
    if msn > pl.last_msn + 2:
        return True
    if part is None:
        return False
    limit = math.ceil(3 / pl.part_target) if pl.part_target < 1 else 3
    last_msn, last_part = pl.last_part()
    if msn == last_msn:
        return part - last_part > limit
    if msn > last_msn:
        return part + 1 > limit
    return False
