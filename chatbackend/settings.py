"""Settings for chatbackend, read from environment variables (and an optional ``.env`` file).

Every variable is documented in ``.env.example``. With none set, the project runs on embedded
defaults: SQLite, the in-memory channel layer, a local-memory cache and Celery tasks run eagerly.
``DATABASE_URL`` (PostgreSQL) and ``REDIS_URL`` switch the same code onto real services.

Values are parsed by django-environ; a value that does not parse stops start-up with
``ImproperlyConfigured`` naming the variable (see ``_fail``).
"""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if (BASE_DIR / ".env").is_file():
    env.read_env(BASE_DIR / ".env", overwrite=False)


def _fail(name: str, value: object, expected: str) -> None:
    raise ImproperlyConfigured(f"Environment variable {name}={value!r} is invalid: expected {expected}.")


def _get(name: str, cast, default, expected: str):  # noqa: ANN001, ANN202 - thin wrapper over environ
    """Read ``name`` with django-environ, turning a parse failure into a clear start-up error."""
    try:
        return cast(name, default=default)
    except (ValueError, TypeError, environ.ImproperlyConfigured):
        _fail(name, env.str(name, default=""), expected)


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def _bool(name: str, default: bool) -> bool:
    """Read a strict boolean: django-environ reads any unknown word as False, which hides typos."""
    raw = env.str(name, default=str(default)).strip().lower()
    if raw not in _TRUE | _FALSE:
        _fail(name, raw, "true or false")
    return raw in _TRUE


def _rate(name: str, default: str) -> str:
    """Read a DRF throttle rate, ``<requests>/<second|minute|hour|day>`` (e.g. ``10/minute``)."""
    raw = env.str(name, default=default).strip()
    count, _, period = raw.partition("/")
    if not (count.isascii() and count.isdigit() and int(count) > 0 and period[:1] in {"s", "m", "h", "d"}):
        _fail(name, raw, "a rate such as 10/minute (requests per second, minute, hour or day)")
    return raw


def _positive(name: str, value: float) -> float:
    if value <= 0:
        _fail(name, value, "a number greater than 0")
    return value


def _seconds(name: str, default: float) -> float:
    """Read a duration in seconds (a float greater than 0)."""
    return _positive(name, _get(name, env.float, default, "seconds"))


# --- Core -----------------------------------------------------------------------------------
_INSECURE_DEFAULT_KEY = "django-insecure-chatbackend-embedded-default-change-me"  # noqa: S105
DEBUG: bool = _bool("DJANGO_DEBUG", False)
SECRET_KEY: str = env.str("DJANGO_SECRET_KEY", default=_INSECURE_DEFAULT_KEY)
SECRET_KEY_FALLBACKS: list[str] = env.list("DJANGO_SECRET_KEY_FALLBACKS", default=[])
ALLOWED_HOSTS: list[str] = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS: list[str] = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])
# Salt for the Fernet key that encrypts provider API keys at rest (django-fernet-encrypted-fields).
SALT_KEY: list[str] = env.list("FIELD_ENCRYPTION_SALT", default=["chatbackend-provider-keys"])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "corsheaders",
    "rest_framework",
    "rest_framework_simplejwt.token_blacklist",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "django_guid",
    "axes",
    "accounts",
    "llm",
    "conversations",
]

MIDDLEWARE = [
    "django_guid.middleware.guid_middleware",  # X-Request-ID first: every answer and log line has it
    "corsheaders.middleware.CorsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Audit rows of this request's writes name its user and client IP (accounts.audit).
    "accounts.audit.AuditRequestMiddleware",
    # The admin's query strings that PostgreSQL or Django's date hierarchy would turn into a 500.
    "chatbackend.admin_guard.AdminQueryGuardMiddleware",
    # Last, as django-axes asks: turns a lockout flagged during the admin's login into a 429.
    "axes.middleware.AxesMiddleware",
]
# The streaming endpoints (/v1, /dashboard, POST /api/conversations/<id>/messages/) run through
# this chain instead (chatbackend.handlers, chosen in chatbackend.asgi). Every sync middleware
# above costs a sync_to_async thread hop per request under ASGI (12% of CPU at 200 streams);
# those endpoints use bearer tokens only (no session, cookie, CSRF, messages) and answer JSON or
# SSE. Keep this list async-capable. api_headers_middleware keeps ALLOWED_HOSTS checking and
# X-Content-Type-Options: nosniff without a thread hop.
STREAMING_MIDDLEWARE = [
    "django_guid.middleware.guid_middleware",  # X-Request-ID first: every answer and log line has it
    # request-id, X-Request-ID's value, on every answer to an Anthropic client (its SDK reads only that).
    "llm.anthropic.wire.request_id_middleware",
    "corsheaders.middleware.CorsMiddleware",
    "chatbackend.handlers.api_headers_middleware",
]
# chatbackend.asgi: after start-up, gc.collect(); gc.freeze() and a gen0 threshold of 50,000, so
# that full collections skip start-up objects (they took ~85 ms and stalled every stream). See
# https://docs.python.org/3/library/gc.html#gc.freeze and Instagram's "Dismissing Python
# Garbage Collection at Instagram". Only the ASGI entry point applies it.
GC_TUNING: bool = _bool("GC_TUNING", True)

