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
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/ingest/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.fanout import common  # noqa: E402
from bench.fanout.common import (  # noqa: E402
    INGEST_FLV,
    BenchError,
    cpu_plan,
    flv_summary,
    machine_info,
    make_flv,
)
from bench.fanout.run import (  # noqa: E402
    KEEP_UP,
    choose_servers,
    cpu_figures,
    percentile_from_hist,
    run_loads,
    sweep_capacity,
)
from bench.fanout.servers import LABELS, make_server  # noqa: E402

LADDER = (50, 100, 200, 400, 800, 1200, 1600, 2400, 3200, 4800, 6400)
MAX_END_LAG_MS = 500.0
PUBLISHER_BEHIND_MS = 250.0


def ingest_run(name: str, k: int, args, flv: Path, media: dict) -> dict:
    server_cpus, load_cpus = cpu_plan(args.server_cpus, args.load_cpus)
    run_id = f"ingest-{k}"
    server = make_server(name, k, server_cpus)
    row: dict = {
        "server": name,
        "publishers": k,
        "seconds": args.seconds,
        "server_cpus": server_cpus,
        "load_cpus": load_cpus,
    }
    if args.quiet_wait > 0:
        row["machine_busy_before_pct"] = round(100 * common.wait_quiet(args.quiet_wait), 1)
    try:
        server.start(run_id)
        meter = server.meter
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
        probe_plan = {
            "host": "127.0.0.1",
            "port": server.http_port,
            "paths": [server.play_path(i) for i in sample],
            "viewers": len(sample),
            "connect_at": probes_at,
            "connect_spread": 0.5,
            "t_start": t_start,
            "t_end": t_end,
            "late_at": [],
        }
        jobs = [("bench.ingest.publishers", pub_plan), ("bench.fanout.load", probe_plan)]
        (pubs, probes), marks = run_loads(
            server, jobs, load_cpus, meter, t_start, t_end, api_path="/api/streams"
        )
        row["server_alive"] = server.alive()
        row["peak_rss_mib"] = round(meter.peak_kb() / 1024, 1)
        row.update(summarise(pubs, probes, marks, k, t_end - t_start, media))
        if args.raw:
            row["raw"] = {"publishers": pubs, "probes": probes}
    except BenchError as exc:
        row["error"] = str(exc)
    except (OSError, ValueError, KeyError) as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        row["server_exit"] = server.stop()
    return row


def summarise(pubs: dict, probes: dict, marks: dict, k: int, window: float, media: dict) -> dict:
    rate = pubs["kbit_per_s"] * 1000 / 8  # payload bytes per second of one publisher
    rows = pubs["publishers"]
    errors: dict[str, int] = {}
    for p in rows:
        if p["error"]:
            errors[p["error"][:80]] = errors.get(p["error"][:80], 0) + 1
    publishing = sum(1 for p in rows if not p["error"] and p["published_at"])
    behind = [p["behind_ms"] for p in rows if not p["error"] and p["published_at"]]
    queued = [p["queued_end"] for p in rows]
    backlog = sum(1 for q in queued if q > rate)
    fps = media["video_fps"]
    viewers = probes["viewers"]
    probe_ok = 0
    lags = []
    for v in viewers:
        got = min(v["vframes"] / (fps * window), v["span_ms"] / 1000 / window)
        lag = v.get("end_lag_ms")
        if lag is not None:
            lags.append(lag)
        if got >= KEEP_UP and not v["closed_early"] and lag is not None and lag <= MAX_END_LAG_MS:
            probe_ok += 1
    hist = {int(key): c for key, c in probes["hist"].items()}
    cpu = marks["server_cpu1"] - marks["server_cpu0"]
    cpu_window = max(1e-3, marks["t1"] - marks["t0"])
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
        "cpu_us_per_publisher_s": round(cpu / (k * cpu_window) * 1e6, 2),
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


COLUMNS = (
    ("server", "server", "{}"),
    ("publishers", "K", "{}"),
    ("sustained", "keeps up", "{}"),
    ("publishing", "live", "{}"),
    ("probes_ok", "probes ok", "{}"),
    ("cpu_pct", "cpu%", "{:.1f}"),
    ("server_core_busy_pct", "core busy%", "{:.0f}"),
    ("cpu_us_per_publisher_s", "us/pub-s", "{:.1f}"),
    ("probe_latency_p50_ms", "p50 ms", "{:.1f}"),
    ("probe_latency_p99_ms", "p99 ms", "{:.1f}"),
    ("probe_end_lag_max_ms", "end lag ms", "{:.0f}"),
    ("peak_rss_mib", "RSS MiB", "{:.1f}"),
    ("load_cpu_pct", "load%", "{:.0f}"),
)


def format_row(row: dict) -> str:
    cells = []
    for key, title, fmt in COLUMNS:
        value = row.get(key)
        text = "-" if value is None else fmt.format(value)
        cells.append(text.rjust(max(len(title), 7)))
    line = " ".join(cells)
    if row.get("error"):
        line += f"  ERROR: {row['error']}"
    else:
        flags = [
            text
            for key, text in (
                ("load_saturated", "load generator was the limit"),
                ("contended", "CPU contended by other processes"),
            )
            if row.get(key)
        ]
        if row.get("publisher_errors"):
            flags.append(
                "publisher errors: "
                + ", ".join(f"{n}x {e}" for e, n in row["publisher_errors"].items())
            )
        if flags:
            line += "  (" + "; ".join(flags) + ")"
    return line


