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
accepted once within the signature's time window, so a captured call cannot be replayed.  A cue
is real time (the site calls as the host pins), so that window is short
(``WATCHBUY_CUE_MAX_AGE``, 30 s, plus the hooks' 30 s of clock skew ahead) and the nonces are
kept per stream, at most ``WATCHBUY_CUE_NONCES_PER_STREAM`` each: a host pinning furiously
fills only its own stream's table, never blocking cue points of the node's other streams.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from watchbuy.engine.codecs import amf
from watchbuy.engine.hooks import (
    MAX_FUTURE_SECONDS,
    NONCE,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    check_signature,
    new_nonce,
    sign,
)
from watchbuy.logs import LogLimiter

if TYPE_CHECKING:
    from watchbuy.engine.http import HttpSession
    from watchbuy.engine.httpparse import Request
    from watchbuy.engine.node import MediaNode

log = logging.getLogger("watchbuy.engine.cues")

CUE_PATH = re.compile(r"/api/streams/([^/]{1,128})/cue")


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
        # stream name -> {nonce: when it may be forgotten}, oldest first; only for live
        # streams, so the tables are bounded by the streams and each by the per-stream cap
        self._nonces: dict[str, OrderedDict[str, float]] = {}
        self.inserted = 0
        self.refused_full = 0
        self._full_log = LogLimiter(log, interval=60.0, lines=3)

    @staticmethod
    def is_cue_path(path: str) -> bool:
        return CUE_PATH.fullmatch(path) is not None

    def _signed(self, session: HttpSession, request: Request, query: dict) -> str:
        """'' when the operator calls or the signature is good and fresh, else why not."""
        if session.is_operator(request):
            return ""
        problem = check_signature(
            self.node.settings.hook_secret, request.headers.get(TIMESTAMP_HEADER.lower(), ""),
            f"POST {request.target}".encode(), request.headers.get(SIGNATURE_HEADER.lower(), ""),
            max_age=self.node.settings.cue_max_age, max_future=MAX_FUTURE_SECONDS)
        if problem:
            return problem
        if not NONCE.fullmatch((query.get("nonce") or [""])[0]):
            return "no nonce"
        return ""

    def _forget_expired(self, now: float) -> None:
        """Drop the nonces past the window, and the tables of streams no longer live."""
        registry = self.node.registry
        for name, nonces in list(self._nonces.items()):
            while nonces and next(iter(nonces.values())) <= now:
                nonces.popitem(last=False)
            if not nonces or registry.get(name) is None:
                # a stream that ended cannot be cued: its calls (replayed or not) get a 404
                del self._nonces[name]

    def _claim_nonce(self, name: str, nonce: str) -> str:
        """'' when ``nonce`` is new for stream ``name`` (now remembered), else why not."""
        now = time.monotonic()
        self._forget_expired(now)
        nonces = self._nonces.setdefault(name, OrderedDict())
        if nonce in nonces:
            return "replayed call"
        cap = self.node.settings.cue_nonces_per_stream
        if len(nonces) >= cap:
            # forgetting one early would let it be replayed; only this stream waits
            self.refused_full += 1
            self._full_log.warning(
                "full", "stream %s: cue call refused: %d cue calls within %.0f s "
                "(WATCHBUY_CUE_NONCES_PER_STREAM); other streams are not affected",
                name, cap, self.node.settings.cue_max_age + MAX_FUTURE_SECONDS)
            return "too many cue calls for this stream"
        nonces[nonce] = now + self.node.settings.cue_max_age + MAX_FUTURE_SECONDS
        return ""

    def handle(self, session: HttpSession, request: Request) -> None:
        keep = request.keep_alive
        query = parse_qs(request.query, keep_blank_values=True)
        problem = self._signed(session, request, query)
        if problem:
            session.respond(401, {"error": problem}, keep)
            return
        raw = (query.get("product_id") or [""])[0]
        if raw and not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
            session.respond(400, {"error": "product_id must be a whole number"}, keep)
            return
        name = CUE_PATH.fullmatch(request.path).group(1)
        product_id = int(raw) if raw else None
        # the operator's calls carry no nonce; the site's nonce is claimed where the stream
        # is published, so one table per stream sees every call whichever worker took it
        nonce = None if session.is_operator(request) else query["nonce"][0]
        cluster = self.node.cluster
        if cluster is not None and name not in cluster.claims:
            # One worker of several, not the publisher's: the cue goes in where the stream
            # comes in (its recording is there, and the pulls carry the cue to every worker).
            from watchbuy.engine.http import NodeWideAnswer

            session.hold = NodeWideAnswer(session, self._forward(name, product_id, nonce),
                                          keep, False)
            return
        answer = self.insert(name, product_id, nonce)
        session.respond(answer_status(answer), answer, keep)

    def insert(self, name: str, product_id: int | None, nonce: str | None = None) -> dict:
        """Put the cue into the local stream ``name``: its answer, or an error answer.
        ``nonce``: the signed call's, accepted once (None: the operator's call)."""
        stream = self.node.registry.get(name)
        if stream is None:
            return {"error": "stream is not live"}
        if nonce is not None:
            problem = self._claim_nonce(name, nonce)
            if problem:
                return {"error": problem}
        media_ms = stream.insert_cue(lambda ms: cue_payload(ms, product_id))
        self.inserted += 1
        return {"stream": name, "media_ms": media_ms}

    async def _forward(self, name: str, product_id: int | None,
                       nonce: str | None) -> tuple[int, dict]:
        """Ask the sibling workers; the one that holds the stream's claim inserts the cue."""
        answer = await self.node.cluster.forward_cue(name, product_id, nonce)
        if answer is None:
            answer = {"error": "stream is not live"}
        return answer_status(answer), answer


def answer_status(answer: dict) -> int:
    """The HTTP status of a cue answer (local or from the publishing worker)."""
    if "media_ms" in answer:
        return 200
    error = answer.get("error", "")
    if error.startswith("too many"):
        return 429
    return 401 if error == "replayed call" else 404
