"""Live rooms over websockets (Starlette's TestClient): chat, moderation, pins, engine hooks,
and two site processes sharing rooms through one Redis."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest
from app_helpers import run_sync_site
from hook_helpers import signed_hook
from starlette.websockets import WebSocketDisconnect
from ws_helpers import ws_quiet, ws_receive, ws_until

from watchbuy.db import queries
from watchbuy.settings import ConfigError
from watchbuy.site import chat, security
from watchbuy.site.config import load_site_settings

pytest_plugins = ["site_fixtures"]

ROOM_JS = Path(chat.__file__).parent / "static" / "js" / "room.js"


def say(ws, text) -> None:
    ws.send_json({"type": "chat", "text": text})


def count_messages(site, channel_id: int) -> int:
    return len(site.call(queries.recent_chat, site.db, channel_id, 1000))


def test_history_on_join_and_anonymous_can_read_not_write(sync_site) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    channel = host["channel"]
    for n in range(60):
        site.call(queries.add_chat_message, site.db, channel["id"], host["id"], "Hana",
                  f"message {n}")
    with site.websocket(channel["slug"]) as ws:
        hello = ws_receive(ws)
        assert hello["type"] == "hello" and hello["can_chat"] is False
        assert hello["is_host"] is False and hello["user_id"] is None
        assert [m["text"] for m in hello["messages"]] == [f"message {n}" for n in range(10, 60)]
        say(ws, "let me in")
        assert ws_receive(ws) == {"type": "error", "error": "Log in to chat."}
        ws.send_json({"type": "delete", "id": hello["messages"][0]["id"]})  # ignored
        ws.send_json({"type": "mute", "user_id": host["id"]})  # ignored
        ws.send_text("not json")  # ignored
        assert ws_quiet(ws) == []
    assert count_messages(site, channel["id"]) == 60
    with pytest.raises(WebSocketDisconnect) as refused:
        with site.websocket("no-such-room") as ws:
            pass
    assert refused.value.code == 4404


def test_chat_is_delivered_as_plain_text(sync_site) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    sam = site.user("Sam <b>")
    evil = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'
    with site.websocket(host["channel"]["slug"]) as viewer, \
            site.websocket(host["channel"]["slug"], sam) as ws:
        ws_receive(viewer)
        hello = ws_receive(ws)
        assert hello["can_chat"] is True and hello["user_id"] == sam["id"]
        say(ws, f"  {evil}\x00\x07  ")
        for socket in (viewer, ws):
            event = ws_until(socket, "chat")
            # JSON text, exactly as typed (control characters and padding removed): the page
            # shows it with textContent, never as HTML
            assert event["text"] == evil and event["name"] == "Sam <b>"
            assert event["user_id"] == sam["id"]
    [stored] = site.call(queries.recent_chat, site.db, host["channel"]["id"], 50)
    assert stored["text"] == evil
    script = ROOM_JS.read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert re.search(r"\.textContent = \" \" \+ m\.text", script)
    assert re.search(r"name\.textContent = m\.name", script)


def test_length_and_rate_limits(sync_site) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    sam = site.user("Sam")
    limit = site.settings.chat_max_length
    with site.websocket(host["channel"]["slug"], sam) as ws:
        ws_receive(ws)
        for text in ("x" * (limit + 1), "", 42, None, ["a"]):
            say(ws, text)
            assert ws_receive(ws) == {"type": "error",
                                      "error": f"Messages are 1 to {limit} characters."}
        # blank once cleaned: refused too, but cleaning comes after the rate (per-character
        # work only for messages within it), so this one counts against the rate
        say(ws, " \u200b ")
        assert ws_receive(ws) == {"type": "error",
                                  "error": f"Messages are 1 to {limit} characters."}
        say(ws, "y" * limit)
        assert ws_until(ws, "chat")["text"] == "y" * limit
        for n in range(site.settings.chat_rate - 2):
            say(ws, f"quick {n}")
            assert ws_until(ws, "chat")["text"] == f"quick {n}"
        say(ws, "one too many")
        assert ws_receive(ws) == {"type": "error", "error": "Slow down a little."}
    assert count_messages(site, host["channel"]["id"]) == site.settings.chat_rate - 1


def test_host_deletes_messages_and_mutes_users(sync_site) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    sam, tom = site.user("Sam"), site.user("Tom")
    slug = host["channel"]["slug"]
    with site.websocket(slug, host) as hosts, site.websocket(slug, sam) as sams, \
            site.websocket(slug, tom) as toms:
        assert ws_receive(hosts)["is_host"] is True
        ws_receive(sams)
        assert ws_receive(toms)["is_host"] is False
        say(sams, "rude words")
        message = ws_until(hosts, "chat")
        ws_until(sams, "chat")
        ws_until(toms, "chat")
        # a viewer cannot delete or mute
        toms.send_json({"type": "delete", "id": message["id"]})
        toms.send_json({"type": "mute", "user_id": sam["id"]})
        assert ws_quiet(hosts) == []
        # the host can
        hosts.send_json({"type": "delete", "id": message["id"]})
        for socket in (hosts, sams, toms):
            assert ws_until(socket, "deleted") == {"type": "deleted", "id": message["id"]}
        hosts.send_json({"type": "mute", "user_id": sam["id"]})
        for socket in (hosts, sams, toms):
            assert ws_until(socket, "muted") == {"type": "muted", "user_id": sam["id"]}
        say(sams, "still here")
        assert ws_receive(sams) == {"type": "error", "error": "The host has muted you."}
        hosts.send_json({"type": "mute", "user_id": host["id"]})  # not themselves
        say(hosts, "welcome")
        assert ws_until(toms, "chat")["text"] == "welcome"
        assert ws_quiet(toms, kind="chat") == []
    with site.websocket(slug) as late:
        assert [m["text"] for m in ws_receive(late)["messages"]] == ["welcome"]


def test_pinning_in_the_studio_reaches_the_room(sync_site) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    mug = site.product(host, name="Mug <i>", price_minor=1800, stock=7)
    with site.websocket(host["channel"]["slug"]) as ws:
        ws_receive(ws)
        response = site.post("/studio/pin", host, {"product_id": str(mug["id"])})
        assert response.status_code == 303
        event = ws_until(ws, "pinned")
        assert event["product"] == {"id": mug["id"], "name": "Mug <i>", "description": "",
                                    "price": "$18.00", "regular_price": "$18.00",
                                    "price_minor": 1800, "regular_price_minor": 1800, "stock": 7,
                                    "sold": 0, "low_stock": True, "physical": True,
                                    "image": None, "sale": None}
        response = site.post("/studio/pin", host, {"product_id": ""})
        assert ws_until(ws, "pinned") == {"type": "pinned", "product": None}
        # deleting the pinned product takes the card down everywhere
        site.post("/studio/pin", host, {"product_id": str(mug["id"])})
        assert ws_until(ws, "pinned")["product"]["id"] == mug["id"]
        other = site.product(host, name="Bag")
        assert site.post(f"/studio/products/{other['id']}/delete", host, {}).status_code == 303
        assert ws_quiet(ws, kind="pinned") == []  # not pinned: the card stays
        assert site.post(f"/studio/products/{mug['id']}/delete", host, {}).status_code == 303
        assert ws_until(ws, "pinned") == {"type": "pinned", "product": None}
        assert ws_until(ws, "products")["products"] == []
        mug = site.product(host, name="Mug <i>", price_minor=1800, stock=7)
        # a product change is announced with its new stock
        response = site.post(f"/studio/products/{mug['id']}", host,
                             {"name": "Mug", "price": "18", "stock": "3"})
        assert response.status_code == 303
        products = ws_until(ws, "products")["products"]
        assert [(p["name"], p["stock"]) for p in products] == [("Mug", 3)]


def hook(site, payload: dict, secret: str | None = None, timestamp: int | None = None):
    call = signed_hook(secret or site.settings.hook_secret, payload, timestamp)
    return site.client.post("/hooks/rtmp", content=call["content"], headers=call["headers"])


def test_engine_hooks_drive_live_and_offline(sync_site) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    channel = host["channel"]
    key, slug = channel["stream_key"], channel["slug"]
    publish = {"call": "publish", "app": "live", "key": key, "addr": "10.0.0.9",
               "node_id": "local"}
    with site.websocket(slug) as ws:
        ws_receive(ws)
        # forged, stale, unknown key, malformed: refused, nothing changes
        assert hook(site, publish, secret="not-the-secret").status_code == 401
        assert hook(site, publish, timestamp=int(time.time()) - 3600).status_code == 401
        unsigned = site.client.post("/hooks/rtmp", json=publish)
        assert unsigned.status_code == 401
        response = hook(site, {**publish, "key": "wb_guess"})
        assert response.status_code == 403 and response.json() == {"error": "unknown stream key"}
        assert hook(site, {"call": "publish"}).status_code == 400
        assert ws_quiet(ws) == []
        assert not site.call(queries.channel_by_slug, site.db, slug)["is_live"]

        response = hook(site, publish)
        assert response.status_code == 200 and response.json() == {"name": slug}
        assert ws_until(ws, "live") == {"type": "live",
                                        "play_url": f"http://127.0.0.1:8000/live/{slug}.flv",
                                        "hls_url": f"http://127.0.0.1:8000/live/{slug}/index.m3u8"}
        assert site.call(queries.channel_by_slug, site.db, slug)["is_live"]
        site.node.streams = [{"name": slug, "viewers": 7}]
        home = site.client.get("/")
        live_part = home.text.split("Recently live")[0]
        assert f"/room/{slug}" in live_part and "7 watching" in live_part
        state = site.client.get(f"/api/rooms/{slug}").json()
        assert state["live"] is True and state["viewers"] == 7

        response = hook(site, {"call": "publish_done", "app": "live", "key": key, "name": slug,
                               "node_id": "local", "addr": ""})
        assert response.status_code == 200
        assert ws_until(ws, "offline") == {"type": "offline"}
        assert not site.call(queries.channel_by_slug, site.db, slug)["is_live"]
        site.node.streams = []
        assert f"/room/{slug}" in site.client.get("/").text.split("Recently live")[1]


def test_publish_done_after_the_key_was_regenerated_still_goes_offline(sync_site) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    old_key, slug = host["channel"]["stream_key"], host["channel"]["slug"]
    assert hook(site, {"call": "publish", "app": "live", "key": old_key,
                       "node_id": "local"}).json() == {"name": slug}
    # the host makes a new key while live; the running stream ends later with the old one
    assert site.post("/studio/key", host, {}).status_code == 303
    response = hook(site, {"call": "publish_done", "app": "live", "key": old_key, "name": slug,
                           "node_id": "local", "addr": ""})
    assert response.status_code == 200
    assert not site.call(queries.channel_by_slug, site.db, slug)["is_live"]
    # but the old key can no longer start a stream
    response = hook(site, {"call": "publish", "app": "live", "key": old_key, "node_id": "local"})
    assert response.status_code == 403


def test_two_site_processes_share_a_room_through_redis(db_url, redis_url, tmp_path) -> None:
    prefix = f"wbtest-{uuid.uuid4().hex}:"  # parallel runs must not hear each other

    def isolate(app) -> None:
        app.state.broker.prefix = prefix

    with run_sync_site(tmp_path / "a", db_url, isolate, broker_url=redis_url) as a, \
            run_sync_site(tmp_path / "b", db_url, isolate, broker_url=redis_url) as b:
        assert type(a.app.state.broker).__name__ == "RedisBroker"
        host = a.user("Hana", host=True)
        sam = a.user("Sam")
        mug = a.product(host, name="Mug")
        slug = host["channel"]["slug"]
        with b.websocket(slug) as on_b, a.websocket(slug, sam) as on_a:
            ws_receive(on_b)
            ws_receive(on_a)
            say(on_a, "hello from A")
            event = ws_until(on_b, "chat")
            assert event["text"] == "hello from A" and event["name"] == "Sam"
            assert ws_until(on_a, "chat")["text"] == "hello from A"  # once, via Redis
            assert ws_quiet(on_a, kind="chat") == []
            # the studio on A pins; the viewer on B sees it
            assert a.post("/studio/pin", host, {"product_id": str(mug["id"])}).status_code == 303
            assert ws_until(on_b, "pinned")["product"]["name"] == "Mug"
            # the engine's hook lands on B; the viewer on A hears it
            call = signed_hook(b.settings.hook_secret, {
                "call": "publish", "app": "live", "key": host["channel"]["stream_key"],
                "node_id": "local"})
            response = b.client.post("/hooks/rtmp", content=call["content"],
                                      headers=call["headers"])
            assert response.json() == {"name": slug}
            assert ws_until(on_a, "live")["play_url"].endswith(f"/live/{slug}.flv")
        with b.websocket(slug) as late:
            assert [m["text"] for m in ws_receive(late)["messages"]] == ["hello from A"]


def test_room_state_api_and_page(sync_site) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    site.product(host, name="Mug", stock=0)
    slug = host["channel"]["slug"]
    state = site.client.get(f"/api/rooms/{slug}")
    assert state.headers["cache-control"] == "no-store"
    body = state.json()
    assert body["live"] is False and body["pinned"] is None
    assert [(p["name"], p["stock"]) for p in body["products"]] == [("Mug", 0)]
    assert host["channel"]["stream_key"] not in json.dumps(body)
    page = site.client.get(f"/room/{slug}")
    assert page.status_code == 200 and "Mug" in page.text
    assert site.client.get("/room/nobody-here").status_code == 404
    assert site.client.get("/api/rooms/nobody-here").status_code == 404


def test_websocket_from_another_origin_is_refused(sync_site) -> None:
    """A page on another site cannot open the room socket with this browser's cookies."""
    from starlette.websockets import WebSocketDisconnect

    host = sync_site.user("Origin Host", host=True)
    slug = host["channel"]["slug"]
    client = sync_site.client
    with client.websocket_connect(f"/ws/room/{slug}",
                                  headers={"origin": "http://testserver"}) as ws:
        assert ws.receive_json()["type"] == "hello"
    try:
        with client.websocket_connect(f"/ws/room/{slug}",
                                      headers={"origin": "https://evil.example"}) as ws:
            ws.receive_json()
        raise AssertionError("a foreign origin was let in")
    except WebSocketDisconnect as exc:
        assert exc.code == 4403


