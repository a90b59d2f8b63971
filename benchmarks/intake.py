"""The tracking path under load: `/track` beside a bare server, memory, and
how `/go` and `/track` keep up as the store grows.

Load comes from wrk, a compiled load generator from Debian, driven by
`requests.lua`; its numbers are read from the one JSON line the script
prints. Servers run as separate processes, as an operator runs them.
The cookies, hashes and emails are made up.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click

from benchmarks.report import Size, Table
from benchmarks.stores import BACKENDS, fake_hash, fill, scratch, visitor_cookie
from tests.service import MapperProcess, free_port

LUA_SCRIPT = Path(__file__).with_name("requests.lua")
CONNECTIONS = (1, 16, 64)
BUSIEST = CONNECTIONS[-1]
# How many stored visitors and hashes, at most, a load draws its requests
# from: enough to spread them over the store.
SAMPLE = 2_000
TRACK_BODY = '{"event": "viewed_pricing", "data": {"plan": "pro"}}'
SERVE_ONLY = ("serve", "--no-delivery")


@dataclass(frozen=True)
class Load:
    """What one wrk run measured."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    failed: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def run_wrk(
    url: str, requests: Path, *, connections: int, seconds: float, pause_ms: int = 0
) -> Load:
    """Load `url` with the requests in the file `requests` for `seconds`."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise click.ClickException("wrk is not installed; scripts/bench installs it.")

    command = [
        wrk,
        f"-t{min(connections, 2)}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout=10s",
        f"--script={LUA_SCRIPT}",
        url,
        "--",
        str(requests),
        str(pause_ms),
    ]
    finished = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=seconds + 60
    )

    results = [line for line in finished.stdout.splitlines() if "RESULT " in line]
    if not results:
        raise click.ClickException(f"wrk printed no result: {finished.stderr}")
    load = Load(**json.loads(results[-1].split("RESULT ", 1)[1]))

    if load.failed:
        # Refused or timed-out requests are fast or slow for other reasons
        # than the ones measured.
        raise click.ClickException(
            f"{load.failed} of {load.requests} requests failed; no result."
        )
    return load


def write_requests(path: Path, lines: Iterable[tuple[str, str, str, str]]) -> Path:
    """Write requests for `requests.lua`: method, path, cookie, body."""
    path.write_text("".join("\t".join(line) + "\n" for line in lines), "utf-8")
    return path


def write_track_requests(folder: Path, *, visitors: int) -> Path:
    """`/track` requests from a sample of the first `visitors` visitors."""
    step = max(visitors // SAMPLE, 1)
    lines = (
        ("POST", "/track", visitor_cookie(n), TRACK_BODY)
        for n in range(0, visitors, step)
    )
    return write_requests(folder / "track.tsv", lines)


def write_landing_requests(folder: Path, *, contacts: int) -> Path:
    """`/go` clicks with the hashes of a sample of the first `contacts`."""
    step = max(contacts // SAMPLE, 1)
    lines = (
        ("GET", f"/go?h={fake_hash(n)}&to=/landed", "", "")
        for n in range(0, contacts, step)
    )
    return write_requests(folder / "go.tsv", lines)


def read_peak_rss_mb(pid: int) -> float:
    """The most resident memory process `pid` has had, in MB."""
    status = Path(f"/proc/{pid}/status").read_text("utf-8")
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("The kernel gave no VmHWM line.")


@contextmanager
def bare_server() -> Iterator[str]:
    """The bare endpoint, served as its own process; yields its URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bare", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=15)


def wait_for_port(port: int, *, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"Nothing listened on port {port} in {seconds} seconds.")


def run_each_connections(
    url: str, requests: Path, *, seconds: float
) -> dict[int, Load]:
    """A warm-up, then a run at each number of connections."""
    run_wrk(url, requests, connections=16, seconds=1)
    return {
        connections: run_wrk(url, requests, connections=connections, seconds=seconds)
        for connections in CONNECTIONS
    }


def measure_bare(*, seconds: float) -> dict[int, Load]:
    """The bare endpoint at each number of connections."""
    with tempfile.TemporaryDirectory(prefix="mapper-bench-") as name:
        requests = write_requests(
            Path(name) / "bare.tsv", [("POST", "/track", "", TRACK_BODY)]
        )
        with bare_server() as url:
            return run_each_connections(url, requests, seconds=seconds)


@dataclass(frozen=True)
class IntakeResult:
    """What `mapper serve` took on one database."""

    backend: str
    loads: dict[int, Load]
    half_load: Load
    peak_rss_mb: float


def measure_intake(backend: str, *, visitors: int, seconds: float) -> IntakeResult:
    """`/track` of identified visitors at each number of connections, then
    at half the most it took; and the server's peak memory."""
    with scratch(backend) as store:
        fill(store.url, rows=visitors)
        requests = write_track_requests(store.folder, visitors=visitors)

        env = {"MAPPER_DATABASE_URL": store.url}
        with MapperProcess(store.folder, env, command=SERVE_ONLY) as mapper:
            loads = run_each_connections(mapper.url, requests, seconds=seconds)
            half_load = run_half_load(
                mapper.url, requests, busiest=loads[BUSIEST], seconds=seconds
            )
            peak = read_peak_rss_mb(mapper.pid)
    return IntakeResult(backend, loads, half_load, peak)


