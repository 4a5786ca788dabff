"""The host studio: stream settings, products, what the room shows and pins, sales."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from watchbuy import urls
from watchbuy.db import queries, shopping
from watchbuy.logs import LogLimiter
from watchbuy.site import replays
from watchbuy.site.accounts import ensure_channel
from watchbuy.site.chat import publish_room_event
from watchbuy.site.flash import public_sale
from watchbuy.site.media import hls_url
from watchbuy.site.rooms import product_card, room_cards
from watchbuy.site.security import origin_of, same_secret
from watchbuy.site.shop import stock_notifier, wants_json
from watchbuy.site.state import SiteState, state
from watchbuy.site.storage import ImageRejected, prepare_image
from watchbuy.site.web import (
    format_money,
    money_input,
    money_totals,
    parse_int,
    parse_money,
    read_form,
    redirect,
    render,
    require_host,
    single_line,
)

log = logging.getLogger("watchbuy.site.studio")
_limited = LogLimiter(log, interval=30.0)

MAX_STOCK = 1_000_000
# A keyframe interval above this makes late joiners wait and LL-HLS segments long.
MAX_KEYFRAME_INTERVAL = 4.0
# Seconds after a publish before "no sound" and bitrate warnings: the first audio message and a
# rate over a few samples need a moment, and a warning that flashes on every start is noise.
HEALTH_SETTLE_SECONDS = 3.0


def answer(request: Request, payload: dict, url: str, status_code: int = 200) -> Response:
    """A studio action's answer: JSON for the page's fetch (no reload, no jump), a redirect
    for a plain form post (the page works without scripts)."""
    if wants_json(request):
        return JSONResponse(payload, status_code=status_code)
    return redirect(url)


async def host_state(site: SiteState, host_id: int) -> dict:
    """Every product of the host (hidden ones too) and what is pinned: what the studio's cards
    and the room's host panel show, and what every action answers with."""
    db = site["db"]
    channel = await queries.channel_by_host(db, host_id)
    products = await queries.host_products(db, host_id)
    return {
        "pinned_product_id": channel["pinned_product_id"] if channel else None,
        "live": bool(channel["is_live"]) if channel else False,
        "products": [{**product_card(p, site["storage"]), "shown": bool(p["shown"])}
                     for p in products],
    }


def stream_health(stats: dict | None, live: bool, bitrate_warn_kbps: int) -> dict:
    """The host's stream as the node measures it, and what to fix in plain words."""
    if not stats:
        return {"live": live, "receiving": False, "warnings": []}
    kbps = round(stats.get("bitrate_in", 0) / 1000)
    keyframes = stats.get("keyframe_interval")
    health = {
        "live": live,
        "receiving": True,
        "width": stats.get("width"),
        "height": stats.get("height"),
        "fps": stats.get("fps"),
        "bitrate_kbps": kbps,
        "video_kbps": round(stats.get("video_bitrate", 0) / 1000),
        "audio_kbps": round(stats.get("audio_bitrate", 0) / 1000),
        "keyframe_interval": keyframes,
        "video_codec": stats.get("video_codec") or None,
        "audio_codec": stats.get("audio_codec") or None,
        "has_audio": bool(stats.get("has_audio")),
        "viewers": stats.get("viewers", 0),
    }
    settled = (stats.get("uptime") or 0) >= HEALTH_SETTLE_SECONDS
    warnings = []
    if keyframes is not None and keyframes > MAX_KEYFRAME_INTERVAL:
        warnings.append(
            f"A keyframe comes only every {keyframes:g} s: new viewers wait that long for a "
            "picture. Set the keyframe interval to 2 s (OBS: Settings → Output → Keyframe "
            "Interval).")
    if settled and not health["has_audio"]:
        warnings.append("No sound is arriving. Check the microphone or audio source in your "
                        "streaming app.")
    if settled and kbps > bitrate_warn_kbps:
        warnings.append(
            f"Your bitrate is {kbps:,} kbps, far above what a typical viewer's connection "
            f"plays smoothly ({bitrate_warn_kbps:,} kbps). Lower it to about "
            f"{bitrate_warn_kbps * 2 // 3:,} kbps.")
    health["warnings"] = warnings
    return health


async def health(request: Request):
    """GET /studio/health: the host's stream health, polled by the studio and the room's
    host panel (the node's stats are cached briefly, so polls cost no extra node requests)."""
    host = require_host(request)
    site = state(request)
    channel = await ensure_channel(site["db"], host["id"], host["display_name"])
    stats = (await site["media"].stream_stats()).get(channel["slug"])
    report = stream_health(stats, bool(channel["is_live"]),
                           site["settings"].health_bitrate_warn_kbps)
    return JSONResponse(report, headers={"Cache-Control": "no-store"})


