"""fMP4/CMAF muxer: the compiled module and its pure-Python twin, held to one behaviour.

Every example-based test runs against both implementations (the ``fm`` fixture); hypothesis
feeds both the same random and adversarial inputs and demands the same bytes or the same
exception and text.  The muxed output of real ffmpeg recordings (H.264 with and without
B-frames, AAC, and HEVC sent as Enhanced RTMP) is read back by ffprobe and decoded by ffmpeg.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from conftest import codec_implementations, needs_compiled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from media_helpers import (
    FlvMedia,
    av1_ertmp_media,
    box_tree,
    boxes,
    decode_errors,
    ffmpeg_flv,
    ffprobe_json,
    hevc_ertmp_media,
    parse_fragment,
    split_flv,
)

from watchbuy.engine import codecs
from watchbuy.engine.errors import FLVError

CODECS = codec_implementations("fmp4")
PY = CODECS["python"]
CY = CODECS.get("cython")  # None without the compiled codec: its tests are skipped
compiled = needs_compiled("fmp4")


@pytest.fixture(params=list(CODECS.values()), ids=list(CODECS))
def fm(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


@compiled
def test_compiled_module_is_really_compiled() -> None:
    assert CY.__file__.endswith(".so")
    assert PY.__file__.endswith(".py")
    assert codecs.fmp4 is CY  # the selector picks it (the marker: the switch is off)


@pytest.fixture(scope="module")
def h264(tmp_path_factory: pytest.TempPathFactory) -> FlvMedia:
    return split_flv(ffmpeg_flv(tmp_path_factory.mktemp("fmp4") / "bf0.flv", bframes=0))


@pytest.fixture(scope="module")
def h264_bframes(tmp_path_factory: pytest.TempPathFactory) -> FlvMedia:
    return split_flv(ffmpeg_flv(tmp_path_factory.mktemp("fmp4") / "bf2.flv", bframes=2))


@pytest.fixture(scope="module")
def hevc(tmp_path_factory: pytest.TempPathFactory) -> FlvMedia:
    return hevc_ertmp_media(tmp_path_factory.mktemp("fmp4") / "x.hevc")


# A real AVCDecoderConfigurationRecord (x264, High 3.0, 640x360: 368 coded lines cropped by 8).
def avc_record(media: FlvMedia) -> bytes:
    assert media.video_header is not None
    return media.video_header[5:]


def bits(*fields: tuple[int, int]) -> bytes:
    """Pack (value, width) bit fields MSB first, zero-padded to whole bytes."""
    value = 0
    width = 0
    for v, w in fields:
        value = (value << w) | v
        width += w
    pad = -width % 8
    return (value << pad).to_bytes((width + pad) // 8, "big")


# --------------------------------------------------------------------------------------------
# Sequence headers → tracks


def test_video_track_from_ffmpeg_avc(fm: ModuleType, h264: FlvMedia) -> None:
    record = avc_record(h264)
    track = fm.video_track(h264.video_header)
    assert track.kind == "video" and track.codec == "avc1"
    assert (track.width, track.height) == (640, 360)  # SPS cropping applied
    assert track.timescale == 90000 and track.config == record
    assert track.codec_string == "avc1." + record[1:4].hex()
    # The same record as an Enhanced RTMP SequenceStart, plain and behind a ModEx, is the same.
    assert fm.video_track(b"\x90avc1" + record) == track
    modex = bytes([0x80 | 1 << 4 | 7, 3 - 1]) + b"\x00\x01\x02" + bytes([0]) + b"avc1"
    assert fm.video_track(modex + record) == track
    # onMetaData's size wins when given.
    assert fm.video_track(h264.video_header, 1280, 720)[3:5] == (1280, 720)


@pytest.mark.parametrize("size", ["320x240", "854x480", "1280x720", "1920x1080"])
def test_avc_sps_sizes_from_ffmpeg(fm: ModuleType, tmp_path: Path, size: str) -> None:
    media = split_flv(ffmpeg_flv(tmp_path / "s.flv", seconds=0.1, size=size))
    track = fm.video_track(media.video_header)
    assert f"{track.width}x{track.height}" == size


def test_hevc_track_from_libx265(fm: ModuleType, hevc: FlvMedia) -> None:
    track = fm.video_track(hevc.video_header)
    assert (track.codec, track.width, track.height) == ("hvc1", 640, 360)
    assert track.codec_string.startswith("hvc1.1.6.L")  # Main profile, main tier
    assert track.config == hevc.video_header[5:]


def test_av1_track_from_a_sequence_header(fm: ModuleType) -> None:
    # A reduced-still-picture-free sequence header: profile 0, no timing info, one operating
    # point at level 8 (4.0), 11+1-bit sizes of 1280x720.
    seq = bits(
        (0, 3), (0, 1), (0, 1),  # seq_profile, still_picture, reduced_still_picture_header
        (0, 1), (0, 1),  # timing_info_present, initial_display_delay_present
        (0, 5), (0, 12), (8, 5), (0, 1),  # one operating point: idc, level 8, main tier
        (10, 4), (10, 4), (1279, 11), (719, 11),  # frame_width/height bits - 1, sizes - 1
    )  # fmt: skip
    obu = bytes([1 << 3 | 0x02, len(seq)]) + seq  # OBU_SEQUENCE_HEADER with a size field
    record = bytes([0x81, 0 << 5 | 8, 0x0C, 0]) + obu
    track = fm.video_track(b"\x90av01" + record)
    assert (track.codec, track.width, track.height) == ("av01", 1280, 720)
    assert track.codec_string == "av01.0.08M.08"
    assert fm.av1_sequence_dimensions(obu) == (1280, 720)


@pytest.mark.parametrize(
    ("asc", "rate", "channels", "codec_string"),
    [
        (b"\x12\x10", 44100, 2, "mp4a.40.2"),
        (b"\x11\x90", 48000, 2, "mp4a.40.2"),
        (b"\x11\x88", 48000, 1, "mp4a.40.2"),
        (b"\x2b\x92\x08\x00", 22050, 2, "mp4a.40.5"),  # HE-AAC, explicit
        (bits((2, 5), (15, 4), (44000, 24), (2, 4)), 44000, 2, "mp4a.40.2"),  # explicit rate
        (bits((31, 5), (10, 6), (4, 4), (1, 4)), 44100, 1, "mp4a.40.42"),  # escaped type
        (bits((2, 5), (3, 4), (0, 4)), 48000, 2, "mp4a.40.2"),  # channels in the PCE
        (bits((2, 5), (3, 4), (7, 4)), 48000, 8, "mp4a.40.2"),  # 7.1
    ],
)
def test_audio_track(
    fm: ModuleType, asc: bytes, rate: int, channels: int, codec_string: str
) -> None:
    track = fm.audio_track(b"\xaf\x00" + asc)
    assert track.kind == "audio" and track.codec == "mp4a" and track.config == asc
    assert (track.sample_rate, track.timescale, track.channels) == (rate, rate, channels)
    assert track.codec_string == codec_string
    assert fm.audio_track(b"\x90mp4a" + asc) == track  # Enhanced RTMP SequenceStart


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "empty video sequence header"),
        (b"\x17\x01\x00\x00\x00\x01", "not a video sequence header"),
        (b"\x17\x00\x00\x00", "not a video sequence header"),
        (b"\x12\x00", "unsupported video codec id 2"),
        (b"\x17\x00\x00\x00\x00\x01\x64\x00", "bad AVCDecoderConfigurationRecord"),
        (b"\x17\x00\x00\x00\x00\x01\x64\x00\x1f\xff\xe1\x00\x20\x67", "bad AVCDecoderConfig"),
        (b"\x17\x00\x00\x00\x00\x01\x64\x00\x1f\xff\xe1\x00\x04\x67\x64\x00\x1f",
         "truncated H.264 SPS"),
        (b"\x17\x00\x00\x00\x00\x01\x64\x00\x1f\xff\xe1\x00\x02\x68\x64", "not an H.264 SPS"),
        (b"\x90vp09\x01", "unsupported video codec b'vp09'"),
        (b"\x91hvc1" + bytes(30), "not a video sequence header"),
        (b"\x90hvc1" + b"\x01" + bytes(22), "has no SPS"),
        (b"\x90hvc1" + b"\x01" + bytes(21) + b"\x01", "bad HEVCDecoderConfigurationRecord"),
        (b"\x90av01\x81\x00\x00\x00", "no AV1 sequence header"),
        (b"\x90av01\x80\x00\x00\x00", "bad AV1CodecConfigurationRecord"),
        (b"\x97", "truncated video sequence header"),
    ],
)
def test_video_track_errors(fm: ModuleType, payload: bytes, message: str) -> None:
    with pytest.raises(FLVError, match=message):
        fm.video_track(payload)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "empty audio sequence header"),
        (b"\xaf\x01\x12\x10", "not an audio sequence header"),
        (b"\xaf\x00\x12", "truncated AudioSpecificConfig"),
        (b"\xaf\x00\x16\x90", "bad AAC sampling frequency index 13"),
        (b"\xaf\x00\x00\x10", "bad AAC object type 0"),
        (b"\x2f\x00", "unsupported audio format 2"),
        (b"\x90Opus\x00", "unsupported audio codec b'Opus'"),
        (b"\x91mp4a\x12\x10", "not an audio sequence header"),
        (b"\x90mp4", "truncated audio sequence header"),
    ],
)
def test_audio_track_errors(fm: ModuleType, payload: bytes, message: str) -> None:
    with pytest.raises(FLVError, match=message):
        fm.audio_track(payload)


def test_track_argument_errors(fm: ModuleType, h264: FlvMedia) -> None:
    with pytest.raises(TypeError, match="bytes-like"):
        fm.video_track("x")
    with pytest.raises(TypeError, match="bytes-like"):
        fm.audio_track(None)
    with pytest.raises(ValueError, match="out of range"):
        fm.video_track(h264.video_header, 70000, 10)
    assert fm.video_track(bytearray(h264.video_header)) == fm.video_track(h264.video_header)


# --------------------------------------------------------------------------------------------
# Init segment


def test_init_segment_layout(fm: ModuleType, h264: FlvMedia) -> None:
    video = fm.video_track(h264.video_header)
    audio = fm.audio_track(h264.audio_header)
    init = fm.Muxer(video, audio).init_segment()
    trak = lambda entry: (  # noqa: E731
        "trak",
        [
            "tkhd",
            ("mdia", ["mdhd", "hdlr", ("minf", [
                entry[0], ("dinf", ["dref"]),
                ("stbl", [("stsd", [entry[1]]), "stts", "stsc", "stsz", "stco"]),
            ])]),
        ],
    )  # fmt: skip
    assert box_tree(init) == [
        "ftyp",
        ("moov", ["mvhd", trak(("vmhd", "avc1")), trak(("smhd", "mp4a")),
                  ("mvex", ["trex", "trex"])]),
    ]  # fmt: skip
    assert init[8:12] == b"iso6" and b"cmfc" in init[:32]
    # The codec configuration goes in as it came, and the sample entries say the size/rate.
    start = init.index(b"avcC") + 4
    size = struct.unpack_from(">I", init, start - 8)[0]
    assert init[start : start - 8 + size] == avc_record(h264)
    avc1 = init.index(b"avc1")
    assert struct.unpack_from(">HH", init, avc1 + 4 + 24) == (640, 360)
    mp4a = init.index(b"mp4a")
    assert struct.unpack_from(">HH", init, mp4a + 4 + 16) == (1, 16)  # mono, 16 bit
    assert struct.unpack_from(">I", init, mp4a + 4 + 24)[0] == 44100 << 16
    # DecoderSpecificInfo (tag 5) is the AudioSpecificConfig.
    assert b"\x05" + bytes([len(audio.config)]) + audio.config in init
    # Timescales: 90 kHz video, the sample rate for audio; track ids 1 and 2.
    mdhds = [i for i in range(len(init)) if init[i : i + 4] == b"mdhd"]
    assert [struct.unpack_from(">I", init, i + 16)[0] for i in mdhds] == [90000, 44100]
    trexs = [i for i in range(len(init)) if init[i : i + 4] == b"trex"]
    assert [struct.unpack_from(">I", init, i + 8)[0] for i in trexs] == [1, 2]
    assert fm.Muxer(video, audio).init_segment() == init


def test_init_segment_single_track(fm: ModuleType, h264: FlvMedia, hevc: FlvMedia) -> None:
    audio_only = fm.Muxer(audio=fm.audio_track(h264.audio_header)).init_segment()
    assert audio_only.count(b"trak") == 1 and b"smhd" in audio_only and b"vmhd" not in audio_only
    hevc_only = fm.Muxer(fm.video_track(hevc.video_header)).init_segment()
    assert hevc_only.count(b"trak") == 1 and b"hvc1" in hevc_only and b"hvcC" in hevc_only


def test_muxer_argument_errors(fm: ModuleType, h264: FlvMedia) -> None:
    video = fm.video_track(h264.video_header)
    audio = fm.audio_track(h264.audio_header)
    with pytest.raises(ValueError, match="needs a video or an audio track"):
        fm.Muxer()
    with pytest.raises(ValueError, match="video must be a video Track"):
        fm.Muxer(audio)
    with pytest.raises(ValueError, match="audio must be an? audio Track"):
        fm.Muxer(video, video)
    m = fm.Muxer(video)
    with pytest.raises(ValueError, match="without an audio track"):
        m.fragment(1, [], [(0, b"\xaf\x01x")])
    with pytest.raises(ValueError, match="at least one sample"):
        m.fragment(1)
    with pytest.raises(ValueError, match="sequence number"):
        m.fragment(-1, [(0, b"\x17\x01\x00\x00\x00")])
    with pytest.raises(ValueError, match="timestamp"):
        m.fragment(1, [(-5, b"\x17\x01\x00\x00\x00")])
    with pytest.raises(TypeError, match="tuples"):
        m.fragment(1, [[0, b"\x17\x01\x00\x00\x00"]])


# --------------------------------------------------------------------------------------------
# Fragments


def avc_frame(key: bool, cts: int, data: bytes) -> bytes:
    return bytes([0x17 if key else 0x27, 1]) + (cts & 0xFFFFFF).to_bytes(3, "big") + data


def aac_frame(data: bytes) -> bytes:
    return b"\xaf\x01" + data


def test_fragment_layout(fm: ModuleType, h264: FlvMedia) -> None:
    m = fm.Muxer(fm.video_track(h264.video_header), fm.audio_track(h264.audio_header))
    video = [(1000, avc_frame(True, 67, b"I" * 50)), (1033, avc_frame(False, -33, b"P" * 7)),
             (1067, avc_frame(False, 0, b"B"))]  # fmt: skip
    audio = [(1000, aac_frame(b"a" * 9)), (1023, aac_frame(b"b" * 3))]
    frag = m.fragment(7, video, audio, 1100, 1046)
    got = parse_fragment(frag)
    assert got["seq"] == 7
    assert got[1]["base"] == 1000 * 90 and got[2]["base"] == 1000 * 44100 // 1000
    assert got[1]["samples"] == [
        (1033 * 90 - 1000 * 90, 50, 0x02000000, 67 * 90),  # sync sample, CTS in 90 kHz
        (1067 * 90 - 1033 * 90, 7, 0x01010000, -33 * 90),  # non-sync, negative CTS (trun v1)
        (1100 * 90 - 1067 * 90, 1, 0x01010000, 0),  # lasts until video_end
    ]
    assert got[2]["samples"] == [
        (1023 * 441 // 10 - 1000 * 441 // 10, 9, 0x02000000, 0),
        (1046 * 441 // 10 - 1023 * 441 // 10, 3, 0x02000000, 0),
    ]
    # Data offsets point into the mdat: video first, then audio.
    moof_size = struct.unpack_from(">I", frag)[0]
    assert got[1]["offset"] == moof_size + 8 and got[2]["offset"] == moof_size + 8 + 58
    assert got["mdat"] == b"I" * 50 + b"P" * 7 + b"B" + b"a" * 9 + b"b" * 3


def test_fragment_last_sample_duration(fm: ModuleType, h264: FlvMedia) -> None:
    m = fm.Muxer(fm.video_track(h264.video_header), fm.audio_track(h264.audio_header))
    two = [(0, avc_frame(True, 0, b"x")), (40, avc_frame(False, 0, b"y"))]
    durations = lambda frag, track: [s[0] for s in parse_fragment(frag)[track]["samples"]]  # noqa: E731
    assert durations(m.fragment(1, two), 1) == [3600, 3600]  # as long as the one before
    assert durations(m.fragment(1, two[:1]), 1) == [3000]  # alone: a nominal 1/30 s
    assert durations(m.fragment(1, two, video_end=100), 1) == [3600, 5400]
    assert durations(m.fragment(1, [], [(0, aac_frame(b"a"))]), 2) == [1024]
    # Timestamps going backwards last 0 rather than wrapping.
    back = [(100, avc_frame(True, 0, b"x")), (40, avc_frame(False, 0, b"y"))]
    assert durations(m.fragment(1, back, video_end=0), 1) == [0, 0]


def test_fragment_enhanced_rtmp_payloads(fm: ModuleType, hevc: FlvMedia) -> None:
    m = fm.Muxer(fm.video_track(hevc.video_header))
    coded = bytes([0x80 | 1 << 4 | 1]) + b"hvc1" + (-2 & 0xFFFFFF).to_bytes(3, "big") + b"K"
    coded_x = bytes([0x80 | 2 << 4 | 3]) + b"hvc1" + b"PP"
    nano = bytes([0x80 | 2 << 4 | 7, 3 - 1]) + b"\x00\x01\x02" + bytes([3]) + b"hvc1" + b"N"
    got = parse_fragment(m.fragment(3, [(0, coded), (33, coded_x), (66, nano)], [], 100))
    assert [(s[1], s[2], s[3]) for s in got[1]["samples"]] == [
        (1, 0x02000000, -180), (2, 0x01010000, 0), (1, 0x01010000, 0),
    ]  # fmt: skip
    assert got["mdat"] == b"KPPN"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "empty video payload"),
        (b"\x17\x00\x00\x00\x00", "not coded frames"),  # a sequence header
        (b"\x17\x02\x00\x00\x00", "not coded frames"),  # end of sequence
        (b"\x17\x01\x00\x00", "not coded frames"),  # short
        (b"\x1c\x01\x00\x00\x00x", "codec does not match"),  # legacy HEVC on an AVC track
        (b"\x91hvc1\x00\x00\x00x", "codec does not match"),
        (b"\x91avc1\x00\x00", "truncated video payload"),
        (b"\x92avc1", "not coded frames"),
        (b"\x96\x01avc1\x00", "codec does not match"),  # multitrack is not supported
        (b"\x97\x05\x00", "truncated video payload"),
    ],
)
def test_fragment_video_errors(
    fm: ModuleType, h264: FlvMedia, payload: bytes, message: str
) -> None:
    m = fm.Muxer(fm.video_track(h264.video_header), fm.audio_track(h264.audio_header))
    with pytest.raises(FLVError, match=message):
        m.fragment(1, [(0, avc_frame(True, 0, b"ok")), (1, payload)])


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "empty audio payload"),
        (b"\xaf\x00\x12\x10", "not a raw AAC frame"),
        (b"\xaf", "not a raw AAC frame"),
        (b"\x2f\x01", "not a raw AAC frame"),
        (b"\x91Opus\x00", "not a raw AAC frame"),
        (b"\x90mp4a\x12\x10", "not a raw AAC frame"),
        (b"\x91mp4", "truncated audio payload"),
    ],
)
def test_fragment_audio_errors(
    fm: ModuleType, h264: FlvMedia, payload: bytes, message: str
) -> None:
    m = fm.Muxer(fm.video_track(h264.video_header), fm.audio_track(h264.audio_header))
    with pytest.raises(FLVError, match=message):
        m.fragment(1, [], [(0, aac_frame(b"ok")), (1, payload)])


def test_fragment_accepts_bytes_like(fm: ModuleType, h264: FlvMedia) -> None:
    m = fm.Muxer(fm.video_track(h264.video_header))
    frame = avc_frame(True, 0, b"abc")
    expected = m.fragment(1, [(0, frame)])
    assert m.fragment(1, [(0, bytearray(frame))]) == expected
    assert m.fragment(1, ((0, memoryview(frame)),)) == expected
    assert m.fragment(1, iter([(0, frame)])) == expected


# --------------------------------------------------------------------------------------------
# Differential: same bytes or the same exception, whatever comes in


def outcome(fn: Callable[..., object], *args: object) -> tuple:
    """What a call did: ("ok", result) or ("raise", exception class, message)."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # the exception *is* the result being compared
        return ("raise", type(exc), str(exc))


