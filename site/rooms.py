"""The home page (rooms live now first) and the room page (player, products, chat)."""

from __future__ import annotations

import datetime as dt

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchbuy.db import queries, shopping
from watchbuy.db import shows as show_queries
from watchbuy.site.chat import server_time
from watchbuy.site.flash import public_sale
from watchbuy.site.media import hls_url
from watchbuy.site.pagecache import HOME, visitor_version
from watchbuy.site.state import SiteState, state
from watchbuy.site.web import format_money, remember_cart_count, render


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
        "regular_price_minor": product["price_minor"],
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
        "server_time": server_time(),  # as the room websocket's
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
    asked to be reminded), whether they follow the host and the last show's replay
    (site/templates/_show_ended.html)."""
    db = site["db"]
    found = await show_queries.upcoming_shows(db, 1, channel_id=channel["id"],
                                              user_id=user["id"] if user else None)
    next_show = found[0] if found else None
    if next_show is not None:
        next_show["starts_iso"] = iso_utc(next_show["scheduled_at"])
    following = user is not None and await show_queries.follows_host(db, user["id"],
                                                                     channel["host_id"])
    # the replay of the show that ended, from the database: the "replay" event may have gone
    # out before this visitor came (the offline room links it; a live room needs no link)
    last_replay = None if channel["is_live"] else await show_queries.last_ended_replay(
        db, channel["id"])
    return {"next_show": next_show, "following": following, "last_replay": last_replay}


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
                "state": await room_state(site, channel),
                "shows": await show_info(site, channel, None)}
        pages.put(("room-data", slug), channel["id"], room, mark)
    channel = room["channel"]
    if user is None:
        page = pages.render(request, "room.html", channel=channel, host=room["host"],
                            state=room["state"], is_host=False, **room["shows"])
        pages.put(("room", slug), channel["id"], page, mark)
        return page.respond(request)
    # What is this shopper's own: the header (host, admin), the host panel, the follow and
    # reminder buttons and the cart badge (room.js keeps it current as the shopper adds).  One
    # read gives the last three, kept until the shopper changes them (VisitorCache); the page
    # is rendered once per combination of them (the cart count as a marker) and kept with the
    # room's pages, so it goes when the room changes.
    next_show = room["shows"]["next_show"]
    mine = await visitor_bits(site, user["id"], channel["host_id"],
                              next_show["id"] if next_show else None, visitor_version(request))
    room_host = user["id"] == channel["host_id"]
    key = ("room-user", slug, room_host, user["is_host"], user["is_admin"], mine["following"],
           mine["reminded"], mine["cart_count"] > 0)
    page = pages.get(key)
    if page is None:
        # only what the key holds of the user reaches the template: a page kept for one
        # shopper can show nothing of another (their id only as "is this room's host")
        keyed_user = {"id": channel["host_id"] if room_host else 0,
                      "is_host": user["is_host"], "is_admin": user["is_admin"]}
        page = pages.render(
            request, "room.html", user=keyed_user, channel=channel, host=room["host"],
            state=room["state"], is_host=room_host,
            cart_count=pages.count_marker if mine["cart_count"] else 0,
            **{**room["shows"],
               "next_show": dict(next_show, reminded=mine["reminded"]) if next_show else None,
               "following": mine["following"]})
        pages.put(key, channel["id"], page, mark)
    # the badge of the next pages too (site/web.py: no cart query on every page)
    return remember_cart_count(
        request, page.respond(request, {pages.count_marker: str(mine["cart_count"])}),
        user["id"], mine["cart_count"])


async def visitor_bits(site: SiteState, user_id: int, host_id: int,
                       show_id: int | None, version: str) -> dict:
    """:func:`shows.room_visitor` of this shopper, from the visitor cache when it holds it.
    ``version`` is the browser's (:func:`pagecache.visitor_version`): after a write of theirs
    it is new, so a process that has not heard the write yet reads their bits afresh instead
    of showing what it kept from before (the old button, the old count in the badge's
    cookie)."""
    visitors = site["visitors"]
    key = (user_id, host_id, show_id, version)
    mine = visitors.get(key)
    if mine is None:
        mark = visitors.mark()  # before the read: a change of theirs from now on is not missed
        mine = await show_queries.room_visitor(site["db"], user_id, host_id, show_id)
        visitors.put(key, user_id, mine, mark)
    return mine


async def room_state_api(request: Request):
    channel = await load_channel(request)
    return JSONResponse(await room_state(state(request), channel),
                        headers={"Cache-Control": "no-store"})


routes = [
    Route("/", home),
    Route("/room/{slug}", room_page),
    Route("/api/rooms/{slug}", room_state_api),
]
