# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: annotation_typing=False
# (annotation_typing off here alone: the cold paths are the twin's annotated Python compiled as
# it is, and Cython would turn `data: bytes` into an exact type check the twin does not make.)
"""fMP4/CMAF muxing of FLV media for LL-HLS (compiled; twin of ``_fmp4_py.py``).

Same API, bytes and error texts as the pure-Python twin, whose docstring explains the format
and the timing rules.  The cold paths (sequence headers, parameter-set parsing, the init
segment: once per stream) are the twin's Python code compiled as it is; the hot path,
:meth:`Muxer.fragment`, parses the FLV sample headers in C, sizes the whole ``moof`` + ``mdat``
first, allocates one ``bytes`` object and writes boxes and sample data straight into it, so
each payload byte is copied exactly once.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

import struct
from collections import namedtuple
from collections.abc import Sequence
from operator import index

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


def _skip_modex(data: bytes, packet_type: int) -> tuple[int, int]:
    """Position after an E-RTMP ModEx chain and the real packet type; (-1, 0) if truncated."""
    n = len(data)
    pos = 1
    while packet_type == 7:
        if pos >= n:
            return -1, 0
        size = data[pos] + 1
        pos += 1
        if size == 256:
            if pos + 2 > n:
                return -1, 0
            size = ((data[pos] << 8) | data[pos + 1]) + 1
            pos += 2
        pos += size
        if pos >= n:
            return -1, 0
        packet_type = data[pos] & 0x0F
        pos += 1
    return pos, packet_type


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




def _make_init(video, audio) -> bytes:
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


def _pair(item):
    if type(item) is not tuple or len(item) != 2:
        raise TypeError("samples must be (timestamp, payload) tuples")
    return item


def _timestamp(ts):
    t = index(ts)
    if not 0 <= t <= MAX_TIMESTAMP:
        raise ValueError(f"timestamp {t} out of range 0..2**40-1")
    return t


# ---------------------------------------------------------------------------------------------
# The hot path

cdef enum:
    FOURCC_AVC1 = 0x61766331
    FOURCC_HVC1 = 0x68766331
    FOURCC_AV01 = 0x61763031
    FOURCC_MP4A = 0x6D703461
    C_SYNC_FLAGS = 0x02000000
    C_NON_SYNC_FLAGS = 0x01010000


cdef struct Sample:
    int64_t dts  # in the track's timescale
    int32_t cts  # in ms, as the FLV tag says
    bint key
    const unsigned char* data
    Py_ssize_t size


cdef inline uint32_t _be32(const unsigned char* p) noexcept:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline int32_t _si24(const unsigned char* p) noexcept:
    cdef int32_t v = (<int32_t>p[0] << 16) | (<int32_t>p[1] << 8) | p[2]
    if v & 0x800000:
        v -= 0x1000000
    return v


cdef inline unsigned char* _put32(unsigned char* p, uint32_t v) noexcept:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v
    return p + 4


cdef inline unsigned char* _put_tag(unsigned char* p, uint32_t size, const char* kind) noexcept:
    p = _put32(p, size)
    memcpy(p, kind, 4)
    return p + 4


cdef inline Py_ssize_t _modex(const unsigned char* p, Py_ssize_t n, int* packet_type) noexcept:
    """Position after an E-RTMP ModEx chain (updating ``packet_type``); -1 when truncated."""
    cdef Py_ssize_t pos = 1
    cdef Py_ssize_t size
    while packet_type[0] == 7:
        if pos >= n:
            return -1
        size = <Py_ssize_t>p[pos] + 1
        pos += 1
        if size == 256:
            if pos + 2 > n:
                return -1
            size = ((<Py_ssize_t>p[pos] << 8) | p[pos + 1]) + 1
            pos += 2
        pos += size
        if pos >= n:
            return -1
        packet_type[0] = p[pos] & 0x0F
        pos += 1
    return pos


cdef int _parse_video(
    const unsigned char* p, Py_ssize_t n, uint32_t codec, Sample* s
) except -1:
    if n == 0:
        raise FLVError("empty video payload")
    cdef unsigned char b0 = p[0]
    cdef uint32_t legacy
    cdef int packet_type
    cdef Py_ssize_t pos
    if not (b0 & 0x80):
        legacy = b0 & 0x0F
        legacy = (
            FOURCC_AVC1 if legacy == 7 else FOURCC_HVC1 if legacy == 12
            else FOURCC_AV01 if legacy == 13 else 0
        )
        if legacy != codec:
            raise FLVError("video payload codec does not match the track")
        if n < 5 or p[1] != 1:
            raise FLVError("video payload is not coded frames")
        s.cts = _si24(p + 2)
        s.key = (b0 >> 4) == 1
        s.data = p + 5
        s.size = n - 5
        return 0
    packet_type = b0 & 0x0F
    pos = _modex(p, n, &packet_type)
    if pos < 0 or pos + 4 > n:
        raise FLVError("truncated video payload")
    if _be32(p + pos) != codec:
        raise FLVError("video payload codec does not match the track")
    s.key = ((b0 >> 4) & 0x07) == 1
    if packet_type == 1 and codec != FOURCC_AV01:
        if pos + 7 > n:
            raise FLVError("truncated video payload")
        s.cts = _si24(p + pos + 4)
        s.data = p + pos + 7
        s.size = n - pos - 7
        return 0
    if packet_type == 1 or packet_type == 3:
        s.cts = 0
        s.data = p + pos + 4
        s.size = n - pos - 4
        return 0
    raise FLVError("video payload is not coded frames")


cdef int _parse_audio(const unsigned char* p, Py_ssize_t n, Sample* s) except -1:
    if n == 0:
        raise FLVError("empty audio payload")
    cdef unsigned char b0 = p[0]
    cdef int packet_type
    cdef Py_ssize_t pos
    s.cts = 0
    s.key = True
    if b0 >> 4 == 10:
        if n < 2 or p[1] != 1:
            raise FLVError("audio payload is not a raw AAC frame")
        s.data = p + 2
        s.size = n - 2
        return 0
    if b0 >> 4 == 9:
        packet_type = b0 & 0x0F
        pos = _modex(p, n, &packet_type)
        if pos < 0 or pos + 4 > n:
            raise FLVError("truncated audio payload")
        if _be32(p + pos) != FOURCC_MP4A or packet_type != 1:
            raise FLVError("audio payload is not a raw AAC frame")
        s.data = p + pos + 4
        s.size = n - pos - 4
        return 0
    raise FLVError("audio payload is not a raw AAC frame")


cdef int _parse_samples(
    list items, Sample* out, list keep, bint video, uint32_t codec, int64_t scale
) except -1:
    cdef Py_ssize_t i
    cdef object payload
    cdef int64_t t
    for i in range(len(items)):
        item = _pair(items[i])
        t = _timestamp(item[0])
        payload = item[1]
        if type(payload) is not bytes:
            payload = _payload_bytes(payload, "payload")
            keep.append(payload)  # the sample points into it until the fragment is written
        if video:
            _parse_video(
                <const unsigned char*>PyBytes_AS_STRING(payload), len(<bytes>payload), codec,
                &out[i]
            )
        else:
            _parse_audio(
                <const unsigned char*>PyBytes_AS_STRING(payload), len(<bytes>payload), &out[i]
            )
        out[i].dts = t * scale // 1000
    return 0


cdef inline uint32_t _duration(int64_t a, int64_t b) noexcept:
    """b - a clamped to 0..2**32-1 (backward steps last 0)."""
    if b <= a:
        return 0
    if b - a > 0xFFFFFFFF:
        return 0xFFFFFFFF
    return <uint32_t>(b - a)


cdef unsigned char* _write_durations(
    unsigned char* p, Sample* s, Py_ssize_t n, int64_t end, uint32_t nominal, bint video
) noexcept:
    """trun entries; each sample lasts until the next, the last one per the twin's rules."""
    cdef Py_ssize_t i
    cdef uint32_t dur = nominal
    for i in range(n):
        if i + 1 < n:
            dur = _duration(s[i].dts, s[i + 1].dts)
        elif end >= 0:
            dur = _duration(s[i].dts, end)
        # else: the last sample keeps the previous duration (or the nominal one if alone)
        p = _put32(p, dur)
        p = _put32(p, <uint32_t>s[i].size)
        if video:
            p = _put32(p, C_SYNC_FLAGS if s[i].key else C_NON_SYNC_FLAGS)
            p = _put32(p, <uint32_t>(s[i].cts * 90))
    return p