AVC_RECORD = bytes.fromhex(  # x264's, 640x360
    "0164001effe1001a6764001eacd940a02ff970110000030001000003003c0f162d9601000668ebe3cb22c0"
    "fdf8f800"
)
HEVC_HEADER = (
    b"\x90hvc1\x01\x01\x60\x00\x00\x00\x90\x00\x00\x00\x00\x00\x5d\xf0\x00\xfc\xfd\xf8\xf8"
    b"\x00\x00\x0f\x01\xa1\x00\x01\x00\x0b\x42\x01\x01\x01\x60\x00\x00\x03\x00\x90\x00"
)

DIFF = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

timestamps = st.integers(0, 5000) | st.integers(-3, 2**41) | st.sampled_from([0, 2**40 - 1])


@st.composite
def video_payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 4))
    body = draw(st.binary(max_size=12))
    if kind == 0:
        return body
    if kind == 1:  # legacy AVC-style
        return bytes([draw(st.sampled_from([0x17, 0x27, 0x1C, 0x2D, 0x12])),
                      draw(st.integers(0, 2))]) + body  # fmt: skip
    first = 0x80 | draw(st.integers(0, 7)) << 4 | draw(st.sampled_from([0, 1, 2, 3, 5, 6, 7]))
    out = bytes([first])
    if first & 0x0F == 7:  # a ModEx chain
        size = draw(st.integers(1, 300))
        out += bytes([size - 1]) if size <= 255 else b"\xff" + (size - 1).to_bytes(2, "big")
        out += bytes(size) + bytes([draw(st.integers(0, 255))])
    return out + draw(st.sampled_from([b"avc1", b"hvc1", b"av01", b"vp09", b"hvc"])) + body


