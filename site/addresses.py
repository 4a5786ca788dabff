"""The shopper's address book (pages and JSON), the checkout info one-tap buying reads, and the
shopper's settings page (/account).

Addresses are checked here, on the server, field by field: each error names its field, so a
page shows it beside the input and a script gets ``{"error": text, "field": name}``.  Orders
keep a copy of the address they were shipped to (db/shopping.py ``ship_values``), so editing
or deleting an address never changes a past order.
"""

from __future__ import annotations

import pycountry
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from watchbuy.db import queries, shopping
from watchbuy.db.schema import ADDRESS_LINE, NAME
from watchbuy.site.chat import strip_invisible
from watchbuy.site.state import state
from watchbuy.site.web import read_fields, read_form, redirect, render, require_user, safe_next

# (field, label, required, longest); the lengths are the columns' (db/schema.py)
FIELDS = [
    ("name", "Full name", True, NAME),
    ("line1", "Address", True, ADDRESS_LINE),
    ("line2", "Apartment, suite (optional)", False, ADDRESS_LINE),
    ("city", "City", True, NAME),
    ("postal_code", "Postal code", True, 20),
    ("region", "State / region (optional)", False, NAME),
    ("country", "Country", True, 2),
]
# Places that use no postal codes at all: a required code would stop their shoppers.
NO_POSTAL_CODE = frozenset({"HK", "MO", "AE", "QA"})
POSTAL_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 -")


def countries() -> list[tuple[str, str]]:
    """(code, name) of every ISO 3166-1 country, by name: the form's choices."""
    return sorted(((c.alpha_2, c.name) for c in pycountry.countries), key=lambda c: c[1])


def clean_address(data: dict) -> tuple[dict, dict[str, str]]:
    """(the address's values, field → error message); no errors means it can be saved."""
    values: dict[str, str] = {}
    errors: dict[str, str] = {}
    for field, label, required, longest in FIELDS:
        text = " ".join(strip_invisible(str(data.get(field) or "")).split())
        values[field] = text
        if any(ord(ch) < 32 for ch in text):
            errors[field] = f"{label.split(' (')[0]} has characters that cannot be printed."
        elif len(text) > longest:
            errors[field] = f"{label.split(' (')[0]} is at most {longest} characters."
        elif required and not text:
            errors[field] = f"Enter the {label.split(' (')[0].lower()}."
    country = values["country"].upper()
    values["country"] = country
    if "country" not in errors and pycountry.countries.get(alpha_2=country) is None:
        errors["country"] = "Choose a country (a two-letter ISO code such as US or DE)."
    postal = values["postal_code"]
    if "postal_code" not in errors and postal and not set(postal) <= POSTAL_CHARACTERS:
        errors["postal_code"] = "A postal code has letters, digits, spaces and dashes only."
    if country in NO_POSTAL_CODE and not postal:
        errors.pop("postal_code", None)  # (the country is read after the code)
    return values, errors


def public_address(row: dict) -> dict:
    return {"id": row["id"], **{field: row[field] for field in shopping.ADDRESS_FIELDS},
            "is_default": bool(row["is_default"])}


def field_error(message: str, field: str | None, status_code: int = 400,
                errors: dict | None = None) -> JSONResponse:
    """The API's error: ``{"error", "field"}`` (and every field's when there are several)."""
    body: dict = {"error": message, "field": field}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status_code)


async def save_address(request: Request, user: dict, data: dict) -> tuple[dict | None, dict]:
    """Checks and saves an address from the shopper's fields: (the saved row or None, errors)."""
    values, errors = clean_address(data)
    if errors:
        return None, errors
    try:
        row = await shopping.add_address(state(request)["db"], user["id"], values,
                                         make_default=data.get("is_default") in ("1", "true",
                                                                                 "on"))
    except shopping.AddressBookFull as exc:
        return None, {"name": str(exc)}
    return row, {}


