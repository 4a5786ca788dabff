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
        self.failures = 0
        self.ready = 0
        # a disk that is full stays full: one line per stream, at most a few a minute
        self.fail_log = LogLimiter(log, interval=60.0, lines=5)
        node.registry.listeners.append(self.on_stream)

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
            recording.finish()

    async def finish(self, recording: Recording) -> None:
        """Remux the FLV to a faststart MP4, probe it, upload it, tell the site."""
        if not recording.written or recording.start_ms is None:
            await asyncio.to_thread(_remove, recording.path)
            return  # no media was ever written: nothing to replay
        mp4 = recording.path.with_suffix(".mp4")
        try:
            await run_tool("ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
                           "-i", str(recording.path), "-c", "copy", "-movflags", "+faststart",
                           str(mp4))
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
        """``recording_ready`` (or ``recording_failed``) to the site through the publish hook."""
        info = {"name": recording.name, "started_at": recording.started_at,
                "ended_at": recording.ended_at or time.time(),
                "start_ms": recording.start_ms or 0}
        if ready is None:
            call, info["error"] = "recording_failed", recording.failed[:250]
        else:
            call = "recording_ready"
            info.update(ready)
        sender = getattr(self.node.authorizer, "recording", None)
        if sender is None:
            return  # static keys, no site: the file in the folder is all there is
        try:
            await sender(call, recording.app, recording.key, info)
        except Exception:
            log.exception("stream %s: telling the site about the recording failed",
                          recording.name)

    async def close(self) -> None:
        """At node stop: let the recordings that ended finish (bounded by the remux timeout)."""
        tasks = list(self.finishing)
        if tasks:
            await asyncio.wait(tasks, timeout=REMUX_TIMEOUT)


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
