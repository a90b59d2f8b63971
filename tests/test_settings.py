"""Settings: defaults, casting, and refusals that never echo a value."""

from __future__ import annotations

from pathlib import Path

import pytest

from mapper.errors import SettingsError
from mapper.settings import load_settings, require_secret_keys


def test_load_settings_defaults() -> None:
    settings = load_settings({}, env_file=None)

    assert settings.database_url == "sqlite:///mapper.db"
    assert settings.cookie_secure is True
    assert not settings.delivery_configured


def test_load_settings_reads_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("MAPPER_COOKIE_SECURE=false\nMAPPER_PORT=9000\n")

    settings = load_settings({"MAPPER_PORT": "9100"}, env_file=env_file)

    assert settings.cookie_secure is False
    assert settings.port == 9100


def test_secret_keys_keep_order_and_hide() -> None:
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
    ("key", "value"),
    [
        pytest.param("MAPPER_SECRET_KEYS", "short", id="short-key"),
        pytest.param("MAPPER_SECRET_KEYS", "changeme", id="placeholder"),
        pytest.param("MAPPER_WEBHOOK_SECRET", "tooshort-value", id="short-webhook"),
        pytest.param("MAPPER_COOKIE_SECURE", "maybe-secret-ish", id="bad-flag"),
        pytest.param("MAPPER_PORT", "eighty-secret", id="bad-number"),
        pytest.param("MAPPER_AC_TIMEOUT", "soon-secret", id="bad-decimal"),
        pytest.param("MAPPER_AC_API_URL", "ftp://secret.example", id="bad-url"),
    ],
)
def test_load_settings_refuses_bad_value(key: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({key: value}, env_file=None)

    assert key in str(caught.value)
    assert value not in str(caught.value)


def test_require_secret_keys_when_missing() -> None:
    with pytest.raises(SettingsError, match="MAPPER_SECRET_KEYS"):
        require_secret_keys(load_settings({}, env_file=None))


def test_missing_env_file_ignored(tmp_path: Path) -> None:
    settings = load_settings({}, env_file=tmp_path / "absent.env")

    assert settings.port == 8000


@pytest.mark.parametrize(("value", "expected"), [("yes", True), ("OFF", False)])
def test_flag_words_accepted(value: str, expected: bool) -> None:
    settings = load_settings({"MAPPER_COOKIE_SECURE": value}, env_file=None)

    assert settings.cookie_secure is expected


def test_lists_and_numbers_cast() -> None:
    settings = load_settings(
        {
            "MAPPER_ALLOWED_HOSTS": " Shop.Example , ,www.shop.example",
            "MAPPER_AC_TIMEOUT": "2.5",
            "MAPPER_AC_API_URL": "https://acct.api-us1.com/",
            "MAPPER_AC_API_KEY": "k",
        },
        env_file=None,
    )

    assert settings.allowed_hosts == ("shop.example", "www.shop.example")
    assert settings.ac_timeout == 2.5
    assert settings.ac_api_url == "https://acct.api-us1.com"
    assert settings.lookup_configured
