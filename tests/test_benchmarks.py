"""The benchmark suite in its smoke mode: it runs and writes its page.

Only that it works is checked here, never how fast anything was. The
suite runs once for the whole module, as it takes a while.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.suite import KEPT_HEADING
from tests.conftest import require_postgres

PROJECT = Path(__file__).resolve().parent.parent
EARLIER_RECORD = f"{KEPT_HEADING}\n\nEarlier findings.\n"


@dataclass(frozen=True)
class SmokeRun:
    printed: str
    page: str


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    # The suite measures on both databases.
    require_postgres()
    output = tmp_path_factory.mktemp("bench") / "benchmarks.md"
    output.write_text(f"# Old page\n\n{EARLIER_RECORD}", "utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--output", str(output)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return SmokeRun(result.stdout, output.read_text("utf-8"))


def table_rows(page: str, title: str) -> list[str]:
    """The data rows of the table under the heading `title`."""
    section = page.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return rows[1:]


def test_benchmarks_smoke_prints_page(smoke: SmokeRun) -> None:
    assert smoke.page == smoke.printed.rstrip("\n") + "\n"


def test_benchmarks_smoke_keeps_record(smoke: SmokeRun) -> None:
    assert smoke.page.startswith("# Benchmarks\n")
    assert smoke.page.endswith(EARLIER_RECORD)


@pytest.mark.parametrize(
    ("title", "rows"),
    [
        pytest.param("Intake: `POST /track` beside a bare endpoint", 9, id="intake"),
        pytest.param("Intake at half load", 2, id="paced"),
        pytest.param("Memory", 2, id="memory"),
        pytest.param("AC calls per event", 2, id="ac-calls"),
        pytest.param("Delivery drain", 3, id="drain"),
        pytest.param("Growth", 4, id="growth"),
    ],
)
def test_benchmarks_smoke_fills_tables(smoke: SmokeRun, title: str, rows: int) -> None:
    assert len(table_rows(smoke.page, title)) == rows


def test_benchmarks_smoke_no_lookups(smoke: SmokeRun) -> None:
    mapper, per_event = table_rows(smoke.page, "AC calls per event")

    assert mapper.endswith("| 0 | 50 | 0 |")
    assert per_event.endswith("| 50 | 50 | 1 |")
