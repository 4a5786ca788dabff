"""The host studio: stream settings, products, what the room shows and pins, sales."""

from __future__ import annotations

import asyncio

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchbuy.db import queries, shopping
from watchbuy.site.accounts import ensure_channel
from watchbuy.site.chat import publish_room_event
from watchbuy.site.flash import public_sale
from watchbuy.site.rooms import room_cards
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
)

MAX_STOCK = 1_000_000


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
    sales = [public_sale(sale) for sale in await shopping.active_sales(db, channel["id"])]
    names = {product["id"]: product["name"] for product in products}
    for sale in sales:
        sale["product_name"] = names.get(sale["product_id"], "")
    extra.setdefault("flash_errors", {})
    extra.setdefault("flash_values", {})
    return render(request, "studio.html", status_code=status_code, channel=channel,
                  ingest=ingest, ingest_error=ingest_error, products=products,
                  room_url=room_url, notice=request.query_params.get("notice"),
                  flash_sales=sales, flash_max_seconds=site["settings"].flash_sale_max_seconds,
                  **extra)


async def regenerate_key(request: Request):
    host = require_host(request)
    await queries.regenerate_stream_key(state(request)["db"], host["id"])
    return redirect("/studio?notice=key")


async def update_title(request: Request):
    host = require_host(request)
    form = await read_form(request)
    title = (form.get("title") or "").strip()
    if 2 <= len(title) <= 100:
        await queries.update_channel_title(state(request)["db"], host["id"], title)
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
    if image_error:
        errors.append(image_error)
    if errors:
        return render(request, "product_form.html", status_code=400, product=product,
                      values=values, errors=errors)
    db = state(request)["db"]
    image_name = product["image"] if product else None
    if image is not None:
        image_name = await state(request)["storage"].save(*image)
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
            return render(request, "product_form.html", status_code=409, product=product,
                          values=values, errors=[
                              "Some units sold while you were editing: the stock cannot go "
                              "that low. Check the stock and save again."])
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
    return redirect("/studio?notice=deleted")


async def toggle_shown(request: Request):
    host = require_host(request)
    product = await own_product(request, host)
    _, unpinned = await queries.set_product_shown(state(request)["db"], host["id"],
                                                  product["id"], not product["shown"])
    for channel_id in unpinned:
        # a hidden product is not for sale: the viewers' pages drop its pinned card too
        await publish_room_event(state(request)["broker"], channel_id,
                                 {"type": "pinned", "product": None})
    await announce_products(state(request), host["id"])
    return redirect("/studio")


async def pin(request: Request):
    """Pin one product (or none): every viewer's page shows the card at once."""
    host = require_host(request)
    db = state(request)["db"]
    channel = await ensure_channel(db, host["id"], host["display_name"])
    form = await read_form(request)
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
        card = (await room_cards(state(request), channel["id"], [product]))[0]
    await publish_room_event(state(request)["broker"], channel["id"],
                             {"type": "pinned", "product": card})
    if request.headers.get("accept", "").startswith("application/json"):
        from starlette.responses import JSONResponse

        return JSONResponse({"pinned": card})
    return redirect("/studio?notice=pinned")


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
    """POST /studio/orders/<id>/ship {carrier?, tracking_number?}: a paid order of this host's
    products is shipped (once); the shopper's /orders shows it."""
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
    Route("/studio/sales", sales),
    Route("/studio/orders/{order_id}/ship", ship, methods=["POST"]),
]
