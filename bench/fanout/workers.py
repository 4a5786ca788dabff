"""Issue 10's benchmark: one WatchBuy media node as one worker process and as two.

Usage (from the repository root, with the project's virtualenv)::

    python -m bench.fanout.workers --viewers 400 --json bench/work/workers.json

1. **CPU per viewer-second**, 2 workers against 1 at the same total N: the fan-out run of
   bench/fanout/run.py (a looped 720p30 publisher, N HTTP-FLV viewers, the server's whole
   process tree's CPU over the window) once with ``--workers 1`` and once with ``--workers 2``,
   on the same CPUs.  Reported as the ratio 2-workers / 1-worker (the target: at most 1.15).
2. **The inter-worker hop**: with 2 workers, ``--hop-probes`` timed viewers on the publishing
   worker and as many on the other one (each connection steered to its worker through /proc,
   as the tests do); for every tag, its arrival on the other worker minus its median arrival
   on the publishing worker.  Reported as p50 and p99 in ms.

Every other option of ``python -m bench.fanout`` (``--seconds``, ``--warmup``, ``--server-cpus``,
``--load-cpus``, ``--media``, ``--quiet-wait``, ...) applies to both runs.  The server's CPUs
default as there: CPU 0 (so both workers share one core); on a quiet machine with cores to
spare, ``--server-cpus 0,1`` gives each worker its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/fanout/workers.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import common  # noqa: E402
from bench.common import BenchError, connection_owner, cpu_plan, flv_summary, make_flv  # noqa: E402
from bench.fanout import run  # noqa: E402
from bench.fanout.load import HttpFlvViewer  # noqa: E402
from bench.fanout.servers import WatchBuy, wait_stream_live  # noqa: E402

CPU_TARGET = 1.15  # the bound: 2 workers cost at most 15 % more per viewer-second


async def steered_viewer(port: int, pid: int, path: str, t_start: float, t_end: float,
                         tries: int = 400) -> HttpFlvViewer:
    """A timed HTTP-FLV viewer whose connection the kernel gave to worker ``pid``."""
    loop = asyncio.get_running_loop()
    for _ in range(tries):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
        except OSError:
            sock.close()
            await asyncio.sleep(0.02)
            continue
        owner = None
        for _ in range(20):  # the server side is listed once the worker has accepted it
            owner = connection_owner(port, sock.getsockname()[1], {pid})
            if owner is not None:
                break
            await asyncio.sleep(0.005)
        if owner == pid:
            viewer = HttpFlvViewer("127.0.0.1", port, path, t_start, t_end)
            viewer.t_connect = time.monotonic()
            await loop.create_connection(lambda v=viewer: v, sock=sock)
            return viewer
        sock.close()
    raise BenchError(f"no connection reached worker pid {pid}")


def arrivals(viewer: HttpFlvViewer) -> dict[int, float]:
    """Tag timestamp (ms) -> arrival (monotonic s), for the media tags in the window; the
    first arrival of a timestamp when audio and video share one."""
    out: dict[int, float] = {}
    for lat, at in zip(viewer.lat, viewer.lat_t, strict=True):
        out.setdefault(round((at - lat) * 1000), at)
    return out


def hop_figures(origin: list[HttpFlvViewer], other: list[HttpFlvViewer]) -> dict:
    """Each tag's arrival on the other worker minus its median arrival on the publisher's."""
    reference: dict[int, float] = {}
    origin_arrivals = [arrivals(v) for v in origin]
    for ts in set.intersection(*(set(a) for a in origin_arrivals)):
        reference[ts] = statistics.median(a[ts] for a in origin_arrivals)
    hops = sorted(
        (at - reference[ts]) * 1000
        for viewer in other for ts, at in arrivals(viewer).items() if ts in reference)
    if not hops:
        raise BenchError("no tag arrived on both workers inside the window")

    def pick(q: float) -> float:
        return round(hops[min(len(hops) - 1, int(q * len(hops)))], 3)

    return {"hop_tags": len(hops), "hop_p50_ms": pick(0.50), "hop_p99_ms": pick(0.99),
            "hop_max_ms": round(hops[-1], 3)}


def hop_run(args, flv: Path) -> dict:
    """Two workers, one publisher, ``--hop-probes`` timed viewers on each worker."""
    server_cpus, load_cpus = cpu_plan(args.server_cpus, args.load_cpus)
    server = WatchBuy(1, server_cpus, workers=2)
    row: dict = {"workers": 2, "hop_probes": args.hop_probes, "seconds": args.hop_seconds,
                 "server_cpus": server_cpus, "load_cpus": load_cpus}
    publisher = None
    try:
        server.start("workers-hop")
        publisher = run.start_publisher(server, flv, load_cpus, "workers-hop")
        wait_stream_live(server, 0)
        stream = next(iter((server.api("/api/streams") or {}).get("streams", [])), None)
        workers = (server.api("/api/server") or {}).get("workers", [])
        if stream is None or stream.get("worker") is None or len(workers) != 2:
            raise BenchError(f"the node did not list its stream and two workers: {workers}")
        pids = {w["index"]: w["pid"] for w in workers}
        origin_pid = pids[stream["worker"]]
        other_pid = next(pid for pid in pids.values() if pid != origin_pid)

        async def measure() -> dict:
            path = server.play_path(0)
            never = float("inf")  # no window until every probe is on
            origin = [await steered_viewer(server.http_port, origin_pid, path, never, never)
                      for _ in range(args.hop_probes)]
            other = [await steered_viewer(server.http_port, other_pid, path, never, never)
                     for _ in range(args.hop_probes)]
            # The window opens once the last probe's start-up burst (the cached GOP, sent at
            # once on join) is over: only live tags, as they arrive on each worker, count.
            t_start = time.monotonic() + 3.0
            t_end = t_start + args.hop_seconds
            for viewer in origin + other:
                viewer.t_start, viewer.t_end = t_start, t_end
            await asyncio.sleep(max(0.0, t_end - time.monotonic()) + 0.2)
            for viewer in origin + other:
                viewer.close()
            errors = [v.error for v in origin + other if v.error]
            if errors:
                raise BenchError(f"probe errors: {errors}")
            return hop_figures(origin, other)

        row.update(asyncio.run(measure()))
    except BenchError as exc:
        row["error"] = str(exc)
    finally:
        if publisher is not None:
            common.stop(publisher)
        server.stop()
    return row


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m bench.fanout.workers",
                                description=__doc__.split("\n")[0], add_help=False)
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of each configuration, in ABBA order; medians compared "
                   "(default 3)")
    p.add_argument("--hop-probes", type=int, default=4,
                   help="timed viewers on each worker for the hop figures (default 4)")
    p.add_argument("--hop-seconds", type=float, default=10.0,
                   help="the hop measurement's window (default 10)")
    ours, rest = p.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        p.print_help()
        print("\nand the options of python -m bench.fanout:")
    fanout = run.parse_args(rest)
    return ours, fanout


def main(argv: list[str] | None = None) -> int:
    ours, args = parse_args(sys.argv[1:] if argv is None else argv)
    common.install_signal_handlers()
    flv = make_flv(run.MEDIA[args.media])
    media = flv_summary(flv)
    print(run.describe_media(media))
    report: dict = {"kind": "workers", "argv": sys.argv[1:] if argv is None else argv,
                    "machine": common.machine_info(), "media": media, "runs": []}
    print(run.TABLE.header())
    figures: dict[int, dict[str, list[float]]] = {1: {}, 2: {}}
    errors = []
    # ABBA order (1, 2, 2, 1, 1, 2, ...): a machine getting busier or quieter during the
    # runs weighs on both configurations alike.
    order = [w for i in range(ours.repeat) for w in ((1, 2) if i % 2 == 0 else (2, 1))]
    for workers in order:
        args.workers = workers
        row = run.fanout_run("watchbuy", args.viewers, args, flv, media)
        row["workers"] = workers
        report["runs"].append(row)
        print(f"{run.TABLE.format_row(row, [])}  ({workers} worker{'s' * (workers > 1)})",
              flush=True)
        if row.get("error") or not row.get("cpu_us_per_viewer_s"):
            errors.append(str(row.get("error") or "no CPU figure"))
            continue
        for key in ("cpu_us_per_viewer_s", "marginal_cpu_us_per_viewer_s"):
            figures[workers].setdefault(key, []).append(row[key])
    status = 0
    if figures[1] and figures[2]:
        for key, label in (("cpu_us_per_viewer_s", "CPU per viewer-second"),
                           ("marginal_cpu_us_per_viewer_s",
                            "marginal CPU per viewer-second (publisher-only CPU taken off)")):
            one = statistics.median(figures[1][key])
            two = statistics.median(figures[2][key])
            ratio = round(two / one, 3)
            report[f"{key}_median"] = {"1": one, "2": two, "ratio_2_over_1": ratio}
            print(f"\n{label}, 2 workers / 1 worker at N={args.viewers}, medians of "
                  f"{len(figures[2][key])} and {len(figures[1][key])} runs: {ratio}x "
                  f"({two:.1f} / {one:.1f} us; target <= {CPU_TARGET})")
    else:
        status = 1
        print("\nno CPU ratio: " + "; ".join(errors))
    hop = hop_run(argparse.Namespace(**vars(args), **vars(ours)), flv)
    report["hop"] = hop
    if hop.get("error"):
        status = 1
        print(f"inter-worker hop: failed: {hop['error']}")
    else:
        print(f"inter-worker hop ({hop['hop_tags']} tag arrivals, {ours.hop_probes} probes per "
              f"worker): p50 {hop['hop_p50_ms']} ms, p99 {hop['hop_p99_ms']} ms, "
              f"max {hop['hop_max_ms']} ms")
    if args.json:  # bench.fanout's --json: both runs, the ratio and the hop figures
        Path(args.json).write_text(json.dumps(report, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
