"""Shows: a host schedules them (title, start time, featured products, cover image); shoppers
ask to be reminded and follow hosts; the engine's hooks run a show's life.

On publish the host's scheduled show starting within ``WATCHBUY_SHOW_START_WINDOW`` of now
goes live (or an unscheduled one is made) and followers and reminded shoppers are notified,
once.  On publish_done the room goes offline at once, and the show ends after
``WATCHBUY_SHOW_END_GRACE`` seconds unless the host comes back (an OBS hiccup resumes the same
show, with no second notification).  The end is checked by a timer in the process that got
the hook and by an upkeep round in every process (a process that stopped meanwhile leaves no
show live forever); the conditional update in db/shows.py lets one of them announce it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route

from watchbuy.db import queries
from watchbuy.db import shows as show_queries
from watchbuy.site.accounts import ensure_channel
from watchbuy.site.chat import publish_room_event
from watchbuy.site.notify import deliver
from watchbuy.site.pagecache import visitor_changed
from watchbuy.site.rooms import iso_utc
from watchbuy.site.state import SiteState, state
from watchbuy.site.studio import read_image
from watchbuy.site.web import (
    read_form,
    redirect,
    render,
    require_host,
    require_user,
    safe_next,
    single_line,
)

log = logging.getLogger("watchbuy.site.shows")

# how far ahead a show may be scheduled
MAX_AHEAD = 366 * 86400.0
# a few minutes in the past is allowed: the host who fills the form at the start time
MAX_BEHIND = 600.0


# -- the engine's hooks -------------------------------------------------------------------------


async def on_publish(site: SiteState, channel: dict, node_id: str | None) -> None:
    """The channel's stream arrived: start (or resume) its show, notify once."""
    host = await queries.user_by_id(site["db"], channel["host_id"])
    host_name = host["display_name"] if host else channel["title"]
    show, started, notes = await show_queries.go_live(
        site["db"], channel, node_id, site["settings"].show_start_window, host_name,
        site["settings"].show_end_grace)
    if show is None:
        return
    if started:
        log.info("show %s of room %s started (%d notified)", show["id"], channel["slug"],
                 len(notes))
        # after the answer: the node holds the publisher until the hook answers, and telling
        # thousands of followers is no reason to delay the stream
        site["show_timers"].start(0, lambda: deliver(
            site, notes, f"{host_name} is live: {show['title']}"))
    else:
        log.info("show %s of room %s resumed", show["id"], channel["slug"])


async def on_publish_done(site: SiteState, channel: dict) -> None:
    """The stream left: the room is offline now, the show ends after the grace period."""
    show = await show_queries.stream_left(site["db"], channel["id"])
    if show is None:
        return
    site["show_timers"].start(site["settings"].show_end_grace, lambda: end_overdue(site))


async def end_overdue(site: SiteState) -> int:
    """End the shows whose grace period is over and tell their rooms; returns how many."""
    db = site["db"]
    ended = await show_queries.end_overdue_shows(db, site["settings"].show_end_grace)
    for show in ended:
        replay = await show_queries.replay_of_show(db, show["id"])
        await publish_room_event(site["broker"], show["channel_id"], {
            "type": "ended",
            "next_show": await show_queries.next_show(db, show["channel_id"]),
            "replay_url": f"/replay/{replay}" if replay else None})
        # the show is over: nobody is watching it any more (the room engineer's count event)
        await publish_room_event(site["broker"], show["channel_id"],
                                 {"type": "viewers", "count": 0})
        log.info("show %s ended", show["id"])
    return len(ended)


