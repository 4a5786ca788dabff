"""Cue points: a pin put into the live stream, in band, at the stream's current media time.

``POST /api/streams/<name>/cue?product_id=<n>&nonce=<hex>`` (no body; ``product_id`` left out
for an unpin) inserts an AMF0 script-data message ``onCuePoint`` with ``{name: "pin"|"unpin",
type: "event", time: <seconds>, product_id}`` into the stream at the timestamp of the newest
audio or video message, and answers ``{"stream", "media_ms"}``: the site stores that timestamp
with the pin (the stream's clock, not the wall clock).  Every viewer gets the tag in order with
the media around it: HTTP-FLV (mpegts.js emits it as ``scriptdata_arrived``), RTMP players, and
the recording.  LL-HLS carries no timed metadata here; the room's websocket event covers it.

Who may call: the operator (``Authorization: Bearer <WATCHBUY_OPERATOR_TOKEN>``), or the site,
signed as the publish hooks are (HMAC-SHA256 with the hook secret over ``"<timestamp>.POST
<target>"`` in ``X-WatchBuy-Timestamp`` / ``X-WatchBuy-Signature``); the target's ``nonce`` is
accepted once within the signature's time window, so a captured call cannot be replayed.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from watchbuy.engine.codecs import amf
from watchbuy.engine.hooks import (
    MAX_AGE_SECONDS,
    MAX_FUTURE_SECONDS,
    NONCE,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    check_signature,
    new_nonce,
    sign,
)

if TYPE_CHECKING:
    from watchbuy.engine.http import HttpSession
    from watchbuy.engine.httpparse import Request
    from watchbuy.engine.node import MediaNode

CUE_PATH = re.compile(r"/api/streams/([^/]{1,128})/cue")
# signed calls remembered for replays: a few per pin, so this many covers any honest site
NONCE_CAPACITY = 4096


def cue_payload(media_ms: int, product_id: int | None) -> bytes:
    """The AMF0 body of the script-data message for a pin (or an unpin)."""
    data: dict = {"name": "pin" if product_id is not None else "unpin", "type": "event",
                  "time": media_ms / 1000.0}
    if product_id is not None:
        data["product_id"] = product_id
    return amf.encode_amf0("onCuePoint", data)


def signed_headers(secret: str, target: str) -> dict[str, str]:
    """The headers with which the site signs ``POST <target>`` (the target has its nonce)."""
    timestamp = str(int(time.time()))
    return {TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(secret, timestamp, f"POST {target}".encode())}


def cue_target(name: str, product_id: int | None) -> str:
    """The request target for a cue on stream ``name``, with a fresh nonce."""
    query = f"nonce={new_nonce()}"
    if product_id is not None:
        query += f"&product_id={int(product_id)}"
    return f"/api/streams/{name}/cue?{query}"


class CueService:
    """The node's cue endpoint."""

    def __init__(self, node: MediaNode) -> None:
        self.node = node
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self.inserted = 0

    @staticmethod
    def is_cue_path(path: str) -> bool:
        return CUE_PATH.fullmatch(path) is not None

    def _authorized(self, session: HttpSession, request: Request, query: dict) -> str:
        """'' when allowed, else why not."""
        if session.is_operator(request):
            return ""
        secret = self.node.settings.hook_secret
        problem = check_signature(
            secret, request.headers.get(TIMESTAMP_HEADER.lower(), ""),
            f"POST {request.target}".encode(), request.headers.get(SIGNATURE_HEADER.lower(), ""),
            max_age=MAX_AGE_SECONDS, max_future=MAX_FUTURE_SECONDS)
        if problem:
            return problem
        nonce = (query.get("nonce") or [""])[0]
        if not NONCE.fullmatch(nonce):
            return "no nonce"
        now = time.monotonic()
        nonces = self._nonces
        while nonces and next(iter(nonces.values())) <= now:
            nonces.popitem(last=False)
        if nonce in nonces:
            return "replayed call"
        if len(nonces) >= NONCE_CAPACITY:
            return "too many cue calls"  # forgetting one early would let it be replayed
        nonces[nonce] = now + MAX_AGE_SECONDS + MAX_FUTURE_SECONDS
        return ""

    def handle(self, session: HttpSession, request: Request) -> None:
        keep = request.keep_alive
        query = parse_qs(request.query, keep_blank_values=True)
        problem = self._authorized(session, request, query)
        if problem:
            session.respond(401, {"error": problem}, keep)
            return
        raw = (query.get("product_id") or [""])[0]
        if raw and not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
            session.respond(400, {"error": "product_id must be a whole number"}, keep)
            return
        name = CUE_PATH.fullmatch(request.path).group(1)
        product_id = int(raw) if raw else None
        cluster = self.node.cluster
        if cluster is not None and name not in cluster.claims:
            # One worker of several, not the publisher's: the cue goes in where the stream
            # comes in (its recording is there, and the pulls carry the cue to every worker).
            from watchbuy.engine.http import NodeWideAnswer

            session.hold = NodeWideAnswer(session, self._forward(name, product_id), keep, False)
            return
        answer = self.insert(name, product_id)
        session.respond(200 if "media_ms" in answer else 404, answer, keep)

    def insert(self, name: str, product_id: int | None) -> dict:
        """Put the cue into the local stream ``name``: its answer, or an error answer."""
        stream = self.node.registry.get(name)
        if stream is None:
            return {"error": "stream is not live"}
        media_ms = stream.insert_cue(lambda ms: cue_payload(ms, product_id))
        self.inserted += 1
        return {"stream": name, "media_ms": media_ms}

    async def _forward(self, name: str, product_id: int | None) -> dict:
        """Ask the sibling workers; the one that holds the stream's claim inserts the cue."""
        answer = await self.node.cluster.forward_cue(name, product_id)
        return answer if answer is not None else {"error": "stream is not live"}
