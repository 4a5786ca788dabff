"""Endpoints for machines: the media engine's publish hooks, the ingest choice for hosts."""

from __future__ import annotations

import json
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchbuy.db import queries
from watchbuy.engine.hooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from watchbuy.site.chat import publish_room_event
from watchbuy.site.web import require_host

log = logging.getLogger("watchbuy.site.hooks")


async def rtmp_hook(request: Request):
    """on_publish / on_publish_done from a media node (HMAC-signed, see engine/hooks.py)."""
    app = request.app
    body = await request.body()
    if not verify(app.state.settings.hook_secret, request.headers.get(TIMESTAMP_HEADER, ""),
                  body, request.headers.get(SIGNATURE_HEADER, "")):
        log.warning("refused an unsigned or stale engine hook call from %s", request.client)
        return JSONResponse({"error": "bad signature"}, status_code=401)
    try:
        call = json.loads(body)
        kind, key, node_id = call["call"], str(call["key"]), str(call.get("node_id") or "")
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": "malformed hook call"}, status_code=400)
    db = app.state.db
    channel = await queries.channel_by_key(db, key)
    if channel is None and kind == "publish_done" and call.get("name"):
        # The host may have regenerated the key while live: the stream that ends still carries
        # the old key, and its room must not stay "live" forever.  The call is signed, and the
        # engine reports only names that publish granted.
        channel = await queries.channel_by_slug(db, str(call["name"]))
    if channel is None:
        return JSONResponse({"error": "unknown stream key"}, status_code=403)
    if kind == "publish":
        await queries.set_live(db, channel["id"], True, node_id)
        play_url = await app.state.media.play_url(node_id, channel["slug"])
        await publish_room_event(app, channel["id"], {"type": "live", "play_url": play_url})
        log.info("room %s is live on node %s", channel["slug"], node_id)
        return JSONResponse({"name": channel["slug"]})
    if kind == "publish_done":
        await queries.set_live(db, channel["id"], False, None)
        await publish_room_event(app, channel["id"], {"type": "offline"})
        log.info("room %s went offline", channel["slug"])
        return JSONResponse({"ok": True})
    return JSONResponse({"error": f"unknown call {kind!r}"}, status_code=400)


async def ingest(request: Request):
    """``{node_id, rtmp_url, play_base}``: where this host should point OBS now."""
    require_host(request)
    try:
        return JSONResponse(await request.app.state.media.ingest())
    except Exception as exc:
        return JSONResponse({"error": f"no media node can take a stream now: {exc}"},
                            status_code=503)


routes = [
    Route("/hooks/rtmp", rtmp_hook, methods=["POST"]),
    Route("/api/ingest", ingest),
]
