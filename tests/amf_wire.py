"""AMF bytes written by hand from the specification, for the codec tests: what a peer may send,
independent of the codecs under test."""

from __future__ import annotations

import struct

END = b"\x00\x00\x09"  # AMF0 object end: an empty key, then the end marker


def num(value: float) -> bytes:
    """AMF0 number."""
    return b"\x00" + struct.pack(">d", value)


def key(text: str) -> bytes:
    """AMF0 UTF-8 string without a marker (object keys)."""
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def s0(text: str) -> bytes:
    """AMF0 string."""
    return b"\x02" + key(text)


def u29(value: int) -> bytes:
    """AMF3 U29 encoding."""
    assert 0 <= value < 1 << 29
    if value < 0x80:
        return bytes([value])
    if value < 0x4000:
        return bytes([0x80 | value >> 7, value & 0x7F])
    if value < 0x200000:
        return bytes([0x80 | value >> 14, 0x80 | (value >> 7) & 0x7F, value & 0x7F])
    return bytes(
        [0x80 | value >> 22, 0x80 | (value >> 15) & 0x7F, 0x80 | (value >> 8) & 0x7F, value & 0xFF]
    )
