"""Markdown tables from the JSON results, for bench/RESULTS.md (numbers copied, never typed).

    python -m bench.fanout.report [--fanout F.json] [--ingest I.json] [--codecs C.json]

Without arguments it takes the newest ``bench/work/{fanout-full,ingest-full,codecs}-*.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import WORK  # noqa: E402


def newest(pattern: str) -> Path | None:
    found = sorted(WORK.glob(pattern))
    return found[-1] if found else None


def fmt(value, spec: str = "{:.1f}") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return spec.format(value)


def ratio(a, b) -> str:
    if a is None or b is None or not b:
        return "–"
    return f"{a / b:.2f}×"


def machine(report: dict) -> str:
    m = report.get("machine", {})
    return (
        f"- CPUs: {m.get('nproc')} (`nproc`), {m.get('cpu_model')}; kernel {m.get('kernel')}\n"
        f"- Python {m.get('python')}; ffmpeg {' '.join(str(m.get('ffmpeg')).split()[2:3])}; "
        f"node {m.get('node')}; "
        f"node-media-server {m.get('node_media_server')}; WatchBuy codecs "
        f"{m.get('watchbuy_codecs')}\n"
    )


def contention(row: dict) -> str:
    return (
        f"{fmt(row.get('other_on_server_core_pct'), '{:.0f}')} / "
        f"{fmt(row.get('other_on_load_core_pct'), '{:.0f}')}"
    )


def side_by_side_table(report: dict, count_key: str, head: str, cells) -> str:
    """One row a size run (smallest first): ``cells(size, WatchBuy's row, NMS's row)``, each row
    ``{}`` for a server that did not run that size; 11 columns under ``head``."""
    runs = report.get("runs", [])
    by = {(r["server"], r[count_key]): r for r in runs}
    out = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in sorted({r[count_key] for r in runs}):
        out.append(cells(n, by.get(("watchbuy", n), {}), by.get(("nms", n), {})))
    return "\n".join(out) + "\n"


def pair(wb: dict, nm: dict, key: str, spec: str = "{:.1f}") -> str:
    """``WatchBuy / node-media-server``; – for a server that did not run."""
    return f"{fmt(wb.get(key), spec) if wb else '–'} / {fmt(nm.get(key), spec) if nm else '–'}"


def notes(wb: dict, nm: dict, saturated: str, publisher_errors: bool = False) -> str:
    """Contention on both sides, then (after a dash) errors and load-bound runs."""
    found = []
    for name, row in (("WB", wb), ("NMS", nm)):
        if row.get("error"):
            found.append(f"{name} error: {row['error']}")
        if row.get("load_saturated"):
            found.append(f"{name}: {saturated}")
        if publisher_errors:
            for err, count in (row.get("publisher_errors") or {}).items():
                found.append(f"{name}: {count}× {err}")
    cont = f"{contention(wb) if wb else '–'}; {contention(nm) if nm else '–'}"
    return f"{cont}{' — ' + '; '.join(found) if found else ''}"


def capacity_table(report: dict, title: str) -> str:
    """The sweep's capacities (empty without a sweep); ``title`` heads the table."""
    cap = report.get("capacity")
    if not cap:
        return ""
    text = f"\n{title}\n"
    text += "|---|---|---|---|\n"
    for name, c in cap.items():
        miss = c.get("first_failure") or (
            f"{c['inconclusive_at']} (load-bound)" if c.get("inconclusive_at") else "–"
        )
        label = "WatchBuy" if name == "watchbuy" else "node-media-server"
        text += f"| {label} | {c.get('capacity') or '–'} | {miss} | {c.get('note') or ''} |\n"
    return text


def cpu_split(row: dict) -> str:
    if not row or row.get("cpu_user_pct") is None:
        return "–"
    return f"{row['cpu_user_pct']:.0f} + {row['cpu_sys_pct']:.0f}"


def probe_latency(row: dict) -> str:
    if not row:
        return "–"
    return f"{fmt(row.get('probe_latency_p50_ms'))} / {fmt(row.get('probe_latency_p99_ms'))}"