def header() -> str:
    return " ".join(title.rjust(max(len(title), 7)) for _, title, _ in COLUMNS)


def sweep(servers: list[str], args, flv: Path, media: dict, runs: list[dict]) -> dict:
    """K doubles until a server falls behind, servers taking turns; one step halfway back."""

    def one(name: str, k: int) -> dict:
        row = ingest_run(name, k, args, flv, media)
        runs.append(row)
        print(format_row(row), flush=True)
        return row

    ladder = [k for k in LADDER if k <= args.max_publishers]
    return sweep_capacity(
        servers, ladder, one, lambda row: bool(row.get("sustained")), args.sweep_budget, "K", 10
    )


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n")[0])
    p.add_argument(
        "--servers",
        help="comma list of watchbuy,nms (default: both when node-media-"
        "server is installed, else watchbuy)",
    )
    p.add_argument("--publishers", type=int, default=100, help="K for a single run (default 100)")
    p.add_argument("--sweep", action="store_true", help="find each server's capacity")
    p.add_argument("--max-publishers", type=int, default=3200, help="sweep ceiling (default 3200)")
    p.add_argument(
        "--sweep-budget",
        type=float,
        default=600.0,
        help="seconds of sweeping in all, at most (default 600)",
    )
    p.add_argument("--seconds", type=float, default=8.0, help="measurement window (default 8)")
    p.add_argument("--warmup", type=float, default=2.0, help="after the probes join (default 2)")
    p.add_argument(
        "--probes",
        type=int,
        default=20,
        help="streams watched by a probe viewer (default 20, spread over the K)",
    )
    p.add_argument("--server-cpus", help="taskset list for the server (default: CPU 0; 'none')")
    p.add_argument("--load-cpus", help="taskset list for publishers and probes (default: rest)")
    p.add_argument("--quick", action="store_true", help="CI's short pass: K=20, 4 s per server")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for the machine's CPUs to "
        "be mostly idle (a shared machine; default 0: do not wait)",
    )
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--raw", action="store_true", help="keep every publisher's and probe's figures")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    common.install_signal_handlers()
    if args.quick:
        args.publishers, args.seconds, args.warmup, args.probes = 20, 4.0, 1.0, 5
        args.sweep = False
    notes: list[str] = []
    status = 0
    report: dict = {"kind": "ingest", "argv": sys.argv[1:] if argv is None else argv}
    try:
        servers, missing = choose_servers(args.servers, notes)
        for note in notes:
            print("note:", note)
        if missing:
            status = 1
        flv = make_flv(INGEST_FLV)
        media = flv_summary(flv)
        report["machine"] = machine_info()
        report["media"] = media
        print(
            f"each publisher replays {media['file']}: {media['media_kbit_per_s']} kb/s, "
            f"{media['video_fps']} fps, GOP {media['gop_s']} s"
        )
        runs: list[dict] = []
        print(header())
        capacity: dict = {}
        if args.sweep:
            capacity = sweep(servers, args, flv, media, runs)
        else:
            for name in servers:
                row = ingest_run(name, args.publishers, args, flv, media)
                runs.append(row)
                print(format_row(row), flush=True)
        report["runs"] = runs
        by = {(r["server"], r["publishers"]): r for r in runs if not r.get("error")}
        ratios = {}
        for (server, k), wb in sorted(by.items(), key=lambda kv: kv[0][1]):
            nm = by.get(("nms", k))
            if server == "watchbuy" and nm and wb.get("cpu_us_per_publisher_s"):
                ratios[str(k)] = round(
                    nm["cpu_us_per_publisher_s"] / wb["cpu_us_per_publisher_s"], 2
                )
        report["ratios_cpu_per_publisher_s_nms_over_watchbuy"] = ratios
        if ratios:
            print(
                "\nCPU per publisher-second, node-media-server / WatchBuy (above 1: WatchBuy "
                "uses less): " + ", ".join(f"K={k}: {v}x" for k, v in ratios.items())
            )
        if capacity:
            report["capacity"] = capacity
            print("\npublishers one server core sustains (largest K that keeps up):")
            for name, cap in capacity.items():
                extra = (
                    f", first failure at K={cap['first_failure']}" if cap["first_failure"] else ""
                )
                if cap["inconclusive_at"]:
                    extra += f", load-bound miss at K={cap['inconclusive_at']}"
                note = f" ({cap['note']})" if cap["note"] else ""
                print(f"  {LABELS[name]}: {cap['capacity']}{extra}{note}")
            wb, nm = capacity.get("watchbuy"), capacity.get("nms")
            if wb and nm and wb["capacity"] and nm["capacity"]:
                report["capacity_ratio_watchbuy_over_nms"] = round(
                    wb["capacity"] / nm["capacity"], 2
                )
                print(
                    f"  capacity WatchBuy / node-media-server: "
                    f"{report['capacity_ratio_watchbuy_over_nms']}x"
                )
        for row in runs:
            if row.get("error") or not row.get("publishing") or row.get("server_alive") is False:
                status = 1  # the run did not run, the server died, or no publisher got through
    except BenchError as exc:
        print(f"ingest benchmark failed: {exc}", file=sys.stderr)
        report["error"] = str(exc)
        status = 1
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        report["error"] = "interrupted"
        status = 130
    finally:
        common.stop_all()
        report["notes"] = notes
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1))
            print(f"results written to {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
