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
import re
import time
import unicodedata
from collections import Counter, defaultdict
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from watchbuy.db import queries, shopping
from watchbuy.logs import LogLimiter
from watchbuy.site import security, wsframes
from watchbuy.site.broker import Broker, BrokerUnavailable
from watchbuy.site.pagecache import (
    PAGES_TOPIC,
    VISITOR_CHANGING_EVENTS,
    VISITORS_TOPIC,
    page_change,
)
from watchbuy.site.ratelimit import RateLimiter
from watchbuy.site.state import SiteState, state

if TYPE_CHECKING:
    from watchbuy.db.database import Database

log = logging.getLogger("watchbuy.site.chat")

# Close codes the room page understands (room.js): 4401 the session ended (reconnect as a
# visitor), 4429 too many sockets (retry slowly).
CLOSE_SESSION_ENDED = 4401
CLOSE_TOO_MANY = 4429
SESSIONS_TOPIC = "sessions"  # logout tells every site process which session ended

throttled = LogLimiter(log, interval=10.0)  # limits any visitor can trip: a line per kind per 10 s at most


# -- text and names ---------------------------------------------------------------------------

def _invisible_table() -> dict[int, None]:
    # Format characters (Unicode category Cf: bidi overrides and isolates, zero-width spaces and
    # joiners, the BOM, tag characters) and the blank fillers: they can reverse how a line reads
    # ("gnp.exe" shown as "exe.png") or make two different names look the same.
    ranges = [(0x00AD, 0x00AD), (0x034F, 0x034F), (0x0600, 0x0605), (0x061C, 0x061C),
              (0x06DD, 0x06DD), (0x070F, 0x070F), (0x0890, 0x0891), (0x08E2, 0x08E2),
              (0x115F, 0x1160), (0x180E, 0x180E), (0x200B, 0x200F), (0x202A, 0x202E),
              (0x2060, 0x2064), (0x2066, 0x206F), (0x3164, 0x3164), (0xFEFF, 0xFEFF),
              (0xFFA0, 0xFFA0), (0xFFF9, 0xFFFB), (0x110BD, 0x110BD), (0x110CD, 0x110CD),
              (0x13430, 0x1343F), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0001, 0xE0001),
              (0xE0020, 0xE007F)]
    return {code: None for low, high in ranges for code in range(low, high + 1)}


INVISIBLE = _invisible_table()

# Letters that look like Latin ones (Cyrillic, Greek) and digits that pass for letters: enough
# to catch "Наnа" or "H4na" posing as "Hana"; not Unicode's whole confusables table.
_LOOKALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d",
    "ԛ": "q", "ԝ": "w", "ɡ": "g", "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k",
    "μ": "u", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ϲ": "c",
    "0": "o", "1": "l", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s",
    "|": "l", "i": "l",
})
# Capitals first (before case folding loses them): Greek and Cyrillic ones shaped as Latin.
_CAPITALS = str.maketrans({
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N",
    "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X", "А": "A", "В": "B", "Е": "E", "К": "K",
    "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T", "У": "Y", "Х": "X", "І": "I",
    "Ј": "J", "Ѕ": "S",
})
_WORDS = re.compile(r"[a-z]+")
# Words a viewer's name may not carry: they would pass for the host or the site's staff.
RESERVED_WORDS = frozenset({"host", "official", "admin", "moderator", "mod", "staff",
                            "watchbuy", "support"})


def strip_invisible(text: str) -> str:
    return text.translate(INVISIBLE)


def _folded(name: str) -> str:
    decomposed = unicodedata.normalize(
        "NFKD", strip_invisible(name).translate(_CAPITALS).casefold())
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return plain.translate(_LOOKALIKES).replace("rn", "m").replace("vv", "w")


def name_skeleton(name: str) -> str:
    """What a name looks like, for comparing: case, spacing, punctuation, accents, invisible
    characters and the usual look-alike letters ignored."""
    return "".join(_WORDS.findall(_folded(name)))


def reserved_word(name: str) -> str | None:
    """The first reserved word ("host", "official", …) the name shows, if any."""
    for word in _WORDS.findall(_folded(name)):
        if word in _RESERVED_FOLDED:
            return _RESERVED_FOLDED[word]
    return None


