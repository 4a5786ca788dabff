"""Reading a TestClient websocket with a deadline, through its public API only.

``WebSocketTestSession.receive()`` blocks until the app sends something, and a test waiting for
an event that never comes must fail, not hang.  So each receive runs in a helper thread and the
test waits for it with a timeout.  A receive still outstanding when the wait gives up stays
attached to its socket and the next call takes its message first, so no event is lost or read
twice; closing the socket ends it.  (Use these helpers, not ``ws.receive*()``, on a socket they
have read from.)
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from concurrent.futures import Future
from typing import TYPE_CHECKING

from starlette.types import Message
from starlette.websockets import WebSocketDisconnect

if TYPE_CHECKING:  # importing the test client warns (app_helpers imports it quietly)
    from starlette.testclient import WebSocketTestSession

_outstanding: weakref.WeakKeyDictionary[WebSocketTestSession, Future[Message]] = \
    weakref.WeakKeyDictionary()  # the receive still running for a socket, if any


def _receive_into(ws: WebSocketTestSession, future: Future[Message]) -> None:
    try:
        future.set_result(ws.receive())
    except BaseException as exc:  # the socket closed under it: the waiter sees why
        future.set_exception(exc)


def next_message(ws: WebSocketTestSession, timeout: float) -> Message | None:
    """The next ASGI message the app sent on ``ws``, or None when none came within
    ``timeout`` seconds."""
    future = _outstanding.get(ws)
    if future is None:
        future = Future()
        _outstanding[ws] = future
        threading.Thread(target=_receive_into, args=(ws, future), daemon=True).start()
    try:
        message = future.result(timeout)
    except TimeoutError:
        return None
    finally:
        if future.done():
            del _outstanding[ws]
    return message


# Room counts that arrive whenever anyone comes, goes or taps a heart (site/roomlive.py):
# ws_receive and ws_quiet pass over them; ask for them by name with ws_until or ws_quiet(kind=).
AMBIENT = frozenset({"viewers", "hearts"})


def _receive(ws: WebSocketTestSession, deadline: float, timeout: float) -> dict:
    message = next_message(ws, max(0.05, deadline - time.monotonic()))
    if message is None:
        raise AssertionError(f"no websocket event within {timeout:g} s")
    if message["type"] == "websocket.close":
        raise WebSocketDisconnect(code=message.get("code", 1000),
                                  reason=message.get("reason", ""))
    return json.loads(message["text"])


def ws_receive(ws: WebSocketTestSession, timeout: float = 5.0) -> dict:
    """The next event on a TestClient websocket (viewer counts and hearts passed over); fails
    instead of hanging when none comes, and raises WebSocketDisconnect when the app closed the
    socket."""
    deadline = time.monotonic() + timeout
    while True:
        event = _receive(ws, deadline, timeout)
        if event.get("type") not in AMBIENT:
            return event


def ws_until(ws: WebSocketTestSession, kind: str, timeout: float = 5.0) -> dict:
    """The next event of type ``kind``, skipping others (product list updates and so on)."""
    deadline = time.monotonic() + timeout
    while True:
        event = _receive(ws, deadline, timeout)
        if event.get("type") == kind:
            return event


def ws_quiet(ws: WebSocketTestSession, seconds: float = 0.3,
             kind: str | None = None) -> list[dict]:
    """Events that arrive within ``seconds`` (of type ``kind`` when given; viewer counts and
    hearts only when asked for by ``kind``)."""
    deadline = time.monotonic() + seconds
    events = []
    while (left := deadline - time.monotonic()) > 0:
        message = next_message(ws, left)
        if message is None:
            break
        if message.get("type") == "websocket.send":
            events.append(json.loads(message["text"]))
    if kind is None:
        return [e for e in events if e.get("type") not in AMBIENT]
    return [e for e in events if e.get("type") == kind]
