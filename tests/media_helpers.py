"""Real media for the fMP4 and LL-HLS tests: ffmpeg recordings as FLV tags, ffprobe's view of
what we wrote, and an ISO-BMFF box walker written independently of the code under test."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from watchbuy.engine import _flvmux_py as flvmux

FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")


def need_ffmpeg() -> None:
    if FFMPEG is None or FFPROBE is None:
        pytest.fail("Debian's ffmpeg/ffprobe are required (make test installs them as root)")


@dataclass
class FlvMedia:
    """An FLV recording split the way the relay sees it."""

    video_header: bytes | None
    audio_header: bytes | None
    # (tag type, timestamp ms, payload, keyframe) for every media tag that is not a header
    tags: list[tuple[int, int, bytes, bool]]
    width: int = 0
    height: int = 0

    @property
    def video(self) -> list[tuple[int, bytes]]:
        return [(ts, p) for t, ts, p, _ in self.tags if t == 9]

    @property
    def audio(self) -> list[tuple[int, bytes]]:
        return [(ts, p) for t, ts, p, _ in self.tags if t == 8]


def ffmpeg_flv(
    path: Path,
    seconds: float = 4,
    size: str = "640x360",
    rate: int = 30,
    gop: int = 30,
    bframes: int = 0,
    video_opts: tuple[str, ...] = (),
) -> bytes:
    """An H.264/AAC FLV recording of ffmpeg's test pattern and a sine tone."""
    need_ffmpeg()
    subprocess.run(
        [
            FFMPEG, "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}",
            "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
            "-t", str(seconds), "-c:v", "libx264", "-g", str(gop), "-bf", str(bframes),
            "-pix_fmt", "yuv420p", *video_opts, "-c:a", "aac", "-f", "flv", str(path),
        ],
        check=True,
        timeout=120,
    )  # fmt: skip
    return path.read_bytes()


def split_flv(data: bytes) -> FlvMedia:
    """Sequence headers and media tags of an FLV file, as the relay classifies them."""
    media = FlvMedia(None, None, [])
    for tag_type, ts, payload in flvmux.FlvReader().feed(data):
        if tag_type == 9:
            _codec, _ft, key, seq = flvmux.inspect_video(payload)
            if seq:
                media.video_header = payload
            elif payload[:2] != b"\x17\x02":  # not the end-of-sequence tag
                media.tags.append((9, ts, payload, key))
        elif tag_type == 8:
            _codec, seq = flvmux.inspect_audio(payload)
            if seq:
                media.audio_header = payload
            else:
                media.tags.append((8, ts, payload, False))
    return media


# ---------------------------------------------------------------------------------------------
# HEVC over Enhanced RTMP, from libx265


def _nal_units(annexb: bytes) -> list[bytes]:
    out = []
    i = annexb.find(b"\x00\x00\x01")
    while i >= 0:
        start = i + 3
        j = annexb.find(b"\x00\x00\x01", start)
        end = len(annexb) if j < 0 else j
        nal = annexb[start:end]
        if j >= 0 and nal.endswith(b"\x00"):
            nal = nal[:-1]  # the 4-byte start code's leading zero
        out.append(nal)
        i = j
    return out