_RESERVED_FOLDED = {_folded(word): word for word in RESERVED_WORDS}


def shown_name(name: str, is_host: bool, host_skeleton: str) -> str:
    """A chat author's name as the room shows it: a viewer whose name looks like the host's (or
    like staff) gets a marker, whatever the name was when it was stored."""
    name = strip_invisible(name)
    if not is_host and (name_skeleton(name) == host_skeleton or reserved_word(name)):
        return f"{name} (viewer)"
    return name


def server_time() -> float:
    """Now, in seconds since the epoch to the millisecond, as every time the site sends (sale
    windows, the room state): the room corrects its countdowns by the difference from its
    own clock."""
    return round(time.time(), 3)


def room_topic(channel_id: int) -> str:
    return f"room:{channel_id}"


async def publish_room_event(broker: Broker, channel_id: int, event: dict) -> bool:
    """Send an event to everyone in the room; False (logged) when the broker is down."""
    try:
        change = page_change(channel_id, event)
        if change is not None:  # first, so that a page loaded on hearing the event is fresh
            await broker.publish(PAGES_TOPIC, change)
            if change["event"] in VISITOR_CHANGING_EVENTS:  # the visitor caches' own topic
                await broker.publish(VISITORS_TOPIC, change)
        await broker.publish(room_topic(channel_id), event)
        return True
    except BrokerUnavailable as exc:
        log.warning("room %s: event %s not delivered: %s", channel_id, event.get("type"), exc)
        return False


def public_message(message: dict, channel: dict | None = None,
                   host_skeleton: str = "") -> dict:
    """A stored message as the room sends it; ``is_host`` marks the room's host (the page shows
    a Host badge: only the flag, never the name, proves who is speaking)."""
    is_host = channel is not None and message["user_id"] == channel["host_id"]
    return {"id": message["id"], "user_id": message["user_id"],
            "name": shown_name(message["display_name"], is_host, host_skeleton),
            "is_host": is_host, "text": message["text"], "at": message["created_at"]}


def clean_text(text: object, limit: int) -> str | None:
    """Chat text as stored: stripped, control characters removed; None when unusable."""
    if not isinstance(text, str):
        return None
    text = "".join(ch for ch in text if ch >= " " or ch == "\n").translate(INVISIBLE).strip()
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
               urlsplit(state(websocket)["settings"].public_url).netloc.lower()}
    return origin_host in allowed


class Connections:
    """Room websockets open in this process, per address and per user, against the limits."""

    def __init__(self) -> None:
        self.by_address: Counter[str] = Counter()
        self.by_user: Counter[int] = Counter()

    def admit(self, settings, address: str, user_id: int | None) -> str | None:
        """Counts the socket in, or says which limit refuses it."""
        if self.by_address[address] >= settings.ws_max_per_ip:
            return f"address {address} has {settings.ws_max_per_ip} room sockets open"
        if user_id is not None and self.by_user[user_id] >= settings.ws_max_per_user:
            return f"user {user_id} has {settings.ws_max_per_user} room sockets open"
        self.by_address[address] += 1
        if user_id is not None:
            self.by_user[user_id] += 1
        return None

    def release(self, address: str, user_id: int | None) -> None:
        for counter, key in ((self.by_address, address), (self.by_user, user_id)):
            if key is None:
                continue
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]  # keep the counters as small as the sockets open


