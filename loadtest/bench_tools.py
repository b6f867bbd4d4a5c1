"""The tools and processes of `make bench`: wrk (installed when missing), a Redis server of
the run's own, the servers under test, and wrk's runs turned into rows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import redis

from loadtest.bench_rows import HOLD_BODY, ROOT, TARGETS, WRK_DIR, Config, Result
from service.core.keys import event_keys


class BenchError(Exception):
    pass


def say(message: str) -> None:
    print(message, flush=True)


# --- tools ------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """wrk, installed from Debian's packages when missing (root, or sudo without a
    password); otherwise a clear message and no run."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise BenchError("wrk is missing and this machine has no apt-get: install wrk, then rerun")
    if os.geteuid() == 0:
        sudo: list[str] = []
    elif shutil.which("sudo"):
        sudo = ["sudo", "-n"]
    else:
        raise BenchError("wrk is missing: run `sudo apt-get install -y wrk`, then rerun")
    say("wrk not found: installing it from Debian's packages (apt-get install -y wrk)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, apt, "install", "-y", "-q", "--no-install-recommends", "wrk"]
    if subprocess.run(install, env=env, check=False).returncode != 0:  # noqa: S603
        say("apt-get install failed: refreshing the package lists (apt-get update), once")
        subprocess.run([*sudo, apt, "update", "-q"], env=env, check=False)  # noqa: S603
        subprocess.run(install, env=env, check=False)  # noqa: S603
    found = shutil.which("wrk")
    if not found:
        raise BenchError("could not install wrk with apt-get: install it by hand, then rerun")
    say(f"wrk installed: {found}")
    return found


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)  # noqa: S603
    except OSError:
        return "?"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def key_names(event_id: str) -> list[str]:
    """The event's keys in the scripts' KEYS order (service/core/keys.py), as text."""
    return [k.decode() if isinstance(k, bytes) else k for k in event_keys(event_id).all]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def own_redis(server_bin: str, logs: Path) -> Iterator[tuple[int, redis.Redis]]:
    """A Redis server of this run on a free port, configured as .ci/services.sh starts one
    (no persistence), stopped and gone at the end."""
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="boxoffice-bench-redis-"))
    argv = [server_bin, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
    argv += ["--save", "", "--appendonly", "no", "--logfile", str(logs / "redis.log")]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)  # noqa: S603
    r = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("redis-server did not start: see its log") from None
                time.sleep(0.05)
        yield port, r
    finally:
        r.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(data, ignore_errors=True)


# --- servers ----------------------------------------------------------------------------


class Server:
    """A server process (and its workers) of this run, in a session of its own so that
    stopping it ends exactly what it started."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._argv = [a.replace("{port}", str(self.port)) for a in argv]
        self._env = {k: v.replace("{port}", str(self.port)) for k, v in env.items()}
        self.log_path = logs / f"{name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, ready: Callable[[httpx.Client], bool], timeout: float = 60) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(  # noqa: S603
                self._argv,
                env=self._env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise BenchError(f"{self.name} exited at start:\n{self.log_tail()}")
                try:
                    if ready(client):
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise BenchError(f"{self.name} did not become ready in {timeout:.0f} s:\n{self.log_tail()}")

    def check_alive(self) -> None:
        if self._proc is not None and (code := self._proc.poll()) is not None:
            raise BenchError(
                f"{self.name} ended during the run (exit code {code}; was it stopped from"
                f" outside?):\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # granian: graceful stop of the workers
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Workers left behind by a main process that died: same session, same group.
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def is_not_the_service(client: httpx.Client) -> bool:
    """The twin and the baseline have no /health: a 200 means the service's app answered."""
    if client.get("/health").status_code == 200:
        raise BenchError("the service's app answered instead: see serve() in loadtest/twin.py")
    return True


def hold_answers(path: str) -> Callable[[httpx.Client], bool]:
    """Ready when a hold at `path` answers 201 (and the app is not the service's)."""

    def ready(client: httpx.Client) -> bool:
        headers = {"content-type": "application/json"}
        response = client.post(path, content=HOLD_BODY, headers=headers)
        return response.status_code == 201 and is_not_the_service(client)

    return ready


# --- load -------------------------------------------------------------------------------


def run_wrk(
    cfg: Config, wrk: str, script: str, url: str, seconds: int, args: Sequence[str] = ()
) -> dict[str, float]:
    argv = [
        wrk,
        f"-t{cfg.threads}",
        f"-c{cfg.connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(WRK_DIR / script),
        url,
    ]
    if args:
        argv += ["--", *args]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + 120)  # noqa: S603
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            data: dict[str, float] = json.loads(line.removeprefix("BENCH_RESULT "))
            return data
    raise BenchError(f"wrk gave no result ({' '.join(argv)}):\n{out.stdout}\n{out.stderr}")


def wrk_result(name: str, data: dict[str, float], cpu: dict[str, float]) -> Result:
    seconds = data["duration_us"] / 1e6
    errors = {
        k.removeprefix("errors_"): int(v) for k, v in data.items() if k.startswith("errors_") and v
    }
    result = Result(
        target=name,
        label=TARGETS[name.partition("@")[0]].label,  # "hold@asgi": the hold on ASGI
        tool="wrk",
        rps=round(data["requests"] / seconds, 1),
        p50_ms=round(data["p50_us"] / 1000, 2),
        p99_ms=round(data["p99_us"] / 1000, 2),
        requests=int(data["requests"]),
        seconds=round(seconds, 2),
        errors=errors,
        cpu=cpu,
        extra={
            "p90_ms": round(data["p90_us"] / 1000, 2),
            "max_ms": round(data["max_us"] / 1000, 2),
        },
    )
    if errors:
        result.valid = False
        result.notes.append(
            "errors: " + ", ".join(f"{v} {k}" for k, v in errors.items()) + " (non-2xx = status)"
        )
    if data.get("exhausted"):
        result.valid = False
        result.notes.append(f"hold pool ran out: {int(data['exhausted'])} requests reused a hold")
    return result
