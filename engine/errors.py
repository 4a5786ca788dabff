"""Exceptions shared by the compiled codecs and their pure-Python twins.

Both implementations raise exactly these classes, so callers (and the parity tests) never need to
know which one is loaded.
"""


class ProtocolError(Exception):
    """The peer sent bytes that break the protocol; the connection should be dropped."""


class ChunkError(ProtocolError):
    """Malformed RTMP chunk stream."""


class AMFError(ProtocolError):
    """Malformed AMF0/AMF3 data."""


class FLVError(ProtocolError):
    """Malformed FLV stream."""


class HandshakeError(ProtocolError):
    """The RTMP handshake was not one we understand."""
