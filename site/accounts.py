"""Sign up, log in, log out — for shoppers and hosts (a host can shop too)."""

from __future__ import annotations

import logging
import math
import re
import time
from typing import TYPE_CHECKING
from urllib.parse import quote

from starlette.requests import Request
from starlette.routing import Route

from watchbuy.db import queries
from watchbuy.logs import LogLimiter
from watchbuy.site import chat, security
from watchbuy.site.passwords import password_problem
from watchbuy.site.state import state
from watchbuy.site.web import read_form, redirect, render, safe_next

if TYPE_CHECKING:
    from watchbuy.db.database import Database
    from watchbuy.site.config import SiteSettings

log = logging.getLogger("watchbuy.site.accounts")
throttled = LogLimiter(log, interval=10.0)

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
                         is_admin: bool = False, password_hash: str | None = None) -> int:
    """A user (and, for hosts, their live room); used by sign-up and by the seeding of demos.

    Sign-up passes ``password_hash``, made in a worker thread; the demo seeding (one account, at
    start-up) may let it be hashed here.
    """
    if password_hash is None:
        password_hash = security.hash_password(password)
    user_id = await queries.create_user(db, email, display_name, password_hash, is_host,
                                        is_admin)
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


def validate_signup(form, min_password: int = 10) -> tuple[dict, list[str]]:
    values = {
        "email": (form.get("email") or "").strip(),
        # invisible characters could make a name pass for another one
        "display_name": " ".join(chat.strip_invisible(form.get("display_name") or "").split()),
        "password": form.get("password") or "",
        "is_host": form.get("account_type") == "host",
    }
    errors = []
    if not EMAIL_RE.match(values["email"]) or len(values["email"]) > 254:
        errors.append("Enter a valid email address.")
    if not 2 <= len(values["display_name"]) <= 60:
        errors.append("Your name must be 2 to 60 characters.")
    elif (word := chat.reserved_word(values["display_name"])) is not None:
        errors.append(f"Your name cannot contain \u201c{word}\u201d: chat shows who the host "
                      "is by itself.")
    problem = password_problem(values["password"], values["email"], min_password)
    if problem:
        errors.append(problem)
    return values, errors


def client_address(request: Request) -> str:
    # The HTTP layer puts the real client here (X-Forwarded-For only from trusted proxies).
    return request.client.host if request.client else "?"


def wait_text(seconds: float) -> str:
    if seconds < 90:
        count = max(1, math.ceil(seconds))
        return f"{count} second{'s' if count != 1 else ''}"
    count = math.ceil(seconds / 60)
    return f"{count} minutes"


async def take_budget(db, key: str, limit: int, window: float) -> tuple[int | None, float]:
    """Records one use of ``key``'s budget first, then counts (so concurrent requests see each
    other): (the record's id, 0) when within ``limit`` per ``window``, else (None, seconds until
    the oldest use leaves the window) with the record taken back."""
    attempt_id = await queries.record_login_attempt(db, key)
    count, oldest, _latest = await queries.login_attempt_window(db, key, window, attempt_id)
    if count <= limit:
        return attempt_id, 0.0
    await queries.forget_login_attempt(db, attempt_id)
    return None, max(1.0, (oldest or time.time()) + window - time.time())


SIGNED_UP_NOTICE = ("If this email was new here, your account is ready: log in below. If it "
                    "already had an account, log in with that account's password.")


async def signup_page(request: Request):
    settings = state(request)["settings"]
    if request.method != "POST":
        # "Start selling live" asks for a host account (?host=1); a sign-up begun in a room
        # carries where to go back to (?next=/room/<slug>?add=<id>), through the log-in.
        account_type = "host" if request.query_params.get("host") == "1" else "shopper"
        return render(request, "signup.html", values={"account_type": account_type}, errors=[],
                      min_password=settings.password_min_length,
                      next_url=safe_next(request.query_params.get("next")))
    form = await read_form(request)
    values, errors = validate_signup(form, settings.password_min_length)
    db = state(request)["db"]
    shown = {**values, "account_type": "host" if values["is_host"] else "shopper"}
    shown.pop("password")
    next_url = safe_next(form.get("next"))
    if errors:
        return render(request, "signup.html", status_code=400, values=shown, errors=errors,
                      min_password=settings.password_min_length, next_url=next_url)
    address = client_address(request)
    used, wait = await take_budget(db, f"signup:{address}", settings.signup_per_ip,
                                   settings.signup_window)
    if used is None:
        throttled.warning("signup-ip", "sign-up refused: address %s made %d sign-ups within "
                          "%g s", address, settings.signup_per_ip, settings.signup_window)
        return render(request, "signup.html", status_code=429, values=shown,
                      min_password=settings.password_min_length, next_url=next_url,
                      errors=[f"Too many sign-ups from your network. Try again in "
                              f"{wait_text(wait)}."])
    # Hash first, whether or not the email is taken: both answers cost the same time.
    password_hash = await state(request)["password_workers"].hash(values["password"])
    if await queries.user_by_email(db, values["email"]) is None:
        try:
            await create_account(db, values["email"], values["display_name"], "",
                                 values["is_host"], password_hash=password_hash)
        except Exception:
            # the unique email refused it: a concurrent sign-up took the email (same answer);
            # anything else is a real error
            if await queries.user_by_email(db, values["email"]) is None:
                raise
    # The same answer for a new and a taken email, so that the form does not tell strangers who
    # has an account (no email is sent to say it privately).  The new user logs in once.
    if next_url == "/":
        next_url = "/studio" if values["is_host"] else "/"
    return redirect(f"/login?signed_up=1&next={quote(next_url)}")