@st.composite
def audio_payloads(draw: st.DrawFn) -> bytes:
    body = draw(st.binary(max_size=12))
    head = draw(st.sampled_from([b"\xaf\x01", b"\xaf\x00", b"\xaf", b"\x91mp4a", b"\x90mp4a",
                                 b"\x91Opus", b"\x2f", b"", b"\x97\x00\x00\x01mp4a"]))  # fmt: skip
    return head + body


def tracks(module: ModuleType) -> list[tuple]:
    avc = module.video_track(b"\x17\x00\x00\x00\x00" + AVC_RECORD)
    hevc = module.video_track(HEVC_HEADER, 640, 360)
    aac = module.audio_track(b"\xaf\x00\x12\x10")
    return [(avc, aac), (hevc, None), (None, aac), (avc, None)]


@compiled
def test_diff_tracks_agree() -> None:
    assert tracks(PY) == tracks(CY)
    for video, audio in tracks(PY):
        assert PY.Muxer(video, audio).init_segment() == CY.Muxer(video, audio).init_segment()


@compiled
@DIFF
@given(
    which=st.integers(0, 3),
    seq=st.integers(-1, 2**32) | st.integers(0, 5),
    video=st.lists(st.tuples(timestamps, video_payloads()), max_size=6),
    audio=st.lists(st.tuples(timestamps, audio_payloads()), max_size=6),
    ends=st.tuples(st.integers(-2, 6000), st.integers(-2, 6000)),
)
def test_diff_fragment(which: int, seq: int, video: list, audio: list, ends: tuple) -> None:
    py = PY.Muxer(*tracks(PY)[which])
    cy = CY.Muxer(*tracks(CY)[which])
    expected = outcome(py.fragment, seq, video, audio, *ends)
    assert expected == outcome(cy.fragment, seq, video, audio, *ends)
    if expected[0] == "ok":
        parse_fragment(expected[1])  # and it is well-formed