async def host_state_api(request: Request):
    host = require_host(request)
    return JSONResponse(await host_state(state(request), host["id"]),
                        headers={"Cache-Control": "no-store"})


async def studio(request: Request):
    return await render_studio(request)


async def render_studio(request: Request, status_code: int = 200, **extra):
    """The studio page; ``extra`` (a refused flash-sale form: its errors and values) goes to
    the template."""
    host = require_host(request)
    site = state(request)
    db = site["db"]
    channel = await ensure_channel(db, host["id"], host["display_name"])
    try:
        ingest = await site["media"].ingest()
        ingest_error = None
    except Exception as exc:  # no healthy media node: tell the host, not a stack trace
        ingest, ingest_error = None, str(exc)
    products = await queries.host_products(db, host["id"])
    for product in products:
        product["price"] = format_money(product["price_minor"], product["currency"])
        product["image_url"] = (site["storage"].url(product["image"])
                                if product["image"] else None)
    room_url = f"{site['settings'].public_url}/room/{channel['slug']}"
    if channel["is_live"] or ingest is None:
        play_url = await site["media"].play_url(channel["live_node_id"], channel["slug"])
    else:
        # not live yet: the stream will land on the node this page tells the host to push to
        # (the balancer's choice), not necessarily the local one; the CSP below follows it
        play_url = urls.flv_url(ingest["play_base"], channel["slug"])
    if play_url:
        # the preview player fetches from the node: this page's CSP must allow it (web.render)
        request.state.csp_media_origin = origin_of(play_url)
    sales = [public_sale(sale) for sale in await shopping.active_sales(db, channel["id"])]
    names = {product["id"]: product["name"] for product in products}
    for sale in sales:
        sale["product_name"] = names.get(sale["product_id"], "")
    extra.setdefault("flash_errors", {})
    extra.setdefault("flash_values", {})
    return render(request, "studio.html", status_code=status_code, channel=channel,
                  ingest=ingest, ingest_error=ingest_error, products=products,
                  room_url=room_url, play_url=play_url, hls_url=hls_url(play_url),
                  notice=request.query_params.get("notice"),
                  flash_sales=sales, flash_max_seconds=site["settings"].flash_sale_max_seconds,
                  **extra)


async def regenerate_key(request: Request):
    host = require_host(request)
    await queries.regenerate_stream_key(state(request)["db"], host["id"])
    return redirect("/studio?notice=key")


async def update_title(request: Request):
    host = require_host(request)
    form = await read_form(request)
    title = single_line(form.get("title"))
    if 2 <= len(title) <= 100:
        site = state(request)
        await queries.update_channel_title(site["db"], host["id"], title)
        channel = await queries.channel_by_host(site["db"], host["id"])
        if channel is not None:  # the room's kept pages show the title (site/pagecache.py)
            await publish_room_event(site["broker"], channel["id"],
                                     {"type": "title", "title": title})
        return redirect("/studio?notice=title")
    return redirect("/studio?notice=title-invalid")


def product_values(form, currency: str) -> tuple[dict, list[str]]:
    values = {
        "name": (form.get("name") or "").strip(),
        "description": (form.get("description") or "").strip(),
        "price": (form.get("price") or "").strip(),
        "stock": (form.get("stock") or "").strip(),
    }
    errors = []
    if not 1 <= len(values["name"]) <= 100:
        errors.append("The name must be 1 to 100 characters.")
    if len(values["description"]) > 2000:
        errors.append("The description can be at most 2000 characters.")
    try:
        values["price_minor"] = parse_money(values["price"], currency)
        if values["price_minor"] <= 0:
            errors.append("The price must be more than zero.")
    except ValueError as exc:
        errors.append(str(exc))
    try:
        values["stock_count"] = parse_int(values["stock"], "Stock", 0, MAX_STOCK)
    except ValueError as exc:
        errors.append(str(exc))
    return values, errors


async def read_image(request: Request, form) -> tuple[tuple[bytes, str, str] | None, str | None]:
    upload = form.get("image")
    if not isinstance(upload, UploadFile) or not upload.filename:
        return None, None
    settings = state(request)["settings"]
    data = await upload.read(settings.max_image_bytes + 1)
    try:
        # decoding and encoding take CPU time: off the event loop
        image = await asyncio.to_thread(prepare_image, data, settings.max_image_bytes,
                                        settings.max_image_pixels)
    except ImageRejected as exc:
        return None, str(exc)
    # what is stored and served is the re-encoded image, never the uploaded bytes
    return (image.data, image.ext, image.content_type), None