cdef class Muxer:
    """fMP4 writer for one stream: ``init_segment()`` once, then ``fragment()`` per part."""

    cdef readonly object video
    cdef readonly object audio
    cdef bytes _init
    cdef int64_t _audio_scale
    cdef uint32_t _vcodec

    def __init__(self, video=None, audio=None):
        self.video = _check_track(video, "video")
        self.audio = _check_track(audio, "audio")
        if self.video is None and self.audio is None:
            raise ValueError("a Muxer needs a video or an audio track")
        self._audio_scale = self.audio.timescale if self.audio is not None else 0
        self._vcodec = _be32(self.video.codec.encode()) if self.video is not None else 0
        self._init = _make_init(self.video, self.audio)

    def init_segment(self) -> bytes:
        """``ftyp`` + ``moov`` for the tracks; the same bytes every call."""
        return self._init

    def fragment(self, seq, video=(), audio=(), video_end=-1, audio_end=-1) -> bytes:
        """One ``moof`` + ``mdat``: ``video``/``audio`` are ``(timestamp_ms, FLV payload)`` in
        decode order, ``*_end`` the timestamp the last sample lasts until (-1: unknown)."""
        s = index(seq)
        if not 0 <= s <= 0xFFFFFFFF:
            raise ValueError(f"sequence number {s} out of range 0..2**32-1")
        cdef int64_t vend = _samples_end(video_end)
        cdef int64_t aend = _samples_end(audio_end)
        cdef list vsamples = list(video)
        cdef list asamples = list(audio)
        cdef Py_ssize_t nv = len(vsamples)
        cdef Py_ssize_t na = len(asamples)
        if nv and self.video is None:
            raise ValueError("video samples for a Muxer without a video track")
        if na and self.audio is None:
            raise ValueError("audio samples for a Muxer without an audio track")
        if not nv and not na:
            raise ValueError("a fragment needs at least one sample")

        cdef Sample* samples = <Sample*>PyMem_Malloc((nv + na) * sizeof(Sample))
        if samples == NULL:
            raise MemoryError()
        cdef list keep = []
        cdef Py_ssize_t i, vbytes = 0, abytes = 0, moof_size, total
        cdef bytes out
        cdef unsigned char* p
        try:
            _parse_samples(vsamples, samples, keep, True, self._vcodec, VIDEO_TIMESCALE)
            _parse_samples(asamples, samples + nv, keep, False, 0, self._audio_scale)
            for i in range(nv):
                vbytes += samples[i].size
            for i in range(nv, nv + na):
                abytes += samples[i].size
            moof_size = 8 + 16
            if nv:
                moof_size += 64 + 16 * nv
            if na:
                moof_size += 68 + 8 * na
            total = moof_size + 8 + vbytes + abytes
            if total > 0x7FFFFFFF:
                raise ValueError("fragment larger than 2 GiB")

            out = PyBytes_FromStringAndSize(NULL, total)
            p = <unsigned char*>PyBytes_AS_STRING(out)
            p = _put_tag(p, <uint32_t>moof_size, b"moof")
            p = _put_tag(p, 16, b"mfhd")
            p = _put32(p, 0)
            p = _put32(p, <uint32_t>s)
            if nv:
                p = _put_tag(p, <uint32_t>(64 + 16 * nv), b"traf")
                p = _put_tag(p, 16, b"tfhd")
                p = _put32(p, 0x020000)  # default-base-is-moof
                p = _put32(p, VIDEO_TRACK_ID)
                p = _put_tag(p, 20, b"tfdt")
                p = _put32(p, 0x01000000)  # version 1: 64-bit decode time
                p = _put32(p, <uint32_t>(<uint64_t>samples[0].dts >> 32))
                p = _put32(p, <uint32_t>samples[0].dts)
                p = _put_tag(p, <uint32_t>(20 + 16 * nv), b"trun")
                p = _put32(p, 0x01000F01)  # version 1 (signed CTS), offset/dur/size/flags/cts
                p = _put32(p, <uint32_t>nv)
                p = _put32(p, <uint32_t>(moof_size + 8))
                p = _write_durations(
                    p, samples, nv,
                    vend * VIDEO_TIMESCALE // 1000 if vend >= 0 else -1,
                    NOMINAL_VIDEO_DURATION, True,
                )  # fmt: skip
            if na:
                p = _put_tag(p, <uint32_t>(68 + 8 * na), b"traf")
                p = _put_tag(p, 20, b"tfhd")
                p = _put32(p, 0x020020)  # default-base-is-moof, default-sample-flags
                p = _put32(p, AUDIO_TRACK_ID)
                p = _put32(p, C_SYNC_FLAGS)
                p = _put_tag(p, 20, b"tfdt")
                p = _put32(p, 0x01000000)
                p = _put32(p, <uint32_t>(<uint64_t>samples[nv].dts >> 32))
                p = _put32(p, <uint32_t>samples[nv].dts)
                p = _put_tag(p, <uint32_t>(20 + 8 * na), b"trun")
                p = _put32(p, 0x00000301)  # data offset, duration, size
                p = _put32(p, <uint32_t>na)
                p = _put32(p, <uint32_t>(moof_size + 8 + vbytes))
                p = _write_durations(
                    p, samples + nv, na,
                    aend * self._audio_scale // 1000 if aend >= 0 else -1,
                    AAC_FRAME_SAMPLES, False,
                )  # fmt: skip
            p = _put_tag(p, <uint32_t>(8 + vbytes + abytes), b"mdat")
            for i in range(nv + na):
                if samples[i].size:
                    memcpy(p, samples[i].data, samples[i].size)
                    p += samples[i].size
        finally:
            PyMem_Free(samples)
        return out
