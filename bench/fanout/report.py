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

from bench.fanout.common import WORK  # noqa: E402


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


def fanout_tables(report: dict) -> str:
    runs = [r for r in report.get("runs", [])]
    by = {(r["server"], r["viewers"]): r for r in runs}
    ns = sorted({r["viewers"] for r in runs})
    out = [
        "| N | keep-up % WB / NMS | CPU µs per viewer-s WB / NMS | NMS÷WB | "
        "p50 added ms WB / NMS | p99 added ms WB / NMS | late joiner ms WB / NMS | "
        "peak RSS MiB WB / NMS | server CPU % WB / NMS | user + sys % WB; NMS | "
        "others on server / load CPU % WB; NMS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in ns:
        wb, nm = by.get(("watchbuy", n), {}), by.get(("nms", n), {})

        def pair(key, spec="{:.1f}", wb=wb, nm=nm):
            return (
                f"{fmt(wb.get(key), spec) if wb else '–'} / {fmt(nm.get(key), spec) if nm else '–'}"
            )

        flags = []
        for name, row in (("WB", wb), ("NMS", nm)):
            if row.get("error"):
                flags.append(f"{name} error: {row['error']}")
            if row.get("load_saturated"):
                flags.append(f"{name}: load generator at its limit")
        cont = f"{contention(wb) if wb else '–'}; {contention(nm) if nm else '–'}"

        def split(row):
            if not row or row.get("cpu_user_pct") is None:
                return "–"
            return f"{row['cpu_user_pct']:.0f} + {row['cpu_sys_pct']:.0f}"

        out.append(
            f"| {n} | {pair('keeping_up_pct')} | {pair('cpu_us_per_viewer_s', '{:.0f}')} | "
            f"{ratio(nm.get('cpu_us_per_viewer_s'), wb.get('cpu_us_per_viewer_s'))} | "
            f"{pair('latency_p50_ms')} | {pair('latency_p99_ms')} | "
            f"{pair('late_ttfk_median_ms')} | {pair('peak_rss_mib')} | {pair('cpu_pct', '{:.0f}')} | "
            f"{split(wb)}; {split(nm)} | "
            f"{cont}{' — ' + '; '.join(flags) if flags else ''} |"
        )
    text = "\n".join(out) + "\n"
    cap = report.get("capacity")
    if cap:
        text += "\n| capacity (≥ 99 % keep up) | largest N sustained | first N missed | note |\n"
        text += "|---|---|---|---|\n"
        for name, c in cap.items():
            miss = c.get("first_failure") or (
                f"{c['inconclusive_at']} (load-bound)" if c.get("inconclusive_at") else "–"
            )
            label = "WatchBuy" if name == "watchbuy" else "node-media-server"
            text += f"| {label} | {c.get('capacity') or '–'} | {miss} | {c.get('note') or ''} |\n"
    return text


def ingest_tables(report: dict) -> str:
    runs = report.get("runs", [])
    by = {(r["server"], r["publishers"]): r for r in runs}
    ks = sorted({r["publishers"] for r in runs})
    out = [
        "| K | keeps up WB / NMS | live publishers WB / NMS | CPU µs per publisher-s WB / NMS "
        "| NMS÷WB | server CPU % WB / NMS | probe p50 / p99 ms WB | probe p50 / p99 ms NMS "
        "| end lag ms WB / NMS | peak RSS MiB WB / NMS | others on server / load CPU % "
        "WB; NMS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in ks:
        wb, nm = by.get(("watchbuy", k), {}), by.get(("nms", k), {})

        def pair(key, spec="{:.1f}", wb=wb, nm=nm):
            return (
                f"{fmt(wb.get(key), spec) if wb else '–'} / {fmt(nm.get(key), spec) if nm else '–'}"
            )

        def lat(row):
            if not row:
                return "–"
            return (
                f"{fmt(row.get('probe_latency_p50_ms'))} / {fmt(row.get('probe_latency_p99_ms'))}"
            )

        notes = []
        for name, row in (("WB", wb), ("NMS", nm)):
            if row.get("error"):
                notes.append(f"{name} error: {row['error']}")
            if row.get("load_saturated"):
                notes.append(f"{name}: publisher process at its limit")
            for err, count in (row.get("publisher_errors") or {}).items():
                notes.append(f"{name}: {count}× {err}")
        cont = f"{contention(wb) if wb else '–'}; {contention(nm) if nm else '–'}"
        out.append(
            f"| {k} | {pair('sustained', '{}')} | {pair('publishing', '{}')} | "
            f"{pair('cpu_us_per_publisher_s', '{:.0f}')} | "
            f"{ratio(nm.get('cpu_us_per_publisher_s'), wb.get('cpu_us_per_publisher_s'))} | "
            f"{pair('cpu_pct', '{:.0f}')} | {lat(wb)} | {lat(nm)} | "
            f"{pair('probe_end_lag_max_ms', '{:.0f}')} | {pair('peak_rss_mib')} | "
            f"{cont}{' — ' + '; '.join(notes) if notes else ''} |"
        )
    text = "\n".join(out) + "\n"
    cap = report.get("capacity")
    if cap:
        text += "\n| publishers on one core | largest K sustained | first K missed | note |\n"
        text += "|---|---|---|---|\n"
        for name, c in cap.items():
            miss = c.get("first_failure") or (
                f"{c['inconclusive_at']} (load-bound)" if c.get("inconclusive_at") else "–"
            )
            label = "WatchBuy" if name == "watchbuy" else "node-media-server"
            text += f"| {label} | {c.get('capacity') or '–'} | {miss} | {c.get('note') or ''} |\n"
    return text


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fanout.report")
    p.add_argument("--fanout")
    p.add_argument("--ingest")
    p.add_argument("--codecs")
    args = p.parse_args(argv)
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
