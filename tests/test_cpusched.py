"""The scheduling `boxoffice serve` asks for (service/core/cpusched.py), a policy and a CPU
slice: taken by the kernel where it can, inherited by the API processes and every thread of
theirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.core import cpusched
from service.core.settings import Settings
from tests.apiserver import ApiServer

# In a process of its own: the test process keeps the kernel's scheduling. Asks for batch in
# 250 µs slices, then reports its own policy and slice, a thread's it starts, and a
# program's it runs (fork and exec).
ASK_AND_INHERIT = """
import os, subprocess, sys, threading
from service.core import cpusched
def mine():
    return f"{os.sched_getscheduler(0)}/{cpusched.slice_of(0)}"
taken = cpusched.ask(250, "batch")
seen = []
thread = threading.Thread(target=lambda: seen.append(mine()))
thread.start()
thread.join()
child = subprocess.run(
    [sys.executable, "-c", "import os; from service.core import cpusched;"
     " print(f'{os.sched_getscheduler(0)}/{cpusched.slice_of(0)}')"],
    capture_output=True, text=True, check=True,
)
print(taken, mine(), seen[0], child.stdout.strip())
"""


def kernel_takes_slices() -> bool:
    out = subprocess.run(
        [sys.executable, "-c", "from service.core import cpusched; print(cpusched.ask(100))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip() == "True"


needs_slices = pytest.mark.skipif(
    not kernel_takes_slices(), reason="this kernel keeps its own slices (Linux 6.12+ takes them)"
)


def test_the_default_is_batch_in_the_shortest_slice_and_normal_in_the_kernels_asks_nothing() -> (
    None
):
    assert Settings().cpu_slice_us == cpusched.SHORTEST == 100
    assert Settings().cpu_policy == "batch"
    assert Settings.from_env({"BOXOFFICE_CPU_SLICE_US": "0"}).cpu_slice_us == 0
    assert Settings.from_env({"BOXOFFICE_CPU_POLICY": "normal"}).cpu_policy == "normal"
    before = (os.sched_getscheduler(0), cpusched.slice_of(0))
    assert cpusched.ask(0, "normal") is False
    assert cpusched.ask(100, "idle") is False  # not a policy the API takes
    assert (os.sched_getscheduler(0), cpusched.slice_of(0)) == before


@needs_slices
def test_a_slice_asked_for_is_inherited_by_threads_and_programs_started_after() -> None:
    out = subprocess.run(
        [sys.executable, "-c", ASK_AND_INHERIT],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    batch = f"{os.SCHED_BATCH}/250000"
    assert out.stdout.split() == ["True", batch, batch, batch]


@needs_slices
def test_every_thread_of_every_api_process_runs_batch_in_the_configured_slice(
    api: ApiServer,
) -> None:
    main = api.pid
    workers = [int(p) for p in Path(f"/proc/{main}/task/{main}/children").read_text().split()]
    assert len(workers) == 2
    threads = [int(t) for pid in workers for t in os.listdir(f"/proc/{pid}/task")]
    # The event loop's, granian's I/O and Python threads, and whatever else runs there.
    assert len(threads) >= 3 * len(workers)
    assert {cpusched.slice_of(t) for t in threads} == {cpusched.SHORTEST * 1000}
    assert {os.sched_getscheduler(t) for t in threads} == {os.SCHED_BATCH}
