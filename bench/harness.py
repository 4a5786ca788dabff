"""What the fan-out and ingest harnesses share: one measured run, its figures, the table, the
capacity sweep, the command-line options and the command's frame.

A harness (``bench.fanout.run``, ``bench.ingest.run``) describes itself with a :class:`Harness`
(what it counts, how one run goes, its table and its ratios) and hands it to :func:`main`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import common
from bench.common import (
    BenchError,
    cpu_plan,
    flv_summary,
    machine_info,
    make_flv,
    nms_installed,
    sleep_until,
    spawn,
    stop,
)
from bench.fanout.servers import LABELS, make_server

KEEP_UP = 0.90  # a viewer keeps up: >= 90 % of the window's media received


# -- one run ---------------------------------------------------------------------------------------
@dataclass
class Run:
    """One server's run: the server (started), the row of results, where the load goes."""

    server: object
    row: dict
    run_id: str
    load_cpus: str | None
    procs: list[subprocess.Popen] = field(default_factory=list)  # stopped before the server


def measured_run(
    kind: str, name: str, count_key: str, n: int, streams: int, args, body: Callable[[Run], None]
) -> dict:
    """Start server ``name`` (``streams`` streams), run ``body``, stop everything; the row.

    The row starts with the run's settings (``count_key``: ``n``); ``body`` adds its figures.
    A failure of the run is recorded as the row's ``error``, never raised.
    """
    server_cpus, load_cpus = cpu_plan(args.server_cpus, args.load_cpus)
    run_id = f"{kind}-{n}"
    server = make_server(name, streams, server_cpus, getattr(args, "workers", 1))
    row: dict = {
        "server": name,
        count_key: n,
        "seconds": args.seconds,
        "server_cpus": server_cpus,
        "load_cpus": load_cpus,
    }
    if args.quiet_wait > 0:
        row["machine_busy_before_pct"] = round(100 * common.wait_quiet(args.quiet_wait), 1)
    run = Run(server, row, run_id, load_cpus)
    try:
        server.start(run_id)
        body(run)
    except BenchError as exc:
        row["error"] = str(exc)
    except (OSError, ValueError, KeyError) as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for proc in run.procs:
            stop(proc)
        row["server_exit"] = server.stop()
    return row


def note_server(row: dict, server) -> None:
    """After the window: is the server still alive, and its peak RSS."""
    row["server_alive"] = server.alive()
    row["peak_rss_mib"] = round(server.meter.peak_kb() / 1024, 1)


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

        def mark(edge: int) -> None:  # CPU of the server and of the load processes
            marks[f"t{edge}"] = time.monotonic()
            marks[f"server_split{edge}"] = meter.split()
            marks[f"server_cpu{edge}"] = sum(marks[f"server_split{edge}"])
            marks[f"load_cpu{edge}"] = sum(m.cpu() for m in load_meters)
            marks[f"server_core{edge}"] = common.cpu_ticks(server.cpus)
            marks[f"load_core{edge}"] = common.cpu_ticks(cpus)

        # sample RSS until the window opens, then mark CPU (server and load processes)
        while time.monotonic() < t_start - sample_every:
            meter.sample_rss()
            time.sleep(sample_every)
        sleep_until(t_start)
        mark(0)
        api_at = t_end - 0.6  # the server's own view, while every viewer is still on
        while time.monotonic() < t_end - sample_every:
            meter.sample_rss()
            if api_at and time.monotonic() >= api_at:
                marks["server_api"] = server.api(api_path)
                api_at = 0
            time.sleep(sample_every)
        sleep_until(t_end)
        mark(1)
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


# -- figures ---------------------------------------------------------------------------------------
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


def merge_hist(results: Iterable[dict]) -> dict[int, int]:
    """The load processes' latency histograms (string keys in their JSON) as one."""
    hist: dict[int, int] = {}
    for r in results:
        for k, c in r["hist"].items():
            hist[int(k)] = hist.get(int(k), 0) + c
    return hist


def count_errors(errors: Iterable[str]) -> dict[str, int]:
    """How often each error (its first 80 characters) occurred; empty strings are no error."""
    out: dict[str, int] = {}
    for error in errors:
        if error:
            out[error[:80]] = out.get(error[:80], 0) + 1
    return out


def media_received(viewer: dict, fps: float, window: float) -> float:
    """The share of the window's media a viewer got: by frames, or by the time they span."""
    return min(viewer["vframes"] / (fps * window), viewer["span_ms"] / 1000 / window)


