"""The home page (rooms live now first) and the room page (player, products, chat)."""

from __future__ import annotations

import datetime as dt
import time

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchbuy.db import queries, shopping
from watchbuy.db import shows as show_queries
from watchbuy.site.flash import public_sale
from watchbuy.site.media import hls_url
from watchbuy.site.pagecache import HOME
from watchbuy.site.state import SiteState, state
from watchbuy.site.web import format_money, render


def iso_utc(stamp: float | None) -> str:
    """A timestamp as pages carry it (``<time datetime>``; the browser shows local time)."""
    if stamp is None:
        return ""
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        "price_minor": product["price_minor"],  # what buy-now's expected_price_minor echoes
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
        card["price_minor"] = card["sale"]["sale_price_minor"]
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
    """Live now (with the show's cover, the host's avatar and the viewer count), then upcoming
    shows with countdowns and reminders, then replays, then rooms that were live before."""
    site = state(request)
    db = site["db"]
    storage = site["storage"]
    user = request.state.user
    pages = site["pages"]
    if user is None and (kept := pages.get(("home",))) is not None:
        return kept.respond(request)
    mark = pages.mark()
    rooms = await queries.list_rooms(db)
    stats = await site["media"].stream_stats()
    live_shows = await show_queries.live_shows(db)
    for room in rooms:
        room["viewers"] = stats.get(room["slug"], {}).get("viewers", 0)
        show = live_shows.get(room["id"])
        room["show_title"] = show["title"] if show else None
        room["cover_url"] = storage.url(show["cover"]) if show and show["cover"] else None
        room["avatar_url"] = storage.url(room["host_avatar"]) if room["host_avatar"] else None
    upcoming = await show_queries.upcoming_shows(db, user_id=user["id"] if user else None)
    featured = await show_queries.featured_products(db, [s["id"] for s in upcoming])
    for show in upcoming:
        show["starts_iso"] = iso_utc(show["scheduled_at"])
        show["cover_url"] = storage.url(show["cover"]) if show["cover"] else None
        show["avatar_url"] = storage.url(show["host_avatar"]) if show["host_avatar"] else None
        show["featured"] = featured.get(show["id"], [])
    replays = await show_queries.ready_replays(db)
    for replay in replays:
        replay["cover_url"] = storage.url(replay["cover"]) if replay["cover"] else None
        replay["avatar_url"] = storage.url(replay["host_avatar"]) if replay["host_avatar"] \
            else None
    live = [r for r in rooms if r["is_live"]]
    recent = [r for r in rooms if not r["is_live"]]
    if user is None:
        # dropped when a room goes live or offline or gets a new title; a new room or a newly
        # scheduled show shows once it expires (its viewer counts are kept as long by
        # MediaDirectory)
        page = pages.render(request, "home.html", live=live, upcoming=upcoming,
                            replays=replays, recent=recent)
        pages.put(("home",), HOME, page, mark)
        return page.respond(request)
    return render(request, "home.html", live=live, upcoming=upcoming, replays=replays,
                  recent=recent)


async def show_info(site: SiteState, channel: dict, user: dict | None) -> dict:
    """What the room shows of its shows: the next scheduled one (with whether this shopper
    asked to be reminded) and whether they follow the host (site/templates/_show_ended.html)."""
    db = site["db"]
    found = await show_queries.upcoming_shows(db, 1, channel_id=channel["id"],
                                              user_id=user["id"] if user else None)
    next_show = found[0] if found else None
    if next_show is not None:
        next_show["starts_iso"] = iso_utc(next_show["scheduled_at"])
    following = user is not None and await show_queries.follows_host(db, user["id"],
                                                                     channel["host_id"])
    return {"next_show": next_show, "following": following}


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
                            state=room["state"], is_host=False,
                            **await show_info(site, channel, None))
        pages.put(("room", slug), channel["id"], page, mark)
        return page.respond(request)
    # the next show's reminder, the follow button and the header's cart badge (room.js keeps
    # it current as the shopper adds) are this shopper's own
    cart_count = sum(line["quantity"] for line in await queries.cart(site["db"], user["id"]))
    return render(request, "room.html", channel=channel, host=room["host"], state=room["state"],
                  is_host=user["id"] == channel["host_id"], cart_count=cart_count,
                  **await show_info(site, channel, user))


async def room_state_api(request: Request):
    channel = await load_channel(request)
    return JSONResponse(await room_state(state(request), channel),
                        headers={"Cache-Control": "no-store"})


routes = [
    Route("/", home),
    Route("/room/{slug}", room_page),
    Route("/api/rooms/{slug}", room_state_api),
]
