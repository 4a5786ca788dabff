"""AMF codec: one suite run against the compiled codec and its pure-Python twin, plus
differential tests that feed both the same random and adversarial input and demand the same
outcome (equal values of equal types, or the same exception class with the same message)."""

from __future__ import annotations

import array
import enum
import gc
import math
import os
import struct
import sys
import tracemalloc
import types

import pytest
from amf_wire import END, key, num, s0, u29
from conftest import codec_implementations, needs_compiled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.amf_samples import CONNECT_RESULT, OBS_CONNECT, ON_METADATA  # see conftest.py
from watchbuy.engine.amf_types import UNDEFINED, AMFDate, ECMAArray, TypedObject, XMLDocument
from watchbuy.engine.errors import AMFError, ProtocolError

CODECS = codec_implementations("amf")
IMPLEMENTATIONS = list(CODECS.values())
_amf_py = CODECS["python"]
_amf = CODECS.get("cython")  # None without the compiled codec: its tests are skipped


@pytest.fixture(params=IMPLEMENTATIONS, ids=list(CODECS))
def amf(request):
    return request.param


def s3(text: str) -> bytes:
    """AMF3 inline UTF-8-vr (no marker)."""
    raw = text.encode()
    return u29(len(raw) << 1 | 1) + raw


def canon(value: object) -> object:
    """A strict, comparable form: types included, floats by their bits (NaN, -0.0)."""
    kind = type(value)
    if kind is float:
        return ("float", struct.pack(">d", value))
    if kind in (bool, int, str, bytes, type(None)):
        return (kind.__name__, value)
    if kind is XMLDocument:
        return ("xml", str(value))
    if value is UNDEFINED:
        return ("undefined",)
    if kind is AMFDate:
        return ("date", canon(value.milliseconds), canon(value.timezone))
    if kind is list:
        return ("list", [canon(item) for item in value])
    if kind in (dict, ECMAArray, TypedObject):
        return (
            kind.__name__,
            getattr(value, "class_name", None),
            [(canon(k), canon(v)) for k, v in value.items()],
        )
    raise AssertionError(f"unexpected type in a decoded value: {kind!r}")


def outcome(func, *args, **kwargs) -> tuple:
    try:
        return ("ok", canon(func(*args, **kwargs)))
    except Exception as exc:  # noqa: BLE001 - the class is part of what is compared
        return ("error", type(exc), str(exc))


def encode_outcome(func, *args) -> tuple:
    try:
        return ("ok", func(*args))
    except Exception as exc:  # noqa: BLE001
        return ("error", type(exc), str(exc))


def expected(value: object) -> object:
    """What decoding the AMF0 encoding of ``value`` gives back."""
    if isinstance(value, bool) or value is None or value is UNDEFINED:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (XMLDocument,)):
        return XMLDocument(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, AMFDate):
        return AMFDate(float(value.milliseconds), value.timezone)
    if isinstance(value, (list, tuple)):
        return [expected(item) for item in value]
    if isinstance(value, ECMAArray):
        return ECMAArray({k: expected(v) for k, v in value.items()})
    if isinstance(value, TypedObject):
        return TypedObject(value.class_name, {k: expected(v) for k, v in value.items()})
    return {k: expected(v) for k, v in value.items()}


@needs_compiled("amf")
def test_compiled_module_is_really_compiled():
    assert not _amf.__file__.endswith(".py"), _amf.__file__
    assert _amf_py.__file__.endswith(".py")


@needs_compiled("amf")
def test_same_public_names():
    for name in ("decode_amf0", "decode_amf3", "encode_amf0"):
        assert callable(getattr(_amf, name)) and callable(getattr(_amf_py, name))
    assert _amf.MAX_DEPTH_LIMIT == _amf_py.MAX_DEPTH_LIMIT
    assert _amf.ENCODE_MAX_DEPTH == _amf_py.ENCODE_MAX_DEPTH == 64


def test_amf_error_is_a_protocol_error():
    assert issubclass(AMFError, ProtocolError)


# ------------------------------------------------------------------------------ AMF0 encoding


def test_encode_obs_connect_bytes(amf):
    wire = (
        s0("connect")
        + num(1.0)
        + b"\x03"
        + key("app") + s0("live")
        + key("type") + s0("nonprivate")
        + key("flashVer") + s0("FMLE/3.0 (compatible; FMSc/1.0)")
        + key("swfUrl") + s0("rtmp://127.0.0.1:1935/live")
        + key("tcUrl") + s0("rtmp://127.0.0.1:1935/live")
        + END
    )  # fmt: skip
    assert amf.encode_amf0(*OBS_CONNECT) == wire
    assert amf.decode_amf0(wire) == OBS_CONNECT


