"""Shared by the one-tap buying tests (buy now, flash sales): the test card, a buy-now call,
and reading a room's broker topic with a deadline."""

from __future__ import annotations

import asyncio
import time

CARD = {"card": "4242 4242 4242 4242", "expiry": "12/99", "cvc": "123"}


async def buy(browser, product_id, **fields):
    """POST /api/buy-now as room.js sends it (JSON answer, the CSRF token in a header)."""
    return await browser.fetch("/api/buy-now", {"product_id": str(product_id), **fields})


async def next_events(subscription, wanted: set[str], also: frozenset[str] | set[str] = frozenset(),
                      timeout: float = 5.0) -> dict[str, dict]:
    """The first event of each type in ``wanted`` (and of ``also`` when one came first) from a
    broker subscription; fails instead of hanging when one of ``wanted`` does not come."""
    found: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while not wanted <= found.keys():
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {sorted(wanted - found.keys())} event within {timeout:g} s"
                                 f" (got {sorted(found)})")
        try:
            event = await asyncio.wait_for(subscription.__anext__(), left)
        except TimeoutError:
            continue
        kind = event.get("type")
        if kind in wanted | set(also) and kind not in found:
            found[kind] = dict(event)
    return found


async def events_for(subscription, seconds: float) -> list[dict]:
    """Every event the subscription delivers within ``seconds``."""
    events: list[dict] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            events.append(dict(await asyncio.wait_for(subscription.__anext__(), left)))
        except TimeoutError:
            break
    return events