def pending_image_token(secret: str, host_id: int, name: str) -> str:
    """A form's hold on an image uploaded with a submission that failed validation: the stored
    name, signed for this host, so the re-rendered form keeps the image without the host
    choosing it again, and no one can attach a name they did not upload."""
    digest = hmac.new(secret.encode(), f"pending-image:{host_id}:{name}".encode(),
                      hashlib.sha256).hexdigest()
    return f"{name}:{digest}"


def pending_image_name(secret: str, host_id: int, token: object) -> str | None:
    if not isinstance(token, str) or ":" not in token:
        return None
    name = token.rpartition(":")[0]
    return name if same_secret(token, pending_image_token(secret, host_id, name)) else None


async def own_product(request: Request, host: dict) -> dict:
    try:
        product_id = int(request.path_params["product_id"])
    except ValueError:
        raise HTTPException(404, "No such product.") from None
    product = await queries.product(state(request)["db"], product_id)
    if product is None or product["host_id"] != host["id"]:
        # Another host's product is as invisible as a missing one.
        raise HTTPException(404, "No such product.")
    return product


async def product_form(request: Request):
    host = require_host(request)
    product = None
    if "product_id" in request.path_params:
        product = await own_product(request, host)
    if request.method == "POST":
        return await save_product(request, host, product)
    # GET and HEAD (Starlette routes HEAD here too) only show the form
    values = {"name": "", "description": "", "price": "", "stock": "1"}
    if product:
        values = {"name": product["name"], "description": product["description"],
                  # not format_money with its symbol stripped: "CHF 18.00" kept "CHF"
                  "price": money_input(product["price_minor"], product["currency"]),
                  "stock": str(product["stock"])}
    return render(request, "product_form.html", product=product, values=values, errors=[])


async def save_product(request: Request, host: dict, product: dict | None):
    settings = state(request)["settings"]
    form = await read_form(request)
    currency = product["currency"] if product else settings.currency
    values, errors = product_values(form, currency)
    image, image_error = await read_image(request, form)
    storage = state(request)["storage"]
    pending = None
    if image_error:
        errors.append(image_error)
    elif image is None:  # no new file: the image held from the last failed submission
        pending = pending_image_name(settings.secret_key, host["id"], form.get("pending_image"))
    if image is not None:
        # stored now (re-encoded, never the upload) so that a failed submission keeps it
        pending = await storage.save(*image)
    held = None
    if pending:
        held = {"token": pending_image_token(settings.secret_key, host["id"], pending),
                "url": storage.url(pending)}
    if form.get("stock_was"):  # the stock the form first showed: the change stays relative
        values["stock_was"] = str(form.get("stock_was"))
    if errors:
        return render(request, "product_form.html", status_code=400, product=product,
                      values=values, errors=errors, pending_image=held)
    db = state(request)["db"]
    image_name = product["image"] if product else None
    if pending:
        image_name = pending
    if product is None:
        product_id = await queries.create_product(
            db, host["id"], values["name"], values["description"], values["price_minor"],
            currency, values["stock_count"], image_name)
    else:
        product_id = product["id"]
        # The form showed the stock as it was then ("stock_was"); apply the host's change as a
        # difference, so units sold while the form was open are not handed out again.
        try:
            shown_stock = parse_int(form.get("stock_was"), "Stock", 0, MAX_STOCK)
        except ValueError:
            shown_stock = product["stock"]
        changed = await queries.update_product(
            db, host["id"], product_id, name=values["name"], description=values["description"],
            price_minor=values["price_minor"], image=image_name,
            stock_delta=values["stock_count"] - shown_stock)
        if not changed:
            values["stock"] = str((await queries.product(db, product_id))["stock"])
            values.pop("stock_was", None)  # the form shows the stock as it is now
            return render(request, "product_form.html", status_code=409, product=product,
                          values=values, pending_image=held, errors=[
                              "Some units sold while you were editing: the stock cannot go "
                              "that low. Check the stock and save again."])
        if values["stock_count"] > shown_stock:
            # units added: every process's sold-out board hears it (the room's cards come
            # with the product list below)
            stock_notifier(state(request)).changed(product_id, units_back=True)
    await announce_products(state(request), host["id"])
    return redirect(f"/studio?notice=saved-{product_id}")


