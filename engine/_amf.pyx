# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""AMF0/AMF3 decoder and AMF0 encoder (compiled; twin of ``_amf_py.py``).

Same API, results, exception classes and texts as the pure-Python twin, whose docstring explains
the format; keep the two in step.  The decoder walks a ``const unsigned char*`` over the input
(``bytes`` directly, anything else through a locked buffer export), checking every length against
the end itself (bounds checking is off).  Doubles are assembled from big-endian bytes and copied
into a C double.  Short ASCII keys go through a small cache of ``str`` objects, which saves both
the allocation and the hashing when the same keys arrive message after message.  The encoder
writes into a C buffer (on the stack until it outgrows it) and makes one ``bytes`` at the end.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_SetItem
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongAndOverflow
from cpython.number cimport PyNumber_Float
from cpython.long cimport PyLong_AsSsize_t
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF, PyObject
from libc.stdint cimport int16_t, int32_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

from collections.abc import Mapping

from watchbuy.engine.amf_types import UNDEFINED, AMFDate, ECMAArray, TypedObject, XMLDocument
from watchbuy.engine.errors import AMFError

cdef extern from *:
    """
    /* dict's own tp_new for a dict subclass: what ECMAArray() does, minus the no-op __init__
       call and the method lookup that ECMAArray.__new__(ECMAArray) would cost. */
    static PyObject* __pyx_amf_new_dict_subtype(PyObject* type, PyObject* no_args) {
        return PyDict_Type.tp_new((PyTypeObject*)type, no_args, NULL);
    }
    """
    object _new_dict_subtype "__pyx_amf_new_dict_subtype" (object type, object no_args)


cdef extern from "Python.h":
    # Declared without Cython's exception handling: the callers test for NULL themselves and
    # turn the codec errors into AMFError, which is cheaper than a try block on the hot path.
    PyObject* PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)
    const char* PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t* size)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    int PyDict_Next(object d, Py_ssize_t* pos, PyObject** key, PyObject** value)
    Py_ssize_t PyDict_GET_SIZE(object d)
    void* PyUnicode_DATA(object o)
    PyObject* PyErr_Occurred()
    int PyErr_ExceptionMatches(object exc)
    void PyErr_Clear()
    double _long_as_double "PyLong_AsDouble" (object o)  # error: -1.0 and an exception set
    const Py_ssize_t PY_SSIZE_T_MAX

__all__ = [
    "decode_amf0",
    "decode_amf3",
    "encode_amf0",
    "MAX_DEPTH_LIMIT",
    "ENCODE_MAX_DEPTH",
    "DEFAULT_MAX_NODES",
    "DEFAULT_MAX_EXPANDED_SIZE",
]

MAX_DEPTH_LIMIT = 256
ENCODE_MAX_DEPTH = 64
DEFAULT_MAX_NODES = 65536
DEFAULT_MAX_EXPANDED_SIZE = 16 * 1024 * 1024
cdef enum:
    C_ENCODE_MAX_DEPTH = 64
    C_MAX_DEPTH_LIMIT = 256
    C_DEFAULT_MAX_NODES = 65536
    C_DEFAULT_MAX_EXPANDED_SIZE = 16 * 1024 * 1024

# Sits in a reference table while its container is still being decoded.
cdef object _INCOMPLETE = object()
cdef object _UNDEFINED = UNDEFINED
cdef object _ECMAArray = ECMAArray
cdef object _TypedObject = TypedObject
cdef object _AMFDate = AMFDate
cdef object _XMLDocument = XMLDocument
cdef object _Mapping = Mapping
# The very objects decode_amf0's defaults are, so that a call with the defaults skips the checks.
cdef object _DEFAULT_MAX_NODES = DEFAULT_MAX_NODES
cdef object _DEFAULT_MAX_EXPANDED_SIZE = DEFAULT_MAX_EXPANDED_SIZE


# ------------------------------------------------------------------------------- byte helpers

