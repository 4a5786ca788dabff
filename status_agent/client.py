"""A minimal HTTP/1.1 GET-a-JSON-document client on raw asyncio streams.

Used by the status agent to poll its engine's ``/api/server`` and by the balancer to query
every node's agent.  Raw streams instead of httpx because the balancer's one job is to finish a
round of many small queries inside one short deadline: there is no pool to warm, nothing
resolves through the default executor when the host is an address literal, and cancelling at
the deadline just aborts the socket.
"""

from __future__ import annotations

import asyncio
import json

from watchbuy.engine.httpparse import HttpError, parse_header_lines

MAX_RESPONSE_BYTES = 1024 * 1024


class FetchError(Exception):
    """The document could not be fetched; ``str(exc)`` says why in a few words."""


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise FetchError(f"not an HTTP response: {lines[0][:60]!r}")
    try:
        headers = parse_header_lines(lines[1:])  # the request parser's, engine/httpparse.py
    except HttpError:
        raise FetchError("malformed header line in response") from None
    return int(parts[1]), headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise FetchError("bad chunk size in response") from None
        if size == 0:
            return bytes(body)
        if len(body) + size > MAX_RESPONSE_BYTES:
            raise FetchError("response too large")
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def fetch_json(host: str, port: int, path: str, timeout: float,
                     deadline: float | None = None) -> dict:
    """``GET http://host:port/path`` → the decoded JSON object, within ``timeout`` seconds.

    ``deadline`` (event loop time) replaces the timeout: the balancer gives every query of a
    round the same one, so the last query started does not end later than the first.

    Raises :class:`FetchError` for anything short of a 200 with a JSON object (timeouts,
    refused connections, resets, bad bodies alike), so callers need one ``except``.
    """
    writer = None
    try:
        limit = asyncio.timeout_at(deadline) if deadline is not None else asyncio.timeout(timeout)
        async with limit:
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_RESPONSE_BYTES)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/json\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status, headers = _parse_head(head[:-4])
            if "chunked" in headers.get("transfer-encoding", "").lower():
                body = await _read_chunked(reader)
            elif "content-length" in headers:
                length = int(headers["content-length"])
                if length > MAX_RESPONSE_BYTES:
                    raise FetchError("response too large")
                body = await reader.readexactly(length)
            else:  # close-delimited (HTTP/1.0 style)
                body = await reader.read(MAX_RESPONSE_BYTES)
    except TimeoutError:
        raise FetchError(f"no answer within {timeout:g} s") from None
    except ConnectionRefusedError:
        raise FetchError("connection refused") from None
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise FetchError("connection closed mid-response") from None
    except OSError as exc:
        raise FetchError(exc.strerror or type(exc).__name__) from None
    except ValueError:
        raise FetchError("bad Content-Length in response") from None
    finally:
        if writer is not None:
            writer.close()
    if status != 200:
        raise FetchError(f"HTTP {status}")
    try:
        document = json.loads(body)
    except ValueError:
        raise FetchError("response is not JSON") from None
    if not isinstance(document, dict):
        raise FetchError("response is not a JSON object")
    return document