@compiled
@DIFF
@given(
    which=st.integers(0, 3),
    video=st.lists(st.tuples(st.integers(0, 10**6), st.binary(max_size=40)), max_size=4),
    audio=st.lists(st.tuples(st.integers(0, 10**6), st.binary(max_size=40)), max_size=4),
)
def test_diff_fragment_of_valid_frames(which: int, video: list, audio: list) -> None:
    # Well-formed frames with random contents and timing: always muxed, identically.
    video = sorted((ts, avc_frame(ts % 3 == 0, ts % 200 - 100, d)) for ts, d in video)
    if tracks(PY)[which][0] is not None and tracks(PY)[which][0].codec == "hvc1":
        video = [(ts, b"\x93hvc1" + p[5:]) for ts, p in video]
    audio = sorted((ts, aac_frame(d)) for ts, d in audio)
    video = video if tracks(PY)[which][0] is not None else []
    audio = audio if tracks(PY)[which][1] is not None else []
    expected = outcome(PY.Muxer(*tracks(PY)[which]).fragment, 9, video, audio)
    assert expected == outcome(CY.Muxer(*tracks(CY)[which]).fragment, 9, video, audio)
    if video or audio:
        assert expected[0] == "ok"
        got = parse_fragment(expected[1])
        assert got["mdat"] == b"".join(p[5:] for _, p in video) + b"".join(
            p[2:] for _, p in audio
        )