def hevc_ertmp_media(path: Path, seconds: float = 2, size: str = "640x360", rate: int = 30,
                     gop: int = 30) -> FlvMedia:  # fmt: skip
    """HEVC from libx265 as an OBS-style E-RTMP publisher sends it: a SequenceStart with an
    HEVCDecoderConfigurationRecord built from the VPS/SPS/PPS, then key frames as CodedFrames
    (with a zero composition time) and the rest as CodedFramesX."""
    need_ffmpeg()
    subprocess.run(
        [
            FFMPEG, "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}", "-t", str(seconds),
            "-c:v", "libx265", "-pix_fmt", "yuv420p",
            "-x265-params", f"bframes=0:aud=1:keyint={gop}:min-keyint={gop}:log-level=error",
            "-f", "hevc", str(path),
        ],
        check=True,
        timeout=120,
    )  # fmt: skip
    units: list[list[bytes]] = []
    params: dict[int, bytes] = {}
    for nal in _nal_units(path.read_bytes()):
        nal_type = (nal[0] >> 1) & 0x3F
        if nal_type == 35:  # access unit delimiter: a new picture
            units.append([])
        elif nal_type in (32, 33, 34):
            params.setdefault(nal_type, nal)
        elif units:
            units[-1].append(nal)
    sps = params[33]
    ptl = sps[2:].replace(b"\x00\x00\x03", b"\x00\x00")[1:13]  # general profile_tier_level
    record = bytes([1]) + ptl[:12] + bytes([0xF0, 0x00, 0xFC, 0xFD, 0xF8, 0xF8, 0, 0, 0x0F, 3])
    for nal_type in (32, 33, 34):
        nal = params[nal_type]
        record += bytes([0x80 | nal_type]) + struct.pack(">HH", 1, len(nal)) + nal
    header = bytes([0x80 | 1 << 4 | 0]) + b"hvc1" + record
    tags = []
    for i, nals in enumerate(units):
        key = any(16 <= (n[0] >> 1) & 0x3F <= 21 for n in nals)
        data = b"".join(struct.pack(">I", len(n)) + n for n in nals)
        if key:
            payload = bytes([0x80 | 1 << 4 | 1]) + b"hvc1" + b"\x00\x00\x00" + data
        else:
            payload = bytes([0x80 | 2 << 4 | 3]) + b"hvc1" + data
        tags.append((9, i * 1000 // rate, payload, key))
    return FlvMedia(header, None, tags)


# ---------------------------------------------------------------------------------------------
# Looking at what we wrote


def boxes(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[str, int, int]]:
    """(type, offset of the body, end) of each box between ``start`` and ``end``."""
    end = len(data) if end is None else end
    out = []
    pos = start
    while pos < end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        assert size >= 8 and pos + size <= end, (kind, size, pos, end)
        out.append((kind.decode("latin-1"), pos + 8, pos + size))
        pos += size
    assert pos == end
    return out


def box_tree(data: bytes, start: int = 0, end: int | None = None) -> list:
    """Nested box types: containers we know are opened up, others are leaves."""
    containers = {"moov", "trak", "mdia", "minf", "stbl", "mvex", "dinf", "moof", "traf"}
    tree: list = []
    for kind, body, stop in boxes(data, start, end):
        if kind in containers:
            tree.append((kind, box_tree(data, body, stop)))
        elif kind == "stsd":
            tree.append((kind, box_tree(data, body + 8, stop)))
        else:
            tree.append(kind)
    return tree


def parse_fragment(data: bytes) -> dict:
    """moof/mdat read back independently: per track id its tfdt and (dur, size, flags, cts)."""
    (moof_kind, moof, moof_end), (mdat_kind, mdat, mdat_end) = boxes(data)
    assert (moof_kind, mdat_kind) == ("moof", "mdat")
    out: dict = {"mdat": data[mdat:mdat_end]}
    kids = boxes(data, moof, moof_end)
    assert kids[0][0] == "mfhd"
    out["seq"] = struct.unpack_from(">I", data, kids[0][1] + 4)[0]
    for kind, body, end in kids[1:]:
        assert kind == "traf"
        (k1, tfhd, _), (k2, tfdt, _), (k3, trun, _) = boxes(data, body, end)
        assert (k1, k2, k3) == ("tfhd", "tfdt", "trun")
        tfhd_flags, track_id = struct.unpack_from(">II", data, tfhd)
        default_flags = struct.unpack_from(">I", data, tfhd + 8)[0] if tfhd_flags & 0x20 else 0
        version_flags, decode_time = struct.unpack_from(">IQ", data, tfdt)
        assert version_flags >> 24 == 1
        trun_vf, count, offset = struct.unpack_from(">IIi", data, trun)
        flags = trun_vf & 0xFFFFFF
        samples = []
        pos = trun + 12
        for _ in range(count):
            dur, size = struct.unpack_from(">II", data, pos)
            pos += 8
            sflags, cts = default_flags, 0
            if flags & 0x400:
                sflags = struct.unpack_from(">I", data, pos)[0]
                pos += 4
            if flags & 0x800:
                cts = struct.unpack_from(">i" if trun_vf >> 24 else ">I", data, pos)[0]
                pos += 4
            samples.append((dur, size, sflags, cts))
        assert pos == end
        out[track_id] = {"base": decode_time, "offset": offset, "samples": samples}
    return out


def ffprobe_json(path: Path, *args: str) -> dict:
    need_ffmpeg()
    out = subprocess.run(
        [FFPROBE, "-v", "error", "-of", "json", *args, str(path)],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.stderr == "", out.stderr
    return json.loads(out.stdout)


def decode_errors(path: Path) -> str:
    """What ffmpeg says when it decodes every frame of ``path`` (empty: clean)."""
    need_ffmpeg()
    out = subprocess.run(
        [FFMPEG, "-hide_banner", "-v", "error", "-i", str(path), "-f", "null", "-"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return out.stderr.strip() + ("" if out.returncode == 0 else f" (exit {out.returncode})")


# ---------------------------------------------------------------------------------------------
# AV1 over Enhanced RTMP, from SVT-AV1


def _obus(data: bytes) -> list[tuple[int, bytes]]:
    """(type, whole OBU) of a low-overhead AV1 bitstream (every OBU has a size field)."""
    out = []
    pos = 0
    while pos < len(data):
        start = pos
        header = data[pos]
        assert header & 0x02, "ffmpeg's obu muxer writes sizes"
        pos += 2 if header & 0x04 else 1
        size = 0
        for i in range(8):
            byte = data[pos]
            pos += 1
            size |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                break
        pos += size
        out.append(((header >> 3) & 0x0F, data[start:pos]))
    return out


def av1_ertmp_media(path: Path, seconds: float = 2, size: str = "640x360",
                    rate: int = 30) -> FlvMedia:  # fmt: skip
    """AV1 from libsvtav1 as an E-RTMP publisher sends it: a SequenceStart with an
    AV1CodecConfigurationRecord holding the sequence header OBU, then one CodedFrames tag per
    temporal unit (temporal delimiters left out).  A unit with a sequence header is taken as
    the keyframe; AV1 has no composition offsets."""
    need_ffmpeg()
    subprocess.run(
        [
            FFMPEG, "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}", "-t", str(seconds),
            "-c:v", "libsvtav1", "-preset", "12", "-g", str(rate), "-pix_fmt", "yuv420p",
            "-svtav1-params", "verbosity=0", "-f", "obu", str(path),
        ],
        check=True,
        timeout=120,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    units: list[list[tuple[int, bytes]]] = []
    sequence_header = b""
    for obu_type, obu in _obus(path.read_bytes()):
        if obu_type == 2:  # temporal delimiter: a new temporal unit
            units.append([])
            continue
        if obu_type == 1 and not sequence_header:
            sequence_header = obu
        units[-1].append((obu_type, obu))
    # seq_profile (3 bits) and, with no timing info (asserted), the first operating point's
    # seq_level_idx come straight after the OBU header and size.
    body = sequence_header[2:]
    bits = int.from_bytes(body[:4], "big")
    assert not (bits >> 27) & 1, "timing info present: this helper does not read it"
    profile = bits >> 29
    level = (bits >> 4) & 0x1F  # 3+1+1+1+1+5+12 = 24 bits, then 5 bits of level
    record = bytes([0x81, profile << 5 | level, 0x0C, 0]) + sequence_header
    tags = []
    for i, unit in enumerate(units):
        key = any(t == 1 for t, _ in unit)
        data = b"".join(obu for _, obu in unit)
        tags.append((9, i * 1000 // rate, bytes([0x80 | (1 if key else 2) << 4 | 1]) + b"av01"
                     + data, key))  # fmt: skip
    return FlvMedia(bytes([0x80 | 1 << 4 | 0]) + b"av01" + record, None, tags)
