"""In-site notifications: a badge and a list in the header, delivered live, and email when
``WATCHBUY_SMTP_URL`` is set.  An upkeep job (:func:`prune`) deletes them after
``WATCHBUY_NOTIFICATION_RETENTION_DAYS``, with the reminders of shows that ended that long ago.

Notifications are rows of the ``notifications`` table (written in the transaction that decided
to send them: db/shows.py).  Once committed, each goes out on the broker's ``user:<id>`` topic,
so whichever site process holds the user's open page hears it; the page listens through
Server-Sent Events (``/notifications/events``), which reconnect by themselves.  Email is sent
with smtplib in a worker thread, after the response, never on the request's path: the site
runs without SMTP, and an unreachable mail server costs one log line, not a hook call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import smtplib
import time
from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from watchbuy.db import queries
from watchbuy.db import shows as show_queries
from watchbuy.logs import LogLimiter
from watchbuy.site.broker import BrokerUnavailable
from watchbuy.site.chat import Connections
from watchbuy.site.config import SiteSettings
from watchbuy.site.rooms import iso_utc
from watchbuy.site.security import session_hash
from watchbuy.site.state import SiteState, state
from watchbuy.site.web import read_form, redirect, render, require_user

log = logging.getLogger("watchbuy.site.notify")
limited = LogLimiter(log, interval=30.0)

# an open stream sends a comment this often: proxies keep it open, and a logged-out session
# is noticed within this long
KEEPALIVE = 15.0


def user_topic(user_id: int) -> str:
    return f"user:{user_id}"


def public_note(note: dict) -> dict:
    return {"id": note["id"], "kind": note["kind"], "text": note["text"], "url": note["url"],
            "created_at": note["created_at"]}


async def deliver(site: SiteState, notes: list[dict], subject: str) -> None:
    """Send stored notifications to their users' open pages, and by email when configured."""
    for note in notes:
        try:
            await site["broker"].publish(user_topic(note["user_id"]),
                                         {"type": "notification", "notification": public_note(note)})
        except BrokerUnavailable as exc:
            # stored all the same: the list and the badge show it on the next page
            limited.warning("broker", "notification %s not delivered live: %s", note["id"], exc)
    mailer = site.get("mailer")
    if mailer is not None and notes:
        addresses = await show_queries.emails(site["db"], [n["user_id"] for n in notes])
        mailer.send([(addresses[n["user_id"]], subject,
                      f"{n['text']}\n\n{site['settings'].public_url}{n['url']}\n")
                     for n in notes if n["user_id"] in addresses])


class Mailer:
    """Email through one SMTP server (``smtp://[user:password@]host:port``, or ``smtps://``),
    in a worker thread; one batch at a time, so a slow server cannot pile up threads."""

    def __init__(self, url: str, sender: str, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        self.ssl = parts.scheme == "smtps"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (465 if self.ssl else 25)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.sender = sender
        self.timeout = timeout
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    def send(self, messages: list[tuple[str, str, str]]) -> None:
        """Queue ``(to, subject, text)`` messages; returns at once."""
        task = asyncio.ensure_future(self._send(messages))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, messages: list[tuple[str, str, str]]) -> None:
        async with self._lock:
            try:
                await asyncio.to_thread(self._send_now, messages)
            except (OSError, smtplib.SMTPException) as exc:
                limited.warning("smtp", "email to %d users not sent (%s:%d): %s", len(messages),
                                self.host, self.port, exc)

    def _send_now(self, messages: list[tuple[str, str, str]]) -> None:
        cls = smtplib.SMTP_SSL if self.ssl else smtplib.SMTP
        with cls(self.host, self.port, timeout=self.timeout) as smtp:
            if self.username:
                smtp.login(self.username, self.password or "")
            unusable, last_error = 0, None
            for to, subject, text in messages:
                # one bad message (a line break in a subject or an address: EmailMessage
                # refuses it) must not cost the rest of the batch
                try:
                    message = EmailMessage()
                    message["From"], message["To"], message["Subject"] = self.sender, to, subject
                    message.set_content(text)
                except ValueError as exc:
                    unusable += 1
                    last_error = exc
                    continue
                smtp.send_message(message)
            if unusable:
                limited.warning("unusable", "%d of %d emails not sent: %s", unusable,
                                len(messages), last_error)

    async def drain(self) -> None:
        """Wait for the messages queued so far (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def make_mailer(settings: SiteSettings) -> Mailer | None:
    return Mailer(settings.smtp_url, settings.smtp_from) if settings.smtp_url else None


async def prune(site: SiteState) -> tuple[int, int]:
    """Delete notifications older than WATCHBUY_NOTIFICATION_RETENTION_DAYS, read or not, and
    the reminders of shows that ended that long ago (an upkeep job, site/app.py); how many of
    each.  Nothing is deleted when the retention is 0."""
    days = site["settings"].notification_retention_days
    if not days:
        return 0, 0
    cutoff = time.time() - days * 86400
    notes = await show_queries.prune_notifications(site["db"], cutoff)
    reminders = await show_queries.prune_reminders(site["db"], cutoff)
    if notes or reminders:
        log.info("pruned %d notifications and %d reminders older than %g days", notes,
                 reminders, days)
    return notes, reminders


async def notifications_page(request: Request):
    user = require_user(request)
    notes = await show_queries.user_notifications(state(request)["db"], user["id"])
    for note in notes:
        note["created_iso"] = iso_utc(note["created_at"])
    return render(request, "notifications.html", notes=notes)


async def mark_read(request: Request):
    user = require_user(request)
    await read_form(request)
    await show_queries.mark_read(state(request)["db"], user["id"])
    return redirect("/notifications")


async def notification_events(request: Request):
    """Server-Sent Events: the unread count first, then each new notification as it comes."""
    user = request.state.user
    if user is None:
        raise HTTPException(401, "Log in to get notifications.")
    site = state(request)
    address = request.client.host if request.client else "?"
    connections: Connections = site["notify_connections"]
    refused = connections.admit(site["settings"], address, user["id"])
    if refused:
        limited.warning("cap", "notification stream refused: %s", refused)
        raise HTTPException(429, "Too many open pages.")
    token = request.state.session_token
    db = site["db"]
    try:
        subscription = site["broker"].subscribe(user_topic(user["id"]), queue_size=64)
        await subscription.ready()
    except BrokerUnavailable as exc:
        connections.release(address, user["id"])
        limited.warning("broker", "notification stream unavailable: %s", exc)
        raise HTTPException(503, "Notifications are unavailable for a moment.") from None
    except BaseException:
        connections.release(address, user["id"])
        raise

    async def still_signed_in() -> bool:
        found = await queries.session_user(db, session_hash(token)) if token else None
        return found is not None and found[1]["id"] == user["id"]

    async def stream():
        try:
            count = await show_queries.unread_count(db, user["id"])
            # the browser reconnects after this many ms when the stream breaks
            yield f"retry: 3000\ndata: {json.dumps({'type': 'unread', 'count': count})}\n\n"
            while True:
                try:
                    message = await asyncio.wait_for(subscription.__anext__(), KEEPALIVE)
                except StopAsyncIteration:
                    return  # dropped for not reading, or the broker closed: the page reconnects
                except TimeoutError:
                    if await request.is_disconnected() or not await still_signed_in():
                        return
                    yield ": keepalive\n\n"
                    continue
                yield f"data: {message.json}\n\n"
        finally:
            await subscription.close()
            connections.release(address, user["id"])

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


routes = [
    Route("/notifications", notifications_page),
    Route("/notifications/read", mark_read, methods=["POST"]),
    Route("/notifications/events", notification_events),
]
