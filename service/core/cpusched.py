"""The scheduling the API's threads ask the kernel for: a time slice
(`BOXOFFICE_CPU_SLICE_US`) and a policy (`BOXOFFICE_CPU_POLICY`).

A request crosses threads several times: granian's I/O thread reads it and hands it to the
thread that enters Python, which wakes the event loop; the body comes back the same way;
the loop waits for Redis, then hands the answer back to the I/O thread. Each hand-over
wakes a thread. On a machine whose cores are busy (the API, Redis and the load all on two
cores in `make bench`), Linux's scheduler (EEVDF, 6.6+) lets the thread running keep the
core until it has used its slice (by default 1.4 ms on this project's 2-core machines, as
sched_getattr reports it). A woken thread waited up to that long at each hand-over, and so
did Redis, woken by a batch of holds. At 64 connections a hold spent most of its 5 ms
there, with a fifth of the machine idle.

Since Linux 6.12 a thread of the normal policy may ask for a shorter slice (the `runtime`
of sched_setattr(2), 0.1 to 100 ms). Measured side by side (docs/benchmarks.md "The
kernel's time slice"): at 0.1 ms the same service makes about a quarter more holds a second
at a lower p99, and each hold costs the API a fifth less CPU (fewer wake-ups and spins of a
thread waiting for another that was not running). The twin and the bare ceilings are
served by the same launcher and get the same slice.

The thread that wakes another usually holds the GIL (the loop handing an answer or asking
for a body, writing to Redis). Under the normal policy the woken thread may preempt it on
its core, and every thread waiting for the GIL then waits for one that is not running. A
thread of the batch policy (SCHED_BATCH, any Linux, no privilege) is never preempted for at
wake-up: it runs on an idle core, or once the waker sleeps or its slice ends. Measured side
by side (docs/benchmarks.md "SCHED_BATCH"): about a third more holds a second, a quarter less
CPU a hold, p99 down by a third; the twin and the ceilings gain too.

`boxoffice serve` asks in its main process before granian starts the workers: policy and
slice are inherited by every thread and process started after it, across exec too. An
older kernel takes the call and keeps its default slice; that is logged, nothing else
changes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from typing import Any

log = logging.getLogger("boxoffice.cpusched")

# The kernel's range for a requested slice, in microseconds (0: the kernel's default).
SHORTEST, LONGEST = 100, 100_000
# sched_setattr(2) and sched_getattr(2) by machine: Python binds neither.
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}


class _Attr(ctypes.Structure):
    """struct sched_attr, its first version (SCHED_ATTR_SIZE_VER0, 48 bytes)."""

    _fields_ = (
        ("size", ctypes.c_uint32),
        ("policy", ctypes.c_uint32),
        ("flags", ctypes.c_uint64),
        ("nice", ctypes.c_int32),
        ("priority", ctypes.c_uint32),
        ("runtime", ctypes.c_uint64),  # of a normal thread: its slice, in nanoseconds
        ("deadline", ctypes.c_uint64),
        ("period", ctypes.c_uint64),
    )


# The policies `boxoffice serve` may ask for (BOXOFFICE_CPU_POLICY), by name.
POLICIES = {"batch": os.SCHED_BATCH, "normal": os.SCHED_OTHER} if sys.platform == "linux" else {}


def ask(microseconds: int, policy: str = "normal") -> bool:
    """Ask for `policy` ("batch" or "normal") and slices of `microseconds` (0: the
    kernel's) for this thread and all it starts from now on; whether the kernel took both.
    Normal with the kernel's slices, another system, or a thread of a real-time policy
    (whose scheduling is its own): nothing asked."""
    calls = _calls()
    wanted = POLICIES.get(policy)
    if calls is None or wanted is None or (wanted == os.SCHED_OTHER and not microseconds):
        return False
    if os.sched_getscheduler(0) not in (os.SCHED_OTHER, os.SCHED_BATCH):
        return False
    attr = _Attr(
        size=ctypes.sizeof(_Attr),
        policy=wanted,
        nice=os.getpriority(os.PRIO_PROCESS, 0),  # kept as it is
        runtime=microseconds * 1000,
    )
    if _syscall(calls[0], 0, ctypes.byref(attr), 0) != 0:
        error = os.strerror(ctypes.get_errno())
        log.warning("the kernel refused %s in %d µs slices: %s", policy, microseconds, error)
        return False
    if microseconds and slice_of(0) != microseconds * 1000:
        # The policy was taken all the same: said here, since the caller's line is not.
        log.info(
            "API processes run %s in the kernel's slices (custom ones need Linux 6.12 or later)",
            policy,
        )
        return False
    return os.sched_getscheduler(0) == wanted


def slice_of(tid: int) -> int:
    """The slice thread `tid` (0: this one) runs in, in nanoseconds, as the kernel reports
    it: 0 where it reports none (an older kernel, another system)."""
    calls = _calls()
    attr = _Attr()
    if calls is None or _syscall(calls[1], tid, ctypes.byref(attr), ctypes.sizeof(attr), 0):
        return 0
    return int(attr.runtime)


def _calls() -> tuple[int, int] | None:
    """sched_setattr's and sched_getattr's numbers here; None off Linux or on a machine
    not in _SYSCALLS."""
    return _SYSCALLS.get(platform.machine()) if sys.platform == "linux" else None


def _syscall(number: int, *args: Any) -> int:
    return int(ctypes.CDLL(None, use_errno=True).syscall(number, *args))
