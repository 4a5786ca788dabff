"""The site's settings (``WATCHBUY_*`` like every component) and its generated secrets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from watchbuy.settings import ConfigError, check_ranges, load_config, persistent_secret

MAX_SITE_WORKERS = 256


def is_redis_url(url: str) -> bool:
    """A Redis broker URL (``redis://`` or ``rediss://``): what several processes share."""
    return url.strip().lower().startswith(("redis://", "rediss://"))


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
    # payments: without keys, checkout runs a labelled test mode with Stripe's test card number
    stripe_secret_key: str = ""
    stripe_webhook_secret: str = ""
    stripe_api_base: str = ""  # a stand-in of Stripe's API (tests); default: Stripe's own
    currency: str = "usd"
    # test-mode orders left unpaid this long give their reserved stock back (Stripe's own
    # sessions expire by themselves and tell us through the webhook); short, so that unpaid
    # orders cannot hold a product's stock for long
    test_reservation_minutes: float = 10.0
    # payments and shop limits
    # Without Stripe keys checkout runs the test-card form; on a public https site that must be
    # asked for (WATCHBUY_TEST_PAYMENTS=1), or real shoppers would "pay" with the test card.
    test_payments: bool = False
    # a Stripe Checkout Session stays payable this long (Stripe allows 30 minutes to 24 hours;
    # its default of 24 h would hold the reserved stock for a day)
    checkout_minutes: float = 30.0
    # against stock hoarding: unpaid orders one shopper may have at once, and units of one
    # product one shopper may hold (cart line, and all their pending orders together)
    max_pending_orders: int = 2
    max_units_per_product: int = 10
    # the checkout rush: a product's stock reaches its room as one event per this many seconds
    # at most per site process (the latest value wins; sold out goes at once), and each room
    # websocket queues at most ws_send_queue events that cannot be coalesced (chat) before a
    # viewer that does not read is closed with 4408 (stock events replace each other instead)
    stock_event_interval: float = 0.25
    ws_send_queue: int = 256
    # pages anyone gets alike (room and home page, not logged in) are kept rendered this many
    # seconds at most (0 = never kept); a room's page goes at once when the room changes (pin,
    # products, stock, live/offline: site/pagecache.py); at most page_cache_entries pages
    page_cache_seconds: float = 2.0
    page_cache_entries: int = 1000
    # a session found is kept in each process this many seconds at most (0 = read per request);
    # a logout drops it at once in every process (the broker's session_revoked event)
    session_cache_seconds: float = 1.0
    # shop: "Only N left" on room product cards at or under this stock; flash sales that
    # reached their end are ended (and announced, once) by a check this often in each process
    low_stock_threshold: int = 10
    flash_sale_check_interval: float = 0.5
    # flash sales a host may start: longest duration, in seconds
    flash_sale_max_seconds: int = 3600
    # hearts: a room gets at most one aggregated "hearts" event per hearts_interval (across
    # every site process); a shopper (or address, for visitors) may send heart_rate heart
    # frames per heart_window, each of at most heart_batch_max taps; more are dropped
    hearts_interval: float = 0.25
    heart_rate: int = 15
    heart_window: float = 10.0
    heart_batch_max: int = 10
    # viewer counts reach the room this often after a change (and on arrival at once)
    viewers_interval: float = 1.0
    # uploads with more pixels are refused before they are decoded (decompression bombs)
    max_image_pixels: int = 25_000_000
    # uploads: local files by default, S3 when a bucket is named
    max_image_bytes: int = 5 * 1024 * 1024
    s3_bucket: str = ""
    s3_prefix: str = "products/"
    # replays (site/replays.py): the nodes' recordings folder when they share this machine
    # (watchbuy serve), and how long replays are kept (0 = for ever)
    record_dir: str = ""  # default: <data_dir>/recordings, as the node's
    record_retention_days: float = 30.0
    # notifications (read or not) and reminders of long-ended shows are deleted after this
    # many days (site/notify.py prune; 0 = kept for ever)
    notification_retention_days: float = 30.0
    aws_region: str = ""
    # accounts
    session_days: float = 14.0
    cookie_secure: bool = False
    login_attempts: int = 5  # failures per email and address per window, then backoff
    login_window: float = 900.0
    chat_rate: int = 5  # messages per user per 10 s
    # pins (and unpins) per host per pin_window, across site processes: each pin is a cue
    # call to the node and an event to every viewer of the room; more answer 429
    pin_rate: int = 20
    pin_window: float = 10.0
    chat_max_length: int = 300
    # abuse limits
    password_min_length: int = 10
    password_hash_concurrency: int = 2  # argon2 runs in threads, at most this many at once
    signup_per_ip: int = 10  # sign-ups per address per signup_window
    signup_window: float = 3600.0
    login_per_ip: int = 30  # failed (or in-flight) logins per address per login_window
    login_account_attempts: int = 20  # failures per account from all addresses, then backoff
    login_backoff_base: float = 2.0  # the first wait after the free failures; doubles
    login_backoff_max: float = 900.0  # the longest wait backoff asks for
    chat_frame_max_bytes: int = 4096  # a bigger websocket frame closes the socket (1009)
    chat_frames: int = 20  # frames of any kind per socket per chat_frame_window, then 1008
    chat_frame_window: float = 10.0
    ws_max_per_ip: int = 20  # room websockets per address, per site process
    ws_max_per_user: int = 5  # room websockets per logged-in user, per site process
    prune_interval: float = 600.0  # how often expired sessions and old login attempts go
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
    # /metrics answers loopback clients, and others only with "Authorization: Bearer <token>";
    # "" = loopback only
    metrics_token: str = ""
    log_level: str = "INFO"
    # stream health (studio, host panel): a stream above this many kbit/s is far more than a
    # typical phone viewer's connection plays smoothly; the host is told to lower it
    health_bitrate_warn_kbps: int = 6000
    # engine hooks (/hooks/rtmp): a signed call is accepted for hook_max_age seconds after its
    # timestamp, and with a timestamp at most hook_max_future seconds ahead (clock skew); its
    # nonce is remembered as long, in Redis with a Redis broker, else in this process, which
    # remembers at most hook_nonce_capacity of them (more fresh calls than that are refused)
    hook_max_age: float = 300.0
    hook_max_future: float = 30.0
    hook_nonce_capacity: int = 10000
    # processes (``watchbuy site --workers N``): N processes on one port (SO_REUSEPORT), which
    # share rooms, chat limits and hook nonces through Redis, so N > 1 needs a Redis broker.
    # Websocket caps per address and per user (ws_max_per_*) stay per process.
    site_workers: int = 1
    site_drain_seconds: float = 20.0  # SIGTERM: in-flight requests get this long, then cut
    site_restart_delay: float = 0.5  # a worker that died is restarted after this; doubles
    site_restart_delay_max: float = 30.0  # ... up to this while it keeps dying
    # shows: a stream that stops ends its show after show_end_grace seconds unless the host
    # comes back (an OBS hiccup resumes the same show); a stream that starts runs the host's
    # scheduled show whose start is within show_start_window seconds of now (else a new one)
    show_end_grace: float = 30.0
    show_start_window: float = 3600.0
    # notification email: smtp://[user:password@]host:port (or smtps://); "" = in-site only
    smtp_url: str = ""
    smtp_from: str = "WatchBuy <noreply@localhost>"

    def validate(self) -> None:
        if not 0 <= self.site_port <= 65535:
            raise ConfigError(f"WATCHBUY_SITE_PORT: port {self.site_port} is out of range")
        if self.currency.lower() != self.currency or len(self.currency) != 3:
            raise ConfigError("WATCHBUY_CURRENCY: a three-letter ISO code in lower case, e.g. usd")
        if bool(self.stripe_secret_key) != bool(self.stripe_webhook_secret):
            raise ConfigError(
                "WATCHBUY_STRIPE_WEBHOOK_SECRET and WATCHBUY_STRIPE_SECRET_KEY go together"
            )
        if not 0 < self.hook_max_age <= 86400:
            raise ConfigError("WATCHBUY_HOOK_MAX_AGE: seconds, more than 0 and at most 86400")
        if not 0 <= self.hook_max_future <= self.hook_max_age:
            raise ConfigError("WATCHBUY_HOOK_MAX_FUTURE: seconds, from 0 to WATCHBUY_HOOK_MAX_AGE")
        if self.hook_nonce_capacity < 1:
            raise ConfigError("WATCHBUY_HOOK_NONCE_CAPACITY: at least 1")
        check_ranges(self, positive=(
            "max_image_bytes", "password_min_length", "password_hash_concurrency", "signup_per_ip", "signup_window",
            "login_attempts", "login_window", "login_per_ip", "login_account_attempts",
            "login_backoff_base", "login_backoff_max", "chat_frame_max_bytes", "chat_frames",
            "chat_frame_window", "ws_max_per_ip", "ws_max_per_user", "prune_interval",
            "max_image_pixels", "test_reservation_minutes", "max_body_bytes", "csrf_scan_bytes",
            "max_header_bytes", "ws_max_bytes", "header_timeout", "body_timeout",
            "health_bitrate_warn_kbps", "page_cache_entries"))
        if not 30 <= self.checkout_minutes <= 24 * 60 - 1:
            # Stripe allows 30 minutes to 24 hours; a minute of slack is added (payments.py)
            raise ConfigError("WATCHBUY_CHECKOUT_MINUTES: Stripe allows 30 to 1439 minutes")
        if self.max_pending_orders < 1:
            raise ConfigError("WATCHBUY_MAX_PENDING_ORDERS: must be at least 1")
        if self.max_units_per_product < 1:
            raise ConfigError("WATCHBUY_MAX_UNITS_PER_PRODUCT: must be at least 1")
        if not 0 < self.stock_event_interval <= 1:
            # stock must reach the viewers within a second of a sale
            raise ConfigError("WATCHBUY_STOCK_EVENT_INTERVAL: seconds, more than 0, at most 1")
        if not 0.05 <= self.hearts_interval <= 5:
            raise ConfigError("WATCHBUY_HEARTS_INTERVAL: seconds, from 0.05 to 5")
        if not 0.2 <= self.viewers_interval <= 2:
            # the count must follow arrivals and departures within about 2 s
            raise ConfigError("WATCHBUY_VIEWERS_INTERVAL: seconds, from 0.2 to 2")
        check_ranges(self, positive=("heart_rate", "heart_window", "heart_batch_max",
                                     "pin_rate", "pin_window"))
        if self.ws_send_queue < 1:
            raise ConfigError("WATCHBUY_WS_SEND_QUEUE: at least 1")
        if self.low_stock_threshold < 0:
            raise ConfigError("WATCHBUY_LOW_STOCK_THRESHOLD: 0 or more")
        if not 0 < self.flash_sale_check_interval <= 5:
            # a sale must end within a few seconds of its time
            raise ConfigError("WATCHBUY_FLASH_SALE_CHECK_INTERVAL: seconds, more than 0, at most 5")
        if self.flash_sale_max_seconds < 10:
            raise ConfigError("WATCHBUY_FLASH_SALE_MAX_SECONDS: at least 10")
        if not self.stripe_secret_key and not self.test_payments and self.https:
            # fail closed: a public site without keys would take test-card "payments"
            raise ConfigError(
                "WATCHBUY_STRIPE_SECRET_KEY is not set on a public https site: set the Stripe "
                "keys, or WATCHBUY_TEST_PAYMENTS=1 to run the test-card checkout on purpose")
        if not 1 <= self.site_workers <= MAX_SITE_WORKERS:
            raise ConfigError(f"WATCHBUY_SITE_WORKERS: from 1 to {MAX_SITE_WORKERS}")
        if self.site_workers > 1 and not is_redis_url(self.broker_url):
            # Without a shared broker each process would have rooms of its own: a viewer on one
            # would not hear chat posted on another, and limits would be per process.
            raise ConfigError(
                f"WATCHBUY_SITE_WORKERS={self.site_workers} needs Redis: set "
                "WATCHBUY_BROKER_URL=redis://host:6379/0 (the processes share rooms, chat "
                "limits and hook nonces through it)")
        check_ranges(self, positive=("site_drain_seconds", "site_restart_delay",
                                     "site_restart_delay_max"))
        check_ranges(self, positive=("show_end_grace", "show_start_window"))
        if self.smtp_url and not self.smtp_url.lower().startswith(("smtp://", "smtps://")):
            raise ConfigError("WATCHBUY_SMTP_URL: expected smtp://host:port or smtps://host:port")
        if not 0 <= self.session_cache_seconds <= 2:
            raise ConfigError("WATCHBUY_SESSION_CACHE_SECONDS: seconds, from 0 (off) to 2")
        check_ranges(self, off_or_positive=("ws_ping_interval", "ws_ping_timeout", "hsts_seconds",
                                            "record_retention_days",
                                            "notification_retention_days", "page_cache_seconds"))
        if self.public_url and not self.public_url.lower().startswith(("http://", "https://")):
            raise ConfigError("WATCHBUY_PUBLIC_URL: must start with http:// or https://")

    @property
    def https(self) -> bool:
        """Browsers reach the site over TLS (terminated here or at a load balancer)."""
        return self.public_url.lower().startswith("https://")

    @property
    def max_upload_bytes(self) -> int:
        """The largest multipart body: one image and the form's other fields."""
        return self.max_image_bytes + self.max_body_bytes

    @property
    def test_orders(self) -> bool:
        """Orders made now are no real money: the test-card form, or Stripe's test keys."""
        return not self.stripe_enabled or \
            self.stripe_secret_key.startswith(("sk_test_", "rk_test_"))

    @property
    def stripe_enabled(self) -> bool:
        return bool(self.stripe_secret_key)

    @property
    def uploads_dir(self) -> Path:
        return Path(self.data_dir) / "uploads"

    @property
    def recordings_dir(self) -> Path:
        """Where the local node writes its replays (WATCHBUY_RECORD_DIR, as the node reads it)."""
        return Path(self.record_dir or Path(self.data_dir) / "recordings")


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
