"""Configuration: ``WATCHBUY_*`` environment variables, an optional env file, laptop defaults.

Every setting is a field of :class:`Settings` with a default that runs on a laptop with nothing
else installed.  Values come from (highest first) the process environment, then the env file
named by ``WATCHBUY_ENV_FILE`` (or ``./watchbuy.env`` when it exists), then the default.  A bad
value raises :class:`ConfigError` whose text is one line naming the variable; the command line
prints it and exits 1.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import secrets
import socket
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from watchbuy import urls
from watchbuy.net import parse_networks

PREFIX = "WATCHBUY_"


MAX_WORKERS = 256  # media worker processes: far past any instance's cores


class ConfigError(Exception):
    """A setting has a value we cannot use."""


def _default_node_id() -> str:
    # Instance ids / host names are what ops see in the dashboard; keep them URL-safe.
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "node"


@dataclass
class Settings:
    # media node
    node_id: str = field(default_factory=_default_node_id)
    public_host: str = "127.0.0.1"
    rtmp_host: str = "0.0.0.0"
    rtmp_port: int = 1935
    http_host: str = "0.0.0.0"
    http_port: int = 8000
    apps: list[str] = field(default_factory=lambda: ["live"])
    stream_keys: dict[str, str] = field(default_factory=dict)
    publish_hook_url: str = ""
    hook_secret: str = ""
    gop_max_frames: int = 1024
    gop_max_bytes: int = 16 * 1024 * 1024
    viewer_queue_bytes: int = 1024 * 1024
    stall_timeout: float = 10.0
    out_chunk_size: int = 4096
    max_message_size: int = 0xFFFFFF
    # HTTP limits (engine/http.py): what one HTTP client may cost the node.
    http_max_head: int = 16384  # bytes of one request head
    http_max_buffer: int = 1024 * 1024  # unanswered pipelined bytes held per connection
    http_requests_per_turn: int = 32  # pipelined requests answered before others get a turn
    header_timeout: float = 10.0  # seconds to complete a request head once a connection opens
    keepalive_timeout: float = 15.0  # seconds an idle keep-alive connection is kept
    drain_timeout: float = 5.0  # seconds a closing answer may wait for a peer that does not read
    # RTMP and connection limits (times in seconds; a timeout or cap of 0 is off)
    handshake_timeout: float = 10.0  # handshake + connect must be done within this
    partial_message_timeout: float = 30.0  # an unfinished message with no progress this long
    publish_idle_timeout: float = 10.0  # a publisher without media this long is ended
    idle_connection_timeout: float = 30.0  # connected, neither publishing nor playing
    publish_takeover_grace: float = 1.0  # the same key replaces a publisher silent this long
    max_connections_per_ip: int = 200
    per_ip_limit_loopback: bool = False  # loopback is exempt unless this is set (tests, bench)
    # networks exempt from the per-address cap: the CDN's and load balancers' origin-facing
    # ranges, from which thousands of viewers arrive (CIDR entries, comma-separated)
    per_ip_exempt: list[str] = field(default_factory=list)
    # the operator's token (Authorization: Bearer …): /api/streams with publisher addresses,
    # and /metrics from other than loopback; "" = neither (a separate secret from the hook's,
    # which must never travel in a request header)
    operator_token: str = ""
    fd_reserve: int = 64  # refuse connections this close (or 5 %) to the soft RLIMIT_NOFILE
    metadata_max_fields: int = 64  # publisher onMetaData: scalar fields kept
    metadata_max_bytes: int = 8192  # publisher onMetaData: key + string bytes kept
    # unfinished chunked messages: per connection (count, bytes) and for the whole node
    max_partial_messages: int = 64
    max_partial_bytes: int = 32 * 1024 * 1024  # one 0xFFFFFF message and some more
    node_partial_bytes: int = 512 * 1024 * 1024
    # AMF commands and metadata: values and bytes a message may expand to (references count
    # as many times as they are used)
    amf_max_nodes: int = 65536
    amf_max_expanded_bytes: int = 16 * 1024 * 1024
    # LL-HLS (engine/hls.py, engine/hls_http.py): every live stream as CMAF parts and segments
    hls: bool = True  # mux every live stream for LL-HLS at publish (off: no HLS routes)
    hls_part_target: float = 0.334  # seconds per part (EXT-X-PART-INF PART-TARGET)
    hls_segment_target: float = 2.0  # seconds per segment; segments follow the GOP from here
    hls_window_segments: int = 10  # complete segments kept in memory and in the playlist
    hls_max_segment_seconds: float = 10.0  # a segment is cut without a keyframe this long
    hls_max_pending_audio: int = 512  # audio frames held while video stalls
    hls_block_timeout: float = 0.0  # a blocking request waits this long, then 503; 0: 3 x TD
    hls_ended_keep: float = 30.0  # an ended stream's playlist (with ENDLIST) is kept this long
    # recordings (engine/record.py): every publish as FLV, then a faststart MP4 for replays
    record: bool = True
    record_dir: str = ""  # default: <data_dir>/recordings
    record_max_buffer: int = 32 * 1024 * 1024  # bytes waiting for the disk; past it: stopped
    record_s3_bucket: str = ""  # upload the MP4 here (boto3's credentials and region)
    record_s3_prefix: str = "recordings/"
    aws_region: str = ""  # the bucket's region (WATCHBUY_AWS_REGION, as the site's); "": boto3's
    record_remux_concurrency: int = 2  # ffmpeg remuxes at once; more ended streams wait
    # the node's own sweep of its record folder: MP4s older than this are deleted (the site's
    # WATCHBUY_RECORD_RETENTION_DAYS expires their rows); 0 keeps them
    record_retention_days: float = 30.0
    # cue points (engine/cues.py): a signed call is accepted this long after its timestamp,
    # and each stream remembers at most this many nonces (one stream cannot block others)
    cue_max_age: float = 30.0
    cue_nonces_per_stream: int = 1024
    # worker processes (engine/workers.py): "auto" = one per core, or a number; unset means
    # auto for ``watchbuy media`` and 1 for ``watchbuy serve``
    workers: str = ""
    worker_drain_seconds: float = 300.0  # SIGTERM: publishers get this long to end, then cut
    worker_restart_delay: float = 0.5  # a worker that died is restarted after this; doubles
    worker_restart_delay_max: float = 30.0  # ... up to this while it keeps dying
    # everything
    data_dir: str = "data"
    log_level: str = "INFO"

    @property
    def rtmp_url(self) -> str:
        return urls.rtmp_url(self.public_host, self.rtmp_port, self.apps[0])

    @property
    def play_base(self) -> str:
        return urls.node_play_base(self.public_host, self.http_port, self.apps[0])

    def validate(self) -> None:
        """Raises :class:`ConfigError` (one line naming the variable) for an unusable value."""
        for name in ("rtmp_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{PREFIX}{name.upper()}: port {port} is out of range 0..65535")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.node_id):
            raise ConfigError(f"{PREFIX}NODE_ID: use letters, digits, '-' and '_' only")
        if not self.apps:
            raise ConfigError(f"{PREFIX}APPS: at least one application name is needed")
        if not 128 <= self.out_chunk_size <= 65536:
            raise ConfigError(f"{PREFIX}OUT_CHUNK_SIZE: must be between 128 and 65536")
        if self.publish_hook_url and not self.hook_secret:
            raise ConfigError(f"{PREFIX}HOOK_SECRET: required when {PREFIX}PUBLISH_HOOK_URL is set")
        check_ranges(
            self,
            positive=("gop_max_frames", "gop_max_bytes", "viewer_queue_bytes", "max_message_size",
                      "max_partial_messages", "max_partial_bytes", "node_partial_bytes",
                      "amf_max_nodes", "amf_max_expanded_bytes", "http_max_head", "http_max_buffer",
                      "http_requests_per_turn", "header_timeout", "keepalive_timeout",
                      "drain_timeout", "record_max_buffer", "record_remux_concurrency",
                      "cue_max_age", "cue_nonces_per_stream", "worker_drain_seconds",
                      "worker_restart_delay", "worker_restart_delay_max"),
            off_or_positive=("handshake_timeout", "partial_message_timeout", "publish_idle_timeout",
                             "idle_connection_timeout", "publish_takeover_grace",
                             "max_connections_per_ip", "fd_reserve", "metadata_max_fields",
                             "metadata_max_bytes", "record_retention_days"))
        if not self.cue_max_age <= 300:
            raise ConfigError(f"{PREFIX}CUE_MAX_AGE: at most 300 seconds (cue calls are "
                              "real time)")
        if self.hls:
            for name in ("hls_part_target", "hls_segment_target", "hls_max_segment_seconds"):
                if not math.isfinite(getattr(self, name)):
                    raise ConfigError(f"{PREFIX}{name.upper()}: must be a finite number")
            try:
                hls_config(self).check()  # the HLS module's own bounds, one place
            except ValueError as exc:
                # Its messages start with the field's name: name the variable to fix.
                field_name = str(exc).split()[0]
                raise ConfigError(f"{PREFIX}HLS_{field_name.upper()}: {exc}") from None
        for name in ("hls_block_timeout", "hls_ended_keep"):
            if not 0 <= getattr(self, name) <= 3600:  # NaN fails this too
                raise ConfigError(f"{PREFIX}{name.upper()}: must be 0..3600 seconds")
        if self.workers.strip().lower() not in ("", "auto"):
            try:
                count = int(self.workers)
            except ValueError:
                count = 0
            if not 1 <= count <= MAX_WORKERS:
                raise ConfigError(f"{PREFIX}WORKERS: 'auto' or a number 1..{MAX_WORKERS}, "
                                  f"got {self.workers!r}")
        try:
            parse_networks(self.per_ip_exempt, f"{PREFIX}PER_IP_EXEMPT")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"{PREFIX}LOG_LEVEL: one of DEBUG, INFO, WARNING, ERROR")

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)


def persistent_secret(data_dir: str, name: str, make=lambda: secrets.token_urlsafe(32)) -> str:
    """A random secret created once (by ``make``) and kept in the data folder, so restarts keep
    sessions and keys, and the engine and site of ``watchbuy serve`` agree without anyone
    configuring anything."""
    path = Path(data_dir) / name
    try:
        value = path.read_text().strip()
    except OSError:
        value = ""
    if not value:
        value = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
        path.chmod(0o600)
    return value


def parse_env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines; ``#`` comments and blank lines skipped; quotes around values removed."""
    values: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read env file {path}: {exc.strerror}") from exc
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:]
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"env file {path}, line {number}: expected NAME=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def _to_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _to_list(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def _to_mapping(raw: str) -> dict[str, str]:
    mapping = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError("expected key=value pairs separated by commas")
        mapping[key.strip()] = value.strip()
    return mapping


