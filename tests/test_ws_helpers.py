"""The websocket test helpers (ws_helpers): a deadline instead of a hang, and no event lost or
read twice when a wait gives up while a receive is still outstanding."""

from __future__ import annotations

import pytest
from app_helpers import TestClient
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from ws_helpers import ws_quiet, ws_receive, ws_until


async def echo_later(websocket: WebSocket) -> None:
    """Sends nothing until asked; then the events asked for; "close" closes with 4001."""
    await websocket.accept()
    while True:
        try:
            asked = await websocket.receive_json()
        except WebSocketDisconnect:  # the test left the socket's block
            return
        if asked == "close":
            await websocket.close(4001, "asked to")
            return
        for kind in asked:
            await websocket.send_json({"type": kind})


@pytest.fixture
def client():
    with TestClient(Starlette(routes=[WebSocketRoute("/ws", echo_later)])) as client:
        yield client


def test_a_missing_event_fails_and_the_late_one_is_read_once(client) -> None:
    with client.websocket_connect("/ws") as ws:
        with pytest.raises(AssertionError, match="no websocket event within 0.2 s"):
            ws_receive(ws, 0.2)  # leaves its receive outstanding
        ws.send_json(["a", "b"])
        assert ws_receive(ws) == {"type": "a"}  # taken by the outstanding receive
        assert ws_receive(ws) == {"type": "b"}
        assert ws_quiet(ws, 0.2) == []
        ws.send_json(["c", "d", "e"])
        assert ws_until(ws, "d") == {"type": "d"}  # skips c
        ws.send_json(["f"])
        assert ws_quiet(ws, 0.3) == [{"type": "e"}, {"type": "f"}]
        ws.send_json(["g", "h"])
        assert ws_quiet(ws, 0.3, kind="h") == [{"type": "h"}]


def test_the_apps_close_is_a_disconnect(client) -> None:
    with client.websocket_connect("/ws") as ws:
        ws.send_json("close")
        with pytest.raises(WebSocketDisconnect) as closed:
            ws_receive(ws)
    assert closed.value.code == 4001 and closed.value.reason == "asked to"


def test_room_counts_are_passed_over_unless_asked_for(client) -> None:
    with client.websocket_connect("/ws") as ws:
        ws.send_json(["viewers", "a", "hearts", "b", "viewers"])
        assert ws_receive(ws) == {"type": "a"}
        assert ws_until(ws, "hearts") == {"type": "hearts"}
        assert ws_quiet(ws, 0.3) == [{"type": "b"}]
        ws.send_json(["viewers", "c"])
        assert ws_quiet(ws, 0.3, kind="viewers") == [{"type": "viewers"}]
