"""AMF decoding limits: reference bombs, the expanded-size budgets and deep nesting.

Every test runs against the compiled codec and its pure-Python twin; the differential tests feed
both the same adversarial input and demand the same outcome.  A reference (AMF0 0x07, AMF3
object/string/traits references) makes a few bytes stand for a whole earlier value, so values
built from references to references grow 2**k when anything walks or re-encodes them.
"""

from __future__ import annotations

import struct
import sys
import tracemalloc

import pytest
from amf_wire import END, key, num, s0, u29
from conftest import codec_implementations
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watchbuy.engine.amf_types import ECMAArray
from watchbuy.engine.errors import AMFError, ProtocolError

CODECS = codec_implementations("amf")
IMPLEMENTATIONS = list(CODECS.values())
_amf_py = CODECS["python"]
NODES = _amf_py.DEFAULT_MAX_NODES
SIZE = _amf_py.DEFAULT_MAX_EXPANDED_SIZE
NODES_ERROR = f"AMF data expands to more than {NODES} values"
SIZE_ERROR = f"AMF data expands to more than {SIZE} bytes"

HYPOTHESIS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(params=IMPLEMENTATIONS, ids=list(CODECS))
def amf(request):
    return request.param


def ref0(index: int) -> bytes:
    return b"\x07" + struct.pack(">H", index)


def array0(*items: bytes) -> bytes:
    return b"\x0a" + struct.pack(">I", len(items)) + b"".join(items)


def amf0_array_bomb(levels: int) -> bytes:
    """Strict array i holds two references to array i-1: 2**levels values once expanded."""
    return array0() + b"".join(array0(ref0(i), ref0(i)) for i in range(levels))


def amf0_connect_bomb(levels: int) -> bytes:
    """The issue's shape: a connect whose command object is built from object references.

    A strict array (reference 0) holds {"app": "live"} (reference 1) and then objects whose two
    members both refer to the object before; the command object refers to the last one.
    """
    objects = b"\x03" + key("app") + s0("live") + END
    objects += b"".join(
        b"\x03" + key("a") + ref0(i + 1) + key("b") + ref0(i + 1) + END for i in range(levels)
    )
    return (
        s0("connect") + num(1.0) + b"\x0a" + struct.pack(">I", levels + 1) + objects
        + b"\x03" + key("app") + s0("live") + key("x") + ref0(levels + 1) + END
    )  # fmt: skip


def amf3_array_bomb(levels: int) -> bytes:
    """AMF3 dense arrays, each holding two object references to the one before."""
    wire = b"\x09\x01\x01"  # object 0: []
    for i in range(levels):
        wire += b"\x09\x05\x01" + (b"\x09" + u29(i << 1)) * 2
    return wire


def measure(func, *args, **kwargs) -> tuple[object, int]:
    """(outcome, peak bytes allocated meanwhile)."""
    tracemalloc.start()
    try:
        try:
            result: object = func(*args, **kwargs)
        except AMFError as exc:
            result = exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, peak


def count_values(value: object) -> int:
    """The values a full walk of a decoded value visits (references expanded)."""
    if isinstance(value, dict):
        return 1 + sum(count_values(item) for item in value.values())
    if isinstance(value, list):
        return 1 + sum(count_values(item) for item in value)
    return 1


# ------------------------------------------------------------------------------- the bombs


def test_the_issue_sized_bomb_is_refused_cheaply(amf):
    wire = amf0_connect_bomb(25)  # 2**25 values once expanded
    assert len(wire) < 478
    result, peak = measure(amf.decode_amf0, wire)
    assert isinstance(result, AMFError) and isinstance(result, ProtocolError)
    assert str(result) == NODES_ERROR
    assert peak < 256 * 1024, peak


@pytest.mark.parametrize(
    "bomb, decode",
    [
        (amf0_array_bomb, "decode_amf0"),
        (amf3_array_bomb, "decode_amf3"),
        (lambda levels: b"\x11" + amf3_array_bomb(levels)[:3] + b"".join(
            b"\x11\x09\x05\x01" + (b"\x09" + u29(i << 1)) * 2 for i in range(levels)
        ), "decode_amf0"),
    ],
    ids=["amf0", "amf3", "amf3-in-amf0"],
)
def test_reference_bombs_are_refused(amf, bomb, decode):
    # Under the budget (every level holds 2**(i+1) - 1 values), the same shape decodes.
    small = getattr(amf, decode)(bomb(8))
    assert sum(count_values(v) for v in small) <= NODES
    result, peak = measure(getattr(amf, decode), bomb(60))
    assert isinstance(result, AMFError) and str(result) == NODES_ERROR
    assert peak < 256 * 1024, peak