@pytest.mark.parametrize(
    "value, wire",
    [
        (0.5, num(0.5)),
        (-0.0, num(-0.0)),
        (3, num(3.0)),
        (True, b"\x01\x01"),
        (False, b"\x01\x00"),
        (None, b"\x05"),
        (UNDEFINED, b"\x06"),
        ("", b"\x02\x00\x00"),
        ("é", b"\x02\x00\x02\xc3\xa9"),
        ({}, b"\x03" + END),
        ({"a": None}, b"\x03" + key("a") + b"\x05" + END),
        (ECMAArray(a=1.0), b"\x08\x00\x00\x00\x01" + key("a") + num(1.0) + END),
        (ECMAArray(), b"\x08\x00\x00\x00\x00" + END),
        ([], b"\x0a\x00\x00\x00\x00"),
        ((1, "x"), b"\x0a\x00\x00\x00\x02" + num(1.0) + s0("x")),
        (AMFDate(1.5, -60), b"\x0b" + struct.pack(">dh", 1.5, -60)),
        (XMLDocument("<a/>"), b"\x0f\x00\x00\x00\x04<a/>"),
        (TypedObject("Foo", x=1.0), b"\x10" + key("Foo") + key("x") + num(1.0) + END),
    ],
)
def test_encode_known_bytes(amf, value, wire):
    assert amf.encode_amf0(value) == wire


def test_encode_nothing(amf):
    assert amf.encode_amf0() == b""


def test_encode_long_string_switch(amf):
    exact = "x" * 0xFFFF
    assert amf.encode_amf0(exact)[:3] == b"\x02\xff\xff"
    longer = "x" * 0x10000
    wire = amf.encode_amf0(longer)
    assert wire[:5] == b"\x0c\x00\x01\x00\x00" and len(wire) == 5 + 0x10000
    # The limit is in UTF-8 bytes, not characters.
    wide = "é" * 0x8000
    assert amf.encode_amf0(wide)[:1] == b"\x0c"
    assert amf.decode_amf0(amf.encode_amf0(longer, wide)) == [longer, wide]


def test_encode_bool_is_not_a_number(amf):
    assert amf.encode_amf0(True, 1) == b"\x01\x01" + num(1.0)


def test_encode_subclasses(amf):
    class Color(enum.IntEnum):
        RED = 2

    class Text(str):
        pass

    class Real(float):
        pass

    wire = amf.encode_amf0(Color.RED, Text("hi"), Real(0.25), types.MappingProxyType({"k": 1}))
    assert wire == num(2.0) + s0("hi") + num(0.25) + b"\x03" + key("k") + num(1.0) + END


@pytest.mark.parametrize(
    "value, message",
    [
        (b"raw", "cannot encode bytes as AMF0"),
        ({1, 2}, "cannot encode set as AMF0"),
        (object(), "cannot encode object as AMF0"),
        (1j, "cannot encode complex as AMF0"),
        ({1: "a"}, "AMF0 object keys must be str, not int"),
        (ECMAArray({None: 1}), "AMF0 object keys must be str, not NoneType"),
        ({"k" * 0x10000: 1}, "AMF0 object key longer than 65535 bytes"),
        (2**1024, "int too large to encode as an AMF0 number"),
        ("\ud800", "str with surrogates cannot be encoded as UTF-8"),
        ({"\udfff": 1}, "str with surrogates cannot be encoded as UTF-8"),
        (AMFDate(0.0, 40000), "AMFDate timezone must be an int in -32768..32767"),
        (AMFDate(0.0, 1.5), "AMFDate timezone must be an int in -32768..32767"),
        (AMFDate("soon", 0), "AMFDate milliseconds must be a number"),
        (AMFDate(2**1024, 0), "int too large to encode as an AMF0 number"),
        (TypedObject(7), "TypedObject class_name must be str"),
        (TypedObject("C" * 0x10000), "AMF0 typed object class name longer than 65535 bytes"),
        ([1, [b"x"]], "cannot encode bytes as AMF0"),
    ],
)
def test_encode_errors(amf, value, message):
    with pytest.raises(AMFError) as info:
        amf.encode_amf0(value)
    assert str(info.value) == message


