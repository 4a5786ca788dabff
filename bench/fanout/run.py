"""Fan-out benchmark: WatchBuy against node-media-server, N HTTP-FLV viewers of one live stream.

Usage (from the repository root, with the project's virtualenv)::

    python -m bench.fanout --install-nms           # once: node-media-server 4.4.3 into bench/work/nms
    python -m bench.fanout --viewers 100            # one run per server at N=100, ratios printed
    python -m bench.fanout --sweep --json out.json  # capacity sweep (N = 100, 200, 400, ...)
    python -m bench.fanout --quick --json out.json  # CI's short pass: N=20, 5 s per server
    python -m bench.fanout --full                   # install if needed; codecs, fan-out, ingest

``python bench/fanout/run.py ...`` works the same.  One run: start the server (fresh loopback
ports, pinned to CPU 0 with taskset when there are two or more CPUs), publish the 720p30 test FLV
with ``ffmpeg -re -stream_loop -1 -c copy``, wait for a keyframe, measure the publisher-only CPU
for a moment, then a separate load process (pinned to the other CPUs) connects N viewers and
measures a window of ``--seconds`` after a warm-up, while this process marks the server tree's
CPU time (/proc/<pid>/stat utime+stime) at the window's edges and samples its RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/fanout/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import common, harness  # noqa: E402
from bench.common import (  # noqa: E402
    FANOUT_FLV,
    INGEST_FLV,
    WORK,
    ffmpeg_path,
    install_nms,
    nms_installed,
    spawn,
)
from bench.fanout.load import viewer_plan  # noqa: E402
from bench.fanout.servers import LABELS, wait_stream_live  # noqa: E402
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
    server_cpu,
    side_by_side,
)

LADDER = (100, 200, 400, 800, 1200, 1600, 2400, 3200, 4000, 4800, 6400, 8000, 9600, 12800)
CAPACITY = 0.99  # a server sustains N: >= 99 % of viewers keep up
LATE_JOINERS = 5
# --media: the 720p30 stream (~2.7 Mb/s on the wire) or the 360p30 one (~600 kb/s)
MEDIA = {"2.7M": FANOUT_FLV, "600k": INGEST_FLV}
P99_LIMITS_MS = (100, 200)  # capacity is reported at each of these p99 added latencies


# -- one run -------------------------------------------------------------------------------------
def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def start_publisher(server, flv: Path, cpus: str | None, run_id: str) -> subprocess.Popen:
    cmd = [
        ffmpeg_path(),
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "error",
        "-re",
        "-stream_loop",
        "-1",
        "-i",
        str(flv),
        "-c",
        "copy",
        "-f",
        "flv",
        server.publish_url(0),
    ]
    return spawn(cmd, log_name=f"ffmpeg-{run_id}.log", cpus=cpus)


def fanout_run(server_name: str, n: int, args, flv: Path, media: dict) -> dict:
    fps = media["video_fps"]

    def body(run: harness.Run) -> None:
        server, row, load_cpus = run.server, run.row, run.load_cpus
        meter = server.meter
        run.procs.append(start_publisher(server, flv, load_cpus, f"{server_name}-{run.run_id}"))
        row["live_after_s"] = round(wait_stream_live(server, 0), 2)
        # publisher only: the ingest's share of the CPU, subtracted for the marginal figure
        time.sleep(0.3)
        c0, t0 = meter.cpu(), time.monotonic()
        time.sleep(args.baseline)
        c1, t1 = meter.cpu(), time.monotonic()
        baseline_rate = (c1 - c0) / (t1 - t0)
        row["baseline_cpu_pct"] = round(baseline_rate * 100, 2)

        load_procs = args.load_procs or (len(load_cpus.split(",")) if load_cpus else 2)
        connect_at = time.monotonic() + 1.0  # the load processes start and import first
        # Thousands of joins at once are a connection storm (each join gets the cached GOP at
        # once), not the steady state measured here: with the bulk load, joins come at
        # --connect-rate per second (the parsing load keeps its older 3 s at most).
        if args.load == "bulk" or args.protocol == "llhls":
            spread = max(0.5, n / args.connect_rate)
        else:
            spread = min(3.0, max(0.5, n / 400))
        t_start = connect_at + spread + args.warmup
        t_end = t_start + args.seconds
        late_at = [t_start + args.seconds * (i + 0.5) / LATE_JOINERS for i in range(LATE_JOINERS)]

        def plan(count: int, late: bool) -> dict:
            return viewer_plan(
                server, [server.play_path(0)], count, connect_at=connect_at,
                connect_spread=spread, t_start=t_start, t_end=t_end,
                late_at=late_at if late else [],
            )

        if args.protocol == "llhls":
            # LL-HLS viewers (bench/fanout/llhls.py): hls.js's requests, many per process
            path = f"/live/{server.stream_name(0)}/index.m3u8"
            jobs = [
                ("bench.fanout.llhls", dict(plan(count, False), paths=[path]))
                for count in split(n, max(1, min(load_procs, n)))
            ]
            row["protocol"] = "llhls"
            results, marks = run_loads(server, jobs, load_cpus, meter, t_start, t_end)
            note_server(row, server)
            row.update(summarise(results, marks, n, t_end - t_start, fps, baseline_rate, media))
            return
        # --load bulk: a few parsing probes (every tag timed: the latency figures) and the rest
        # as byte-counting viewers on one epoll loop, so the load costs far less than the
        # server; --load parse: every viewer parses (the older harness, load-bound sooner).
        probes = n if args.load == "parse" else min(n, args.probes)
        bulk = n - probes
        procs = max(1, min(load_procs, probes))
        jobs = [
            ("bench.fanout.load", plan(count, i == 0))
            for i, count in enumerate(split(probes, procs))
        ]
        if bulk:
            jobs += [
                ("bench.fanout.bulk", dict(plan(count, False), batch_ms=args.batch_ms))
                for count in split(bulk, max(1, args.bulk_procs))
            ]
        row["probes"] = probes
        row["bulk_viewers"] = bulk
        row["p99_limit_ms"] = args.max_p99_ms
        results, marks = run_loads(server, jobs, load_cpus, meter, t_start, t_end)
        note_server(row, server)
        window = t_end - t_start
        row.update(summarise(results, marks, n, window, fps, baseline_rate, media))
        if args.raw:
            row["raw"] = results
        api = marks.get("server_api")
        if api:
            row["server_reports_viewers"] = api.get("viewers")
            row["server_tx_mbit_s"] = round(api.get("bytes_out_per_s", 0) * 8 / 1e6, 1)

    return harness.measured_run("fanout", server_name, "viewers", n, 1, args, body)


def summarise(
    results: list[dict],
    marks: dict,
    n: int,
    window: float,
    fps: float,
    baseline_rate: float,
    media: dict | None = None,
) -> dict:
    rows = [v for r in results for v in r["viewers"]]
    # a bulk viewer only counts bytes: it kept up when the window brought >= 90 % of the
    # stream's media bytes (the FLV framing on top makes a full-rate viewer a little over 100 %)
    media_bytes_s = (media or {}).get("media_kbit_per_s", 0) * 1000 / 8

    def received(v: dict) -> float:
        if "media_s" in v:  # an LL-HLS viewer: the media seconds of the parts it fetched
            return v["media_s"] / window
        if "bytes_window" in v:
            return v["bytes_window"] / (media_bytes_s * window) if media_bytes_s else 0.0
        return media_received(v, fps, window)

    ratios = [received(v) for v in rows]
    kept = sum(
        1
        for v, media in zip(rows, ratios, strict=True)
        if media >= KEEP_UP and not v["closed_early"]
    )
    hist = merge_hist(results)
    late = [x for r in results for x in r["late"]]
    ttfk = [x["ttfk_ms"] for x in late if x["ttfk_ms"] is not None]
    cpu, cpu_window = server_cpu(marks)
    p99s = sorted(v["added_p99_ms"] for v in rows if "added_p99_ms" in v)
    out = {
        "keeping_up": kept,
        "keeping_up_pct": round(100 * kept / n, 2),
        "media_received_pct_median": round(100 * statistics.median(ratios), 1) if ratios else 0,
        "media_received_pct_min": round(100 * min(ratios), 1) if ratios else 0,
        "viewer_errors": count_errors(v["error"] for v in rows),
        "cpu_us_per_viewer_s": cpu_us_per_unit_s(marks, n),
        "marginal_cpu_us_per_viewer_s": round(
            max(0.0, cpu - baseline_rate * cpu_window) / (n * cpu_window) * 1e6, 2
        ),
        "latency_p50_ms": percentile_from_hist(hist, 0.50),
        "latency_p99_ms": percentile_from_hist(hist, 0.99),
        "latency_max_ms": (max(hist) / 10.0) if hist else None,
        "worst_viewer_p99_ms": p99s[-1] if p99s else None,
        "late_ttfk_ms": ttfk,
        "late_ttfk_median_ms": round(statistics.median(ttfk), 2) if ttfk else None,
        "late_ttfk_max_ms": max(ttfk) if ttfk else None,
        "late_errors": [x["error"] for x in late if x["error"]],
    }
    out.update(cpu_figures(marks, window))
    bulk_cpu = sum(r["load_cpu_s"] for r in results if r.get("bulk"))
    if any(r.get("bulk") for r in results):
        # the bulk process's own CPU (the probes' is in load_cpu_pct too), per viewer-second
        bulk_n = sum(len(r["viewers"]) for r in results if r.get("bulk"))
        out["bulk_cpu_pct"] = round(100 * bulk_cpu / window, 1)
        out["bulk_cpu_us_per_viewer_s"] = round(bulk_cpu / (bulk_n * window) * 1e6, 2)
    return out


# -- reporting -------------------------------------------------------------------------------------
TABLE = results_table(
    "viewers",
    "N",
    (
        ("keeping_up_pct", "keep%", "{:.1f}"),
        ("cpu_pct", "cpu%", "{:.1f}"),
        ("cpu_us_per_viewer_s", "us/viewer-s", "{:.1f}"),
        ("marginal_cpu_us_per_viewer_s", "marginal", "{:.1f}"),
        ("latency_p50_ms", "p50 ms", "{:.1f}"),
        ("latency_p99_ms", "p99 ms", "{:.1f}"),
        ("late_ttfk_median_ms", "ttfk ms", "{:.1f}"),
    ),
    width=8,
    saturated="load generator saturated",
)


def ratio(a, b) -> float | None:
    if a is None or b is None or not b:
        return None
    return round(a / b, 2)


RATIO_KEYS = (
    ("cpu_us_per_viewer_s", "CPU per viewer-second"),
    ("marginal_cpu_us_per_viewer_s", "marginal CPU per viewer-second"),
    ("latency_p50_ms", "p50 added latency"),
    ("latency_p99_ms", "p99 added latency"),
    ("late_ttfk_median_ms", "late joiner time to first keyframe"),
    ("peak_rss_mib", "peak RSS"),
)


def compare(runs: list[dict]) -> dict:
    """NMS/WatchBuy ratios at every N both servers ran without error (> 1: WatchBuy better)."""
    return {
        str(n): {key: ratio(nms.get(key), wb.get(key)) for key, _ in RATIO_KEYS}
        for n, wb, nms in side_by_side(runs, "viewers")
    }


def print_ratios(ratios: dict) -> None:
    if not ratios:
        return
    print("\nratios node-media-server / WatchBuy (above 1: WatchBuy uses less / is faster):")
    for n, values in ratios.items():
        text = ", ".join(
            f"{label} {values[key]}x" for key, label in RATIO_KEYS if values.get(key) is not None
        )
        print(f"  N={n}: {text}")


def report_ratios(runs: list[dict], report: dict) -> None:
    report["ratios"] = compare(runs)
    print_ratios(report["ratios"])
    report["capacity_at_p99"] = capacity_at_p99(runs)
    if len({r["viewers"] for r in runs}) > 1:
        print("\nlargest N with >= 99 % of viewers at full rate and p99 added latency <= limit:")
        for limit, by_server in report["capacity_at_p99"].items():
            text = ", ".join(f"{LABELS[s]} {n}" for s, n in by_server.items())
            print(f"  p99 <= {limit} ms: {text}")


def capacity_at_p99(runs: list[dict]) -> dict:
    """For each p99 limit, each server's largest N with >= 99 % keeping up within it."""
    out: dict = {}
    for limit in P99_LIMITS_MS:
        out[str(limit)] = {}
        for server in dict.fromkeys(r["server"] for r in runs):
            good = [
                r["viewers"] for r in runs
                if r["server"] == server and not r.get("error")
                and r.get("keeping_up_pct", 0) >= CAPACITY * 100
                and r.get("latency_p99_ms") is not None and r["latency_p99_ms"] <= limit
            ]
            out[str(limit)][server] = max(good) if good else None
    return out