ROOT_URLCONF = "chatbackend.urls"
ASGI_APPLICATION = "chatbackend.asgi.application"
AUTH_USER_MODEL = "accounts.User"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
_db_url = env.str("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")
try:
    _db = environ.Env.db_url_config(_db_url)
except (ValueError, KeyError, environ.ImproperlyConfigured):
    _fail("DATABASE_URL", _db_url, "a URL such as postgres://user@127.0.0.1:5432/chatbackend or sqlite:///path")
if _db.get("ENGINE") not in {"django.db.backends.postgresql", "django.db.backends.sqlite3"}:
    _fail("DATABASE_URL", _db_url, "a postgres:// or sqlite:/// URL")

DB_POOL_MIN_SIZE: int = _get("DB_POOL_MIN_SIZE", env.int, 2, "an integer")
DB_POOL_MAX_SIZE: int = _get("DB_POOL_MAX_SIZE", env.int, 20, "an integer")
DB_POOL_TIMEOUT: float = _seconds("DB_POOL_TIMEOUT", 10.0)
if _db["ENGINE"] == "django.db.backends.postgresql":
    # Django's psycopg 3 pool (Django >= 5.1). Not combined with persistent connections.
    _db["CONN_MAX_AGE"] = 0
    _db.setdefault("OPTIONS", {})["pool"] = {
        "min_size": DB_POOL_MIN_SIZE,
        "max_size": DB_POOL_MAX_SIZE,
        "timeout": DB_POOL_TIMEOUT,
    }
elif _db["ENGINE"] == "django.db.backends.sqlite3":
    # WAL + IMMEDIATE transactions keep concurrent writers from failing with "database is locked".
    _db.setdefault("OPTIONS", {}).update(
        {"timeout": 20, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"}
    )
    # A file, not Django's in-memory default, so end-to-end tests' server processes share it.
    _db["TEST"] = {"NAME": env.str("SQLITE_TEST_DATABASE", default=str(BASE_DIR / ".test-db.sqlite3"))}
DATABASES = {"default": _db}

# --- Redis: channel layer, cache, Celery broker ---------------------------------------------
REDIS_URL: str = env.str("REDIS_URL", default="")
if REDIS_URL and not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
    _fail("REDIS_URL", REDIS_URL, "a redis://, rediss:// or unix:// URL")

# Seconds a Redis command (cache, rate limits, budgets) may take before it fails (503) instead of hanging.
REDIS_SOCKET_TIMEOUT_SECONDS: float = _seconds("REDIS_SOCKET_TIMEOUT_SECONDS", 5.0)

# The "auth_throttle" cache holds login failures and login/registration rates
# (accounts.login_throttle): its own key prefix, so it can be inspected or cleared on its own.
AUTH_THROTTLE_KEY_PREFIX = "auth-throttle"
if REDIS_URL:
    # channels_redis waits for a message with BZPOPMIN for up to its ``brpop_timeout`` (5 s); redis-py 8
    # gives every connection a 5 s socket timeout by default, which then fires first on a quiet
    # channel: the receive fails, its connection is dropped and a message Redis popped meanwhile is
    # lost (redis/redis-py#4091). The read must outlast the wait by what a Redis is allowed to take.
    CHANNEL_LAYER_SOCKET_TIMEOUT_SECONDS = 5 + REDIS_SOCKET_TIMEOUT_SECONDS
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": CHANNEL_LAYER_SOCKET_TIMEOUT_SECONDS}],
                "capacity": 1500,
                "expiry": 30,
            },
        }
    }
    # An unresponsive Redis (not just a refused connection) fails a cache call after this long
    # instead of hanging the request: 503 service_unavailable (chatbackend.errors).
    _redis_timeout = REDIS_SOCKET_TIMEOUT_SECONDS
    _redis_cache: dict[str, Any] = {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "OPTIONS": {"socket_connect_timeout": _redis_timeout, "socket_timeout": _redis_timeout},
    }
    CACHES = {"default": _redis_cache, "auth_throttle": {**_redis_cache, "KEY_PREFIX": AUTH_THROTTLE_KEY_PREFIX}}
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "auth_throttle": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": AUTH_THROTTLE_KEY_PREFIX,
            "KEY_PREFIX": AUTH_THROTTLE_KEY_PREFIX,
        },
    }
    # django-axes warns that a per-process cache is not shared between server processes: true, and
    # the embedded defaults run one process. With REDIS_URL the cache is Redis, shared by all.
    SILENCED_SYSTEM_CHECKS = ["axes.W001"]

