"""The `mapper` command, run as a real process as an operator would."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.service import MapperProcess


def test_serve_refuses_old_schema(tmp_path: Path) -> None:
    process = MapperProcess(tmp_path, {})
    (tmp_path / "mapper.db").touch()

    result = process.run_cli("serve")

    assert result.returncode != 0
    assert "mapper db upgrade" in result.stderr


def test_serve_refuses_missing_file(tmp_path: Path) -> None:
    result = MapperProcess(tmp_path, {}).run_cli("serve")

    assert "does not exist yet" in result.stderr
    assert not (tmp_path / "mapper.db").exists()


def test_serve_refuses_missing_secret(tmp_path: Path) -> None:
    process = MapperProcess(tmp_path, {"MAPPER_SECRET_KEYS": ""})
    process.run_cli("db", "upgrade")

    result = process.run_cli("serve")

    assert result.returncode != 0
    assert "MAPPER_SECRET_KEYS" in result.stderr


def test_cli_bad_setting_named(tmp_path: Path) -> None:
    process = MapperProcess(tmp_path, {"MAPPER_PORT": "eighty"})

    result = process.run_cli("db", "upgrade")

    assert result.returncode != 0
    assert "MAPPER_PORT must be a whole number" in result.stderr
    assert "eighty" not in result.stderr


def test_upgrade_unreachable_database(tmp_path: Path) -> None:
    url = "postgresql://someone:planted-password@127.0.0.1:9/nothing"

    result = MapperProcess(tmp_path, {"MAPPER_DATABASE_URL": url}).run_cli(
        "db", "upgrade"
    )

    assert "Could not open or migrate" in result.stderr
    assert "planted-password" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["serve", "--help"], "MAPPER_SECRET_KEYS", id="serve"),
        pytest.param(["db", "upgrade", "--help"], "MAPPER_DATABASE_URL", id="upgrade"),
        pytest.param(["--help"], "serve", id="main"),
    ],
)
def test_cli_help_names_settings(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    result = MapperProcess(tmp_path, {}).run_cli(*args)

    assert result.returncode == 0
    assert expected in result.stdout