def fanout_tables(report: dict) -> str:
    def cells(n: int, wb: dict, nm: dict) -> str:
        return (
            f"| {n} | {pair(wb, nm, 'keeping_up_pct')} | "
            f"{pair(wb, nm, 'cpu_us_per_viewer_s', '{:.0f}')} | "
            f"{ratio(nm.get('cpu_us_per_viewer_s'), wb.get('cpu_us_per_viewer_s'))} | "
            f"{pair(wb, nm, 'latency_p50_ms')} | {pair(wb, nm, 'latency_p99_ms')} | "
            f"{pair(wb, nm, 'late_ttfk_median_ms')} | {pair(wb, nm, 'peak_rss_mib')} | "
            f"{pair(wb, nm, 'cpu_pct', '{:.0f}')} | {cpu_split(wb)}; {cpu_split(nm)} | "
            f"{notes(wb, nm, 'load generator at its limit')} |"
        )

    head = (
        "| N | keep-up % WB / NMS | CPU µs per viewer-s WB / NMS | NMS÷WB | "
        "p50 added ms WB / NMS | p99 added ms WB / NMS | late joiner ms WB / NMS | "
        "peak RSS MiB WB / NMS | server CPU % WB / NMS | user + sys % WB; NMS | "
        "others on server / load CPU % WB; NMS |"
    )
    return side_by_side_table(report, "viewers", head, cells) + capacity_table(
        report, "| capacity (≥ 99 % keep up) | largest N sustained | first N missed | note |"
    )


def ingest_tables(report: dict) -> str:
    def cells(k: int, wb: dict, nm: dict) -> str:
        return (
            f"| {k} | {pair(wb, nm, 'sustained', '{}')} | {pair(wb, nm, 'publishing', '{}')} | "
            f"{pair(wb, nm, 'cpu_us_per_publisher_s', '{:.0f}')} | "
            f"{ratio(nm.get('cpu_us_per_publisher_s'), wb.get('cpu_us_per_publisher_s'))} | "
            f"{pair(wb, nm, 'cpu_pct', '{:.0f}')} | {probe_latency(wb)} | {probe_latency(nm)} | "
            f"{pair(wb, nm, 'probe_end_lag_max_ms', '{:.0f}')} | {pair(wb, nm, 'peak_rss_mib')} | "
            f"{notes(wb, nm, 'publisher process at its limit', publisher_errors=True)} |"
        )

    head = (
        "| K | keeps up WB / NMS | live publishers WB / NMS | CPU µs per publisher-s WB / NMS "
        "| NMS÷WB | server CPU % WB / NMS | probe p50 / p99 ms WB | probe p50 / p99 ms NMS "
        "| end lag ms WB / NMS | peak RSS MiB WB / NMS | others on server / load CPU % "
        "WB; NMS |"
    )
    return side_by_side_table(report, "publishers", head, cells) + capacity_table(
        report, "| publishers on one core | largest K sustained | first K missed | note |"
    )


def codec_table(report: dict) -> str:
    benches = report.get("benchmarks", [])
    by_name = {b["name"]: b for b in benches}
    out = [
        "| benchmark | compiled (best) | twin (best) | compiled ÷ twin | goal ≥ 20× |",
        "|---|---|---|---|---|",
    ]
    for b in benches:
        name = b["name"]
        if "cython" not in name:
            continue
        twin = by_name.get(name.replace("cython", "python"))
        if not twin:
            continue
        fast, slow = b["stats"]["min"], twin["stats"]["min"]
        size = b.get("extra_info", {}).get("bytes")
        if size:
            shown_fast = f"{size / fast / 1e6:,.0f} MB/s"
            shown_slow = f"{size / slow / 1e6:,.0f} MB/s"
        else:
            shown_fast = f"{fast * 1e6:,.2f} µs"
            shown_slow = f"{slow * 1e6:,.2f} µs"
        speed = slow / fast
        label = re.sub(r"-?cython-?", "", name).replace("[]", "")
        out.append(
            f"| `{label}` ({b.get('group') or ''}) | {shown_fast} | {shown_slow} | "
            f"{speed:.1f}× | {'met' if speed >= 20 else 'not met'} |"
        )
    return "\n".join(out) + "\n"


