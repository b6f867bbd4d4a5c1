"""The process manager of `boxoffice serve`: granian's, with a crash-loop rule of its own.

granian stops the whole server when a worker process dies within 5.5 s of being respawned,
whatever the reason: a process killed (out of memory, `kill -9`) and then its replacement
soon after stop every process, the ones serving included. Here a process that finished
starting (its app's lifespan start-up ran: it touched a file named for its pid) is always
replaced, and the others keep serving their connections meanwhile; only a process slot
whose processes die before they finish starting, START_FAILURES times in a row, stops the
server, since then the app cannot start at all.

It relies on granian's private parts (pinned by uv.lock; tests/test_process.py checks them):
the server's `respawned_wrks` (process index -> when it was respawned; granian takes a
death within 5.5 s of that time for a crash loop) and a worker's `_watcher` (run in a
thread, it waits for the process to end, then reports it to the server's loop).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from granian.server import MPServer
from granian.server.mp import WorkerProcess

log = logging.getLogger("boxoffice.server")

# Processes of one slot in a row that die before they finish starting: the app cannot start.
START_FAILURES = 3


def forget_gauges(pid: int) -> None:
    """A dead process's live gauges (the live view's readers and watchers) leave the sums.
    prometheus_client is imported here, late: imported before `serve` has set the metrics
    directory, it would make every process keep its metrics to itself."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class Server(MPServer):
    def __init__(self, *args: Any, started_dir: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started_dir = started_dir
        self.start_failures = [0] * self.workers
        self._main_pid = os.getpid()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        threading.Thread(target=self._wake_loop, name="signal-wake", daemon=True).start()

    # granian's own handlers set main_loop_interrupt, a threading.Event, inside the handler.
    # Python runs a handler in the main thread between two of its bytecodes; when those are
    # in main_loop_interrupt.wait(), the thread holds the event's lock and set() waits for
    # it forever. `make run`'s Ctrl-C sends two signals milliseconds apart (the group's
    # SIGINT, the recipe's SIGTERM): the second one, landing as the first woke the loop,
    # left `boxoffice serve` hung with its workers gone. Here a handler only notes the
    # signal and writes a byte; a thread of its own sets the event.
    def signal_handler_interrupt(self, *args: Any, **kwargs: Any) -> None:
        self.interrupt_signal = True
        self._wake()

    def signal_handler_reload(self, *args: Any, **kwargs: Any) -> None:
        self.reload_signal = True
        self._wake()

    def _wake(self) -> None:
        # A worker process runs these handlers until it sets its own: none of its business.
        if os.getpid() == self._main_pid:
            with contextlib.suppress(BlockingIOError):  # a wake-up is pending already
                os.write(self._wake_w, b"\0")

    def _wake_loop(self) -> None:
        while os.read(self._wake_r, 64):
            self.main_loop_interrupt.set()

    def _spawn_worker(self, *args: Any, **kwargs: Any) -> WorkerProcess:
        worker = super()._spawn_worker(*args, **kwargs)
        report: Callable[[], None] = worker._watcher

        def watcher() -> None:
            worker.inner.join()
            if worker.inner.pid is not None:
                forget_gauges(worker.inner.pid)
            if not worker.interrupt_by_parent:
                self.judge_exit(worker)
            report()  # granian's: the process has ended, its join returns at once

        worker._watcher = watcher  # type: ignore[method-assign]
        return worker

    def judge_exit(self, worker: WorkerProcess) -> None:
        """Before granian's loop hears of an unexpected exit: tell it whether this is a
        crash loop, through the time it thinks the slot was respawned at."""
        marker = self.started_dir / str(worker.inner.pid)
        if marker.exists():
            marker.unlink(missing_ok=True)
            self.start_failures[worker.idx] = 0
            self.respawned_wrks.pop(worker.idx, None)  # never a crash loop: replace it
            return
        self.start_failures[worker.idx] += 1
        if self.start_failures[worker.idx] < START_FAILURES:
            self.respawned_wrks.pop(worker.idx, None)
            return
        log.error(
            "worker-%d died before it finished starting, %d times in a row: the app cannot "
            "start (see the errors above); stopping the server",
            worker.idx + 1,
            START_FAILURES,
        )
        self.respawned_wrks[worker.idx] = time.monotonic()  # granian's crash loop: it exits
