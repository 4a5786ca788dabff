"""fMP4/CMAF muxing of FLV media for LL-HLS (pure-Python twin of ``_fmp4.pyx``).

Input is what the relay holds: FLV tag payloads, legacy or Enhanced RTMP (E-RTMP), with their
millisecond timestamps.  Output is ISO-BMFF:

* :func:`video_track` / :func:`audio_track` turn a sequence header (AVC / HEVC / AV1
  configuration record, AAC AudioSpecificConfig) into a :data:`Track`: codec, the record for
  the sample entry, picture size (parsed from the H.264/HEVC SPS or the AV1 sequence header, or
  given from metadata), timescale and the RFC 6381 codec string for a master playlist.
* :class:`Muxer` holds the tracks (video is track 1, audio track 2) and writes the init segment
  (``ftyp`` + ``moov`` with empty sample tables and ``mvex``/``trex``) and media fragments:
  ``moof`` (``mfhd``, one ``traf`` per track with ``tfhd`` default-base-is-moof, ``tfdt``
  version 1, ``trun``) + ``mdat``, one ``bytes`` object per fragment.

Timing: decode times are the FLV timestamps converted to the track timescale (video 90 kHz,
audio the sample rate) as ``ms * timescale // 1000`` from the absolute timestamp, so rounding
never accumulates.  A sample lasts until the next sample's decode time; the last sample of a
fragment lasts until ``video_end`` / ``audio_end`` (the next sample's FLV timestamp, which the
segmenter knows because it holds one sample back) or, when that is not given (the end of a
stream), as long as the sample before it, or a nominal 1/30 s (video) / 1024 samples (AAC) when
the fragment has one sample.  Timestamps going backwards give a duration of 0 rather than an
error.  Composition offsets come from the signed 24-bit CTS of AVC/HEVC tags (``trun``
version 1, signed).  Video keyframes (FLV frame type 1) are sync samples (sample_depends_on=2),
other frames are non-sync (sample_depends_on=1, is_non_sync_sample=1); every AAC frame is sync.

Sample data is kept as it is: AVCC/HVCC length-prefixed NAL units, AV1 OBUs, raw AAC frames.

Both implementations give the same bytes and raise the same exceptions with the same texts
(FLVError for malformed media, ValueError/TypeError for bad arguments); ``tests/test_fmp4.py``
holds them to it.
"""

from __future__ import annotations

import struct
from collections import namedtuple
from collections.abc import Sequence
from operator import index

from watchbuy.engine._flvmux_py import _skip_modex  # one walk of the E-RTMP ModEx chain
from watchbuy.engine.errors import FLVError

VIDEO_TIMESCALE = 90000
NOMINAL_VIDEO_DURATION = 3000  # 1/30 s at 90 kHz: a lone last frame at the end of a stream
AAC_FRAME_SAMPLES = 1024
VIDEO_TRACK_ID = 1
AUDIO_TRACK_ID = 2
# Timestamps are milliseconds the segmenter has unwrapped; 2**40 ms is 35 years, and keeps
# ms * timescale (up to 96 kHz) far inside 64 bits.
MAX_TIMESTAMP = 2**40 - 1

Track = namedtuple(
    "Track",
    "kind codec config width height timescale sample_rate channels codec_string",
)

_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025,
              8000, 7350)  # fmt: skip

_U32 = struct.Struct(">I")
_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)

# Sample flags: sample_depends_on (bits 24-25) 2 = independent; 1 + is_non_sync_sample.
SYNC_FLAGS = 0x02000000
NON_SYNC_FLAGS = 0x01010000


# ---------------------------------------------------------------------------------------------
# Bitstream reading for parameter sets


class _Bits:
    """MSB-first bit reader over an RBSP; reading past the end raises FLVError(``what``)."""

    __slots__ = ("data", "pos", "end", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data) * 8
        self.what = what

    def u(self, n: int) -> int:
        if self.pos + n > self.end:
            raise FLVError(f"truncated {self.what}")
        v = 0
        data = self.data
        pos = self.pos
        for _ in range(n):
            v = (v << 1) | ((data[pos >> 3] >> (7 - (pos & 7))) & 1)
            pos += 1
        self.pos = pos
        return v

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise FLVError(f"bad exp-Golomb code in {self.what}")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) >> 1 if k & 1 else -(k >> 1)


