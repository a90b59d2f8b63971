"""Settings, read once from the environment and an optional `.env` file.

This is the only module that reads the environment. Secrets are held in
`Secret`, and the database URL, which may hold a password, is left out of
`repr`, so that a settings object never prints them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from starlette.config import Config
from starlette.datastructures import Secret

from mapper.errors import SettingsError

DEFAULT_DATABASE_URL = "sqlite:///mapper.db"
DEFAULT_TRACK_URL = "https://trackcmp.net/event"
# Browsers cap a cookie's lifetime at 400 days; it is renewed on each visit.
DEFAULT_COOKIE_MAX_AGE = 400 * 24 * 3600
# Values copied from an example file rather than chosen: refused outright.
PLACEHOLDERS = {"changeme", "change-me", "secret", "xxx", "placeholder"}
MIN_SECRET_LENGTH = 16
DATABASE_SCHEMES = (
    "sqlite:///",
    "postgresql://",
    "postgres://",
    "postgresql+psycopg://",
)
# Host names and origins are compared as text with what browsers send, so
# only the plain lowercase forms are accepted.
HOST_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?")
ORIGIN = re.compile(rf"https?://{HOST_NAME.pattern}(?::[0-9]{{1,5}})?")
COOKIE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")
# A day: longer waits or timeouts are mistakes, not choices.
MAX_SECONDS = 86400.0
# Time a lease must still have after a send's timeout, to store its outcome.
LEASE_MARGIN = 5.0
# AC's documented budget: 5 requests per second per account.
AC_RATE_LIMIT = 5.0
# More sends in flight than this from one process is a typo, not a plan.
MAX_CONCURRENCY = 1000
# An anonymous visitor's events wait a week to be identified, then go.
HELD_EVENT_TTL = 7 * 24 * 3600


@dataclass(frozen=True)
class Settings:
    """Everything mapper is configured with; built by `load_settings`."""

    # The URL can hold the database password, so it stays out of repr().
    database_url: str = field(repr=False)
    secret_keys: tuple[Secret, ...]
    cookie_name: str
    cookie_secure: bool
    cookie_max_age: int
    webhook_secret: Secret | None
    ac_api_url: str | None
    ac_api_key: Secret | None
    ac_actid: str | None
    ac_event_key: Secret | None
    ac_track_url: str
    ac_timeout: float
    allowed_hosts: tuple[str, ...]
    allowed_origins: tuple[str, ...]
    default_redirect: str | None
    track_max_bytes: int
    delivery_batch_size: int
    delivery_interval: float
    delivery_lease: float
    delivery_concurrency: int
    delivery_max_refusals: int
    delivery_backoff_max: float
    ac_rate_limit: float
    held_events_per_visitor: int
    held_event_ttl: int
    host: str
    port: int

    @property
    def missing_delivery_settings(self) -> list[str]:
        """The settings delivery to AC still needs; empty when it can run."""
        needed = {
            "MAPPER_AC_ACTID": self.ac_actid,
            "MAPPER_AC_EVENT_KEY": self.ac_event_key,
        }
        return [name for name, value in needed.items() if not value]

    @property
    def lookup_configured(self) -> bool:
        """Whether AC's contact API can be asked about unknown hashes."""
        return bool(self.ac_api_url and self.ac_api_key)


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    env_file: str | Path | None = ".env",
) -> Settings:
    """Read the settings; raise `SettingsError` naming any bad one.

    Values come from `environ` (the process environment by default), then
    from `env_file` when it exists, then from the defaults.
    """
    if env_file is not None and not Path(env_file).is_file():
        env_file = None
    config = Config(env_file, environ=os.environ if environ is None else environ)
    read = _Reader(config)
    allowed_hosts = read.matching_list(
        "MAPPER_ALLOWED_HOSTS", HOST_NAME, "host names like shop.example"
    )

    settings = Settings(
        database_url=read.database_url("MAPPER_DATABASE_URL"),
        secret_keys=read.secret_list("MAPPER_SECRET_KEYS"),
        cookie_name=read.cookie_name("MAPPER_COOKIE_NAME"),
        cookie_secure=read.flag("MAPPER_COOKIE_SECURE", True),
        cookie_max_age=read.number("MAPPER_COOKIE_MAX_AGE", DEFAULT_COOKIE_MAX_AGE),
        webhook_secret=read.path_secret("MAPPER_WEBHOOK_SECRET"),
        ac_api_url=read.optional_url("MAPPER_AC_API_URL"),
        ac_api_key=read.secret("MAPPER_AC_API_KEY", min_length=1),
        ac_actid=read.account_id("MAPPER_AC_ACTID"),
        ac_event_key=read.secret("MAPPER_AC_EVENT_KEY", min_length=1),
        ac_track_url=read.optional_url("MAPPER_AC_TRACK_URL") or DEFAULT_TRACK_URL,
        ac_timeout=read.decimal("MAPPER_AC_TIMEOUT", 10.0),
        allowed_hosts=allowed_hosts,
        allowed_origins=read.matching_list(
            "MAPPER_ALLOWED_ORIGINS", ORIGIN, "origins like https://shop.example"
        ),
        default_redirect=read.redirect("MAPPER_DEFAULT_REDIRECT", allowed_hosts),
        track_max_bytes=read.number("MAPPER_TRACK_MAX_BYTES", 8192),
        delivery_batch_size=read.number("MAPPER_DELIVERY_BATCH_SIZE", 50),
        delivery_interval=read.decimal("MAPPER_DELIVERY_INTERVAL", 1.0),
        delivery_lease=read.decimal("MAPPER_DELIVERY_LEASE", 60.0),
        delivery_concurrency=read.number(
            "MAPPER_DELIVERY_CONCURRENCY", 10, maximum=MAX_CONCURRENCY
        ),
        delivery_max_refusals=read.number("MAPPER_DELIVERY_MAX_REFUSALS", 3),
        delivery_backoff_max=read.decimal("MAPPER_DELIVERY_BACKOFF_MAX", 3600.0),
        ac_rate_limit=read.decimal(
            "MAPPER_AC_RATE_LIMIT", AC_RATE_LIMIT, unit="calls per second"
        ),
        held_events_per_visitor=read.number("MAPPER_HELD_EVENTS_PER_VISITOR", 100),
        held_event_ttl=read.number("MAPPER_HELD_EVENT_TTL", HELD_EVENT_TTL),
        host=read.text("MAPPER_HOST", "127.0.0.1"),
        port=read.number("MAPPER_PORT", 8000, maximum=65535),
    )

    spare = LEASE_MARGIN + 1
    if settings.delivery_lease < settings.ac_timeout + spare:
        # A send that may outlast its lease could be made twice, so each
        # needs its timeout plus time to store the outcome to be left.
        raise SettingsError(
            "MAPPER_DELIVERY_LEASE must be at least MAPPER_AC_TIMEOUT "
            f"plus {spare:g} seconds."
        )
    return settings