# -- the command -----------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__.split("\n")[0])
    harness.add_run_options(
        p, "viewers", "N", budget=480.0, seconds=10.0, warmup_help="after the last connect"
    )
    p.add_argument(
        "--baseline",
        type=float,
        default=2.0,
        help="publisher-only CPU measurement before viewers join (default 2)",
    )
    p.add_argument(
        "--load-procs", type=int, default=0, help="viewer processes (default: one per load CPU)"
    )
    p.add_argument(
        "--workers", type=int, default=1,
        help="WatchBuy's worker processes (watchbuy media --workers N; default 1)",
    )
    harness.add_machine_options(
        p,
        load_help="ffmpeg and the viewers",
        quick_help="CI's short pass: N=20, 5 s per server, no sweep",
        raw_help="keep every viewer's figures in the JSON",
    )
    p.add_argument(
        "--media",
        choices=sorted(MEDIA),
        default="2.7M",
        help="the stream: 2.7M (720p30, the default) or 600k (360p30)",
    )
    p.add_argument(
        "--protocol",
        choices=("flv", "llhls"),
        default="flv",
        help="flv (default): HTTP-FLV viewers; llhls: LL-HLS viewers as hls.js in low-latency "
        "mode (blocking playlist reloads and part fetches; WatchBuy only)",
    )
    p.add_argument(
        "--load",
        choices=("bulk", "parse"),
        default="bulk",
        help="bulk (default): --probes parsing viewers time every tag, the rest only count "
        "bytes on one epoll loop; parse: every viewer parses",
    )
    p.add_argument(
        "--probes", type=int, default=20, help="parsing viewers with --load bulk (default 20)"
    )
    p.add_argument(
        "--bulk-procs", type=int, default=1, help="byte-counting processes (default 1)"
    )
    p.add_argument(
        "--batch-ms",
        type=float,
        default=250.0,
        help="the bulk loop's turn in ms: bytes gathered per recv (default 250)",
    )
    p.add_argument(
        "--connect-rate",
        type=float,
        default=600.0,
        help="viewers joining per second with --load bulk or --protocol llhls (default 600)",
    )
    p.add_argument(
        "--max-p99-ms",
        type=float,
        default=200.0,
        help="the sweep climbs while >= 99 %% keep up and the p99 added latency stays "
        "within this (default 200)",
    )
    p.add_argument(
        "--ladder", help="comma list of N for --sweep (default: 100, 200, 400, ... 12800)"
    )
    p.add_argument(
        "--install-nms",
        action="store_true",
        help="npm install node-media-server 4.4.3 into bench/work/nms and exit",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="install node-media-server if needed, run the fan-out sweep and the "
        "ingest sweep, JSON into bench/work/",
    )
    return p.parse_args(argv)