CELERY_BROKER_URL: str = env.str("CELERY_BROKER_URL", default=REDIS_URL or "memory://")
CELERY_TASK_ALWAYS_EAGER: bool = _bool("CELERY_TASK_ALWAYS_EAGER", not REDIS_URL)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True  # a task lost with its worker is redelivered; tasks are idempotent
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 4
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_SERIALIZER = "json"
# With the Redis broker, a task a worker received but did not acknowledge (late acks: the worker
# was killed mid-task) returns to the queue after this many seconds, and another worker runs it.
# Longer than any task may take, or a slow task runs twice (ours are idempotent, so only wasted).
CELERY_VISIBILITY_TIMEOUT_SECONDS: float = _seconds("CELERY_VISIBILITY_TIMEOUT_SECONDS", 3600.0)
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": CELERY_VISIBILITY_TIMEOUT_SECONDS}
CELERY_ACCEPT_CONTENT = ["json"]

# --- Rate limits (accounts.metering.ratelimits) ------------------------------------------------
# Requests per minute, tokens per minute and concurrent streams per user, API key and model are held
# in Redis when REDIS_URL is set (shared by every server process), else in this process's memory.
# When Redis cannot be reached: False refuses requests that have a rate limit with 503
# metering_unavailable (fail closed); True lets them through unlimited (budgets always fail closed).
RATE_LIMIT_FAIL_OPEN: bool = _bool("RATE_LIMIT_FAIL_OPEN", False)
# A concurrent-stream slot is a lease that lives this many seconds unless its process renews it
# (every third of it, while the stream runs): the slots of a process that died free this long after.
RATE_LIMIT_STREAM_LEASE_SECONDS: float = _seconds("RATE_LIMIT_STREAM_LEASE_SECONDS", 60.0)
# A reply's release (its completion tokens, its stream slots) waits in this process at most this many
# seconds, so that releases ending together go to Redis in one script call, and an admission made
# meanwhile carries them in its own (accounts.metering.ratelimit_store). 0: at the next event-loop turn.
# Other processes see a freed slot this much later; shutdown sends what waits.
RATE_LIMIT_RELEASE_BATCH_SECONDS: float = _get("RATE_LIMIT_RELEASE_BATCH_SECONDS", env.float, 0.05, "seconds")
if RATE_LIMIT_RELEASE_BATCH_SECONDS < 0 or RATE_LIMIT_RELEASE_BATCH_SECONDS > 1:
    _fail("RATE_LIMIT_RELEASE_BATCH_SECONDS", RATE_LIMIT_RELEASE_BATCH_SECONDS, "seconds from 0 to 1")
# Local admission (accounts.metering.headroom): a caller far from every rate limit and budget is
# admitted without waiting for Redis when this process's unconfirmed admissions plus the request fit
# in this share of each limit's remaining room, divided by the processes that admit; the admission
# is recorded in Redis during the upstream call. 0: every admission waits for Redis. From 0 to 0.5.
METERING_LOCAL_ADMISSION_SHARE: float = _get("METERING_LOCAL_ADMISSION_SHARE", env.float, 0.1, "a share from 0 to 0.5")
if not 0 <= METERING_LOCAL_ADMISSION_SHARE <= 0.5:
    _fail("METERING_LOCAL_ADMISSION_SHARE", METERING_LOCAL_ADMISSION_SHARE, "a share from 0 to 0.5")

# --- Health probes (chatbackend.health) ---------------------------------------------------------
# Seconds each readiness check (database, Redis, broker) may take before it reports "unavailable".
HEALTH_CHECK_TIMEOUT_SECONDS: float = _seconds("HEALTH_CHECK_TIMEOUT_SECONDS", 2.0)

# --- Replies that outlive their process (chatbackend.liveness, conversations.services) --------
# Seconds between a server process's heartbeats; it counts as dead after three missed beats.
PROCESS_HEARTBEAT_SECONDS: float = _seconds("PROCESS_HEARTBEAT_SECONDS", 10.0)
# Seconds between writes of a streaming reply's text so far (never per token): what a crash keeps.
REPLY_CHECKPOINT_SECONDS: float = _seconds("REPLY_CHECKPOINT_SECONDS", 5.0)
# A reply still "streaming" whose process is dead and that has not been checkpointed for this
# many seconds is an orphan: the recovery task marks it failed (interrupted) and bills it.
REPLY_ORPHAN_AFTER_SECONDS: float = _seconds("REPLY_ORPHAN_AFTER_SECONDS", 60.0)
# --- Conversation titles (conversations.titles) ----------------------------------------------
# The model that writes a title for an untitled conversation after its first reply (through
# Celery). Unset: the conversation's own model; "" or "off": no titles; else an enabled model's name.
_title_model = env.str("CONVERSATION_TITLE_MODEL", default=None)
CONVERSATION_TITLE_MODEL: str | None = (
    "" if _title_model is not None and _title_model.strip().lower() in {"", "off"} else _title_model
)
# The longest a title request may take (seconds); it is given up after that.
CONVERSATION_TITLE_TIMEOUT_SECONDS: float = _seconds("CONVERSATION_TITLE_TIMEOUT_SECONDS", 30.0)
# --- Context window (llm.metering.prompt_budget_for) -----------------------------------------
# Tokens a conversation's history leaves free for the reply when nothing bounds the reply (no
# max_tokens sent, no max_output_tokens on the model); at most a quarter of the model's window.
CONTEXT_OUTPUT_RESERVE_TOKENS: int = _get("CONTEXT_OUTPUT_RESERVE_TOKENS", env.int, 1024, "an integer")
if CONTEXT_OUTPUT_RESERVE_TOKENS < 0:
    _fail("CONTEXT_OUTPUT_RESERVE_TOKENS", CONTEXT_OUTPUT_RESERVE_TOKENS, "an integer of 0 or more")