@compiled
@DIFF
@given(payload=video_payloads() | st.binary(max_size=64), width=st.integers(-1, 70000))
def test_diff_video_track(payload: bytes, width: int) -> None:
    for end in range(len(payload) + 1):
        args = (payload[:end], width, width)
        assert outcome(PY.video_track, *args) == outcome(CY.video_track, *args)


@compiled
@DIFF
@given(payload=audio_payloads() | st.binary(max_size=16))
def test_diff_audio_track(payload: bytes) -> None:
    for end in range(len(payload) + 1):
        assert outcome(PY.audio_track, payload[:end]) == outcome(CY.audio_track, payload[:end])


@compiled
@DIFF
@given(data=st.binary(max_size=48))
def test_diff_parameter_sets(data: bytes) -> None:
    for fn in ("avc_sps_dimensions", "hevc_sps_dimensions", "av1_sequence_dimensions"):
        for head in (b"", b"\x67", b"\x42\x01", b"\x0a"):
            arg = head + data
            assert outcome(getattr(PY, fn), arg) == outcome(getattr(CY, fn), arg), fn


@compiled
def test_diff_odd_arguments() -> None:
    odd = [None, 1.5, "x", [1], (1, 2, 3), memoryview(b"abcd")[::2]]
    for value in odd:
        for fn in (PY.video_track, PY.audio_track):
            other = getattr(CY, fn.__name__)
            assert outcome(fn, value) == outcome(other, value), (fn, value)
        py = PY.Muxer(*tracks(PY)[0])
        cy = CY.Muxer(*tracks(CY)[0])
        for args in ((value,), (1, value), (1, [], value), (1, [value]), (1, [(value, b"")]),
                     (1, [(0, value)]), (1, [(0, b"\x17\x01\x00\x00\x00")], [], value)):  # fmt: skip
            assert outcome(py.fragment, *args) == outcome(cy.fragment, *args), args
        assert outcome(PY.Muxer, value) == outcome(CY.Muxer, value)


