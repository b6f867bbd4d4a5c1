"""The report of `make bench`: the ratios against their goals, the printed table, the
block of docs/benchmarks.md between the bench markers, the chart, and the machine's and
the code's description."""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import textwrap
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from loadtest.bench_room import BATCH, RATE, SAMPLE
from loadtest.bench_rows import (
    BENCH_DOC,
    CAPACITY,
    CLUSTER_PRIMARIES,
    GOALS,
    MARK_END,
    MARK_START,
    PIPELINE,
    ROOT,
    SERVICE_TARGETS,
    SPREAD_EVENTS,
    TARGETS,
    Config,
    Result,
)
from loadtest.bench_session import Bench
from loadtest.bench_tools import tool_version


def figure(r: Result, name: str) -> float:
    """A figure of a row: a field of its Result (rps, p99_ms) or one of its extra figures."""
    return float(r.extra[name] if name in r.extra else getattr(r, name))


def ratios(results: dict[str, Result]) -> list[dict[str, Any]]:
    out = []
    for g in GOALS:
        num = results.get(g.num[0])
        den = results.get(g.den[0]) if g.den else num
        if num is None or den is None:
            continue
        value = figure(num, g.num[1])
        if g.den:
            b = figure(den, g.den[1])
            value = value / b if b else math.inf
        met: bool | None
        if not g.op:
            met, goal = None, ""
        elif g.op == "within":
            met, goal = abs(value - 1) <= g.goal, f"1 ± {g.goal:g}"
        else:
            met = value >= g.goal if g.op == ">=" else value <= g.goal
            goal = f"{g.op} {g.goal:g}"
        out.append(
            {
                "key": g.key,
                "label": g.label,
                "value": round(value, 6),
                "shown": format(value, g.shown),
                "goal": goal,
                "met": met,
                "trustworthy": num.valid and den.valid,
            }
        )
    return out


def ms(value: float) -> str:
    return (
        f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"
    )


def table(results: dict[str, Result]) -> str:
    head = (
        f"{'target':<68} {'req/s':>9} {'p50':>10} {'p99':>10} {'errors':>7}"
        f"  {'µs server + redis':<24}  CPU % server/redis/client/other"
    )
    lines = [head, "-" * len(head)]
    for name in TARGETS:
        r = results.get(name)
        if r is None:
            continue
        c = r.cpu
        cpu = f"{c['server']:.0f}/{c['redis']:.0f}/{c['load_generator']:.0f}/{c['other']:.0f}"
        lines.append(
            f"{r.label.replace('`', ''):<68} {r.rps:>9,.0f} {ms(r.p50_ms):>10} {ms(r.p99_ms):>10}"
            f" {r.error_count:>7}  {cpu_per_request(r):<24}  {cpu}{mark(r)}"
        )
    return "\n".join(lines)


def mark(r: Result) -> str:
    """ " !" for a figure not to be trusted, " ~" for one taken on a busy machine."""
    return " !" if not r.valid else " ~" if r.notes else ""


def note_lines(results: dict[str, Result]) -> list[str]:
    return [
        f"{mark(r).strip()} {r.target}: {'; '.join(r.notes)}"
        for name in TARGETS
        if (r := results.get(name)) is not None and r.notes
    ]


def cpu_per_request(r: Result) -> str:
    """µs of CPU a request, the server's processes + Redis (a script row: Redis a hold; the
    PostgreSQL baseline: its processes + the rest of the machine, mostly PostgreSQL): beside
    requests/s, which on a shared machine move with whatever else runs."""
    if (hold := r.extra.get("redis_us_per_hold")) is not None:
        return f"0 + {hold:.0f}"
    per = r.extra.get("cpu_us_per_request")
    if per is None or not r.rps:
        return ""
    if r.target == "pg":
        return f"{per['server']:,.0f} + PostgreSQL {r.cpu['other'] * 10_000 / r.rps:,.0f}"
    return f"{per['server']:.0f} + {per['redis']:.0f}"