def server_cpu(marks: dict) -> tuple[float, float]:
    """(the server tree's CPU seconds over the window, the seconds that really passed)."""
    return marks["server_cpu1"] - marks["server_cpu0"], max(1e-3, marks["t1"] - marks["t0"])


def cpu_us_per_unit_s(marks: dict, units: int) -> float:
    """The server's CPU microseconds per viewer- (or publisher-) second."""
    cpu, cpu_window = server_cpu(marks)
    return round(cpu / (units * cpu_window) * 1e6, 2)


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
    cpu, window = server_cpu(marks)
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


def side_by_side(runs: list[dict], count_key: str) -> Iterator[tuple[int, dict, dict]]:
    """(size, WatchBuy's row, node-media-server's row) at every size both ran without error."""
    by = {(r["server"], r[count_key]): r for r in runs if not r.get("error")}
    for (server, n), wb in sorted(by.items(), key=lambda kv: kv[0][1]):
        if server == "watchbuy" and ("nms", n) in by:
            yield n, wb, by[("nms", n)]


# -- the table -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Table:
    """A plain-text table: ``columns`` of (row key, title, format), each at least ``width`` wide;
    ``flags`` (row key, text) are noted after a row where the key is true."""

    columns: tuple[tuple[str, str, str], ...]
    width: int
    flags: tuple[tuple[str, str], ...]

    def header(self) -> str:
        return " ".join(title.rjust(max(len(title), self.width)) for _, title, _ in self.columns)

    def format_row(self, row: dict, more_flags: Iterable[str] = ()) -> str:
        cells = []
        for key, title, fmt in self.columns:
            value = row.get(key)
            text = "-" if value is None else fmt.format(value)
            cells.append(text.rjust(max(len(title), self.width)))
        line = " ".join(cells)
        if row.get("error"):
            line += f"  ERROR: {row['error']}"
        else:
            flags = [text for key, text in self.flags if row.get(key)]
            flags.extend(more_flags)
            if flags:
                line += "  (" + "; ".join(flags) + ")"
        return line


def results_table(
    count_key: str,
    unit: str,
    measures: tuple[tuple[str, str, str], ...],
    width: int,
    saturated: str,
) -> Table:
    """A harness's table: server and size, its ``measures``, then peak RSS and the load's CPU;
    a row notes a saturated load generator (as ``saturated``) and CPU contention."""
    return Table(
        columns=(
            ("server", "server", "{}"),
            (count_key, unit, "{}"),
            *measures,
            ("peak_rss_mib", "RSS MiB", "{:.1f}"),
            ("load_cpu_pct", "load%", "{:.0f}"),
        ),
        width=width,
        flags=(("load_saturated", saturated), ("contended", "CPU contended by other processes")),
    )


# -- servers and the sweep -------------------------------------------------------------------------
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


def print_capacity(capacity: dict, report: dict, title: str, unit: str) -> None:
    """Each server's capacity, and WatchBuy's over node-media-server's into ``report``."""
    print(f"\n{title}:")
    for name, cap in capacity.items():
        extra = f", first failure at {unit}={cap['first_failure']}" if cap["first_failure"] else ""
        if cap["inconclusive_at"]:
            extra += f", load-bound miss at {unit}={cap['inconclusive_at']}"
        note = f" ({cap['note']})" if cap["note"] else ""
        print(f"  {LABELS[name]}: {cap['capacity']}{extra}{note}")
    wb, nm = capacity.get("watchbuy"), capacity.get("nms")
    if wb and nm and wb["capacity"] and nm["capacity"]:
        report["capacity_ratio_watchbuy_over_nms"] = round(wb["capacity"] / nm["capacity"], 2)
        print(
            f"  capacity WatchBuy / node-media-server: "
            f"{report['capacity_ratio_watchbuy_over_nms']}x"
        )


# -- the command -----------------------------------------------------------------------------------
def add_run_options(
    p, count_key: str, unit: str, *, budget: float, seconds: float, warmup_help: str
) -> None:
    """The options of what is run: servers, the size (``--<count_key>``), sweep, window."""
    p.add_argument(
        "--servers",
        help="comma list of watchbuy,nms (default: both when node-media-"
        "server is installed, else watchbuy)",
    )
    p.add_argument(
        f"--{count_key}", type=int, default=100, help=f"{unit} for a single run (default 100)"
    )
    p.add_argument("--sweep", action="store_true", help="find each server's capacity")
    p.add_argument(
        f"--max-{count_key}", type=int, default=3200, help="sweep ceiling (default 3200)"
    )
    p.add_argument(
        "--sweep-budget",
        type=float,
        default=budget,
        help=f"seconds of sweeping in all, at most (default {budget:g})",
    )
    p.add_argument(
        "--seconds", type=float, default=seconds, help=f"measurement window (default {seconds:g})"
    )
    p.add_argument("--warmup", type=float, default=2.0, help=f"{warmup_help} (default 2)")