def nested_lists(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def nested_dicts(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


def test_encode_depth_limit(amf):
    for build in (nested_lists, nested_dicts):
        wire = amf.encode_amf0(build(64))
        assert amf.decode_amf0(wire) == [build(64)]
        with pytest.raises(AMFError, match="^AMF nesting deeper than 64 levels$"):
            amf.encode_amf0(build(65))


def test_encode_cycle_is_an_error(amf):
    loop: list = []
    loop.append(loop)
    with pytest.raises(AMFError, match="nesting deeper"):
        amf.encode_amf0(loop)
    obj: dict = {}
    obj["self"] = obj
    with pytest.raises(AMFError, match="nesting deeper"):
        amf.encode_amf0(obj)


def test_encode_large_message_outgrows_stack_buffer(amf):
    values = [{f"k{i}": "v" * i for i in range(300)}, list(range(500))]
    wire = amf.encode_amf0(*values)
    assert len(wire) > 40000
    assert amf.decode_amf0(wire) == [expected(v) for v in values]


# ------------------------------------------------------------------------------ AMF0 decoding


@pytest.mark.parametrize("values", [OBS_CONNECT, ON_METADATA, CONNECT_RESULT])
def test_round_trip_realistic(amf, values):
    decoded = amf.decode_amf0(amf.encode_amf0(*values))
    assert canon(decoded) == canon(values)
    assert type(decoded[-1]) is type(values[-1])


def test_decode_empty(amf):
    assert amf.decode_amf0(b"") == []
    assert amf.decode_amf3(b"") == []


def test_decode_all_types(amf):
    wire = (
        num(2.5) + b"\x01\x07" + s0("hé") + b"\x05\x06\x0d"
        + b"\x0c\x00\x00\x00\x03abc"
        + b"\x0f\x00\x00\x00\x04<x/>"
        + b"\x0b" + struct.pack(">dh", 1e12, -120)
        + b"\x10" + key("Cls") + key("a") + b"\x05" + END
        + b"\x08\x00\x00\x00\x63" + key("n") + num(1.0) + END  # wrong count: ignored
        + b"\x0a\x00\x00\x00\x02\x05\x06"
    )  # fmt: skip
    got = amf.decode_amf0(wire)
    assert canon(got) == canon(
        [
            2.5,
            True,
            "hé",
            None,
            UNDEFINED,
            None,
            "abc",
            XMLDocument("<x/>"),
            AMFDate(1e12, -120),
            TypedObject("Cls", a=None),
            ECMAArray(n=1.0),
            [None, UNDEFINED],
        ]
    )


def test_decode_empty_key_property(amf):
    # An empty key not followed by 0x09 is a property named "".
    wire = b"\x03" + key("") + num(1.0) + key("b") + b"\x05" + END
    assert amf.decode_amf0(wire) == [{"": 1.0, "b": None}]
    assert amf.decode_amf0(amf.encode_amf0({"": "x"})) == [{"": "x"}]


def test_decode_duplicate_keys_last_wins(amf):
    wire = b"\x03" + key("a") + num(1.0) + key("a") + num(2.0) + END
    assert amf.decode_amf0(wire) == [{"a": 2.0}]


def test_decode_input_types(amf):
    wire = amf.encode_amf0(*OBS_CONNECT)
    padded = b"zz" + wire + b"zz"
    for data in (
        wire,
        bytearray(wire),
        memoryview(wire),
        memoryview(padded)[2:-2],
        memoryview(bytearray(padded))[2:-2],
    ):
        assert amf.decode_amf0(data) == OBS_CONNECT
    # Non-contiguous and non-byte buffers are read as their raw bytes, in order.
    strided = bytes(b for pair in zip(wire, b"?" * len(wire), strict=True) for b in pair)
    assert amf.decode_amf0(memoryview(strided)[::2]) == OBS_CONNECT
    words = array.array("H", [0x0505, 0x0606])  # same bytes in either byte order
    assert amf.decode_amf0(words) == [None, None, UNDEFINED, UNDEFINED]


@needs_compiled("amf")
def test_decode_releases_bytearray_export():
    # The compiled decoder holds a buffer export (which stops resizing) only while it decodes.
    data = bytearray(_amf.encode_amf0(*OBS_CONNECT))
    _amf.decode_amf0(data)
    data.extend(b"\x05")
    assert _amf.decode_amf0(data)[-1] is None


@pytest.mark.parametrize("bad", ["text", 5, None, 1.5])
def test_decode_rejects_non_buffers_alike(bad):
    results = {outcome(impl.decode_amf0, bad) for impl in IMPLEMENTATIONS}
    assert len(results) == 1
    assert next(iter(results))[1] is TypeError


def test_references(amf):
    wire = (
        b"\x0a\x00\x00\x00\x02"  # ref 0: the strict array
        + b"\x03" + key("a") + num(1.0) + END  # ref 1
        + b"\x08\x00\x00\x00\x00" + END  # ref 2
        + b"\x07\x00\x01" + b"\x07\x00\x02" + b"\x07\x00\x00"
    )  # fmt: skip
    arr, obj, ecma, arr_again = amf.decode_amf0(wire)
    assert obj is arr[0] and ecma is arr[1] and arr_again is arr
    assert obj == {"a": 1.0} and type(ecma) is ECMAArray


@pytest.mark.parametrize(
    "wire, message",
    [
        (b"\x07\x00\x00", "AMF0 reference 0 out of range"),
        (b"\x03" + END + b"\x07\x00\x01", "AMF0 reference 1 out of range"),
        (b"\x07\xff\xff", "AMF0 reference 65535 out of range"),
        (
            b"\x03" + key("me") + b"\x07\x00\x00" + END,
            "AMF0 reference 0 points to an incomplete object",
        ),
        (b"\x0a\x00\x00\x00\x01\x07\x00\x00", "AMF0 reference 0 points to an incomplete object"),
    ],
)
def test_reference_errors(amf, wire, message):
    with pytest.raises(AMFError) as info:
        amf.decode_amf0(wire)
    assert str(info.value) == message


def test_many_references_in_one_message(amf):
    # More objects than the compiled decoder keeps inline, then references to early and late ones.
    count = 300
    wire = b"".join(b"\x03" + key("i") + num(float(i)) + END for i in range(count))
    wire += b"\x07\x00\x00" + b"\x07" + struct.pack(">H", count - 1)
    got = amf.decode_amf0(wire)
    assert got[count] is got[0] and got[count + 1] is got[count - 1]
    assert got[count - 1] == {"i": float(count - 1)}


AMF0_ERRORS = [
    (b"\x00\x01", "truncated AMF0 number"),
    (b"\x01", "truncated AMF0 boolean"),
    (b"\x02\x00", "truncated AMF0 string"),
    (b"\x02\x00\x05ab", "truncated AMF0 string"),
    (b"\x02\x00\x01\xff", "invalid UTF-8 in AMF0 string"),
    (b"\x02\x00\x03\xed\xa0\x80", "invalid UTF-8 in AMF0 string"),  # an encoded surrogate
    (b"\x03", "truncated AMF0 object key"),
    (b"\x03\x00", "truncated AMF0 object key"),
    (b"\x03\x00\x05ab", "truncated AMF0 object key"),
    (b"\x03\x00\x01\xfe\x05" + END, "invalid UTF-8 in AMF0 string"),
    (b"\x03\x00\x01a", "truncated AMF0 value"),
    (b"\x03\x00\x00", "truncated AMF0 value"),
    (b"\x03\x00\x01a\x09", "unexpected AMF0 object-end marker"),
    (b"\x09", "unexpected AMF0 object-end marker"),
    (b"\x04", "unknown AMF0 marker 0x04"),
    (b"\x0e", "unknown AMF0 marker 0x0e"),
    (b"\x12", "unknown AMF0 marker 0x12"),
    (b"\xff", "unknown AMF0 marker 0xff"),
    (b"\x08\x00\x00", "truncated AMF0 ECMA array count"),
    (b"\x08\x00\x00\x00\x00", "truncated AMF0 object key"),
    (b"\x0a\x00\x00", "truncated AMF0 strict array count"),
    (b"\x0a\x00\x00\x00\x05\x05", "AMF0 strict array count 5 exceeds the remaining 1 bytes"),
    (b"\x0a\xff\xff\xff\xff", "AMF0 strict array count 4294967295 exceeds the remaining 0 bytes"),
    (b"\x0a\x00\x00\x00\x02\x02\x00\x01", "truncated AMF0 string"),
    (b"\x0b" + bytes(9), "truncated AMF0 date"),
    (b"\x0c\x00\x00\x00", "truncated AMF0 long string"),
    (b"\x0c\x00\x00\x00\x05ab", "truncated AMF0 long string"),
    (b"\x0c\xff\xff\xff\xff", "truncated AMF0 long string"),
    (b"\x0c\x00\x00\x00\x01\x80", "invalid UTF-8 in AMF0 string"),
    (b"\x0f\x00\x00", "truncated AMF0 XML document"),
    (b"\x0f\x00\x00\x00\x09<", "truncated AMF0 XML document"),
    (b"\x10\x00", "truncated AMF0 typed object class name"),
    (b"\x10\x00\x09Foo", "truncated AMF0 typed object class name"),
    (b"\x10\x00\x01\xc0" + END, "invalid UTF-8 in AMF0 string"),
    (b"\x10\x00\x01C", "truncated AMF0 object key"),
    (b"\x07\x00", "truncated AMF0 reference"),
    (b"\x11", "truncated AMF3 value"),
    (b"\x05\x05\x00", "truncated AMF0 number"),
]


@pytest.mark.parametrize("wire, message", AMF0_ERRORS)
def test_decode_amf0_errors(amf, wire, message):
    with pytest.raises(AMFError) as info:
        amf.decode_amf0(wire)
    assert str(info.value) == message


def nested_objects_wire(depth: int) -> bytes:
    return b"\x03" + (key("k") + b"\x03") * (depth - 1) + END * depth


def test_decode_depth_limit(amf):
    assert amf.decode_amf0(nested_objects_wire(64)) == [nested_dicts(64)]
    with pytest.raises(AMFError, match="^AMF nesting deeper than 64 levels$"):
        amf.decode_amf0(nested_objects_wire(65))
    assert len(amf.decode_amf0(nested_objects_wire(65), max_depth=65)) == 1
    with pytest.raises(AMFError, match="^AMF nesting deeper than 0 levels$"):
        amf.decode_amf0(b"\x0a\x00\x00\x00\x00", max_depth=0)
    assert amf.decode_amf0(b"\x05" + num(1.0), max_depth=0) == [None, 1.0]
    arrays = b"\x0a\x00\x00\x00\x01" * 3 + b"\x05"
    assert amf.decode_amf0(arrays, max_depth=3) == [[[[None]]]]
    with pytest.raises(AMFError, match="deeper than 2 levels"):
        amf.decode_amf0(arrays, max_depth=2)


def test_decode_depth_limit_cap(amf):
    limit = amf.MAX_DEPTH_LIMIT
    deep = nested_objects_wire(limit)
    assert len(amf.decode_amf0(deep, max_depth=limit)) == 1
    with pytest.raises(AMFError, match=f"deeper than {limit} levels"):
        amf.decode_amf0(nested_objects_wire(limit + 1), max_depth=limit)
    # AMF3 nests too, and counts on from the AMF0 depth it was switched to.
    amf3_arrays = b"\x09\x03\x01" * limit + b"\x01"
    assert len(amf.decode_amf3(amf3_arrays, max_depth=limit)) == 1
    wrapped = b"\x0a\x00\x00\x00\x01\x11" + b"\x09\x03\x01" * limit + b"\x01"
    with pytest.raises(AMFError, match=f"deeper than {limit} levels"):
        amf.decode_amf0(wrapped, max_depth=limit)


@pytest.mark.parametrize(
    "max_depth, exc, message",
    [
        (-1, ValueError, "max_depth must be between 0 and 256"),
        (257, ValueError, "max_depth must be between 0 and 256"),
        (2**80, ValueError, "max_depth must be between 0 and 256"),
        (-(2**80), ValueError, "max_depth must be between 0 and 256"),
        (3.0, TypeError, "max_depth must be an int, not float"),
        ("3", TypeError, "max_depth must be an int, not str"),
        (None, TypeError, "max_depth must be an int, not NoneType"),
    ],
)
def test_max_depth_argument(amf, max_depth, exc, message):
    for decode in (amf.decode_amf0, amf.decode_amf3):
        with pytest.raises(exc) as info:
            decode(b"\x05", max_depth=max_depth)
        assert str(info.value) == message
    assert amf.decode_amf0(b"\x03" + END, max_depth=True) == [{}]  # bool is an int


def test_decoded_keys_are_exact_str(amf):
    got = amf.decode_amf0(amf.encode_amf0({"k": 1, "é": 2, "x" * 40: 3}))[0]
    assert all(type(k) is str for k in got)


def test_many_distinct_short_keys(amf):
    # Far more short ASCII keys than the compiled decoder's key cache holds: evictions and
    # collisions must never return the wrong string.
    keys = [f"k{i:x}" for i in range(5000)] + ["", "a", "ab", "abcdefgh", "abcdefghi", "x" * 32]
    obj = {k: float(i) for i, k in enumerate(keys)}
    wire = amf.encode_amf0(obj, obj)
    for _ in range(2):
        first, second = amf.decode_amf0(wire)
        assert list(first) == keys and first == obj and second == obj


@needs_compiled("amf")
def test_compiled_string_cache_keeps_refcounts_stable():
    wire = s0("status") + b"\x03" + key("level") + s0("error") + END
    first = _amf.decode_amf0(wire)
    before = sys.getrefcount(first[0]), sys.getrefcount(first[1]["level"])
    for _ in range(1000):
        _amf.decode_amf0(wire)
    assert (sys.getrefcount(first[0]), sys.getrefcount(first[1]["level"])) == before


@needs_compiled("amf")
def test_compiled_codec_does_not_leak():
    samples = [
        _amf.encode_amf0(*OBS_CONNECT),
        _amf.encode_amf0(*ON_METADATA),
        _amf.encode_amf0(*CONNECT_RESULT),
        b"\x03" + END + b"\x07\x00\x00" + b"\x11\x0a\x0b\x01" + s3("k") + b"\x06\x00\x01",
        b"".join(b"\x03" + key("i") + num(float(i)) + END for i in range(40)),
    ] + [wire for wire, _ in AMF0_ERRORS]
    amf3_samples = [b"\x09\x05\x01\x04\x01\x0a\x00", b"\x0a\x0b\x01" + s3("a") + b"\x0a\x00"]
    values = [*OBS_CONNECT, [nested_lists(10)] * 20, {"k": b"bad"}, ["x" * 600, b"bad"]]

    def churn():
        for _ in range(300):
            for wire in samples:
                try:
                    _amf.decode_amf0(wire)
                except AMFError:
                    pass
            for wire in amf3_samples:
                try:
                    _amf.decode_amf3(wire)
                except AMFError:
                    pass
            for value in values:
                try:
                    _amf.encode_amf0(value)
                except AMFError:
                    pass

    churn()  # warm caches and free lists
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        churn()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown


# ------------------------------------------------------------------------------ AMF3 decoding


@pytest.mark.parametrize(
    "wire, value",
    [
        (b"\x04\x00", 0),
        (b"\x04\x7f", 127),
        (b"\x04\x81\x00", 128),
        (b"\x04\xff\x7f", 0x3FFF),
        (b"\x04\x81\x80\x00", 0x4000),
        (b"\x04\xbf\xff\xff\xff", 0x0FFFFFFF),
        (b"\x04\xc0\x80\x80\x00", -0x10000000),
        (b"\x04\xff\xff\xff\xff", -1),
        (b"\x04\xff\xff\xff\xfe", -2),
    ],
)
def test_amf3_integers(amf, wire, value):
    assert canon(amf.decode_amf3(wire)) == canon([value])


def test_amf3_scalars(amf):
    wire = b"\x00\x01\x02\x03\x05" + struct.pack(">d", -2.5)
    assert canon(amf.decode_amf3(wire)) == canon([UNDEFINED, None, False, True, -2.5])


def test_amf3_strings_and_references(amf):
    wire = (
        b"\x06\x01"  # "" (never enters the table)
        + b"\x06" + s3("abc")  # string 0
        + b"\x06" + s3("hé")  # string 1
        + b"\x06\x02"  # ref 1
        + b"\x06\x00"  # ref 0
    )  # fmt: skip
    assert amf.decode_amf3(wire) == ["", "abc", "hé", "hé", "abc"]


def test_amf3_objects_traits_and_references(amf):
    wire = (
        # typed object, inline traits: 1 sealed member, not dynamic (0x13)
        b"\x0a\x13" + s3("Point") + s3("x") + b"\x04\x01"
        # second Point via traits reference 0 (header 0x01)
        + b"\x0a\x01" + b"\x04\x02"
        # anonymous dynamic object (0x0b), keys by string reference
        + b"\x0a\x0b\x01" + b"\x02" + b"\x06\x00" + b"\x01"  # {"x": "Point"} by references
        + b"\x0a\x02"  # object reference 1 (the second Point)
    )  # fmt: skip
    first, second, anon, again = amf.decode_amf3(wire)
    assert canon(first) == canon(TypedObject("Point", x=1))
    assert canon(second) == canon(TypedObject("Point", x=2))
    assert canon(anon) == canon({"x": "Point"})
    assert again is second


def test_amf3_sealed_and_dynamic_members(amf):
    # traits: 2 sealed, dynamic (0x2b), anonymous class
    wire = b"\x0a\x2b\x01" + s3("a") + s3("b") + b"\x02\x03" + s3("c") + b"\x01\x01"
    assert canon(amf.decode_amf3(wire)) == canon([{"a": False, "b": True, "c": None}])


def test_amf3_arrays(amf):
    dense = b"\x09\x07\x01\x04\x01\x04\x02\x04\x03"
    mixed = b"\x09\x05" + s3("name") + b"\x06" + s3("v") + b"\x01\x04\x07\x02"
    got = amf.decode_amf3(dense + mixed + b"\x09\x00" + b"\x09\x02")
    assert got[0] == [1, 2, 3]
    assert type(got[1]) is ECMAArray and list(got[1].items()) == [
        ("name", "v"),
        ("0", 7),
        ("1", False),
    ]
    assert got[2] is got[0] and got[3] is got[1]


def test_amf3_date_xml_bytearray(amf):
    wire = (
        b"\x08\x01" + struct.pack(">d", 1.7e12)
        + b"\x07" + s3("<a/>")
        + b"\x0b" + s3("<b/>")
        + b"\x0c\x07\x00\x01\xff"
        + b"\x08\x00" + b"\x07\x02" + b"\x0c\x06"  # references 0, 1, 3
    )  # fmt: skip
    got = amf.decode_amf3(wire)
    assert canon(got[:4]) == canon(
        [AMFDate(1.7e12, 0), XMLDocument("<a/>"), XMLDocument("<b/>"), b"\x00\x01\xff"]
    )
    assert got[4] is got[0] and got[5] is got[1] and got[6] is got[3]


def test_amf3_vectors(amf):
    wire = (
        b"\x0d\x05\x00" + struct.pack(">ii", -1, 7)
        + b"\x0e\x05\x01" + struct.pack(">II", 0xFFFFFFFF, 7)
        + b"\x0f\x03\x00" + struct.pack(">d", 0.5)
        + b"\x0d\x01\x00"  # empty
        + b"\x0e\x02"  # reference to the uint vector
    )  # fmt: skip
    got = amf.decode_amf3(wire)
    assert canon(got) == canon([[-1, 7], [0xFFFFFFFF, 7], [0.5], [], [0xFFFFFFFF, 7]])
    assert got[4] is got[1]


def test_amf3_inside_amf0_shares_tables(amf):
    # One AMF3 context per decode_amf0 call: a later switch may refer to an earlier string.
    wire = (
        s0("call") + b"\x11\x06" + s3("abc") + b"\x11\x0a\x0b\x01\x00\x04\x05\x01" + b"\x11\x0a\x00"
    )
    got = amf.decode_amf0(wire)
    assert got[:3] == ["call", "abc", {"abc": 5}]
    assert got[3] is got[2]


AMF3_ERRORS = [
    (b"\x04", "truncated AMF3 U29 integer"),
    (b"\x04\x80\x80\x80", "truncated AMF3 U29 integer"),
    (b"\x05\x00", "truncated AMF3 double"),
    (b"\x06\x07ab", "truncated AMF3 string"),
    (b"\x06\x03\xff", "invalid UTF-8 in AMF3 string"),
    (b"\x06\x00", "AMF3 string reference 0 out of range"),
    (b"\x09\x05\x01\x06\x01\x06\x00", "AMF3 string reference 0 out of range"),
    (b"\x07\x09<", "truncated AMF3 XML"),
    (b"\x0b\x03\x80", "invalid UTF-8 in AMF3 string"),
    (b"\x08\x01\x00", "truncated AMF3 date"),
    (b"\x08\x00", "AMF3 object reference 0 out of range"),
    (b"\x0c\x09\x00", "truncated AMF3 byte array"),
    (b"\x0d\x05\x00\x00\x00\x00\x01", "truncated AMF3 vector"),
    (b"\x0d\x01", "truncated AMF3 vector"),
    (b"\x0f\x03\x00\x00", "truncated AMF3 vector"),
    (b"\x10\x01\x00", "AMF3 vector-object is not supported"),
    (b"\x11\x01\x00", "AMF3 dictionary is not supported"),
    (b"\x12", "unknown AMF3 marker 0x12"),
    (b"\xff", "unknown AMF3 marker 0xff"),
    (
        b"\x0a\x07" + s3("flex.messaging.io.ArrayCollection"),
        "externalizable AMF3 objects are not supported",
    ),
    (b"\x0a\x05", "AMF3 traits reference 1 out of range"),
    (b"\x0a\x01", "AMF3 traits reference 0 out of range"),
    (b"\x0a\x00", "AMF3 object reference 0 out of range"),
    (
        b"\x0a\x0b\x01" + s3("me") + b"\x0a\x00\x01",
        "AMF3 object reference 0 points to an incomplete object",
    ),
    (b"\x09\x03\x01\x09\x00", "AMF3 object reference 0 points to an incomplete object"),
    (
        b"\x0a\xbf\xff\xff\xf3\x01",
        "AMF3 sealed member count 16777215 exceeds the remaining 0 bytes",
    ),
    (b"\x0a\x23\x01\x03", "AMF3 sealed member count 2 exceeds the remaining 1 bytes"),
    (b"\x0a\x23\x01" + s3("a"), "truncated AMF3 U29 integer"),
    (b"\x09\xff\xff\xff\xff\x01\x01", "AMF3 array count 268435455 exceeds the remaining 1 bytes"),
    (b"\x09\x05\x01\x04", "AMF3 array count 2 exceeds the remaining 1 bytes"),
    (b"\x09\x05\x01\x04\x81", "truncated AMF3 U29 integer"),
    (b"\x09\x05\x01\x06\x03", "truncated AMF3 string"),
    (b"\x09\x05\x01\x06\x03a", "truncated AMF3 value"),
    (b"\x0a\x0b\x01" + s3("k"), "truncated AMF3 value"),
    (b"\x0a\x0b\x01", "truncated AMF3 U29 integer"),
    (b"\x0a\x13" + s3("P") + s3("x"), "truncated AMF3 value"),
]


@pytest.mark.parametrize("wire, message", AMF3_ERRORS)
def test_decode_amf3_errors(amf, wire, message):
    with pytest.raises(AMFError) as info:
        amf.decode_amf3(wire)
    assert str(info.value) == message
    # The same bytes behind an AMF0 switch give the same error.
    with pytest.raises(AMFError) as info:
        amf.decode_amf0(b"\x11" + wire)
    assert str(info.value) == message


def test_amf3_depth_limit(amf):
    objects = b"\x0a\x0b\x01" + (s3("k") + b"\x0a\x0b\x01") * 2 + b"\x01" * 3
    assert len(amf.decode_amf3(objects, max_depth=3)) == 1
    with pytest.raises(AMFError, match="^AMF nesting deeper than 2 levels$"):
        amf.decode_amf3(objects, max_depth=2)
    # Vectors, dates and byte arrays are not containers.
    assert len(amf.decode_amf3(b"\x0d\x01\x00\x08\x01" + bytes(8), max_depth=0)) == 2


# ------------------------------------------------------------------ round trips (hypothesis)

# WATCHBUY_FUZZ_EXAMPLES=20000 (with --timeout=0) fuzzes for longer locally; CI stays quick.
HYPOTHESIS = settings(
    max_examples=int(os.environ.get("WATCHBUY_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

keys = st.text(max_size=12) | st.sampled_from(["app", "tcUrl", "code", "level", "x" * 40])
scalars = (
    st.none()
    | st.just(UNDEFINED)
    | st.booleans()
    | st.floats(allow_nan=False)
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.text(max_size=40)
    | st.builds(XMLDocument, st.text(max_size=20))
    | st.builds(
        AMFDate,
        st.floats(allow_nan=False) | st.integers(-(2**53), 2**53),
        st.integers(-0x8000, 0x7FFF),
    )
)
amf0_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.lists(children, max_size=5).map(tuple)
        | st.dictionaries(keys, children, max_size=5)
        | st.dictionaries(keys, children, max_size=5).map(ECMAArray)
        | st.builds(TypedObject, st.text(max_size=10), st.dictionaries(keys, children, max_size=4))
    ),
    max_leaves=25,
)


@HYPOTHESIS
@given(values=st.lists(amf0_values, max_size=4))
def test_round_trip_property(values):
    want = canon([expected(v) for v in values])
    for impl in IMPLEMENTATIONS:
        wire = impl.encode_amf0(*values)
        assert canon(impl.decode_amf0(wire)) == want
        assert canon(impl.decode_amf0(bytearray(wire))) == want
    assert len({impl.encode_amf0(*values) for impl in IMPLEMENTATIONS}) == 1


# ------------------------------------------------------------- differential tests (hypothesis)


def assert_same_decoding(wire: bytes, max_depth: int = 64) -> None:
    for name in ("decode_amf0", "decode_amf3"):
        results = [
            outcome(getattr(impl, name), wire, max_depth=max_depth) for impl in IMPLEMENTATIONS
        ]
        assert all(r == results[0] for r in results), (name, wire)
        if results[0][0] == "error":
            assert results[0][1] is AMFError, results[0]


@HYPOTHESIS
@given(wire=st.binary(max_size=300))
def test_differential_random_bytes(wire):
    assert_same_decoding(wire)


# Fragments that are each meaningful to one of the decoders, so that random sequences of them
# reach deep into objects, references, traits and the depth limit far more often than noise.
AMF0_PIECES = [
    b"\x03", b"\x08\x00\x00\x00\x02", b"\x0a\x00\x00\x00\x02", b"\x0a\x00\x00\x00\x00",
    b"\x10\x00\x03Foo", b"\x00\x00\x09", b"\x00\x01a", b"\x00\x00", b"\x07\x00\x00",
    b"\x07\x00\x01", b"\x05", b"\x06", b"\x0d", b"\x01\x01", num(1.0), s0("live"),
    s0("k"), b"\x0b" + bytes(10), b"\x0c\x00\x00\x00\x01z", b"\x0f\x00\x00\x00\x00",
    b"\x11", b"\x09", b"\x02\x00\x02\xc3\xa9", b"\x02\x00\x01\xff",
]  # fmt: skip
AMF3_PIECES = [
    b"\x0a\x0b\x01", b"\x0a\x13", b"\x0a\x01", b"\x0a\x00", b"\x0a\x02", b"\x0a\x07",
    b"\x0a\x2b", b"\x09\x05\x01", b"\x09\x03", b"\x09\x00", b"\x09\x01\x01", b"\x01",
    b"\x06\x07abc", b"\x06\x00", b"\x06\x02", b"\x07abc", b"\x03k", b"\x04\x81\x00",
    b"\x04\xff\xff\xff\xff", b"\x05" + struct.pack(">d", 2.0), b"\x08\x01" + bytes(8),
    b"\x08\x00", b"\x0c\x05\x01\x02", b"\x0c\x00", b"\x0d\x03\x00\x00\x00\x00\x05",
    b"\x0e\x00", b"\x0f\x03\x00" + bytes(8), b"\x00", b"\x02", b"\x03", b"\x06\x01",
    b"\x0b\x03x", b"\x10", b"\x11", b"\x12",
]  # fmt: skip


@HYPOTHESIS
@given(
    pieces=st.lists(
        st.sampled_from(AMF0_PIECES + AMF3_PIECES) | st.binary(max_size=3), max_size=40
    ),
    max_depth=st.integers(0, 6),
)
def test_differential_structured_fragments(pieces, max_depth):
    wire = b"".join(pieces)
    assert_same_decoding(wire, max_depth)
    assert_same_decoding(b"\x11" + wire, max_depth)


@HYPOTHESIS
@given(values=st.lists(amf0_values, min_size=1, max_size=3), data=st.data())
def test_differential_mutated_encodings(values, data):
    wire = bytearray(_amf_py.encode_amf0(*values))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "delete", "marker"]))
        at = data.draw(st.integers(0, max(len(wire) - 1, 0)))
        if kind == "flip" and wire:
            wire[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del wire[at:]
        elif kind == "insert":
            wire[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and wire:
            del wire[at : at + data.draw(st.integers(1, 4))]
        elif kind == "marker" and wire:
            wire[at] = data.draw(st.integers(0, 0x12))
    assert_same_decoding(bytes(wire), data.draw(st.integers(0, 8)))


class OddMapping(dict):
    """A dict subclass that is not one of ours."""


odd_values = st.recursive(
    scalars
    | st.binary(max_size=3)
    | st.sets(st.integers(0, 3), max_size=2)
    | st.integers()
    | st.just(2**1100)
    | st.sampled_from(["\ud800", XMLDocument("\udc00x"), "k" * 3])
    | st.builds(
        AMFDate,
        st.integers(-(2**1030), 2**1030) | st.text(max_size=2),
        st.integers(-(2**17), 2**17),
    ),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(keys | st.integers(0, 3) | st.just("\udfff"), children, max_size=3)
        | st.dictionaries(keys, children, max_size=3).map(ECMAArray)
        | st.dictionaries(keys, children, max_size=3).map(OddMapping)
        | st.builds(
            TypedObject,
            st.text(max_size=5) | st.integers(0, 3),
            st.dictionaries(keys, children, max_size=3),
        )
    ),
    max_leaves=12,
)


@HYPOTHESIS
@given(values=st.lists(odd_values, max_size=3))
def test_differential_encoding(values):
    results = [encode_outcome(impl.encode_amf0, *values) for impl in IMPLEMENTATIONS]
    assert all(r == results[0] for r in results)
    if results[0][0] == "error":
        assert results[0][1] is AMFError, results[0]


def test_nan_and_infinities_keep_their_bits(amf):
    values = [
        math.inf,
        -math.inf,
        math.nan,
        struct.unpack(">d", b"\x7f\xf0\x00\x00\x00\x00\x00\x01")[0],
    ]
    wire = amf.encode_amf0(*values)
    assert wire == b"".join(num(v) for v in values)
    assert canon(amf.decode_amf0(wire)) == canon(values)