def interface_lines(results: dict[str, Result], interfaces: tuple[str, ...]) -> list[str]:
    """The service rows on each interface measured (--interface asgi,rsgi): requests/s,
    ÷ twin, the API's CPU per request; and the hold ÷ its interface's bare ceiling."""
    if len(interfaces) < 2:
        return []
    last = interfaces[-1]
    twin = results.get("twin")
    lines = ["The service rows on granian's interfaces (requests/s, ÷ twin, API µs a request):"]
    for name in SERVICE_TARGETS:
        parts = []
        for interface in interfaces:
            r = results.get(name if interface == last else f"{name}@{interface}")
            if r is not None:
                per = r.extra["cpu_us_per_request"]["server"]
                vs = f", {r.rps / twin.rps:.2f}" if twin and twin.rps else ""
                parts.append(f"{interface} {r.rps:,.0f}{vs}, {per:.0f} µs")
        if parts:
            lines.append(f"  {name}: " + "; ".join(parts))
    ceilings = []
    for interface in interfaces:
        hold = results.get("hold" if interface == last else f"hold@{interface}")
        bare = results.get(f"bare_{interface}")
        if hold and bare and bare.rps:
            ceilings.append(f"{interface} {hold.rps / bare.rps:.2f}")
    if ceilings:
        lines.append("  hold ÷ the bare ceiling of its interface: " + ", ".join(ceilings))
    return lines


def room_line(results: dict[str, Result]) -> str | None:
    """The room row's figures beyond a row's: its own Redis's memory and commands."""
    if (r := results.get("room")) is None:
        return None
    x = r.extra
    return (
        f"Waiting room of {x['buyers']:,} queued buyers: {x['redis_bytes_per_buyer']:.0f} bytes"
        f" of Redis memory each; {x['redis_commands']:,} Redis commands in {r.requests:,} polls"
        f" ({x['redis_commands_per_poll']:.2g} a poll), {x['redis_script_calls']:,} of them"
        f" script calls ({x['redis_script_calls_per_poll']:.2g}; by command:"
        f" {', '.join(f'{k} {n:,}' for k, n in x.get('redis_commands_by_name', {}).items())});"
        f" {x['admitted']:,} admitted"
        f" {x['admitted_after_seconds']:.0f} s after the opening, {x['admitted_expected']:,.0f}"
        f" expected at {x['admit_per_minute']:,} a minute; the room asks for"
        f" {x['implied_polls_per_second']:,} polls a second ({x['polls_per_second_at_5s']:,} at"
        " one every 5 s)"
    )


