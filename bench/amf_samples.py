"""AMF0 messages a media node handles on every publish, in the shapes real peers send them: the
``connect`` command as OBS sends it, ``@setDataFrame``/``onMetaData`` as OBS sends it (ffmpeg's
differs only in values), and the ``_result`` reply a server gives.

One home for both the codec tests (tests/test_amf.py) and the codec benchmarks
(bench/test_bench_amf.py), so what is tested is what is measured.
"""

from __future__ import annotations

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
