"""Which worker process holds a connection: for the tests of ``watchbuy site --workers N``
and ``watchbuy media --workers N``, whose workers share a port (SO_REUSEPORT)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (a supervisor's workers); none once it is gone."""
    found: set[int] = set()
    tasks = Path(f"/proc/{pid}/task")
    for task in tasks.iterdir() if tasks.exists() else ():
        with contextlib.suppress(OSError):
            found |= {int(child) for child in (task / "children").read_text().split()}
    return found


def connection_owner(server_port: int, client_port: int, pids: set[int]) -> int | None:
    """Which of ``pids`` holds the server side of the loopback connection from
    ``client_port`` (Linux: /proc/net/tcp gives the socket's inode, /proc/<pid>/fd its owner)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == server_port and \
                    int(remote.rsplit(":", 1)[1], 16) == client_port and fields[9] != "0":
                inode = fields[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
    return None
