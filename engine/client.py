"""A small asyncio RTMP client (publisher and player) built on the same codecs as the server.

Used by tests that need to send what ffmpeg cannot (Enhanced RTMP HEVC, hand-made bad input)
and by the benchmarks' load generators.  It speaks the command sequence OBS uses.
"""

from __future__ import annotations

import asyncio
import struct

from watchbuy.engine.codecs import amf, chunk
from watchbuy.engine.errors import ProtocolError
from watchbuy.engine.handshake import ClientHandshake
from watchbuy.engine.wire import (
    CSID_AUDIO,
    CSID_COMMAND,
    CSID_CONTROL,
    CSID_DATA,
    CSID_VIDEO,
    MSG_AUDIO,
    MSG_COMMAND_AMF0,
    MSG_DATA_AMF0,
    MSG_SET_CHUNK_SIZE,
    MSG_VIDEO,
)


class RtmpError(Exception):
    """The server refused or ended the session."""


class RtmpClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.chunks = chunk.ChunkReader()
        self.out = chunk.ChunkWriter(128)
        self.inbox: list[tuple] = []
        self.txn = 0
        self.stream_id = 0
        self.statuses: list[dict] = []

    @classmethod
    async def open(cls, host: str, port: int, digest: bool = True,
                   connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None,
                   ) -> RtmpClient:
        """A client that has done the handshake and nothing else (tests send what follows);
        over ``connection`` when given (a test that chose which worker process it reached)."""
        reader, writer = connection or await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        handshake = ClientHandshake(digest=digest)
        writer.write(handshake.start())
        while not handshake.done:
            data = await reader.read(65536)
            if not data:
                raise RtmpError("server closed during the handshake")
            c2 = handshake.feed(data)
            if c2:
                writer.write(c2)
        if handshake.leftover:
            client.inbox.extend(client.chunks.feed(handshake.leftover))
        client.send_raw(client.out.write(CSID_CONTROL, 0, MSG_SET_CHUNK_SIZE, 0, struct.pack(">I", 4096)))
        client.out.chunk_size = 4096
        return client

    @classmethod
    async def connect(cls, host: str, port: int, app: str = "live", digest: bool = True,
                      connect_extra: dict | None = None,
                      connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None,
                      ) -> RtmpClient:
        client = await cls.open(host, port, digest, connection)
        command = {"app": app, "type": "nonprivate", "flashVer": "FMLE/3.0 (compatible; FMSc/1.0)",
                   "tcUrl": f"rtmp://{host}:{port}/{app}"}
        command.update(connect_extra or {})
        result = await client.call("connect", command)
        if result[0] != "_result":
            raise RtmpError(f"connect refused: {result}")
        client.connect_result = result
        return client

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def command(self, name: str, *args, stream_id: int = 0) -> float:
        self.txn += 1
        payload = amf.encode_amf0(name, float(self.txn), *args)
        self.send_raw(self.out.write(CSID_COMMAND, 0, MSG_COMMAND_AMF0, stream_id, payload))
        return float(self.txn)

    async def next_message(self, timeout: float = 10.0) -> tuple:
        while not self.inbox:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise RtmpError("connection closed by the server")
            self.inbox.extend(self.chunks.feed(data))
        return self.inbox.pop(0)

    async def call(self, name: str, *args, stream_id: int = 0) -> list:
        txn = self.command(name, *args, stream_id=stream_id)
        while True:
            message = await self.next_message()
            if message[2] == MSG_COMMAND_AMF0:
                values = amf.decode_amf0(message[4])
                if values[0] in ("_result", "_error") and values[1] == txn:
                    return values
                if values[0] == "onStatus":
                    self.statuses.append(values[3])

    async def wait_status(self, timeout: float = 10.0) -> dict:
        """The next onStatus info object (status or error)."""
        while True:
            message = await self.next_message(timeout)
            if message[2] == MSG_COMMAND_AMF0:
                values = amf.decode_amf0(message[4])
                if values[0] == "onStatus":
                    self.statuses.append(values[3])
                    return values[3]

    async def publish(self, key: str) -> dict:
        self.command("releaseStream", None, key)
        self.command("FCPublish", None, key)
        result = await self.call("createStream", None)
        self.stream_id = int(result[3])
        self.command("publish", None, key, "live", stream_id=self.stream_id)
        status = await self.wait_status()
        if status.get("code") != "NetStream.Publish.Start":
            raise RtmpError(status.get("code", "publish refused"))
        return status

    async def play(self, name: str) -> dict:
        result = await self.call("createStream", None)
        self.stream_id = int(result[3])
        self.command("play", None, name, -2000.0, stream_id=self.stream_id)
        while True:
            status = await self.wait_status()
            if status.get("code") == "NetStream.Play.Start":
                return status
            if status.get("level") == "error":
                raise RtmpError(status.get("code"))

    def send_metadata(self, metadata: dict) -> None:
        from watchbuy.engine.amf_types import ECMAArray

        payload = amf.encode_amf0("@setDataFrame", "onMetaData", ECMAArray(metadata))
        self.send_raw(self.out.write(CSID_DATA, 0, MSG_DATA_AMF0, self.stream_id, payload))

    def send_media(self, type_id: int, timestamp: int, payload: bytes) -> None:
        csid = CSID_VIDEO if type_id == MSG_VIDEO else CSID_AUDIO
        self.send_raw(self.out.write(csid, timestamp, type_id, self.stream_id, payload))

    async def media(self, timeout: float = 10.0) -> tuple:
        """Next audio/video/data message of a played stream: (timestamp, type_id, payload)."""
        while True:
            message = await self.next_message(timeout)
            if message[2] == MSG_DATA_AMF0 and message[4].startswith(b"\x02\x00\x11|RtmpSampleAccess"):
                continue  # a permission flag for Flash players, not stream data
            if message[2] in (MSG_AUDIO, MSG_VIDEO, MSG_DATA_AMF0):
                return message[1], message[2], message[4]
            if message[2] == MSG_COMMAND_AMF0:
                values = amf.decode_amf0(message[4])
                if values and values[0] == "onStatus":
                    self.statuses.append(values[3])

    async def drain(self) -> None:
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ProtocolError):
            pass
