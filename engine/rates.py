"""Rates of growing counters over a short window of samples, answered from memory.

The media node samples its byte counters and each stream's counters once a second; the status
agent samples the kernel's interface and CPU counters once per interval.  Both keep the last few
samples here and take rates between the oldest and the newest, so a stats request costs no
waiting and no I/O.  This module imports nothing from the engine, so the agent can use it without
loading the codecs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping


class RateWindow:
    """The last ``size`` samples of named counters; each name maps to a tuple of cumulative
    counts (bytes in and out, say)."""

    def __init__(self, size: int = 6) -> None:
        self.samples: deque[tuple[float, Mapping[str, tuple[int, ...]]]] = \
            deque(maxlen=max(2, size))

    def add(self, at: float, counters: Mapping[str, tuple[int, ...]]) -> None:
        """One sample taken at ``at`` (monotonic seconds)."""
        self.samples.append((at, counters))

    def span(self) -> float:
        """Seconds between the oldest and the newest sample (0 until there are two)."""
        return self.samples[-1][0] - self.samples[0][0] if len(self.samples) >= 2 else 0.0

    def rates(self) -> dict[str, tuple[float, ...]]:
        """Per-second rates of each name's counters over the window.

        Zeros until two samples.  A name whose counters went backwards (a re-created interface,
        a restarted engine) or that the oldest sample lacks is left out until the old sample has
        left the window, rather than reported as a huge or negative rate.
        """
        if not self.samples:
            return {}
        span = self.span()
        first, last = self.samples[0][1], self.samples[-1][1]
        if span <= 0:
            return {name: (0.0,) * len(values) for name, values in last.items()}
        rates = {}
        for name, values in last.items():
            old = first.get(name)
            if old is None or any(b < a for a, b in zip(old, values, strict=True)):
                continue
            rates[name] = tuple((b - a) / span for a, b in zip(old, values, strict=True))
        return rates

    def rate(self, name: str, width: int) -> tuple[float, ...]:
        """The rates of ``name``'s ``width`` counters, zeros when there are none yet."""
        return self.rates().get(name, (0.0,) * width)

    def fraction(self, name: str) -> float:
        """How much of ``name``'s second counter's growth its first counter made, in 0..1 (busy
        of total CPU time, say); 0 until two samples."""
        if len(self.samples) < 2:
            return 0.0
        old = self.samples[0][1].get(name)
        new = self.samples[-1][1].get(name)
        if old is None or new is None:
            return 0.0
        part, whole = new[0] - old[0], new[1] - old[1]
        return min(1.0, max(0.0, part / whole)) if whole > 0 else 0.0