class ShowTimers:
    """The grace-period timers of this process (and deliveries run after a hook answered).  Stopped between rounds, never mid-query (as
    upkeep.repeat_until: a cancelled MariaDB query leaks its pooled connection)."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()

    def start(self, delay: float, job: Callable[[], Awaitable[object]]) -> None:
        task = asyncio.ensure_future(self._after(delay, job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _after(self, delay: float, job: Callable[[], Awaitable[object]]) -> None:
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return  # the upkeep round of whichever process runs next ends the show
        try:
            await job()
        except Exception:
            log.exception("a show's background job failed")

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# -- scheduling (the host) ------------------------------------------------------------------------


def parse_start(text: str, offset_minutes: str, now: float) -> float:
    """The form's ``datetime-local`` value (the browser's local time) and the browser's offset
    from UTC in minutes (``Date.getTimezoneOffset()``: UTC when the page ran no script)."""
    try:
        local = dt.datetime.strptime((text or "").strip(), "%Y-%m-%dT%H:%M")
    except ValueError:
        raise ValueError("Choose the date and time the show starts.") from None
    try:
        offset = int(offset_minutes or "0")
    except ValueError:
        offset = 0
    if not -16 * 60 <= offset <= 16 * 60:
        offset = 0
    stamp = local.replace(tzinfo=dt.UTC).timestamp() + offset * 60
    if stamp < now - MAX_BEHIND:
        raise ValueError("The start time is in the past.")
    if stamp > now + MAX_AHEAD:
        raise ValueError("Shows can be scheduled up to a year ahead.")
    return stamp


async def own_show(request: Request, channel: dict) -> dict:
    try:
        show_id = int(request.path_params["show_id"])
    except ValueError:
        raise HTTPException(404, "No such show.") from None
    found = await show_queries.show(state(request)["db"], show_id)
    if found is None or found["channel_id"] != channel["id"]:
        raise HTTPException(404, "No such show.")  # another host's show is as good as missing
    return found


async def studio_shows(request: Request):
    host = require_host(request)
    site = state(request)
    channel = await ensure_channel(site["db"], host["id"], host["display_name"])
    listed = await show_queries.channel_shows(site["db"], channel["id"])
    return await _show_page(request, channel, listed=listed, show=None,
                            values={"title": "", "starts": "", "products": []}, errors={})


async def _show_page(request: Request, channel: dict, listed: list[dict] | None,
                     show: dict | None, values: dict, errors: dict, status_code: int = 200):
    site = state(request)
    products = await queries.host_products(site["db"], channel["host_id"])
    storage = site["storage"]
    for row in listed or []:
        row["starts_iso"] = iso_utc(row["scheduled_at"])
        row["cover_url"] = storage.url(row["cover"]) if row["cover"] else None
    cover_url = storage.url(show["cover"]) if show and show["cover"] else None
    host = await queries.user_by_id(site["db"], channel["host_id"])
    avatar_url = storage.url(host["avatar"]) if host and host["avatar"] else None
    return render(request, "studio_shows.html", status_code=status_code, channel=channel,
                  shows=listed, show=show, values=values, errors=errors, products=products,
                  cover_url=cover_url, avatar_url=avatar_url, followers=await show_queries.follower_count(
                      site["db"], channel["host_id"]),
                  notice=request.query_params.get("notice"))


async def save_show(request: Request):
    host = require_host(request)
    site = state(request)
    db = site["db"]
    channel = await ensure_channel(db, host["id"], host["display_name"])
    show = await own_show(request, channel) if "show_id" in request.path_params else None
    if show is not None and show["status"] != show_queries.SCHEDULED:
        raise HTTPException(409, "This show has started: it can no longer be changed.")
    form = await read_form(request)
    own_ids = {p["id"] for p in await queries.host_products(db, host["id"])}
    chosen = []
    for raw in form.getlist("products"):
        try:
            product_id = int(raw)
        except ValueError:
            continue
        if product_id in own_ids and product_id not in chosen:  # never another host's product
            chosen.append(product_id)
    values = {"title": single_line(form.get("title")), "starts": form.get("starts") or "",
              "products": chosen}
    errors: dict[str, str] = {}
    if not 2 <= len(values["title"]) <= 100:
        errors["title"] = "The title must be 2 to 100 characters."
    try:
        starts = parse_start(values["starts"], form.get("tz_offset") or "0", time.time())
    except ValueError as exc:
        errors["starts"] = str(exc)
    image, image_error = await read_image(request, form)
    if image_error:
        errors["cover"] = image_error
    if errors:
        listed = None if show else await show_queries.channel_shows(db, channel["id"])
        return await _show_page(request, channel, listed=listed, show=show, values=values,
                                errors=errors, status_code=400)
    cover = show["cover"] if show else None
    if image is not None:
        cover = await site["storage"].save(*image)
    if show is None:
        await show_queries.create_show(db, channel["id"], values["title"], starts, cover, chosen)
        return redirect("/studio/shows?notice=scheduled")
    if not await show_queries.update_show(db, show["id"], channel["id"], values["title"],
                                          starts, cover, chosen):
        raise HTTPException(409, "This show has started: it can no longer be changed.")
    return redirect("/studio/shows?notice=saved")


async def edit_show(request: Request):
    if request.method == "POST":
        return await save_show(request)
    host = require_host(request)
    db = state(request)["db"]
    channel = await ensure_channel(db, host["id"], host["display_name"])
    show = await own_show(request, channel)
    values = {"title": show["title"], "starts_iso": iso_utc(show["scheduled_at"]),
              "starts": "", "products": await show_queries.show_product_ids(db, show["id"])}
    return await _show_page(request, channel, listed=None, show=show, values=values, errors={})


async def cancel_show(request: Request):
    host = require_host(request)
    db = state(request)["db"]
    channel = await ensure_channel(db, host["id"], host["display_name"])
    show = await own_show(request, channel)
    await read_form(request)
    if not await show_queries.cancel_show(db, show["id"], channel["id"]):
        raise HTTPException(409, "Only a show that has not started can be cancelled.")
    return redirect("/studio/shows?notice=cancelled")


async def save_avatar(request: Request):
    """The host's avatar on the home page's cards (checked and re-encoded as product images)."""
    host = require_host(request)
    site = state(request)
    form = await read_form(request)
    image, error = await read_image(request, form)
    if image is None:
        channel = await ensure_channel(site["db"], host["id"], host["display_name"])
        listed = await show_queries.channel_shows(site["db"], channel["id"])
        return await _show_page(request, channel, listed=listed, show=None,
                                values={"title": "", "starts": "", "products": []},
                                errors={"avatar": error or "Choose an image."},
                                status_code=400)
    await show_queries.set_avatar(site["db"], host["id"], await site["storage"].save(*image))
    return redirect("/studio/shows?notice=avatar")


# -- reminders and follows (shoppers) -------------------------------------------------------------


def _turn_on(form) -> bool:
    return (form.get("on") or "1") != "0"


async def remind(request: Request):
    user = require_user(request)
    db = state(request)["db"]
    form = await read_form(request)
    try:
        found = await show_queries.show(db, int(request.path_params["show_id"]))
    except ValueError:
        found = None
    if found is None or found["status"] != show_queries.SCHEDULED:
        raise HTTPException(404, "This show is not coming up.")
    await show_queries.set_reminder(db, user["id"], found["id"], _turn_on(form))
    visitor_changed(request, user["id"])  # the room page's reminder button
    return redirect(safe_next(form.get("next")))


async def follow(request: Request):
    user = require_user(request)
    db = state(request)["db"]
    form = await read_form(request)
    channel = await queries.channel_by_slug(db, request.path_params["slug"])
    if channel is None:
        raise HTTPException(404, "There is no room at this address.")
    if channel["host_id"] == user["id"]:
        raise HTTPException(400, "You cannot follow yourself.")
    await show_queries.set_follow(db, user["id"], channel["host_id"], _turn_on(form))
    visitor_changed(request, user["id"])  # the room page's follow button
    return redirect(safe_next(form.get("next") or f"/room/{channel['slug']}"))


routes = [
    Route("/studio/shows", studio_shows),
    Route("/studio/shows/new", save_show, methods=["POST"]),
    Route("/studio/shows/{show_id:int}", edit_show, methods=["GET", "POST"]),
    Route("/studio/shows/{show_id:int}/cancel", cancel_show, methods=["POST"]),
    Route("/studio/avatar", save_avatar, methods=["POST"]),
    Route("/shows/{show_id:int}/remind", remind, methods=["POST"]),
    Route("/room/{slug}/follow", follow, methods=["POST"]),
]
