# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""fMP4/CMAF muxing of FLV media for LL-HLS (compiled; twin of ``_fmp4_py.py``).

Same API, bytes and error texts as the pure-Python twin, whose docstring explains the format
and the timing rules.  The cold paths (sequence headers, parameter-set parsing, the init
segment: once per stream) are the twin's own functions, imported; the hot path,
:meth:`Muxer.fragment`, parses the FLV sample headers in C, sizes the whole ``moof`` + ``mdat``
first, allocates one ``bytes`` object and writes boxes and sample data straight into it, so
each payload byte is copied exactly once.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

from operator import index

from watchbuy.engine.errors import FLVError

# The cold paths (sequence headers, parameter sets, the init segment: once per stream) are the
# twin's own functions: one copy of that code.  What is compiled below is the hot path.
from watchbuy.engine._fmp4_py import (  # noqa: F401 - the public API, re-exported
    AAC_FRAME_SAMPLES,
    AUDIO_TRACK_ID,
    MAX_TIMESTAMP,
    NOMINAL_VIDEO_DURATION,
    NON_SYNC_FLAGS,
    SYNC_FLAGS,
    VIDEO_TIMESCALE,
    VIDEO_TRACK_ID,
    Track,
    _check_track,
    _make_init,
    _pair,
    _payload_bytes,
    _samples_end,
    _timestamp,
    audio_track,
    av1_sequence_dimensions,
    avc_sps_dimensions,
    hevc_sps_dimensions,
    video_track,
)

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


include "_modex.pxi"


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
    pos = _skip_modex(p, n, &packet_type)
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
        pos = _skip_modex(p, n, &packet_type)
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
