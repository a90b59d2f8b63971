"""The benchmark suite in its smoke mode: it runs and writes its table.

Only that it works is checked here, never how fast anything was.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def test_benchmarks_smoke_writes_table(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"

    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--output", str(output)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    table = output.read_text("utf-8")
    assert table == result.stdout.rstrip("\n") + "\n"
    assert "| AC calls, mapper | 50 events, 5 visitors | 0 lookups, 50 posts" in table
    assert (
        "| AC calls, a lookup per event | 50 events, 5 visitors | 50 lookups" in table
    )
    assert table.count("| Delivery drain |") == 2
