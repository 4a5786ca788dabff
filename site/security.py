"""Accounts' security: password hashing, server-side sessions, CSRF tokens.

* Passwords: argon2id (memory-hard), rehashed on login when the parameters change.
* Sessions: a random cookie value; the database keeps only its SHA-256, an expiry date and a
  revoked flag, so logout really ends a session.  Cookies are HttpOnly and SameSite=Lax.
* CSRF: every visitor carries a random ``wb_csrf`` cookie; forms and fetches send
  HMAC(secret, that cookie) back.  A page on another origin can neither read the cookie nor
  compute the token.  The middleware checks every state-changing request, so no handler can
  forget to.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from http.cookies import SimpleCookie

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from watchbuy.db import queries
from watchbuy.db.database import Database

SESSION_COOKIE = "wb_session"
CSRF_COOKIE = "wb_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}

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


def csrf_token_for(secret: str, csrf_cookie: str) -> str:
    return hmac.new(secret.encode(), b"csrf:" + csrf_cookie.encode(), hashlib.sha256).hexdigest()


def cookie_header(name: str, value: str, max_age: int | None, secure: bool) -> bytes:
    parts = [f"{name}={value}", "Path=/", "HttpOnly", "SameSite=Lax"]
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


class AuthMiddleware:
    """Pure ASGI: puts ``user``, ``session_token`` and ``csrf_token`` in the request state and
    refuses state-changing requests without a valid CSRF token (403)."""

    def __init__(self, app, db: Database, secret: str, secure_cookies: bool = False,
                 max_body: int = 8 * 1024 * 1024) -> None:
        self.app = app
        self.max_body = max_body
        self.db = db
        self.secret = secret
        self.secure = secure_cookies

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        cookies = {}
        for name, value in scope.get("headers", ()):
            if name == b"cookie":
                jar = SimpleCookie()
                try:
                    jar.load(value.decode("latin-1"))
                except Exception:  # a malformed cookie header is as good as none
                    continue
                cookies.update({key: morsel.value for key, morsel in jar.items()})
        state = scope.setdefault("state", {})
        state["user"] = None
        state["session_token"] = None
        token = cookies.get(SESSION_COOKIE)
        if token:
            found = await queries.session_user(self.db, session_hash(token))
            if found is not None:
                state["user"] = found[1]
                state["session_token"] = token
        csrf_cookie = cookies.get(CSRF_COOKIE, "")
        new_csrf_cookie = None
        if len(csrf_cookie) < 16:
            csrf_cookie = new_csrf_cookie = secrets.token_urlsafe(24)
        state["csrf_token"] = csrf_token_for(self.secret, csrf_cookie)
        state["csrf_cookie_is_new"] = new_csrf_cookie is not None

        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS and \
                not self._exempt(scope["path"]):
            receive = await self._check_csrf(scope, receive, send, state["csrf_token"],
                                             new_csrf_cookie is not None)
            if receive is None:
                return
        elif scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            receive = self._bounded(receive, send)

        if new_csrf_cookie is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"set-cookie",
                                cookie_header(CSRF_COOKIE, new_csrf_cookie, None, self.secure)))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    def _bounded(self, receive, send):
        """``receive`` for the CSRF-exempt machine endpoints, refusing bodies over the limit."""
        size = 0

        async def bounded():
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.max_body:
                    await _refuse(send, 413, b"Request body too large.")
                    return {"type": "http.disconnect"}
            return message

        return bounded

    @staticmethod
    def _exempt(path: str) -> bool:
        # Machine callers that prove themselves otherwise: Stripe signs its webhooks, the
        # media nodes sign their hook calls with HMAC.
        return path.startswith("/webhooks/") or path.startswith("/hooks/")

    async def _check_csrf(self, scope, receive, send, expected: str, cookie_missing: bool):
        """Reads the body (bounded by the app's own limits later) and checks the token.

        Returns a ``receive`` that replays the body for the app, or None after refusing.
        """
        sent = ""
        for name, value in scope.get("headers", ()):
            if name == CSRF_HEADER.encode():
                sent = value.decode("latin-1")
        body_parts = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body_parts.append(message.get("body", b""))
            size += len(body_parts[-1])
            if size > self.max_body:
                await _refuse(send, 413, b"That upload is too large.")
                return None
            more = message.get("more_body", False)
        body = b"".join(body_parts)
        if not sent:
            sent = _form_field(scope, body, CSRF_FIELD)
        if cookie_missing or not sent or not hmac.compare_digest(sent, expected):
            await _refuse(send)
            return None
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


def _form_field(scope, body: bytes, field: str) -> str:
    content_type = ""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            content_type = value.decode("latin-1").lower()
    if content_type.startswith("application/x-www-form-urlencoded"):
        from urllib.parse import parse_qs

        values = parse_qs(body.decode("utf-8", "replace")).get(field)
        return values[0] if values else ""
    if content_type.startswith("multipart/form-data"):
        # The token field comes first in our forms; find it without parsing the files.
        marker = f'name="{field}"'.encode()
        index = body.find(marker)
        if index < 0:
            return ""
        start = body.find(b"\r\n\r\n", index)
        end = body.find(b"\r\n", start + 4)
        if start < 0 or end < 0:
            return ""
        return body[start + 4 : end].decode("latin-1").strip()
    return ""


async def _refuse(send, status: int = 403, text: bytes = b"") -> None:
    text = text or (b"This form has expired or did not come from this site. "
                    b"Go back, reload the page and try again.")
    body = b"<!doctype html><title>Refused</title><p>" + text + b"</p>"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/html; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
