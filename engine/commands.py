"""The NetConnection and NetStream commands the node answers, each decoded once.

A command message is AMF0 values ``[name, transaction id, command object, *arguments]`` sent
on a message stream.  Each command we know has a class here whose :meth:`decode` checks and
converts its arguments once (SRS's packet classes have this shape), and
``watchbuy.engine.rtmp.COMMANDS`` maps each name to its class and to the session method that
acts on it (nginx-rtmp's ``ngx_rtmp_cmd_map[]``).  Decoding is socket-free; arguments a peer
cannot be served with raise :class:`ProtocolError`, which costs that connection one log line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from watchbuy.engine.errors import ProtocolError
from watchbuy.engine.relay import short


def stream_id(value: float) -> int:
    """A message stream id from a peer's AMF number: NaN, infinities and numbers outside the
    32-bit field are protocol errors (int() would raise or give nonsense)."""
    if not (math.isfinite(value) and 0 <= value <= 0xFFFFFFFF):
        raise ProtocolError(f"stream id {short(repr(value), 30)} is not a valid stream id")
    return int(value)


@dataclass(slots=True)
class Invocation:
    """A command with no arguments we use: its transaction id and message stream id."""

    txn: float  # echoed in the _result/_error answer
    msid: int  # the message stream the command came on

    @classmethod
    def decode(cls, txn: float, command: object, args: list, msid: int) -> Invocation:
        return cls(txn, msid)


@dataclass(slots=True)
class Connect(Invocation):
    app: object  # the application, trimmed of slashes and query; the peer's (maybe not a str)
    object_encoding: float
    lists_fourccs: bool  # Enhanced RTMP: the client sent its fourCcList, so we send ours

    @classmethod
    def decode(cls, txn: float, command: object, args: list, msid: int) -> Connect:
        if not isinstance(command, dict):
            raise ProtocolError("connect without a command object")
        app = command.get("app", "")
        if isinstance(app, str):
            app = app.strip("/").split("?", 1)[0]
        encoding = command.get("objectEncoding", 0.0)
        return cls(txn, msid, app, encoding if isinstance(encoding, float) else 0.0,
                   "fourCcList" in command)


@dataclass(slots=True)
class DeleteStream(Invocation):
    target: int  # the stream to delete: the argument, else the stream the command came on

    @classmethod
    def decode(cls, txn: float, command: object, args: list, msid: int) -> DeleteStream:
        target = stream_id(args[0]) if args and isinstance(args[0], float) else msid
        return cls(txn, msid, target)


@dataclass(slots=True)
class Publish(Invocation):
    name: str  # as sent: the stream key, maybe with a query (split_key takes it apart)

    @classmethod
    def decode(cls, txn: float, command: object, args: list, msid: int) -> Publish:
        if not args or not isinstance(args[0], str):
            raise ProtocolError("publish without a stream key")
        return cls(txn, msid, args[0])


@dataclass(slots=True)
class Play(Invocation):
    name: str  # the stream name without query or ".flv" (empty when the peer sent none)

    @classmethod
    def decode(cls, txn: float, command: object, args: list, msid: int) -> Play:
        if not args or not isinstance(args[0], str):
            raise ProtocolError("play without a stream name")
        name = args[0].split("?", 1)[0]
        if name.endswith(".flv"):
            name = name[:-4]
        return cls(txn, msid, name)


@dataclass(slots=True)
class Pause(Invocation):
    pausing: bool  # true to pause, false (or absent) to resume

    @classmethod
    def decode(cls, txn: float, command: object, args: list, msid: int) -> Pause:
        return cls(txn, msid, bool(args) and args[0] is True)
