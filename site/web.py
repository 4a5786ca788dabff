"""Helpers every page module shares: rendering, redirects, access checks, money, forms."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from watchbuy.site.security import cookie_header, cookie_name, origin_of
from watchbuy.site.state import state

TEMPLATES = Path(__file__).parent / "templates"

CURRENCY_SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥", "twd": "NT$", "sgd": "S$"}
ZERO_DECIMAL = {"jpy", "krw", "twd"}


def minor_units(currency: str) -> int:
    return 0 if currency.lower() in ZERO_DECIMAL else 2


def format_money(amount_minor: int, currency: str) -> str:
    digits = minor_units(currency)
    symbol = CURRENCY_SYMBOLS.get(currency.lower(), currency.upper() + " ")
    if digits == 0:
        return f"{symbol}{amount_minor:,}"
    return f"{symbol}{amount_minor / 10**digits:,.{digits}f}"


def money_totals(lines: Iterable[dict], price: str) -> list[str]:
    """The lines' sum per currency (``lines[price]`` × ``quantity``), formatted: a cart or a
    sales list can mix currencies, and amounts of different currencies never add up."""
    totals: dict[str, int] = {}
    for line in lines:
        totals[line["currency"]] = totals.get(line["currency"], 0) + \
            line[price] * line["quantity"]
    return [format_money(amount, currency) for currency, amount in totals.items()]


def money_input(amount_minor: int, currency: str) -> str:
    """The amount as a form field shows it, so that saving it again gives the same amount:
    1234.50, not "CHF 1,234.50"."""
    digits = minor_units(currency)
    if digits == 0:
        return str(amount_minor)
    return f"{amount_minor // 10**digits}.{amount_minor % 10**digits:0{digits}d}"


def _ascii_digits(text: str) -> bool:
    # str.isdigit() also says yes to '²' and to other scripts' digits, which int() then refuses
    # (a Python error message on the form) or reads as a number nobody typed on purpose.
    return text.isascii() and text.isdigit()


def parse_money(text: str, currency: str) -> int:
    """'12.50' → 1250 minor units; ValueError with a message fit for the form otherwise."""
    text = (text or "").strip()
    if text.count(",") == 1 and "." not in text and len(text.rsplit(",", 1)[1]) != 3:
        # "12,50" is a decimal comma (as many shoppers write it), "1,250" a thousands separator
        text = text.replace(",", ".")
    elif "," in text:
        groups = text.split(".", 1)[0].split(",")
        if not groups[0] or any(len(group) != 3 for group in groups[1:]):
            raise ValueError("The price must be a positive number, like 12.50.")
    text = text.replace(",", "")
    if not text:
        raise ValueError("Enter a price.")
    digits = minor_units(currency)
    whole, _, fraction = text.partition(".")
    if not _ascii_digits(whole) and not (whole == "" and fraction):
        raise ValueError("The price must be a positive number, like 12.50.")
    if fraction and (not _ascii_digits(fraction) or len(fraction) > digits):
        raise ValueError(f"The price can have at most {digits} digits after the point.")
    if len(whole) > 12:  # int() refuses thousands of digits; such a price is too high anyway
        raise ValueError("That price is too high.")
    value = int(whole or "0") * 10**digits + int((fraction or "0").ljust(digits, "0")[:digits] or 0)
    if value > 100_000_000 * 10**digits:
        raise ValueError("That price is too high.")
    return value


def parse_int(text: str | None, name: str, low: int, high: int) -> int:
    try:
        value = int((text or "").strip())
    except ValueError:
        raise ValueError(f"{name} must be a whole number.") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high:,}.")
    return value


def build_templates(vendor: dict[str, str] | None = None) -> Environment:
    """The pages' Jinja environment; ``vendor``: where each front-end package is served
    (``{{ vendor.mpegts }}/mpegts.js``)."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,  # templates ship with the code: no mtime check on every render
    )
    env.filters["money"] = lambda product: format_money(
        product["price_minor"] if "price_minor" in product else product["unit_price_minor"],
        product["currency"],
    )
    env.globals["format_money"] = format_money
    # order dates: Unix seconds shown in UTC (the site knows no shopper's time zone)
    env.filters["isodate"] = lambda stamp: datetime.fromtimestamp(
        stamp, UTC).isoformat(timespec="seconds")
    env.filters["shortdate"] = lambda stamp: datetime.fromtimestamp(
        stamp, UTC).strftime("%b %-d, %Y %H:%M UTC")
    env.filters["urlquote"] = lambda value: quote(str(value), safe="")
    env.globals["vendor"] = vendor or {}
    return env


