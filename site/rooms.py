"""The home page (rooms live now first) and the room page (player, products, chat)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchbuy.db import queries
from watchbuy.site.media import hls_url
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
    rooms = await queries.list_rooms(site["db"])
    stats = await site["media"].stream_stats()
    for room in rooms:
        room["viewers"] = stats.get(room["slug"], {}).get("viewers", 0)
    live = [r for r in rooms if r["is_live"]]
    recent = [r for r in rooms if not r["is_live"]]
    return render(request, "home.html", live=live, recent=recent)


async def load_channel(request: Request) -> dict:
    channel = await queries.channel_by_slug(state(request)["db"], request.path_params["slug"])
    if channel is None:
        raise HTTPException(404, "There is no room at this address.")
    return channel


async def room_page(request: Request):
    channel = await load_channel(request)
    site = state(request)
    host = await queries.user_by_id(site["db"], channel["host_id"])
    shown = await room_state(site, channel)
    user = request.state.user
    # the header's cart badge (room.js keeps it current as the shopper adds)
    cart_count = sum(line["quantity"] for line in await queries.cart(site["db"], user["id"])) \
        if user is not None else 0
    return render(request, "room.html", channel=channel, host=host, state=shown,
                  is_host=user is not None and user["id"] == channel["host_id"],
                  cart_count=cart_count)


async def room_state_api(request: Request):
    channel = await load_channel(request)
    return JSONResponse(await room_state(state(request), channel),
                        headers={"Cache-Control": "no-store"})


routes = [
    Route("/", home),
    Route("/room/{slug}", room_page),
    Route("/api/rooms/{slug}", room_state_api),
]
