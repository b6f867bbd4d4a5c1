"""CPU accounting for `make bench`: what the server, Redis, the load generator and the rest
of the machine used during a measured run, and how busy the machine is before one."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from typing import Any

import redis

CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values)
    return total - idle, total


def _proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from the 3rd on


def tree_ticks(root: int) -> int:
    """CPU jiffies (user + system) of a process and all its descendants, alive now."""
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _proc_stat(int(entry))) is not None:
            stats[int(entry)] = st
            parents[int(entry)] = int(st[1])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(int(stats[p][11]) + int(stats[p][12]) for p in tree if p in stats)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def redis_cpu(nodes: Sequence[redis.Redis]) -> float:
    """CPU seconds of these Redis servers (every node of a cluster, replicas too)."""
    total = 0.0
    for r in nodes:
        info: dict[str, Any] = r.info("cpu")
        total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return total


class Meter:
    """CPU during one measured run, in % of one core: the server's processes, Redis, the
    load generator (a finished child of this process), and the machine as a whole (of all
    cores) -- "other" is what the machine did beyond those three."""

    def __init__(self, r: redis.Redis | Sequence[redis.Redis], server_pid: int | None) -> None:
        self._r = [r] if isinstance(r, redis.Redis) else list(r)
        self._pid = server_pid

    def __enter__(self) -> Meter:
        self._t = time.monotonic()
        self._machine = machine_ticks()
        self._server = tree_ticks(self._pid) if self._pid else 0
        self._redis = redis_cpu(self._r)
        self._client = children_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._t
        busy, total = machine_ticks()
        cores = os.cpu_count() or 1
        server = ((tree_ticks(self._pid) - self._server) / CLK_TCK) if self._pid else 0.0
        redis_s = redis_cpu(self._r) - self._redis
        client = children_cpu() - self._client
        machine = (busy - self._machine[0]) / max(1, total - self._machine[1])
        pct = {
            "server": server / wall * 100,
            "redis": redis_s / wall * 100,
            "load_generator": client / wall * 100,
            "machine_of_all_cores": machine * 100,
        }
        pct["other"] = max(
            0.0, machine * cores * 100 - pct["server"] - pct["redis"] - pct["load_generator"]
        )
        self.cpu = {k: round(v, 1) for k, v in pct.items()}


def busy_sample(seconds: float = 1.0) -> float:
    """% of the whole machine busy over `seconds`, with nothing of ours under load."""
    b0, t0 = machine_ticks()
    time.sleep(seconds)
    b1, t1 = machine_ticks()
    return round((b1 - b0) / max(1, t1 - t0) * 100, 1)