def test_long_string_referenced_many_times_is_refused_by_size(amf):
    # Few values, but each reference repeats a 1 MiB string when re-encoded.
    holder = b"\x03" + key("s") + b"\x0c" + struct.pack(">I", 1 << 20) + b"x" * (1 << 20) + END
    ok = holder + ref0(0) * 14  # 15 MiB expanded
    values = amf.decode_amf0(ok)
    assert all(v is values[0] for v in values)
    result, peak = measure(amf.decode_amf0, holder + ref0(0) * 16)
    assert isinstance(result, AMFError) and str(result) == SIZE_ERROR
    assert peak < 4 * (1 << 20), peak  # the string once, not sixteen times


def test_amf3_string_references_count_their_bytes(amf):
    text = "y" * 100_000
    wire = b"\x06" + u29(len(text) << 1 | 1) + text.encode() + b"\x06\x00" * 200
    with pytest.raises(AMFError, match="^AMF data expands to more than 16777216 bytes$"):
        amf.decode_amf3(wire)
    assert len(amf.decode_amf3(wire[: -2 * 100])) == 101  # 10 MB expanded
    # As dynamic member names too: each object repeats the long key when re-encoded.
    objects = b"\x0a\x0b\x01" + u29(len(text) << 1 | 1) + text.encode() + b"\x01\x01"
    objects += (b"\x0a\x01" + b"\x00" + b"\x01\x01") * 200  # traits ref 0, key ref 0, null, end
    with pytest.raises(AMFError, match="bytes$"):
        amf.decode_amf3(objects)


def test_amf3_traits_references_count_their_member_names(amf):
    names = [f"{i:0>1000}" for i in range(100)]  # 100 kB of sealed member names
    traits = b"\x0a" + u29(len(names) << 4 | 0b0011) + b"\x01" + b"".join(
        u29(len(n) << 1 | 1) + n.encode() for n in names
    )
    first = traits + b"\x01" * len(names)
    again = b"\x0a\x01" + b"\x01" * len(names)  # traits reference 0: 101 bytes for 100 kB
    assert len(amf.decode_amf3(first + again * 150)) == 151
    with pytest.raises(AMFError, match="bytes$"):
        amf.decode_amf3(first + again * 200)


# ---------------------------------------------------------------------- the budgets exactly


def test_node_budget_boundary_counts_expanded_references(amf):
    wire = array0(b"\x05", b"\x05", b"\x05") + ref0(0)  # 4 values, then the same 4 again
    assert len(amf.decode_amf0(wire, max_nodes=8)) == 2
    with pytest.raises(AMFError, match="^AMF data expands to more than 7 values$"):
        amf.decode_amf0(wire, max_nodes=7)
    # Without the reference, 4 values; a vector's items count too.
    assert amf.decode_amf0(wire[:-3], max_nodes=4) == [[None, None, None]]
    vector = b"\x0d\x07\x00" + bytes(12)
    assert amf.decode_amf3(vector, max_nodes=4) == [[0, 0, 0]]
    with pytest.raises(AMFError, match="more than 3 values"):
        amf.decode_amf3(vector, max_nodes=3)
    with pytest.raises(AMFError, match="more than 0 values"):
        amf.decode_amf0(b"\x05", max_nodes=0)
    assert amf.decode_amf0(b"", max_nodes=0) == []


def test_size_budget_boundary(amf):
    target = b"\x03" + key("k") + s0("value") + END
    wire = target + ref0(0) + ref0(0)
    expanded = 3 * len(target)  # each 3-byte reference replaced by a copy of its target
    assert len(amf.decode_amf0(wire, max_expanded_size=expanded)) == 3
    with pytest.raises(AMFError, match=f"^AMF data expands to more than {expanded - 1} bytes$"):
        amf.decode_amf0(wire, max_expanded_size=expanded - 1)
    # Input without references is bounded by the message size, not by this budget.
    assert amf.decode_amf0(target, max_expanded_size=0) == [{"k": "value"}]


