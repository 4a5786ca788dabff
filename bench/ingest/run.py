"""Ingest benchmark: how many ~600 kb/s RTMP publishers one server core takes before it falls behind.

Usage (from the repository root, with the project's virtualenv)::

    python -m bench.ingest --publishers 200            # one run per server at K=200
    python -m bench.ingest --sweep --json out.json     # K = 50, 100, 200, ... until one fails
    python -m bench.ingest --quick --json out.json     # CI's short pass: K=20, 4 s per server

``python bench/ingest/run.py ...`` works the same.  node-media-server must have been installed
with ``python -m bench.fanout --install-nms``; without it only WatchBuy runs.

One run: start the server pinned to one CPU (taskset, when there are two or more), then, pinned
to the other CPUs, a publisher process (:mod:`bench.ingest.publishers`: K RtmpClient publishers
replaying ``bench/work/ingest_600k.flv`` at real time, each its own stream) and a probe process
(one HTTP-FLV viewer on each of up to ``--probes`` streams spread over the K, timing every tag as
the fan-out harness does).  Over the window the server keeps up when:

- every publisher is still publishing (no refusal, no reset);
- no publisher has more than one second of media queued unsent in user space at the end (a server
  that stops reading fills the socket buffers, then this queue);
- every probe viewer received >= 90 % of the window's media, and its added latency over the last
  second of the window (arrival - timestamp - its minimum) is <= 500 ms: a server that parses
  more slowly than the publishers send falls further behind every second, and this shows it.

The publisher process must itself keep pace (at the end no publisher is more than 250 ms behind
its schedule), else the run says the load generator was the limit.  WatchBuy's own ``/api/streams``
(live streams and their ``bitrate_in``) is recorded next to these.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/ingest/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import harness  # noqa: E402
from bench.common import INGEST_FLV  # noqa: E402
from bench.fanout.load import viewer_plan  # noqa: E402
from bench.harness import (  # noqa: E402
    KEEP_UP,
    count_errors,
    cpu_figures,
    cpu_us_per_unit_s,
    media_received,
    merge_hist,
    note_server,
    percentile_from_hist,
    results_table,
    run_loads,
    side_by_side,
)

LADDER = (50, 100, 200, 400, 800, 1200, 1600, 2400, 3200, 4800, 6400)
MAX_END_LAG_MS = 500.0
PUBLISHER_BEHIND_MS = 250.0


def ingest_run(name: str, k: int, args, flv: Path, media: dict) -> dict:
    def body(run: harness.Run) -> None:
        server, row = run.server, run.row
        connect_at = time.monotonic() + 1.0
        connect_budget = min(20.0, max(3.0, k / 100))
        probes_at = connect_at + connect_budget + 0.5
        t_start = probes_at + 0.5 + args.warmup
        t_end = t_start + args.seconds
        nprobe = max(1, min(k, args.probes))
        sample = sorted({round(i * (k - 1) / max(1, nprobe - 1)) for i in range(nprobe)})
        pub_plan = {
            "host": "127.0.0.1",
            "port": server.rtmp_port,
            "flv": str(flv),
            "keys": [server.key(i) for i in range(k)],
            "connect_at": connect_at,
            "t_start": t_start,
            "t_end": t_end,
            "concurrency": 64,
        }
        probe_plan = viewer_plan(
            server, [server.play_path(i) for i in sample], len(sample), connect_at=probes_at,
            connect_spread=0.5, t_start=t_start, t_end=t_end,
        )
        jobs = [("bench.ingest.publishers", pub_plan), ("bench.fanout.load", probe_plan)]
        (pubs, probes), marks = run_loads(
            server, jobs, run.load_cpus, server.meter, t_start, t_end, api_path="/api/streams"
        )
        note_server(row, server)
        row.update(summarise(pubs, probes, marks, k, t_end - t_start, media))
        if args.raw:
            row["raw"] = {"publishers": pubs, "probes": probes}

    return harness.measured_run("ingest", name, "publishers", k, k, args, body)


def summarise(pubs: dict, probes: dict, marks: dict, k: int, window: float, media: dict) -> dict:
    rate = pubs["kbit_per_s"] * 1000 / 8  # payload bytes per second of one publisher
    rows = pubs["publishers"]
    errors = count_errors(p["error"] for p in rows)
    publishing = sum(1 for p in rows if not p["error"] and p["published_at"])
    behind = [p["behind_ms"] for p in rows if not p["error"] and p["published_at"]]
    queued = [p["queued_end"] for p in rows]
    backlog = sum(1 for q in queued if q > rate)
    fps = media["video_fps"]
    viewers = probes["viewers"]
    probe_ok = 0
    lags = []
    for v in viewers:
        got = media_received(v, fps, window)
        lag = v.get("end_lag_ms")
        if lag is not None:
            lags.append(lag)
        if got >= KEEP_UP and not v["closed_early"] and lag is not None and lag <= MAX_END_LAG_MS:
            probe_ok += 1
    hist = merge_hist([probes])
    figures = cpu_figures(marks, window)
    # the publisher process's own pace, not the server's: a publisher more than
    # PUBLISHER_BEHIND_MS behind its schedule at the end means the load was the limit
    worst_behind = max(behind) if behind else 0.0
    out = {
        "publishing": publishing,
        "publisher_errors": errors,
        "publisher_behind_ms_max": round(worst_behind, 1),
        "publisher_behind_ms_median": round(statistics.median(behind), 1) if behind else None,
        "publishers_with_backlog": backlog,
        "max_queued_kib": round(max(queued) / 1024, 1) if queued else 0,
        "probes": len(viewers),
        "probes_ok": probe_ok,
        "probe_latency_p50_ms": percentile_from_hist(hist, 0.50),
        "probe_latency_p99_ms": percentile_from_hist(hist, 0.99),
        "probe_end_lag_max_ms": max(lags) if lags else None,
        "cpu_us_per_publisher_s": cpu_us_per_unit_s(marks, k),
        "ingest_mbit_s_sent": round(sum(p["sent_window"] for p in rows) * 8 / window / 1e6, 1),
        "publisher_ticks_late": pubs["late_ticks"],
    }
    out.update(figures)
    out["load_saturated"] = out["load_saturated"] or worst_behind > PUBLISHER_BEHIND_MS
    api = marks.get("server_api")
    if api and "streams" in api:
        streams = api["streams"]
        out["server_streams_live"] = len(streams)
        out["server_bitrate_in_mbit_s"] = round(
            sum(s.get("bitrate_in", 0) for s in streams) / 1e6, 1
        )
        out["expected_bitrate_in_mbit_s"] = round(k * rate * 8 / 1e6, 1)
    out["sustained"] = (
        publishing == k and backlog == 0 and probe_ok == len(viewers) and bool(viewers)
    )
    return out


TABLE = results_table(
    "publishers",
    "K",
    (
        ("sustained", "keeps up", "{}"),
        ("publishing", "live", "{}"),
        ("probes_ok", "probes ok", "{}"),
        ("cpu_pct", "cpu%", "{:.1f}"),
        ("server_core_busy_pct", "core busy%", "{:.0f}"),
        ("cpu_us_per_publisher_s", "us/pub-s", "{:.1f}"),
        ("probe_latency_p50_ms", "p50 ms", "{:.1f}"),
        ("probe_latency_p99_ms", "p99 ms", "{:.1f}"),
        ("probe_end_lag_max_ms", "end lag ms", "{:.0f}"),
    ),
    width=7,
    saturated="load generator was the limit",
)


def publisher_errors(row: dict) -> list[str]:
    """A row's note of its publishers' errors, after the table's flags."""
    errors = row.get("publisher_errors")
    if not errors:
        return []
    return ["publisher errors: " + ", ".join(f"{n}x {e}" for e, n in errors.items())]


