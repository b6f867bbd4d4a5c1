"""`boxoffice serve` and `make run` as real processes: a second server on a taken port, an API
process killed with SIGKILL, idle and slow connections, and stopping `make run`."""

from __future__ import annotations

import os
import resource
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from service.core.settings import Settings
from service.server import Server
from tests.apiserver import BOXOFFICE, ApiServer
from tests.conftest import server_env
from tests.servers import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    """Running: neither gone nor a zombie (whose sockets are closed already)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except FileNotFoundError:
        return ""


def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        time.sleep(0.05)


def listening(pid: int, port: int) -> bool:
    """Whether the process has a socket listening on the port: an API process opens its
    own (SO_REUSEPORT) once its app has started, and until then takes no connection."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            inodes.add(fields[9])
    try:
        links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any(link[8:-1] in inodes for link in links if link.startswith("socket:["))


def fresh_get(url: str, timeout: float = 5) -> int:
    """One request on a connection of its own, so that it goes to whichever process the
    kernel picks now, not to the one that served the last."""
    return httpx.get(url, timeout=timeout, headers={"connection": "close"}).status_code


def answers(url: str) -> bool:
    try:
        return fresh_get(url, timeout=1) == 200
    except httpx.TransportError:
        return False


def test_a_second_serve_on_a_taken_port_refuses_to_start(
    settings: Settings, api: ApiServer
) -> None:
    result = subprocess.run(
        [BOXOFFICE, "serve"],
        env={
            **os.environ,
            **server_env(settings),
            "BOXOFFICE_HOST": "127.0.0.1",
            "BOXOFFICE_PORT": str(api.port),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line == f"boxoffice serve: BOXOFFICE_PORT: 127.0.0.1:{api.port} is already in use"
    # The first server still answers every request: no second one took a share of them.
    assert [fresh_get(f"{api.url}/ready") for _ in range(20)] == [200] * 20


class MakeRun:
    """`make run` with the test's database and Redis, on a port of its own. Its
    prerequisites (venv, services, migrate) are taken as done (`make -o`): the session's
    fixtures did them, and this is about the recipe's processes."""

    def __init__(self, settings: Settings, workers: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            **server_env(settings),
            "BOXOFFICE_HOST": "127.0.0.1",
            "BOXOFFICE_PORT": str(self.port),
            "BOXOFFICE_WORKERS": str(workers),
        }
        done = ["-o", "venv", "-o", "services", "-o", "migrate"]
        self.proc = subprocess.Popen(
            ["make", "--no-print-directory", *done, "run"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, as a terminal would give it
        )

    def started(self) -> MakeRun:
        wait_for(lambda: answers(f"{self.url}/health") or self.proc.poll() is not None, 60, "up")
        assert self.proc.poll() is None, self.proc.communicate()[1]
        return self

    def processes(self) -> tuple[int, int]:
        """The pids of `boxoffice serve` and `boxoffice worker`, children of the recipe's shell."""
        [shell] = children(self.proc.pid)
        found = {command_line(pid).split()[-1]: pid for pid in children(shell)}
        return found["serve"], found["worker"]

    def stop(self, signum: signal.Signals, group: bool = False) -> tuple[int, str]:
        if group:
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def make_run(settings: Settings) -> Iterator[Callable[[int], MakeRun]]:
    runs: list[MakeRun] = []

    def start(workers: int) -> MakeRun:
        runs.append(MakeRun(settings, workers))
        return runs[-1].started()

    yield start
    for run in runs:
        run.kill()


def assert_stopped_cleanly(run: MakeRun, status: int, stderr: str, signum: int) -> None:
    # GNU make, once its recipe has ended, raises the signal it got on itself again: its own
    # status says "stopped by that signal" whatever the recipe did. The recipe exited 0:
    # make reports no error ("make: *** [Makefile:..: run] Error 143" before).
    assert status in (0, -signum), (status, stderr)
    assert "make: ***" not in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert not answers(f"{run.url}/health")


@pytest.mark.slow
def test_a_killed_api_process_is_replaced_and_the_rest_keep_serving(
    make_run: Callable[[int], MakeRun],
) -> None:
    run = make_run(2)
    serve, worker = run.processes()
    wait_for(lambda: len(children(serve)) == 2, 30, "two API processes")
    first = children(serve)
    # A process opens its socket once its app has started: kill one only when both listen,
    # or the kill may take the only one that serves yet.
    wait_for(lambda: all(listening(p, run.port) for p in first), 30, "both listen")
    victim = first[0]

    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not alive(victim), 10, "the killed process gone")
    # Every request after the kill is answered, by the process left and then by both.
    assert [fresh_get(f"{run.url}/health") for _ in range(30)] == [200] * 30
    wait_for(
        lambda: len([p for p in children(serve) if p not in first and alive(p)]) == 1,
        30,
        "a new API process in place of the killed one",
    )
    assert [fresh_get(f"{run.url}/ready") for _ in range(30)] == [200] * 30
    assert alive(first[1])
    # make run, its server and the background worker kept running.
    assert run.proc.poll() is None
    assert alive(serve) and alive(worker)

    status, stderr = run.stop(signal.SIGTERM)
    assert_stopped_cleanly(run, status, stderr, signal.SIGTERM)
    assert not alive(worker) and not alive(serve)


@pytest.mark.slow
def test_an_api_process_killed_twice_in_a_row_does_not_stop_the_server(settings: Settings) -> None:
    """Granian exits on a "crash loop" when a respawned process dies within 5.5 s: a
    process killed (OOM killer, a crash) and then its replacement stops every process."""
    server = ApiServer(server_env(settings), workers=2)
    server.start()
    proc = server._proc
    assert proc is not None
    try:
        first = children(proc.pid)
        assert len(first) == 2
        # Both started: with the other still starting, no process would take connections.
        wait_for(lambda: all(listening(p, server.port) for p in first), 30, "both listen")
        os.kill(first[0], signal.SIGKILL)
        wait_for(
            lambda: len([p for p in children(proc.pid) if p not in first]) == 1,
            30,
            "a replacement",
        )
        replacement = next(p for p in children(proc.pid) if p not in first)
        wait_for(lambda: fresh_get(f"{server.url}/health") == 200, 10, "serving")
        os.kill(replacement, signal.SIGKILL)
        time.sleep(3)
        assert server.running, server.log()[-600:]
        assert [fresh_get(f"{server.url}/health") for _ in range(10)] == [200] * 10
        # Both kills were answered with a new process; the untouched one served throughout.
        wait_for(lambda: len(children(proc.pid)) == 2, 30, "two API processes again")
        now = children(proc.pid)
        assert first[1] in now and first[0] not in now and replacement not in now
    finally:
        server.stop()


def test_an_api_that_cannot_start_stops_the_server_with_a_message(settings: Settings) -> None:
    """The other side of the rule above: processes that die before they finish starting
    (here the Redis user may not load the scripts) are a crash loop, not replaced forever."""
    user = ["noscripts", "on", ">secret", "~*", "&*", "+@all", "-@scripting"]
    with RedisServer(args=["--user", *user]) as redis:
        env = {
            **os.environ,
            **server_env(settings),
            "BOXOFFICE_REDIS_URL": f"redis://noscripts:secret@127.0.0.1:{redis.port}/0",
            "BOXOFFICE_HOST": "127.0.0.1",
            "BOXOFFICE_PORT": str(free_port()),
            "BOXOFFICE_WORKERS": "2",
        }
        # granian logs to stdout, the service to stderr: one stream, in order.
        result = subprocess.run(
            [BOXOFFICE, "serve"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1, result.stdout[-2000:]
    assert "NoPermissionError" in result.stdout  # why the app cannot start
    assert "died before it finished starting, 3 times in a row" in result.stdout


def test_the_private_parts_of_granian_the_server_relies_on_are_there() -> None:
    """service/server.py steers granian's crash-loop rule through private attributes: a
    granian upgrade that renames or drops them must fail here, not in production."""
    import inspect

    from granian.server import MPServer
    from granian.server.common import AbstractServer, AbstractWorker

    loop = inspect.getsource(AbstractServer._serve_loop)
    assert "self.respawned_wrks.get(idx, 0) <= 5.5" in loop
    assert "self.interrupt_children" in loop
    watcher = inspect.getsource(AbstractWorker._watcher)
    assert "self.inner.join()" in watcher and "interrupt_by_parent" in watcher
    assert "WorkerProcess(" in inspect.getsource(MPServer._spawn_worker)
    # The signal handlers it replaces, and the event they wake the loop with.
    startup = inspect.getsource(AbstractServer.startup)
    assert "set_main_signals(self.signal_handler_interrupt, self.signal_handler_reload)" in startup
    assert "self.main_loop_interrupt.wait()" in loop


def test_a_signal_that_lands_while_the_loop_holds_its_event_does_not_hang_serve(
    tmp_path: Path,
) -> None:
    """granian's handler set the main loop's threading.Event inside the handler: a signal
    landing while the main thread held that event's lock (waking from the wait) hung
    `boxoffice serve` for good, as `make run`'s Ctrl-C did now and then (a SIGINT, then
    the recipe's SIGTERM). The handler now runs, as Python runs it, on a thread that holds
    the lock; it returns at once, and the loop is woken once the lock is free."""
    server = Server("service.web.app:create_app_from_env", started_dir=tmp_path, factory=True)
    event = server.main_loop_interrupt
    held, handled = threading.Event(), threading.Event()

    def main_thread() -> None:
        with event._cond:  # type: ignore[attr-defined]  # as inside event.wait()
            held.set()
            server.signal_handler_interrupt(signal.SIGTERM, None)
            handled.set()

    thread = threading.Thread(target=main_thread, daemon=True)
    thread.start()
    assert held.wait(5)
    assert handled.wait(5), "the handler waited for a lock its own thread held"
    thread.join(5)
    assert event.wait(5) and server.interrupt_signal


@pytest.mark.slow
def test_make_run_stopped_with_ctrl_c_ends_cleanly(make_run: Callable[[int], MakeRun]) -> None:
    run = make_run(1)
    serve, worker = run.processes()
    # Ctrl-C: the terminal sends SIGINT to the whole foreground process group.
    status, stderr = run.stop(signal.SIGINT, group=True)
    assert_stopped_cleanly(run, status, stderr, signal.SIGINT)
    assert not alive(worker) and not alive(serve)


IDLE = 1100
SLOW = 100


@pytest.fixture
def more_open_files() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = IDLE + SLOW + 512
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the open-file limit is {hard}: {wanted} needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
def test_idle_and_slow_connections_do_not_take_the_api_offline(
    settings: Settings, more_open_files: None
) -> None:
    timeout = Settings().http_idle_timeout_seconds
    server = ApiServer(server_env(settings), workers=2)
    server.start()
    sockets: list[socket.socket] = []
    try:
        for i in range(IDLE + SLOW):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            if i >= IDLE:  # a request head that never ends
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: boxoffice\r\nX-Slow: ")
            sockets.append(sock)
        opened = time.monotonic()

        # Real requests are served while every one of those connections is open.
        took = []
        for _ in range(5):
            start = time.monotonic()
            assert fresh_get(f"{server.url}/health", timeout=5) == 200
            took.append(time.monotonic() - start)
        assert max(took) < 2, took

        # And the idle and slow connections are closed by the server, in bounded time.
        closed = wait_closed(sockets, within=timeout + 5)
        print(
            f"{IDLE} idle + {SLOW} slow connections: /health in at most {max(took):.3f}s; "
            f"all closed {closed - opened:.1f}s after opening (timeout {timeout}s)"
        )
        assert closed - opened >= timeout * 0.8  # not closed early by something else
        assert fresh_get(f"{server.url}/health") == 200
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


def wait_closed(sockets: list[socket.socket], within: float) -> float:
    """Read every socket to its end; the time the last one ended."""
    deadline = time.monotonic() + within
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        open_ = len(sockets)
        while open_:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{open_} of {len(sockets)} connections still open")
            for key, _ in selector.select(timeout=left):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                try:
                    data = ready.recv(65536)
                except OSError:
                    data = b""
                if not data:  # anything sent before the end (a 408) is read and ignored
                    selector.unregister(ready)
                    open_ -= 1
    return time.monotonic()