async def delete_product(request: Request):
    host = require_host(request)
    product = await own_product(request, host)
    db = state(request)["db"]
    channel = await queries.channel_by_host(db, host["id"])
    await queries.delete_product(db, host["id"], product["id"])
    if channel is not None and channel["pinned_product_id"] == product["id"]:
        # the query unpinned it; the viewers' pages must drop the card too
        await publish_room_event(state(request)["broker"], channel["id"],
                                 {"type": "pinned", "product": None})
    await announce_products(state(request), host["id"])
    return answer(request, await host_state(state(request), host["id"]), "/studio?notice=deleted")


async def toggle_shown(request: Request):
    host = require_host(request)
    product = await own_product(request, host)
    form = await read_form(request)
    # The page says which state it wants ("1"/"0"): two open pages (the studio and the room's
    # panel) that each toggled would undo each other.  Without it (older pages): a toggle.
    wanted = form.get("shown")
    shown = wanted == "1" if wanted in ("0", "1") else not product["shown"]
    _, unpinned = await queries.set_product_shown(state(request)["db"], host["id"],
                                                  product["id"], shown)
    for channel_id in unpinned:
        # a hidden product is not for sale: the viewers' pages drop its pinned card too
        await publish_room_event(state(request)["broker"], channel_id,
                                 {"type": "pinned", "product": None})
    await announce_products(state(request), host["id"])
    return answer(request, await host_state(state(request), host["id"]), "/studio")


async def change_stock(request: Request):
    """POST /studio/products/{id}/stock {stock, stock_was}: the host sets the stock during the
    show.  Applied as the difference from what their page showed, in the conditional update
    checkouts use, so units sold meanwhile are not handed out again."""
    host = require_host(request)
    product = await own_product(request, host)
    site = state(request)
    form = await read_form(request)
    try:
        wanted = parse_int(form.get("stock"), "Stock", 0, MAX_STOCK)
    except ValueError as exc:
        return answer(request, {"error": str(exc), "field": "stock"},
                      f"/studio/products/{product['id']}", status_code=400)
    try:
        shown_stock = parse_int(form.get("stock_was"), "Stock", 0, MAX_STOCK)
    except ValueError:
        shown_stock = product["stock"]
    changed = await queries.update_product(site["db"], host["id"], product["id"],
                                           stock_delta=wanted - shown_stock)
    if not changed:
        now = await queries.product(site["db"], product["id"])
        return answer(request, {
            "error": "Some units sold meanwhile: the stock cannot go that low. It is "
                     f"{now['stock'] if now else 0} now.", "field": "stock",
            "state": await host_state(site, host["id"])},
            "/studio", status_code=409)
    # the room's cards, as after a sale; units added reach a room (and every process's
    # sold-out board) told "sold out" at once
    stock_notifier(site).changed(product["id"], units_back=wanted > shown_stock)
    return answer(request, await host_state(site, host["id"]), "/studio")


async def pin(request: Request):
    """Pin one product (or none): every viewer's page shows the card at once."""
    host = require_host(request)
    site = state(request)
    db = site["db"]
    channel = await ensure_channel(db, host["id"], host["display_name"])
    form = await read_form(request)
    settings = site["settings"]
    if not await site["pin_limiter"].claim(host["id"]):
        # each pin is a cue call to the node and an event to every viewer of the room
        _limited.warning("pin", "host %s: pin refused (over %d per %g s)", host["id"],
                         settings.pin_rate, settings.pin_window)
        raise HTTPException(429, f"Too many pins: at most {settings.pin_rate} every "
                                 f"{settings.pin_window:g} seconds. Wait a moment and pin "
                                 "again.", headers={"Retry-After": str(math.ceil(
                                     settings.pin_window))})
    raw = (form.get("product_id") or "").strip()
    product_id = None
    if raw:
        try:
            product = await queries.product(db, int(raw))
        except ValueError:
            product = None
        if product is None or product["host_id"] != host["id"]:
            raise HTTPException(404, "No such product.")
        if not product["shown"]:
            raise HTTPException(409, "Show this product in the room before pinning it.")
        product_id = product["id"]
    await queries.set_pinned(db, channel["id"], product_id)
    card = None
    if product_id is not None:
        card = (await room_cards(site, channel["id"], [product]))[0]
    # while live: a cue point in the stream and a pin on the media clock (site/replays.py)
    event = await replays.pinned_event(site, channel, product_id, card)
    # The cue call may take up to a second, and a pin made meanwhile (here or in another
    # process) may have been published already: what goes out is the pin as it stands now,
    # so the last event every viewer gets is the channel's current pin, whatever the order.
    event = await current_pin_event(site, host["id"], product_id, event)
    await publish_room_event(site["broker"], channel["id"], event)
    return answer(request, {"pinned": event["product"], "media_ms": event.get("media_ms"),
                            **await host_state(site, host["id"])},
                  "/studio?notice=pinned")