def run_half_load(url: str, requests: Path, *, busiest: Load, seconds: float) -> Load:
    """Load `url` at about half the rate of `busiest`, on as many connections.

    Each connection pauses before each request, for its share of the rate
    less the time an answer takes; a short first run tells that time.
    """
    cycle_ms = BUSIEST * 1000 / (busiest.rate / 2)
    trial = run_wrk(
        url,
        requests,
        connections=BUSIEST,
        seconds=max(seconds / 5, 1),
        pause_ms=max(round(cycle_ms - busiest.p50_ms), 0),
    )
    return run_wrk(
        url,
        requests,
        connections=BUSIEST,
        seconds=seconds,
        pause_ms=max(round(cycle_ms - trial.p50_ms), 0),
    )


@dataclass(frozen=True)
class GrowthResult:
    """Latency of `/go` and `/track` at one size of the store."""

    landing: Load
    tracking: Load


def measure_growth(backend: str, *, rows: int, seconds: float) -> GrowthResult:
    """One connection's `/go` and `/track` latency with `rows` contacts and
    visitors stored."""
    with scratch(backend) as store:
        fill(store.url, rows=rows)
        landing = write_landing_requests(store.folder, contacts=rows)
        tracking = write_track_requests(store.folder, visitors=rows)

        env = {"MAPPER_DATABASE_URL": store.url}
        with MapperProcess(store.folder, env, command=SERVE_ONLY) as mapper:
            run_wrk(mapper.url, tracking, connections=1, seconds=1)
            go = run_wrk(mapper.url, landing, connections=1, seconds=seconds)
            track = run_wrk(mapper.url, tracking, connections=1, seconds=seconds)
    return GrowthResult(go, track)


def report_intake(size: Size) -> list[Table]:
    """The intake tables: throughput beside the bare server, half load, and
    peak memory."""
    bare = measure_bare(seconds=size.load_seconds)
    results = [
        measure_intake(backend, visitors=size.visitors, seconds=size.load_seconds)
        for backend in BACKENDS
    ]
    return [
        make_throughput_table(bare, results, seconds=size.load_seconds),
        make_half_load_table(results),
        make_memory_table(results),
    ]


def make_throughput_table(
    bare: dict[int, Load], results: list[IntakeResult], *, seconds: float
) -> Table:
    table = Table(
        "Intake: `POST /track` beside a bare endpoint",
        f"wrk sends `/track` with the signed cookie of one of {SAMPLE:,} or "
        f"fewer identified visitors, for {seconds:g} s at each number of "
        "connections, to `mapper serve --no-delivery`; the bare endpoint is "
        "one Starlette route that answers 202 without work, run by uvicorn "
        "with the same options. Each event is committed before its answer.",
        ("Server", "Connections", "Requests/s", "p50 ms", "p99 ms", "Of bare"),
    )
    servers = {"bare Starlette": bare}
    servers |= {f"mapper, {result.backend}": result.loads for result in results}
    for server, loads in servers.items():
        for connections, load in loads.items():
            share = load.rate / bare[connections].rate
            table.rows.append(
                (
                    server,
                    str(connections),
                    f"{load.rate:,.0f}",
                    f"{load.p50_ms:.2f}",
                    f"{load.p99_ms:.2f}",
                    f"{share:.2f}",
                )
            )
    return table


def make_half_load_table(results: list[IntakeResult]) -> Table:
    table = Table(
        "Intake at half load",
        f"{BUSIEST} connections, each pausing between requests so that "
        f"together they send about half of what {BUSIEST} connections "
        "without pauses reached above. Each connection waits for its answer "
        "before it pauses, so a stall of the server also holds back the "
        "requests that would have come during it: the p99 here is lower "
        "than a steady stream of arrivals would meet.",
        ("Server", "Requests/s", f"Of {BUSIEST} unpaced", "p50 ms", "p99 ms"),
    )
    for result in results:
        half, busiest = result.half_load, result.loads[BUSIEST]
        table.rows.append(
            (
                f"mapper, {result.backend}",
                f"{half.rate:,.0f}",
                f"{half.rate / busiest.rate:.2f}",
                f"{half.p50_ms:.2f}",
                f"{half.p99_ms:.2f}",
            )
        )
    return table


def make_memory_table(results: list[IntakeResult]) -> Table:
    rows: list[tuple[str, ...]] = [
        (f"mapper, {result.backend}", f"{result.peak_rss_mb:.0f}") for result in results
    ]
    return Table(
        "Memory",
        "The most resident memory (VmHWM) the `mapper serve` process had by the "
        "end of its intake runs above.",
        ("Server", "Peak RSS MB"),
        rows,
    )


def report_growth(size: Size) -> Table:
    """`/go` and `/track` latency at each size of the store."""
    table = Table(
        "Growth",
        f"One connection for {size.load_seconds:g} s each: `/go` clicks with "
        f"the hash of one of {SAMPLE:,} or fewer stored contacts and no "
        "cookie (a lookup, a new visitor bound to the contact), then `/track` "
        "from as many stored, identified visitors. The store holds as many "
        "contacts as visitors.",
        (
            "Database",
            "Rows",
            "/go p50 ms",
            "/go p99 ms",
            "/track p50 ms",
            "/track p99 ms",
        ),
    )
    for backend in BACKENDS:
        for rows in size.growth_rows:
            result = measure_growth(backend, rows=rows, seconds=size.load_seconds)
            table.rows.append(
                (
                    backend,
                    f"{rows:,}",
                    f"{result.landing.p50_ms:.2f}",
                    f"{result.landing.p99_ms:.2f}",
                    f"{result.tracking.p50_ms:.2f}",
                    f"{result.tracking.p99_ms:.2f}",
                )
            )
    return table
