"""Background upkeep: jobs repeated every so often for the life of a site process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("watchbuy.site.upkeep")


async def repeat_until(stopping: asyncio.Event, every: float,
                       job: Callable[[], Awaitable[object]], what: str) -> None:
    """Run ``job`` now and then every ``every`` seconds until ``stopping`` is set.

    It stops between rounds, never inside one: cancelling a round in the middle of a query leaks
    a pooled MariaDB connection (``databases``), and the database's disconnect then waits for it
    forever (a short test or a quick restart hung at shutdown).  A failed round is logged and
    the next one comes as usual: a database restarting must not end the upkeep.
    """
    while not stopping.is_set():
        try:
            await job()
        except Exception:
            log.exception("%s failed", what)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), every)