def add_machine_options(p, *, load_help: str, quick_help: str, raw_help: str) -> None:
    """The options of where it runs and what is kept: CPUs, quick pass, quiet wait, JSON."""
    p.add_argument("--server-cpus", help="taskset list for the server (default: CPU 0; 'none')")
    p.add_argument("--load-cpus", help=f"taskset list for {load_help} (default: rest)")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for the machine's CPUs to "
        "be mostly idle (a shared machine; default 0: do not wait)",
    )
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--raw", action="store_true", help=raw_help)


def no_notes(row: dict) -> list[str]:
    return []


@dataclass(frozen=True)
class Harness:
    """What makes one harness: the command's frame (:func:`main`) is the same for both."""

    kind: str  # "fanout", "ingest": the report's kind, run ids, the failure message
    count_key: str  # "viewers", "publishers": the row's size and the option --<count_key>
    unit: str  # "N", "K"
    flv: Path  # the media file, made when missing
    ladder: tuple[int, ...]  # the sweep's sizes
    describe_media: Callable[[dict], str]  # the line printed about the media file
    run: Callable[..., dict]  # (server, n, args, flv, media) -> row
    sustained: Callable[[dict], bool]  # the row's server kept up
    table: Table  # the printed results (results_table)
    ratios: Callable[[list[dict], dict], None]  # (runs, report): into the report, printed
    capacity_title: str
    failed: Callable[[dict], bool]  # the row makes the command fail
    quick: dict[str, float | int]  # --quick: these option values, one run per server, no sweep
    row_notes: Callable[[dict], list[str]] = no_notes  # notes after the flags of a row


def run_and_print(harness: Harness, args, flv: Path, media: dict, runs: list[dict]):
    """``run_one(name, n) -> row`` that also keeps and prints the row."""

    def run_one(name: str, n: int) -> dict:
        row = harness.run(name, n, args, flv, media)
        runs.append(row)
        print(harness.table.format_row(row, harness.row_notes(row)), flush=True)
        return row

    return run_one


def sweep(harness: Harness, servers: list[str], args, flv: Path, media: dict, runs: list[dict]):
    """Each server's capacity up the harness's ladder (to ``--max-<count_key>``)."""
    ceiling = getattr(args, f"max_{harness.count_key}")
    ladder = [n for n in harness.ladder if n <= ceiling]
    one = run_and_print(harness, args, flv, media, runs)
    return sweep_capacity(
        servers, ladder, one, harness.sustained, args.sweep_budget, harness.unit, 10
    )


def main(harness: Harness, args, argv: list[str]) -> int:
    """Runs (one per server, or the sweep), the table, ratios and capacity; the JSON; the status."""
    common.install_signal_handlers()
    if args.quick:
        for option, value in harness.quick.items():
            setattr(args, option, value)
        args.sweep = False
    notes: list[str] = []
    status = 0
    report: dict = {"kind": harness.kind, "argv": argv}
    try:
        servers, missing = choose_servers(args.servers, notes)
        for note in notes:
            print("note:", note)
        if missing:
            status = 1
        flv = make_flv(harness.flv)
        media = flv_summary(flv)
        report["machine"] = machine_info()
        report["media"] = media
        print(harness.describe_media(media))
        runs: list[dict] = []
        capacity: dict = {}
        print(harness.table.header())
        if args.sweep:
            capacity = sweep(harness, servers, args, flv, media, runs)
        else:
            one = run_and_print(harness, args, flv, media, runs)
            for name in servers:
                one(name, getattr(args, harness.count_key))
        report["runs"] = runs
        harness.ratios(runs, report)
        if capacity:
            report["capacity"] = capacity
            print_capacity(capacity, report, harness.capacity_title, harness.unit)
        if any(harness.failed(row) for row in runs):
            status = 1
    except BenchError as exc:
        print(f"{harness.kind} benchmark failed: {exc}", file=sys.stderr)
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
