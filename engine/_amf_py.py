"""AMF0 (with AMF3 where Flash peers switch to it) decoder and AMF0 encoder, in pure Python.

Twin of the compiled ``_amf.pyx``: same API, same results, same exception classes and texts (the
parity tests compare them), so any change here must be mirrored there.

Format notes (Adobe's AMF0 and AMF3 specifications), as far as they shape the code:

* AMF0 values are a marker byte followed by big-endian fields.  Objects, ECMA arrays and typed
  objects are ``(u16 length, UTF-8 key, value)*`` ended by an empty key and the 0x09 marker.
  The ECMA array's u32 count is ignored: encoders get it wrong and real servers read to the end
  marker.  Objects, ECMA arrays, strict arrays and typed objects enter the reference table (0x07,
  u16 index) in order of their start; a reference to one that is still being decoded (a cycle)
  is rejected, so decoded values never contain cycles.
* AMF3 uses U29 variable-length integers, and three reference tables (strings, objects, traits).
  One AMF3 context serves a whole ``decode_amf0`` call, as in PyAMF: later 0x11 switches in the
  same message may refer to strings and objects of earlier ones.
* Every count or length read from the wire is checked against the bytes that are left before it
  is used, so hostile input costs at most time proportional to its own length.
* Nesting is limited by ``max_depth`` (capped at ``MAX_DEPTH_LIMIT`` so that neither this twin's
  recursion nor the C stack of the compiled one can overflow).
* References make a few bytes stand for a whole earlier container, so a value built from
  references to references grows 2**k when anything walks or re-encodes it (JSON for stats, the
  relay's re-encoded onMetaData) although decoding itself is linear.  Two budgets bound the
  *expanded* value, every reference counted as a copy of its target: ``max_nodes`` values in all
  (each scalar, string, container and vector item is one) and ``max_expanded_size`` bytes (the
  input's length with every reference replaced by a copy of its target: what re-encoding the
  result takes; checked where a reference adds bytes, so input without references is bounded by
  the message size alone).  Every reference table entry records its target's expanded value
  count and size when it is complete, so charging a reference is two subtractions, never a walk.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from watchbuy.engine.amf_types import UNDEFINED, AMFDate, ECMAArray, TypedObject, XMLDocument
from watchbuy.engine.errors import AMFError

__all__ = [
    "decode_amf0",
    "decode_amf3",
    "encode_amf0",
    "MAX_DEPTH_LIMIT",
    "ENCODE_MAX_DEPTH",
    "DEFAULT_MAX_NODES",
    "DEFAULT_MAX_EXPANDED_SIZE",
]

#: Highest ``max_depth`` accepted by the decoders.
MAX_DEPTH_LIMIT = 256
#: Default ``max_nodes``: an OBS/ffmpeg connect or onMetaData has a few dozen values, and even a
#: file's keyframe index (two numbers per keyframe) stays far below it.
DEFAULT_MAX_NODES = 65536
#: Default ``max_expanded_size``: above the largest RTMP message (0xFFFFFF bytes), so only
#: references can reach it.
DEFAULT_MAX_EXPANDED_SIZE = 16 * 1024 * 1024
#: Containers nested deeper than this cannot be encoded (also stops cycles).
ENCODE_MAX_DEPTH = 64

_unpack_double = struct.Struct(">d").unpack_from
_unpack_date = struct.Struct(">dh").unpack_from
_pack_number = struct.Struct(">Bd").pack
_pack_date = struct.Struct(">Bdh").pack
_pack_u16 = struct.Struct(">H").pack
_pack_marker_u16 = struct.Struct(">BH").pack
_pack_marker_u32 = struct.Struct(">BI").pack

_OBJECT_END = b"\x00\x00\x09"

# Sits in a reference table while its container is still being decoded.
_INCOMPLETE = object()


def _check_max_depth(max_depth: object) -> int:
    if not isinstance(max_depth, int):
        raise TypeError(f"max_depth must be an int, not {type(max_depth).__name__}")
    if not 0 <= max_depth <= MAX_DEPTH_LIMIT:
        raise ValueError(f"max_depth must be between 0 and {MAX_DEPTH_LIMIT}")
    return max_depth


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    if type(data) is bytes:
        return data
    # Any buffer (also non-contiguous or non-byte formats) is read as its raw bytes.
    return memoryview(data).tobytes()


def _check_budget(name: str, value: object) -> int:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must not be negative")
    return value


class _State:
    """Per-call decoder state: limits, what is left of the budgets, the reference tables."""

    __slots__ = (
        "max_depth",
        "max_nodes",
        "max_size",
        "nodes",
        "size",
        "refs",
        "ref_costs",
        "strings",
        "string_sizes",
        "objects",
        "object_costs",
        "traits",
    )

    def __init__(self, max_depth: int, max_nodes: int, max_size: int, length: int) -> None:
        self.max_depth = max_depth
        self.max_nodes = max_nodes
        self.max_size = max_size
        self.nodes = max_nodes  # values still allowed, references expanded
        self.size = max_size - length  # bytes references may still add
        self.refs: list = []  # AMF0 objects
        self.ref_costs: list = []  # (expanded values, expanded bytes) of each, once complete
        self.strings: list = []  # AMF3
        self.string_sizes: list = []  # their bytes on the wire, header included
        self.objects: list = []  # AMF3
        self.object_costs: list = []  # (expanded values, expanded bytes), once complete
        # AMF3: (class_name, sealed member names, dynamic, expanded bytes of the definition)
        self.traits: list = []


def _too_deep(st: _State) -> AMFError:
    return AMFError(f"AMF nesting deeper than {st.max_depth} levels")


def _too_many_nodes(st: _State) -> AMFError:
    return AMFError(f"AMF data expands to more than {st.max_nodes} values")


def _too_large(st: _State) -> AMFError:
    return AMFError(f"AMF data expands to more than {st.max_size} bytes")


def _charge(st: _State, nodes: int, size: int) -> None:
    """A reference stands for ``nodes`` values and ``size`` bytes beyond its own one value."""
    st.nodes -= nodes
    if st.nodes < 0:
        raise _too_many_nodes(st)
    st.size -= size
    if st.size < 0:
        raise _too_large(st)


def _limits(max_depth: object, max_nodes: object, max_size: object) -> tuple[int, int, int]:
    return (
        _check_max_depth(max_depth),
        _check_budget("max_nodes", max_nodes),
        _check_budget("max_expanded_size", max_size),
    )


# --------------------------------------------------------------------------------------- AMF0


def _read0(data: bytes, pos: int, depth: int, st: _State) -> tuple[object, int]:
    """One AMF0 value at ``pos``: ``(value, position after it)``.  Branches by frequency."""
    st.nodes -= 1
    if st.nodes < 0:
        raise _too_many_nodes(st)
    n = len(data)
    if pos >= n:
        raise AMFError("truncated AMF0 value")
    marker = data[pos]
    pos += 1
    if marker == 0x02:  # string
        end = pos + 2
        if end > n:
            raise AMFError("truncated AMF0 string")
        end += (data[pos] << 8) | data[pos + 1]
        if end > n:
            raise AMFError("truncated AMF0 string")
        try:
            return data[pos + 2 : end].decode(), end
        except UnicodeDecodeError:
            raise AMFError("invalid UTF-8 in AMF0 string") from None
    if marker == 0x00:  # number
        if pos + 8 > n:
            raise AMFError("truncated AMF0 number")
        return _unpack_double(data, pos)[0], pos + 8
    if marker == 0x03 or marker == 0x08 or marker == 0x10:  # object, ECMA array, typed object
        if depth >= st.max_depth:
            raise _too_deep(st)
        start, nodes, size = pos - 1, st.nodes + 1, st.size
        if marker == 0x03:
            obj: dict = {}
        elif marker == 0x08:
            if pos + 4 > n:
                raise AMFError("truncated AMF0 ECMA array count")
            pos += 4  # the count is unreliable in the wild; the end marker decides
            obj = ECMAArray()
        else:
            end = pos + 2
            if end > n:
                raise AMFError("truncated AMF0 typed object class name")
            end += (data[pos] << 8) | data[pos + 1]
            if end > n:
                raise AMFError("truncated AMF0 typed object class name")
            try:
                obj = TypedObject(data[pos + 2 : end].decode())
            except UnicodeDecodeError:
                raise AMFError("invalid UTF-8 in AMF0 string") from None
            pos = end
        refs = st.refs
        index = len(refs)
        refs.append(_INCOMPLETE)
        st.ref_costs.append(None)
        depth += 1
        while True:
            end = pos + 2
            if end > n:
                raise AMFError("truncated AMF0 object key")
            end += (data[pos] << 8) | data[pos + 1]
            if end > n:
                raise AMFError("truncated AMF0 object key")
            if end == pos + 2:
                # An empty key followed by 0x09 ends the object; any other value after an empty
                # key is an ordinary property named "".
                if end < n and data[end] == 0x09:
                    pos = end + 1
                    break
                key = ""
            else:
                try:
                    key = data[pos + 2 : end].decode()
                except UnicodeDecodeError:
                    raise AMFError("invalid UTF-8 in AMF0 string") from None
            obj[key], pos = _read0(data, end, depth, st)
        refs[index] = obj
        st.ref_costs[index] = (nodes - st.nodes, pos - start + size - st.size)
        return obj, pos
    if marker == 0x05:  # null
        return None, pos
    if marker == 0x01:  # boolean
        if pos >= n:
            raise AMFError("truncated AMF0 boolean")
        return data[pos] != 0, pos + 1
    if marker == 0x0A:  # strict array
        if depth >= st.max_depth:
            raise _too_deep(st)
        start, nodes, size = pos - 1, st.nodes + 1, st.size
        if pos + 4 > n:
            raise AMFError("truncated AMF0 strict array count")
        count = int.from_bytes(data[pos : pos + 4], "big")
        pos += 4
        if count > n - pos:  # every value takes at least its marker byte
            raise AMFError(f"AMF0 strict array count {count} exceeds the remaining {n - pos} bytes")
        refs = st.refs
        index = len(refs)
        refs.append(_INCOMPLETE)
        st.ref_costs.append(None)
        depth += 1
        items = []
        append = items.append
        for _ in range(count):
            value, pos = _read0(data, pos, depth, st)
            append(value)
        refs[index] = items
        st.ref_costs[index] = (nodes - st.nodes, pos - start + size - st.size)
        return items, pos
    if marker == 0x06:  # undefined
        return UNDEFINED, pos
    if marker == 0x07:  # reference
        if pos + 2 > n:
            raise AMFError("truncated AMF0 reference")
        index = (data[pos] << 8) | data[pos + 1]
        if index >= len(st.refs):
            raise AMFError(f"AMF0 reference {index} out of range")
        obj = st.refs[index]
        if obj is _INCOMPLETE:
            raise AMFError(f"AMF0 reference {index} points to an incomplete object")
        nodes, size = st.ref_costs[index]
        _charge(st, nodes - 1, size - 3)  # beyond the one value and 3 bytes it already is
        return obj, pos + 2
    if marker == 0x0B:  # date
        if pos + 10 > n:
            raise AMFError("truncated AMF0 date")
        return AMFDate(*_unpack_date(data, pos)), pos + 10
    if marker == 0x0C or marker == 0x0F:  # long string, XML document
        what = "long string" if marker == 0x0C else "XML document"
        end = pos + 4
        if end > n:
            raise AMFError(f"truncated AMF0 {what}")
        end += int.from_bytes(data[pos:end], "big")
        if end > n:
            raise AMFError(f"truncated AMF0 {what}")
        try:
            text = data[pos + 4 : end].decode()
        except UnicodeDecodeError:
            raise AMFError("invalid UTF-8 in AMF0 string") from None
        return (text if marker == 0x0C else XMLDocument(text)), end
    if marker == 0x0D:  # unsupported
        return None, pos
    if marker == 0x11:  # switch to AMF3 for one value
        st.nodes += 1  # the AMF3 value is the one value: _read3 counts it
        return _read3(data, pos, depth, st)
    if marker == 0x09:
        raise AMFError("unexpected AMF0 object-end marker")
    raise AMFError(f"unknown AMF0 marker 0x{marker:02x}")


def decode_amf0(
    data: bytes | bytearray | memoryview,
    max_depth: int = 64,
    max_nodes: int = DEFAULT_MAX_NODES,
    max_expanded_size: int = DEFAULT_MAX_EXPANDED_SIZE,
) -> list:
    """Decode all consecutive AMF0 values in ``data`` (e.g. an RTMP command message body).

    Raises :class:`AMFError` for any malformed input, for nesting deeper than ``max_depth``, and
    for data that expands (every reference counted as a copy of its target) to more than
    ``max_nodes`` values or more than ``max_expanded_size`` bytes.
    """
    limits = _limits(max_depth, max_nodes, max_expanded_size)
    data = _as_bytes(data)
    st = _State(*limits, len(data))
    n = len(data)
    pos = 0
    out = []
    while pos < n:
        value, pos = _read0(data, pos, 0, st)
        out.append(value)
    return out


# --------------------------------------------------------------------------------------- AMF3


def _u29(data: bytes, pos: int) -> tuple[int, int]:
    """AMF3 U29: up to three 7-bit groups with a continuation bit, then one full byte."""
    n = len(data)
    result = 0
    for _ in range(3):
        if pos >= n:
            raise AMFError("truncated AMF3 U29 integer")
        byte = data[pos]
        pos += 1
        if byte < 0x80:
            return (result << 7) | byte, pos
        result = (result << 7) | (byte & 0x7F)
    if pos >= n:
        raise AMFError("truncated AMF3 U29 integer")
    return (result << 8) | data[pos], pos + 1


def _str3(data: bytes, pos: int, st: _State) -> tuple[str, int]:
    """AMF3 UTF-8-vr: an inline string (added to the string table unless empty) or a reference."""
    start = pos
    header, pos = _u29(data, pos)
    if not header & 1:
        index = header >> 1
        if index >= len(st.strings):
            raise AMFError(f"AMF3 string reference {index} out of range")
        # Keys too: re-encoding repeats their bytes.
        _charge(st, 0, st.string_sizes[index] - (pos - start))
        return st.strings[index], pos
    end = pos + (header >> 1)
    if end == pos:
        return "", pos
    if end > len(data):
        raise AMFError("truncated AMF3 string")
    try:
        text = data[pos:end].decode()
    except UnicodeDecodeError:
        raise AMFError("invalid UTF-8 in AMF3 string") from None
    st.strings.append(text)
    st.string_sizes.append(end - start)
    return text, end


def _obj_ref3(st: _State, index: int, length: int) -> object:
    """The complete object ``index`` of the table, for a reference of ``length`` bytes."""
    if index >= len(st.objects):
        raise AMFError(f"AMF3 object reference {index} out of range")
    obj = st.objects[index]
    if obj is _INCOMPLETE:
        raise AMFError(f"AMF3 object reference {index} points to an incomplete object")
    nodes, size = st.object_costs[index]
    _charge(st, nodes - 1, size - length)  # beyond the one value and bytes it already is
    return obj


def _read3(data: bytes, pos: int, depth: int, st: _State) -> tuple[object, int]:
    """One AMF3 value at ``pos``: ``(value, position after it)``."""
    st.nodes -= 1
    if st.nodes < 0:
        raise _too_many_nodes(st)
    n = len(data)
    if pos >= n:
        raise AMFError("truncated AMF3 value")
    marker = data[pos]
    pos += 1
    if marker == 0x06:  # string
        return _str3(data, pos, st)
    if marker == 0x04:  # integer: U29, sign-extended from 29 bits
        value, pos = _u29(data, pos)
        if value & 0x10000000:
            value -= 0x20000000
        return value, pos
    if marker == 0x05:  # double
        if pos + 8 > n:
            raise AMFError("truncated AMF3 double")
        return _unpack_double(data, pos)[0], pos + 8
    if marker <= 0x03:
        return (UNDEFINED, None, False, True)[marker], pos
    if marker == 0x0A:  # object
        start, nodes, size = pos - 1, st.nodes + 1, st.size
        header, pos = _u29(data, pos)
        if not header & 1:
            return _obj_ref3(st, header >> 1, pos - start), pos
        if depth >= st.max_depth:
            raise _too_deep(st)
        if not header & 2:
            index = header >> 2
            if index >= len(st.traits):
                raise AMFError(f"AMF3 traits reference {index} out of range")
            class_name, sealed, dynamic, traits_size = st.traits[index]
            _charge(st, 0, traits_size)
        else:
            if header & 4:
                raise AMFError("externalizable AMF3 objects are not supported")
            dynamic = bool(header & 8)
            count = header >> 4
            traits_start, traits_added = pos, st.size
            class_name, pos = _str3(data, pos, st)
            if count > n - pos:  # every member name takes at least one byte
                raise AMFError(
                    f"AMF3 sealed member count {count} exceeds the remaining {n - pos} bytes"
                )
            names = []
            for _ in range(count):
                name, pos = _str3(data, pos, st)
                names.append(name)
            sealed = tuple(names)
            traits_size = pos - traits_start + traits_added - st.size
            st.traits.append((class_name, sealed, dynamic, traits_size))
        objects = st.objects
        index = len(objects)
        objects.append(_INCOMPLETE)
        st.object_costs.append(None)
        obj: dict = TypedObject(class_name) if class_name else {}
        depth += 1
        for name in sealed:
            obj[name], pos = _read3(data, pos, depth, st)
        if dynamic:
            while True:
                key, pos = _str3(data, pos, st)
                if not key:
                    break
                obj[key], pos = _read3(data, pos, depth, st)
        objects[index] = obj
        st.object_costs[index] = (nodes - st.nodes, pos - start + size - st.size)
        return obj, pos
    if marker == 0x09:  # array
        start, nodes, size = pos - 1, st.nodes + 1, st.size
        header, pos = _u29(data, pos)
        if not header & 1:
            return _obj_ref3(st, header >> 1, pos - start), pos
        if depth >= st.max_depth:
            raise _too_deep(st)
        objects = st.objects
        index = len(objects)
        objects.append(_INCOMPLETE)
        st.object_costs.append(None)
        depth += 1
        assoc = None
        while True:
            key, pos = _str3(data, pos, st)
            if not key:
                break
            if assoc is None:
                assoc = ECMAArray()
            assoc[key], pos = _read3(data, pos, depth, st)
        count = header >> 1
        if count > n - pos:
            raise AMFError(f"AMF3 array count {count} exceeds the remaining {n - pos} bytes")
        items = []
        for _ in range(count):
            value, pos = _read3(data, pos, depth, st)
            items.append(value)
        if assoc is None:
            result: object = items
        else:
            for i, value in enumerate(items):
                assoc[str(i)] = value
            result = assoc
        objects[index] = result
        st.object_costs[index] = (nodes - st.nodes, pos - start + size - st.size)
        return result, pos
    if marker == 0x08:  # date: milliseconds (double); AMF3 has no time-zone field
        start = pos - 1
        header, pos = _u29(data, pos)
        if not header & 1:
            return _obj_ref3(st, header >> 1, pos - start), pos
        if pos + 8 > n:
            raise AMFError("truncated AMF3 date")
        date = AMFDate(_unpack_double(data, pos)[0], 0)
        st.objects.append(date)
        st.object_costs.append((1, pos + 8 - start))
        return date, pos + 8
    if marker == 0x07 or marker == 0x0B:  # XMLDocument, XML
        start = pos - 1
        header, pos = _u29(data, pos)
        if not header & 1:
            return _obj_ref3(st, header >> 1, pos - start), pos
        end = pos + (header >> 1)
        if end > n:
            raise AMFError("truncated AMF3 XML")
        try:
            xml = XMLDocument(data[pos:end].decode())
        except UnicodeDecodeError:
            raise AMFError("invalid UTF-8 in AMF3 string") from None
        st.objects.append(xml)
        st.object_costs.append((1, end - start))
        return xml, end
    if marker == 0x0C:  # byte array
        start = pos - 1
        header, pos = _u29(data, pos)
        if not header & 1:
            return _obj_ref3(st, header >> 1, pos - start), pos
        end = pos + (header >> 1)
        if end > n:
            raise AMFError("truncated AMF3 byte array")
        blob = data[pos:end]
        st.objects.append(blob)
        st.object_costs.append((1, end - start))
        return blob, end
    if 0x0D <= marker <= 0x0F:  # vector of int, uint, double
        start = pos - 1
        header, pos = _u29(data, pos)
        if not header & 1:
            return _obj_ref3(st, header >> 1, pos - start), pos
        count = header >> 1
        pos += 1  # fixed-length flag: irrelevant to a reader
        end = pos + count * (8 if marker == 0x0F else 4)
        if end > n:
            raise AMFError("truncated AMF3 vector")
        st.nodes -= count  # its items are values too
        if st.nodes < 0:
            raise _too_many_nodes(st)
        fmt = (">%di", ">%dI", ">%dd")[marker - 0x0D] % count
        vector = list(struct.unpack_from(fmt, data, pos))
        st.objects.append(vector)
        st.object_costs.append((1 + count, end - start))
        return vector, end
    if marker == 0x10:
        raise AMFError("AMF3 vector-object is not supported")
    if marker == 0x11:
        raise AMFError("AMF3 dictionary is not supported")
    raise AMFError(f"unknown AMF3 marker 0x{marker:02x}")


def decode_amf3(
    data: bytes | bytearray | memoryview,
    max_depth: int = 64,
    max_nodes: int = DEFAULT_MAX_NODES,
    max_expanded_size: int = DEFAULT_MAX_EXPANDED_SIZE,
) -> list:
    """Decode all consecutive AMF3 values in ``data``, sharing one set of reference tables.

    Raises :class:`AMFError` for any malformed or unsupported input, and for input over the
    limits described at :func:`decode_amf0`.
    """
    limits = _limits(max_depth, max_nodes, max_expanded_size)
    data = _as_bytes(data)
    st = _State(*limits, len(data))
    n = len(data)
    pos = 0
    out = []
    while pos < n:
        value, pos = _read3(data, pos, 0, st)
        out.append(value)
    return out


# ------------------------------------------------------------------------------------ encoding


def _utf8(text: str) -> bytes:
    try:
        return str.encode(text)  # not text.encode(): a str subclass could override it
    except UnicodeEncodeError:
        raise AMFError("str with surrogates cannot be encoded as UTF-8") from None


def _number(value: object) -> bytes:
    try:
        return _pack_number(0x00, float(value))  # type: ignore[arg-type]
    except OverflowError:
        raise AMFError("int too large to encode as an AMF0 number") from None


def _string(value: str, parts: list) -> None:
    raw = _utf8(value)
    size = len(raw)
    if size <= 0xFFFF:
        parts.append(_pack_marker_u16(0x02, size))
    elif size <= 0xFFFFFFFF:
        parts.append(_pack_marker_u32(0x0C, size))
    else:
        raise AMFError("AMF0 string longer than 4294967295 bytes")
    parts.append(raw)


def _properties(value: Mapping, parts: list, depth: int) -> None:
    append = parts.append
    for key, item in value.items():
        if type(key) is not str and not isinstance(key, str):
            raise AMFError(f"AMF0 object keys must be str, not {type(key).__name__}")
        raw = _utf8(key)
        if len(raw) > 0xFFFF:
            raise AMFError("AMF0 object key longer than 65535 bytes")
        append(_pack_u16(len(raw)))
        append(raw)
        _enc0(item, parts, depth)
    append(_OBJECT_END)


def _enc0(value: object, parts: list, depth: int) -> None:
    """Append the encoding of ``value``; ``depth`` counts the containers around it."""
    kind = type(value)
    # Fast paths on exact types; anything else goes through the ordered checks below.
    if kind is str:
        _string(value, parts)  # type: ignore[arg-type]
    elif kind is float:
        parts.append(_pack_number(0x00, value))
    elif kind is dict or kind is ECMAArray:
        _mapping(value, parts, depth)  # type: ignore[arg-type]
    elif kind is bool:
        parts.append(b"\x01\x01" if value else b"\x01\x00")
    elif value is None:
        parts.append(b"\x05")
    elif kind is int:
        parts.append(_number(value))
    elif kind is list or kind is tuple:
        _strict_array(value, parts, depth)  # type: ignore[arg-type]
    else:
        _enc0_other(value, parts, depth)


def _strict_array(value: list | tuple, parts: list, depth: int) -> None:
    if depth >= ENCODE_MAX_DEPTH:
        raise AMFError(f"AMF nesting deeper than {ENCODE_MAX_DEPTH} levels")
    if len(value) > 0xFFFFFFFF:
        raise AMFError("AMF0 strict array longer than 4294967295 items")
    parts.append(_pack_marker_u32(0x0A, len(value)))
    depth += 1
    for item in value:
        _enc0(item, parts, depth)


def _mapping(value: Mapping, parts: list, depth: int) -> None:
    """ECMA array, typed object or (any other Mapping) object."""
    if depth >= ENCODE_MAX_DEPTH:
        raise AMFError(f"AMF nesting deeper than {ENCODE_MAX_DEPTH} levels")
    if isinstance(value, ECMAArray):
        parts.append(_pack_marker_u32(0x08, len(value)))
    elif isinstance(value, TypedObject):
        name = value.class_name
        if not isinstance(name, str):
            raise AMFError("TypedObject class_name must be str")
        raw = _utf8(name)
        if len(raw) > 0xFFFF:
            raise AMFError("AMF0 typed object class name longer than 65535 bytes")
        parts.append(_pack_marker_u16(0x10, len(raw)))
        parts.append(raw)
    else:
        parts.append(b"\x03")
    _properties(value, parts, depth + 1)


def _enc0_other(value: object, parts: list, depth: int) -> None:
    # Order matters: bool before int, XMLDocument before str, AMFDate (a tuple) before tuple,
    # ECMAArray and TypedObject (dicts) before Mapping.
    if isinstance(value, bool):
        parts.append(b"\x01\x01" if value else b"\x01\x00")
    elif isinstance(value, (int, float)):
        parts.append(_number(value))
    elif isinstance(value, XMLDocument):
        raw = _utf8(value)
        if len(raw) > 0xFFFFFFFF:
            raise AMFError("AMF0 string longer than 4294967295 bytes")
        parts.append(_pack_marker_u32(0x0F, len(raw)))
        parts.append(raw)
    elif isinstance(value, str):
        _string(value, parts)
    elif value is UNDEFINED:
        parts.append(b"\x06")
    elif isinstance(value, AMFDate):
        ms, tz = value
        if not isinstance(ms, (int, float)):
            raise AMFError("AMFDate milliseconds must be a number")
        if not isinstance(tz, int) or not -0x8000 <= tz <= 0x7FFF:
            raise AMFError("AMFDate timezone must be an int in -32768..32767")
        try:
            parts.append(_pack_date(0x0B, float(ms), tz))
        except OverflowError:
            raise AMFError("int too large to encode as an AMF0 number") from None
    elif isinstance(value, (list, tuple)):
        _strict_array(value, parts, depth)
    elif isinstance(value, dict) or isinstance(value, Mapping):  # dict: skips the ABC check
        _mapping(value, parts, depth)
    else:
        raise AMFError(f"cannot encode {type(value).__name__} as AMF0")


def encode_amf0(*values: object) -> bytes:
    """Encode each value as AMF0 and concatenate (an RTMP command message body).

    Raises :class:`AMFError` for values AMF0 cannot carry.
    """
    parts: list = []
    for value in values:
        _enc0(value, parts, 0)
    return b"".join(parts)
