"""The benchmark suite: each measurement runs real processes on loopback.

`mapper serve` and `mapper worker` run as an operator would start them,
against the fake AC from the tests, on scratch SQLite and PostgreSQL
databases. The page it writes keeps, after the measured tables, whatever
the page already had from its "Before and after" heading on: the record
of changes the numbers led to. Every personal value is made up.
"""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path

import click

from benchmarks.delivery import report_ac_calls, report_drain
from benchmarks.intake import report_growth, report_intake
from benchmarks.report import FULL, SMOKE, Table

DEFAULT_OUTPUT = Path("docs/benchmarks.md")
KEPT_HEADING = "## Before and after"


def render(tables: list[Table], *, smoke: bool, kept: str) -> str:
    """The results as a Markdown page, with the `kept` record after them."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.python_implementation()} {platform.python_version()}"
    command = "scripts/bench --smoke" if smoke else "scripts/bench"
    parts = [
        "# Benchmarks\n\n"
        f"Measured {now} with `{command}`: {machine}, {os.cpu_count()} CPUs, "
        "the load generator, the servers and the fake AC all on this one "
        "machine.\n",
        *(table.render() for table in tables),
    ]
    if kept:
        parts.append(kept)
    return "\n".join(parts)


def read_kept(output: Path) -> str:
    """The part of an earlier page from `KEPT_HEADING` on, if any."""
    if not output.exists():
        return ""
    page = output.read_text("utf-8")
    start = page.find(KEPT_HEADING)
    return page[start:] if start >= 0 else ""


@click.command()
@click.option("--smoke", is_flag=True, help="Run each measurement small.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_OUTPUT,
    show_default=True,
    help="Where to write the Markdown page.",
)
def main(smoke: bool, output: Path) -> None:
    """Run the benchmarks, print the page and write it to --output."""
    size = SMOKE if smoke else FULL
    tables = [
        *report_intake(size),
        report_ac_calls(size),
        report_drain(size),
        report_growth(size),
    ]
    page = render(tables, smoke=smoke, kept=read_kept(output))
    click.echo(page)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, "utf-8")
