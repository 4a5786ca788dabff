"""AMF codec benchmarks: the compiled codec against its pure-Python twin, side by side.

    .venv/bin/python -m pytest -q bench/test_bench_amf.py --benchmark-only

Each group is one payload and one direction with both implementations in it, so the table's
relative column (the multiples in parentheses) is the speed-up of the compiled codec.  The
payloads are the messages a media node handles on every publish: the ``connect`` command as OBS
sends it, ``@setDataFrame``/``onMetaData`` as OBS and ffmpeg send it, and the ``_result`` reply.
"""

from __future__ import annotations

import pytest
from amf_samples import CONNECT_RESULT, OBS_CONNECT, ON_METADATA  # bench/conftest.py: on sys.path

from watchbuy.engine import _amf_py

_amf = pytest.importorskip(
    "watchbuy.engine._amf", reason="no compiled amf codec to pair with its twin"
)

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
