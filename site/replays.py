"""Replays: pins on the stream's media clock, the recordings the nodes report, the replay page.

* **Pins.** When the host pins a product while live, :func:`pinned_event` asks the node that
  carries the stream for a cue point (engine/cues.py): the node puts the pin into the stream in
  band and answers the media timestamp it used.  The pin is stored with that timestamp (a
  ``pins`` row) and the room's websocket ``pinned`` event carries it as ``media_ms``, so a
  player that sees the in-band cue can tell the two are the same pin.
* **Recordings.** The node reports ``recording_ready`` (or ``recording_failed``) through the
  signed publish hook (site/hooks.py hands it to :func:`recording_hook`): a ``recordings`` row,
  and the pins made while it was live are filed under it.  The node retries a report the site
  did not answer, so the same report may come twice: it files one row.  A local file this
  site does not have (a node elsewhere without an S3 bucket) is filed as failed, with why,
  rather than listed as a replay that cannot play.
* **The replay page** ``/replay/<id>``: the MP4 (from S3, or from the local node's folder at
  ``/replays/media/<file>``) with a product timeline, each pin at its offset.  Buying is the
  room's: Buy now opens the room's buy sheet (static/js/buy.js), whose purchase carries
  ``source=replay``, and site/buynow.py then ignores any running flash sale (a live-room
  offer): the regular price.  The cards are the plain product cards (no sale), so the sheet
  shows and sends the regular price.  Add to cart goes to the cart (whose checkout prices
  every line alike, with the flash sale running then).
* **Retention.** :func:`expire_recordings` (an upkeep job) deletes replays older than
  ``WATCHBUY_RECORD_RETENTION_DAYS`` (the local file or the S3 object) and marks them expired.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from urllib.parse import urlparse

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from watchbuy.db import queries
from watchbuy.db import replays as db_replays
from watchbuy.db import shows as show_queries
from watchbuy.logs import LogLimiter
from watchbuy.site.chat import publish_room_event
from watchbuy.site.rooms import product_card
from watchbuy.site.security import origin_of
from watchbuy.site.state import SiteState, state
from watchbuy.site.web import render

log = logging.getLogger("watchbuy.site.replays")

# What a node may name as a local replay file (engine/record.py makes these names).
FILE_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}\.mp4")
# https://<bucket>.s3.amazonaws.com/<key>: what engine/record.py reports for an upload
S3_HOST = re.compile(r"([a-z0-9.-]{3,63})\.s3\.amazonaws\.com")
MEDIA_PREFIX = "/replays/media/"

_refusals = LogLimiter(log, interval=60.0, lines=3)


async def pinned_event(site: SiteState, channel: dict, product_id: int | None,
                       card: dict | None) -> dict:
    """The room's ``pinned`` event for a pin the host just made; while the channel is live the
    pin also goes into the stream as a cue point and is stored on the media clock."""
    event: dict = {"type": "pinned", "product": card}
    if not channel.get("is_live"):
        return event  # nothing is recorded or played: no moment to keep
    media_ms = await site["media"].cue(channel.get("live_node_id"), channel["slug"], product_id)
    await db_replays.add_pin(site["db"], channel["id"], product_id, media_ms)
    if media_ms is not None:
        event["media_ms"] = media_ms
    return event


def _number(call: dict, name: str, default: float | None = None) -> float:
    value = call.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value < 0:
        raise ValueError(name)
    return value


async def recording_hook(site: SiteState, channel: dict, call: dict) -> JSONResponse:
    """``recording_ready`` / ``recording_failed`` from a node (already verified and claimed by
    site/hooks.py): file the recording."""
    try:
        values: dict = {
            "stream_name": str(call.get("name") or channel["slug"])[:64],
            "node_id": str(call.get("node_id") or "")[:64] or None,
            "started_at": _number(call, "started_at"),
            "ended_at": _number(call, "ended_at"),
            "media_start_ms": int(_number(call, "start_ms", 0)),
        }
        if call["call"] == "recording_ready":
            url = str(call.get("url") or "")
            if url:
                if not url.startswith("https://") or len(url) > 255:
                    raise ValueError("url")
            else:
                name = str(call.get("file") or "")
                if not FILE_NAME.fullmatch(name):
                    raise ValueError("file")
                url = MEDIA_PREFIX + name
            values.update(status="ready", url=url, duration=_number(call, "duration"),
                          size_bytes=int(_number(call, "size")))
            if url.startswith(MEDIA_PREFIX) and not await asyncio.to_thread(
                    (site["settings"].recordings_dir / url[len(MEDIA_PREFIX):]).is_file):
                _refusals.warning(
                    "missing", "room %s: node %s reports the local file %s, which is not in "
                    "this site's record folder %s: filed as failed (give the node "
                    "WATCHBUY_RECORD_S3_BUCKET, or share the folder)", channel["slug"],
                    values["node_id"], url, site["settings"].recordings_dir)
                values.update(status="failed", url=None, error=(
                    f"the node's file {url[len(MEDIA_PREFIX):]} is not in this site's record "
                    "folder (a node elsewhere needs WATCHBUY_RECORD_S3_BUCKET)")[:255])
        else:
            values.update(status="failed", error=str(call.get("error") or "")[:255])
    except (ValueError, TypeError) as exc:
        _refusals.warning("bad", "recording hook for %s: bad field %s", channel["slug"], exc)
        return JSONResponse({"error": f"bad field {exc}"}, status_code=400)
    recording_id = await db_replays.add_recording(site["db"], channel["id"], values)
    log.info("room %s: recording %d %s", channel["slug"], recording_id, values["status"])
    if values["status"] == "ready":
        await announce_replay(site, recording_id)
    return JSONResponse({"ok": True, "recording_id": recording_id})


async def announce_replay(site: SiteState, recording_id: int) -> None:
    """A recording is ready after the remux and upload, usually after its show ended (and
    the ``ended`` event went out without a replay): tell the room, whose "show has ended" card
    links it.  Read after the recording committed and the ender reads the replay after the end
    committed, so one of the two always sees the other and links it."""
    db = site["db"]
    found = await db_replays.recording(db, recording_id)
    if found is None or found["show_id"] is None:
        return
    show = await show_queries.show(db, found["show_id"])
    if show is None or show["status"] != show_queries.ENDED:
        return  # still live or within the grace: the ender links it
    replay_id = await show_queries.replay_of_show(db, show["id"])
    if replay_id is not None:  # the longest of the show's recordings, maybe not this one
        await publish_room_event(site["broker"], show["channel_id"],
                                 {"type": "replay", "show_id": show["id"],
                                  "replay_url": f"/replay/{replay_id}"})


def timeline(recording: dict, pins: list[dict], cards: dict[int, dict]) -> list[dict]:
    """Each pin of a replay at its offset in the file (seconds), with its product card (None:
    unpinned).  Pins before the file starts are put at its start."""
    start = recording["media_start_ms"] or 0
    duration = recording["duration"] or 0
    items = []
    for pin in pins:
        offset = max(0.0, (pin["media_ms"] - start) / 1000.0)
        if duration and offset > duration:
            continue  # made after the file's end (a pin at the very last moment)
        card = cards.get(pin["product_id"]) if pin["product_id"] is not None else None
        if pin["product_id"] is not None and card is None:
            continue  # a product deleted since
        items.append({"offset": round(offset, 3), "product": card,
                      "percent": round(100 * offset / duration, 2) if duration else 0})
    return items


async def replay_page(request: Request):
    site = state(request)
    db = site["db"]
    try:
        recording_id = int(request.path_params["recording_id"])
    except ValueError:
        recording_id = 0
    recording = await db_replays.recording(db, recording_id)
    if recording is None or recording["status"] != "ready":
        raise HTTPException(404, "This replay is not available (it may have expired).")
    pins = await db_replays.recording_pins(db, recording_id)
    cards = {}
    for product_id in {p["product_id"] for p in pins if p["product_id"] is not None}:
        product = await queries.product(db, product_id)
        if product is not None and product["shown"]:
            cards[product_id] = product_card(product, site["storage"])
    items = timeline(recording, pins, cards)
    if recording["url"].startswith("https://"):
        # the video plays from S3: this page's CSP must allow exactly that origin
        request.state.csp_media_origin = origin_of(recording["url"])
    return render(request, "replay.html", recording=recording, items=items,
                  products=list({i["product"]["id"]: i["product"] for i in items
                                 if i["product"]}.values()))


async def replay_media(request: Request):
    """A replay in the local node's folder (``watchbuy serve``), with Range support for
    seeking (Starlette's FileResponse answers byte ranges)."""
    name = request.path_params["name"]
    if not FILE_NAME.fullmatch(name):
        raise HTTPException(404, "No such replay.")
    path = state(request)["settings"].recordings_dir / name
    if not path.is_file():
        raise HTTPException(404, "No such replay.")
    return FileResponse(path, media_type="video/mp4",
                        headers={"Cache-Control": "public, max-age=86400"})


def _delete_stored(settings, url: str) -> None:
    """Delete a replay's file (local) or object (S3), in a worker thread; gone already is
    fine."""
    if url.startswith(MEDIA_PREFIX):
        name = url[len(MEDIA_PREFIX):]
        if FILE_NAME.fullmatch(name):
            (settings.recordings_dir / name).unlink(missing_ok=True)
        return
    parsed = urlparse(url)
    match = S3_HOST.fullmatch(parsed.hostname or "")
    if parsed.scheme == "https" and match:
        import boto3

        boto3.client("s3", region_name=settings.aws_region or None).delete_object(
            Bucket=match.group(1), Key=parsed.path.lstrip("/"))


# Recordings read per batch by the expiry job; it pages on until none is left.
EXPIRE_BATCH = 100


async def expire_recordings(site: SiteState, batch: int = EXPIRE_BATCH) -> int:
    """Delete the replays past their retention and mark them expired, batch after batch until
    none is left; how many.  One that cannot be deleted (S3 unreachable, a file the site may
    not remove) is skipped and tried again next round: it never holds up the others."""
    settings = site["settings"]
    days = settings.record_retention_days
    if not days:
        return 0
    db = site["db"]
    cutoff = time.time() - days * 86400
    expired = failed = 0
    last_id, last_error = 0, ""
    while True:
        found = await db_replays.expired_recordings(db, cutoff, batch, after_id=last_id)
        for recording in found:
            last_id = recording["id"]
            try:
                await asyncio.to_thread(_delete_stored, settings, recording["url"] or "")
            except Exception as exc:
                failed += 1
                last_error = f"replay {recording['id']} ({recording['url']}): {exc}"
                continue
            await db_replays.mark_expired(db, recording["id"])
            expired += 1
        if len(found) < batch:
            break
    if failed:
        # one line a round, however many failed: the same rows fail again every hour
        _refusals.warning("delete", "could not delete %d expired replays (tried again next "
                          "round); the last: %s", failed, last_error)
    if expired:
        log.info("expired %d replays older than %g days", expired, days)
    return expired


routes = [
    Route("/replay/{recording_id}", replay_page),
    Route("/replays/media/{name}", replay_media),
]