# --------------------------------------------------------------------------------------------
# Real tools read what we write


def mux_file(fm: ModuleType, media: FlvMedia, frames: int = 10) -> bytes:
    """init + fragments of ``frames`` video frames (or 20 audio frames) with the audio that
    falls in each, the way the segmenter cuts them: every sample's end is known."""
    video_track = fm.video_track(media.video_header) if media.video_header else None
    audio_track = fm.audio_track(media.audio_header) if media.audio_header else None
    m = fm.Muxer(video_track, audio_track)
    video, audio = media.video, media.audio
    out = [m.init_segment()]
    seq = 1
    a = 0
    step = frames if video else 20
    for i in range(0, max(len(video), len(audio)), step):
        vs = video[i : i + step]
        vend = video[i + step][0] if i + step < len(video) else -1
        if video:
            cut = vend if vend >= 0 else 2**40
            j = a
            while j < len(audio) and audio[j][0] < cut:
                j += 1
        else:
            j = min(a + step, len(audio))
        aud = audio[a:j]
        aend = audio[j][0] if j < len(audio) else -1
        a = j
        if vs or aud:
            out.append(m.fragment(seq, vs, aud, vend, aend))
            seq += 1
    if a < len(audio):
        out.append(m.fragment(seq, [], audio[a:]))
    return b"".join(out)