def _rbsp(nal: bytes, header_bytes: int) -> bytes:
    """The NAL unit's payload without its header and emulation-prevention bytes."""
    return nal[header_bytes:].replace(b"\x00\x00\x03", b"\x00\x00")


def avc_sps_dimensions(sps: bytes) -> tuple[int, int]:
    """(width, height) of an H.264 SPS NAL unit (header byte included), cropping applied."""
    sps = bytes(sps)
    if len(sps) < 4 or sps[0] & 0x1F != 7:
        raise FLVError("not an H.264 SPS")
    b = _Bits(_rbsp(sps, 1), "H.264 SPS")
    profile = b.u(8)
    b.u(16)  # constraint flags, level
    b.ue()  # seq_parameter_set_id
    chroma = 1
    separate = 0
    if profile in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
        chroma = b.ue()
        if chroma > 3:
            raise FLVError("bad chroma_format_idc in H.264 SPS")
        if chroma == 3:
            separate = b.u(1)
        b.ue()  # bit_depth_luma_minus8
        b.ue()  # bit_depth_chroma_minus8
        b.u(1)  # qpprime_y_zero_transform_bypass_flag
        if b.u(1):  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma != 3 else 12):
                if b.u(1):
                    last = nxt = 8
                    for _ in range(16 if i < 6 else 64):
                        if nxt:
                            nxt = (last + b.se() + 256) % 256
                        last = nxt or last
    b.ue()  # log2_max_frame_num_minus4
    poc_type = b.ue()
    if poc_type == 0:
        b.ue()
    elif poc_type == 1:
        b.u(1)
        b.se()
        b.se()
        cycle = b.ue()
        if cycle > 255:
            raise FLVError("bad num_ref_frames_in_pic_order_cnt_cycle in H.264 SPS")
        for _ in range(cycle):
            b.se()
    b.ue()  # max_num_ref_frames
    b.u(1)  # gaps_in_frame_num_value_allowed_flag
    width_mbs = b.ue() + 1
    height_units = b.ue() + 1
    frame_mbs_only = b.u(1)
    if not frame_mbs_only:
        b.u(1)  # mb_adaptive_frame_field_flag
    b.u(1)  # direct_8x8_inference_flag
    width = width_mbs * 16
    height = (2 - frame_mbs_only) * height_units * 16
    if b.u(1):  # frame_cropping_flag
        left, right, top, bottom = b.ue(), b.ue(), b.ue(), b.ue()
        if separate or chroma == 0:
            cx, cy = 1, 2 - frame_mbs_only
        else:
            cx = 2 if chroma in (1, 2) else 1
            cy = (2 if chroma == 1 else 1) * (2 - frame_mbs_only)
        width -= (left + right) * cx
        height -= (top + bottom) * cy
    if width <= 0 or height <= 0 or width > 65535 or height > 65535:
        raise FLVError("bad picture size in H.264 SPS")
    return width, height


def hevc_sps_dimensions(sps: bytes) -> tuple[int, int]:
    """(width, height) of an HEVC SPS NAL unit (2-byte header included), conformance window
    applied."""
    sps = bytes(sps)
    if len(sps) < 3 or (sps[0] >> 1) & 0x3F != 33:
        raise FLVError("not an HEVC SPS")
    b = _Bits(_rbsp(sps, 2), "HEVC SPS")
    b.u(4)  # sps_video_parameter_set_id
    sub_layers = b.u(3)  # sps_max_sub_layers_minus1
    b.u(1)  # temporal_id_nesting
    b.u(96)  # general profile_tier_level
    present = [(b.u(1), b.u(1)) for _ in range(sub_layers)]
    if sub_layers:
        b.u(2 * (8 - sub_layers))  # reserved_zero_2bits
    for profile_present, level_present in present:
        if profile_present:
            b.u(88)
        if level_present:
            b.u(8)
    b.ue()  # sps_seq_parameter_set_id
    chroma = b.ue()
    if chroma > 3:
        raise FLVError("bad chroma_format_idc in HEVC SPS")
    separate = b.u(1) if chroma == 3 else 0
    width = b.ue()
    height = b.ue()
    if b.u(1):  # conformance_window_flag
        left, right, top, bottom = b.ue(), b.ue(), b.ue(), b.ue()
        if separate or chroma == 0 or chroma == 3:
            cx = cy = 1
        else:
            cx, cy = 2, (2 if chroma == 1 else 1)
        width -= (left + right) * cx
        height -= (top + bottom) * cy
    if width <= 0 or height <= 0 or width > 65535 or height > 65535:
        raise FLVError("bad picture size in HEVC SPS")
    return width, height