class _Reader:
    """Casts raw setting values, with errors that never echo the value."""

    def __init__(self, config: Config) -> None:
        self._config = config

    def _raw(self, key: str) -> str | None:
        value: str | None = self._config(key, default=None)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def text(self, key: str, default: str) -> str:
        return self._raw(key) or default

    def optional_url(self, key: str) -> str | None:
        value = self._raw(key)
        if value is None:
            return None

        parts = _split_url(value)
        web = parts.scheme.lower() in {"http", "https"} and bool(parts.hostname)
        if not web or any(char.isspace() for char in value):
            raise SettingsError(f"{key} must be an http:// or https:// URL.")
        return value.rstrip("/")

    def flag(self, key: str, default: bool) -> bool:
        value = self._raw(key)
        if value is None:
            return default
        if value.lower() in {"1", "true", "yes", "on"}:
            return True
        if value.lower() in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{key} must be true or false.")

    def number(self, key: str, default: int, *, maximum: int = 2**31 - 1) -> int:
        value = self._raw(key)
        if value is None:
            return default
        if not re.fullmatch(r"[0-9]{1,10}", value) or not 0 < int(value) <= maximum:
            raise SettingsError(f"{key} must be a whole number from 1 to {maximum}.")
        return int(value)

    def decimal(self, key: str, default: float, *, unit: str = "seconds") -> float:
        value = self._raw(key)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not 0 < number <= MAX_SECONDS:
            raise SettingsError(
                f"{key} must be a number of {unit} above 0 and at most {MAX_SECONDS:g}."
            )
        return number

    def matching_list(
        self, key: str, pattern: re.Pattern[str], expected: str
    ) -> tuple[str, ...]:
        value = self._raw(key) or ""
        items = [item.strip().lower().rstrip("/") for item in value.split(",")]
        items = [item for item in items if item]

        if any(not pattern.fullmatch(item) for item in items):
            # "*" fails here too: with credentials allowed, a wildcard would
            # let any site read answers meant for this one.
            raise SettingsError(f"{key} must be a comma-separated list of {expected}.")
        return tuple(items)

    def database_url(self, key: str) -> str:
        value = self._raw(key) or DEFAULT_DATABASE_URL
        try:
            make_url(value).port  # noqa: B018 - raises for a malformed port
        except (ArgumentError, ValueError):
            value = ""
        if not value.startswith(DATABASE_SCHEMES):
            raise SettingsError(
                f"{key} must be a sqlite:///path or postgresql://user:pass@host/db URL."
            )
        return value

    def path_secret(self, key: str) -> Secret | None:
        secret = self.secret(key)
        # It is a segment of the webhook URL: any other character would need
        # escaping, or end the segment.
        if secret is not None and not URL_SAFE.fullmatch(str(secret)):
            raise SettingsError(f"{key} must be letters, digits and - _ . ~ only.")
        return secret

    def account_id(self, key: str) -> str | None:
        value = self._raw(key)
        if value is not None and not re.fullmatch(r"[0-9]{1,20}", value):
            raise SettingsError(f"{key} must be the numeric actid AC shows.")
        return value

    def cookie_name(self, key: str) -> str:
        value = self._raw(key) or "mapper_vid"
        if not COOKIE_NAME.fullmatch(value):
            raise SettingsError(f"{key} must be 1 to 64 letters, digits, - or _.")
        return value

    def redirect(self, key: str, allowed_hosts: tuple[str, ...]) -> str | None:
        value = self._raw(key)
        if value is None:
            return None

        parts = _split_url(value)
        local_path = value.startswith("/") and not value.startswith("//")
        on_allowed_host = parts.scheme in {"http", "https"} and (
            parts.hostname in allowed_hosts
        )

        if "\\" in value or not (local_path or on_allowed_host):
            raise SettingsError(
                f"{key} must be a path on mapper or a URL on MAPPER_ALLOWED_HOSTS."
            )
        return value

    def secret(self, key: str, *, min_length: int = MIN_SECRET_LENGTH) -> Secret | None:
        value = self._raw(key)
        if value is None:
            return None
        _check_secret(key, value, min_length)
        return Secret(value)

    def secret_list(self, key: str) -> tuple[Secret, ...]:
        value = self._raw(key) or ""
        keys = [item.strip() for item in value.split(",") if item.strip()]
        for item in keys:
            _check_secret(key, item, MIN_SECRET_LENGTH)
        return tuple(Secret(item) for item in keys)


def _split_url(value: str) -> SplitResult:
    """Split a URL; a malformed one (bad brackets or port) splits as empty."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        return urlsplit("")
    return parts


def _check_secret(key: str, value: str, min_length: int) -> None:
    if value.lower() in PLACEHOLDERS:
        raise SettingsError(f"{key} is still a placeholder; set a real value.")
    if len(value) < min_length:
        raise SettingsError(f"{key} must be at least {min_length} characters long.")


def require_secret_keys(settings: Settings) -> None:
    """Stop a process that signs cookies from starting without a key."""
    if not settings.secret_keys:
        raise SettingsError(
            "MAPPER_SECRET_KEYS is not set. Set it to a random value of at least "
            f"{MIN_SECRET_LENGTH} characters (newest key last when rotating)."
        )
