"""Log lines a peer can cause at will, rate-limited: one class for the node, the site and the db.

A refused connection, an oversized request or a lock conflict can happen thousands of times a
second under attack or load; logging each would turn the attack into a disk and CPU problem of
its own.  :class:`LogLimiter` lets at most ``lines`` lines per ``interval`` seconds through for
each *key* (a kind of event), and the next line that goes out says how many were held back.
"""

from __future__ import annotations

import logging
import math
import time


class LogLimiter:
    """At most ``lines`` log lines per ``interval`` seconds per key; lines held back are counted
    in the next line of that key."""

    def __init__(self, logger: logging.Logger, interval: float = 5.0, lines: int = 1) -> None:
        self.logger = logger
        self.interval = interval
        self.lines = lines
        self._windows: dict[str, tuple[float, int]] = {}  # key -> (window start, lines used)
        self._held: dict[str, int] = {}

    def log(self, level: int, message: str, *args: object, key: str = "",
            extra: dict | None = None) -> bool:
        """Log unless this key used its lines in the current window; True when logged.
        ``extra``: record attributes (a connection's ``conn_id``)."""
        if not self.logger.isEnabledFor(level):
            return False
        now = time.monotonic()
        start, used = self._windows.get(key, (-math.inf, 0))
        if now - start >= self.interval:
            start, used = now, 0
        if used >= self.lines:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._windows[key] = (start, used + 1)
        held = self._held.pop(key, 0)
        if held:
            message += " (and %d more like it held back)"
            args = (*args, held)
        self.logger.log(level, message, *args, extra=extra)
        return True

    def reset(self) -> None:
        """Forget the lines logged so far (a test that counts lines starts afresh)."""
        self._windows.clear()
        self._held.clear()

    def warning(self, key: str, message: str, *args: object, extra: dict | None = None) -> bool:
        return self.log(logging.WARNING, message, *args, key=key, extra=extra)