# celery beat runs the recovery of orphaned replies this often (with Redis; the embedded defaults
# recover at start-up instead).

# --- Budgets (accounts.metering.budgets) ------------------------------------------------------
# Seconds after which a budget reservation is released even if its process still beats (a reply
# longer than this keeps streaming; its usage row still counts, through reconciliation).
BUDGET_RESERVATION_TTL_SECONDS: float = _seconds("BUDGET_RESERVATION_TTL_SECONDS", 3600.0)
# Seconds between reconciliations (celery beat): stale reservations released, every enabled
# budget's counter recomputed from the usage rows, drift logged.
BUDGET_RECONCILE_SECONDS: float = _seconds("BUDGET_RECONCILE_SECONDS", 60.0)

# Seconds between runs of the retention task (celery beat): conversations past their organization's
# retention policy (conversations.RetentionPolicy, set in the admin) are purged.
RETENTION_INTERVAL_SECONDS: float = _seconds("RETENTION_INTERVAL_SECONDS", 3600.0)

CELERY_BEAT_SCHEDULE = {
    "conversations.reply_recover_orphans": {
        "task": "conversations.reply_recover_orphans",
        "schedule": REPLY_ORPHAN_AFTER_SECONDS / 2,
    },
    "accounts.budget_reconcile": {
        "task": "accounts.budget_reconcile",
        "schedule": BUDGET_RECONCILE_SECONDS,
    },
    "conversations.sync_prune": {
        "task": "conversations.sync_prune",
        "schedule": 3600.0,
    },
    "conversations.retention_apply": {
        "task": "conversations.retention_apply",
        "schedule": RETENTION_INTERVAL_SECONDS,
    },
}

# --- NextChat sync (conversations.sync) ---------------------------------------------------------
# Days every stored version of a synced NextChat document is kept (the newest always is): NextChat
# merges and overwrites without locking, so an earlier version is the way back.
SYNC_VERSION_RETENTION_DAYS: int = int(
    _positive("SYNC_VERSION_RETENTION_DAYS", _get("SYNC_VERSION_RETENTION_DAYS", env.int, 30, "an integer"))
)
# Largest NextChat document stored, in bytes (its whole app state; images in chats make it grow).
SYNC_MAX_DOCUMENT_BYTES: int = int(
    _positive("SYNC_MAX_DOCUMENT_BYTES", _get("SYNC_MAX_DOCUMENT_BYTES", env.int, 20_000_000, "an integer"))
)

# --- Request bodies -------------------------------------------------------------------------------
# Largest body of any other request, in bytes, as Django reads it (413 request_too_large past it).
DATA_UPLOAD_MAX_MEMORY_SIZE: int = int(
    _positive("DATA_UPLOAD_MAX_MEMORY_SIZE", _get("DATA_UPLOAD_MAX_MEMORY_SIZE", env.int, 2_621_440, "an integer"))
)
# Largest body the server takes in at all, in bytes (chatbackend.handlers.BoundedBodyASGIHandler):
# under ASGI, Django buffers a whole body (spooled to disk past FILE_UPLOAD_MAX_MEMORY_SIZE) before any
# view sees it, so without this bound a client could fill the disk. Default: the larger of the two
# limits above, which views apply on top; a smaller value cuts them.
REQUEST_BODY_MAX_BYTES: int = int(
    _positive(
        "REQUEST_BODY_MAX_BYTES",
        _get(
            "REQUEST_BODY_MAX_BYTES",
            env.int,
            max(DATA_UPLOAD_MAX_MEMORY_SIZE, SYNC_MAX_DOCUMENT_BYTES),
            "an integer",
        ),
    )
)

# --- Auth -----------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

