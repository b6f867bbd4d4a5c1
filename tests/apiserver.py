"""`boxoffice serve` and `boxoffice worker` as real subprocesses, for the tests to drive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from tests.servers import free_port

BOXOFFICE = str(Path(sys.executable).parent / "boxoffice")


class Process:
    """`program command` (this environment's boxoffice unless told), in `cwd` if given."""

    def __init__(
        self, command: str, env: dict[str, str], program: str = BOXOFFICE, cwd: Path | None = None
    ) -> None:
        self.command = command
        self.program = program
        self.cwd = cwd
        self._env = {**os.environ, **env}
        self._proc: subprocess.Popen[bytes] | None = None
        # A file, not a pipe: a pipe nobody reads would block the process once full.
        self.log_path = Path(tempfile.mkstemp(prefix=f"boxoffice-{command}-", suffix=".log")[1])

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [self.program, self.command],
            env=self._env,
            cwd=self.cwd,
            stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("ab"),
        )

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15) -> int | None:
        """Signal the process and wait for it; returns its exit code."""
        if self._proc is None:
            return None
        proc, self._proc = self._proc, None
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class ApiServer(Process):
    def __init__(
        self,
        env: dict[str, str],
        workers: int = 2,
        program: str = BOXOFFICE,
        cwd: Path | None = None,
        interface: str | None = None,
    ) -> None:
        """`interface`: granian's, rsgi or asgi; by default the service's default, or what
        BOXOFFICE_INTERFACE says (`BOXOFFICE_INTERFACE=asgi make test`: all on ASGI)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        chosen = {} if interface is None else {"BOXOFFICE_INTERFACE": interface}
        super().__init__(
            "serve",
            {
                **env,
                "BOXOFFICE_HOST": "127.0.0.1",
                "BOXOFFICE_PORT": str(self.port),
                "BOXOFFICE_WORKERS": str(workers),
                **chosen,
            },
            program,
            cwd,
        )

    # Generous: under `make test` the xdist workers start theirs at once, on few cores.
    def start(self, timeout: float = 90.0) -> None:
        super().start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"boxoffice serve exited:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("boxoffice serve did not answer /health in time")


class Worker(Process):
    def __init__(
        self, env: dict[str, str], program: str = BOXOFFICE, cwd: Path | None = None
    ) -> None:
        super().__init__("worker", env, program, cwd)


@asynccontextmanager
async def served(
    env: dict[str, str], client_timeout: float = 30
) -> AsyncIterator[httpx.AsyncClient]:
    """A one-process API server of the test's own on `env`, and a client of it; the
    server's log is printed at the end (pytest shows it when the test fails)."""
    server = ApiServer(env, workers=1)
    server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=client_timeout) as c:
            yield c
    finally:
        server.stop()
        print(server.log())
