"""A Docker engine of the image test's own, for a machine where none answers but Debian's
docker.io is installed and we are root (`make test` installs it: Makefile, target docker).

Its containers use the host's network only (`--bridge=none`, no iptables rules), so nothing
of the machine's network changes. It listens on a socket of its own, with its pidfile and
exec-root beside it in a temp dir, so it never clashes with another engine. Its data-root is
Docker's default, where the base image and the build cache outlive the run (a second build
takes seconds), unless another dockerd runs or another test session holds it: two engines
cannot share one data-root, so that one gets a temp data-root, removed afterwards.
"""

from __future__ import annotations

import ctypes
import fcntl
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

from tests.servers import Started

DEFAULT_DATA_ROOT = Path("/var/lib/docker")
# Held while a test's dockerd uses the default data-root: a second session takes a temp one.
LOCK = Path(tempfile.gettempdir()) / "boxoffice-test-dockerd.lock"
PR_SET_PDEATHSIG = 1


def other_dockerd_runs() -> bool:
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "dockerd":
                return True
        except OSError:  # gone meanwhile
            continue
    return False


def _die_with_parent() -> None:
    """In the child: SIGTERM when pytest dies, even by SIGKILL, so no engine outlives it."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Dockerd(Started):
    def __init__(self, timeout: float = 60) -> None:
        executable = shutil.which("dockerd")
        if executable is None:
            raise RuntimeError("dockerd is not on PATH (Debian: apt-get install docker.io)")
        self.executable = executable
        self.timeout = timeout
        self.dir = Path(tempfile.mkdtemp(prefix="boxoffice-dockerd-"))
        self.host = f"unix://{self.dir}/docker.sock"
        self.data_root = self.dir / "data"
        self.log = self.dir / "dockerd.log"
        self._lock: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self._claim_default_data_root():
            self.data_root = DEFAULT_DATA_ROOT
        argv = [
            self.executable,
            "--host", self.host,
            "--pidfile", str(self.dir / "docker.pid"),
            "--exec-root", str(self.dir / "exec"),
            "--data-root", str(self.data_root),
            "--bridge=none", "--iptables=false", "--ip6tables=false",
        ]  # fmt: skip
        with self.log.open("wb") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches pytest, whose teardown stops it
                preexec_fn=_die_with_parent,
            )
        self._wait_ready(self._proc)

    def docker(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "--host", self.host, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def close(self) -> None:
        """Its containers removed, then SIGTERM (SIGKILL after 30 s); its temp dir goes."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                running = self.docker("ps", "--quiet", timeout=20).stdout.split()
                if running:
                    self.docker("rm", "--force", *running, timeout=60)
            except subprocess.TimeoutExpired:
                pass
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._unmount()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def _unmount(self) -> None:
        """What dockerd leaves mounted under its exec-root (its network namespace, at least)."""
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        points = [line.split()[4] for line in mountinfo]
        for point in sorted((p for p in points if p.startswith(f"{self.dir}/")), reverse=True):
            subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)

    def _claim_default_data_root(self) -> bool:
        lock = LOCK.open("ab")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return False
        if other_dockerd_runs():
            lock.close()
            return False
        self._lock = lock
        return True

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.timeout
        while proc.poll() is None:
            try:
                if self.docker("version", timeout=10).returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"dockerd did not answer within {self.timeout:.0f} s: {self.error()}"
                )
            time.sleep(0.5)
        raise RuntimeError(f"dockerd exited with status {proc.returncode}: {self.error()}")

    def error(self) -> str:
        """dockerd's own word: its last error or fatal line, else its last line."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [line for line in lines if "level=error" in line or "level=fatal" in line]
        return (errors or lines or ["no output"])[-1]