@pytest.mark.parametrize(
    "name, value, exc, message",
    [
        ("max_nodes", -1, ValueError, "max_nodes must not be negative"),
        ("max_nodes", 1.0, TypeError, "max_nodes must be an int, not float"),
        ("max_nodes", None, TypeError, "max_nodes must be an int, not NoneType"),
        ("max_expanded_size", -(2**80), ValueError, "max_expanded_size must not be negative"),
        ("max_expanded_size", "9", TypeError, "max_expanded_size must be an int, not str"),
    ],
)
def test_budget_arguments(amf, name, value, exc, message):
    for decode in (amf.decode_amf0, amf.decode_amf3):
        with pytest.raises(exc) as info:
            decode(b"\x05", **{name: value})
        assert str(info.value) == message


def test_huge_budgets_mean_unlimited(amf):
    wire = amf0_array_bomb(12)
    got = amf.decode_amf0(wire, max_nodes=2**80, max_expanded_size=2**80)
    assert len(got) == 13


def test_realistic_messages_are_far_from_the_limits(amf):
    keyframes = ECMAArray(
        duration=10800.0,
        keyframes={"times": [i * 2.0 for i in range(5400)],
                   "filepositions": [i * 1e6 for i in range(5400)]},
    )
    wire = _amf_py.encode_amf0("@setDataFrame", "onMetaData", keyframes)
    assert amf.decode_amf0(wire)[2]["keyframes"]["times"][-1] == 10798.0
    connect = _amf_py.encode_amf0(
        "connect", 1.0, {"app": "live", "tcUrl": "rtmp://127.0.0.1/live", "fpad": False}
    )
    assert amf.decode_amf0(connect, max_nodes=6)[2]["app"] == "live"


# -------------------------------------------------------------------------------- nesting


@pytest.mark.parametrize(
    "opener, closer",
    [
        (b"\x03" + key("k"), END),
        (b"\x0a\x00\x00\x00\x01", b""),
        (b"\x08\x00\x00\x00\x01" + key("k"), END),
        (b"\x11\x09\x03\x01", b""),  # AMF3 arrays inside one AMF0 switch
    ],
    ids=["object", "strict-array", "ecma-array", "amf3-array"],
)
def test_hostile_nesting_is_an_amf_error_never_recursion(amf, opener, closer):
    depth = 100_000
    if opener.startswith(b"\x11"):
        wire = b"\x11" + b"\x09\x03\x01" * depth + b"\x01"
    else:
        wire = opener * depth + b"\x05" + closer * depth
    for max_depth in (64, amf.MAX_DEPTH_LIMIT):
        with pytest.raises(AMFError, match=f"^AMF nesting deeper than {max_depth} levels$"):
            amf.decode_amf0(wire, max_depth=max_depth)


def test_deepest_allowed_nesting_needs_little_stack(amf):
    # The twin recurses once per level: the deepest legal input must fit well inside Python's
    # recursion limit even when the caller is already some frames deep.
    limit = amf.MAX_DEPTH_LIMIT
    wire = b"\x0a\x00\x00\x00\x01" * limit + b"\x05"
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 200)
    try:
        assert len(amf.decode_amf0(wire, max_depth=limit)) == 1
    finally:
        sys.setrecursionlimit(old)


# ------------------------------------------------------------------ differential (hypothesis)


def outcome(func, *args, **kwargs) -> tuple:
    try:
        return ("ok", repr(func(*args, **kwargs)))
    except Exception as exc:  # noqa: BLE001 - the class is part of what is compared
        return ("error", type(exc), str(exc))


