"""How big the benchmarks run, and the tables they report; no personal data."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Size:
    """How big and how long each measurement runs."""

    visitors: int
    events: int
    drain_events: int
    capped_seconds: float
    load_seconds: float
    growth_rows: tuple[int, ...]


FULL = Size(
    visitors=100,
    events=10_000,
    drain_events=20_000,
    capped_seconds=10,
    load_seconds=10,
    growth_rows=(10**3, 10**5, 10**6),
)
SMOKE = Size(
    visitors=5,
    events=50,
    drain_events=200,
    capped_seconds=2,
    load_seconds=1,
    growth_rows=(10, 100),
)


@dataclass
class Table:
    """One section of the results: a heading, what was run, and a table."""

    title: str
    method: str
    header: tuple[str, ...]
    rows: list[tuple[str, ...]] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"## {self.title}", "", self.method, ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "---|" * len(self.header))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"