JWT_ACCESS_TOKEN_LIFETIME_MINUTES: int = _get("JWT_ACCESS_TOKEN_LIFETIME_MINUTES", env.int, 15, "an integer")
JWT_REFRESH_TOKEN_LIFETIME_DAYS: int = _get("JWT_REFRESH_TOKEN_LIFETIME_DAYS", env.int, 7, "an integer")
SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": timedelta(minutes=JWT_ACCESS_TOKEN_LIFETIME_MINUTES),
    "REFRESH_TOKEN_LIFETIME": timedelta(days=JWT_REFRESH_TOKEN_LIFETIME_DAYS),
    "ROTATE_REFRESH_TOKENS": True,
    "BLACKLIST_AFTER_ROTATION": True,
    "UPDATE_LAST_LOGIN": True,
    "AUTH_HEADER_TYPES": ("Bearer",),
}
# Seconds between writes of an API key's last_used_at, so authentication is not a write per request.
API_KEY_LAST_USED_RESOLUTION_SECONDS: int = _get("API_KEY_LAST_USED_RESOLUTION_SECONDS", env.int, 60, "an integer")
# Seconds a process keeps an authenticated API key or user and an enabled model in memory
# (chatbackend.lookup_cache). A change clears every process at once through the channel layer;
# this only bounds staleness when that layer is unreachable. 0 disables the cache.
LOOKUP_CACHE_SECONDS: float = _get("LOOKUP_CACHE_SECONDS", env.float, 60.0, "a number of seconds")
if LOOKUP_CACHE_SECONDS < 0:
    _fail("LOOKUP_CACHE_SECONDS", LOOKUP_CACHE_SECONDS, "a number of seconds, 0 or more")

# --- Client IP and login throttling (chatbackend.client_ip, accounts.login_throttle) ----------
# Proxies (IPs or CIDR networks) whose X-Forwarded-For is believed. Empty: none, the client IP is
# the socket peer. The ASGI entry point resolves it once (chatbackend.client_ip); everything else
# reads that one value (REMOTE_ADDR in Django, scope["client"] in Channels).
TRUSTED_PROXY_IPS: list[str] = env.list("TRUSTED_PROXY_IPS", default=[])
for _proxy in TRUSTED_PROXY_IPS:
    try:
        ipaddress.ip_network(_proxy, strict=False)
    except ValueError:
        _fail("TRUSTED_PROXY_IPS", ",".join(TRUSTED_PROXY_IPS), "comma-separated IP addresses or CIDR networks")


# Failed logins counted per username and, separately, per client IP: the one that reaches the limit
# locks that username or IP out (django-axes) for AUTH_LOGIN_LOCKOUT_SECONDS; every attempt during
# a lockout, right password included, is refused with 429 and restarts it.
AUTH_LOGIN_FAILURE_LIMIT: int = _get("AUTH_LOGIN_FAILURE_LIMIT", env.int, 10, "an integer")
if AUTH_LOGIN_FAILURE_LIMIT < 1:
    _fail("AUTH_LOGIN_FAILURE_LIMIT", AUTH_LOGIN_FAILURE_LIMIT, "an integer, 1 or more")
AUTH_LOGIN_LOCKOUT_SECONDS: int = _get("AUTH_LOGIN_LOCKOUT_SECONDS", env.int, 900, "an integer")
if AUTH_LOGIN_LOCKOUT_SECONDS < 1:
    _fail("AUTH_LOGIN_LOCKOUT_SECONDS", AUTH_LOGIN_LOCKOUT_SECONDS, "a number of seconds, 1 or more")
# Attempts per client IP, successful or not (DRF throttles, accounts.apis.AuthRateThrottle).
AUTH_LOGIN_RATE: str = _rate("AUTH_LOGIN_RATE", "30/minute")
AUTH_REGISTER_RATE: str = _rate("AUTH_REGISTER_RATE", "10/minute")
# Password change, password reset (request and confirm) and email verification, per client IP.
AUTH_PASSWORD_RATE: str = _rate("AUTH_PASSWORD_RATE", "10/minute")

# --- Account lifecycle (accounts.lifecycle) -------------------------------------------------
# Links sent by email point at the client's pages, which POST what the link carries back to the API:
# PASSWORD_RESET_URL?uid=...&token=... to /api/auth/password/reset/confirm/,
# EMAIL_VERIFICATION_URL?token=... to /api/auth/email/verify/,


def _link_base(name: str, default: str) -> str:
    """Read the http(s) URL of a client page that emailed links point at."""
    raw = env.str(name, default=default).strip()
    if not re.fullmatch(r"https?://[^\s?#]+", raw):
        _fail(name, raw, "an http(s) URL without a query, such as https://chat.example.com/reset-password")
    return raw


PASSWORD_RESET_URL: str = _link_base("PASSWORD_RESET_URL", "http://localhost:8000/reset-password")
EMAIL_VERIFICATION_URL: str = _link_base("EMAIL_VERIFICATION_URL", "http://localhost:8000/verify-email")
# INVITATION_URL?token=... to /api/invitations/accept/ (accounts.organizations).
INVITATION_URL: str = _link_base("INVITATION_URL", "http://localhost:8000/accept-invitation")
# Seconds a password reset link stays valid (Django's PasswordResetTokenGenerator; a use or a
# login also ends it).
PASSWORD_RESET_TIMEOUT: int = int(
    _positive("PASSWORD_RESET_TIMEOUT", _get("PASSWORD_RESET_TIMEOUT", env.int, 3 * 86400, "an integer"))
)
# true: a self-registered account must verify its email (the link sent at registration) before it
# may log in or use API keys (403 email_not_verified). Accounts made by an operator count as verified.
EMAIL_VERIFICATION_REQUIRED: bool = _bool("EMAIL_VERIFICATION_REQUIRED", False)
# Seconds an email verification link stays valid.
EMAIL_VERIFICATION_MAX_AGE_SECONDS: int = int(
    _positive(
        "EMAIL_VERIFICATION_MAX_AGE_SECONDS",
        _get("EMAIL_VERIFICATION_MAX_AGE_SECONDS", env.int, 3 * 86400, "an integer"),
    )
)