def _av1_leb128(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(8):
        if pos >= len(data):
            raise FLVError("truncated AV1 OBU")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos
    raise FLVError("bad leb128 in AV1 OBU")


def av1_sequence_dimensions(obus: bytes) -> tuple[int, int]:
    """(width, height) from the first sequence header OBU in ``obus`` (max frame size)."""
    obus = bytes(obus)
    pos = 0
    while pos < len(obus):
        header = obus[pos]
        obu_type = (header >> 3) & 0x0F
        pos += 2 if header & 0x04 else 1  # extension byte
        if not header & 0x02:
            size = len(obus) - pos
        else:
            size, pos = _av1_leb128(obus, pos)
        if pos + size > len(obus):
            raise FLVError("truncated AV1 OBU")
        if obu_type == 1:
            return _av1_seq_header(obus[pos : pos + size])
        pos += size
    raise FLVError("no AV1 sequence header")


def _av1_seq_header(data: bytes) -> tuple[int, int]:
    b = _Bits(data, "AV1 sequence header")
    b.u(3)  # seq_profile
    b.u(1)  # still_picture
    if b.u(1):  # reduced_still_picture_header
        b.u(5)
    else:
        decoder_model = 0
        buffer_delay_bits = 0
        if b.u(1):  # timing_info_present_flag
            b.u(64)
            if b.u(1):  # equal_picture_interval: uvlc num_ticks_per_picture_minus_1
                zeros = 0
                while b.u(1) == 0:
                    zeros += 1
                    if zeros > 31:
                        raise FLVError("bad uvlc in AV1 sequence header")
                b.u(zeros)
            decoder_model = b.u(1)
            if decoder_model:
                buffer_delay_bits = b.u(5) + 1
                b.u(32 + 5 + 5)
        display_delay = b.u(1)
        for _ in range(b.u(5) + 1):  # operating points
            b.u(12)
            if b.u(5) > 7:
                b.u(1)  # seq_tier
            if decoder_model and b.u(1):
                b.u(2 * buffer_delay_bits + 1)
            if display_delay and b.u(1):
                b.u(4)
    wbits = b.u(4) + 1
    hbits = b.u(4) + 1
    return b.u(wbits) + 1, b.u(hbits) + 1


# ---------------------------------------------------------------------------------------------
# Sequence headers → tracks


def _payload_bytes(obj: object, what: str) -> bytes:
    if type(obj) is bytes:
        return obj  # type: ignore[return-value]
    try:
        mv = memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be a bytes-like object, not {type(obj).__name__}") from None
    return mv.tobytes()


_LEGACY_VIDEO_FOURCC = {7: b"avc1", 12: b"hvc1", 13: b"av01"}


def _video_sequence(data: bytes) -> tuple[bytes, bytes]:
    """(FourCC, configuration record) of a video sequence-header payload."""
    n = len(data)
    if n == 0:
        raise FLVError("empty video sequence header")
    b0 = data[0]
    if not b0 & 0x80:
        fourcc = _LEGACY_VIDEO_FOURCC.get(b0 & 0x0F)
        if fourcc is None:
            raise FLVError(f"unsupported video codec id {b0 & 0x0F} for fMP4")
        if n < 5 or data[1] != 0:
            raise FLVError("not a video sequence header")
        return fourcc, data[5:]
    pos, packet_type = _skip_modex(data, b0 & 0x0F)
    if pos < 0 or pos + 4 > n:
        raise FLVError("truncated video sequence header")
    if packet_type != 0:
        raise FLVError("not a video sequence header")
    fourcc = data[pos : pos + 4]
    if fourcc not in (b"avc1", b"hvc1", b"av01"):
        raise FLVError(f"unsupported video codec {fourcc!r} for fMP4")
    return fourcc, data[pos + 4 :]


def _check_size(width: object, height: object) -> tuple[int, int]:
    w = index(width)  # type: ignore[arg-type]
    h = index(height)  # type: ignore[arg-type]
    if not (0 <= w <= 65535 and 0 <= h <= 65535):
        raise ValueError(f"picture size {w}x{h} out of range 0..65535")
    return w, h


def video_track(payload: bytes, width: int = 0, height: int = 0) -> Track:
    """The video :data:`Track` of a sequence-header payload (legacy AVC or E-RTMP avc1, hvc1,
    av01).  The picture size comes from the parameter sets unless ``width``/``height`` (from
    onMetaData) are both given."""
    data = _payload_bytes(payload, "payload")
    w, h = _check_size(width, height)
    fourcc, record = _video_sequence(data)
    if fourcc == b"avc1":
        # AVCDecoderConfigurationRecord: version 1, profile, compatibility, level,
        # 6 bits reserved + lengthSizeMinusOne, 3 bits reserved + numOfSPS, then each SPS.
        if len(record) < 8 or record[0] != 1 or record[5] & 0x1F == 0:
            raise FLVError("bad AVCDecoderConfigurationRecord")
        size = (record[6] << 8) | record[7]
        if 8 + size > len(record):
            raise FLVError("bad AVCDecoderConfigurationRecord")
        if not (w and h):
            w, h = avc_sps_dimensions(record[8 : 8 + size])
        codec_string = f"avc1.{record[1]:02x}{record[2]:02x}{record[3]:02x}"
    elif fourcc == b"hvc1":
        if len(record) < 23 or record[0] != 1:
            raise FLVError("bad HEVCDecoderConfigurationRecord")
        sps = _hevc_record_sps(record)
        if not (w and h):
            if sps is None:
                raise FLVError("HEVCDecoderConfigurationRecord has no SPS")
            w, h = hevc_sps_dimensions(sps)
        codec_string = _hevc_codec_string(record)
    else:
        # AV1CodecConfigurationRecord: marker 1 + version 1, then profile/level/tier/depth.
        if len(record) < 4 or record[0] != 0x81:
            raise FLVError("bad AV1CodecConfigurationRecord")
        if not (w and h):
            w, h = av1_sequence_dimensions(record[4:])
        profile = record[1] >> 5
        level = record[1] & 0x1F
        tier = "H" if record[2] & 0x80 else "M"
        depth = (12 if record[2] & 0x20 else 10) if record[2] & 0x40 else 8
        codec_string = f"av01.{profile}.{level:02d}{tier}.{depth:02d}"
    return Track("video", fourcc.decode(), record, w, h, VIDEO_TIMESCALE, 0, 0, codec_string)


def _hevc_record_sps(record: bytes) -> bytes | None:
    pos = 23
    n = len(record)
    for _ in range(record[22]):
        if pos + 3 > n:
            raise FLVError("bad HEVCDecoderConfigurationRecord")
        nal_type = record[pos] & 0x3F
        count = (record[pos + 1] << 8) | record[pos + 2]
        pos += 3
        for _ in range(count):
            if pos + 2 > n:
                raise FLVError("bad HEVCDecoderConfigurationRecord")
            size = (record[pos] << 8) | record[pos + 1]
            pos += 2
            if pos + size > n:
                raise FLVError("bad HEVCDecoderConfigurationRecord")
            if nal_type == 33:
                return record[pos : pos + size]
            pos += size
    return None


def _hevc_codec_string(record: bytes) -> str:
    # ISO/IEC 14496-15 annex E: hvc1.<space><profile>.<compat, bit-reversed hex>.<tier><level>
    # .<constraint bytes, trailing zero bytes left out>
    space = ("", "A", "B", "C")[record[1] >> 6]
    tier = "H" if record[1] & 0x20 else "L"
    flags = int.from_bytes(record[2:6], "big")
    compat = sum(((flags >> i) & 1) << (31 - i) for i in range(32))
    constraints = record[6:12].rstrip(b"\x00")
    out = f"hvc1.{space}{record[1] & 0x1F}.{compat:X}.{tier}{record[12]}"
    return out + "".join(f".{c:X}" for c in constraints)


def audio_track(payload: bytes) -> Track:
    """The AAC :data:`Track` of an audio sequence-header payload (legacy AAC or E-RTMP mp4a)."""
    data = _payload_bytes(payload, "payload")
    n = len(data)
    if n == 0:
        raise FLVError("empty audio sequence header")
    b0 = data[0]
    if b0 >> 4 == 10:
        if n < 2 or data[1] != 0:
            raise FLVError("not an audio sequence header")
        asc = data[2:]
    elif b0 >> 4 == 9:
        pos, packet_type = _skip_modex(data, b0 & 0x0F)
        if pos < 0 or pos + 4 > n:
            raise FLVError("truncated audio sequence header")
        if packet_type != 0:
            raise FLVError("not an audio sequence header")
        if data[pos : pos + 4] != b"mp4a":
            raise FLVError(f"unsupported audio codec {data[pos : pos + 4]!r} for fMP4")
        asc = data[pos + 4 :]
    else:
        raise FLVError(f"unsupported audio format {b0 >> 4} for fMP4")
    # AudioSpecificConfig: 5-bit object type (31: escape to 6 more bits + 32), 4-bit sampling
    # frequency index (15: a 24-bit rate follows), 4-bit channel configuration.
    if len(asc) < 2:
        raise FLVError("truncated AudioSpecificConfig")
    b = _Bits(asc, "AudioSpecificConfig")
    aot = b.u(5)
    if aot == 31:
        aot = 32 + b.u(6)
    if aot == 0:
        raise FLVError("bad AAC object type 0")
    freq_index = b.u(4)
    if freq_index == 15:
        rate = b.u(24)
    elif freq_index < len(_AAC_RATES):
        rate = _AAC_RATES[freq_index]
    else:
        raise FLVError(f"bad AAC sampling frequency index {freq_index}")
    if rate == 0:
        raise FLVError("bad AAC sampling rate 0")
    channels = b.u(4)
    # Channel configuration 0 means "in the program config element": say stereo.
    channels = channels if 0 < channels < 7 else (8 if channels == 7 else 2)
    return Track("audio", "mp4a", asc, 0, 0, rate, rate, channels, f"mp4a.40.{aot}")


# ---------------------------------------------------------------------------------------------
# Boxes


def _box(kind: bytes, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return _U32.pack(8 + len(body)) + kind + body


def _full_box(kind: bytes, version: int, flags: int, *parts: bytes) -> bytes:
    return _box(kind, _U32.pack((version << 24) | flags), *parts)


def _descriptor(tag: int, body: bytes) -> bytes:
    # ISO/IEC 14496-1 expandable size: 7 bits a byte, high bit = more follow.
    n = len(body)
    size = bytes((n & 0x7F,))
    n >>= 7
    while n:
        size = bytes((0x80 | (n & 0x7F),)) + size
        n >>= 7
    return bytes((tag,)) + size + body


def _sample_entry(track: Track) -> bytes:
    if track.kind == "video":
        config_box = {"avc1": b"avcC", "hvc1": b"hvcC", "av01": b"av1C"}[track.codec]
        return _box(
            track.codec.encode(),
            bytes(6), b"\x00\x01",  # reserved, data_reference_index 1
            bytes(16),  # pre_defined, reserved
            struct.pack(">HHIIIH", track.width, track.height, 0x480000, 0x480000, 0, 1),
            bytes(32),  # compressorname
            b"\x00\x18\xff\xff",  # depth 24, pre_defined -1
            _box(config_box, track.config),
        )  # fmt: skip
    rate = track.sample_rate if track.sample_rate < 65536 else 0
    esds = _full_box(
        b"esds", 0, 0,
        _descriptor(
            3,
            struct.pack(">HB", AUDIO_TRACK_ID, 0)
            + _descriptor(4, b"\x40\x15" + bytes(11) + _descriptor(5, track.config))
            + _descriptor(6, b"\x02"),
        ),
    )  # fmt: skip
    return _box(
        b"mp4a",
        bytes(6), b"\x00\x01",
        bytes(8),
        struct.pack(">HHHHI", track.channels, 16, 0, 0, rate << 16),
        esds,
    )  # fmt: skip


def _trak(track: Track, track_id: int) -> bytes:
    video = track.kind == "video"
    tkhd = _full_box(
        b"tkhd", 0, 3,  # enabled, in movie
        struct.pack(">IIIII", 0, 0, track_id, 0, 0),
        bytes(8),
        struct.pack(">hhhH", 0, 0, 0 if video else 0x0100, 0),
        _MATRIX,
        struct.pack(">II", track.width << 16, track.height << 16),
    )  # fmt: skip
    mdhd = _full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, track.timescale, 0, 0x55C4, 0))
    hdlr = _full_box(
        b"hdlr", 0, 0, bytes(4), b"vide" if video else b"soun", bytes(12),
        b"VideoHandler\x00" if video else b"SoundHandler\x00",
    )  # fmt: skip
    media_header = (
        _full_box(b"vmhd", 0, 1, bytes(8)) if video else _full_box(b"smhd", 0, 0, bytes(4))
    )
    dinf = _box(b"dinf", _full_box(b"dref", 0, 0, _U32.pack(1), _full_box(b"url ", 0, 1)))
    stbl = _box(
        b"stbl",
        _full_box(b"stsd", 0, 0, _U32.pack(1), _sample_entry(track)),
        _full_box(b"stts", 0, 0, bytes(4)),
        _full_box(b"stsc", 0, 0, bytes(4)),
        _full_box(b"stsz", 0, 0, bytes(8)),
        _full_box(b"stco", 0, 0, bytes(4)),
    )
    minf = _box(b"minf", media_header, dinf, stbl)
    return _box(b"trak", tkhd, _box(b"mdia", mdhd, hdlr, minf))


