"""Which worker process holds a connection: for the tests of ``watchbuy site --workers N``
and ``watchbuy media --workers N``, whose workers share a port (SO_REUSEPORT)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from bench.common import connection_owner  # noqa: F401 - the bench steers connections too


def children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (a supervisor's workers); none once it is gone."""
    found: set[int] = set()
    tasks = Path(f"/proc/{pid}/task")
    for task in tasks.iterdir() if tasks.exists() else ():
        with contextlib.suppress(OSError):
            found |= {int(child) for child in (task / "children").read_text().split()}
    return found