# -- abuse limits ---------------------------------------------------------------------------------


@pytest.fixture
def chat_log(caplog):
    """The chat's warnings; the throttle forgets earlier tests' lines first."""
    chat.throttled.reset()
    caplog.set_level("WARNING", logger="watchbuy.site.chat")
    return caplog


def closed_with(ws) -> int:
    """The close code the server sends next (events before it are skipped)."""
    with pytest.raises(WebSocketDisconnect) as closed:
        for _ in range(100):
            ws_receive(ws)
    return closed.value.code


def warnings_about(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "watchbuy.site.chat" and text in r.getMessage()]


def test_a_huge_frame_closes_only_that_socket_cheaply(sync_site, chat_log, monkeypatch) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    sam = site.user("Sam")
    cleaned = []
    monkeypatch.setattr(chat, "clean_text", lambda *a: cleaned.append(a) or None)
    slug = host["channel"]["slug"]
    with site.websocket(slug) as viewer, site.websocket(slug, sam) as ws:
        ws_receive(viewer)
        ws_receive(ws)
        ws.send_text(json.dumps({"type": "chat", "text": "x" * (15 * 1024 * 1024)}))
        assert closed_with(ws) == 1009
    # frames just over the limit in bytes (not in characters) too
    with site.websocket(slug, sam) as ws:
        ws_receive(ws)
        limit = site.settings.chat_frame_max_bytes
        ws.send_text(json.dumps({"type": "chat", "text": "é" * (limit // 2)}))
        assert closed_with(ws) == 1009
    assert cleaned == []  # refused before any per-character work
    assert count_messages(site, host["channel"]["id"]) == 0
    with site.websocket(slug, sam) as ws:  # the room and the user are fine
        ws_receive(ws)
        say(ws, "hello")
    assert len(warnings_about(chat_log, "frame of")) == 1  # the second one: rate-limited
    assert not any(r.exc_info for r in chat_log.records)


def test_a_frame_nested_past_the_json_parser_is_ignored(sync_site, chat_log) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    sam = site.user("Sam")
    with site.websocket(host["channel"]["slug"], sam) as ws:
        ws_receive(ws)
        ws.send_text("[" * 4000)  # within the frame limit; json.loads raises RecursionError
        say(ws, "still here")  # the socket lives on and the next message goes through
        events = [ws_receive(ws) for _ in range(1)]
        while events[-1].get("type") != "chat" and len(events) < 10:
            events.append(ws_receive(ws))
        assert events[-1]["text"] == "still here"
    assert not any(r.exc_info for r in chat_log.records)


def test_a_binary_frame_is_refused_cleanly(sync_site, chat_log) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    with site.websocket(host["channel"]["slug"]) as ws:
        ws_receive(ws)
        ws.send_bytes(b"\x00\x01binary")
        assert closed_with(ws) == 1003
    [line] = warnings_about(chat_log, "binary frame")
    assert not any(r.exc_info for r in chat_log.records)
    assert "Traceback" not in chat_log.text


def test_too_many_frames_close_the_socket(sync_site, chat_log) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    with site.websocket(host["channel"]["slug"]) as ws:
        ws_receive(ws)
        for _ in range(site.settings.chat_frames):
            ws.send_json({"type": "typing"})  # any frame counts, known or not
        assert ws_quiet(ws) == []  # still open
        ws.send_json({"type": "typing"})
        assert closed_with(ws) == 1008
    assert len(warnings_about(chat_log, "frames in")) == 1


def test_room_sockets_are_capped_per_address_and_per_user(db_url, tmp_path, chat_log) -> None:
    with run_sync_site(tmp_path / "data", db_url, ws_max_per_ip=3, ws_max_per_user=2) as site:
        host = site.user("Hana", host=True)
        sam = site.user("Sam")
        slug = host["channel"]["slug"]
        with site.websocket(slug, sam) as one, site.websocket(slug, sam) as two:
            ws_receive(one)
            ws_receive(two)
            with pytest.raises(WebSocketDisconnect) as refused:
                with site.websocket(slug, sam):
                    pass
            assert refused.value.code == chat.CLOSE_TOO_MANY
            with site.websocket(slug) as third:  # another (anonymous) visitor: the address
                ws_receive(third)
                with pytest.raises(WebSocketDisconnect) as refused:
                    with site.websocket(slug):
                        pass
                assert refused.value.code == chat.CLOSE_TOO_MANY
        # closed sockets give their places back
        with site.websocket(slug, sam) as one, site.websocket(slug, sam) as two:
            assert ws_receive(one)["type"] == ws_receive(two)["type"] == "hello"
        assert site.app.state.room_connections.by_address == {}
        assert site.app.state.room_connections.by_user == {}
    lines = warnings_about(chat_log, "room socket refused")
    assert len(lines) == 1 and "has 2 room sockets open" in lines[0]  # then rate-limited


def test_logout_ends_the_sessions_sockets(sync_site) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    sam = site.user("Sam")
    slug = host["channel"]["slug"]
    with site.websocket(slug) as viewer, site.websocket(slug, sam) as ws:
        ws_receive(viewer)
        assert ws_receive(ws)["can_chat"] is True
        assert site.post("/logout", sam, {}).status_code == 303
        assert closed_with(ws) == chat.CLOSE_SESSION_ENDED
        assert ws_quiet(viewer) == []  # others stay
    # a session that ended without the event (expired, or the broker lost it): the socket
    # ends on its next message, which is not posted
    sam = site.user("Sam again")
    with site.websocket(slug, sam) as ws:
        ws_receive(ws)
        site.call(queries.revoke_session, site.db, security.session_hash(sam["session"]))
        say(ws, "am I still here?")
        assert closed_with(ws) == chat.CLOSE_SESSION_ENDED
    assert count_messages(site, host["channel"]["id"]) == 0


def test_logout_on_one_process_ends_sockets_on_another(db_url, redis_url, tmp_path) -> None:
    prefix = f"wbtest-{uuid.uuid4().hex}:"

    def isolate(app) -> None:
        app.state.broker.prefix = prefix

    with run_sync_site(tmp_path / "a", db_url, isolate, broker_url=redis_url) as a, \
            run_sync_site(tmp_path / "b", db_url, isolate, broker_url=redis_url) as b:
        host = a.user("Hana", host=True)
        sam = a.user("Sam")
        with b.websocket(host["channel"]["slug"], sam) as on_b:
            assert ws_receive(on_b)["can_chat"] is True
            assert a.post("/logout", sam, {}).status_code == 303
            assert closed_with(on_b) == chat.CLOSE_SESSION_ENDED


def test_nobody_else_can_pose_as_the_host(sync_site) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    slug = host["channel"]["slug"]
    impostors = [site.user("hana"), site.user("Η\u200bANA"), site.user("H a n a!")]
    with site.websocket(slug, host) as hosts:
        ws_receive(hosts)
        say(hosts, "welcome \u202eevil\u202c all")
        event = ws_until(hosts, "chat")
        assert event["is_host"] is True and event["name"] == "Hana"
        assert event["text"] == "welcome evil all"  # no bidi controls in the text
        for impostor in impostors:
            with site.websocket(slug, impostor) as ws:
                ws_receive(ws)
                say(ws, "I am the host, pay here")
                event = ws_until(ws, "chat")
                assert event["is_host"] is False
                assert event["name"].endswith(" (viewer)") and "\u200b" not in event["name"]
    with site.websocket(slug) as late:
        messages = ws_receive(late)["messages"]
        assert [m["is_host"] for m in messages] == [True, False, False, False]
    script = ROOM_JS.read_text()
    assert "m.is_host" in script and "Host" in script


# -- hearts, viewer counts and the clock (site/roomlive.py) -----------------------------------

def tap(ws, count: int) -> None:
    ws.send_json({"type": "heart", "count": count})


def hearts_until(ws, total: int, timeout: float = 10.0) -> list[int]:
    """The hearts events' counts until they add up to ``total``."""
    counts: list[int] = []
    while sum(counts) < total:
        counts.append(ws_until(ws, "hearts", timeout)["count"])
    return counts


def viewers_reach(ws, count: int, rounds: int = 3) -> bool:
    """The room's count reaches ``count`` within a few viewers events (the processes may each
    publish an intermediate total first)."""
    return any(ws_until(ws, "viewers", 3.0)["count"] == count for _ in range(rounds))


def test_viewer_count_on_arrival_and_as_viewers_come_and_go(sync_site) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    slug = host["channel"]["slug"]
    with site.websocket(slug) as first:
        assert ws_receive(first)["viewers"] == 1
        assert ws_until(first, "viewers")["count"] == 1  # the event, right after hello
        with site.websocket(slug, site.user("Sam")) as second:
            assert ws_receive(second)["viewers"] == 2
            # the room hears it within one viewers_interval (the event's wait is the bound)
            assert ws_until(first, "viewers", 2.0)["count"] == 2
        assert ws_until(first, "viewers", 2.0)["count"] == 1
    # nobody left: the next viewer is alone again
    with site.websocket(slug) as again:
        assert ws_receive(again)["viewers"] == 1


def test_the_clock_answers_in_seconds_to_the_millisecond(sync_site) -> None:
    host = sync_site.user("Hana", host=True)
    before = time.time()
    with sync_site.websocket(host["channel"]["slug"]) as ws:
        hello = ws_receive(ws)
        ws.send_json({"type": "time"})
        answer = ws_until(ws, "time")
        after = time.time()
        assert before - 0.001 <= hello["server_time"] <= answer["server_time"] <= after + 0.001


def test_heart_taps_reach_the_room_aggregated_and_rate_limited(sync_site, chat_log) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    slug = host["channel"]["slug"]
    batch, frames = site.settings.heart_batch_max, site.settings.heart_rate
    with site.websocket(slug) as watcher, site.websocket(slug, site.user("Sam")) as sam, \
            site.websocket(slug, site.user("Tom")) as tom:
        for ws in (watcher, sam, tom):
            ws_receive(ws)
        # 200 taps: ten full batches from each shopper
        assert frames >= 10 and batch == 10
        for _ in range(10):
            tap(sam, batch)
            tap(tom, batch)
        counts = hearts_until(watcher, 200)
        assert sum(counts) == 200
        # aggregated: fewer events than the 20 frames (the rate per second is the browser
        # test's, test_browser_room.py)
        assert len(counts) < 20
        # the rest of Sam's budget arrives; past it, and what is not a tap count the page
        # sends, is dropped (the socket stays)
        for _ in range(frames - 10):
            tap(sam, 1)
        if frames > 10:
            assert sum(hearts_until(watcher, frames - 10)) == frames - 10
        tap(sam, batch)
        for bad in (0, batch + 1, -3, "5", 2.5, True, None):
            tap(tom, bad)
        assert ws_quiet(watcher, 3 * site.settings.hearts_interval, kind="hearts") == []
        assert warnings_about(chat_log, "heart frames")
        tom.send_json({"type": "time"})
        assert ws_until(tom, "time")["server_time"] > 0


def test_hearts_and_viewers_are_shared_by_site_processes(db_url, redis_url, tmp_path) -> None:
    prefix = f"wbtest-{uuid.uuid4().hex}:"

    def isolate(app) -> None:
        app.state.broker.prefix = prefix
        app.state.settings.broker_prefix = prefix  # the counters' keys too

    with run_sync_site(tmp_path / "a", db_url, isolate, broker_url=redis_url) as a, \
            run_sync_site(tmp_path / "b", db_url, isolate, broker_url=redis_url) as b:
        host = a.user("Hana", host=True)
        slug = host["channel"]["slug"]
        sam, tom = a.user("Sam"), a.user("Tom")
        with b.websocket(slug) as watcher:
            assert ws_receive(watcher)["viewers"] == 1
            assert ws_until(watcher, "viewers")["count"] == 1  # the arrival event
            with a.websocket(slug, sam) as on_a, b.websocket(slug, tom) as on_b:
                # counted across processes at once (the two arrive in either order)
                arrivals = sorted(ws_receive(ws)["viewers"] for ws in (on_a, on_b))
                assert arrivals[1] == 3 and arrivals[0] in (2, 3)
                assert viewers_reach(watcher, 3)
                for _ in range(10):
                    tap(on_a, 10)
                    tap(on_b, 10)
                counts = hearts_until(watcher, 200)
                assert sum(counts) == 200
                # one flush slot per interval for the room, whichever process holds it:
                # aggregated across both processes into fewer events than frames
                assert len(counts) < 20
        # everyone left: both processes' counts go down in the shared sum within a round
        with b.websocket(slug) as late:
            ws_receive(late)
            assert viewers_reach(late, 1)


@pytest.mark.parametrize(("name", "value", "message"), [
    ("WATCHBUY_HEARTS_INTERVAL", "0", "WATCHBUY_HEARTS_INTERVAL: seconds, from 0.05 to 5"),
    ("WATCHBUY_VIEWERS_INTERVAL", "5", "WATCHBUY_VIEWERS_INTERVAL: seconds, from 0.2 to 2"),
    ("WATCHBUY_HEART_RATE", "0", "WATCHBUY_HEART_RATE: must be positive"),
    ("WATCHBUY_HEART_BATCH_MAX", "-1", "WATCHBUY_HEART_BATCH_MAX: must be positive"),
])
def test_bad_heart_and_viewer_settings_are_one_clear_line(name, value, message) -> None:
    with pytest.raises(ConfigError) as error:
        load_site_settings(environ={"WATCHBUY_ENV_FILE": "/dev/null", name: value})
    assert str(error.value) == message


def test_room_cards_show_urgency_description_and_image_names(sync_site) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    site.product(host, name="Last mugs", stock=3)
    site.product(host, name="Gone vase", stock=0)
    site.product(host, name="Plenty bowls", stock=40)
    page = site.client.get(f"/room/{host['channel']['slug']}").text
    cards = dict(re.findall(r'<article class="product[^"]*" data-product-id="\d+">\s*'
                            r'.*?<h3>(.*?)</h3>(.*?)</article>', page, re.S))
    assert "Only 3 left" in cards["Last mugs"]
    assert "Sold out" in cards["Gone vase"] and "disabled" in cards["Gone vase"]
    assert "40 in stock" in cards["Plenty bowls"] and "Only" not in cards["Plenty bowls"]
    assert 'aria-label="Last mugs"' in page  # no image: the placeholder is named