# Seconds an invitation to an organization (its emailed link) stays valid: 7 days by default.
INVITATION_MAX_AGE_SECONDS: int = int(
    _positive("INVITATION_MAX_AGE_SECONDS", _get("INVITATION_MAX_AGE_SECONDS", env.int, 7 * 86400, "an integer"))
)

# --- Email (Django's email backends) ----------------------------------------------------------
# EMAIL_URL, parsed by django-environ: smtp://user:password@host:25, smtp+tls://...:587,
# smtps://...:465, consolemail:// (print to stdout: the embedded default), filemail:///path,
# dummymail://. EMAIL_BACKEND (a dotted path, e.g. an anymail backend) overrides its backend.
_email = _get("EMAIL_URL", env.email_url, "consolemail://", "an email URL such as smtp+tls://user:password@host:587")
EMAIL_BACKEND: str = env.str("EMAIL_BACKEND", default=_email["EMAIL_BACKEND"])
EMAIL_HOST: str = _email.get("EMAIL_HOST") or "localhost"
EMAIL_PORT: int = _email.get("EMAIL_PORT") or 25
EMAIL_HOST_USER: str = _email.get("EMAIL_HOST_USER") or ""
EMAIL_HOST_PASSWORD: str = _email.get("EMAIL_HOST_PASSWORD") or ""
EMAIL_USE_TLS: bool = bool(_email.get("EMAIL_USE_TLS", False))
EMAIL_USE_SSL: bool = bool(_email.get("EMAIL_USE_SSL", False))
EMAIL_FILE_PATH: str = _email.get("EMAIL_FILE_PATH") or ""
EMAIL_TIMEOUT: float = _seconds("EMAIL_TIMEOUT_SECONDS", 10.0)
DEFAULT_FROM_EMAIL: str = env.str("DEFAULT_FROM_EMAIL", default="chatbackend <noreply@localhost>")

# django-axes (https://django-axes.readthedocs.io/en/latest/4_configuration.html): failures counted
# in the "auth_throttle" cache (Redis when configured: one count for every server process), keyed
# by username and by client IP separately — either one reaching the limit locks.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",  # first: refuses a locked-out attempt before any password check
    "django.contrib.auth.backends.ModelBackend",
]
AXES_HANDLER = "axes.handlers.cache.AxesCacheHandler"
AXES_CACHE = "auth_throttle"
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_FAILURE_LIMIT = AUTH_LOGIN_FAILURE_LIMIT
AXES_COOLOFF_TIME = timedelta(seconds=AUTH_LOGIN_LOCKOUT_SECONDS)
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = True  # so Retry-After is exactly the cool-off
AXES_CLIENT_IP_CALLABLE = "chatbackend.client_ip.request_client_ip"
AXES_LOCKOUT_CALLABLE = "accounts.login_throttle.login_lockout_response"
AXES_ENABLE_ADMIN = False  # the cache handler keeps no rows for the admin to show
# Logged failures name the client IP (who is trying); usernames stay masked: people type their
# password into the username field.
AXES_SENSITIVE_PARAMETERS = ["username", "password"]

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.APIKeyAuthentication",
        "accounts.authentication.JWTAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # An API key also needs the scope of the endpoint (accounts.scopes); JWT and sessions do not.
    "DEFAULT_PERMISSION_CLASSES": [
        "rest_framework.permissions.IsAuthenticated",
        "accounts.scopes.APIKeyScopePermission",
    ],
    "DEFAULT_PAGINATION_CLASS": "chatbackend.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
        "chatbackend.filters.SearchFilter",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "chatbackend.exception_handlers.drf_exception_handler",
    # JSON bodies only, as docs/api.md and the OpenAPI schema say: DRF's form parsers would read an
    # empty form field as "not sent", which no JSON schema of the body can state (another type: 415).
    # The project's JSON parser: strict JSON, bounded depth (chatbackend.parsers).
    "DEFAULT_PARSER_CLASSES": ["chatbackend.parsers.JSONParser"],
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    # An unknown ?format= is a 400 naming it, not DRF's 404 (chatbackend.renderers).
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "chatbackend.renderers.FormatContentNegotiation",
    # Throttles identify the client by REMOTE_ADDR alone, which chatbackend.client_ip has already
    # resolved through TRUSTED_PROXY_IPS (DRF's default, None, would believe any X-Forwarded-For).
    "NUM_PROXIES": 0,
    # Registration and login, per client IP (accounts.apis.AuthRateThrottle).
    "DEFAULT_THROTTLE_RATES": {
        "auth_login": AUTH_LOGIN_RATE,
        "auth_register": AUTH_REGISTER_RATE,
        "auth_password": AUTH_PASSWORD_RATE,
    },
}

