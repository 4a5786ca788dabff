"""Shared benchmark fixtures: the recorded RTMP publish session, and a throughput summary.

Benchmarks that set ``benchmark.extra_info["bytes"]`` (bytes processed per round) get a line in
the "throughput" section printed after pytest-benchmark's table: MB/s at the best and median
round, and each benchmark's speed relative to the slowest one of its group, from the best
rounds (the minimum is the estimate least disturbed by other load on the machine).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import recording  # noqa: E402


@pytest.fixture(scope="session")
def recorded_rtmp() -> bytes:
    """Client→server bytes of a real ffmpeg publish (10 s of 720p30 H.264 + AAC), no handshake."""
    try:
        return recording.recorded_session()
    except recording.RecordingError as exc:
        pytest.skip(str(exc))


def _throughput_rows(config: pytest.Config) -> list[tuple[str, str, float, float]]:
    session = getattr(config, "_benchmarksession", None)
    rows = []
    for bench in getattr(session, "benchmarks", None) or []:
        size = bench.extra_info.get("bytes")
        if not size or not bench.stats or not bench.stats.min:
            continue
        rows.append(
            (bench.group or "", bench.name, size / bench.stats.min, size / bench.stats.median)
        )
    return rows


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    rows = _throughput_rows(config)
    if not rows:
        return
    slowest: dict[str, float] = {}
    for group, _, best, _ in rows:
        slowest[group] = min(slowest.get(group, best), best)
    terminalreporter.section("throughput (extra_info['bytes'] per round)")
    for group, name, best, median in sorted(rows):
        ratio = best / slowest[group]
        terminalreporter.write_line(
            f"{group[:60]:60} {name[:44]:44} best {best / 1e6:9.1f} MB/s  "
            f"median {median / 1e6:9.1f} MB/s  x{ratio:6.1f} (best)"
        )
