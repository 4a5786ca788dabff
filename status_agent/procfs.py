"""The kernel's counters: per-interface bytes from /proc/net/dev, CPU time from /proc/stat.

Both files are tiny and cost microseconds to read, so the sampler reads them inline on the event
loop once per interval.  /proc/net/dev is per network namespace: an agent inside a namespace sees
that namespace's interfaces only.
"""

from __future__ import annotations

from pathlib import Path

LOOPBACK = "lo"


def parse_net_dev(text: str) -> dict[str, tuple[int, int]]:
    """``{interface: (rx_bytes, tx_bytes)}`` from the text of /proc/net/dev."""
    counters = {}
    for line in text.splitlines()[2:]:  # two header lines
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        fields = rest.split()
        if len(fields) < 9:
            continue
        # Receive: bytes packets errs drop fifo frame compressed multicast; then Transmit: bytes …
        counters[name.strip()] = (int(fields[0]), int(fields[8]))
    return counters


def parse_cpu(text: str) -> tuple[int, int]:
    """``(busy, total)`` jiffies of all CPUs from the text of /proc/stat."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:9]]  # user … steal; guests are inside user
            values += [0] * (8 - len(values))
            idle = values[3] + values[4]  # idle + iowait
            total = sum(values)
            return total - idle, total
    return 0, 0


class ProcReader:
    """Reads the counters; ``root`` is a folder laid out like /proc (tests pass their own)."""

    def __init__(self, root: str | Path = "/proc") -> None:
        self.net_dev = Path(root) / "net" / "dev"
        self.stat = Path(root) / "stat"

    def interfaces(self) -> dict[str, tuple[int, int]]:
        return parse_net_dev(self.net_dev.read_text())

    def cpu(self) -> tuple[int, int]:
        try:
            return parse_cpu(self.stat.read_text())
        except OSError:
            return 0, 0
