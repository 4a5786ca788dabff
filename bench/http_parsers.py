"""One HTTP/1 request parser: engine/httpparse.py against httptools (llhttp), measured.

    python bench/http_parsers.py ours 8000        # HTTP-FLV accept path, the engine's parser
    python bench/http_parsers.py httptools 8000   # the same through an httptools adapter
    python bench/http_parsers.py ours healthz     # pipelined keep-alive GET /healthz

A media node runs in a child process with an in-process publisher (synthetic AVC, 25 fps); the
parent opens N HTTP-FLV viewers one after another (GET, read the head and the first body bytes,
close) and reads the child's CPU time (utime + stime from /proc) before and after, less the
publisher-only baseline: node CPU per accepted viewer.  ``httptools`` swaps in an adapter with
the RequestParser API over ``httptools.HttpRequestParser`` (without our head and buffer bounds:
it flatters httptools slightly).  Results (2 shared cores, Nov 2026): ~118 us per accepted viewer
either way, so the engine's own parser stays and the status agent uses it too (issue 12).
"""
# ruff: noqa: E401, E501, E702, I001
import asyncio, os, sys, time, multiprocessing as mp

def node_main(parser_kind, conn):
    import uvloop
    from watchbuy.engine import http as enginehttp
    from watchbuy.engine.node import MediaNode
    from watchbuy.engine.client import RtmpClient
    from watchbuy.settings import Settings
    if parser_kind == "httptools":
        import httptools
        from watchbuy.engine.httpparse import HttpError, Request

        class HtParser:
            """Same API as RequestParser over llhttp (for this measurement only)."""
            def __init__(self, max_head, max_buffer):
                self.p = httptools.HttpRequestParser(self)
                self.events = []
                self.headers = {}
                self.url = b""
                self.failed = False
                self.buffered = 0
            def on_url(self, url): self.url += url
            def on_header(self, name, value):
                self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")
            def on_headers_complete(self):
                self.events.append(Request(self.p.get_method().decode(), self.url.decode("latin-1"),
                                           "HTTP/" + self.p.get_http_version(), self.headers))
                self.headers = {}; self.url = b""
            def has_complete(self): return bool(self.events)
            def feed(self, data=b"", limit=None):
                if data and not self.failed:
                    try:
                        self.p.feed_data(data)
                    except httptools.HttpParserError:
                        self.events.append(HttpError(400, "malformed request")); self.failed = True
                if limit is None or len(self.events) <= limit:
                    out, self.events = self.events, []
                else:
                    out, self.events = self.events[:limit], self.events[limit:]
                return out
        enginehttp.RequestParser = HtParser

    async def run():
        settings = Settings(node_id="bench", rtmp_host="127.0.0.1", rtmp_port=0, http_host="127.0.0.1",
                            http_port=0, stream_keys={"k": "s"}, data_dir="", max_connections_per_ip=0)
        node = MediaNode(settings)
        await node.start()
        pub = await RtmpClient.connect("127.0.0.1", node.rtmp_port)
        await pub.publish("k")
        pub.send_media(9, 0, b"\x17\x00\x00\x00\x00" + bytes(40))
        conn.send(node.http_port)
        ts = 0
        while True:
            for i in range(25):
                key = i == 0
                pub.send_media(9, ts, (b"\x17\x01" if key else b"\x27\x01") + b"\0\0\0" + os.urandom(3000 if key else 600))
                ts += 40
                await asyncio.sleep(0.04)
    uvloop.run(run())

def cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

async def viewers(port, n):
    req = b"GET /live/s.flv HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: Lavf/59\r\nAccept: */*\r\nRange: bytes=0-\r\nConnection: close\r\nIcy-MetaData: 1\r\n\r\n"
    for _ in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(req)
        head = await r.readuntil(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0], head
        await r.read(100)
        w.close()

if __name__ == "__main__" and sys.argv[-1] != "healthz":
    kind = sys.argv[1]; n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    parent, child = mp.Pipe()
    proc = mp.Process(target=node_main, args=(kind, child), daemon=True)
    proc.start()
    port = parent.recv()
    asyncio.run(viewers(port, 100))  # warm up
    time.sleep(1)
    c0, t0 = cpu(proc.pid), time.perf_counter()
    asyncio.run(viewers(port, n))
    c1, t1 = cpu(proc.pid), time.perf_counter()
    idle0 = cpu(proc.pid); time.sleep(t1 - t0); idle = cpu(proc.pid) - idle0  # publisher-only baseline
    print(f"{kind}: {n} viewers in {t1 - t0:.2f} s; node CPU {c1 - c0:.2f} s "
          f"(idle baseline {idle:.2f} s) -> {(c1 - c0 - idle) / n * 1e6:.0f} us per accepted viewer")
    proc.kill()


async def healthz(port, seconds=3.0, depth=64):
    """Pipelined keep-alive GET /healthz: answers per second on one connection."""
    req = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
    r, w = await asyncio.open_connection("127.0.0.1", port)
    done = 0
    end = time.perf_counter() + seconds
    marker = b"HTTP/1.1 200"
    while time.perf_counter() < end:
        w.write(req * depth)
        got = 0
        buf = b""
        while got < depth:
            data = await r.read(1 << 20)
            buf += data
            got = buf.count(marker)
        done += depth
    w.close()
    return done / seconds


def main_healthz(kind):
    parent, child = mp.Pipe()
    proc = mp.Process(target=node_main, args=(kind, child), daemon=True)
    proc.start()
    port = parent.recv()
    asyncio.run(healthz(port, 0.5))
    c0 = cpu(proc.pid)
    rps = asyncio.run(healthz(port))
    c1 = cpu(proc.pid)
    print(f"{kind}: /healthz pipelined x64: {rps:.0f} answers/s; node CPU {(c1 - c0) / (rps * 3) * 1e6:.1f} us per answer")
    proc.kill()

if __name__ == "__main__" and sys.argv[-1] == "healthz":
    main_healthz(sys.argv[1])