@st.composite
def referencing_amf0(draw) -> bytes:
    """AMF0 values built from scalars, containers and references to complete containers."""
    complete: list[int] = []  # reference indexes of finished containers
    opened = [0]

    def value(depth: int) -> bytes:
        kind = draw(st.sampled_from(["num", "str", "null", "ref", "ref", "array", "object"]))
        if kind == "ref" and complete:
            return ref0(draw(st.sampled_from(complete)))
        if kind in ("array", "object") and depth < 4:
            index = opened[0]
            opened[0] += 1
            count = draw(st.integers(0, 4))
            if kind == "array":
                wire = array0(*(value(depth + 1) for _ in range(count)))
            else:
                wire = b"\x03" + b"".join(
                    key(f"k{i}") + value(depth + 1) for i in range(count)
                ) + END
            complete.append(index)
            return wire
        if kind == "str":
            return s0(draw(st.text(max_size=20)))
        return b"\x05" if kind == "null" else num(1.5)

    return b"".join(value(0) for _ in range(draw(st.integers(1, 8))))


@HYPOTHESIS
@given(wire=referencing_amf0())
def test_budgets_equal_what_a_walk_and_a_re_encoding_find(wire):
    """The node budget an input needs is exactly the values a walk of the result visits, and
    the size budget exactly the length of the result re-encoded without references."""
    values = _amf_py.decode_amf0(wire, max_nodes=2**40, max_expanded_size=2**40)
    nodes = sum(count_values(v) for v in values)
    size = len(_amf_py.encode_amf0(*values))
    for impl in IMPLEMENTATIONS:
        assert outcome(impl.decode_amf0, wire, max_nodes=nodes, max_expanded_size=size) == (
            "ok", repr(values)
        )
        with pytest.raises(AMFError, match=f"more than {nodes - 1} values"):
            impl.decode_amf0(wire, max_nodes=nodes - 1, max_expanded_size=size)
        if size > len(wire):  # only references can make the size budget matter
            with pytest.raises(AMFError, match=f"more than {size - 1} bytes"):
                impl.decode_amf0(wire, max_nodes=nodes, max_expanded_size=size - 1)


# Pieces that build reference-heavy AMF0 and AMF3, so random sequences of them reach the
# budgets' edges: references to early and late entries, traits references, string references.
PIECES = [
    array0(), b"\x0a\x00\x00\x00\x02", b"\x03", END, key("a"), ref0(0), ref0(1), ref0(2),
    ref0(3), b"\x05", num(2.0), s0("s"), b"\x11", b"\x09\x05\x01", b"\x09\x00", b"\x09\x02",
    b"\x09\x04", b"\x0a\x00", b"\x0a\x02", b"\x0a\x0b\x01", b"\x0a\x01", b"\x0a\x05", b"\x01",
    b"\x06\x00", b"\x06\x02", b"\x06\x07abc", b"\x03k", b"\x00", b"\x0c\x03\x01",
    b"\x0d\x05\x00" + bytes(8), b"\x08\x01" + bytes(8), b"\x08\x00", b"\x07\x03x",
]  # fmt: skip


@HYPOTHESIS
@given(
    pieces=st.lists(st.sampled_from(PIECES) | st.binary(max_size=3), max_size=40),
    max_nodes=st.integers(0, 60),
    max_size=st.integers(0, 400),
    max_depth=st.integers(0, 6),
)
def test_differential_adversarial_references(pieces, max_nodes, max_size, max_depth):
    wire = b"".join(pieces)
    limits = {"max_depth": max_depth, "max_nodes": max_nodes, "max_expanded_size": max_size}
    for name in ("decode_amf0", "decode_amf3"):
        for data in (wire, b"\x11" + wire):
            results = [outcome(getattr(impl, name), data, **limits) for impl in IMPLEMENTATIONS]
            assert all(r == results[0] for r in results), (name, data, limits)
            if results[0][0] == "error":
                assert results[0][1] is AMFError, results[0]


@HYPOTHESIS
@given(levels=st.integers(1, 40), max_nodes=st.integers(0, 5000), amf3=st.booleans())
def test_differential_bombs(levels, max_nodes, amf3):
    wire = amf3_array_bomb(levels) if amf3 else amf0_array_bomb(levels)
    decode = "decode_amf3" if amf3 else "decode_amf0"
    results = [
        outcome(getattr(impl, decode), wire, max_nodes=max_nodes) for impl in IMPLEMENTATIONS
    ]
    assert all(r == results[0] for r in results)
    expanded = 2 ** (levels + 2) - levels - 3  # level i holds 2**(i+1) - 1 values
    assert (results[0][0] == "ok") == (expanded <= max_nodes)
