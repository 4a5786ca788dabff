"""What the node's RTMP and HTTP connections share: the asyncio protocol base of both.

A :class:`ViewerSession` is one accepted TCP connection.  It names its peer, is counted among
the node's open connections, is admitted or refused by the node (per-address cap, open-file
headroom) before it reads a byte, accounts the bytes it sends, and hands flow control to the
viewer it may be playing.  The fan-out itself (streams, tags, viewers) is in
:mod:`watchbuy.engine.relay`; the protocols are :mod:`watchbuy.engine.rtmp` and
:mod:`watchbuy.engine.http`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from watchbuy.engine.node import MediaNode
    from watchbuy.engine.relay import LiveStream, Viewer


_connection_numbers = itertools.count(1)


def new_conn_id(protocol: str) -> str:
    """A short id for one connection, unique in this process: ``r00002a`` (RTMP), ``h00002b``
    (HTTP).  Log lines about a connection carry it as ``conn_id``, so one grep finds them all."""
    return f"{protocol[:1]}{next(_connection_numbers):06x}"


class ViewerSession(asyncio.Protocol):
    """One connection of the node, RTMP or HTTP; subclasses speak the protocol."""

    protocol = "?"

    def __init__(self, node: MediaNode) -> None:
        self.node = node
        self.transport = None
        self.peer = "?"
        self.peer_host = ""
        self.ip_slot = ""  # the address this connection counts against, when it counts
        self.refused = False
        self.viewer: Viewer | None = None
        self.playing: LiveStream | None = None  # the stream ``viewer`` is attached to
        self.conn_id = new_conn_id(self.protocol)
        # Lines about this connection carry its id (``%(conn_id)s``, a JSON field); an adapter
        # adds nothing per line until a line is actually emitted.
        self.log = logging.LoggerAdapter(logging.getLogger(f"watchbuy.engine.{self.protocol}"),
                                         {"conn_id": self.conn_id})

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.peer_host = str(peer[0]) if peer else ""
        self.node.stats.connection_opened(self.protocol)
        # Per-address cap and open-file headroom, for RTMP and HTTP alike: a refused
        # connection is aborted before it reads a byte (the node logs it, rate-limited).
        if not self.node.admit(self):
            self.refused = True
            transport.abort()

    def connection_lost(self, exc) -> None:
        self.node.release(self)

    def pause_writing(self) -> None:
        if self.viewer is not None:
            self.viewer.pause_writing()

    def resume_writing(self) -> None:
        if self.viewer is not None:
            self.viewer.resume_writing()

    def count_out(self, n: int) -> None:
        self.node.stats.bytes_out += n

    def stream_ended(self, viewer: Viewer) -> None:
        """The publisher of the stream ``viewer`` plays stopped (called by ``Viewer.end``):
        the protocol tells its player so."""
        raise NotImplementedError