def capacity_runs_table(report: dict) -> str:
    """A capacity sweep with the bulk load: each run's delivery, p99, and the server's CPU beside
    the load's, then the largest N at p99 <= 100 and <= 200 ms."""
    media = report.get("media", {})
    out = [
        f"Stream: `{media.get('file')}`, {media.get('media_kbit_per_s')} kb/s of media.\n",
        "| server | N | at full rate % | p50 / p99 added ms (20 probes) | server CPU % | "
        "server µs per viewer-s | load CPU % (bulk µs per viewer-s) | peak RSS MiB | "
        "others on server / load CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(report.get("runs", []), key=lambda r: (r["server"], r["viewers"])):
        label = "WatchBuy" if r["server"] == "watchbuy" else "node-media-server"
        if r.get("error"):
            out.append(f"| {label} | {r['viewers']} | error: {r['error'][:60]} |||||||")
            continue
        out.append(
            f"| {label} | {r['viewers']} | {fmt(r.get('keeping_up_pct'))} | "
            f"{fmt(r.get('latency_p50_ms'))} / {fmt(r.get('latency_p99_ms'))} | "
            f"{fmt(r.get('cpu_pct'), '{:.0f}')} | {fmt(r.get('cpu_us_per_viewer_s'), '{:.0f}')} | "
            f"{fmt(r.get('load_cpu_pct'), '{:.0f}')} "
            f"({fmt(r.get('bulk_cpu_us_per_viewer_s'), '{:.0f}')}) | "
            f"{fmt(r.get('peak_rss_mib'))} | {contention(r)} |"
        )
    text = "\n".join(out) + "\n"
    caps = report.get("capacity_at_p99") or {}
    if caps:
        text += "\n| largest N, ≥ 99 % at full rate | " + " | ".join(
            "WatchBuy" if s == "watchbuy" else "node-media-server"
            for s in next(iter(caps.values()))
        ) + " |\n|---|" + "---|" * len(next(iter(caps.values()))) + "\n"
        for limit, by_server in caps.items():
            text += f"| p99 ≤ {limit} ms | " + " | ".join(
                str(v) if v else "–" for v in by_server.values()) + " |\n"
    return text


def llhls_table(report: dict) -> str:
    """LL-HLS viewers: delivery, the part delivery delay, the server's CPU beside the load's."""
    out = [
        "| N | keeping up % | part delivery p50 / p99 ms | server CPU % | "
        "server µs per viewer-s | viewers per core (1 s ÷ µs per viewer-s) | load CPU % | "
        "peak RSS MiB | others on server / load CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(report.get("runs", []), key=lambda r: r["viewers"]):
        if r.get("error"):
            out.append(f"| {r['viewers']} | error: {r['error'][:60]} |||||||")
            continue
        per = r.get("cpu_us_per_viewer_s")
        out.append(
            f"| {r['viewers']} | {fmt(r.get('keeping_up_pct'))} | "
            f"{fmt(r.get('latency_p50_ms'))} / {fmt(r.get('latency_p99_ms'))} | "
            f"{fmt(r.get('cpu_pct'), '{:.0f}')} | {fmt(per, '{:.0f}')} | "
            f"{fmt(1e6 / per if per else None, '{:.0f}')} | "
            f"{fmt(r.get('load_cpu_pct'), '{:.0f}')}"
            f"{' (load-bound)' if r.get('load_saturated') else ''} | "
            f"{fmt(r.get('peak_rss_mib'))} | {contention(r)} |"
        )
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fanout.report")
    p.add_argument("--fanout")
    p.add_argument("--ingest")
    p.add_argument("--codecs")
    p.add_argument("--capacity", nargs="*", default=[],
                   help="capacity sweeps with the bulk load (bench.fanout --sweep): their tables")
    p.add_argument("--llhls", nargs="*", default=[],
                   help="LL-HLS runs (bench.fanout --protocol llhls): their tables")
    args = p.parse_args(argv)
    if args.capacity or args.llhls:
        for path in args.capacity:
            print(f"<!-- capacity: {Path(path).name} -->")
            print(capacity_runs_table(json.loads(Path(path).read_text())))
        for path in args.llhls:
            print(f"<!-- llhls: {Path(path).name} -->")
            print(llhls_table(json.loads(Path(path).read_text())))
        return 0
    paths = {
        "fanout": Path(args.fanout) if args.fanout else newest("fanout-full-*.json"),
        "ingest": Path(args.ingest) if args.ingest else newest("ingest-full-*.json"),
        "codecs": Path(args.codecs) if args.codecs else newest("codecs-*.json"),
    }
    for kind, path in paths.items():
        if path is None or not path.exists():
            print(f"<!-- no {kind} results -->\n")
            continue
        report = json.loads(path.read_text())
        print(f"<!-- {kind}: {path.name} -->")
        if kind == "fanout":
            print(machine(report))
            print(fanout_tables(report))
        elif kind == "ingest":
            print(ingest_tables(report))
        else:
            print(codec_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
