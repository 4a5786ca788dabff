"""Real peers for the shows tests: a loopback SMTP server that keeps what it receives, and a
started app served by uvicorn on a loopback port (Server-Sent Events need a real server:
httpx's ASGITransport waits for the whole body)."""

from __future__ import annotations

import asyncio
import contextlib
import email
import socket
import socketserver
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.applications import Starlette


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    message: email.message.Message


@dataclass
class SmtpSink:
    """A tiny SMTP server on 127.0.0.1 (RFC 5321's HELO/EHLO, MAIL, RCPT, DATA, RSET, NOOP,
    QUIT): what smtplib needs to deliver, no relaying, every message kept in ``mails``.
    aiosmtpd is not a dependency of the project; this is the few commands smtplib sends."""

    mails: list[Mail] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            def reply(self, line: str) -> None:
                self.wfile.write(line.encode() + b"\r\n")

            def handle(self) -> None:
                self.reply("220 sink ESMTP")
                sender, recipients = "", []
                while line := self.rfile.readline():
                    command = line.decode("ascii", "replace").strip()
                    verb = command[:4].upper()
                    if verb == "EHLO":
                        self.wfile.write(b"250-sink\r\n250 8BITMIME\r\n")
                    elif verb == "HELO":
                        self.reply("250 sink")
                    elif verb == "MAIL":
                        sender, recipients = command.split(":", 1)[1].strip(" <>"), []
                        self.reply("250 OK")
                    elif verb == "RCPT":
                        recipients.append(command.split(":", 1)[1].strip(" <>"))
                        self.reply("250 OK")
                    elif verb == "DATA":
                        self.reply("354 end with .")
                        lines = []
                        while (data := self.rfile.readline()) not in (b".\r\n", b""):
                            lines.append(data[1:] if data.startswith(b"..") else data)
                        with sink.arrived:
                            sink.mails.append(Mail(sender, recipients,
                                                   email.message_from_bytes(b"".join(lines))))
                            sink.arrived.notify_all()
                        self.reply("250 queued")
                    elif verb in ("RSET", "NOOP"):
                        self.reply("250 OK")
                    elif verb == "QUIT":
                        self.reply("221 bye")
                        return
                    else:
                        self.reply("502 not implemented")

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Mail]:
        def wait() -> list[Mail]:
            with self.arrived:
                self.arrived.wait_for(lambda: len(self.mails) >= count, timeout)
                return list(self.mails)

        return await asyncio.to_thread(wait)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.asynccontextmanager
async def served(app: Starlette) -> AsyncIterator[str]:
    """``app`` (its lifespan already entered) served by uvicorn on this event loop, on a free
    loopback port; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning",
                                           access_log=False))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.force_exit = True  # open event streams would hold a graceful exit
        await task
        sock.close()
