"""The home page (rooms live now first) and the room page (player, products, chat)."""

from __future__ import annotations

import time

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchbuy.db import queries, shopping
from watchbuy.site.flash import public_sale
from watchbuy.site.media import hls_url
from watchbuy.site.state import SiteState, state
from watchbuy.site.web import format_money, render


def product_card(product: dict, storage, sale: dict | None = None,
                 low_stock_threshold: int = 10) -> dict:
    """A product as rooms show it.  ``price`` is what it costs now: the flash sale's price
    while ``sale`` (a running sale of it) lasts, with ``regular_price`` beside it; ``sold``
    and ``low_stock`` ("Only N left" at or under the threshold) are the live urgency."""
    regular = format_money(product["price_minor"], product["currency"])
    card = {
        "id": product["id"],
        "name": product["name"],
        "description": product["description"],
        "price": regular,
        "regular_price": regular,
        "stock": product["stock"],
        "sold": int(product.get("sold") or 0),
        "low_stock": 0 < product["stock"] <= low_stock_threshold,
        "physical": bool(product.get("physical", True)),
        "image": storage.url(product["image"]) if product["image"] else None,
        "sale": None,
    }
    if sale is not None:
        card["sale"] = public_sale(sale)
        card["price"] = card["sale"]["sale_price"]
    return card


async def room_cards(site: SiteState, channel_id: int | None,
                     items: list[dict]) -> list[dict]:
    """Cards of these products with the room's running sales (one query for the sales)."""
    sales = {} if channel_id is None else {
        sale["product_id"]: sale for sale in await shopping.active_sales(site["db"], channel_id)}
    threshold = site["settings"].low_stock_threshold
    return [product_card(item, site["storage"], sales.get(item["id"]), threshold)
            for item in items]


async def room_state(site: SiteState, channel: dict) -> dict:
    """What a room shows live; also the body of the state API the page polls as a fallback."""
    db = site["db"]
    media = site["media"]
    stats = (await media.stream_stats()).get(channel["slug"], {})
    shown = await queries.host_products(db, channel["host_id"], shown_only=True)
    cards = await room_cards(site, channel["id"], shown)
    pinned = None
    if channel["pinned_product_id"]:
        # a hidden product is not for sale, even if it was pinned before hiding unpinned it
        pinned = next((card for card in cards if card["id"] == channel["pinned_product_id"]),
                      None)
    play_url = await media.play_url(channel["live_node_id"], channel["slug"])
    return {
        "slug": channel["slug"],
        "title": channel["title"],
        "live": bool(channel["is_live"]),
        "play_url": play_url,
        "hls_url": hls_url(play_url),
        "viewers": stats.get("viewers", 0),
        "pinned": pinned,
        "products": cards,
        "sales": [card["sale"] for card in cards if card["sale"] is not None],
        "server_time": time.time(),
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
    return render(request, "room.html", channel=channel, host=host, state=shown,
                  is_host=user is not None and user["id"] == channel["host_id"])


async def room_state_api(request: Request):
    channel = await load_channel(request)
    return JSONResponse(await room_state(state(request), channel),
                        headers={"Cache-Control": "no-store"})


routes = [
    Route("/", home),
    Route("/room/{slug}", room_page),
    Route("/api/rooms/{slug}", room_state_api),
]
