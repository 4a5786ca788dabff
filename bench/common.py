"""Shared plumbing of the fan-out and ingest harnesses: processes, /proc stats, media files.

Everything here stays on loopback, waits with a deadline and stops what it started.  Every
process is started through :func:`spawn` in its own session, recorded in a registry, and
:func:`stop_all` (run by the harnesses' ``finally`` and on SIGTERM) ends each of them by its own
process-group id: SIGTERM, a short grace, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from watchbuy.settings import Settings

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
WORK = BENCH / "work"
LOGS = WORK / "logs"
TMP = WORK / "tmp"
NMS_DIR = WORK / "nms"
NMS_VERSION = "4.4.3"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# The viewer-side FLV: 720p30 H.264 at ~2.5 Mb/s + 128 kb/s AAC, GOP 2 s, 20 s (looped).
FANOUT_FLV = WORK / "fanout_720p30.flv"
# The ingest-side FLV: ~600 kb/s in all (360p30 H.264 ~470 kb/s + 96 kb/s AAC), GOP 2 s.
INGEST_FLV = WORK / "ingest_600k.flv"

FLV_SPECS = {
    FANOUT_FLV: dict(size="1280x720", vbit="2500k", abit="128k", noise=12),
    INGEST_FLV: dict(size="640x360", vbit="470k", abit="96k", noise=8),
}
FLV_SECONDS = 20
FPS = 30


class BenchError(RuntimeError):
    """The benchmark could not run (a tool is missing, a server did not start...)."""


# -- processes ------------------------------------------------------------------------------------
_STARTED: list[subprocess.Popen] = []


def spawn(
    cmd: list[str],
    *,
    log_name: str | None = None,
    env: dict | None = None,
    cpus: str | None = None,
    stdin=subprocess.DEVNULL,
    stdout=None,
    cwd: Path | None = None,
) -> subprocess.Popen:
    """Start ``cmd`` in its own session (optionally pinned with taskset), remembered for cleanup."""
    if cpus is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpus, *cmd]
    out = stdout
    if out is None:
        if log_name:
            LOGS.mkdir(parents=True, exist_ok=True)
            out = open(LOGS / log_name, "wb")  # noqa: SIM115 - closed with the process
        else:
            out = subprocess.DEVNULL
    proc = subprocess.Popen(
        cmd,
        stdin=stdin,
        stdout=out,
        stderr=subprocess.STDOUT if stdout is None else None,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    if stdout is None and log_name:
        out.close()  # the child holds its own descriptor
    _STARTED.append(proc)
    return proc


def stop(proc: subprocess.Popen, grace: float = 3.0) -> int | None:
    """SIGTERM the process group we created for ``proc``, then SIGKILL after ``grace``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
    else:
        # The leader is gone; its group may still hold children (ffmpeg under taskset does not
        # fork, but be sure): a group id is ours only while some member lives.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if proc in _STARTED:
        _STARTED.remove(proc)
    return proc.returncode


