"""The CPU slice `boxoffice serve` asks for (service/core/cpuslice.py): taken by the kernel
where it can, inherited by the API processes and every thread of theirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.core import cpuslice
from service.core.settings import Settings
from tests.apiserver import ApiServer

# In a process of its own: the test process keeps the kernel's slice. Asks for 250 µs, then
# reports its own slice, a thread's it starts, and a program's it runs (fork and exec).
ASK_AND_INHERIT = """
import subprocess, sys, threading
from service.core import cpuslice
taken = cpuslice.ask(250)
seen = []
thread = threading.Thread(target=lambda: seen.append(cpuslice.slice_of(0)))
thread.start()
thread.join()
child = subprocess.run(
    [sys.executable, "-c", "from service.core import cpuslice; print(cpuslice.slice_of(0))"],
    capture_output=True, text=True, check=True,
)
print(taken, cpuslice.slice_of(0), seen[0], int(child.stdout))
"""


def kernel_takes_slices() -> bool:
    out = subprocess.run(
        [sys.executable, "-c", "from service.core import cpuslice; print(cpuslice.ask(100))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip() == "True"


needs_slices = pytest.mark.skipif(
    not kernel_takes_slices(), reason="this kernel keeps its own slices (Linux 6.12+ takes them)"
)


def test_the_default_is_the_shortest_slice_and_zero_asks_nothing() -> None:
    assert Settings().cpu_slice_us == cpuslice.SHORTEST == 100
    assert Settings.from_env({"BOXOFFICE_CPU_SLICE_US": "0"}).cpu_slice_us == 0
    before = cpuslice.slice_of(0)
    assert cpuslice.ask(0) is False
    assert cpuslice.slice_of(0) == before


@needs_slices
def test_a_slice_asked_for_is_inherited_by_threads_and_programs_started_after() -> None:
    out = subprocess.run(
        [sys.executable, "-c", ASK_AND_INHERIT],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.stdout.split() == ["True", "250000", "250000", "250000"]


@needs_slices
def test_every_thread_of_every_api_process_runs_in_the_configured_slice(api: ApiServer) -> None:
    main = api.pid
    workers = [int(p) for p in Path(f"/proc/{main}/task/{main}/children").read_text().split()]
    assert len(workers) == 2
    threads = [int(t) for pid in workers for t in os.listdir(f"/proc/{pid}/task")]
    # The event loop's, granian's I/O and Python threads, and whatever else runs there.
    assert len(threads) >= 3 * len(workers)
    assert {cpuslice.slice_of(t) for t in threads} == {cpuslice.SHORTEST * 1000}
