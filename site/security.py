"""Accounts' security: password hashing, server-side sessions, CSRF tokens, HTTP limits.

* Passwords: argon2id (memory-hard), rehashed on login when the parameters change.
* Sessions: a random cookie value; the database keeps only its SHA-256, an expiry date and a
  revoked flag, so logout really ends a session.  Cookies are HttpOnly and SameSite=Lax, and on
  https Secure with the ``__Host-`` prefix (:func:`cookie_name`).
* CSRF: every visitor carries a random ``wb_csrf`` cookie; forms and fetches send
  HMAC(secret, that cookie + the session's hash) back.  A page on another origin can neither
  read the cookie nor compute the token, and a token seen in one session is worthless in
  another; logging in or out rotates the cookie.  The middleware checks every
  state-changing request, so no handler can forget to, and it checks the token before the
  body is buffered: from the X-CSRF-Token header, or from the form's first field
  (:class:`CsrfFieldScanner`), reading at most ``csrf_scan_bytes`` of the body for it.
* Bodies: none on GET/HEAD/OPTIONS (Starlette routes HEAD to GET handlers); every other body is
  bounded (``max_body_bytes``, multipart ``max_upload_bytes``) and must arrive within
  ``body_timeout``.
* Responses: CSP and the other security headers on every page, ``private, no-store`` on
  anything personal, no cookie on static files.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus, urlsplit

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import cookie_parser
from starlette.responses import HTMLResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from watchbuy.db import queries
from watchbuy.db.database import Database
from watchbuy.logs import LogLimiter
from watchbuy.site.followed import FollowedCache
from watchbuy.site.state import state_of

if TYPE_CHECKING:
    from watchbuy.site.broker import Broker
    from watchbuy.site.config import SiteSettings

SESSION_COOKIE = "wb_session"
CSRF_COOKIE = "wb_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}

log = logging.getLogger("watchbuy.site.security")

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    return _hasher.check_needs_rehash(password_hash)


def session_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same_secret(sent: str, expected: str) -> bool:
    """Constant-time comparison of a token a peer sent with ours.  As bytes: compare_digest
    raises TypeError on a str with non-ASCII characters, which any peer can send."""
    return hmac.compare_digest(sent.encode("utf-8", "replace"), expected.encode())


def csrf_token_for(secret: str, csrf_cookie: str, session_token: str = "") -> str:
    """The token forms and fetches send back.  With a session it is bound to that session too
    (through the session's hash, never the cookie itself), so a token leaked from one session
    is refused in another even when the attacker also plants the csrf cookie."""
    message = b"csrf:" + csrf_cookie.encode()
    if session_token:
        message += b":" + session_hash(session_token).encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def cookie_name(name: str, secure: bool) -> str:
    """The cookie's name on the wire: ``__Host-`` on https, where browsers then insist on
    Secure, Path=/ and no Domain (a sibling subdomain cannot plant or overwrite it); the plain
    name on http, where browsers would refuse the prefix."""
    return f"__Host-{name}" if secure else name


def cookie_header(name: str, value: str, max_age: int | None, secure: bool) -> bytes:
    parts = [f"{cookie_name(name, secure)}={value}", "Path=/", "HttpOnly", "SameSite=Lax"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts).encode()


async def start_session(db: Database, user_id: int, days: float) -> str:
    """A new session for ``user_id``; returns the cookie value."""
    token = secrets.token_urlsafe(32)
    await queries.create_session(db, session_hash(token), user_id, secrets.token_hex(16),
                                 days * 86400)
    return token



limited_log = LogLimiter(log, interval=10.0)


class SessionCache(FollowedCache):
    """Sessions found by :class:`AuthMiddleware`, kept in this process for at most ``seconds``
    (``WATCHBUY_SESSION_CACHE_SECONDS``, at most 2), so a logged-in visitor's burst of requests
    (a page, its fetches, a checkout rush) reads the session once instead of per request.

    Logout must still end a session at once: each kept session goes the moment its
    ``session_revoked`` event arrives on the broker's sessions topic (logout publishes it,
    :func:`chat.publish_session_ended`), in every process.  Nothing is kept while that
    subscription is not live, and a lookup is kept only when no revocation of its session
    arrived while it read the database (:meth:`mark` / :meth:`put`, site/followed.py), so a
    revocation can never be missed in between.  What may be stale for ``seconds`` is the user's
    own row (a name, the host flag) and an expiry passing: both are checked again on the next
    lookup, and the expiry is checked on every hit too."""

    def __init__(self, broker: Broker, seconds: float, max_entries: int = 10000) -> None:
        from watchbuy.site.chat import SESSIONS_TOPIC  # chat imports this module

        super().__init__(broker, SESSIONS_TOPIC, seconds, max_entries, "session cache")

    def get(self, session_hash: str) -> tuple[dict, dict] | None:
        """(session, user) as :func:`queries.session_user` gave them, or None."""
        found = super().get(session_hash)
        if found is None:
            return None
        row, user = found
        return dict(row), dict(user)  # copies: a handler may change what it was given

    def put(self, session_hash: str, found: tuple[dict, dict], mark: int) -> bool:
        return super().put(session_hash, session_hash, (dict(found[0]), dict(found[1])), mark)

    def _holds(self, value: tuple[dict, dict]) -> bool:
        return value[0]["expires_at"] > time.time()

    def _apply(self, message: dict) -> None:
        if message.get("type") == "session_revoked":
            self.changed(str(message.get("session")))


class BodyRefused(Exception):
    """Raised from ``receive`` when a request body breaks a limit; the middleware answers."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class CsrfFieldScanner:
    """Finds the ``csrf_token`` field at the start of a form body, fed chunk by chunk.

    ``feed(bytes)`` returns the token once its field is complete, ``""`` when it is not within
    the first ``limit`` bytes (our forms put it first, so it is absent), ``None`` while more
    body is needed; ``finish()`` says the same at the end of the body.  Only the prefix is kept,
    so checking a large upload costs ``limit`` bytes, not the upload.
    """

    def __init__(self, content_type: str, field: str = CSRF_FIELD, limit: int = 65536) -> None:
        self.multipart = content_type.startswith("multipart/form-data")
        self.field = field
        self.limit = limit
        self.buffer = bytearray()
        self.result: str | None = None

    def feed(self, data: bytes) -> str | None:
        if self.result is not None:
            return self.result
        self.buffer += data[: self.limit + 1 - len(self.buffer)]
        self.result = self._search(final=False)
        if self.result is None and len(self.buffer) > self.limit:
            self.result = ""
        return self.result

    def finish(self) -> str:
        if self.result is None:
            self.result = self._search(final=True) or ""
        return self.result

    def _search(self, final: bool) -> str | None:
        if self.multipart:
            marker = self.buffer.find(f'name="{self.field}"'.encode())
            if marker < 0:
                return None
            start = self.buffer.find(b"\r\n\r\n", marker)
            end = self.buffer.find(b"\r\n", start + 4) if start >= 0 else -1
            if end < 0:
                return None
            return self.buffer[start + 4 : end].decode("latin-1").strip()
        # urlencoded: only fields followed by "&" are complete, unless the body has ended
        fields = bytes(self.buffer).split(b"&")
        if not final:
            fields.pop()
        for item in fields:
            name, _, value = item.partition(b"=")
            if unquote_plus(name.decode("latin-1")) == self.field:
                return unquote_plus(value.decode("latin-1"))
        return None