def check_with_ffprobe(path: Path, media: FlvMedia, codec: str, size: tuple[int, int]) -> None:
    info = ffprobe_json(path, "-show_streams", "-show_packets")
    streams = {s["codec_type"]: s for s in info["streams"]}
    assert streams["video"]["codec_name"] == codec
    assert (streams["video"]["width"], streams["video"]["height"]) == size
    if media.audio_header:
        assert streams["audio"]["codec_name"] == "aac"
        assert int(streams["audio"]["sample_rate"]) == 44100
    by_stream: dict[str, list] = {"video": [], "audio": []}
    index = {s["index"]: s["codec_type"] for s in info["streams"]}
    for packet in info["packets"]:
        by_stream[index[packet["stream_index"]]].append(packet)
    video = by_stream["video"]
    assert len(video) == len(media.video)
    dts = [int(p["dts"]) for p in video]
    assert dts == sorted(set(dts)), "video DTS must increase monotonically"
    assert dts == [ts * 90 for ts, _ in media.video]
    keyframes = [key for t, _, _, key in media.tags if t == 9]
    assert [p["flags"].startswith("K") for p in video] == keyframes
    assert sum(keyframes) >= 2
    # ffprobe finds H.264/HEVC keyframes in the bitstream itself, so read our sample flags too.
    data = path.read_bytes()
    top = boxes(data)
    flags = []
    for (kind, start, _), (_, _, end) in zip(top, top[1:], strict=False):
        if kind == "moof":
            flags += [f for _, _, f, _ in parse_fragment(data[start - 8 : end]).get(1, {
                "samples": []})["samples"]]  # fmt: skip
    assert flags == [0x02000000 if key else 0x01010000 for key in keyframes]
    if media.audio_header:
        adts = [int(p["dts"]) for p in by_stream["audio"]]
        assert len(adts) == len(media.audio) and adts == sorted(set(adts))
    assert decode_errors(path) == ""


