"""Recording every publish: FLV while live, a seekable MP4 (faststart) when it ends.

A :class:`Recorder` listens on the stream registry like the LL-HLS service.  At ``publish`` it
gives the :class:`~watchbuy.engine.relay.LiveStream` a :class:`Recording`; the relay's
``flush`` hands it each batch of tags after the viewers got theirs.  The recording keeps the
tags' FLV bytes (the very bytes HTTP-FLV viewers get, encoded once) in a list and a writer task
writes them to ``<record_dir>/<name>-<time>.flv`` in a worker thread, so a slow or full disk
never holds up the event loop and the fan-out.  What waits to be written is bounded
(``WATCHBUY_RECORD_MAX_BUFFER``): a disk that cannot keep up, or any write error (ENOSPC),
stops that recording only, with one log line; the live stream and its viewers go on.

When the publish ends the FLV is remuxed with ffmpeg (``-c copy -movflags +faststart``: every
browser, iPhone Safari included, can seek in it at once), probed with ffprobe for its duration,
uploaded to S3 when ``WATCHBUY_RECORD_S3_BUCKET`` is set (boto3), and the site is told through
the publish hook (``recording_ready`` with the file, URL, duration, size, the wall-clock span and
the media timestamp the file starts at, which the site needs to place pins in the replay).
At most ``WATCHBUY_RECORD_REMUX_CONCURRENCY`` remuxes run at once: streams ending together wait
their turn rather than start an ffmpeg each.

A report the site does not take (unreachable, restarting, a 5xx) is retried in the background
with a doubling wait, for about two days; until it is taken it is kept in
``<record_dir>/pending-reports.json`` (``pending-reports-<worker>.json`` for each worker of
several), so a node restarted meanwhile retries it too.  Once an hour (and at start) the node
(its first worker) sweeps its folder: FLVs no recording is writing and untouched for an hour (a
remux that failed, a node stopped mid-publish) and MP4s older than
``WATCHBUY_RECORD_RETENTION_DAYS`` are deleted, with one log line per sweep.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from watchbuy.engine.codecs import flvmux
from watchbuy.engine.http import stream_tracks
from watchbuy.engine.wire import MSG_AUDIO, MSG_VIDEO
from watchbuy.logs import LogLimiter

if TYPE_CHECKING:
    from watchbuy.engine.node import MediaNode
    from watchbuy.engine.relay import LiveStream, Tag

log = logging.getLogger("watchbuy.engine.record")

# Writes are batched: a write when this much waits, or after WRITE_INTERVAL seconds.
WRITE_BATCH_BYTES = 256 * 1024
WRITE_INTERVAL = 0.5
REMUX_TIMEOUT = 600.0
# Reports the site did not take: retried after 5 s, 10 s, 20 s ... at most an hour apart,
# given up after REPORT_ATTEMPTS (about two days); at most PENDING_MAX kept (oldest dropped).
PENDING_FILE = "pending-reports.json"
REPORT_RETRY_BASE = 5.0
REPORT_RETRY_MAX = 3600.0
REPORT_ATTEMPTS = 60
PENDING_MAX = 1000
SWEEP_INTERVAL = 3600.0
# An FLV not written for this long and not a live recording's is left over (never remuxed):
# long enough for a sibling worker's recording (written every half second while live, then
# waiting for a remux slot and remuxed within REMUX_TIMEOUT), which this worker cannot see.
LEFTOVER_FLV_AGE = 3600.0


def write_all(handle, chunks: list[bytes]) -> int:
    """Write ``chunks`` to the open file ``handle`` (in a worker thread); bytes written.

    One function, so a test can stand in a failing disk (ENOSPC) at exactly this boundary.
    """
    handle.writelines(chunks)
    handle.flush()
    return sum(map(len, chunks))


class Recording:
    """One publish being recorded: tags buffered in memory, written by a task off the loop."""

    def __init__(self, recorder: Recorder, stream: LiveStream, path: Path) -> None:
        self.recorder = recorder
        self.stream = stream
        self.name = stream.name
        self.key = ""  # the publisher's stream key, known once it owns the stream (finish)
        self.app = stream.app
        self.path = path
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.start_ms: int | None = None  # the first media timestamp written
        self.last_ms = 0
        self.header_written = False
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.written = 0
        self.failed = ""
        self.ending = False
        self._wake = asyncio.Event()
        self._handle = None
        self.task = asyncio.ensure_future(self._write_forever())

    # -- from the relay (the hot path: keep references, count, wake the writer) ---------------
    def add(self, tags: list[Tag]) -> None:
        if self.failed or self.ending:
            return
        chunks = self.chunks
        if not self.header_written:
            media = [t for t in tags if t.type_id == MSG_VIDEO or t.type_id == MSG_AUDIO]
            if not media:
                return  # script data before any track: nothing a player could start from
            self.header_written = True
            has_audio, has_video = stream_tracks(self.stream)
            chunks.append(flvmux.flv_header(has_audio or not has_video, has_video))
            stream = self.stream
            # what this batch does not carry and a player needs first, as an FLV viewer gets
            for tag in (stream.metadata_tag, stream.video_header, stream.audio_header):
                if tag is not None and all(tag is not t for t in tags):
                    chunks.append(tag.flv)
                    self.buffered += len(tag.flv)
            self.start_ms = media[0].timestamp
        for tag in tags:
            data = tag.flv
            chunks.append(data)
            self.buffered += len(data)
        self.last_ms = tags[-1].timestamp
        if self.buffered > self.recorder.max_buffer:
            self.fail(f"the disk fell behind: more than {self.recorder.max_buffer} bytes "
                      "waited to be written (WATCHBUY_RECORD_MAX_BUFFER)")
        elif self.buffered >= WRITE_BATCH_BYTES:
            self._wake.set()

    def finish(self) -> None:
        """The publish ended: write what is left, then remux, upload and report."""
        self.key = getattr(self.stream.owner, "publish_key", "") or ""
        self.ending = True
        self.ended_at = time.time()
        self._wake.set()

    def fail(self, why: str) -> None:
        """Stop this recording (once, one line); the live stream is not touched."""
        if self.failed:
            return
        self.key = getattr(self.stream.owner, "publish_key", "") or ""
        self.failed = why
        self.chunks = []
        self.buffered = 0
        self.recorder.failures += 1
        self.recorder.fail_log.log(
            logging.ERROR, "stream %s: recording stopped: %s; the live stream goes on",
            self.name, why, key="failed")
        self._wake.set()

    # -- the writer ----------------------------------------------------------------------------
    async def _write_forever(self) -> None:
        try:
            while not self.failed:
                try:
                    await asyncio.wait_for(self._wake.wait(), WRITE_INTERVAL)
                except TimeoutError:
                    pass
                self._wake.clear()
                await self._write_pending()
                if self.ending:
                    break
        finally:
            await asyncio.to_thread(self._close)
        if self.failed:
            await asyncio.to_thread(_remove, self.path)
            await self.recorder.report(self, None)
            return
        await self.recorder.finish(self)

    async def _write_pending(self) -> None:
        if not self.chunks or self.failed:
            return
        chunks, self.chunks, self.buffered = self.chunks, [], 0
        try:
            self.written += await asyncio.to_thread(self._write, chunks)
        except OSError as exc:
            self.fail(f"cannot write {self.path}: {exc.strerror or exc}")

    def _write(self, chunks: list[bytes]) -> int:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "wb")  # noqa: SIM115 - closed by _close
        return write_all(self._handle, chunks)

    def _close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except OSError as exc:  # the last buffered bytes did not fit
                if not self.failed:
                    self.fail(f"cannot write {self.path}: {exc.strerror or exc}")


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def safe_name(name: str) -> str:
    """A stream name as part of a file name (names are public and checked, but never trust)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "stream"