STATIC_PREFIXES = ("/static/", "/uploads/")


def _is_static(path: str) -> bool:
    # Files the same for everyone: no session lookup, no cookie, cacheable by a CDN.
    return path.startswith(STATIC_PREFIXES)


def content_security_policy(public_url: str, media_origins: list[str],
                            image_origins: list[str]) -> str:
    """The pages' CSP.  No inline script or style anywhere (the room's data block is
    ``type="application/json"``, which never executes); the player fetches HTTP-FLV from the
    media nodes' origins and feeds MediaSource through blob: URLs; chat is a websocket to
    this host."""
    netloc = urlsplit(public_url).netloc
    ws = ("wss://" if public_url.startswith("https://") else "ws://") + netloc if netloc else ""
    media = " ".join(dict.fromkeys(media_origins))
    return "; ".join([
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src " + " ".join(["'self'", "data:", "blob:", *image_origins]),
        f"media-src 'self' blob: {media}".rstrip(),
        f"connect-src 'self' {ws} {media}".rstrip(),
        "worker-src 'self' blob:",
        "object-src 'none'",
        "base-uri 'self'",
        "frame-ancestors 'none'",
    ])


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


# Session lookups that miss the cache, at once per process.  A crowd arriving together (the
# rush: 3000 presses in a second) would otherwise queue thousands of lookups for the database
# pool's 20 connections, and every request already past its lookup (a buyer's order
# transaction) would wait behind all of them for each statement: measured on MariaDB, p99 of
# the rush 2.07 s -> 1.21 s and 0.77 -> 0.63 ms of CPU per answer with the lane.
SESSION_LOOKUPS_IN_FLIGHT = 8