def stop_all() -> None:
    for proc in reversed(list(_STARTED)):
        stop(proc, grace=2.0)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP behave like Ctrl-C: unwind through ``finally`` and stop everything."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    # also when started with SIGINT ignored (a background job of a non-interactive shell)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports the kernel says are free now."""
    socks, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def wait_port(port: int, proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(
                f"process {proc.args!r} exited with {proc.returncode} before "
                f"listening on port {port}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def cpu_plan(requested_server: str | None, requested_load: str | None) -> tuple[str | None, str]:
    """(cpus for the server, cpus for load/publishers): server on CPU 0, the rest elsewhere."""
    cpus = sorted(os.sched_getaffinity(0))
    have_taskset = shutil.which("taskset") is not None
    if requested_server == "none" or not have_taskset or len(cpus) < 2:
        server = None
    else:
        server = requested_server or str(cpus[0])
    if requested_load:
        load = requested_load
    elif server is None:
        load = ",".join(map(str, cpus))
    else:
        used = {int(c) for c in server.split(",") if c.isdigit()}
        load = ",".join(str(c) for c in cpus if c not in used) or ",".join(map(str, cpus))
    return server, load


# -- /proc --------------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may hold spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from the ppid field of every /proc/<n>/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(utime, stime) of the given processes (all their threads), in seconds."""
    user = system = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            user += int(fields[11])  # utime (field 14)
            system += int(fields[12])  # stime (field 15)
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the given processes (all their threads), in seconds."""
    return sum(cpu_split(pids))


def cpu_ticks(cpus: str | None) -> tuple[int, int]:
    """(busy, total) ticks of the given CPUs ("0", "1,2"; None: all) from /proc/stat."""
    wanted = None if cpus is None else {f"cpu{c}" for c in cpus.split(",")}
    busy = total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        if wanted is not None and name not in wanted:
            continue
        values = [
            int(x) for x in rest.split()[:8]
        ]  # user nice system idle iowait irq softirq steal
        total += sum(values)
        busy += sum(values) - values[3] - values[4]
    return busy, total


def machine_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy (by anyone) over the next ``seconds``."""
    b0, t0 = cpu_ticks(None)
    time.sleep(seconds)
    b1, t1 = cpu_ticks(None)
    return (b1 - b0) / max(1, t1 - t0)


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """On a shared machine: wait (at most ``max_wait`` s) until others leave the CPUs mostly idle.

    Returns the busy fraction last seen; the harness records it with the run.
    """
    deadline = time.monotonic() + max_wait
    busy = machine_busy(0.5)
    while busy > threshold and time.monotonic() < deadline:
        busy = machine_busy(1.0)
    return busy


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def rss_kb(pids: list[int]) -> int:
    return sum(_status_kb(p, "VmRSS") for p in pids)


def hwm_kb(pids: list[int]) -> int:
    """Sum of each process's peak resident set (VmHWM) since it started."""
    return sum(_status_kb(p, "VmHWM") for p in pids)


def connection_owner(server_port: int, client_port: int, pids: set[int]) -> int | None:
    """Which of ``pids`` holds the server side of the loopback connection from
    ``client_port`` (Linux: /proc/net/tcp gives the socket's inode, /proc/<pid>/fd its owner)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == server_port and \
                    int(remote.rsplit(":", 1)[1], 16) == client_port and fields[9] != "0":
                inode = fields[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
    return None


@dataclass
class TreeMeter:
    """CPU and memory of a process tree: marks at chosen moments, RSS sampled on demand."""

    pid: int
    pids: list[int] = field(default_factory=list)
    peak_rss_kb: int = 0

    def refresh(self) -> list[int]:
        self.pids = process_tree(self.pid)
        return self.pids

    def cpu(self) -> float:
        return cpu_seconds(self.refresh())

    def split(self) -> tuple[float, float]:
        return cpu_split(self.refresh())

    def sample_rss(self) -> int:
        rss = rss_kb(self.refresh())
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        return rss

    def peak_kb(self) -> int:
        return max(self.peak_rss_kb, hwm_kb(self.refresh()))


# -- an in-process media node ----------------------------------------------------------------------
def loopback_node_settings(node_id: str, stream_keys: dict[str, str], **changes) -> Settings:
    """Settings of a media node run in-process for a benchmark or a test: both listeners on
    127.0.0.1 at ports the kernel picks (0: runs never collide, nothing leaves the machine), no
    data folder; ``changes`` override any other field."""
    return Settings(
        node_id=node_id,
        rtmp_host="127.0.0.1",
        rtmp_port=0,
        http_host="127.0.0.1",
        http_port=0,
        stream_keys=dict(stream_keys),
        data_dir="",
    ).replace(**changes)


# -- media ---------------------------------------------------------------------------------------
def ffmpeg_path() -> str:
    path = shutil.which("ffmpeg")
    if not path:
        raise BenchError("ffmpeg is not installed (apt-get install ffmpeg)")
    return path


def make_flv(path: Path) -> Path:
    """Create (once) the test FLV at ``path``: testsrc2 with noise, H.264 + AAC, GOP 2 s."""
    if path.exists() and path.stat().st_size > 0:
        return path
    spec = FLV_SPECS[path]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.flv")
    cmd = [
        ffmpeg_path(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"testsrc2=size={spec['size']}:rate={FPS},"
                             f"noise=alls={spec['noise']}:allf=t",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
        "-t", str(FLV_SECONDS),
        "-c:v", "libx264", "-preset", "veryfast", "-b:v", spec["vbit"], "-maxrate", spec["vbit"],
        "-bufsize", str(2 * int(spec["vbit"][:-1])) + "k",
        "-g", str(2 * FPS), "-keyint_min", str(2 * FPS), "-sc_threshold", "0",
        "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", spec["abit"], "-f", "flv", str(tmp),
    ]  # fmt: skip
    print(f"making {path.name} with ffmpeg ({FLV_SECONDS} s, {spec['size']}) ...", flush=True)
    done = subprocess.run(cmd, capture_output=True, timeout=600)
    if done.returncode != 0 or not tmp.exists():
        raise BenchError(f"ffmpeg could not make {path}: {done.stderr.decode(errors='replace')}")
    os.replace(tmp, path)
    return path


def read_flv_tags(path: Path) -> list[tuple[int, int, bytes]]:
    from watchbuy.engine.codecs import flvmux

    return flvmux.FlvReader().feed(path.read_bytes())


def flv_summary(path: Path) -> dict:
    """Duration, bit rate, frame rate and GOP of an FLV file, measured from its tags."""
    from watchbuy.engine.codecs import flvmux

    tags = read_flv_tags(path)
    video = [(ts, p) for t, ts, p in tags if t == 9 and not flvmux.inspect_video(p)[3]]
    keys = [ts for ts, p in video if flvmux.inspect_video(p)[2]]
    media = [(t, ts, p) for t, ts, p in tags if t in (8, 9)]
    duration = (media[-1][1] - media[0][1]) / 1000 + 1 / FPS
    size = sum(len(p) for _, _, p in media)
    return {
        "file": str(path.relative_to(REPO)),
        "bytes": path.stat().st_size,
        "duration_s": round(duration, 3),
        "media_kbit_per_s": round(size * 8 / duration / 1000, 1),
        "video_fps": round(len(video) / duration, 2),
        "gop_s": round((keys[1] - keys[0]) / 1000, 3) if len(keys) > 1 else None,
    }


# -- node-media-server ---------------------------------------------------------------------------
NMS_SCRIPT = r"""// Written by bench/fanout at run time: node-media-server on loopback, no auth, no admin.
const NodeMediaServer = require("node-media-server");
const [rtmpPort, httpPort, dataDir] = process.argv.slice(2);
const config = {
  bind: "127.0.0.1",
  rtmp: { port: Number(rtmpPort) },
  http: { port: Number(httpPort) },
  store: { path: dataDir },
  record: { auto: false, path: dataDir + "/record" },
  notify: { url: "" },
  webadmin: { enable: false },
};
const nms = new NodeMediaServer(config, dataDir + "/config.json");
nms.run();
let stopping = false;
const quit = () => {
  if (stopping) { process.exit(0); }
  stopping = true;
  Promise.race([nms.stop(), new Promise((r) => setTimeout(r, 1500))]).then(() => process.exit(0));
};
process.on("SIGTERM", quit);
process.on("SIGINT", quit);
"""


def nms_installed() -> bool:
    pkg = NMS_DIR / "node_modules" / "node-media-server" / "package.json"
    try:
        return json.loads(pkg.read_text()).get("version") == NMS_VERSION
    except (OSError, ValueError):
        return False


def install_nms() -> int:
    """``npm install node-media-server@4.4.3`` into bench/work/nms (git-ignored)."""
    npm = shutil.which("npm")
    if not npm or not shutil.which("node"):
        print("node and npm are needed to install node-media-server", file=sys.stderr)
        return 1
    NMS_DIR.mkdir(parents=True, exist_ok=True)
    package = NMS_DIR / "package.json"
    if not package.exists():
        package.write_text('{"name": "watchbuy-bench-nms", "private": true}\n')
    cmd = [npm, "install", "--no-audit", "--no-fund", f"node-media-server@{NMS_VERSION}"]
    print("+ (cd bench/work/nms && npm " + " ".join(cmd[1:]) + ")", flush=True)
    try:
        done = subprocess.run(cmd, cwd=NMS_DIR, timeout=600)
    except subprocess.TimeoutExpired:
        print("npm install did not finish within 600 s", file=sys.stderr)
        return 1
    if done.returncode != 0 or not nms_installed():
        print(f"npm install failed (exit {done.returncode})", file=sys.stderr)
        return 1
    print(f"node-media-server {NMS_VERSION} installed in {NMS_DIR.relative_to(REPO)}")
    return 0


# -- the machine -----------------------------------------------------------------------------------
def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    return out.strip().splitlines()[0] if out.strip() else "?"


def machine_info() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from watchbuy.engine.codecs import implementations

    return {
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "ffmpeg": _version(["ffmpeg", "-version"]),
        "node": _version(["node", "--version"]),
        "node_media_server": NMS_VERSION if nms_installed() else "not installed",
        "watchbuy_codecs": implementations(),
        "taskset": shutil.which("taskset") is not None,
    }