# How a variable's text becomes a field's value, by the field's (resolved) type, as
# starlette.config casts values with callables.  The messages end the one line a bad value gets.
CASTS: dict[object, tuple[Callable[[str], object], str]] = {
    int: (int, "expected a whole number"),
    float: (float, "expected a number"),
    bool: (_to_bool, "expected true or false"),
    str: (str, ""),
    list[str]: (_to_list, ""),
    dict[str, str]: (_to_mapping, "expected key=value pairs separated by commas"),
}


def _convert(name: str, kind: object, raw: str) -> object:
    variable = PREFIX + name.upper()
    try:
        cast, expected = CASTS[kind]
    except KeyError:
        raise TypeError(f"setting {name}: no conversion from text to {kind!r}") from None
    try:
        return cast(raw)
    except ValueError as exc:
        if kind is bool or kind == dict[str, str]:
            raise ConfigError(f"{variable}: {exc}") from None
        raise ConfigError(f"{variable}: {expected}, got {raw!r}") from None


def check_ranges(settings: object, positive: Iterable[str] = (),
                 off_or_positive: Iterable[str] = ()) -> None:
    """One clear line for the first number out of range: ``positive`` fields must be above
    zero, ``off_or_positive`` ones zero (the limit is off) or above.  NaN fails both."""
    for name in positive:
        if not getattr(settings, name) > 0:
            raise ConfigError(f"{PREFIX}{name.upper()}: must be positive")
    for name in off_or_positive:
        if not getattr(settings, name) >= 0:
            raise ConfigError(f"{PREFIX}{name.upper()}: must be zero (off) or positive")


