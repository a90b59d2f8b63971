"""Settings: defaults, casting, and refusals that never echo a value."""

from __future__ import annotations

from pathlib import Path

import pytest

from mapper.errors import SettingsError
from mapper.settings import load_settings


def test_load_settings_defaults() -> None:
    settings = load_settings({}, env_file=None)

    assert settings.database_url == "sqlite:///mapper.db"
    assert settings.cookie_secure is True
    assert settings.missing_delivery_settings == [
        "MAPPER_AC_ACTID",
        "MAPPER_AC_EVENT_KEY",
    ]


def test_env_file_below_environment(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("MAPPER_COOKIE_SECURE=false\nMAPPER_PORT=9000\n")

    settings = load_settings({"MAPPER_PORT": "9100"}, env_file=env_file)

    assert (settings.cookie_secure, settings.port) == (False, 9100)


def test_missing_env_file_ignored(tmp_path: Path) -> None:
    settings = load_settings({}, env_file=tmp_path / "absent.env")

    assert settings.port == 8000


def test_secret_keys_ordered_hidden() -> None:
    settings = load_settings(
        {"MAPPER_SECRET_KEYS": "first-key-0123456789, second-key-0123456789"},
        env_file=None,
    )

    assert [str(key) for key in settings.secret_keys] == [
        "first-key-0123456789",
        "second-key-0123456789",
    ]
    assert "first-key" not in repr(settings)


@pytest.mark.parametrize(
    ("value", "expected"),
    [pytest.param("yes", True, id="yes"), pytest.param("OFF", False, id="off")],
)
def test_flag_words_accepted(value: str, expected: bool) -> None:
    settings = load_settings({"MAPPER_COOKIE_SECURE": value}, env_file=None)

    assert settings.cookie_secure is expected


def test_lists_cast_and_cleaned() -> None:
    settings = load_settings(
        {
            "MAPPER_ALLOWED_HOSTS": " Shop.Example , ,www.shop.example",
            "MAPPER_ALLOWED_ORIGINS": "https://Shop.Example/, http://127.0.0.1:8001",
        },
        env_file=None,
    )

    assert settings.allowed_hosts == ("shop.example", "www.shop.example")
    assert settings.allowed_origins == ("https://shop.example", "http://127.0.0.1:8001")


def test_urls_and_numbers_cast() -> None:
    settings = load_settings(
        {
            "MAPPER_AC_TIMEOUT": "2.5",
            "MAPPER_AC_API_URL": "https://acct.api-us1.com/",
            "MAPPER_AC_API_KEY": "k",
        },
        env_file=None,
    )

    assert (settings.ac_timeout, settings.ac_api_url) == (
        2.5,
        "https://acct.api-us1.com",
    )
    assert settings.lookup_configured


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("/landed", id="path"),
        pytest.param("https://shop.example/welcome", id="allowed-host"),
    ],
)
def test_default_redirect_accepted(target: str) -> None:
    settings = load_settings(
        {"MAPPER_ALLOWED_HOSTS": "shop.example", "MAPPER_DEFAULT_REDIRECT": target},
        env_file=None,
    )

    assert settings.default_redirect == target


SECRETISH = "planted-value-0123"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        pytest.param("MAPPER_SECRET_KEYS", "short", id="short-key"),
        pytest.param("MAPPER_SECRET_KEYS", "changeme", id="placeholder"),
        pytest.param("MAPPER_WEBHOOK_SECRET", "tooshort-value", id="short-webhook"),
        pytest.param("MAPPER_COOKIE_SECURE", SECRETISH, id="bad-flag"),
        pytest.param("MAPPER_PORT", SECRETISH, id="bad-number"),
        pytest.param("MAPPER_PORT", "99999", id="port-range"),
        pytest.param("MAPPER_PORT", "\u00b2", id="superscript"),
        pytest.param("MAPPER_AC_TIMEOUT", SECRETISH, id="bad-decimal"),
        pytest.param("MAPPER_AC_API_URL", "ftp://planted.example", id="bad-url"),
        pytest.param("MAPPER_AC_TRACK_URL", "planted.example/event", id="track-url"),
        pytest.param("MAPPER_DATABASE_URL", "mysql://planted@db/x", id="database"),
        pytest.param("MAPPER_COOKIE_NAME", "a b;c", id="cookie-name"),
        pytest.param("MAPPER_ALLOWED_HOSTS", "https://shop.example", id="host-scheme"),
        pytest.param("MAPPER_ALLOWED_ORIGINS", "*", id="origin-wildcard"),
        pytest.param("MAPPER_ALLOWED_ORIGINS", "planted.example", id="origin-bare"),
        pytest.param("MAPPER_DEFAULT_REDIRECT", "javascript:alert(1)", id="script"),
        pytest.param("MAPPER_DEFAULT_REDIRECT", "//evil.example/", id="scheme-less"),
        pytest.param("MAPPER_DEFAULT_REDIRECT", "https://evil.example/", id="foreign"),
        pytest.param("MAPPER_DELIVERY_LEASE", "5", id="lease-under-timeout"),
        pytest.param("MAPPER_DELIVERY_LEASE", "15.5", id="lease-no-margin"),
        pytest.param("MAPPER_AC_API_URL", "https://planted exa.com", id="url-space"),
        pytest.param("MAPPER_AC_API_URL", "https://:443", id="url-no-host"),
        pytest.param("MAPPER_AC_API_URL", "https://[planted", id="url-bracket"),
        pytest.param("MAPPER_DEFAULT_REDIRECT", "http://[::1", id="bad-bracket"),
        pytest.param(
            "MAPPER_DEFAULT_REDIRECT", "https://shop.example:99999/", id="bad-port"
        ),
        pytest.param("MAPPER_DELIVERY_LEASE", "inf", id="infinite"),
        pytest.param("MAPPER_AC_TIMEOUT", "1e400", id="huge-timeout"),
        pytest.param("MAPPER_WEBHOOK_SECRET", "planted/secret/value", id="slash"),
        pytest.param("MAPPER_AC_ACTID", "planted-actid", id="actid"),
        pytest.param("MAPPER_DATABASE_URL", "postgresql://u:p@h:planted/db", id="port"),
    ],
)
def test_bad_setting_refused(key: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({key: value}, env_file=None)

    assert key in str(caught.value)
    assert value not in str(caught.value)


def test_settings_repr_hides_password() -> None:
    url = "postgresql://mapper:planted-password@db.internal/mapper"

    settings = load_settings({"MAPPER_DATABASE_URL": url}, env_file=None)

    assert "planted-password" not in repr(settings)


def test_uppercase_url_scheme_accepted() -> None:
    settings = load_settings(
        {"MAPPER_AC_API_URL": "HTTPS://YourAccount.api-us1.com"}, env_file=None
    )

    assert settings.ac_api_url == "HTTPS://YourAccount.api-us1.com"