async def current_pin_event(site: SiteState, host_id: int, product_id: int | None,
                            event: dict) -> dict:
    """``event`` when ``product_id`` is still what the host's channel pins, else the
    ``pinned`` event of what it pins now (without ``media_ms``: that cue was another pin's)."""
    db = site["db"]
    channel = await queries.channel_by_host(db, host_id)
    current = channel["pinned_product_id"] if channel else None
    if current == product_id or channel is None:
        return event
    card = None
    if current is not None:
        product = await queries.product(db, current)
        if product is not None and product["shown"] and not product["deleted"]:
            card = (await room_cards(site, channel["id"], [product]))[0]
    return {"type": "pinned", "product": card}


async def announce_products(site: SiteState, host_id: int) -> None:
    """Tell the host's room that its product list changed (names, prices, stock)."""
    db = site["db"]
    channel = await queries.channel_by_host(db, host_id)
    if channel is None:
        return
    shown = await queries.host_products(db, host_id, shown_only=True)
    await publish_room_event(site["broker"], channel["id"], {
        "type": "products", "products": await room_cards(site, channel["id"], shown)})


async def sales(request: Request):
    host = require_host(request)
    lines = await queries.host_sales(state(request)["db"], host["id"])
    seen: set[int] = set()
    for line in lines:
        line["line_total"] = format_money(line["unit_price_minor"] * line["quantity"],
                                          line["currency"])
        line["address"] = shopping.order_address(line)
        # the order's date, address and ship action on its first line only (lines of one
        # order come together, newest order first)
        line["first_of_order"] = line["order_id"] not in seen
        seen.add(line["order_id"])
    paid = [line for line in lines if line["status"] == "paid"]
    # test-mode orders: shown apart, never as money earned
    return render(request, "sales.html", lines=lines, notice=request.query_params.get("notice"),
                  totals=money_totals((p for p in paid if not p["test_mode"]),
                                      "unit_price_minor"),
                  test_totals=money_totals((p for p in paid if p["test_mode"]),
                                           "unit_price_minor"))


async def ship(request: Request):
    """POST /studio/orders/<id>/ship {carrier?, tracking_number?}: this host's lines of a paid
    order are shipped (once; other sellers ship their own); the shopper's /orders shows it."""
    host = require_host(request)
    try:
        order_id = int(request.path_params["order_id"])
    except ValueError:
        raise HTTPException(404, "No such order.") from None
    form = await read_form(request)
    carrier = " ".join((form.get("carrier") or "").split())
    tracking = " ".join((form.get("tracking_number") or "").split())
    json_wanted = request.headers.get("accept", "").startswith("application/json")
    for field, value, longest in (("carrier", carrier, 60), ("tracking_number", tracking, 100)):
        if len(value) > longest:
            message = f"At most {longest} characters."
            if json_wanted:
                return JSONResponse({"error": message, "field": field}, status_code=400)
            raise HTTPException(400, f"{field.replace('_', ' ').capitalize()}: {message}")
    shipped = await shopping.mark_shipped(state(request)["db"], host["id"], order_id, carrier,
                                          tracking)
    if not shipped:
        message = "That order is not a paid, unshipped order of yours."
        if json_wanted:
            return JSONResponse({"error": message, "field": None}, status_code=409)
        raise HTTPException(409, message)
    if json_wanted:
        return JSONResponse({"ok": True})
    return redirect(f"/studio/sales?notice=shipped#order-{order_id}")


routes = [
    Route("/studio", studio),
    Route("/studio/key", regenerate_key, methods=["POST"]),
    Route("/studio/title", update_title, methods=["POST"]),
    Route("/studio/pin", pin, methods=["POST"]),
    Route("/studio/products/new", product_form, methods=["GET", "POST"]),
    Route("/studio/products/{product_id}", product_form, methods=["GET", "POST"]),
    Route("/studio/products/{product_id}/delete", delete_product, methods=["POST"]),
    Route("/studio/products/{product_id}/shown", toggle_shown, methods=["POST"]),
    Route("/studio/products/{product_id}/stock", change_stock, methods=["POST"]),
    Route("/studio/health", health),
    Route("/studio/state", host_state_api),
    Route("/studio/sales", sales),
    Route("/studio/orders/{order_id}/ship", ship, methods=["POST"]),
]