async def login_response(request: Request, user_id: int, next_url: str):
    site = state(request)
    settings = site["settings"]
    token = await security.start_session(site["db"], user_id, settings.session_days)
    response = redirect(next_url)
    response.raw_headers.append((b"set-cookie", security.cookie_header(
        security.SESSION_COOKIE, token, int(settings.session_days * 86400),
        settings.cookie_secure)))
    return response


def backoff_wait(settings, failures: int, free: int, latest: float | None) -> float:
    """Seconds still to wait: after ``free`` failures each further try waits twice as long as
    the one before (from the latest try), up to ``login_backoff_max``."""
    if failures <= free or latest is None:
        return 0.0
    delay = min(settings.login_backoff_base * 2 ** (failures - free - 1),
                settings.login_backoff_max)
    return max(0.0, latest + delay - time.time())


async def login_page(request: Request):
    next_url = safe_next(request.query_params.get("next"))
    notice = SIGNED_UP_NOTICE if request.query_params.get("signed_up") else None
    if request.method != "POST":
        return render(request, "login.html", email="", next_url=next_url, error=None,
                      notice=notice)
    form = await read_form(request)
    email = (form.get("email") or "").strip().lower()[:254]
    password = (form.get("password") or "")[:1024]
    next_url = safe_next(form.get("next"))
    db = state(request)["db"]
    settings = state(request)["settings"]
    address = client_address(request)

    def refuse(message: str):
        return render(request, "login.html", status_code=429, email=email, next_url=next_url,
                      error=message, notice=None)

    # 1. The address's budget: password spraying across many emails from one address.
    ip_attempt, wait = await take_budget(db, f"ip:{address}", settings.login_per_ip,
                                         settings.login_window)
    if ip_attempt is None:
        throttled.warning("login-ip", "login refused: address %s failed %d logins within %g s",
                          address, settings.login_per_ip, settings.login_window)
        return refuse(f"Too many attempts from your network. Wait {wait_text(wait)}, then "
                      "try again.")
    # 2. The account's backoff, recorded first and counted after so that concurrent guesses
    # see each other.  Per account and address, the free failures are few; from all addresses
    # together they are more, so one address (a stranger) cannot keep an account locked for
    # everyone else, while a spread-out attack still slows down.
    pair_key, account_key = f"{email}|{address}", f"acct:{email}"
    pair_attempt = await queries.record_login_attempt(db, pair_key)
    account_attempt = await queries.record_login_attempt(db, account_key)
    pair = await queries.login_attempt_window(db, pair_key, settings.login_window, pair_attempt)
    account = await queries.login_attempt_window(db, account_key, settings.login_window,
                                                 account_attempt)
    wait = max(backoff_wait(settings, pair[0], settings.login_attempts, pair[2]),
               backoff_wait(settings, account[0], settings.login_account_attempts, account[2]))
    if wait > 0:
        await queries.forget_login_attempt(db, ip_attempt, pair_attempt, account_attempt)
        throttled.warning("login-account", "login refused: backoff on an account (%d failures "
                          "from %s, %d in all)", pair[0] - 1, address, account[0] - 1)
        return refuse(f"Too many failed attempts for this account. Wait {wait_text(wait)}, "
                      "then try again.")
    workers = state(request)["password_workers"]
    user = await queries.user_by_email(db, email)
    if user is None:
        await workers.verify_nobody(password)  # the same time as a wrong password
        ok = False
    else:
        ok = await workers.verify(user["password_hash"], password)
    if not ok:
        return render(request, "login.html", status_code=400, email=email, next_url=next_url,
                      error="That email and password do not match an account.", notice=None)
    await queries.forget_login_attempt(db, ip_attempt)
    await queries.clear_login_attempts(db, pair_key, account_key)
    if security.needs_rehash(user["password_hash"]):
        await queries.set_password_hash(db, user["id"], await workers.hash(password))
    return await login_response(request, user["id"], next_url)


async def logout(request: Request):
    token = request.state.session_token
    if token:
        site = state(request)
        hashed = security.session_hash(token)
        await queries.revoke_session(site["db"], hashed)
        # Ended here at once, whatever the broker does (after the commit: a lookup that read
        # the session before it is refused its put); then in every other process, with the
        # room sockets opened with this session.
        sessions = site.get("sessions")
        if sessions is not None:
            sessions.changed(hashed)
        await chat.publish_session_ended(site["broker"], hashed)
    response = redirect("/")
    response.raw_headers.append((b"set-cookie", security.cookie_header(
        security.SESSION_COOKIE, "", 0, state(request)["settings"].cookie_secure)))
    return response



async def prune(db, settings) -> tuple[int, int]:
    """Delete sessions that ended and login/sign-up attempts no window counts any more;
    returns (sessions, attempts) deleted."""
    sessions = await queries.prune_sessions(db)
    attempts = await queries.prune_login_attempts(
        db, max(settings.login_window, settings.signup_window))
    return sessions, attempts


async def prune_and_log(db: Database, settings: SiteSettings) -> None:
    """One round of :func:`prune` (the app's upkeep runs it every ``prune_interval``)."""
    sessions, attempts = await prune(db, settings)
    if sessions or attempts:
        log.info("pruned %d ended sessions, %d old login attempts", sessions, attempts)


routes = [
    Route("/signup", signup_page, methods=["GET", "POST"]),
    Route("/login", login_page, methods=["GET", "POST"]),
    Route("/logout", logout, methods=["POST"]),
]
