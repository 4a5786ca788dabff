"""Sign up, log in, log out — for shoppers and hosts (a host can shop too)."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.routing import Route

from watchbuy.db import queries
from watchbuy.site import security
from watchbuy.site.web import redirect, render, safe_next

EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}\.[^@\s]{2,}$")
SLUG_RE = re.compile(r"[^a-z0-9]+")


def slugify(text: str) -> str:
    return SLUG_RE.sub("-", text.lower()).strip("-")[:40] or "room"


async def unique_slug(db, base: str) -> str:
    slug = base
    n = 1
    while await queries.channel_by_slug(db, slug) is not None:
        n += 1
        slug = f"{base}-{n}"
    return slug


async def create_account(db, email: str, display_name: str, password: str, is_host: bool,
                         is_admin: bool = False) -> int:
    """A user (and, for hosts, their live room); used by sign-up and by the seeding of demos."""
    user_id = await queries.create_user(db, email, display_name,
                                        security.hash_password(password), is_host, is_admin)
    if is_host:
        await ensure_channel(db, user_id, display_name)
    return user_id


async def ensure_channel(db, user_id: int, display_name: str) -> dict:
    channel = await queries.channel_by_host(db, user_id)
    if channel is None:
        slug = await unique_slug(db, slugify(display_name))
        await queries.create_channel(db, user_id, slug, f"{display_name}'s live shop")
        channel = await queries.channel_by_host(db, user_id)
    return channel


def validate_signup(form) -> tuple[dict, list[str]]:
    values = {
        "email": (form.get("email") or "").strip(),
        "display_name": (form.get("display_name") or "").strip(),
        "password": form.get("password") or "",
        "is_host": form.get("account_type") == "host",
    }
    errors = []
    if not EMAIL_RE.match(values["email"]) or len(values["email"]) > 254:
        errors.append("Enter a valid email address.")
    if not 2 <= len(values["display_name"]) <= 60:
        errors.append("Your name must be 2 to 60 characters.")
    if len(values["password"]) < 8:
        errors.append("Choose a password of at least 8 characters.")
    if len(values["password"]) > 256:
        errors.append("That password is too long.")
    return values, errors


async def signup_page(request: Request):
    if request.method == "GET":
        return render(request, "signup.html", values={"account_type": "shopper"}, errors=[])
    form = await request.form()
    values, errors = validate_signup(form)
    db = request.app.state.db
    if not errors and await queries.user_by_email(db, values["email"]) is not None:
        errors.append("An account with this email exists already. Log in instead.")
    if errors:
        shown = {**values, "account_type": "host" if values["is_host"] else "shopper"}
        shown.pop("password")
        return render(request, "signup.html", status_code=400, values=shown, errors=errors)
    user_id = await create_account(db, values["email"], values["display_name"],
                                   values["password"], values["is_host"])
    return await login_response(request, user_id, "/studio" if values["is_host"] else "/")


async def login_response(request: Request, user_id: int, next_url: str):
    settings = request.app.state.settings
    token = await security.start_session(request.app.state.db, user_id, settings.session_days)
    response = redirect(next_url)
    response.raw_headers.append((b"set-cookie", security.cookie_header(
        security.SESSION_COOKIE, token, int(settings.session_days * 86400),
        settings.cookie_secure)))
    return response


async def login_page(request: Request):
    next_url = safe_next(request.query_params.get("next"))
    if request.method == "GET":
        return render(request, "login.html", email="", next_url=next_url, error=None)
    form = await request.form()
    email = (form.get("email") or "").strip().lower()
    password = form.get("password") or ""
    next_url = safe_next(form.get("next"))
    db = request.app.state.db
    settings = request.app.state.settings
    client = request.client.host if request.client else "?"
    attempt_key = f"{email}|{client}"
    if await queries.recent_login_attempts(db, attempt_key, settings.login_window) >= \
            settings.login_attempts:
        return render(request, "login.html", status_code=429, email=email, next_url=next_url,
                      error="Too many attempts. Wait a few minutes, then try again.")
    user = await queries.user_by_email(db, email)
    if user is None or not security.verify_password(user["password_hash"], password):
        await queries.record_login_attempt(db, attempt_key)
        return render(request, "login.html", status_code=400, email=email, next_url=next_url,
                      error="That email and password do not match an account.")
    await queries.clear_login_attempts(db, attempt_key)
    if security.needs_rehash(user["password_hash"]):
        await queries.set_password_hash(db, user["id"], security.hash_password(password))
    return await login_response(request, user["id"], next_url)


async def logout(request: Request):
    token = request.state.session_token
    if token:
        await queries.revoke_session(request.app.state.db, security.session_hash(token))
    response = redirect("/")
    response.raw_headers.append((b"set-cookie", security.cookie_header(
        security.SESSION_COOKIE, "", 0, request.app.state.settings.cookie_secure)))
    return response


routes = [
    Route("/signup", signup_page, methods=["GET", "POST"]),
    Route("/login", login_page, methods=["GET", "POST"]),
    Route("/logout", logout, methods=["POST"]),
]
