"""RTMP handshake, server and client side, incremental and socket-free.

The server answers both handshakes clients send:

* the simple one (RTMP spec 5.2): C1's version field is zero; S1 is random, S2 echoes C1;
* the digest one that Flash Player, FMLE and ffmpeg send: C1 carries a non-zero version and an
  HMAC-SHA256 digest at an offset derived from four bytes in C1 (two layouts, "schemes" 0 and 1).
  The server proves itself with a digest in S1 and an S2 signed with a key derived from the
  client's digest.  ffmpeg verifies both when S1's version is 3 or more, so getting this right
  is observable.

``ServerHandshake.feed(bytes)`` returns the bytes to send; once ``done`` is true, ``leftover``
holds bytes that already belong to the chunk stream.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time

from watchbuy.engine.errors import HandshakeError

RTMP_VERSION = 3
PACKET_SIZE = 1536
DIGEST_SIZE = 32

# The well-known handshake keys: a text part and a fixed 32-byte tail.
_KEY_TAIL = bytes.fromhex("f0eec24a8068bee82e00d0d1029e7e576eec5d2d29806fab93b8e636cfeb31ae")
FP_KEY = b"Genuine Adobe Flash Player 001" + _KEY_TAIL
FMS_KEY = b"Genuine Adobe Flash Media Server 001" + _KEY_TAIL
FP_KEY_TEXT = FP_KEY[:30]
FMS_KEY_TEXT = FMS_KEY[:36]

# Version bytes we put in S1: any value >= 3 in its first byte tells the client to verify.
SERVER_VERSION = bytes((0x0D, 0x0E, 0x0A, 0x0D))


def _digest(data: bytes, key: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def digest_offset(packet: bytes, scheme: int) -> int:
    """Where the 32-byte digest sits in a C1/S1 packet for digest scheme 0 or 1."""
    base = 8 if scheme == 0 else 772
    return sum(packet[base : base + 4]) % 728 + base + 4


def _digest_at(packet: bytes, offset: int, key: bytes) -> bytes:
    return _digest(packet[:offset] + packet[offset + DIGEST_SIZE :], key)


def find_client_digest(c1: bytes) -> tuple[int, bytes] | None:
    """The (scheme, digest) of a digest-handshake C1, or None for the simple handshake."""
    if c1[4:8] == b"\0\0\0\0":
        return None
    for scheme in (0, 1):
        offset = digest_offset(c1, scheme)
        digest = c1[offset : offset + DIGEST_SIZE]
        if hmac.compare_digest(_digest_at(c1, offset, FP_KEY_TEXT), digest):
            return scheme, digest
    return None


def make_digest_packet(version: bytes, key: bytes, scheme: int) -> bytes:
    """A C1/S1 packet with time, version, random fill and a digest placed for ``scheme``."""
    packet = bytearray(struct.pack(">I", int(time.monotonic() * 1000) & 0xFFFFFFFF) + version)
    packet += os.urandom(PACKET_SIZE - 8)
    offset = digest_offset(bytes(packet), scheme)
    packet[offset : offset + DIGEST_SIZE] = _digest_at(bytes(packet), offset, key)
    return bytes(packet)


def signed_response(peer_digest: bytes, key: bytes) -> bytes:
    """S2 (or C2): random bytes signed with a key derived from the peer's digest."""
    random_part = os.urandom(PACKET_SIZE - DIGEST_SIZE)
    return random_part + _digest(random_part, _digest(peer_digest, key))


class ServerHandshake:
    """Server side: C0+C1 in → S0+S1+S2 out, then wait for C2."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._replied = False
        self.done = False
        self.leftover = b""
        self.digest_scheme: int | None = None  # None: simple handshake

    def feed(self, data: bytes) -> bytes:
        if self.done:
            raise HandshakeError("handshake already complete")
        self._buffer += data
        reply = b""
        if not self._replied:
            if not self._buffer:
                return b""
            if self._buffer[0] != RTMP_VERSION:
                # 0x06 would be RTMPE (encrypted), anything else is not RTMP at all.
                raise HandshakeError(f"unsupported RTMP version byte 0x{self._buffer[0]:02x}")
            if len(self._buffer) < 1 + PACKET_SIZE:
                return b""
            c1 = bytes(self._buffer[1 : 1 + PACKET_SIZE])
            del self._buffer[: 1 + PACKET_SIZE]
            reply = bytes((RTMP_VERSION,)) + self._respond(c1)
            self._replied = True
        if len(self._buffer) >= PACKET_SIZE:
            # C2 is the client's echo of S1; clients differ in what they put there, and
            # checking it would buy nothing, so like nginx-rtmp we only wait for it.
            self.leftover = bytes(self._buffer[PACKET_SIZE:])
            self._buffer.clear()
            self.done = True
        return reply

    def _respond(self, c1: bytes) -> bytes:
        found = find_client_digest(c1)
        if found is None:
            s1 = struct.pack(">II", int(time.monotonic() * 1000) & 0xFFFFFFFF, 0)
            s1 += os.urandom(PACKET_SIZE - 8)
            return s1 + c1  # S2 echoes C1
        scheme, client_digest = found
        self.digest_scheme = scheme
        s1 = make_digest_packet(SERVER_VERSION, FMS_KEY_TEXT, scheme)
        return s1 + signed_response(client_digest, FMS_KEY)


class ClientHandshake:
    """Client side (for tests, benchmarks and relaying): C0+C1 out, S0+S1+S2 in, C2 out.

    ``digest=True`` sends a scheme-0 digest C1 the way ffmpeg does and verifies the server's
    answer; ``False`` sends the simple handshake.
    """

    def __init__(self, digest: bool = True) -> None:
        self.digest = digest
        self._buffer = bytearray()
        self.done = False
        self.leftover = b""
        if digest:
            self._c1 = make_digest_packet(bytes((9, 0, 124, 2)), FP_KEY_TEXT, 0)
        else:
            self._c1 = struct.pack(">II", 0, 0) + os.urandom(PACKET_SIZE - 8)

    def start(self) -> bytes:
        return bytes((RTMP_VERSION,)) + self._c1

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        if self.done or len(self._buffer) < 1 + 2 * PACKET_SIZE:
            return b""
        if self._buffer[0] != RTMP_VERSION:
            raise HandshakeError(f"server answered version 0x{self._buffer[0]:02x}")
        s1 = bytes(self._buffer[1 : 1 + PACKET_SIZE])
        s2 = bytes(self._buffer[1 + PACKET_SIZE : 1 + 2 * PACKET_SIZE])
        self.leftover = bytes(self._buffer[1 + 2 * PACKET_SIZE :])
        self._buffer.clear()
        self.done = True
        if not self.digest or s1[4] < 3:
            return s1
        for scheme in (0, 1):
            offset = digest_offset(s1, scheme)
            server_digest = s1[offset : offset + DIGEST_SIZE]
            if hmac.compare_digest(_digest_at(s1, offset, FMS_KEY_TEXT), server_digest):
                break
        else:
            raise HandshakeError("server S1 digest does not verify")
        client_offset = digest_offset(self._c1, 0)
        client_digest = self._c1[client_offset : client_offset + DIGEST_SIZE]
        expected = _digest(s2[:-DIGEST_SIZE], _digest(client_digest, FMS_KEY))
        if not hmac.compare_digest(expected, s2[-DIGEST_SIZE:]):
            raise HandshakeError("server S2 signature does not verify")
        return signed_response(server_digest, FP_KEY)
