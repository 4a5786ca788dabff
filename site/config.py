"""The site's settings (``WATCHBUY_*`` like every component) and its generated secrets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from watchbuy.settings import ConfigError, load_config, persistent_secret


@dataclass
class SiteSettings:
    site_host: str = "0.0.0.0"
    site_port: int = 8080
    public_url: str = ""  # how browsers reach the site; default http://127.0.0.1:<port>
    data_dir: str = "data"
    database_url: str = ""  # default: sqlite:///<data_dir>/watchbuy.db
    secret_key: str = ""  # default: generated into the data folder
    hook_secret: str = ""  # shared with the media nodes; default: generated (serve)
    broker_url: str = ""  # "" = in-memory chat; redis://host:6379/0 for several processes
    broker_prefix: str = "watchbuy:"  # Redis channel prefix: one per deployment on a shared Redis
    # single media node (until the balancer is configured): where hosts push, where rooms play
    public_host: str = "127.0.0.1"
    rtmp_port: int = 1935
    http_port: int = 8000
    node_id: str = "local"
    node_stats_url: str = ""  # the node's stats API; default http://127.0.0.1:<http_port>
    # payments: without keys, checkout runs in test mode with the seed's test card
    stripe_secret_key: str = ""
    stripe_webhook_secret: str = ""
    stripe_api_base: str = ""  # a stand-in of Stripe's API (tests); default: Stripe's own
    currency: str = "usd"
    # test-mode orders left unpaid this long give their reserved stock back (Stripe's own
    # sessions expire by themselves and tell us through the webhook)
    test_reservation_minutes: float = 30.0
    # uploads: local files by default, S3 when a bucket is named
    max_image_bytes: int = 5 * 1024 * 1024
    s3_bucket: str = ""
    s3_prefix: str = "products/"
    aws_region: str = ""
    # accounts
    session_days: float = 14.0
    cookie_secure: bool = False
    login_attempts: int = 5  # per email and address, per window
    login_window: float = 900.0
    chat_rate: int = 5  # messages per user per 10 s
    chat_max_length: int = 300
    # HTTP limits and headers
    max_body_bytes: int = 256 * 1024  # any request body but a multipart upload
    # (multipart bodies may carry one image: max_image_bytes + max_body_bytes)
    csrf_scan_bytes: int = 64 * 1024  # a form's csrf_token must come within this prefix
    max_header_bytes: int = 32 * 1024  # request line + headers
    header_timeout: float = 10.0  # seconds from connection (or request start) to full headers
    body_timeout: float = 60.0  # seconds for a whole request body to arrive
    ws_max_bytes: int = 4096  # largest websocket message a client may send
    ws_ping_interval: float = 20.0
    ws_ping_timeout: float = 20.0
    # X-Forwarded-For/-Proto are trusted only from these addresses (comma-separated IPs or
    # networks, as uvicorn's forwarded_allow_ips); "" = from nobody
    trusted_proxies: str = ""
    # origins the player may fetch HTTP-FLV from (space- or comma-separated), besides the
    # local node and the balancer's CDN, which are always allowed
    media_origins: str = ""
    hsts_seconds: int = 365 * 86400  # sent only when public_url is https
    log_level: str = "INFO"

    def validate(self) -> None:
        if not 0 <= self.site_port <= 65535:
            raise ConfigError(f"WATCHBUY_SITE_PORT: port {self.site_port} is out of range")
        if self.currency.lower() != self.currency or len(self.currency) != 3:
            raise ConfigError("WATCHBUY_CURRENCY: a three-letter ISO code in lower case, e.g. usd")
        if bool(self.stripe_secret_key) != bool(self.stripe_webhook_secret):
            raise ConfigError(
                "WATCHBUY_STRIPE_WEBHOOK_SECRET and WATCHBUY_STRIPE_SECRET_KEY go together"
            )
        if self.max_image_bytes <= 0:
            raise ConfigError("WATCHBUY_MAX_IMAGE_BYTES: must be positive")
        for name in ("max_body_bytes", "csrf_scan_bytes", "max_header_bytes", "ws_max_bytes",
                     "header_timeout", "body_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"WATCHBUY_{name.upper()}: must be positive")
        for name in ("ws_ping_interval", "ws_ping_timeout", "hsts_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"WATCHBUY_{name.upper()}: must not be negative")
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            raise ConfigError("WATCHBUY_PUBLIC_URL: must start with http:// or https://")

    @property
    def https(self) -> bool:
        """Browsers reach the site over TLS (terminated here or at a load balancer)."""
        return self.public_url.startswith("https://")

    @property
    def max_upload_bytes(self) -> int:
        """The largest multipart body: one image and the form's other fields."""
        return self.max_image_bytes + self.max_body_bytes

    @property
    def stripe_enabled(self) -> bool:
        return bool(self.stripe_secret_key)

    @property
    def uploads_dir(self) -> Path:
        return Path(self.data_dir) / "uploads"


def load_site_settings(environ: dict[str, str] | None = None, **overrides) -> SiteSettings:
    settings = load_config(SiteSettings, environ, **overrides)
    if not settings.database_url:
        settings.database_url = f"sqlite:///{Path(settings.data_dir).resolve()}/watchbuy.db"
    if not settings.secret_key:
        settings.secret_key = persistent_secret(settings.data_dir, "secret_key")
    if not settings.hook_secret:
        settings.hook_secret = persistent_secret(settings.data_dir, "hook_secret")
    if not settings.public_url:
        settings.public_url = f"http://{settings.public_host}:{settings.site_port}"
    # Secure cookies follow from an https public URL; WATCHBUY_COOKIE_SECURE=true forces them
    # (e.g. behind a TLS proxy while public_url is still being set up).
    settings.cookie_secure = settings.cookie_secure or settings.https
    if not settings.node_stats_url:
        settings.node_stats_url = f"http://127.0.0.1:{settings.http_port}"
    return settings