class Recorder:
    """The node's recordings: one per live stream, and the remux/upload/report after each."""

    def __init__(self, node: MediaNode) -> None:
        self.node = node
        settings = node.settings
        self.folder = Path(settings.record_dir or Path(settings.data_dir) / "recordings")
        self.max_buffer = settings.record_max_buffer
        self.bucket = settings.record_s3_bucket
        self.prefix = settings.record_s3_prefix
        self.region = settings.aws_region or None
        self.recordings: dict[str, Recording] = {}
        self.finishing: set[asyncio.Task] = set()
        self.ending: set[Recording] = set()  # ended, being written out or remuxed
        self.failures = 0
        self.ready = 0
        self.retention_days = settings.record_retention_days
        # ffmpeg processes at once: N streams ending together do not start N remuxes
        self.remux_slots = asyncio.Semaphore(settings.record_remux_concurrency)
        # reports waiting for the site (kept in PENDING_FILE): {call, app, key, info,
        # attempts, next_at (wall clock, so it means the same after a restart)}
        self.pending: list[dict] = []
        self._pending_changed = asyncio.Event()
        self.pending_path = self.folder / PENDING_FILE
        self._file_lock = asyncio.Lock()  # one writer of the pending file at a time
        self._tasks: list[asyncio.Task] = []
        # a disk that is full stays full: one line per stream, at most a few a minute
        self.fail_log = LogLimiter(log, interval=60.0, lines=5)
        self.report_log = LogLimiter(log, interval=60.0, lines=3)
        node.registry.listeners.append(self.on_stream)

    def start(self) -> None:
        """At node start: the reports a previous run left, the retry loop and the sweep."""
        cluster = self.node.cluster
        if cluster is not None:  # workers share the folder: a file each (the same at restart)
            self.pending_path = self.folder / f"pending-reports-{cluster.index}.json"
        self.pending = _read_pending(self.pending_path)
        if self.pending:
            log.info("%d recording reports from before the restart will be retried",
                     len(self.pending))
        self._tasks = [asyncio.ensure_future(self._report_forever())]
        if cluster is None or cluster.index == 1:  # one sweeper per folder
            self._tasks.append(asyncio.ensure_future(self._sweep_forever()))

    def on_stream(self, event: str, stream: LiveStream) -> None:
        cluster = self.node.cluster
        if event == "publish" and cluster is not None and stream.name not in cluster.claims:
            return  # a copy pulled from the sibling worker that records it (engine/interworker.py)
        if event == "publish":
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            path = self.folder / f"{safe_name(stream.name)}-{stamp}-{os.urandom(3).hex()}.flv"
            recording = Recording(self, stream, path)
            stream.recording = recording
            self.recordings[stream.name] = recording
        elif event == "publish_done":
            recording, stream.recording = stream.recording, None
            if recording is None:
                return
            if self.recordings.get(stream.name) is recording:
                del self.recordings[stream.name]
            self.finishing.add(recording.task)
            recording.task.add_done_callback(self.finishing.discard)
            self.ending.add(recording)  # its FLV is the sweep's to leave alone
            recording.task.add_done_callback(lambda _task: self.ending.discard(recording))
            recording.finish()

    async def finish(self, recording: Recording) -> None:
        """Remux the FLV to a faststart MP4, probe it, upload it, tell the site."""
        if not recording.written or recording.start_ms is None:
            await asyncio.to_thread(_remove, recording.path)
            return  # no media was ever written: nothing to replay
        mp4 = recording.path.with_suffix(".mp4")
        try:
            async with self.remux_slots:
                await run_tool("ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
                               "-i", str(recording.path), "-c", "copy",
                               "-movflags", "+faststart", str(mp4))
                duration = await probe_duration(mp4)
            size = mp4.stat().st_size
            url = ""
            if self.bucket:
                key = f"{self.prefix}{mp4.name}"
                await asyncio.to_thread(upload, self.bucket, key, mp4, self.region)
                url = f"https://{self.bucket}.s3.amazonaws.com/{key}"
                await asyncio.to_thread(_remove, mp4)
        except Exception as exc:  # ffmpeg, the disk or S3 (botocore's errors are their own)
            recording.failed = f"remux or upload failed: {exc}"
            self.failures += 1
            self.fail_log.log(logging.ERROR, "stream %s: recording not finished: %s",
                              recording.name, exc, key="failed")
            await asyncio.to_thread(_remove, mp4)
            await self.report(recording, None)
            return
        await asyncio.to_thread(_remove, recording.path)  # the MP4 has everything
        self.ready += 1
        log.info("stream %s: recording ready: %s (%.1f s, %d bytes)", recording.name,
                 url or mp4, duration, size)
        await self.report(recording, {"file": mp4.name, "url": url, "duration": duration,
                                      "size": size})

    async def report(self, recording: Recording, ready: dict | None) -> None:
        """``recording_ready`` (or ``recording_failed``) to the site through the publish hook:
        queued (and kept on disk) for the retry loop, which sends it at once."""
        if getattr(self.node.authorizer, "recording", None) is None:
            return  # static keys, no site: the file in the folder is all there is
        info = {"name": recording.name, "started_at": recording.started_at,
                "ended_at": recording.ended_at or time.time(),
                "start_ms": recording.start_ms or 0}
        if ready is None:
            call, info["error"] = "recording_failed", recording.failed[:250]
        else:
            call = "recording_ready"
            info.update(ready)
        if len(self.pending) >= PENDING_MAX:
            dropped = self.pending.pop(0)
            self.report_log.warning("full", "more than %d recording reports wait for the "
                                    "site: the oldest (%s) is dropped", PENDING_MAX,
                                    dropped["info"].get("name"))
        self.pending.append({"call": call, "app": recording.app, "key": recording.key,
                             "info": info, "attempts": 0, "next_at": 0.0})
        await self._persist()
        self._pending_changed.set()

    async def _persist(self) -> None:
        """The pending file as the list stands now (a disk error: logged, kept in memory)."""
        async with self._file_lock:
            try:
                await asyncio.to_thread(_save_pending, self.pending_path, list(self.pending))
            except OSError as exc:
                self.report_log.error("file", "cannot keep recording reports in %s: %s",
                                      self.pending_path, exc)

    async def _report_forever(self) -> None:
        """Send the due reports one at a time; a failure waits twice as long as the last."""
        while True:
            self._pending_changed.clear()
            now = time.time()
            changed = False
            for entry in [e for e in self.pending if e["next_at"] <= now]:
                if all(e is not entry for e in self.pending):
                    continue  # dropped (PENDING_MAX) while another was being sent
                taken = await self._send(entry)
                entry["attempts"] += 1
                if taken or entry["attempts"] >= REPORT_ATTEMPTS:
                    if not taken:
                        self.report_log.error(
                            "gave_up", "stream %s: %s not taken by the site after %d tries: "
                            "given up (the file stays in the folder)", entry["info"].get("name"),
                            entry["call"], entry["attempts"])
                    self.pending = [e for e in self.pending if e is not entry]
                else:
                    entry["next_at"] = time.time() + min(
                        REPORT_RETRY_MAX, REPORT_RETRY_BASE * 2 ** (entry["attempts"] - 1))
                changed = True
            if changed:
                await self._persist()
            wait = min((e["next_at"] for e in self.pending), default=now + SWEEP_INTERVAL)
            try:
                await asyncio.wait_for(self._pending_changed.wait(),
                                       max(0.05, wait - time.time()))
            except TimeoutError:
                pass

    async def _send(self, entry: dict) -> bool:
        """One try; True when the site took the report (or refused it for good)."""
        sender = getattr(self.node.authorizer, "recording", None)
        if sender is None:
            return True
        try:
            return bool(await sender(entry["call"], entry["app"], entry["key"], entry["info"]))
        except Exception:
            log.exception("stream %s: telling the site about the recording failed",
                          entry["info"].get("name"))
            return False

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("record folder sweep failed")
            await asyncio.sleep(SWEEP_INTERVAL)

    async def sweep(self) -> tuple[int, int]:
        """Delete left-over FLVs and MP4s past the retention; (FLVs, MP4s) deleted."""
        busy = {r.path for r in self.recordings.values()} | {r.path for r in self.ending}
        return await asyncio.to_thread(_sweep_folder, self.folder, busy, self.retention_days)

    async def close(self) -> None:
        """At node stop: let the recordings that ended finish (bounded by the remux timeout);
        reports the site has not taken stay in the pending file for the next start."""
        tasks = list(self.finishing)
        if tasks:
            await asyncio.wait(tasks, timeout=REMUX_TIMEOUT)
        if self.pending and self._tasks:
            await asyncio.sleep(0)  # a report queued by a finishing task gets its first try
            try:
                await asyncio.wait_for(self._settled(), 5.0)
            except TimeoutError:
                pass
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        # what the site has not taken, as it stands now (the loop may have been cancelled
        # between a send and its write)
        await self._persist()

    async def _settled(self) -> None:
        """Until no report is due now (sent, or waiting for a later retry)."""
        while any(e["attempts"] == 0 for e in self.pending):
            await asyncio.sleep(0.05)