# The header's cart badge on every page without a cart query per page: the code that reads or
# changes a cart anyway (the cart endpoints, the cart page, checkout, the room page) leaves
# "<user id>.<units>" in this cookie and render() shows it.  The user id keeps one shopper's
# count from showing for another who logs in on the same browser; a stale count (a cart
# changed on another device) is put right by the next cart action or visit to /cart.
CART_COOKIE = "wb_cart"


def cart_count_hint(request: Request) -> int | None:
    """The logged-in shopper's cart size as last seen by the site, or None (not known)."""
    user = request.state.user
    raw = request.cookies.get(cookie_name(CART_COOKIE, state(request)["settings"].cookie_secure))
    if user is None or not raw:
        return None
    owner, _, count = raw.partition(".")
    if owner != str(user["id"]) or not count.isdigit() or len(count) > 6:
        return None
    return int(count)


def remember_cart_count(request: Request, response: Response, user_id: int,
                        count: int) -> Response:
    """Has ``response`` keep the shopper's cart size for the badge of the next pages (only
    when it changed: an unchanged page sets no cookie, as a browser or a cache expects)."""
    secure = state(request)["settings"].cookie_secure
    value = f"{user_id}.{count}"
    if request.cookies.get(cookie_name(CART_COOKIE, secure)) != value:
        response.raw_headers.append((b"set-cookie", cookie_header(
            CART_COOKIE, value, 30 * 86400, secure)))
    return response


def render(request: Request, template: str, status_code: int = 200, **context) -> HTMLResponse:
    site = state(request)
    env = site["templates"]
    context.setdefault("user", request.state.user)
    if "cart_count" not in context and request.state.user is not None:
        context["cart_count"] = cart_count_hint(request)
    context.setdefault("csrf_token", request.state.csrf_token)
    context.setdefault("request", request)
    context.setdefault("settings", site["settings"])
    html = env.get_template(template).render(**context)
    room = context.get("state")  # the room page's live state
    if isinstance(room, dict) and room.get("play_url"):
        # The room's player fetches from this node: the CSP of this page must allow it even
        # when the balancer picked a node outside the configured origins.
        request.state.csp_media_origin = origin_of(room["play_url"])
    return HTMLResponse(html, status_code=status_code)


async def read_form(request: Request):
    """The request's form with tight limits on its parts (the body as a whole is bounded by
    the security middleware): at most one file, a few dozen fields, small text fields."""
    settings = state(request)["settings"]
    return await request.form(max_files=1, max_fields=50,
                              max_part_size=settings.max_body_bytes)


async def read_fields(request: Request) -> dict[str, str]:
    """The request's fields as text, from a JSON object (a script's fetch) or a form; a JSON
    body that is not an object of plain values is a ValueError (the caller answers 400).
    Non-text JSON values become text (an id sent as 12 reads as "12"), nested ones are refused."""
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            data = await request.json()
        except (ValueError, RecursionError):
            raise ValueError("The request is not valid JSON.") from None
        if not isinstance(data, dict) or any(isinstance(value, (dict, list))
                                              for value in data.values()):
            raise ValueError("The request must be a JSON object of fields.")
        return {str(key): "" if value is None else str(value).lower()
                if isinstance(value, bool) else str(value) for key, value in data.items()}
    form = await read_form(request)
    return {key: value for key, value in form.items() if isinstance(value, str)}


def single_line(text: str | None) -> str:
    """A one-line field (a title) as stored: control characters and line breaks become
    spaces and runs of spaces one.  A title goes into email subjects, where a line break is a
    ValueError (header injection), and into headings where it means nothing."""
    spaced = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text or "")
    return " ".join(spaced.split())


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def current_user(request: Request) -> dict | None:
    return request.state.user


def require_user(request: Request) -> dict:
    """The logged-in user, or a redirect to the login page (raised as an exception)."""
    user = request.state.user
    if user is None:
        raise HTTPException(303, headers={"Location": f"/login?next={quote(request.url.path)}"})
    return user


def require_host(request: Request) -> dict:
    user = require_user(request)
    if not user["is_host"]:
        raise HTTPException(403, "Only hosts can open the studio.")
    return user


def require_admin(request: Request) -> dict:
    user = require_user(request)
    if not user["is_admin"]:
        raise HTTPException(403, "Only operators can open the dashboard.")
    return user


def safe_next(url: str | None) -> str:
    """Only same-site paths: never redirect a user to another site after login."""
    if url and url.startswith("/") and not url.startswith("//") and "\\" not in url:
        return url
    return "/"
