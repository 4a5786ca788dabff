"""``python -m bench.site.fanout_loop``: the CPU of the broker's fan-out loop alone, per delivery.

``bench.site.fanout`` measures a room from outside (uvicorn, the chat path, a C client); this
measures only what the fan-out does per viewer: N real loopback TCP connections served by
uvloop, each viewer a :class:`~watchbuy.site.wsframes.FrameWriter` on its transport, M rounds of
K messages published at once (``--burst``) through the in-memory broker, and the process's CPU
time over them divided by the deliveries.  The client ends never read (their receive buffers
hold what is written), so no client wakes up and nothing but the server's side is counted --
except that on loopback the server's ``write()`` also runs the receiving side's TCP input.

    python -m bench.site.fanout_loop --viewers 5000 --rounds 10 --burst 1
    python -m bench.site.fanout_loop --viewers 5000 --rounds 5 --burst 4

Only loopback.  Each viewer's protocol is the few attributes FrameWriter reads (uvicorn's
websocket protocol needs a server around it); the transport and its writes are real.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time


class _Viewer(asyncio.Protocol):
    """What FrameWriter reads of uvicorn's protocol (site/wsframes.FrameProtocol)."""

    flowing = True
    close_sent = False
    disconnected = False

    def __init__(self, connected: list[_Viewer]) -> None:
        self.connected = connected
        self.transport: asyncio.Transport | None = None
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connected.append(self)

    def pause_writing(self) -> None:
        self.flowing = False
        self.writable.clear()

    def resume_writing(self) -> None:
        self.flowing = True
        self.writable.set()


async def measure(viewers: int, rounds: int, burst: int, text_bytes: int) -> dict:
    from watchbuy.site.broker import InMemoryBroker
    from watchbuy.site.wsframes import FrameWriter

    loop = asyncio.get_running_loop()
    connected: list[_Viewer] = []
    server = await loop.create_server(lambda: _Viewer(connected), "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    clients = []
    try:
        for n in range(viewers):
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            client.setblocking(False)
            try:
                client.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            clients.append(client)
            if n % 200 == 199:
                await asyncio.sleep(0.01)  # let the accepts keep up with the backlog
        async with asyncio.timeout(60):
            while len(connected) < viewers:
                await asyncio.sleep(0.05)
        async with InMemoryBroker() as broker:
            subscriptions = []
            for viewer in connected:
                subscription = broker.subscribe("room:1")
                subscription.write_through(FrameWriter(viewer))
                subscriptions.append(subscription)
            text = "x" * text_bytes
            began = time.process_time()
            sinks = broker._topics["room:1"]
            for r in range(rounds):
                for b in range(burst):
                    await broker.publish("room:1", {"type": "chat", "r": r, "b": b, "text": text})
                # until the fan-out's round has run (after a rest as long as the last one)
                async with asyncio.timeout(60):
                    while sinks.round is not None:
                        await asyncio.sleep(0.001)
            cpu = time.process_time() - began
            queued = sum(len(s._sink.buf) for s in subscriptions)
            deliveries = viewers * rounds * burst
            return {"viewers": viewers, "rounds": rounds, "burst": burst,
                    "text_bytes": text_bytes, "cpu_s": round(cpu, 3),
                    "us_per_delivery": round(1e6 * cpu / deliveries, 2),
                    "queued_not_written": queued, "drops": dict(broker.drops),
                    "loadavg_1m": round(os.getloadavg()[0], 2),
                    "command": " ".join(["python -m bench.site.fanout_loop", *sys.argv[1:]])}
    finally:
        for client in clients:
            client.close()
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--viewers", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--burst", type=int, default=1, help="messages published at once a round")
    parser.add_argument("--text-bytes", type=int, default=120)
    args = parser.parse_args(argv)
    import uvloop  # the site's loop (watchbuy.cli.install_uvloop)

    uvloop.install()
    result = asyncio.run(measure(args.viewers, args.rounds, args.burst, args.text_bytes))
    print(json.dumps(result, indent=1))
    # every message written straight to every socket, or the figure is not the loop's
    return 0 if result["queued_not_written"] == 0 and not any(result["drops"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
