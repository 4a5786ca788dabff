"""Flash sales: a host starts a timed sale on a product (a sale price and/or a sale quantity, a
duration, an optional per-shopper limit); every viewer hears it and counts down from the
server's clock; it ends on time, when its units are sold, or when the host ends it.

Everything is decided in the database: checkout claims a sale's units with one conditional
UPDATE inside the window (db/shopping.py ``claim_sale_units``), so the price applies only
while the sale runs and its quantity and per-shopper limit hold however many buy at once.
Ending is a conditional ``UPDATE ... WHERE ended_at IS NULL``: every site process checks for
sales that are due every ``WATCHBUY_FLASH_SALE_CHECK_INTERVAL``, or sooner when the next sale
ends sooner (:func:`run_ender`), and only the one whose UPDATE changed the row announces
``sale_ended``, so a room hears each end exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchbuy.db import queries, shopping
from watchbuy.logs import LogLimiter
from watchbuy.site.accounts import ensure_channel
from watchbuy.site.chat import publish_room_event, server_time
from watchbuy.site.state import SiteState, state
from watchbuy.site.web import (
    format_money,
    parse_int,
    parse_money,
    read_fields,
    redirect,
    require_host,
)

log = logging.getLogger("watchbuy.site.flash")
announce_log = LogLimiter(log, interval=10.0)
MAX_PER_SHOPPER = 99


def public_sale(sale: dict) -> dict:
    """A sale as rooms get it.  ``sale_price_minor`` is what a unit costs in the sale (the
    regular price for a quantity-only sale); ``remaining`` is None without a quantity cap."""
    price = sale["sale_price_minor"] if sale["sale_price_minor"] is not None \
        else sale["price_minor"]
    remaining = None if sale["quantity"] is None else max(0, sale["quantity"] - sale["sold"])
    return {"id": sale["id"], "product_id": sale["product_id"],
            "sale_price": format_money(price, sale["currency"]), "sale_price_minor": price,
            "currency": sale["currency"], "quantity": sale["quantity"], "remaining": remaining,
            "per_shopper_limit": sale["per_shopper_limit"], "starts_at": sale["starts_at"],
            "ends_at": sale["ends_at"]}


def sale_values(data: dict, product: dict, max_seconds: int) -> tuple[dict, dict[str, str]]:
    """The sale the host asked for, checked: (values, field → error)."""
    errors: dict[str, str] = {}
    values: dict = {"sale_price_minor": None, "quantity": None, "per_shopper_limit": None}
    if (data.get("sale_price") or "").strip():
        try:
            price = parse_money(data["sale_price"], product["currency"])
            regular = format_money(product["price_minor"], product["currency"])
            if not 0 < price < product["price_minor"]:
                errors["sale_price"] = ("The sale price must be more than zero and less than "
                                        f"the regular {regular}.")
            values["sale_price_minor"] = price
        except ValueError as exc:
            errors["sale_price"] = str(exc)
    for field, label, high in (("quantity", "Sale quantity", max(1, product["stock"])),
                               ("per_shopper_limit", "Limit per shopper", MAX_PER_SHOPPER)):
        if (data.get(field) or "").strip():
            try:
                values[field] = parse_int(data[field], label, 1, high)
            except ValueError as exc:
                errors[field] = str(exc)
    try:
        values["duration"] = parse_int(data.get("duration_seconds"), "Duration (seconds)", 10,
                                       max_seconds)
    except ValueError as exc:
        errors["duration_seconds"] = str(exc)
    if not errors and values["sale_price_minor"] is None and values["quantity"] is None:
        errors["sale_price"] = "Give a sale price, a sale quantity, or both."
    return values, errors


def wants_json(request: Request) -> bool:
    return request.headers.get("accept", "").startswith("application/json")


async def start(request: Request):
    """POST /studio/flash {product_id, sale_price?, quantity?, duration_seconds,
    per_shopper_limit?}: starts the sale now and tells the room."""
    host = require_host(request)
    site = state(request)
    db = site["db"]
    try:
        data = await read_fields(request)
    except ValueError as exc:
        return JSONResponse({"error": str(exc), "field": None}, status_code=400)

    async def refuse(field: str, message: str, status_code: int = 400,
                     errors: dict | None = None):
        if wants_json(request):
            return JSONResponse({"error": message, "field": field, "errors": errors or
                                 {field: message}}, status_code=status_code)
        from watchbuy.site.studio import render_studio

        return await render_studio(request, status_code=status_code,
                                   flash_errors=errors or {field: message}, flash_values=data)

    try:
        product_id = parse_int(data.get("product_id"), "Product", 1, 2**31 - 1)
    except ValueError as exc:
        return await refuse("product_id", str(exc))
    product = await queries.product(db, product_id)
    if product is None or product["host_id"] != host["id"]:
        return await refuse("product_id", "No such product.", 404)
    if not product["shown"]:
        return await refuse("product_id", "Show this product in the room before a sale.", 409)
    values, errors = sale_values(data, product, site["settings"].flash_sale_max_seconds)
    if errors:
        field, message = next(iter(errors.items()))
        return await refuse(field, message, errors=errors)
    channel = await ensure_channel(db, host["id"], host["display_name"])
    try:
        sale_id = await shopping.start_sale(
            db, host["id"], channel["id"], product_id, values["sale_price_minor"],
            values["quantity"], values["per_shopper_limit"], values["duration"])
    except shopping.SaleExists as exc:
        return await refuse("product_id", str(exc), 409)
    except LookupError:
        return await refuse("product_id", "No such product.", 404)
    sale = public_sale(await shopping.sale(db, sale_id))
    await publish_room_event(site["broker"], channel["id"], {
        "type": "sale", "sale": sale, "server_time": server_time()})
    log.info("flash sale %s on product %s started by host %s", sale_id, product_id, host["id"])
    if wants_json(request):
        return JSONResponse({"sale": sale})
    return redirect("/studio?notice=flash")


async def end(request: Request):
    """POST /studio/flash/<id>/end: the host ends a running sale of theirs."""
    host = require_host(request)
    site = state(request)
    try:
        sale_id = int(request.path_params["sale_id"])
    except ValueError:
        raise HTTPException(404, "No such sale.") from None
    channel = await ensure_channel(site["db"], host["id"], host["display_name"])
    sale = await shopping.sale(site["db"], sale_id)
    if sale is None or sale["channel_id"] != channel["id"]:
        raise HTTPException(404, "No such sale.")
    ended = await shopping.end_sale(site["db"], sale_id, "host", channel["id"])
    if ended:
        await announce_end(site, sale, "host")
    if wants_json(request):
        return JSONResponse({"ended": ended})
    return redirect("/studio?notice=flash-ended")


async def announce_end(site: SiteState, sale: dict, reason: str) -> None:
    try:
        await publish_room_event(site["broker"], sale["channel_id"], {
            "type": "sale_ended", "sale_id": sale["id"], "product_id": sale["product_id"],
            "reason": reason})
    except Exception as exc:  # the sale has ended in the database; viewers' clocks end it too
        announce_log.warning("end", "end of flash sale %s not announced: %s", sale["id"], exc)


async def end_due_sales(site: SiteState) -> int:
    """Ends the sales whose time is up or whose units are sold; announces those this process
    ended (another process may win a race for the same sale: then it announces).  How many."""
    ended = 0
    stamp = time.time()
    for sale in await shopping.due_sales(site["db"]):
        reason = "time" if sale["ends_at"] <= stamp else "sold_out"
        if await shopping.end_sale(site["db"], sale["id"], reason):
            await announce_end(site, sale, reason)
            ended += 1
    return ended


async def sold_units(site: SiteState, order: dict) -> None:
    """After an order took sale units: end the sales it sold out, at once (not at the next
    check)."""
    sale_ids = {item.get("flash_sale_id") for item in order["items"]} - {None}
    for sale_id in sale_ids:
        sale = await shopping.sale(site["db"], sale_id)
        if sale is None or sale["ended_at"] is not None or sale["quantity"] is None:
            continue
        if sale["sold"] >= sale["quantity"]:
            if await shopping.end_sale(site["db"], sale_id, "sold_out"):
                await announce_end(site, sale, "sold_out")
        else:
            # "N left at the sale price": the sale again with its new ``remaining``, at most
            # one per interval (each "sale" event drops the room's kept page, pagecache.py)
            from watchbuy.site.shop import sale_notifier  # shop builds on this module

            sale_notifier(site).changed(sale_id)


async def run_ender(site: SiteState, stopping: asyncio.Event) -> None:
    """Every site process runs this for its life: end the sales that are due, then sleep
    until the next sale's end or ``flash_sale_check_interval``, whichever is sooner (a sale
    started by another process is seen at the next check).  Stopped between rounds, never
    inside a query (see upkeep.repeat_until)."""
    interval = site["settings"].flash_sale_check_interval
    while not stopping.is_set():
        delay = interval
        try:
            # one cheap query while no sale runs (the usual case); the due sales (time up or
            # units gone) only when one does
            upcoming = await shopping.next_sale_end(site["db"])
            if upcoming is not None:
                await end_due_sales(site)
                upcoming = await shopping.next_sale_end(site["db"])
            if upcoming is not None:
                delay = min(interval, max(0.0, upcoming - time.time()))
        except Exception:
            log.exception("ending flash sales failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)


routes = [
    Route("/studio/flash", start, methods=["POST"]),
    Route("/studio/flash/{sale_id}/end", end, methods=["POST"]),
]