@pytest.mark.ffmpeg
@pytest.mark.parametrize("recording", ["h264", "h264_bframes"])
def test_ffprobe_reads_h264_aac(
    fm: ModuleType, recording: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    media: FlvMedia = request.getfixturevalue(recording)
    path = tmp_path / "out.mp4"
    path.write_bytes(mux_file(fm, media))
    check_with_ffprobe(path, media, "h264", (640, 360))
    if recording == "h264_bframes":
        # Composition offsets survive: PTS = DTS + CTS for every frame, and some are non-zero.
        info = ffprobe_json(path, "-select_streams", "v", "-show_packets")
        cts = [int.from_bytes(p[2:5], "big", signed=True) for _, p in media.video]
        offsets = [int(p["pts"]) - int(p["dts"]) for p in info["packets"]]
        assert offsets == [c * 90 for c in cts] and any(offsets)


@pytest.mark.ffmpeg
def test_ffprobe_reads_hevc_from_enhanced_rtmp(
    fm: ModuleType, hevc: FlvMedia, tmp_path: Path
) -> None:
    path = tmp_path / "hevc.mp4"
    path.write_bytes(mux_file(fm, hevc))
    check_with_ffprobe(path, hevc, "hevc", (640, 360))
    info = ffprobe_json(path, "-show_streams")
    assert info["streams"][0]["codec_tag_string"] == "hvc1"


@pytest.mark.ffmpeg
def test_ffprobe_reads_av1_from_enhanced_rtmp(fm: ModuleType, tmp_path: Path) -> None:
    media = av1_ertmp_media(tmp_path / "x.obu")
    track = fm.video_track(media.video_header)
    assert (track.codec, track.width, track.height) == ("av01", 640, 360)
    path = tmp_path / "av1.mp4"
    path.write_bytes(mux_file(fm, media))
    info = ffprobe_json(path, "-show_streams", "-show_packets")
    (stream,) = info["streams"]
    assert (stream["codec_name"], stream["codec_tag_string"]) == ("av1", "av01")
    assert (stream["width"], stream["height"]) == (640, 360)
    dts = [int(p["dts"]) for p in info["packets"]]
    assert len(dts) == len(media.video) and dts == sorted(set(dts))
    assert info["packets"][0]["flags"].startswith("K")
    assert decode_errors(path) == ""


@compiled
@pytest.mark.ffmpeg
def test_twins_write_the_same_file(h264_bframes: FlvMedia, hevc: FlvMedia) -> None:
    assert mux_file(PY, h264_bframes) == mux_file(CY, h264_bframes)
    assert mux_file(PY, hevc, 7) == mux_file(CY, hevc, 7)