def _check_track(track: object, kind: str) -> Track | None:
    if track is None:
        return None
    if not isinstance(track, tuple) or len(track) != 9 or track[0] != kind:
        raise ValueError(f"{kind} must be a {kind} Track or None")
    return Track(*track)


def _samples_end(value: object) -> int:
    v = index(value)  # type: ignore[arg-type]
    if v < -1 or v > MAX_TIMESTAMP:
        raise ValueError(f"end timestamp {v} out of range")
    return v


def _make_init(video: Track | None, audio: Track | None) -> bytes:
    """``ftyp`` + ``moov`` (with ``mvex``: fragments follow) for the tracks there are."""
    brands = [b"iso6", b"cmfc", b"mp41"]
    if video is not None and video.codec == "av01":
        brands.append(b"av01")
    ftyp = _box(b"ftyp", b"iso6", bytes(4), *brands)
    mvhd = _full_box(
        b"mvhd", 0, 0,
        struct.pack(">IIIIIH", 0, 0, 1000, 0, 0x10000, 0x0100),
        bytes(10),
        _MATRIX,
        bytes(24),
        _U32.pack(3),  # next_track_ID
    )  # fmt: skip
    traks = []
    trexs = []
    for track, track_id in ((video, VIDEO_TRACK_ID), (audio, AUDIO_TRACK_ID)):
        if track is not None:
            traks.append(_trak(track, track_id))
            trexs.append(_full_box(b"trex", 0, 0, struct.pack(">5I", track_id, 1, 0, 0, 0)))
    return ftyp + _box(b"moov", mvhd, *traks, _box(b"mvex", *trexs))


