"""`mapper events`: counting, listing and replaying the outbox, as an
operator runs it, on both databases."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from mapper.db import make_sessionmaker
from mapper.models import DeadReason, Event, EventStatus
from tests.helpers import add_visitors_with_events, events
from tests.service import MapperProcess


@pytest.fixture
def operator(tmp_path: Path, database_url: str) -> MapperProcess:
    return MapperProcess(tmp_path, {"MAPPER_DATABASE_URL": database_url})


def _kill(engine: Engine, *names: str) -> None:
    with Session(engine) as session, session.begin():
        session.execute(
            update(Event)
            .where(Event.name.in_(names))
            .values(
                status=EventStatus.DEAD,
                dead_reason=DeadReason.REFUSED,
                refusals=3,
                last_error=(
                    "AC would not take v1@example.com\tof hash\n"
                    "0cc175b9c0f1b6a831c399e269772661."
                ),
            )
        )


def test_events_counts_by_status(operator: MapperProcess, engine: Engine) -> None:
    add_visitors_with_events(make_sessionmaker(engine), visitors=3, each=2)
    _kill(engine, "v0_0", "v1_0")

    result = operator.run_cli("events")

    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["pending", "4"] in lines
    assert ["dead", "2"] in lines
    assert ["refused", "2"] in lines
    assert ["held", "0"] in lines


def test_events_list_hides_addresses(operator: MapperProcess, engine: Engine) -> None:
    add_visitors_with_events(make_sessionmaker(engine), visitors=2, each=1)
    _kill(engine, "v1_0")

    result = operator.run_cli("events", "list")

    header, line = result.stdout.splitlines()
    assert header.split("\t")[:3] == ["id", "status", "event"]
    assert line.split("\t")[1:3] == ["dead", "v1_0"]
    assert line.endswith("AC would not take <address> of hash <hex>.")
    assert "@example.com" not in result.stdout
    assert "0cc175b9" not in result.stdout


def test_events_list_other_status(operator: MapperProcess, engine: Engine) -> None:
    add_visitors_with_events(make_sessionmaker(engine), visitors=1, each=3)

    result = operator.run_cli("events", "list", "--status", "pending", "--limit", "2")

    assert [line.split("\t")[2] for line in result.stdout.splitlines()[1:]] == [
        "v0_0",
        "v0_1",
    ]


def test_events_list_none(operator: MapperProcess, engine: Engine) -> None:
    assert operator.run_cli("events", "list").stdout == "No dead events.\n"


@pytest.mark.parametrize(
    "selector",
    [
        pytest.param(["--all"], id="all"),
        pytest.param(["--reason", "refused"], id="reason"),
    ],
)
def test_replay_requeues_dead(
    operator: MapperProcess, engine: Engine, selector: list[str]
) -> None:
    add_visitors_with_events(make_sessionmaker(engine), visitors=3, each=1)
    _kill(engine, "v0_0", "v2_0")

    result = operator.run_cli("events", "replay", *selector)

    assert "Queued 2 dead events" in result.stdout
    replayed = [event for event in events(engine) if event.name in {"v0_0", "v2_0"}]
    assert {(e.status, e.refusals, e.dead_reason) for e in replayed} == {
        ("pending", 0, None)
    }


def test_replay_by_id_names_others(operator: MapperProcess, engine: Engine) -> None:
    add_visitors_with_events(make_sessionmaker(engine), visitors=2, each=1)
    _kill(engine, "v0_0")
    dead, alive = events(engine)

    result = operator.run_cli(
        "events", "replay", "--id", str(dead.id), "--id", str(alive.id)
    )

    assert "Queued 1 dead event for" in result.stdout
    assert "1 of the ids given is not of a dead event, and it was" in result.stdout
    assert [event.status for event in events(engine)] == ["pending", "pending"]


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([], id="none"),
        pytest.param(["--all", "--reason", "refused"], id="two"),
    ],
)
def test_replay_needs_one_selector(
    operator: MapperProcess, engine: Engine, args: list[str]
) -> None:
    result = operator.run_cli("events", "replay", *args)

    assert result.returncode == 2
    assert "exactly one of --all, --reason or --id" in result.stderr


def test_events_refuses_missing_database(tmp_path: Path) -> None:
    result = MapperProcess(tmp_path, {}).run_cli("events")

    assert result.returncode == 1
    assert "mapper db upgrade" in result.stderr
