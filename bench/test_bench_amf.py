"""AMF codec benchmarks: the compiled codec against its pure-Python twin, side by side.

    .venv/bin/python -m pytest -q bench/test_bench_amf.py --benchmark-only

Each group is one payload and one direction with both implementations in it, so the table's
relative column (the multiples in parentheses) is the speed-up of the compiled codec.  The
payloads are the messages a media node handles on every publish: the ``connect`` command as OBS
sends it, ``@setDataFrame``/``onMetaData`` as OBS and ffmpeg send it, and the ``_result`` reply.
"""

from __future__ import annotations

import pytest

from watchbuy.engine import _amf, _amf_py
from watchbuy.engine.amf_types import ECMAArray

OBS_CONNECT = [
    "connect",
    1.0,
    {
        "app": "live",
        "type": "nonprivate",
        "flashVer": "FMLE/3.0 (compatible; FMSc/1.0)",
        "swfUrl": "rtmp://127.0.0.1:1935/live",
        "tcUrl": "rtmp://127.0.0.1:1935/live",
    },
]

ON_METADATA = [
    "@setDataFrame",
    "onMetaData",
    ECMAArray(
        duration=0.0,
        width=1920.0,
        height=1080.0,
        videodatarate=6000.0,
        framerate=30.0,
        videocodecid=7.0,
        audiodatarate=160.0,
        audiosamplerate=48000.0,
        audiosamplesize=16.0,
        stereo=True,
        audiocodecid=10.0,
        encoder="obs-output module (libobs version 30.0.2)",
        filesize=0.0,
    ),
]

CONNECT_RESULT = [
    "_result",
    1.0,
    {"fmsVer": "FMS/3,0,1,123", "capabilities": 31.0},
    {
        "level": "status",
        "code": "NetConnection.Connect.Success",
        "description": "Connection succeeded.",
        "objectEncoding": 0.0,
    },
]

PAYLOADS = {"connect": OBS_CONNECT, "onMetaData": ON_METADATA, "_result": CONNECT_RESULT}

# A compiled call takes a few hundred nanoseconds: min_time makes every round run many
# iterations, so the timer's own overhead (tens of nanoseconds a reading) is not counted as codec
# time, which would understate the speed-up.
pytestmark = pytest.mark.benchmark(
    min_time=0.00005, max_time=0.5, warmup=True, warmup_iterations=2000
)

implementations = pytest.mark.parametrize("impl", [_amf, _amf_py], ids=["cython", "python"])
payloads = pytest.mark.parametrize("name", list(PAYLOADS))


@payloads
@implementations
def test_decode_amf0(benchmark, impl, name):
    values = PAYLOADS[name]
    wire = _amf_py.encode_amf0(*values)
    benchmark.group = f"amf0 decode {name}"
    result = benchmark(impl.decode_amf0, wire)
    assert result == values


@payloads
@implementations
def test_encode_amf0(benchmark, impl, name):
    values = PAYLOADS[name]
    benchmark.group = f"amf0 encode {name}"
    result = benchmark(impl.encode_amf0, *values)
    assert result == _amf_py.encode_amf0(*values)