class SessionWatch:
    """Ends the sockets of a session when it is logged out, in every site process.

    Logout publishes the session's (hashed) id on the broker's ``sessions`` topic; each process
    keeps ONE subscription to it (not one per socket) and closes the local sockets opened with
    that session.  Should the broker lose the event, chat still re-checks the session in the
    database before it acts on anything a socket sends.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.sockets: dict[str, set[WebSocket]] = defaultdict(set)
        self._task: asyncio.Task | None = None
        self._starting: asyncio.Lock | None = None

    async def watch(self, session_hash: str, websocket: WebSocket) -> None:
        self.sockets[session_hash].add(websocket)
        await self._ensure_running()

    def unwatch(self, session_hash: str, websocket: WebSocket) -> None:
        sockets = self.sockets.get(session_hash)
        if sockets is not None:
            sockets.discard(websocket)
            if not sockets:
                del self.sockets[session_hash]

    async def _ensure_running(self) -> None:
        if self._task is not None and not self._task.done():
            return
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._task is not None and not self._task.done():
                return
            subscription = self.broker.subscribe(SESSIONS_TOPIC)
            try:
                await subscription.ready(5.0)
            except (TimeoutError, BrokerUnavailable) as exc:
                await subscription.close()
                throttled.warning("session-watch", "logout events unavailable (sockets end on "
                                  "their next message instead): %s", exc)
                return
            self._task = asyncio.ensure_future(self._run(subscription))

    async def _run(self, subscription) -> None:
        try:
            async for event in subscription:
                for websocket in list(self.sockets.pop(str(event.get("session")), ())):
                    with contextlib.suppress(Exception):
                        await websocket.close(code=CLOSE_SESSION_ENDED)
        finally:
            with contextlib.suppress(Exception):
                await subscription.close()


async def publish_session_ended(broker: Broker, session_hash: str) -> None:
    """Tell every site process that a session ended (logout), so its sockets close and its
    session cache drops it.  Logged, never raised: the session already ended in the database
    (and in this process's cache, which the caller drops first)."""
    try:
        await broker.publish(SESSIONS_TOPIC, {"type": "session_revoked",
                                                        "session": session_hash})
    except Exception as exc:  # Redis down, or refusing the command
        log.warning("logout not announced to other processes (their sockets end on their next "
                    "message, their kept sessions within WATCHBUY_SESSION_CACHE_SECONDS): %s",
                    exc)


async def room_socket(websocket: WebSocket) -> None:
    site = state(websocket)
    settings = site["settings"]
    user = websocket.scope["state"].get("user")
    address = websocket.client.host if websocket.client else "?"
    user_id = user["id"] if user else None
    counted = site["room_connections"]
    refused = counted.admit(settings, address, user_id)
    if refused is not None:
        throttled.warning("ws-limit", "room socket refused: %s", refused)
        await websocket.close(code=CLOSE_TOO_MANY)
        return
    gauge = site["metrics"].websockets
    gauge.inc()
    try:
        await _room(websocket, site, user)
    finally:
        gauge.dec()
        counted.release(address, user_id)


async def _room(websocket: WebSocket, site: SiteState, user: dict | None) -> None:
    db, settings = site["db"], site["settings"]
    channel = await queries.channel_by_slug(db, websocket.path_params["slug"])
    if channel is None:
        await websocket.close(code=4404)
        return
    if not same_origin(websocket):
        # Another site's page may open a websocket with this browser's cookies: refuse it.
        await websocket.close(code=4403)
        return
    is_host = user is not None and user["id"] == channel["host_id"]
    host = await queries.user_by_id(db, channel["host_id"])
    host_skeleton = name_skeleton(host["display_name"]) if host else ""
    token = websocket.scope["state"].get("session_token")
    session = security.session_hash(token) if user is not None and token else None
    await websocket.accept()
    # Subscribe (and let Redis confirm) before reading the history, so nothing posted in
    # between is lost.
    # Each viewer's own bounded queue (ws_send_queue): the fan-out only appends to it, and
    # only this viewer's _forward task awaits its socket, so a viewer that stops reading never
    # delays the others; stock events replace each other in it (coalesced), and a full queue
    # (chat it cannot keep up with) ends the subscription: the socket is closed with 4408.
    subscription = site["broker"].subscribe(room_topic(channel["id"]),
                                            queue_size=settings.ws_send_queue)
    try:
        await subscription.ready()
    except (TimeoutError, BrokerUnavailable) as exc:
        log.warning("room %s: chat unavailable: %s", channel["slug"], exc)
        await subscription.close()
        await websocket.close(code=1013)  # try again later; the page reconnects
        return
    watch = site["session_watch"]
    if session is not None:
        await watch.watch(session, websocket)
    history = await queries.recent_chat(db, channel["id"], 50)
    room_live = site["room_live"]
    viewers = await room_live.join(channel["id"])
    try:
        await _talk(websocket, site, subscription, viewers, history, {
            "channel": channel, "user": user, "is_host": is_host, "session": session,
            "host_skeleton": host_skeleton})
    finally:
        room_live.leave(channel["id"])
        if session is not None:
            watch.unwatch(session, websocket)
        with contextlib.suppress(Exception):
            await subscription.close()


async def _talk(websocket: WebSocket, site: SiteState, subscription, viewers: int,
                history: list[dict], room: dict) -> None:
    """Greets the viewer, then forwards room events to it and acts on what it sends."""
    settings = site["settings"]
    channel, user = room["channel"], room["user"]
    from watchbuy.site.flash import public_sale  # flash builds on this module

    # the room's running flash sales, counted down against server_time
    sales = [public_sale(sale)
             for sale in await shopping.active_sales(site["db"], channel["id"])]
    await websocket.send_json({
        "type": "hello",
        "sales": sales,
        "messages": [public_message(m, channel, room["host_skeleton"]) for m in history],
        "can_chat": user is not None,
        "is_host": room["is_host"],
        "user_id": user["id"] if user else None,
        "max_length": settings.chat_max_length,
        "viewers": viewers,
        "server_time": server_time(),
    })
    # Right on arrival, in the event every viewer gets when the count changes.
    await websocket.send_json({"type": "viewers", "count": viewers})
    forward = asyncio.ensure_future(_forward(subscription, websocket))
    frames = RateLimiter(settings.chat_frames, settings.chat_frame_window)
    try:
        while True:
            try:
                message = await websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                break  # gone, or closed by us (logout) meanwhile
            if message["type"] != "websocket.receive":
                break  # websocket.disconnect
            raw = message.get("text")
            # The cheap checks first, before decoding anything: size, kind, rate.
            if raw is None:
                throttled.warning("ws-binary", "room %s: binary frame from %s: closed",
                                  channel["slug"], _peer(websocket))
                await _close(websocket, 1003)  # unsupported data: the room speaks JSON text
                break
            if _too_big(raw, settings.chat_frame_max_bytes):
                throttled.warning("ws-size", "room %s: frame of %d characters from %s (limit %d "
                                  "bytes): closed", channel["slug"], len(raw), _peer(websocket),
                                  settings.chat_frame_max_bytes)
                await _close(websocket, 1009)  # message too big
                break
            if not frames.allow(0):
                throttled.warning("ws-rate", "room %s: more than %d frames in %g s from %s: "
                                  "closed", channel["slug"], settings.chat_frames,
                                  settings.chat_frame_window, _peer(websocket))
                await _close(websocket, 1008)  # policy violation
                break
            try:
                data = json.loads(raw)
            except (ValueError, RecursionError):  # "[[[[…" nests past the parser's stack
                continue
            if isinstance(data, dict) and not await _handle(site, websocket, room, data):
                break
    finally:
        forward.cancel()


def _too_big(text: str, limit: int) -> bool:
    # len() first: O(1), and a text of more characters than the limit has more bytes too.  Only
    # a text already under the limit in characters is encoded to count its bytes.
    if len(text) > limit:
        return True
    return len(text) * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit


def _peer(websocket: WebSocket) -> str:
    return websocket.client.host if websocket.client else "?"


async def _close(websocket: WebSocket, code: int) -> None:
    with contextlib.suppress(Exception):
        await websocket.close(code=code)


async def _forward(subscription, websocket: WebSocket) -> None:
    writer = websocket.scope.get("extensions", {}).get(wsframes.EXTENSION)
    try:
        if writer is None:  # a server without the frame writer (tests' ASGI transports)
            async for event in subscription:
                await websocket.send_text(event.json)  # the broker's one encoding, shared
        else:
            # The broker writes each frame to this socket itself while it keeps up; what was
            # queued meanwhile (the socket paused, or until the round pending as this socket
            # switched over was written) is written here, in order, once it drains.
            subscription.write_through(writer)
            while True:
                await writer.writable()
                try:
                    event = await anext(subscription)
                except StopAsyncIteration:
                    break
                # Everything queued meanwhile goes in one write, taken and written with no
                # await in between (the fan-out writes only once the queue is empty).
                frames = [event.frame]
                while (more := subscription.get_nowait()) is not None:
                    frames.append(more.frame)
                if not writer.write(frames[0] if len(frames) == 1 else b"".join(frames)):
                    return
    except (WebSocketDisconnect, RuntimeError, ConnectionError):
        return
    if getattr(subscription, "overflowed", False):
        # A viewer whose connection cannot keep up with the room: reconnecting resyncs it.
        with contextlib.suppress(Exception):
            await websocket.close(code=4408)


async def _session_ended(db: Database, websocket: WebSocket, room: dict) -> bool:
    """True (and the socket closed) when the socket's session was logged out or expired: the
    logout event may have been lost, the database has the last word before anything is done."""
    if room["session"] is None:
        return False
    if await queries.session_user(db, room["session"]) is not None:
        return False
    await _close(websocket, CLOSE_SESSION_ENDED)
    return True


async def _handle(site: SiteState, websocket: WebSocket, room: dict, data: dict) -> bool:
    """Acts on one event from the socket; False when the socket was closed."""
    db, settings, broker = site["db"], site["settings"], site["broker"]
    channel, user, is_host = room["channel"], room["user"], room["is_host"]
    kind = data.get("type")
    if kind == "chat":
        if user is None:
            await websocket.send_json({"type": "error", "error": "Log in to chat."})
            return True
        text = data.get("text")
        # Length, session, mute and rate before any per-character work or the database write.
        if not isinstance(text, str) or not text or len(text) > settings.chat_max_length:
            await websocket.send_json({"type": "error", "error":
                                       f"Messages are 1 to {settings.chat_max_length} characters."})
            return True
        if await _session_ended(db, websocket, room):
            return False
        if await queries.is_muted(db, channel["id"], user["id"]):
            await websocket.send_json({"type": "error", "error": "The host has muted you."})
            return True
        # Counted in Redis when several site processes serve (site/ratelimit.py): a user
        # whose sockets land on different processes gets the same limit as on one.
        if not await site["chat_limiter"].claim(user["id"]):
            throttled.warning("chat-rate", "room %s: user %s over %d chat messages in %g s",
                              channel["slug"], user["id"], settings.chat_rate,
                              site["chat_limiter"].window)
            await websocket.send_json({"type": "error", "error": "Slow down a little."})
            return True
        text = clean_text(text, settings.chat_max_length)
        if text is None:
            await websocket.send_json({"type": "error", "error":
                                       f"Messages are 1 to {settings.chat_max_length} characters."})
            return True
        message = await queries.add_chat_message(db, channel["id"], user["id"],
                                                 user["display_name"], text)
        await publish_room_event(broker, channel["id"], {
            "type": "chat", **public_message(message, channel, room["host_skeleton"])})
    elif kind == "heart":
        await _heart(site, websocket, room, data.get("count", 1))
    elif kind == "time":
        # The clock the room's countdowns follow; the page measures its offset to it.
        await websocket.send_json({"type": "time", "server_time": server_time()})
    elif kind == "delete" and is_host:
        message_id = data.get("id")
        if type(message_id) is int and 0 < message_id < 2**63:  # not True, not a bigint
            if await _session_ended(db, websocket, room):
                return False
            if await queries.delete_chat_message(db, channel["id"], message_id):
                await publish_room_event(broker, channel["id"], {"type": "deleted",
                                                              "id": message_id})
    elif kind == "mute" and is_host:
        target = data.get("user_id")
        if type(target) is int and 0 < target < 2**63 and target != user["id"]:
            if await _session_ended(db, websocket, room):
                return False
            await queries.mute(db, channel["id"], target)
            await publish_room_event(broker, channel["id"], {"type": "muted", "user_id": target})
    return True


async def _heart(site: SiteState, websocket: WebSocket, room: dict, count: object) -> None:
    """Taps of the heart button: the page sends them in batches of at most heart_batch_max;
    within the shopper's rate they join the room's next aggregated "hearts" event (roomlive)."""
    settings = site["settings"]
    if type(count) is not int or not 1 <= count <= settings.heart_batch_max:
        return  # not a tap count the page sends: ignored
    user = room["user"]
    # Visitors may tap too; their budget is their address's.
    key = f"u{user['id']}" if user is not None else f"a{_peer(websocket)}"
    if not await site["heart_limiter"].claim(key):
        throttled.warning("heart-rate", "room %s: %s over %d heart frames in %g s: dropped",
                          room["channel"]["slug"], key, settings.heart_rate,
                          settings.heart_window)
        return
    site["room_live"].heart(room["channel"]["id"], count)


routes = [WebSocketRoute("/ws/room/{slug}", room_socket)]