def report_ratios(runs: list[dict], report: dict) -> None:
    ratios = {}
    for k, wb, nm in side_by_side(runs, "publishers"):
        if wb.get("cpu_us_per_publisher_s"):
            ratios[str(k)] = round(nm["cpu_us_per_publisher_s"] / wb["cpu_us_per_publisher_s"], 2)
    report["ratios_cpu_per_publisher_s_nms_over_watchbuy"] = ratios
    if ratios:
        print(
            "\nCPU per publisher-second, node-media-server / WatchBuy (above 1: WatchBuy "
            "uses less): " + ", ".join(f"K={k}: {v}x" for k, v in ratios.items())
        )


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n")[0])
    harness.add_run_options(
        p, "publishers", "K", budget=600.0, seconds=8.0, warmup_help="after the probes join"
    )
    p.add_argument(
        "--probes",
        type=int,
        default=20,
        help="streams watched by a probe viewer (default 20, spread over the K)",
    )
    harness.add_machine_options(
        p,
        load_help="publishers and probes",
        quick_help="CI's short pass: K=20, 4 s per server",
        raw_help="keep every publisher's and probe's figures",
    )
    return p.parse_args(argv)


def describe_media(media: dict) -> str:
    return (
        f"each publisher replays {media['file']}: {media['media_kbit_per_s']} kb/s, "
        f"{media['video_fps']} fps, GOP {media['gop_s']} s"
    )


def failed(row: dict) -> bool:
    """The run did not run, the server died, or no publisher got through."""
    return bool(row.get("error") or not row.get("publishing") or row.get("server_alive") is False)


HARNESS = harness.Harness(
    kind="ingest",
    count_key="publishers",
    unit="K",
    flv=INGEST_FLV,
    ladder=LADDER,
    describe_media=describe_media,
    run=ingest_run,
    sustained=lambda row: bool(row.get("sustained")),
    table=TABLE,
    ratios=report_ratios,
    capacity_title="publishers one server core sustains (largest K that keeps up)",
    failed=failed,
    quick={"publishers": 20, "seconds": 4.0, "warmup": 1.0, "probes": 5},
    row_notes=publisher_errors,
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return harness.main(HARNESS, args, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
