"""The Makefile's front door: a bare `make` lists the targets and starts nothing, and
`make test-fast` leaves out the cluster, browser and slow tiers, and only those."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make(*args: str) -> str:
    done = subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_bare_make_lists_every_target_with_a_line() -> None:
    text = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:((?:.*\\\n)*.*)$", text, re.M)
    assert phony, "the Makefile lists no .PHONY targets"
    targets = phony.group(1).replace("\\\n", " ").split()
    listed = dict(line.split(None, 1) for line in make().splitlines()[1:] if line.startswith("  "))
    assert set(listed) == set(targets)
    assert all(len(line.split()) >= 3 for line in listed.values())
    assert "test-fast" in listed and "help" in listed


def test_test_fast_leaves_out_the_cluster_browser_and_slow_tiers() -> None:
    # make -n prints the recipes (the set-up's too) without running any of them.
    pytest_argv = shlex.split(make("-n", "test-fast").splitlines()[-1])
    assert pytest_argv[0].endswith("pytest")
    # Collected in one process (-n 0): xdist's workers would each start their Redis for it.
    collect = ["--collect-only", "-q", *pytest_argv[1:], "-n", "0"]
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", *collect],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    ids = {line for line in collected.splitlines() if "::" in line}
    modules = {i.split("::")[0] for i in ids}
    assert "tests/test_errors.py" in modules and "tests/test_make.py" in modules
    # Whole modules: browser, slow; a cluster through a fixture, and one started in a test.
    assert "tests/test_dashboard_browser.py" not in modules
    assert "tests/test_wheel.py" not in modules
    assert "tests/test_waiting_room_cluster.py" not in modules
    assert not any(i.endswith("test_hold_confirm_release_on_every_primary") for i in ids)
    assert not any("test_redis_py_on_a_cluster_waits" in i for i in ids)
    # The single-node tests of a cluster module stay in.
    assert any(i.endswith("test_a_single_node_keeps_its_own_client") for i in ids)