def ratio_lines(rs: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rs:
        doubt = "" if r["trustworthy"] else " (a figure behind it is marked !: see below)"
        verdict = "met" if r["met"] else "NOT met"
        goal = f"goal {r['goal']:<6} {verdict}" if r["goal"] else "(a figure, no goal)"
        lines.append(f"{r['label']:<42} {r['shown']:>7}   {goal}{doubt}")
    return lines


def conditions(cfg: Config, info: dict[str, Any]) -> str:
    git = info["git"]
    code = f"commit {git['commit']}" + (
        ", with uncommitted changes in service/ or lua/" if git["dirty"] else ""
    )
    us = info["cpu_slice_us"]
    slices = f"{us} µs CPU slices" if us else "the kernel's default CPU slices"
    scheduling = f"{info['cpu_policy']} scheduling in {slices}"
    speed = ""
    if (loop := info.get("reference_loop_s")) is not None:
        speed = f"; {REFERENCE_LOOP:,} additions in a Python loop took {loop:.2f} s of CPU"
    text = (
        f"Measured by `make bench` on {info['date'][:10]} ({info['cpu']}, {info['cores']} cores; "
        f"{code}; Linux {info['kernel']}{speed}): every HTTP target on granian with"
        f" {cfg.workers} worker processes, {scheduling}, "
        f"wrk with {cfg.connections} connections and {cfg.threads} threads, {cfg.warmup} s "
        f"warm-up then {cfg.seconds} s per row. One hot event with {CAPACITY:,} general-admission "
        "tickets, 1 ticket per hold; confirm and release each hit a different live hold. "
        "`boxoffice worker` was not running."
    )
    if "cluster" in cfg.only:
        text += (
            f" The spread and cluster rows make holds on {SPREAD_EVENTS} hot events in turn: on"
            f" a Redis node and on a Redis Cluster of {CLUSTER_PRIMARIES} primaries, both"
            f" started for the run ({SPREAD_EVENTS // CLUSTER_PRIMARIES} events on each primary,"
            " no replicas, the service given one node's URL; measured in alternation); Redis"
            " CPU is then every node's."
        )
    if "room" in cfg.only:
        text += (
            f" The room row: {cfg.room_buyers:,} buyers joined a waiting room's pre-queue through"
            f" the join script ({BATCH:,} a call) on a Redis node started for the run, the room"
            f" opened admitting {RATE:,} a minute, then wrk polled {min(SAMPLE, cfg.room_buyers):,}"
            " of their tickets at random."
        )
    if pg := info.get("postgres"):
        text += (
            f" PostgreSQL {pg['server_version'].split()[0]} (fsync {pg['fsync']}, "
            f"synchronous_commit {pg['synchronous_commit']}), {cfg.pg_pool} connections "
            "per baseline process."
        )
    return textwrap.fill(text, 92, break_on_hyphens=False)


def doc_block(
    cfg: Config, info: dict[str, Any], results: dict[str, Result], rs: list[dict[str, Any]]
) -> str:
    lines = [
        conditions(cfg, info),
        "",
        "| target | requests/s | p50 | p99 | CPU µs a request: server + Redis |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in TARGETS:
        if (r := results.get(name)) is not None:
            lines.append(
                f"| {r.label}{mark(r)} | {r.rps:,.0f} | {ms(r.p50_ms)} | {ms(r.p99_ms)}"
                f" | {cpu_per_request(r)} |"
            )
    lines += ["", "| ratio | value | goal | |", "|---|---:|---:|---|"]
    for ratio in rs:
        verdict = "" if ratio["met"] is None else "met" if ratio["met"] else "not met"
        lines.append(f"| {ratio['label']} | {ratio['shown']} | {ratio['goal']} | {verdict} |")
    if line := room_line(results):
        lines += ["", textwrap.fill(line + ".", 92, break_on_hyphens=False)]
    if notes := note_lines(results):
        lines += [
            "",
            "Marked rows (! not to be trusted; ~ other work on the machine, even after a retry):",
            "",
        ]
        lines += [f"- {line}" for line in notes]
    about = (
        f"The script row is Redis alone, with {PIPELINE} calls in flight per connection: its "
        "latencies are not comparable with the HTTP rows. All figures, CPU use included: "
        "`loadtest/results/bench.json`."
    )
    lines += [
        "",
        textwrap.fill(about, 92, break_on_hyphens=False),
        "",
        "![requests/s and p99 latency per target](../loadtest/results/bench.png)",
    ]
    return "\n".join(lines)


def write_doc(block: str) -> bool:
    text = BENCH_DOC.read_text()
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start < 0 or end < start:
        return False
    BENCH_DOC.write_text(text[: start + len(MARK_START)] + "\n" + block + "\n" + text[end:])
    return True


def chart(results: dict[str, Result], info: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {
        "ceiling": "#9e9e9e",
        "service": "#1f77b4",
        "redis": "#d62728",
        "postgres": "#ff7f0e",
        "cluster": "#9467bd",
    }
    rows = [results[n] for n in TARGETS if n in results]
    names = [TARGETS[r.target].short + mark(r) for r in rows]
    colour = [colours[TARGETS[r.target].kind] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.5 * len(rows)), sharey=True)
    y = list(range(len(rows)))
    left.barh(y, [r.rps for r in rows], color=colour)
    left.set_yticks(y, names)
    left.invert_yaxis()
    left.set_title("requests/s (higher is better)")
    for i, r in enumerate(rows):
        left.text(r.rps, i, f" {r.rps:,.0f}", va="center", fontsize=8)
    left.set_xlim(0, max(r.rps for r in rows) * 1.25)
    right.barh(y, [r.p99_ms for r in rows], color=colour)
    right.set_xscale("log")
    right.set_title("p99 latency, ms (log scale; lower is better)")
    for i, r in enumerate(rows):
        right.text(r.p99_ms, i, " " + ms(r.p99_ms), va="center", fontsize=8)
    right.set_xlim(min(r.p99_ms for r in rows) / 2, max(r.p99_ms for r in rows) * 4)
    fig.suptitle(
        f"make bench, {info['date'][:16].replace('T', ' ')} UTC, commit {info['git']['commit']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)  # noqa: S603, S607
        return out.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD") or "?",
        "dirty": bool(git("status", "--porcelain", "--", "service", "lua")),
    }


def machine_info(bench: Bench, wrk: str) -> dict[str, Any]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
                break
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        # The policy and slice `boxoffice serve` asks for, for every HTTP target
        # (service/core/cpusched.py).
        "cpu_slice_us": bench.settings.cpu_slice_us,
        "cpu_policy": bench.settings.cpu_policy,
        **{name: version(name) for name in ("granian", "litestar", "msgspec", "redis", "uvloop")},
        "redis_server": bench.r.info("server")["redis_version"],
        "wrk": tool_version([wrk, "-v"]),
        "git": git_state(),
        "worker_running": False,
        "reference_loop_s": reference_loop(),
    }


REFERENCE_LOOP = 5_000_000


def reference_loop() -> float:
    """CPU seconds of a fixed pure-Python loop: how fast the machine's cores were when the run
    began. This shared machine's have run the same code up to 2.5 times slower on one day
    than another; requests/s and µs move with it, and ratios much less."""
    started = time.process_time()
    total = 0
    for i in range(REFERENCE_LOOP):
        total += i
    return round(time.process_time() - started, 3)
