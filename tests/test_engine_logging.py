"""JSON-lines logs (``WATCHBUY_LOG_FORMAT=json``) with a connection id on every line about a
connection: a real ``watchbuy media`` process, a real malformed peer, its drop line read back."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from watchbuy.cli import JsonFormatter, TextFormatter, log_format
from watchbuy.settings import ConfigError


async def test_a_json_logging_node_names_the_connection_it_drops(tmp_path):
    env = {**os.environ, "WATCHBUY_LOG_FORMAT": "json", "WATCHBUY_RTMP_HOST": "127.0.0.1",
           "WATCHBUY_HTTP_HOST": "127.0.0.1", "WATCHBUY_RTMP_PORT": "0",
           "WATCHBUY_HTTP_PORT": "0", "WATCHBUY_STREAM_KEYS": "key1=show1",
           "WATCHBUY_DATA_DIR": str(tmp_path), "WATCHBUY_NODE_ID": "json-node",
           "WATCHBUY_WORKERS": "1"}
    node = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "watchbuy", "media", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    lines: list[str] = []
    try:
        while True:  # the start line names the ports the kernel chose
            line = (await asyncio.wait_for(node.stderr.readline(), 30)).decode()
            assert line, "the media node exited: " + "".join(lines)
            lines.append(line)
            ports = re.search(r"RTMP on [\d.]+:(\d+), HTTP-FLV on [\d.]+:(\d+)", line)
            if ports:
                rtmp_port, http_port = map(int, ports.groups())
                break
        reader, writer = await asyncio.open_connection("127.0.0.1", rtmp_port)
        writer.write(b"\x09" + bytes(1536))  # RTMP version 9: a malformed handshake
        assert await asyncio.wait_for(reader.read(), 10) == b""  # dropped
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
        writer.write(b"BAD\r\n\r\n")
        assert b" 400 " in await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        node.terminate()
        _out, err = await asyncio.wait_for(node.communicate(), 10)
    lines = "".join(lines + [err.decode()]).splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    drops = [r for r in records if "dropping connection" in r["message"]]
    assert len(drops) == 1, lines
    assert drops[0]["level"] == "WARNING" and drops[0]["logger"] == "watchbuy.engine.rtmp"
    assert drops[0]["conn_id"].startswith("r") and len(drops[0]["conn_id"]) == 7
    refused = [r for r in records if "malformed request line" in r["message"]]
    assert len(refused) == 1 and refused[0]["conn_id"].startswith("h"), lines
    assert refused[0]["conn_id"] != drops[0]["conn_id"]
    assert not any("conn_id" in r for r in records if "media node" in r["message"])


def test_a_bad_log_format_is_one_clear_error():
    with pytest.raises(ConfigError, match="WATCHBUY_LOG_FORMAT"):
        log_format({"WATCHBUY_LOG_FORMAT": "xml"})
    assert log_format({"WATCHBUY_LOG_FORMAT": " JSON "}) == "json"
    assert log_format({}) == "text"
    result = subprocess.run([sys.executable, "-m", "watchbuy", "media"], capture_output=True,
                            text=True, env={**os.environ, "WATCHBUY_LOG_FORMAT": "xml"},
                            timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "WATCHBUY_LOG_FORMAT" in result.stderr


def test_both_formats_print_a_connection_or_request_id_when_a_record_has_one():
    def record(**extra) -> logging.LogRecord:
        rec = logging.LogRecord("watchbuy.site", logging.INFO, __file__, 1, "hello %s",
                                ("world",), None)
        rec.__dict__.update(extra)
        return rec

    entry = json.loads(JsonFormatter().format(record(request_id="req-1")))
    assert entry["message"] == "hello world" and entry["request_id"] == "req-1"
    assert entry["time"].endswith("Z") and "conn_id" not in entry
    assert "[conn_id=r00000f] hello world" in TextFormatter().format(record(conn_id="r00000f"))
    assert TextFormatter().format(record()).endswith("watchbuy.site: hello world")
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record()
        rec.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(JsonFormatter().format(rec))["exception"]
