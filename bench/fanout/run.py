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
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/fanout/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.fanout import common  # noqa: E402
from bench.fanout.common import (  # noqa: E402
    FANOUT_FLV,
    WORK,
    BenchError,
    cpu_plan,
    ffmpeg_path,
    flv_summary,
    install_nms,
    machine_info,
    make_flv,
    nms_installed,
    sleep_until,
    spawn,
    stop,
)
from bench.fanout.servers import LABELS, make_server, wait_stream_live  # noqa: E402

LADDER = (100, 200, 400, 800, 1200, 1600, 2400, 3200, 4800, 6400)
KEEP_UP = 0.90  # a viewer keeps up: >= 90 % of the window's media received
CAPACITY = 0.99  # a server sustains N: >= 99 % of viewers keep up
LATE_JOINERS = 5


# -- one run -------------------------------------------------------------------------------------
def percentile_from_hist(hist: dict[int, int], q: float) -> float | None:
    total = sum(hist.values())
    if not total:
        return None
    rank = min(total - 1, int(total * q))
    seen = 0
    for key in sorted(hist):
        seen += hist[key]
        if seen > rank:
            return key / 10.0  # 0.1 ms bins -> ms
    return None


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


def run_loads(
    server,
    jobs: list[tuple[str, dict]],
    cpus: str | None,
    meter,
    t_start: float,
    t_end: float,
    api_path: str = "/api/server",
    sample_every: float = 0.25,
) -> tuple[list[dict], dict]:
    """Start one load process per (module, plan); mark CPU at the window's edges; collect results.

    The processes write their results to files (``plan["out"]``) and exit after the window.
    """
    procs = []
    marks: dict = {}
    outs = []
    try:
        for i, (module, plan) in enumerate(jobs):
            out = common.TMP / f"load-{os.getpid()}-{i}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.unlink(missing_ok=True)
            outs.append(out)
            plan = dict(plan, out=str(out))
            procs.append(
                spawn(
                    [sys.executable, "-m", module, json.dumps(plan)],
                    log_name=f"load-{i}.log",
                    cpus=cpus,
                    cwd=common.REPO,
                )
            )
        load_meters = [common.TreeMeter(p.pid) for p in procs]
        # sample RSS until the window opens, then mark CPU (server and load processes)
        while time.monotonic() < t_start - sample_every:
            meter.sample_rss()
            time.sleep(sample_every)
        sleep_until(t_start)
        marks["t0"] = time.monotonic()
        marks["server_split0"] = meter.split()
        marks["server_cpu0"] = sum(marks["server_split0"])
        marks["load_cpu0"] = sum(m.cpu() for m in load_meters)
        marks["server_core0"] = common.cpu_ticks(server.cpus)
        marks["load_core0"] = common.cpu_ticks(cpus)
        api_at = t_end - 0.6  # the server's own view, while every viewer is still on
        while time.monotonic() < t_end - sample_every:
            meter.sample_rss()
            if api_at and time.monotonic() >= api_at:
                marks["server_api"] = server.api(api_path)
                api_at = 0
            time.sleep(sample_every)
        sleep_until(t_end)
        marks["t1"] = time.monotonic()
        marks["server_split1"] = meter.split()
        marks["server_cpu1"] = sum(marks["server_split1"])
        marks["load_cpu1"] = sum(m.cpu() for m in load_meters)
        marks["server_core1"] = common.cpu_ticks(server.cpus)
        marks["load_core1"] = common.cpu_ticks(cpus)
        meter.sample_rss()
        results = []
        for i, (proc, out) in enumerate(zip(procs, outs, strict=True)):
            try:
                proc.wait(timeout=max(5.0, t_end + 40 - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise BenchError("a load process did not finish in time") from None
            if proc.returncode != 0 or not out.exists():
                raise BenchError(
                    f"load process {i} failed with status {proc.returncode} "
                    f"(see bench/work/logs/load-{i}.log)"
                )
            results.append(json.loads(out.read_text()))
        return results, marks
    finally:
        for proc in procs:
            stop(proc)
        for out in outs:
            out.unlink(missing_ok=True)


def fanout_run(server_name: str, n: int, args, flv: Path, fps: float) -> dict:
    server_cpus, load_cpus = cpu_plan(args.server_cpus, args.load_cpus)
    run_id = f"fanout-{n}"
    server = make_server(server_name, 1, server_cpus)
    publisher = None
    row: dict = {
        "server": server_name,
        "viewers": n,
        "seconds": args.seconds,
        "server_cpus": server_cpus,
        "load_cpus": load_cpus,
    }
    if args.quiet_wait > 0:
        row["machine_busy_before_pct"] = round(100 * common.wait_quiet(args.quiet_wait), 1)
    try:
        server.start(run_id)
        meter = server.meter
        publisher = start_publisher(server, flv, load_cpus, f"{server_name}-{run_id}")
        row["live_after_s"] = round(wait_stream_live(server, 0), 2)
        # publisher only: the ingest's share of the CPU, subtracted for the marginal figure
        time.sleep(0.3)
        c0, t0 = meter.cpu(), time.monotonic()
        time.sleep(args.baseline)
        c1, t1 = meter.cpu(), time.monotonic()
        baseline_rate = (c1 - c0) / (t1 - t0)
        row["baseline_cpu_pct"] = round(baseline_rate * 100, 2)

        load_procs = args.load_procs or (len(load_cpus.split(",")) if load_cpus else 2)
        procs = max(1, min(load_procs, n))
        connect_at = time.monotonic() + 1.0  # the load processes start and import first
        spread = min(3.0, max(0.5, n / 400))
        t_start = connect_at + spread + args.warmup
        t_end = t_start + args.seconds
        late_at = [t_start + args.seconds * (i + 0.5) / LATE_JOINERS for i in range(LATE_JOINERS)]
        plans = []
        for i, count in enumerate(split(n, procs)):
            plans.append(
                {
                    "host": "127.0.0.1",
                    "port": server.http_port,
                    "paths": [server.play_path(0)],
                    "viewers": count,
                    "connect_at": connect_at,
                    "connect_spread": spread,
                    "t_start": t_start,
                    "t_end": t_end,
                    "late_at": late_at if i == 0 else [],
                }
            )
        jobs = [("bench.fanout.load", plan) for plan in plans]
        results, marks = run_loads(server, jobs, load_cpus, meter, t_start, t_end)
        row["server_alive"] = server.alive()
        row["peak_rss_mib"] = round(meter.peak_kb() / 1024, 1)
        window = t_end - t_start
        row.update(summarise(results, marks, n, window, fps, baseline_rate))
        if args.raw:
            row["raw"] = results
        api = marks.get("server_api")
        if api:
            row["server_reports_viewers"] = api.get("viewers")
            row["server_tx_mbit_s"] = round(api.get("bytes_out_per_s", 0) * 8 / 1e6, 1)
    except BenchError as exc:
        row["error"] = str(exc)
    except (OSError, ValueError, KeyError) as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if publisher is not None:
            stop(publisher)
        code = server.stop()
        row["server_exit"] = code
    return row


def cpu_figures(marks: dict, window: float) -> dict:
    """CPU over the window: the server tree's, the load processes', and how busy their CPUs were.

    ``/proc/stat`` says how busy the server's CPUs were by anyone: on a shared machine other
    processes, and the kernel's softirq work for loopback traffic, are counted there but not in
    the server's utime+stime.  ``contended`` marks a window where others took more than 10 % of
    the server's CPU or 15 % of the load's: its numbers are noisier.  ``load_saturated`` means our
    own load processes used 85 % or more of their CPUs: a failure there may be the client's.
    """
    # CPU rates over the time that really passed between the two marks (this process may itself
    # be scheduled late on a busy machine), not the nominal window
    window = max(1e-3, marks["t1"] - marks["t0"])
    cpu = marks["server_cpu1"] - marks["server_cpu0"]
    load_cpu = marks["load_cpu1"] - marks["load_cpu0"]
    sb0, st0 = marks["server_core0"]
    sb1, st1 = marks["server_core1"]
    lb0, lt0 = marks["load_core0"]
    lb1, lt1 = marks["load_core1"]
    server_cores = max(1e-9, (st1 - st0) / common.CLK_TCK / window)
    load_cores = max(1e-9, (lt1 - lt0) / common.CLK_TCK / window)
    server_busy = (sb1 - sb0) / max(1, st1 - st0)
    load_busy = (lb1 - lb0) / max(1, lt1 - lt0)
    other_server = max(0.0, server_busy - cpu / window / server_cores)
    other_load = max(0.0, load_busy - load_cpu / window / load_cores)
    user = marks["server_split1"][0] - marks["server_split0"][0]
    system = marks["server_split1"][1] - marks["server_split0"][1]
    return {
        "cpu_s": round(cpu, 3),
        "cpu_pct": round(100 * cpu / window, 1),
        # user space (the server's own code) and kernel (syscalls: mostly the socket writes)
        "cpu_user_pct": round(100 * user / window, 1),
        "cpu_sys_pct": round(100 * system / window, 1),
        "server_core_busy_pct": round(100 * server_busy, 1),
        "other_on_server_core_pct": round(100 * other_server, 1),
        "load_cpu_pct": round(100 * load_cpu / window, 1),
        "load_core_busy_pct": round(100 * load_busy, 1),
        "other_on_load_core_pct": round(100 * other_load, 1),
        "load_saturated": load_cpu / window >= 0.85 * load_cores,
        "contended": other_server > 0.10 or other_load > 0.15,
    }


def summarise(
    results: list[dict], marks: dict, n: int, window: float, fps: float, baseline_rate: float
) -> dict:
    rows = [v for r in results for v in r["viewers"]]
    expected_frames = fps * window
    kept = 0
    ratios = []
    errors: dict[str, int] = {}
    for v in rows:
        media = min(v["vframes"] / expected_frames, v["span_ms"] / 1000 / window)
        ratios.append(media)
        if media >= KEEP_UP and not v["closed_early"]:
            kept += 1
        if v["error"]:
            errors[v["error"][:80]] = errors.get(v["error"][:80], 0) + 1
    hist: dict[int, int] = {}
    for r in results:
        for k, c in r["hist"].items():
            hist[int(k)] = hist.get(int(k), 0) + c
    late = [x for r in results for x in r["late"]]
    ttfk = [x["ttfk_ms"] for x in late if x["ttfk_ms"] is not None]
    cpu = marks["server_cpu1"] - marks["server_cpu0"]
    cpu_window = max(1e-3, marks["t1"] - marks["t0"])
    p99s = sorted(v["added_p99_ms"] for v in rows if "added_p99_ms" in v)
    out = {
        "keeping_up": kept,
        "keeping_up_pct": round(100 * kept / n, 2),
        "media_received_pct_median": round(100 * statistics.median(ratios), 1) if ratios else 0,
        "media_received_pct_min": round(100 * min(ratios), 1) if ratios else 0,
        "viewer_errors": errors,
        "cpu_us_per_viewer_s": round(cpu / (n * cpu_window) * 1e6, 2),
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
    return out


# -- reporting -------------------------------------------------------------------------------------
COLUMNS = (
    ("server", "server", "{}"),
    ("viewers", "N", "{}"),
    ("keeping_up_pct", "keep%", "{:.1f}"),
    ("cpu_pct", "cpu%", "{:.1f}"),
    ("cpu_us_per_viewer_s", "us/viewer-s", "{:.1f}"),
    ("marginal_cpu_us_per_viewer_s", "marginal", "{:.1f}"),
    ("latency_p50_ms", "p50 ms", "{:.1f}"),
    ("latency_p99_ms", "p99 ms", "{:.1f}"),
    ("late_ttfk_median_ms", "ttfk ms", "{:.1f}"),
    ("peak_rss_mib", "RSS MiB", "{:.1f}"),
    ("load_cpu_pct", "load%", "{:.0f}"),
)


def format_row(row: dict) -> str:
    cells = []
    for key, title, fmt in COLUMNS:
        value = row.get(key)
        text = "-" if value is None else fmt.format(value)
        cells.append(text.rjust(max(len(title), 8)))
    line = " ".join(cells)
    if row.get("error"):
        line += f"  ERROR: {row['error']}"
    else:
        flags = [
            text
            for key, text in (
                ("load_saturated", "load generator saturated"),
                ("contended", "CPU contended by other processes"),
            )
            if row.get(key)
        ]
        if flags:
            line += "  (" + "; ".join(flags) + ")"
    return line


def header() -> str:
    return " ".join(title.rjust(max(len(title), 8)) for _, title, _ in COLUMNS)


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
    by = {(r["server"], r["viewers"]): r for r in runs if not r.get("error")}
    out = {}
    for (server, n), wb in sorted(by.items(), key=lambda kv: kv[0][1]):
        if server != "watchbuy" or ("nms", n) not in by:
            continue
        nms = by[("nms", n)]
        out[str(n)] = {key: ratio(nms.get(key), wb.get(key)) for key, _ in RATIO_KEYS}
    return out


def print_ratios(ratios: dict) -> None:
    if not ratios:
        return
    print("\nratios node-media-server / WatchBuy (above 1: WatchBuy uses less / is faster):")
    for n, values in ratios.items():
        text = ", ".join(
            f"{label} {values[key]}x" for key, label in RATIO_KEYS if values.get(key) is not None
        )
        print(f"  N={n}: {text}")


# -- the command -----------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__.split("\n")[0])
    p.add_argument(
        "--servers",
        help="comma list of watchbuy,nms (default: both when node-media-"
        "server is installed, else watchbuy)",
    )
    p.add_argument("--viewers", type=int, default=100, help="N for a single run (default 100)")
    p.add_argument("--sweep", action="store_true", help="find each server's capacity")
    p.add_argument("--max-viewers", type=int, default=3200, help="sweep ceiling (default 3200)")
    p.add_argument(
        "--sweep-budget",
        type=float,
        default=480.0,
        help="seconds of sweeping in all, at most (default 480)",
    )
    p.add_argument("--seconds", type=float, default=10.0, help="measurement window (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="after the last connect (default 2)")
    p.add_argument(
        "--baseline",
        type=float,
        default=2.0,
        help="publisher-only CPU measurement before viewers join (default 2)",
    )
    p.add_argument(
        "--load-procs", type=int, default=0, help="viewer processes (default: one per load CPU)"
    )
    p.add_argument("--server-cpus", help="taskset list for the server (default: CPU 0; 'none')")
    p.add_argument("--load-cpus", help="taskset list for ffmpeg and the viewers (default: rest)")
    p.add_argument(
        "--quick", action="store_true", help="CI's short pass: N=20, 5 s per server, no sweep"
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for the machine's CPUs to "
        "be mostly idle (a shared machine; default 0: do not wait)",
    )
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--raw", action="store_true", help="keep every viewer's figures in the JSON")
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


def choose_servers(spec: str | None, notes: list[str]) -> tuple[list[str], list[str]]:
    """(servers to run, servers requested but unavailable)."""
    if spec:
        wanted = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        wanted = ["watchbuy", "nms"]
    runnable, missing = [], []
    for name in wanted:
        if name not in LABELS:
            raise SystemExit(f"unknown server {name!r}: choose from {', '.join(LABELS)}")
        if name == "nms" and not nms_installed():
            note = (
                "node-media-server 4.4.3 is not installed (python -m bench.fanout "
                "--install-nms): skipping it"
            )
            notes.append(note)
            if spec:
                missing.append(name)
            continue
        runnable.append(name)
    return runnable, missing


def sustained(row: dict) -> bool:
    return not row.get("error") and row.get("keeping_up_pct", 0) >= CAPACITY * 100


def sweep_capacity(
    servers: list[str],
    ladder: list[int],
    run_one,
    ok,
    budget: float,
    unit: str = "N",
    step: int = 10,
) -> dict:
    """Each server's capacity: the ladder upwards until it fails, then one step halfway back.

    ``run_one(name, n) -> row``; ``ok(row)`` says whether ``n`` was sustained.  The servers take
    turns at each ``n``, so a shared machine's background load falls on both alike.  A row with
    ``load_saturated`` (the load generator, not the server, was at its limit) still counts when
    it passed (the viewers did get the media), but a miss there is inconclusive rather than the
    server's failure: the climb ends and the halfway step below it is tried.  The time budget
    bounds it all.
    """
    state = {
        name: {"capacity": None, "first_failure": None, "inconclusive_at": None, "note": ""}
        for name in servers
    }
    active = list(servers)
    start = time.monotonic()
    for n in ladder:
        if not active:
            break
        if time.monotonic() - start > budget:
            for name in active:
                state[name]["note"] = f"time budget of {budget:.0f} s used up"
            break
        for name in list(active):
            row = run_one(name, n)
            st = state[name]
            passed = ok(row)
            if passed:
                st["capacity"] = n
            if row.get("load_saturated") and not row.get("error"):
                if passed:  # a pass is a pass: climb on, noting the load was at its limit
                    st["note"] = (
                        f"the load generator was at its limit from {unit}="
                        f"{st.get('load_bound_from') or n}: the capacity is at least "
                        "the largest sustained"
                    )
                    st.setdefault("load_bound_from", n)
                else:
                    st["inconclusive_at"] = n
                    st["note"] = (
                        f"the load generator was at its limit at {unit}={n}: that "
                        "miss may be the load's, not the server's"
                    )
                    active.remove(name)
            elif not passed:
                st["first_failure"] = n
                active.remove(name)
    for name in servers:  # one refinement step halfway between the last pass and the miss
        st = state[name]
        upper = st["first_failure"] or st["inconclusive_at"]
        if not (st["capacity"] and upper):
            continue
        if time.monotonic() - start > budget:
            break
        mid = int(round((st["capacity"] + upper) / 2 / step) * step)
        if not st["capacity"] < mid < upper:
            continue
        row = run_one(name, mid)
        if ok(row):
            st["capacity"] = mid
            if row.get("load_saturated"):
                st["note"] = (
                    f"the load generator was at its limit at {unit}={mid}: the "
                    "capacity is at least this"
                )
        elif not row.get("load_saturated") or row.get("error"):
            st["first_failure"] = mid
            st["inconclusive_at"] = None
    return state


def sweep(servers: list[str], args, flv: Path, fps: float, runs: list[dict]) -> dict:
    """Fan-out capacity: N doubles until fewer than 99 % of viewers keep up."""

    def one(name: str, n: int) -> dict:
        row = fanout_run(name, n, args, flv, fps)
        runs.append(row)
        print(format_row(row), flush=True)
        return row

    ladder = [n for n in LADDER if n <= args.max_viewers]
    return sweep_capacity(servers, ladder, one, sustained, args.sweep_budget, "N", 10)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.install_nms:
        return install_nms()
    common.install_signal_handlers()
    if args.full:
        return full(args)
    if args.quick:
        args.viewers, args.seconds, args.warmup, args.baseline = 20, 5.0, 1.0, 1.0
        args.sweep = False
    notes: list[str] = []
    status = 0
    report: dict = {"kind": "fanout", "argv": sys.argv[1:] if argv is None else argv}
    try:
        servers, missing = choose_servers(args.servers, notes)
        for note in notes:
            print("note:", note)
        if missing:
            status = 1
        flv = make_flv(FANOUT_FLV)
        media = flv_summary(flv)
        report["machine"] = machine_info()
        report["media"] = media
        print(
            f"publishing {media['file']}: {media['media_kbit_per_s']} kb/s, "
            f"{media['video_fps']} fps, GOP {media['gop_s']} s, "
            f"{media['duration_s']} s looped"
        )
        runs: list[dict] = []
        capacity: dict = {}
        print(header())
        if args.sweep:
            capacity = sweep(servers, args, flv, media["video_fps"], runs)
        else:
            for name in servers:
                row = fanout_run(name, args.viewers, args, flv, media["video_fps"])
                runs.append(row)
                print(format_row(row), flush=True)
        report["runs"] = runs
        report["ratios"] = compare(runs)
        print_ratios(report["ratios"])
        if capacity:
            report["capacity"] = capacity
            print("\ncapacity (largest N with >= 99 % of viewers keeping up):")
            for name, cap in capacity.items():
                extra = (
                    f", first failure at N={cap['first_failure']}" if cap["first_failure"] else ""
                )
                if cap["inconclusive_at"]:
                    extra += f", load-bound miss at N={cap['inconclusive_at']}"
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
            if (
                row.get("error")
                or row.get("latency_p50_ms") is None
                or row.get("server_alive") is False
            ):
                status = 1  # a run that did not run, the server died, or no viewer got media
    except BenchError as exc:
        print(f"fanout benchmark failed: {exc}", file=sys.stderr)
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


def full(args) -> int:
    """Everything RESULTS.md quotes, in one command.

    Installs node-media-server when missing (and goes on without it if that fails), runs the
    codec suites (pytest-benchmark, JSON kept), the fan-out sweep and the ingest sweep; every
    JSON lands in bench/work/ with one time stamp.
    """
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