def _read_pending(path: Path) -> list[dict]:
    """The reports a previous run left (a damaged file is logged and started afresh)."""
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s): its recording reports are lost", path, exc)
        return []
    keep = [e for e in entries if isinstance(e, dict) and isinstance(e.get("info"), dict)
            and e.get("call") in ("recording_ready", "recording_failed")] \
        if isinstance(entries, list) else []
    for entry in keep:
        entry["next_at"] = 0.0  # retried at once after a restart
        entry["attempts"] = int(entry.get("attempts") or 0)
    return keep[-PENDING_MAX:]


def _save_pending(path: Path, entries: list[dict]) -> None:
    """Replace the pending file at once (a crash mid-write leaves the old one)."""
    if not entries:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(entries))
    os.replace(temp, path)


def _sweep_folder(folder: Path, busy: set[Path], retention_days: float) -> tuple[int, int]:
    """In a worker thread: delete left-over FLVs and old MP4s, one log line."""
    now = time.time()
    flvs = mp4s = freed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0, 0
    for entry in entries:
        path = Path(entry.path)
        try:
            info = entry.stat()
        except FileNotFoundError:
            continue
        age = now - info.st_mtime
        if path.suffix == ".flv" and path not in busy and age > LEFTOVER_FLV_AGE:
            flvs += 1
        elif path.suffix == ".mp4" and retention_days and age > retention_days * 86400:
            mp4s += 1
        else:
            continue
        _remove(path)
        freed += info.st_size
    log.info("record folder %s swept: %d left-over FLVs and %d MP4s older than %g days "
             "deleted (%.1f MB)", folder, flvs, mp4s, retention_days, freed / 1e6)
    return flvs, mp4s


async def run_tool(tool: str, *args: str) -> str:
    """Run ffmpeg or ffprobe; its output, or RuntimeError with what it said."""
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"{tool} is not installed")
    proc = await asyncio.create_subprocess_exec(
        path, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), REMUX_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{tool} took more than {REMUX_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} exited {proc.returncode}: "
                           f"{err.decode(errors='replace').strip()[:200]}")
    return out.decode(errors="replace")


async def probe_duration(path: Path) -> float:
    out = await run_tool("ffprobe", "-v", "error", "-show_entries", "format=duration",
                         "-of", "json", str(path))
    try:
        return round(float(json.loads(out)["format"]["duration"]), 3)
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(f"ffprobe gave no duration for {path.name}") from None


def upload(bucket: str, key: str, path: Path, region: str | None = None) -> None:
    """Put the MP4 in S3 (in a worker thread); boto3's upload_file does multipart for big
    files.  Credentials come from boto3's usual chain (AWS_* variables, the instance role)."""
    import boto3

    boto3.client("s3", region_name=region).upload_file(str(path), bucket, key,
                                   ExtraArgs={"ContentType": "video/mp4"})