cdef inline uint32_t _be16(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef inline uint32_t _be32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline double _be_double(const unsigned char* p) noexcept nogil:
    # Assembling the integer with shifts is the byte swap (one bswap at -O2), and is right on
    # big-endian hosts too; memcpy moves the bits into the double without aliasing trouble.
    cdef uint64_t bits = ((<uint64_t>_be32(p)) << 32) | _be32(p + 4)
    cdef double value
    memcpy(&value, &bits, 8)
    return value


cdef inline void _put_be16(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 8)
    p[1] = <unsigned char>v


cdef inline void _put_be32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline void _put_be_double(unsigned char* p, double value) noexcept nogil:
    cdef uint64_t bits
    memcpy(&bits, &value, 8)
    _put_be32(p, <uint32_t>(bits >> 32))
    _put_be32(p + 4, <uint32_t>bits)


# --------------------------------------------------------------------------------- text cache

cdef enum:
    KEY_CACHE_SIZE = 512  # a power of two
    KEY_CACHE_MAX_LEN = 32  # keys, and status codes such as "NetConnection.Connect.Success"

# Direct-mapped cache of short ASCII strings (object keys, command names): the same few dozen
# arrive in every message.  A hit returns the cached str, whose hash is already computed, so the
# dict insert that follows skips hashing too.  Entries hold one strong reference each.
cdef PyObject* _key_cache[KEY_CACHE_SIZE]
cdef Py_ssize_t _i
for _i in range(KEY_CACHE_SIZE):
    _key_cache[_i] = NULL


cdef int _utf8_error(int amf3) except -1:
    # Only a UnicodeDecodeError becomes AMFError; anything else (MemoryError) propagates.
    if PyErr_ExceptionMatches(UnicodeDecodeError):
        PyErr_Clear()
        raise AMFError("invalid UTF-8 in AMF3 string" if amf3 else "invalid UTF-8 in AMF0 string")
    return -1  # the pending exception propagates


cdef inline object _decode_text(const unsigned char* p, Py_ssize_t size, int amf3):
    cdef PyObject* text = PyUnicode_DecodeUTF8(<const char*>p, size, NULL)
    if text is NULL:
        _utf8_error(amf3)
    return _steal(text)


cdef inline object _steal(PyObject* obj):
    # Turns a new reference from a C-API call into a Cython-owned object.
    cdef object result = <object>obj
    Py_DECREF(result)
    return result


cdef inline uint64_t _load64(const unsigned char* p) noexcept nogil:
    cdef uint64_t word
    memcpy(&word, p, 8)
    return word


cdef inline bint _same(const unsigned char* a, const unsigned char* b, Py_ssize_t size) noexcept nogil:
    # memcmp for the short strings of the cache, without the library call.
    cdef Py_ssize_t i
    if size >= 8:
        i = 0
        while i + 8 < size:
            if _load64(a + i) != _load64(b + i):
                return False
            i += 8
        return _load64(a + size - 8) == _load64(b + size - 8)
    for i in range(size):
        if a[i] != b[i]:
            return False
    return True


cdef object _text(const unsigned char* p, Py_ssize_t size, int amf3):
    """UTF-8 bytes to str, through the cache when they are short ASCII."""
    cdef uint64_t word, seen, h
    cdef Py_ssize_t i
    cdef size_t slot
    cdef PyObject* hit
    cdef PyObject* fresh
    cdef object text
    if size == 0 or size > KEY_CACHE_MAX_LEN:
        return _decode_text(p, size, amf3)
    # Hash and ASCII test a word at a time (the last word may overlap the one before).
    if size >= 8:
        h = <uint64_t>size
        seen = 0
        i = 0
        while i + 8 < size:
            word = _load64(p + i)
            seen |= word
            h = (h ^ word) * 0x9E3779B97F4A7C15ULL
            i += 8
        word = _load64(p + size - 8)
    else:
        h = <uint64_t>size
        word = 0
        for i in range(size):
            word = (word << 8) | p[i]
        seen = 0
    seen |= word
    if seen & 0x8080808080808080ULL:
        return _decode_text(p, size, amf3)
    h = (h ^ word) * 0x9E3779B97F4A7C15ULL
    slot = <size_t>(h >> 40) & (KEY_CACHE_SIZE - 1)
    hit = _key_cache[slot]
    if hit is not NULL:
        text = <object>hit
        if PyUnicode_GET_LENGTH(text) == size and _same(<const unsigned char*>PyUnicode_DATA(text), p, size):
            return text
    fresh = PyUnicode_DecodeUTF8(<const char*>p, size, NULL)  # ASCII: only MemoryError
    if fresh is NULL:
        _utf8_error(amf3)
    # The cache keeps the new reference; the one we return is Cython's own.  Re-read the slot
    # rather than trusting `hit`: whatever is in it now is what the cache owns.
    hit = _key_cache[slot]
    _key_cache[slot] = fresh
    Py_XDECREF(hit)
    return <object>fresh


# ------------------------------------------------------------------------------------ decoding

cdef int _check_max_depth(object max_depth) except -1:
    cdef long value
    cdef int overflow = 0
    if type(max_depth) is int:  # the usual case, without Python-level comparisons
        value = PyLong_AsLongAndOverflow(max_depth, &overflow)
        if not overflow and 0 <= value <= C_MAX_DEPTH_LIMIT:
            return <int>value
    if not isinstance(max_depth, int):
        raise TypeError(f"max_depth must be an int, not {type(max_depth).__name__}")
    if not 0 <= max_depth <= MAX_DEPTH_LIMIT:
        raise ValueError(f"max_depth must be between 0 and {MAX_DEPTH_LIMIT}")
    return max_depth


cdef Py_ssize_t _check_budget(str name, object value) except -1:
    # The twin's checks and texts.  Anything above a quarter of Py_ssize_t's range is as good
    # as unlimited (no input can be that long) and is clamped there, which leaves the room
    # that the arithmetic on what is left needs (an AMF3 string reference may be longer than
    # its target, so the size left can grow a little).
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must not be negative")
    if value > PY_SSIZE_T_MAX // 4:
        return PY_SSIZE_T_MAX // 4
    return PyLong_AsSsize_t(value)


cdef enum:
    INLINE_REFS = 16
    MAX_STORED_REFS = 0x10000  # a u16 cannot point further; later entries are only counted


# One AMF0 reference table entry: the container (an owned reference, NULL while it is still
# being decoded) and, once complete, its expanded value count and size (see the twin).
cdef struct _Ref:
    PyObject* obj
    Py_ssize_t nodes
    Py_ssize_t size


# All decoder state lives in a C struct on decode_amf0's stack: no per-call object to allocate.
cdef struct _Dec:
    const unsigned char* buf
    Py_ssize_t n
    Py_ssize_t pos
    int max_depth
    # Budgets (the twin's docstring): the limits, and what is left of them.  Every value costs
    # one decrement of `nodes`; only references take from `size`.
    Py_ssize_t max_nodes
    Py_ssize_t max_size
    Py_ssize_t nodes
    Py_ssize_t size
    # AMF0 reference table.
    _Ref* refs
    Py_ssize_t nrefs
    Py_ssize_t refs_cap
    _Ref refs_inline[INLINE_REFS]
    # AMF3 tables (owned lists, created at the first AMF3 value): strings and their wire sizes,
    # objects (with _INCOMPLETE placeholders) and their (values, bytes) costs, and traits as
    # (class_name, sealed member names, dynamic, bytes).
    PyObject* strings
    PyObject* string_sizes
    PyObject* objects
    PyObject* object_costs
    PyObject* traits
    Py_buffer view
    bint has_view


cdef object _attach(_Dec* d, object data, object max_depth, object max_nodes, object max_size):
    """Set up ``d`` for ``data``; returns the object that owns the bytes being read."""
    cdef object mv
    d.max_depth = _check_max_depth(max_depth)
    if max_nodes is _DEFAULT_MAX_NODES and max_size is _DEFAULT_MAX_EXPANDED_SIZE:
        d.max_nodes = C_DEFAULT_MAX_NODES  # the defaults: no Python-level checks
        d.max_size = C_DEFAULT_MAX_EXPANDED_SIZE
    else:
        d.max_nodes = _check_budget("max_nodes", max_nodes)
        d.max_size = _check_budget("max_expanded_size", max_size)
    d.pos = 0
    d.refs = d.refs_inline
    d.nrefs = 0
    d.refs_cap = INLINE_REFS
    d.strings = NULL
    d.string_sizes = NULL
    d.objects = NULL
    d.object_costs = NULL
    d.traits = NULL
    d.has_view = False
    if type(data) is not bytes and type(data) is not bytearray:
        mv = memoryview(data)  # the twin's conversion, so the same TypeError for non-buffers
        data = mv if mv.c_contiguous else mv.tobytes()
    if type(data) is not bytes:
        # The export also stops a bytearray from being resized under us while we read.
        PyObject_GetBuffer(data, &d.view, PyBUF_SIMPLE)
        d.has_view = True
        d.buf = <const unsigned char*>d.view.buf
        d.n = d.view.len
    else:
        d.buf = <const unsigned char*>PyBytes_AS_STRING(data)
        d.n = PyBytes_GET_SIZE(data)
    d.nodes = d.max_nodes
    d.size = d.max_size - d.n  # >= -PY_SSIZE_T_MAX: charging a size <= max_size cannot wrap
    return data


cdef void _release(_Dec* d) noexcept:
    cdef Py_ssize_t i
    for i in range(min(d.nrefs, MAX_STORED_REFS)):
        Py_XDECREF(d.refs[i].obj)
    if d.refs is not d.refs_inline:
        free(d.refs)
    d.refs = d.refs_inline
    d.nrefs = 0
    Py_XDECREF(d.strings)
    Py_XDECREF(d.string_sizes)
    Py_XDECREF(d.objects)
    Py_XDECREF(d.object_costs)
    Py_XDECREF(d.traits)
    d.strings = d.string_sizes = d.objects = d.object_costs = d.traits = NULL
    if d.has_view:
        PyBuffer_Release(&d.view)
        d.has_view = False


cdef Py_ssize_t _ref_open(_Dec* d) except -1:
    """Reserve the next AMF0 reference slot (incomplete until _ref_close)."""
    cdef Py_ssize_t index = d.nrefs
    cdef _Ref* grown
    if index < MAX_STORED_REFS:
        if index == d.refs_cap:
            if d.refs is d.refs_inline:
                grown = <_Ref*>malloc(2 * index * sizeof(_Ref))
                if grown is not NULL:
                    memcpy(grown, d.refs, index * sizeof(_Ref))
            else:
                grown = <_Ref*>realloc(d.refs, 2 * index * sizeof(_Ref))
            if grown is NULL:
                raise MemoryError()
            d.refs = grown
            d.refs_cap = 2 * index
        d.refs[index].obj = NULL
    d.nrefs = index + 1
    return index


cdef inline void _ref_close(_Dec* d, Py_ssize_t index, object obj, Py_ssize_t nodes,
                            Py_ssize_t size) noexcept:
    if index < MAX_STORED_REFS:
        Py_INCREF(obj)
        d.refs[index].obj = <PyObject*>obj
        d.refs[index].nodes = nodes
        d.refs[index].size = size


cdef object _too_deep(_Dec* d):
    return AMFError(f"AMF nesting deeper than {d.max_depth} levels")


cdef int _too_many_nodes(_Dec* d) except -1:
    raise AMFError(f"AMF data expands to more than {d.max_nodes} values")


cdef int _charge(_Dec* d, Py_ssize_t nodes, Py_ssize_t size) except -1:
    """A reference stands for ``nodes`` values and ``size`` bytes beyond its own one value."""
    # Both are at most their limit and what is left is >= -limit: no overflow.
    d.nodes -= nodes
    if d.nodes < 0:
        _too_many_nodes(d)
    d.size -= size
    if d.size < 0:
        raise AMFError(f"AMF data expands to more than {d.max_size} bytes")
    return 0


# ---------------------------------------------------------------------------------------- AMF0

cdef object _read0(_Dec* d, int depth):
    """One AMF0 value at ``d.pos``; branches by frequency."""
    cdef const unsigned char* buf = d.buf
    cdef Py_ssize_t n = d.n
    cdef Py_ssize_t pos = d.pos
    cdef Py_ssize_t end
    cdef uint32_t index, size
    cdef unsigned char marker
    cdef object obj
    cdef _Ref* ref
    d.nodes -= 1
    if d.nodes < 0:
        _too_many_nodes(d)
    if pos >= n:
        raise AMFError("truncated AMF0 value")
    marker = buf[pos]
    pos += 1
    if marker == 0x02:  # string
        if pos + 2 > n:
            raise AMFError("truncated AMF0 string")
        end = pos + 2 + _be16(buf + pos)
        if end > n:
            raise AMFError("truncated AMF0 string")
        d.pos = end
        return _text(buf + pos + 2, end - pos - 2, 0)
    if marker == 0x00:  # number
        if pos + 8 > n:
            raise AMFError("truncated AMF0 number")
        d.pos = pos + 8
        return _be_double(buf + pos)
    if marker == 0x03 or marker == 0x08 or marker == 0x10:
        d.pos = pos
        return _read0_object(d, marker, depth)
    if marker == 0x05:  # null
        d.pos = pos
        return None
    if marker == 0x01:  # boolean
        if pos >= n:
            raise AMFError("truncated AMF0 boolean")
        d.pos = pos + 1
        return buf[pos] != 0
    if marker == 0x0A:  # strict array
        d.pos = pos
        return _read0_array(d, depth)
    if marker == 0x06:  # undefined
        d.pos = pos
        return _UNDEFINED
    if marker == 0x07:  # reference
        if pos + 2 > n:
            raise AMFError("truncated AMF0 reference")
        index = _be16(buf + pos)
        if index >= d.nrefs:
            raise AMFError(f"AMF0 reference {index} out of range")
        ref = &d.refs[index]
        if ref.obj is NULL:
            raise AMFError(f"AMF0 reference {index} points to an incomplete object")
        _charge(d, ref.nodes - 1, ref.size - 3)  # beyond the one value and 3 bytes it is
        d.pos = pos + 2
        return <object>ref.obj
    if marker == 0x0B:  # date
        if pos + 10 > n:
            raise AMFError("truncated AMF0 date")
        d.pos = pos + 10
        return _AMFDate(_be_double(buf + pos), <int16_t>_be16(buf + pos + 8))
    if marker == 0x0C or marker == 0x0F:  # long string, XML document
        if pos + 4 > n:
            raise AMFError("truncated AMF0 long string" if marker == 0x0C
                           else "truncated AMF0 XML document")
        size = _be32(buf + pos)
        if size > <uint64_t>(n - pos - 4):
            raise AMFError("truncated AMF0 long string" if marker == 0x0C
                           else "truncated AMF0 XML document")
        obj = _decode_text(buf + pos + 4, size, 0)
        d.pos = pos + 4 + size
        return obj if marker == 0x0C else _XMLDocument(obj)
    if marker == 0x0D:  # unsupported
        d.pos = pos
        return None
    if marker == 0x11:  # switch to AMF3 for one value
        d.pos = pos
        d.nodes += 1  # the AMF3 value is the one value: _read3 counts it
        _amf3_tables(d)
        return _read3(d, depth)
    if marker == 0x09:
        raise AMFError("unexpected AMF0 object-end marker")
    raise AMFError(f"unknown AMF0 marker 0x{marker:02x}")


cdef object _read0_object(_Dec* d, unsigned char marker, int depth):
    """Object (0x03), ECMA array (0x08) or typed object (0x10), after the marker."""
    cdef const unsigned char* buf = d.buf
    cdef Py_ssize_t n = d.n
    cdef Py_ssize_t pos = d.pos
    cdef Py_ssize_t end, index
    # To measure the expanded object: it starts at its marker, counted as one value.
    cdef Py_ssize_t start = pos - 1, nodes = d.nodes + 1, size = d.size
    cdef object obj, key, value
    if depth >= d.max_depth:
        raise _too_deep(d)
    if marker == 0x03:
        obj = {}
    elif marker == 0x08:
        if pos + 4 > n:
            raise AMFError("truncated AMF0 ECMA array count")
        pos += 4  # the count is unreliable in the wild; the end marker decides
        obj = _new_dict_subtype(_ECMAArray, ())
    else:
        if pos + 2 > n:
            raise AMFError("truncated AMF0 typed object class name")
        end = pos + 2 + _be16(buf + pos)
        if end > n:
            raise AMFError("truncated AMF0 typed object class name")
        obj = _TypedObject(_text(buf + pos + 2, end - pos - 2, 0))
        pos = end
    index = _ref_open(d)
    depth += 1
    while True:
        if pos + 2 > n:
            raise AMFError("truncated AMF0 object key")
        end = pos + 2 + _be16(buf + pos)
        if end > n:
            raise AMFError("truncated AMF0 object key")
        if end == pos + 2:
            # Empty key + 0x09 ends the object; another value after it is a property "".
            if end < n and buf[end] == 0x09:
                pos = end + 1
                break
            key = ""
        else:
            key = _text(buf + pos + 2, end - pos - 2, 0)
        d.pos = end
        value = _read0(d, depth)
        PyDict_SetItem(obj, key, value)
        pos = d.pos
    d.pos = pos
    _ref_close(d, index, obj, nodes - d.nodes, pos - start + size - d.size)
    return obj


cdef object _read0_array(_Dec* d, int depth):
    cdef Py_ssize_t n = d.n
    cdef Py_ssize_t pos = d.pos
    cdef Py_ssize_t index
    cdef Py_ssize_t start = pos - 1, nodes = d.nodes + 1, size = d.size  # as in _read0_object
    cdef uint32_t count, i
    cdef list items
    if depth >= d.max_depth:
        raise _too_deep(d)
    if pos + 4 > n:
        raise AMFError("truncated AMF0 strict array count")
    count = _be32(d.buf + pos)
    pos += 4
    if count > <uint64_t>(n - pos):  # every value takes at least its marker byte
        raise AMFError(f"AMF0 strict array count {count} exceeds the remaining {n - pos} bytes")
    d.pos = pos
    index = _ref_open(d)
    items = []
    for i in range(count):
        items.append(_read0(d, depth + 1))
    _ref_close(d, index, items, nodes - d.nodes, d.pos - start + size - d.size)
    return items


# ---------------------------------------------------------------------------------------- AMF3

cdef int _amf3_tables(_Dec* d) except -1:
    cdef object table
    if d.strings is NULL:
        table = []
        Py_INCREF(table)
        d.strings = <PyObject*>table
        table = []
        Py_INCREF(table)
        d.string_sizes = <PyObject*>table
        table = []
        Py_INCREF(table)
        d.objects = <PyObject*>table
        table = []
        Py_INCREF(table)
        d.object_costs = <PyObject*>table
        table = []
        Py_INCREF(table)
        d.traits = <PyObject*>table
    return 0


cdef Py_ssize_t _u29(_Dec* d) except -1:
    """AMF3 U29: up to three 7-bit groups with a continuation bit, then one full byte."""
    cdef const unsigned char* buf = d.buf
    cdef Py_ssize_t n = d.n
    cdef Py_ssize_t pos = d.pos
    cdef Py_ssize_t result = 0
    cdef unsigned char byte
    cdef int i
    for i in range(3):
        if pos >= n:
            raise AMFError("truncated AMF3 U29 integer")
        byte = buf[pos]
        pos += 1
        if byte < 0x80:
            d.pos = pos
            return (result << 7) | byte
        result = (result << 7) | (byte & 0x7F)
    if pos >= n:
        raise AMFError("truncated AMF3 U29 integer")
    d.pos = pos + 1
    return (result << 8) | buf[pos]


cdef object _str3(_Dec* d):
    """AMF3 UTF-8-vr: inline (added to the string table unless empty) or a reference."""
    cdef Py_ssize_t start = d.pos
    cdef Py_ssize_t header = _u29(d)
    cdef Py_ssize_t size = header >> 1
    cdef Py_ssize_t pos = d.pos
    cdef list strings = <list>d.strings
    cdef object text
    if not header & 1:
        if size >= len(strings):
            raise AMFError(f"AMF3 string reference {size} out of range")
        # Keys too: re-encoding repeats their bytes.
        _charge(d, 0, <Py_ssize_t>(<list>d.string_sizes)[size] - (pos - start))
        return strings[size]
    if size == 0:
        return ""
    if size > d.n - pos:
        raise AMFError("truncated AMF3 string")
    text = _text(d.buf + pos, size, 1)
    d.pos = pos + size
    strings.append(text)
    (<list>d.string_sizes).append(d.pos - start)
    return text


cdef object _obj_ref3(_Dec* d, Py_ssize_t index, Py_ssize_t length):
    """The complete object ``index`` of the table, for a reference of ``length`` bytes."""
    cdef list objects = <list>d.objects
    cdef object obj
    cdef Py_ssize_t nodes, size
    if index >= len(objects):
        raise AMFError(f"AMF3 object reference {index} out of range")
    obj = objects[index]
    if obj is _INCOMPLETE:
        raise AMFError(f"AMF3 object reference {index} points to an incomplete object")
    nodes, size = <tuple>(<list>d.object_costs)[index]
    _charge(d, nodes - 1, size - length)  # beyond the one value and bytes it already is
    return obj


cdef object _read3(_Dec* d, int depth):
    """One AMF3 value at ``d.pos``."""
    cdef const unsigned char* buf = d.buf
    cdef Py_ssize_t n = d.n
    cdef Py_ssize_t pos = d.pos
    cdef Py_ssize_t header, size, start
    cdef unsigned char marker
    cdef object obj
    d.nodes -= 1
    if d.nodes < 0:
        _too_many_nodes(d)
    if pos >= n:
        raise AMFError("truncated AMF3 value")
    marker = buf[pos]
    start = pos  # where the marker is: leaves in the object table measure themselves from it
    pos += 1
    d.pos = pos
    if marker == 0x06:  # string
        return _str3(d)
    if marker == 0x04:  # integer: U29, sign-extended from 29 bits
        header = _u29(d)
        if header & 0x10000000:
            header -= 0x20000000
        return header
    if marker == 0x05:  # double
        if pos + 8 > n:
            raise AMFError("truncated AMF3 double")
        d.pos = pos + 8
        return _be_double(buf + pos)
    if marker == 0x00:
        return _UNDEFINED
    if marker == 0x01:
        return None
    if marker == 0x02:
        return False
    if marker == 0x03:
        return True
    if marker == 0x0A:
        return _read3_object(d, depth)
    if marker == 0x09:
        return _read3_array(d, depth)
    if marker == 0x08:  # date: milliseconds (double); AMF3 has no time-zone field
        header = _u29(d)
        if not header & 1:
            return _obj_ref3(d, header >> 1, d.pos - start)
        pos = d.pos
        if pos + 8 > n:
            raise AMFError("truncated AMF3 date")
        obj = _AMFDate(_be_double(buf + pos), 0)
        d.pos = pos + 8
        (<list>d.objects).append(obj)
        (<list>d.object_costs).append((1, d.pos - start))
        return obj
    if marker == 0x07 or marker == 0x0B:  # XMLDocument, XML
        header = _u29(d)
        if not header & 1:
            return _obj_ref3(d, header >> 1, d.pos - start)
        pos = d.pos
        size = header >> 1
        if size > n - pos:
            raise AMFError("truncated AMF3 XML")
        obj = _XMLDocument(_decode_text(buf + pos, size, 1))
        d.pos = pos + size
        (<list>d.objects).append(obj)
        (<list>d.object_costs).append((1, d.pos - start))
        return obj
    if marker == 0x0C:  # byte array
        header = _u29(d)
        if not header & 1:
            return _obj_ref3(d, header >> 1, d.pos - start)
        pos = d.pos
        size = header >> 1
        if size > n - pos:
            raise AMFError("truncated AMF3 byte array")
        obj = PyBytes_FromStringAndSize(<const char*>buf + pos, size)
        d.pos = pos + size
        (<list>d.objects).append(obj)
        (<list>d.object_costs).append((1, d.pos - start))
        return obj
    if 0x0D <= marker <= 0x0F:
        return _read3_vector(d, marker)
    if marker == 0x10:
        raise AMFError("AMF3 vector-object is not supported")
    if marker == 0x11:
        raise AMFError("AMF3 dictionary is not supported")
    raise AMFError(f"unknown AMF3 marker 0x{marker:02x}")


cdef object _read3_object(_Dec* d, int depth):
    # To measure the expanded object: it starts at its marker, counted as one value.
    cdef Py_ssize_t start = d.pos - 1, nodes = d.nodes + 1, size = d.size
    cdef Py_ssize_t header = _u29(d)
    cdef Py_ssize_t count, i, index, traits_start, traits_size
    cdef bint dynamic
    cdef object class_name, obj, key, value
    cdef tuple sealed
    cdef list names
    cdef list objects = <list>d.objects
    cdef list traits = <list>d.traits
    if not header & 1:
        return _obj_ref3(d, header >> 1, d.pos - start)
    if depth >= d.max_depth:
        raise _too_deep(d)
    if not header & 2:
        index = header >> 2
        if index >= len(traits):
            raise AMFError(f"AMF3 traits reference {index} out of range")
        class_name, sealed, dynamic, traits_size = <tuple>traits[index]
        _charge(d, 0, traits_size)
    else:
        if header & 4:
            raise AMFError("externalizable AMF3 objects are not supported")
        dynamic = (header & 8) != 0
        count = header >> 4
        traits_start = d.pos
        traits_size = d.size
        class_name = _str3(d)
        if count > d.n - d.pos:  # every member name takes at least one byte
            raise AMFError(
                f"AMF3 sealed member count {count} exceeds the remaining {d.n - d.pos} bytes"
            )
        names = []
        for i in range(count):
            names.append(_str3(d))
        sealed = tuple(names)
        traits_size = d.pos - traits_start + traits_size - d.size
        traits.append((class_name, sealed, dynamic, traits_size))
    index = len(objects)
    objects.append(_INCOMPLETE)
    (<list>d.object_costs).append(None)
    if class_name:
        obj = _TypedObject(class_name)
    else:
        obj = {}
    depth += 1
    for key in sealed:
        value = _read3(d, depth)
        PyDict_SetItem(obj, key, value)
    if dynamic:
        while True:
            key = _str3(d)
            if not key:
                break
            value = _read3(d, depth)
            PyDict_SetItem(obj, key, value)
    objects[index] = obj
    (<list>d.object_costs)[index] = (nodes - d.nodes, d.pos - start + size - d.size)
    return obj


cdef object _read3_array(_Dec* d, int depth):
    cdef Py_ssize_t start = d.pos - 1, nodes = d.nodes + 1, size = d.size  # as in _read3_object
    cdef Py_ssize_t header = _u29(d)
    cdef Py_ssize_t count, i, index
    cdef object assoc = None
    cdef object key, value
    cdef list items
    cdef list objects = <list>d.objects
    if not header & 1:
        return _obj_ref3(d, header >> 1, d.pos - start)
    if depth >= d.max_depth:
        raise _too_deep(d)
    index = len(objects)
    objects.append(_INCOMPLETE)
    (<list>d.object_costs).append(None)
    depth += 1
    while True:
        key = _str3(d)
        if not key:
            break
        if assoc is None:
            assoc = _new_dict_subtype(_ECMAArray, ())
        value = _read3(d, depth)
        PyDict_SetItem(assoc, key, value)
    count = header >> 1
    if count > d.n - d.pos:
        raise AMFError(f"AMF3 array count {count} exceeds the remaining {d.n - d.pos} bytes")
    items = []
    for i in range(count):
        items.append(_read3(d, depth))
    (<list>d.object_costs)[index] = (nodes - d.nodes, d.pos - start + size - d.size)
    if assoc is not None:
        for i in range(count):
            PyDict_SetItem(assoc, str(i), items[i])
        objects[index] = assoc
        return assoc
    objects[index] = items
    return items


cdef object _read3_vector(_Dec* d, unsigned char marker):
    """Vector of int (0x0D), uint (0x0E) or double (0x0F)."""
    cdef Py_ssize_t start = d.pos - 1
    cdef Py_ssize_t header = _u29(d)
    cdef Py_ssize_t count, i, pos, width
    cdef const unsigned char* p
    cdef list items
    if not header & 1:
        return _obj_ref3(d, header >> 1, d.pos - start)
    count = header >> 1
    width = 8 if marker == 0x0F else 4
    pos = d.pos + 1  # fixed-length flag: irrelevant to a reader
    if pos > d.n or count * width > d.n - pos:  # count < 2**28: no overflow
        raise AMFError("truncated AMF3 vector")
    d.nodes -= count  # its items are values too
    if d.nodes < 0:
        _too_many_nodes(d)
    p = d.buf + pos
    items = []
    if marker == 0x0D:
        for i in range(count):
            items.append(<int32_t>_be32(p + 4 * i))
    elif marker == 0x0E:
        for i in range(count):
            items.append(_be32(p + 4 * i))
    else:
        for i in range(count):
            items.append(_be_double(p + 8 * i))
    d.pos = pos + count * width
    (<list>d.objects).append(items)
    (<list>d.object_costs).append((1 + count, d.pos - start))
    return items


def decode_amf0(data, max_depth=64, max_nodes=DEFAULT_MAX_NODES,
                max_expanded_size=DEFAULT_MAX_EXPANDED_SIZE) -> list:
    """Decode all consecutive AMF0 values in ``data`` (e.g. an RTMP command message body).

    Raises :class:`AMFError` for any malformed input, for nesting deeper than ``max_depth``, and
    for data that expands (every reference counted as a copy of its target) to more than
    ``max_nodes`` values or more than ``max_expanded_size`` bytes.
    """
    cdef _Dec d
    cdef list out = []
    cdef object owner = _attach(&d, data, max_depth, max_nodes, max_expanded_size)
    try:
        while d.pos < d.n:
            out.append(_read0(&d, 0))
    finally:
        _release(&d)
    return out


def decode_amf3(data, max_depth=64, max_nodes=DEFAULT_MAX_NODES,
                max_expanded_size=DEFAULT_MAX_EXPANDED_SIZE) -> list:
    """Decode all consecutive AMF3 values in ``data``, sharing one set of reference tables.

    Raises :class:`AMFError` for any malformed or unsupported input, and for input over the
    limits described at :func:`decode_amf0`.
    """
    cdef _Dec d
    cdef list out = []
    cdef object owner = _attach(&d, data, max_depth, max_nodes, max_expanded_size)
    try:
        _amf3_tables(&d)
        while d.pos < d.n:
            out.append(_read3(&d, 0))
    finally:
        _release(&d)
    return out


# ------------------------------------------------------------------------------------ encoding

cdef enum:
    STACK_BUFFER = 512

cdef struct _Out:
    unsigned char* p
    Py_ssize_t len
    Py_ssize_t cap
    bint heap


cdef int _grow(_Out* o, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap = o.cap * 2
    cdef unsigned char* p
    if cap < o.len + extra:
        cap = o.len + extra
    if o.heap:
        p = <unsigned char*>realloc(o.p, cap)
    else:
        p = <unsigned char*>malloc(cap)
        if p is not NULL:
            memcpy(p, o.p, o.len)
    if p is NULL:
        raise MemoryError()
    o.p = p
    o.cap = cap
    o.heap = True
    return 0


cdef inline int _reserve(_Out* o, Py_ssize_t extra) except -1:
    if o.len + extra > o.cap:
        return _grow(o, extra)
    return 0


cdef inline int _put_byte(_Out* o, unsigned char byte) except -1:
    _reserve(o, 1)
    o.p[o.len] = byte
    o.len += 1
    return 0


cdef inline int _put_number(_Out* o, unsigned char marker, double value) except -1:
    _reserve(o, 9)
    o.p[o.len] = marker
    _put_be_double(o.p + o.len + 1, value)
    o.len += 9
    return 0


cdef inline const char* _utf8(object text, Py_ssize_t* size) except NULL:
    cdef const char* raw
    if PyUnicode_IS_COMPACT_ASCII(text):  # the usual case: the str's own bytes
        size[0] = PyUnicode_GET_LENGTH(text)
        return <const char*>PyUnicode_DATA(text)
    raw = PyUnicode_AsUTF8AndSize(text, size)  # cached in the str after the first call
    if raw is NULL:
        _utf8_encode_error()
    return raw


cdef int _utf8_encode_error() except -1:
    if PyErr_ExceptionMatches(UnicodeEncodeError):
        PyErr_Clear()
        raise AMFError("str with surrogates cannot be encoded as UTF-8")
    return -1  # the pending exception propagates


cdef double _as_double(object value) except? -1.0:
    cdef double result
    if type(value) is int:
        result = _long_as_double(value)
        if result == -1.0 and PyErr_Occurred() is not NULL:
            _number_error()
        return result
    try:
        # float() semantics exactly (a subclass's __float__ is honoured), as in the twin.
        return PyFloat_AS_DOUBLE(PyNumber_Float(value))
    except OverflowError:
        raise AMFError("int too large to encode as an AMF0 number") from None


cdef int _number_error() except -1:
    if PyErr_ExceptionMatches(OverflowError):
        PyErr_Clear()
        raise AMFError("int too large to encode as an AMF0 number")
    return -1  # the pending exception propagates


cdef int _put_string(_Out* o, object text) except -1:
    cdef Py_ssize_t size
    cdef const char* raw = _utf8(text, &size)
    if size <= 0xFFFF:
        _reserve(o, 3 + size)
        o.p[o.len] = 0x02
        _put_be16(o.p + o.len + 1, <uint32_t>size)
        o.len += 3
    elif size <= 0xFFFFFFFF:
        _reserve(o, 5 + size)
        o.p[o.len] = 0x0C
        _put_be32(o.p + o.len + 1, <uint32_t>size)
        o.len += 5
    else:
        raise AMFError("AMF0 string longer than 4294967295 bytes")
    memcpy(o.p + o.len, raw, size)
    o.len += size
    return 0


cdef int _put_key(_Out* o, object key) except -1:
    cdef Py_ssize_t size
    cdef const char* raw
    if type(key) is not str and not isinstance(key, str):
        raise AMFError(f"AMF0 object keys must be str, not {type(key).__name__}")
    raw = _utf8(key, &size)
    if size > 0xFFFF:
        raise AMFError("AMF0 object key longer than 65535 bytes")
    _reserve(o, 2 + size)
    _put_be16(o.p + o.len, <uint32_t>size)
    memcpy(o.p + o.len + 2, raw, size)
    o.len += 2 + size
    return 0


cdef int _put_properties(_Out* o, object mapping, int depth) except -1:
    cdef Py_ssize_t ppos = 0
    cdef Py_ssize_t initial
    cdef PyObject* k
    cdef PyObject* v
    cdef object key, item
    cdef type kind = type(mapping)
    if kind is dict or kind is _ECMAArray or kind is _TypedObject:
        # Our own dict types: walk the table directly instead of through items() tuples.
        initial = PyDict_GET_SIZE(mapping)
        while PyDict_Next(mapping, &ppos, &k, &v):
            key = <object>k  # owned references: encoding the value might run user code
            item = <object>v
            _put_key(o, key)
            _enc0(o, item, depth)
            if PyDict_GET_SIZE(mapping) != initial:
                raise RuntimeError("dictionary changed size during iteration")
    else:
        for key, item in mapping.items():
            _put_key(o, key)
            _enc0(o, item, depth)
    _reserve(o, 3)
    o.p[o.len] = 0
    o.p[o.len + 1] = 0
    o.p[o.len + 2] = 0x09
    o.len += 3
    return 0


cdef int _put_mapping(_Out* o, object value, int depth) except -1:
    """ECMA array, typed object or (any other Mapping) object."""
    cdef Py_ssize_t size
    cdef const char* raw
    cdef object name
    cdef type kind = type(value)
    if depth >= C_ENCODE_MAX_DEPTH:
        raise AMFError(f"AMF nesting deeper than {ENCODE_MAX_DEPTH} levels")
    if kind is dict:  # spares the isinstance() calls, which are slow for Python classes
        _put_byte(o, 0x03)
    elif kind is _ECMAArray or isinstance(value, _ECMAArray):
        _reserve(o, 5)
        o.p[o.len] = 0x08
        _put_be32(o.p + o.len + 1, <uint32_t>len(value))
        o.len += 5
    elif isinstance(value, _TypedObject):
        name = value.class_name
        if not isinstance(name, str):
            raise AMFError("TypedObject class_name must be str")
        raw = _utf8(name, &size)
        if size > 0xFFFF:
            raise AMFError("AMF0 typed object class name longer than 65535 bytes")
        _reserve(o, 3 + size)
        o.p[o.len] = 0x10
        _put_be16(o.p + o.len + 1, <uint32_t>size)
        memcpy(o.p + o.len + 3, raw, size)
        o.len += 3 + size
    else:
        _put_byte(o, 0x03)
    return _put_properties(o, value, depth + 1)


cdef int _put_strict_array(_Out* o, object items, int depth) except -1:
    cdef Py_ssize_t count = len(items)
    if depth >= C_ENCODE_MAX_DEPTH:
        raise AMFError(f"AMF nesting deeper than {ENCODE_MAX_DEPTH} levels")
    if count > 0xFFFFFFFF:
        raise AMFError("AMF0 strict array longer than 4294967295 items")
    _reserve(o, 5)
    o.p[o.len] = 0x0A
    _put_be32(o.p + o.len + 1, <uint32_t>count)
    o.len += 5
    for item in items:
        _enc0(o, item, depth + 1)
    return 0


cdef int _enc0(_Out* o, object value, int depth) except -1:
    """Append the encoding of ``value``; ``depth`` counts the containers around it."""
    cdef type kind = type(value)
    # Fast paths on exact types; anything else goes through the ordered checks below.
    if kind is str:
        return _put_string(o, value)
    if kind is float:
        return _put_number(o, 0x00, PyFloat_AS_DOUBLE(value))
    if kind is dict or kind is _ECMAArray:
        return _put_mapping(o, value, depth)
    if kind is bool:
        _reserve(o, 2)
        o.p[o.len] = 0x01
        o.p[o.len + 1] = 1 if value is True else 0
        o.len += 2
        return 0
    if value is None:
        return _put_byte(o, 0x05)
    if kind is int:
        return _put_number(o, 0x00, _as_double(value))
    if kind is list or kind is tuple:
        return _put_strict_array(o, value, depth)
    return _enc0_other(o, value, depth)


cdef int _enc0_other(_Out* o, object value, int depth) except -1:
    # Order matters: bool before int, XMLDocument before str, AMFDate (a tuple) before tuple,
    # ECMAArray and TypedObject (dicts) before Mapping.
    cdef Py_ssize_t size
    cdef const char* raw
    cdef object ms, tz, name
    cdef int tzv
    if isinstance(value, bool):
        _reserve(o, 2)
        o.p[o.len] = 0x01
        o.p[o.len + 1] = 1 if value else 0
        o.len += 2
    elif isinstance(value, (int, float)):
        _put_number(o, 0x00, _as_double(value))
    elif isinstance(value, _XMLDocument):
        raw = _utf8(value, &size)
        if size > 0xFFFFFFFF:
            raise AMFError("AMF0 string longer than 4294967295 bytes")
        _reserve(o, 5 + size)
        o.p[o.len] = 0x0F
        _put_be32(o.p + o.len + 1, <uint32_t>size)
        memcpy(o.p + o.len + 5, raw, size)
        o.len += 5 + size
    elif isinstance(value, str):
        _put_string(o, value)
    elif value is _UNDEFINED:
        _put_byte(o, 0x06)
    elif isinstance(value, _AMFDate):
        ms, tz = value
        if not isinstance(ms, (int, float)):
            raise AMFError("AMFDate milliseconds must be a number")
        if not isinstance(tz, int) or not -0x8000 <= tz <= 0x7FFF:
            raise AMFError("AMFDate timezone must be an int in -32768..32767")
        tzv = tz
        _put_number(o, 0x0B, _as_double(ms))
        _reserve(o, 2)
        _put_be16(o.p + o.len, <uint32_t><uint16_t><int16_t>tzv)
        o.len += 2
    elif isinstance(value, (list, tuple)):
        _put_strict_array(o, value, depth)
    elif isinstance(value, dict) or isinstance(value, _Mapping):  # dict: skips the ABC check
        _put_mapping(o, value, depth)
    else:
        raise AMFError(f"cannot encode {type(value).__name__} as AMF0")
    return 0


def encode_amf0(*values) -> bytes:
    """Encode each value as AMF0 and concatenate (an RTMP command message body).

    Raises :class:`AMFError` for values AMF0 cannot carry.
    """
    cdef unsigned char stack[STACK_BUFFER]
    cdef _Out o
    o.p = stack
    o.len = 0
    o.cap = STACK_BUFFER
    o.heap = False
    try:
        for value in values:
            _enc0(&o, value, 0)
        return PyBytes_FromStringAndSize(<const char*>o.p, o.len)
    finally:
        if o.heap:
            free(o.p)
