"""The running event loop, kept rather than looked up per call: on Python 3.11,
asyncio.get_running_loop() (and asyncio.current_task() without a loop) makes a getpid()
system call each time, its check for a fork: 9 % of a hold's event-loop thread in a
profile, from the script pipe (service/hotpath/nodepipe.py) and the body deadlines
(service/web/bodies.py)."""

from __future__ import annotations

import asyncio
import os
import threading

# How many forks this process descends through: a loop kept before a fork is the parent's.
_forks = 0


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


class KeptLoop:
    """The loop its owner is used on. The kept loop is the running one when it runs and
    this is the thread it was kept on: a thread runs one loop at a time, so that is the
    loop calling (unless the loop went on to run in another thread while this one runs a
    loop of its own: nothing here moves loops). A loop that stopped (a test's own loop,
    closed) or another thread's is looked up again, and so is one kept before a fork (in
    the child, the copy of a loop that was running when the parent forked still says it
    runs)."""

    __slots__ = ("_forks", "_loop", "_thread")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._forks = 0

    def running(self) -> asyncio.AbstractEventLoop:
        """The running loop (RuntimeError outside one, as asyncio.get_running_loop())."""
        loop = self._loop
        if (
            loop is not None
            and loop.is_running()
            and threading.get_ident() == self._thread
            and self._forks == _forks
        ):
            return loop
        loop = self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._forks = _forks
        return loop