class AuthMiddleware:
    """Pure ASGI, in front of every route: bounds request bodies, refuses state-changing
    requests without a valid CSRF token (403), puts ``user``, ``session_token`` and
    ``csrf_token`` in the request state and adds the security headers, Cache-Control and the
    csrf cookie to responses.

    One middleware on purpose: the body limits must hold before the CSRF check reads the body,
    and the cookie/cache decisions need the session found on the way in.  It reads headers with
    Starlette's ``Headers`` and answers refusals with a ``Response``, as Starlette's own
    middleware do; only the body is handled at the ASGI level, because it must be checked as
    it arrives, not after it was buffered.
    """

    def __init__(self, app: ASGIApp, settings: SiteSettings,
                 media_origins: Sequence[str] = ()) -> None:
        self.app = app
        self.settings = settings
        self.secret = settings.secret_key
        self.secure = settings.cookie_secure
        self.session_cookie = cookie_name(SESSION_COOKIE, self.secure)
        self.csrf_cookie = cookie_name(CSRF_COOKIE, self.secure)
        self.media_origins = list(media_origins)
        self.session_lane = asyncio.Semaphore(SESSION_LOOKUPS_IN_FLIGHT)
        image_origins = [f"https://{settings.s3_bucket}.s3.amazonaws.com"] \
            if settings.s3_bucket else []
        self.image_origins = image_origins
        self.csp = content_security_policy(settings.public_url, self.media_origins,
                                           image_origins)
        self.static_headers = [
            ("x-content-type-options", "nosniff"),
            ("referrer-policy", "strict-origin-when-cross-origin"),
        ]
        self.page_headers = [
            ("content-security-policy", self.csp),
            ("x-frame-options", "DENY"),
            ("permissions-policy", "camera=(), microphone=(), geolocation=()"),
            *self.static_headers,
        ]
        if settings.https and settings.hsts_seconds:
            # Not includeSubDomains: media nodes may serve HTTP-FLV over plain http from a
            # subdomain, which browsers would then refuse to reach.
            hsts = ("strict-transport-security", f"max-age={settings.hsts_seconds}")
            self.static_headers.append(hsts)
            self.page_headers.append(hsts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = scope["path"]
        static = _is_static(path)
        state = scope.setdefault("state", {})
        state["user"] = None
        state["session_token"] = None
        cookies = {} if static else _cookies(headers.getlist("cookie"))
        token = cookies.get(self.session_cookie)
        if token:
            site = state_of(scope)
            hashed = session_hash(token)
            cache: SessionCache | None = site.get("sessions")
            found = cache.get(hashed) if cache is not None else None
            if found is None:
                mark = cache.mark() if cache is not None else 0
                async with self.session_lane:
                    found = await queries.session_user(site["db"], hashed)
                if found is not None and cache is not None:
                    cache.put(hashed, found, mark)
            if found is not None:
                state["user"] = found[1]
                state["session_token"] = token
        csrf_cookie = cookies.get(self.csrf_cookie, "")
        cookie_missing = len(csrf_cookie) < 16
        if cookie_missing:
            csrf_cookie = secrets.token_urlsafe(24)
        state["csrf_token"] = csrf_token_for(self.secret, csrf_cookie, state["session_token"] or "")
        state["csrf_cookie_is_new"] = cookie_missing
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def send_wrapped(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self._response_headers(scope, MutableHeaders(scope=message), static,
                                       csrf_cookie if cookie_missing else None)
            await send(message)

        try:
            receive = await self._check_request(scope, headers, receive, send_wrapped,
                                                state["csrf_token"], cookie_missing)
            if receive is None:
                return
            await self.app(scope, receive, send_wrapped)
        except BodyRefused as refused:
            limited_log.warning(f"body-{refused.status}", "refused %s %s from %s: %s",
                                scope["method"], path, _client(scope), refused.text)
            if not started:
                await refusal(refused.status, refused.text)(scope, receive, send_wrapped)

    async def _check_request(self, scope: Scope, headers: Headers, receive: Receive,
                             send: Send, expected: str, cookie_missing: bool) -> Receive | None:
        """A ``receive`` fit for the app, or None after refusing the request."""
        method = scope["method"]
        length = _last(headers, "content-length")
        chunked = "transfer-encoding" in headers
        if method in SAFE_METHODS:
            # Starlette answers HEAD with the GET route, and handlers that branch on
            # ``method == "GET"`` would parse a HEAD body as a POST form, past the CSRF check.
            if chunked or length.strip() not in ("", "0"):
                limited_log.warning("body-on-safe", "refused %s %s from %s: a body on %s",
                                    method, scope["path"], _client(scope), method)
                await refusal(400, f"{method} requests carry no body.")(scope, receive, send)
                return None
            return _no_body(receive)
        content_type = _last(headers, "content-type").lower()
        multipart = content_type.startswith("multipart/form-data")
        limit = self.settings.max_upload_bytes if multipart else self.settings.max_body_bytes
        too_large = "That upload is too large." if multipart else "That request is too large."
        if length.strip().isdigit() and int(length) > limit:
            raise BodyRefused(413, too_large)
        receive = _guarded(receive, limit, self.settings.body_timeout, too_large)
        if _exempt(scope["path"]):
            return receive
        sent = _last(headers, CSRF_HEADER)
        if sent:
            # The token travels in the header: check it and stream the body through untouched.
            if cookie_missing or not same_secret(sent, expected):
                await refusal()(scope, receive, send)
                return None
            return receive
        if not (multipart or content_type.startswith("application/x-www-form-urlencoded")):
            await refusal()(scope, receive, send)
            return None
        scanner = CsrfFieldScanner(content_type, CSRF_FIELD, self.settings.csrf_scan_bytes)
        prefix: list[Message] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            prefix.append(message)
            found = scanner.feed(message.get("body", b""))
            if found is None and not message.get("more_body", False):
                found = scanner.finish()
            if found is not None:
                break
        del scanner  # the prefix lives on only in the messages replayed below
        if cookie_missing or not found or not same_secret(found, expected):
            await refusal()(scope, receive, send)
            return None

        async def replay() -> Message:
            if prefix:
                return prefix.pop(0)
            return await receive()

        return replay

    def _response_headers(self, scope: Scope, headers: MutableHeaders, static: bool,
                          new_csrf_cookie: str | None) -> None:
        if not static:
            session_prefix = self.session_cookie + "="
            if any(value.startswith(session_prefix) for value in headers.getlist("set-cookie")):
                # Log-in and log-out change the session: a new csrf cookie too, so a token
                # seen before (by anyone) is worthless after.
                new_csrf_cookie = secrets.token_urlsafe(24)
            visitor_cookie = scope["state"].get("visitor_cookie")
            if visitor_cookie is not None:  # a write of the shopper's (pagecache.visitor_changed)
                headers.append("set-cookie", visitor_cookie.decode("latin-1"))
            if new_csrf_cookie is not None:
                headers.append("set-cookie", cookie_header(
                    CSRF_COOKIE, new_csrf_cookie, None, self.secure).decode("latin-1"))
            personal = scope["state"].get("user") is not None or "set-cookie" in headers
            if personal and "no-store" not in ",".join(headers.getlist("cache-control")):
                # Pages for a logged-in user (the studio shows the stream key) and anything
                # that sets a cookie must never be kept by a shared cache or the back button.
                del headers["cache-control"]
                headers["cache-control"] = "private, no-store"
        for name, value in self.static_headers if static else self._page_headers(scope):
            headers.setdefault(name, value)  # a header the response set itself wins

    def _page_headers(self, scope: Scope) -> list[tuple[str, str]]:
        origin = scope["state"].get("csp_media_origin")
        if not origin or origin in self.media_origins:
            return self.page_headers
        # A room playing from a node outside the configured list (a balancer node): allow
        # exactly that node's origin on this page.
        csp = content_security_policy(self.settings.public_url, [*self.media_origins, origin],
                                      self.image_origins)
        return [("content-security-policy", csp), *self.page_headers[1:]]


def _last(headers: Headers, name: str) -> str:
    # The last of repeated headers, as before; "" when absent.
    values = headers.getlist(name)
    return values[-1] if values else ""


def _cookies(values: list[str]) -> dict[str, str]:
    # Starlette's parser, as ``request.cookies`` in the handlers: both see the same cookies
    # (and it costs a fraction of SimpleCookie's regular expressions on every request).
    cookies: dict[str, str] = {}
    for value in values:
        cookies.update(cookie_parser(value))
    return cookies


def _client(scope) -> str:
    client = scope.get("client")
    return client[0] if client else "?"


def _exempt(path: str) -> bool:
    # Machine callers that prove themselves otherwise: Stripe signs its webhooks, the
    # media nodes sign their hook calls with HMAC.
    return path.startswith("/webhooks/") or path.startswith("/hooks/")


def _no_body(receive):
    """GET/HEAD/OPTIONS: the app sees an empty body and nothing is ever read for it."""
    delivered = False

    async def empty():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return await receive()  # only ever a disconnect: there is no body to read

    return empty


def _guarded(receive, limit: int, timeout: float, too_large: str):
    """``receive`` that raises :class:`BodyRefused` past ``limit`` bytes or when the whole body
    has not arrived within ``timeout`` seconds (a trickled body holds a connection and memory
    open as long as the client likes otherwise).  After the body, it passes through (Starlette
    keeps calling receive() to notice disconnects)."""
    size = 0
    done = False
    deadline = time.monotonic() + timeout

    async def guarded():
        nonlocal size, done
        if done:
            return await receive()
        remaining = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(remaining, 0)):
                message = await receive()
        except TimeoutError:
            raise BodyRefused(408, "The request body did not arrive in time.") from None
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise BodyRefused(413, too_large)
            done = not message.get("more_body", False)
        else:
            done = True
        return message

    return guarded


def refusal(status: int = 403, text: str = "") -> Response:
    """The page a refused request gets (the connection then closes)."""
    text = text or ("This form has expired or did not come from this site. "
                    "Go back, reload the page and try again.")
    return HTMLResponse(f"<!doctype html><title>Refused</title><p>{text}</p>",
                        status_code=status, headers={"connection": "close"})