def sustained(row: dict) -> bool:
    """>= 99 % of viewers kept up and, under --max-p99-ms, the p99 added latency stayed within."""
    if row.get("error") or row.get("keeping_up_pct", 0) < CAPACITY * 100:
        return False
    limit, p99 = row.get("p99_limit_ms"), row.get("latency_p99_ms")
    return not limit or (p99 is not None and p99 <= limit)


def describe_media(media: dict) -> str:
    return (
        f"publishing {media['file']}: {media['media_kbit_per_s']} kb/s, "
        f"{media['video_fps']} fps, GOP {media['gop_s']} s, "
        f"{media['duration_s']} s looped"
    )


def failed(row: dict) -> bool:
    """A run that did not run, the server died, or no viewer got media."""
    return bool(
        row.get("error") or row.get("latency_p50_ms") is None or row.get("server_alive") is False
    )


HARNESS = harness.Harness(
    kind="fanout",
    count_key="viewers",
    unit="N",
    flv=FANOUT_FLV,
    ladder=LADDER,
    describe_media=describe_media,
    run=fanout_run,
    sustained=sustained,
    table=TABLE,
    ratios=report_ratios,
    capacity_title="capacity (largest N with >= 99 % of viewers keeping up)",
    failed=failed,
    quick={"viewers": 20, "seconds": 5.0, "warmup": 1.0, "baseline": 1.0},
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.install_nms:
        return install_nms()
    if args.full:
        return full(args)
    if args.protocol == "llhls":
        if args.servers and args.servers != "watchbuy":
            print("LL-HLS: node-media-server 4.4.3 serves no LL-HLS; WatchBuy only",
                  file=sys.stderr)
        args.servers = "watchbuy"
    chosen = dataclasses.replace(HARNESS, flv=MEDIA[args.media])
    if args.ladder:
        chosen = dataclasses.replace(
            chosen, ladder=tuple(int(x) for x in args.ladder.split(",") if x.strip())
        )
    return harness.main(chosen, args, sys.argv[1:] if argv is None else argv)


def full(args) -> int:
    """Everything RESULTS.md quotes, in one command.

    Installs node-media-server when missing (and goes on without it if that fails), runs the
    codec suites (pytest-benchmark, JSON kept), the fan-out sweep and the ingest sweep; every
    JSON lands in bench/work/ with one time stamp.
    """
    common.install_signal_handlers()
    if not nms_installed() and install_nms() != 0:
        print("continuing without node-media-server", file=sys.stderr)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    extra = ["--quiet-wait", str(args.quiet_wait)] if args.quiet_wait else []
    codec_json = WORK / f"codecs-{stamp}.json"
    print(f"\n== codec benchmarks (pytest-benchmark) -> {codec_json.relative_to(common.REPO)}")
    codecs = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "bench",
            "--benchmark-only",
            f"--benchmark-json={codec_json}",
        ],
        cwd=common.REPO,
    )
    print("\n== fan-out sweep")
    fan = main(["--sweep", "--json", str(WORK / f"fanout-full-{stamp}.json"), *extra])
    from bench.ingest.run import main as ingest_main

    print("\n== ingest sweep")
    ing = ingest_main(["--sweep", "--json", str(WORK / f"ingest-full-{stamp}.json"), *extra])
    return 1 if (codecs.returncode or fan or ing) else 0


if __name__ == "__main__":
    sys.exit(main())