def hls_config(settings: Settings):
    """The :class:`~watchbuy.engine.hls.HlsConfig` of a node with ``settings``."""
    from watchbuy.engine.hls import HlsConfig

    return HlsConfig(
        part_target=settings.hls_part_target,
        segment_target=settings.hls_segment_target,
        window_segments=settings.hls_window_segments,
        max_segment_seconds=settings.hls_max_segment_seconds,
        max_pending_audio=settings.hls_max_pending_audio,
    )


def read_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The process environment over the env file (``WATCHBUY_ENV_FILE`` or ./watchbuy.env)."""
    env = dict(os.environ if environ is None else environ)
    env_file = env.get(PREFIX + "ENV_FILE")
    if env_file:
        file_values = parse_env_file(Path(env_file))
    elif Path("watchbuy.env").is_file():
        file_values = parse_env_file(Path("watchbuy.env"))
    else:
        file_values = {}
    return {**file_values, **env}


def load_config(cls, environ: dict[str, str] | None = None, **overrides):
    """An instance of the dataclass ``cls`` from ``WATCHBUY_<FIELD>`` variables.

    Components keep their own settings dataclass (the status agent's, the balancer's, …) and
    load it with this one function, so every setting is read, converted and reported alike.
    Every settings class has ``validate()``, which raises :class:`ConfigError` (one line naming
    the variable) for an unusable value.
    """
    merged = read_environment(environ)
    types = typing.get_type_hints(cls)  # the annotations are strings (postponed evaluation)
    values = {}
    for spec in dataclasses.fields(cls):
        raw = merged.get(PREFIX + spec.name.upper())
        if raw is not None:
            values[spec.name] = _convert(spec.name, types[spec.name], raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = cls(**values)
    config.validate()
    return config


def load_settings(environ: dict[str, str] | None = None, **overrides) -> Settings:
    """The media node's and shared settings (see :func:`load_config`)."""
    return load_config(Settings, environ, **overrides)
