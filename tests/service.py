"""Runs `mapper serve` as a real process for end-to-end tests.

The process gets its settings through the environment, exactly as an
operator would give them, and writes its log to a file the tests sweep.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SECRET_KEY = "e2e-signing-key-0123456789abcdef"
WEBHOOK_SECRET = "e2e-webhook-secret-0123456789"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class MapperProcess:
    """`mapper db upgrade`, then `mapper serve` or another `command`.

    The service listens on a free loopback port. Processes sharing a folder
    need a `name` each, which names their log.
    """

    def __init__(
        self,
        folder: Path,
        env: dict[str, str],
        *,
        command: tuple[str, ...] = ("serve",),
        name: str = "mapper",
    ) -> None:
        self.folder = folder
        self.command = command
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / f"{name}.log"
        # Only coverage's own variables pass through, so that the process
        # sees no setting of the test run's.
        passed = {k: v for k, v in os.environ.items() if k.startswith("COVERAGE")}
        self.env = {
            **passed,
            "PATH": os.environ.get("PATH", ""),
            "MAPPER_DATABASE_URL": f"sqlite:///{folder / 'mapper.db'}",
            "MAPPER_SECRET_KEYS": SECRET_KEY,
            "MAPPER_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "MAPPER_COOKIE_SECURE": "false",
            "MAPPER_DELIVERY_INTERVAL": "0.1",
            "MAPPER_PORT": str(self.port),
            **env,
        }
        self._process: subprocess.Popen[bytes] | None = None

    def run_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mapper", *args],
            cwd=self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def start(self) -> None:
        upgraded = self.run_cli("db", "upgrade")
        assert upgraded.returncode == 0, upgraded.stderr
        # The child keeps its own handle on the log; ours closes at once.
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "mapper", *self.command],
                cwd=self.folder,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"mapper {self.command[0]} exited: {self.log()}")
            if self.command[0] != "serve":
                if "is starting" in self.log():
                    return
                time.sleep(0.05)
                continue
            try:
                httpx.get(f"{self.url}/healthz", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("mapper serve did not start in 20 seconds")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 15 seconds; return the exit status."""
        if self._process is None:
            return None
        self._process.terminate()
        try:
            status = self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            status = self._process.wait()
        self._process = None
        return status

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to finish anything."""
        if self._process is None:
            return
        self._process.kill()
        self._process.wait()
        self._process = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def log(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace")

    def __enter__(self) -> MapperProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
