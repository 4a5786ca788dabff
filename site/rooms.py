"""The home page (rooms live now first) and the room page (player, products, chat)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchbuy.db import queries
from watchbuy.site.media import hls_url
from watchbuy.site.pagecache import HOME
from watchbuy.site.state import SiteState, state
from watchbuy.site.web import format_money, render


def product_card(product: dict, storage) -> dict:
    return {
        "id": product["id"],
        "name": product["name"],
        "description": product["description"],
        "price": format_money(product["price_minor"], product["currency"]),
        "stock": product["stock"],
        "image": storage.url(product["image"]) if product["image"] else None,
    }


async def room_state(site: SiteState, channel: dict) -> dict:
    """What a room shows live; also the body of the state API the page polls as a fallback."""
    db = site["db"]
    media = site["media"]
    stats = (await media.stream_stats()).get(channel["slug"], {})
    shown = await queries.host_products(db, channel["host_id"], shown_only=True)
    pinned = None
    if channel["pinned_product_id"]:
        found = await queries.product(db, channel["pinned_product_id"])
        # a hidden product is not for sale, even if it was pinned before hiding unpinned it
        pinned = product_card(found, site["storage"]) if found and found["shown"] else None
    play_url = await media.play_url(channel["live_node_id"], channel["slug"])
    return {
        "slug": channel["slug"],
        "title": channel["title"],
        "live": bool(channel["is_live"]),
        "play_url": play_url,
        "hls_url": hls_url(play_url),
        "viewers": stats.get("viewers", 0),
        "pinned": pinned,
        "products": [product_card(p, site["storage"]) for p in shown],
    }


async def home(request: Request):
    site = state(request)
    pages = site["pages"]
    anonymous = request.state.user is None
    if anonymous and (kept := pages.get(("home",))) is not None:
        return kept.respond(request)
    mark = pages.mark()
    rooms = await queries.list_rooms(site["db"])
    stats = await site["media"].stream_stats()
    for room in rooms:
        room["viewers"] = stats.get(room["slug"], {}).get("viewers", 0)
    live = [r for r in rooms if r["is_live"]]
    recent = [r for r in rooms if not r["is_live"]]
    if anonymous:
        # dropped when a room goes live or offline or gets a new title; a new room shows once
        # it expires (its viewer counts are kept as long by MediaDirectory)
        page = pages.render(request, "home.html", live=live, recent=recent)
        pages.put(("home",), HOME, page, mark)
        return page.respond(request)
    return render(request, "home.html", live=live, recent=recent)


async def load_channel(request: Request) -> dict:
    channel = await queries.channel_by_slug(state(request)["db"], request.path_params["slug"])
    if channel is None:
        raise HTTPException(404, "There is no room at this address.")
    return channel


async def room_page(request: Request):
    site = state(request)
    pages = site["pages"]
    user = request.state.user
    slug = request.path_params["slug"]
    if user is None and (kept := pages.get(("room", slug))) is not None:
        return kept.respond(request)
    mark = pages.mark()  # before reading the room: a change from now on is not missed
    room = pages.get(("room-data", slug))  # what the page shows, kept for logged-in visitors
    if room is None:
        channel = await load_channel(request)
        room = {"channel": channel,
                "host": await queries.user_by_id(site["db"], channel["host_id"]),
                "state": await room_state(site, channel)}
        pages.put(("room-data", slug), channel["id"], room, mark)
    channel = room["channel"]
    if user is None:
        page = pages.render(request, "room.html", channel=channel, host=room["host"],
                            state=room["state"], is_host=False)
        pages.put(("room", slug), channel["id"], page, mark)
        return page.respond(request)
    return render(request, "room.html", channel=channel, host=room["host"], state=room["state"],
                  is_host=user["id"] == channel["host_id"])


async def room_state_api(request: Request):
    channel = await load_channel(request)
    return JSONResponse(await room_state(state(request), channel),
                        headers={"Cache-Control": "no-store"})


routes = [
    Route("/", home),
    Route("/room/{slug}", room_page),
    Route("/api/rooms/{slug}", room_state_api),
]
