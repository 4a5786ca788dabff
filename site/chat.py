"""Live room events over one websocket per viewer: chat, live/offline, pinned product, stock.

Everything a room shows live travels through the broker topic ``room:<channel id>``: chat
messages, deletions, the host going live or offline (from the engine's hooks), the pinned product
and stock changes.  With the in-memory broker that is one process; with Redis several site
processes share each room.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict, deque
from urllib.parse import urlsplit

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from watchbuy.db import queries
from watchbuy.site.broker import BrokerUnavailable

log = logging.getLogger("watchbuy.site.chat")


def room_topic(channel_id: int) -> str:
    return f"room:{channel_id}"


async def publish_room_event(app, channel_id: int, event: dict) -> bool:
    """Send an event to everyone in the room; False (logged) when the broker is down."""
    try:
        await app.state.broker.publish(room_topic(channel_id), event)
        return True
    except BrokerUnavailable as exc:
        log.warning("room %s: event %s not delivered: %s", channel_id, event.get("type"), exc)
        return False


def public_message(message: dict) -> dict:
    return {"id": message["id"], "user_id": message["user_id"],
            "name": message["display_name"], "text": message["text"],
            "at": message["created_at"]}


class RateLimiter:
    """At most ``count`` events per ``window`` seconds per key (per site process)."""

    def __init__(self, count: int, window: float) -> None:
        self.count = count
        self.window = window
        self._events: dict[int, deque[float]] = defaultdict(deque)

    def allow(self, key: int) -> bool:
        now = time.monotonic()
        events = self._events[key]
        while events and now - events[0] > self.window:
            events.popleft()
        if len(events) >= self.count:
            return False
        events.append(now)
        return True


def clean_text(text: object, limit: int) -> str | None:
    """Chat text as stored: stripped, control characters removed; None when unusable."""
    if not isinstance(text, str):
        return None
    text = "".join(ch for ch in text if ch >= " " or ch == "\n").strip()
    if not text or len(text) > limit:
        return None
    return text


def same_origin(websocket: WebSocket) -> bool:
    """Browsers send Origin on websocket handshakes; it must be this site (as the Host header or
    the configured public URL says).  Clients without an Origin (not a browser) are let in."""
    origin = websocket.headers.get("origin")
    if not origin:
        return True
    origin_host = urlsplit(origin).netloc.lower()
    allowed = {websocket.headers.get("host", "").lower(),
               urlsplit(websocket.app.state.settings.public_url).netloc.lower()}
    return origin_host in allowed


async def room_socket(websocket: WebSocket) -> None:
    app = websocket.app
    db = app.state.db
    settings = app.state.settings
    channel = await queries.channel_by_slug(db, websocket.path_params["slug"])
    if channel is None:
        await websocket.close(code=4404)
        return
    if not same_origin(websocket):
        # Another site's page may open a websocket with this browser's cookies: refuse it.
        await websocket.close(code=4403)
        return
    user = websocket.scope["state"].get("user")
    is_host = user is not None and user["id"] == channel["host_id"]
    await websocket.accept()
    # Subscribe (and let Redis confirm) before reading the history, so nothing posted in
    # between is lost.
    subscription = app.state.broker.subscribe(room_topic(channel["id"]))
    try:
        await subscription.ready()
    except (TimeoutError, BrokerUnavailable) as exc:
        log.warning("room %s: chat unavailable: %s", channel["slug"], exc)
        await subscription.close()
        await websocket.close(code=1013)  # try again later; the page reconnects
        return
    history = await queries.recent_chat(db, channel["id"], 50)
    await websocket.send_json({
        "type": "hello",
        "messages": [public_message(m) for m in history],
        "can_chat": user is not None,
        "is_host": is_host,
        "user_id": user["id"] if user else None,
        "max_length": settings.chat_max_length,
    })
    forward = asyncio.ensure_future(_forward(subscription, websocket))
    try:
        while True:
            try:
                raw = await websocket.receive_text()
            except WebSocketDisconnect:
                break
            try:
                data = json.loads(raw)
            except ValueError:
                continue
            if isinstance(data, dict):
                await _handle(app, websocket, channel, user, is_host, data)
    finally:
        forward.cancel()
        with contextlib.suppress(Exception):
            await subscription.close()


async def _forward(subscription, websocket: WebSocket) -> None:
    try:
        async for event in subscription:
            await websocket.send_text(event.json)  # the broker's one encoding, shared
    except (WebSocketDisconnect, RuntimeError, ConnectionError):
        return
    if getattr(subscription, "overflowed", False):
        # A viewer whose connection cannot keep up with the room: reconnecting resyncs it.
        with contextlib.suppress(Exception):
            await websocket.close(code=4408)


async def _handle(app, websocket: WebSocket, channel: dict, user: dict | None, is_host: bool,
                  data: dict) -> None:
    db = app.state.db
    settings = app.state.settings
    kind = data.get("type")
    if kind == "chat":
        if user is None:
            await websocket.send_json({"type": "error", "error": "Log in to chat."})
            return
        text = clean_text(data.get("text"), settings.chat_max_length)
        if text is None:
            await websocket.send_json({"type": "error", "error":
                                       f"Messages are 1 to {settings.chat_max_length} characters."})
            return
        if await queries.is_muted(db, channel["id"], user["id"]):
            await websocket.send_json({"type": "error", "error": "The host has muted you."})
            return
        if not app.state.chat_limiter.allow(user["id"]):
            await websocket.send_json({"type": "error", "error": "Slow down a little."})
            return
        message = await queries.add_chat_message(db, channel["id"], user["id"],
                                                 user["display_name"], text)
        await publish_room_event(app, channel["id"], {"type": "chat", **public_message(message)})
    elif kind == "delete" and is_host:
        message_id = data.get("id")
        if isinstance(message_id, int) and \
                await queries.delete_chat_message(db, channel["id"], message_id):
            await publish_room_event(app, channel["id"], {"type": "deleted", "id": message_id})
    elif kind == "mute" and is_host:
        target = data.get("user_id")
        if isinstance(target, int) and target != user["id"]:
            await queries.mute(db, channel["id"], target)
            await publish_room_event(app, channel["id"], {"type": "muted", "user_id": target})


routes = [WebSocketRoute("/ws/room/{slug}", room_socket)]