class Muxer:
    """fMP4 writer for one stream: ``init_segment()`` once, then ``fragment()`` per part."""

    __slots__ = ("video", "audio", "_init", "_audio_scale")

    def __init__(self, video: Track | None = None, audio: Track | None = None) -> None:
        self.video = _check_track(video, "video")
        self.audio = _check_track(audio, "audio")
        if self.video is None and self.audio is None:
            raise ValueError("a Muxer needs a video or an audio track")
        self._audio_scale = self.audio.timescale if self.audio is not None else 0
        self._init = _make_init(self.video, self.audio)


    def init_segment(self) -> bytes:
        """``ftyp`` + ``moov`` for the tracks; the same bytes every call."""
        return self._init

    def fragment(
        self,
        seq: int,
        video: Sequence[tuple[int, bytes]] = (),
        audio: Sequence[tuple[int, bytes]] = (),
        video_end: int = -1,
        audio_end: int = -1,
    ) -> bytes:
        """One ``moof`` + ``mdat``: ``video``/``audio`` are ``(timestamp_ms, FLV payload)`` in
        decode order, ``*_end`` the timestamp the last sample lasts until (-1: unknown)."""
        s = index(seq)
        if not 0 <= s <= 0xFFFFFFFF:
            raise ValueError(f"sequence number {s} out of range 0..2**32-1")
        vend = _samples_end(video_end)
        aend = _samples_end(audio_end)
        vsamples = list(video)
        asamples = list(audio)
        if vsamples and self.video is None:
            raise ValueError("video samples for a Muxer without a video track")
        if asamples and self.audio is None:
            raise ValueError("audio samples for a Muxer without an audio track")
        if not vsamples and not asamples:
            raise ValueError("a fragment needs at least one sample")

        # Parse every sample first: a malformed one fails the fragment before anything is built.
        vinfo = [self._video_sample(*_pair(item)) for item in vsamples]
        ainfo = [self._audio_sample(*_pair(item)) for item in asamples]

        vbytes = sum(len(d) for _, _, _, d in vinfo)
        abytes = sum(len(d) for _, d in ainfo)
        moof_size = 8 + 16
        if vinfo:
            moof_size += 64 + 16 * len(vinfo)
        if ainfo:
            moof_size += 68 + 8 * len(ainfo)
        if moof_size + 8 + vbytes + abytes > 0x7FFFFFFF:
            raise ValueError("fragment larger than 2 GiB")

        out = [
            _U32.pack(moof_size), b"moof",
            _U32.pack(16), b"mfhd", bytes(4), _U32.pack(s),
        ]  # fmt: skip
        if vinfo:
            dts = [t * VIDEO_TIMESCALE // 1000 for t, _, _, _ in vinfo]
            durations = _durations(dts, vend * VIDEO_TIMESCALE // 1000 if vend >= 0 else -1,
                                   NOMINAL_VIDEO_DURATION)  # fmt: skip
            n = len(vinfo)
            out += [
                _U32.pack(64 + 16 * n), b"traf",
                struct.pack(">I4sII", 16, b"tfhd", 0x020000, VIDEO_TRACK_ID),
                struct.pack(">I4sIQ", 20, b"tfdt", 0x01000000, dts[0]),
                struct.pack(">I4sIIi", 20 + 16 * n, b"trun", 0x01000F01, n, moof_size + 8),
            ]  # fmt: skip
            for (_, cts, key, data), dur in zip(vinfo, durations, strict=True):
                out.append(struct.pack(">IIIi", dur, len(data),
                                       SYNC_FLAGS if key else NON_SYNC_FLAGS, cts * 90))
        if ainfo:
            scale = self._audio_scale
            dts = [t * scale // 1000 for t, _ in ainfo]
            durations = _durations(dts, aend * scale // 1000 if aend >= 0 else -1,
                                   AAC_FRAME_SAMPLES)  # fmt: skip
            n = len(ainfo)
            out += [
                _U32.pack(68 + 8 * n), b"traf",
                struct.pack(">I4sIII", 20, b"tfhd", 0x020020, AUDIO_TRACK_ID, SYNC_FLAGS),
                struct.pack(">I4sIQ", 20, b"tfdt", 0x01000000, dts[0]),
                struct.pack(">I4sIIi", 20 + 8 * n, b"trun", 0x00000301, n,
                            moof_size + 8 + vbytes),
            ]  # fmt: skip
            for (_, data), dur in zip(ainfo, durations, strict=True):
                out.append(struct.pack(">II", dur, len(data)))
        out.append(_U32.pack(8 + vbytes + abytes))
        out.append(b"mdat")
        out += [d for _, _, _, d in vinfo]
        out += [d for _, d in ainfo]
        return b"".join(out)

    def _video_sample(self, ts: int, payload: bytes) -> tuple[int, int, bool, memoryview]:
        t = _timestamp(ts)
        data = memoryview(_payload_bytes(payload, "payload"))
        n = len(data)
        if n == 0:
            raise FLVError("empty video payload")
        codec = self.video.codec.encode()  # type: ignore[union-attr]
        b0 = data[0]
        if not b0 & 0x80:
            if _LEGACY_VIDEO_FOURCC.get(b0 & 0x0F) != codec:
                raise FLVError("video payload codec does not match the track")
            if n < 5 or data[1] != 1:
                raise FLVError("video payload is not coded frames")
            cts = (data[2] << 16) | (data[3] << 8) | data[4]
            if cts & 0x800000:
                cts -= 0x1000000
            return t, cts, b0 >> 4 == 1, data[5:]
        pos, packet_type = _skip_modex(data, b0 & 0x0F)
        if pos < 0 or pos + 4 > n:
            raise FLVError("truncated video payload")
        if data[pos : pos + 4] != codec:
            raise FLVError("video payload codec does not match the track")
        key = (b0 >> 4) & 0x07 == 1
        if packet_type == 1 and codec != b"av01":
            if pos + 7 > n:
                raise FLVError("truncated video payload")
            cts = (data[pos + 4] << 16) | (data[pos + 5] << 8) | data[pos + 6]
            if cts & 0x800000:
                cts -= 0x1000000
            return t, cts, key, data[pos + 7 :]
        if packet_type == 1 or packet_type == 3:
            return t, 0, key, data[pos + 4 :]
        raise FLVError("video payload is not coded frames")

    def _audio_sample(self, ts: int, payload: bytes) -> tuple[int, memoryview]:
        t = _timestamp(ts)
        data = memoryview(_payload_bytes(payload, "payload"))
        n = len(data)
        if n == 0:
            raise FLVError("empty audio payload")
        b0 = data[0]
        if b0 >> 4 == 10:
            if n < 2 or data[1] != 1:
                raise FLVError("audio payload is not a raw AAC frame")
            return t, data[2:]
        if b0 >> 4 == 9:
            pos, packet_type = _skip_modex(data, b0 & 0x0F)
            if pos < 0 or pos + 4 > n:
                raise FLVError("truncated audio payload")
            if data[pos : pos + 4] != b"mp4a" or packet_type != 1:
                raise FLVError("audio payload is not a raw AAC frame")
            return t, data[pos + 4 :]
        raise FLVError("audio payload is not a raw AAC frame")


def _pair(item: object) -> tuple:
    if type(item) is not tuple or len(item) != 2:  # type: ignore[arg-type]
        raise TypeError("samples must be (timestamp, payload) tuples")
    return item  # type: ignore[return-value]


def _timestamp(ts: object) -> int:
    t = index(ts)  # type: ignore[arg-type]
    if not 0 <= t <= MAX_TIMESTAMP:
        raise ValueError(f"timestamp {t} out of range 0..2**40-1")
    return t


def _durations(dts: list[int], end: int, nominal: int) -> list[int]:
    """Each sample lasts until the next; the last until ``end`` (-1: as long as the one before
    it, or ``nominal``).  Backward steps give 0."""
    out = [max(0, b - a) for a, b in zip(dts, dts[1:], strict=False)]
    if end >= 0:
        out.append(max(0, end - dts[-1]))
    elif out:
        out.append(out[-1])
    else:
        out.append(nominal)
    return [min(d, 0xFFFFFFFF) for d in out]