async def addresses_page(request: Request, errors: dict | None = None,
                         values: dict | None = None, status_code: int = 200,
                         next_url: str | None = None):
    """The book and its form; ``next_url`` (kept through a refused form) is where a saved
    address returns to (the cart that asked for one)."""
    user = require_user(request)
    next_url = next_url if next_url is not None else request.query_params.get("next")
    rows = await shopping.user_addresses(state(request)["db"], user["id"])
    return render(request, "addresses.html", status_code=status_code, addresses=rows,
                  fields=FIELDS, countries=countries(), errors=errors or {},
                  values=values or {}, next=safe_next(next_url) if next_url else "",
                  notice=request.query_params.get("notice"))


async def addresses_view(request: Request):
    return await addresses_page(request)


async def addresses_add(request: Request):
    """The address book's form: saved, or shown again with each error beside its field."""
    user = require_user(request)
    form = await read_form(request)
    data = {key: value for key, value in form.items() if isinstance(value, str)}
    row, errors = await save_address(request, user, data)
    if row is None:
        return await addresses_page(request, errors=errors, values=data, status_code=400,
                                    next_url=data.get("next") or "")
    if data.get("next"):
        return redirect(safe_next(data["next"]))
    return redirect("/addresses?notice=saved")


async def address_id_of(request: Request) -> int:
    try:
        return int(request.path_params["address_id"])
    except ValueError:
        raise HTTPException(404, "No such address.") from None


async def addresses_delete(request: Request):
    user = require_user(request)
    if not await shopping.delete_address(state(request)["db"], user["id"],
                                         await address_id_of(request)):
        raise HTTPException(404, "No such address.")
    return redirect("/addresses?notice=deleted")


async def addresses_default(request: Request):
    user = require_user(request)
    if not await shopping.set_default_address(state(request)["db"], user["id"],
                                              await address_id_of(request)):
        raise HTTPException(404, "No such address.")
    return redirect("/addresses?notice=default")


async def api_add_address(request: Request):
    """POST /api/addresses (form or JSON) → ``{"address": {...}}``, or the first error with
    its field (all of them in ``errors``)."""
    user = require_user(request)
    try:
        data = await read_fields(request)
    except ValueError as exc:
        return field_error(str(exc), None)
    row, errors = await save_address(request, user, data)
    if row is None:
        field, message = next(iter(errors.items()))
        return field_error(message, field, errors=errors)
    return JSONResponse({"address": public_address(row)})


async def checkout_info(request: Request):
    """What the buy-now sheet needs: the address book, the saved card, the cart's size."""
    user = require_user(request)
    site = state(request)
    db = site["db"]
    rows = await shopping.user_addresses(db, user["id"])
    profile = await shopping.payment_profile(db, user["id"])
    cart = await queries.cart(db, user["id"])
    card = None
    if profile.get("saved_card_last4"):
        card = {"brand": profile["saved_card_brand"], "last4": profile["saved_card_last4"]}
    return JSONResponse({
        "addresses": [public_address(row) for row in rows],
        "saved_card": card,
        "cart_count": sum(line["quantity"] for line in cart),
        "test_mode": not site["settings"].stripe_enabled,
    }, headers={"Cache-Control": "no-store"})


async def account(request: Request):
    """The shopper's settings: the "just bought" announcement, the address book, the card."""
    user = require_user(request)
    db = state(request)["db"]
    if request.method == "POST":
        form = await read_form(request)
        if form.get("action") == "forget_card":
            await shopping.forget_card(db, user["id"])
            return redirect("/account?notice=card")
        await shopping.set_announce_purchases(db, user["id"], form.get("announce") == "1")
        return redirect("/account?notice=saved")
    profile = await shopping.payment_profile(db, user["id"])
    rows = await shopping.user_addresses(db, user["id"])
    return render(request, "account.html", profile=profile, addresses=rows,
                  notice=request.query_params.get("notice"))


routes = [
    Route("/addresses", addresses_view),
    Route("/addresses", addresses_add, methods=["POST"]),
    Route("/addresses/{address_id}/delete", addresses_delete, methods=["POST"]),
    Route("/addresses/{address_id}/default", addresses_default, methods=["POST"]),
    Route("/api/addresses", api_add_address, methods=["POST"]),
    Route("/api/checkout-info", checkout_info),
    Route("/account", account, methods=["GET", "POST"]),
]