SPECTACULAR_SETTINGS = {
    "TITLE": "chatbackend API",
    "DESCRIPTION": (
        "Accounts, API keys, conversations with streamed replies, and an OpenAI-compatible API. "
        "Authenticate with `Authorization: Bearer <JWT access token or sk-... API key>`."
    ),
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",  # served locally: no CDN, works air-gapped
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "UserRoleEnum": "accounts.models.User.Role",
        "MessageRoleEnum": "conversations.models.Message.Role",
        "MembershipRoleEnum": "accounts.models.Membership.Role",
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "chatbackend.schema.add_async_endpoints",
        "chatbackend.schema.document_pagination_errors",
        "chatbackend.schema.document_scope_errors",
        "chatbackend.schema.document_request_rules",
    ],
}

# --- CORS (browser clients such as NextChat's "custom endpoint" mode) ------------------------
CORS_ALLOWED_ORIGINS: list[str] = env.list("CORS_ALLOWED_ORIGINS", default=[])
CORS_ALLOW_ALL_ORIGINS: bool = not CORS_ALLOWED_ORIGINS
# ``/+``: NextChat's Upstash client puts a second slash after its proxy URL (``<base>//api/upstash/...``).
CORS_URLS_REGEX = r"^/+(v1|api|dashboard)/.*$"
CORS_ALLOW_METHODS = ("DELETE", "GET", "OPTIONS", "PATCH", "POST", "PUT")
CORS_ALLOW_HEADERS = (
    "accept",
    "authorization",
    "content-type",
    "user-agent",
    "x-requested-with",
    "x-api-key",
    "anthropic-version",
    "api-key",
    "x-goog-api-key",
    "openai-organization",
    "cache-control",
    # What the official SDKs send from a browser (openai-node and anthropic-sdk-typescript with
    # dangerouslyAllowBrowser, as LobeChat's client-side mode runs them): each request carries its
    # platform headers, and a preflight naming one not listed here fails the request in the browser.
    "openai-project",
    "anthropic-beta",
    "anthropic-dangerous-direct-browser-access",
    "x-stainless-arch",
    "x-stainless-async",
    "x-stainless-helper",
    "x-stainless-helper-method",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-retry-count",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-stream-helper",
    "x-stainless-timeout",
)
CORS_PREFLIGHT_MAX_AGE = 86400
# Response headers a browser client may read (the Fetch standard hides all but a few): the request id
# for error reports, Retry-After and OpenAI's rate-limit headers so a web client can wait and show
# what is left. (django-guid's own EXPOSE_HEADER is off: it would overwrite this list.)
CORS_EXPOSE_HEADERS = (
    "X-Request-ID",
    "request-id",  # the same id, as Anthropic names it (llm.anthropic.wire)
    "Retry-After",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)

# --- LLM upstreams --------------------------------------------------------------------------
# Provider kinds, chosen by Provider.kind the way Django chooses cache backends.
LLM_PROVIDER_BACKENDS: dict[str, str] = {
    "openai": "llm.providers.openai_compatible.OpenAICompatibleProvider",
    "gemini": "llm.providers.gemini.GeminiProvider",
    "azure_openai": "llm.providers.azure_openai.AzureOpenAIProvider",
    "anthropic": "llm.providers.anthropic.AnthropicProvider",
}
# The api-version query parameter of every Azure OpenAI request (llm.providers.azure_openai): a GA
# version of the data-plane inference API, https://learn.microsoft.com/en-us/azure/ai-services/openai/api-version-lifecycle
LLM_AZURE_OPENAI_API_VERSION: str = env.str("LLM_AZURE_OPENAI_API_VERSION", default="2024-10-21")
if not re.fullmatch(r"\d{4}-\d{2}-\d{2}(-preview)?", LLM_AZURE_OPENAI_API_VERSION):
    _fail("LLM_AZURE_OPENAI_API_VERSION", LLM_AZURE_OPENAI_API_VERSION, "an api-version like 2024-10-21")
# Anthropic's Messages API requires max_tokens; sent when a client asks for no limit (llm.providers.anthropic).
LLM_ANTHROPIC_DEFAULT_MAX_TOKENS: int = _get("LLM_ANTHROPIC_DEFAULT_MAX_TOKENS", env.int, 4096, "an integer")
if LLM_ANTHROPIC_DEFAULT_MAX_TOKENS < 1:
    _fail("LLM_ANTHROPIC_DEFAULT_MAX_TOKENS", LLM_ANTHROPIC_DEFAULT_MAX_TOKENS, "an integer >= 1")
# The anthropic-version header the adapter sends (https://docs.anthropic.com/en/api/versioning).
LLM_ANTHROPIC_VERSION: str = _get("LLM_ANTHROPIC_VERSION", env.str, "2023-06-01", "a version date")
# One HTTP client per process; sized for thousands of concurrent streams.
LLM_UPSTREAM_MAX_CONNECTIONS: int = _get("LLM_UPSTREAM_MAX_CONNECTIONS", env.int, 10000, "an integer")
# Seconds an idle upstream connection stays in the pool for reuse: shorter than common servers' idle
# timeouts, so a reused connection is rarely one the upstream has just closed.
LLM_UPSTREAM_KEEPALIVE_SECONDS: float = _seconds("LLM_UPSTREAM_KEEPALIVE_SECONDS", 5.0)
# Routing (llm.routing): seconds a deployment that failed before its first chunk is skipped by every
# server process (longer when the upstream's Retry-After asks for more), and the wait before trying
# the next deployment: LLM_ROUTING_BACKOFF_SECONDS doubled per attempt, at most LLM_ROUTING_BACKOFF_MAX_SECONDS.
LLM_DEPLOYMENT_COOLDOWN_SECONDS: float = _seconds("LLM_DEPLOYMENT_COOLDOWN_SECONDS", 30.0)
LLM_ROUTING_BACKOFF_SECONDS: float = _seconds("LLM_ROUTING_BACKOFF_SECONDS", 0.1)
LLM_ROUTING_BACKOFF_MAX_SECONDS: float = _seconds("LLM_ROUTING_BACKOFF_MAX_SECONDS", 2.0)
# Seconds between SSE comment lines sent while waiting on the upstream (proxies drop idle reads).
SSE_KEEPALIVE_SECONDS: float = _seconds("SSE_KEEPALIVE_SECONDS", 15.0)

# Seconds /v1/chat/completions waits for the upstream's first chunk before sending headers, so an
# upstream failure can still be answered with an error status (NextChat cannot see errors in a stream).
OPENAI_FIRST_CHUNK_WAIT_SECONDS: float = _seconds("OPENAI_FIRST_CHUNK_WAIT_SECONDS", 10.0)
# Who keeps a /v1/chat/completions reply sent with ``store: true`` (llm.openai.services.completion_store):
# the dotted path of a function ``(plan, outcome) -> None``, imported at start-up. The conversations
# app keeps it as a conversation, readable at GET /v1/chat/completions (README, "Stored completions").
OPENAI_COMPLETION_STORE = "conversations.stored_completions.services.stored_completion_save"
# What /dashboard/billing/subscription reports as hard_limit_usd (US dollars) to a caller without a
# monthly budget (accounts.selectors.budget_monthly_limit_usd); the default reads as "no limit".
OPENAI_BILLING_HARD_LIMIT_USD: float = _get("OPENAI_BILLING_HARD_LIMIT_USD", env.float, 1_000_000.0, "a number")

# --- Internationalisation, static files -----------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

# --- Request ids (django-guid) ----------------------------------------------------------------
# Every HTTP answer carries X-Request-ID, and every log line written while serving it has the same
# id (``request_id``), so a client's error report finds the server's detail. An incoming
# X-Request-ID is kept only when it is a UUID (a safe token: nothing else reaches the logs);
# otherwise a new one (32 hex digits) is made.
DJANGO_GUID = {
    "GUID_HEADER_NAME": "X-Request-ID",
    "VALIDATE_GUID": True,
    "RETURN_HEADER": True,
    "EXPOSE_HEADER": False,  # CORS_EXPOSE_HEADERS lists it, with the others
    "UUID_LENGTH": 32,
}

# --- Logging --------------------------------------------------------------------------------
LOG_LEVEL: str = env.str("LOG_LEVEL", default="INFO").upper()
if LOG_LEVEL not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
    _fail("LOG_LEVEL", LOG_LEVEL, "one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
LOG_FORMAT: str = env.str("LOG_FORMAT", default="text")
if LOG_FORMAT not in {"text", "json"}:
    _fail("LOG_FORMAT", LOG_FORMAT, "text or json")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "redact_secrets": {"()": "chatbackend.logging.RedactSecretsFilter"},
        "quiet_health_probes": {"()": "chatbackend.logging.QuietHealthProbesFilter"},
        "quiet_shutdown_cancels": {"()": "chatbackend.logging.QuietShutdownCancelFilter"},
        # The X-Request-ID of the request being served (None outside one), as ``request_id``.
        "request_id": {"()": "django_guid.log_filters.CorrelationId", "correlation_id_field": "request_id"},
    },
    "formatters": {
        "text": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s",
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["request_id", "redact_secrets"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        # ASGI servers configure their own handlers before Django starts; route them through ours
        # so access lines (which may carry ?token=...) are redacted too.
        "uvicorn": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        "uvicorn.access": {
            "handlers": ["console"],
            "level": LOG_LEVEL,
            "propagate": False,
            "filters": ["quiet_health_probes"],
        },
        # Requests cut at the end of a graceful shutdown: a line each, not an ERROR with a traceback.
        "uvicorn.error": {
            "handlers": ["console"],
            "level": LOG_LEVEL,
            "propagate": False,
            "filters": ["quiet_shutdown_cancels"],
        },
        "daphne": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        "httpx": {"level": "WARNING"},
        # It logs each id it makes at INFO: one line per request.
        "django_guid": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}
