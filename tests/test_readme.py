"""The README's walk-through (and the waiting room's, in docs/waiting-room.md), pasted
into a shell in order, against a fresh service.

README.md marks its walk-through between `<!-- walkthrough:start -->` and
`<!-- walkthrough:end -->`. Inside, every ```sh block is a step; the fenced block right
after it (no prose between) is the answer the README shows. Each step runs in one bash
session, in order (so `TOKEN`, `HOLD_ID`, ... carry over, as they do in a terminal), with
`localhost:8000` pointing at this test's own `boxoffice serve` and `boxoffice worker`, on a
Redis and a PostgreSQL database of their own, empty at the start as a new user's are.

An answer that starts with `HTTP/` is a `curl -i` answer: its status line must match, and
every header it shows. Its body, and any other answer, is JSON (or a Server-Sent Event's
`data:` line) compared field by field: every field the README shows must be there with
that value, fields it leaves out (or marks with a bare `…`) may be anything; lists keep
their length. Values that
differ from run to run (ids, tokens, times: see `loose`) need only have the same shape
(the same length; a time; a dotted token, such as a queue ticket whose place is a number
of any length, the same number of non-empty parts), and `…` in a string stands for any
text. A step with no answer block must print nothing.
A step must exit 0 and write nothing on stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis
from sqlalchemy.engine import make_url

from service.core.settings import Settings
from service.durable import migrate
from tests.apiserver import ApiServer, Worker
from tests.servers import RedisServer

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
WALKTHROUGHS = [README, ROOT / "docs" / "waiting-room.md"]
START, END = "<!-- walkthrough:start -->", "<!-- walkthrough:end -->"
ADDRESS = "localhost:8000"  # where the README's commands find `make run`'s service
FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
# A bare `…` among an object's members: "and other fields".
ELIDED = re.compile(r",\s*…(?=\s*[,}])")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
# Fields whose values are the server's to choose, different on every run.
VARYING_IDS = frozenset({"hold_id", "booking_id", "ticket", "pass"})
STEP_SECONDS = 60


@dataclass(frozen=True)
class Step:
    line: int  # of the README, where the command block starts
    command: str
    answer: str | None


def walkthrough(text: str) -> list[Step]:
    """The walk-through's steps: each ```sh block and the answer block after it."""
    lines = text.splitlines()
    start = lines.index(START)
    end = lines.index(END, start)
    blocks: list[tuple[int, str, str, int]] = []  # first line, info, body, line after
    i = start + 1
    while i < end:
        opened = FENCE.match(lines[i])
        if opened is None:
            i += 1
            continue
        close = next(j for j in range(i + 1, end) if lines[j].strip() == "```")
        blocks.append((i + 1, opened.group(1), "\n".join(lines[i + 1 : close]), close + 1))
        i = close + 1
    steps = []
    for n, (line, info, body, after) in enumerate(blocks):
        if info != "sh":
            continue
        answer = None
        if n + 1 < len(blocks):
            nxt_line, nxt_info, nxt_body, _ = blocks[n + 1]
            between = lines[after : nxt_line - 1]
            if nxt_info != "sh" and all(not s.strip() for s in between):
                answer = nxt_body
        steps.append(Step(line, body, answer))
    return steps


def run_steps(steps: list[Step], address: str, workdir: Path) -> list[tuple[int, str, str]]:
    """Every step in one bash session; each one's exit status, stdout and stderr."""
    script = []
    for n, step in enumerate(steps):
        command = step.command.replace(ADDRESS, address)
        script.append(f"{{\n{command}\n}} >{n}.out 2>{n}.err; echo $? >{n}.rc")
    (workdir / "walkthrough.sh").write_text("\n".join(script) + "\n")
    # curl reads $CURL_HOME/.curlrc: a user's own settings stay out, and no call hangs.
    (workdir / ".curlrc").write_text(f"max-time = {STEP_SECONDS}\n")
    subprocess.run(
        ["bash", "--noprofile", "--norc", "walkthrough.sh"],
        stdin=subprocess.DEVNULL,
        cwd=workdir,
        env={**os.environ, "CURL_HOME": str(workdir)},
        timeout=STEP_SECONDS * len(steps),
        check=True,
    )
    return [
        (
            int((workdir / f"{n}.rc").read_text()),
            (workdir / f"{n}.out").read_text(),
            (workdir / f"{n}.err").read_text(),
        )
        for n in range(len(steps))
    ]


def loose(key: str) -> bool:
    return key in VARYING_IDS or key == "at" or key.endswith("_at")


def same_shape(shown: str, got: Any) -> bool:
    if not isinstance(got, str):
        return False
    if TIME.match(shown):
        return TIME.match(got) is not None
    if "." in shown:
        parts = got.split(".")
        return len(parts) == len(shown.split(".")) and all(parts)
    return len(got) == len(shown)


def text_matches(shown: str, got: str) -> bool:
    pattern = ".*".join(re.escape(part) for part in shown.split("…"))
    return re.fullmatch(pattern, got, re.DOTALL) is not None


def differences(shown: Any, got: Any, where: str = "$") -> list[str]:
    """Where `got` differs from what the README shows, by the rules of the module doc."""
    if isinstance(shown, dict):
        if not isinstance(got, dict):
            return [f"{where}: {got!r} is not an object"]
        found = []
        for key, value in shown.items():
            if key not in got:
                found.append(f"{where}.{key}: missing")
            elif loose(key) and isinstance(value, str):
                if not same_shape(value, got[key]):
                    found.append(f"{where}.{key}: {got[key]!r} is not shaped like {value!r}")
            else:
                found += differences(value, got[key], f"{where}.{key}")
        return found
    if isinstance(shown, list):
        if not isinstance(got, list) or len(got) != len(shown):
            return [f"{where}: {got!r} is not a list of {len(shown)}"]
        return [
            d
            for n, (s, g) in enumerate(zip(shown, got, strict=True))
            for d in differences(s, g, f"{where}[{n}]")
        ]
    if isinstance(shown, str) and "…" in shown:
        ok = isinstance(got, str) and text_matches(shown, got)
        return [] if ok else [f"{where}: {got!r} does not match {shown!r}"]
    if type(shown) is not type(got) or shown != got:
        return [f"{where}: {got!r}, the README shows {shown!r}"]
    return []


def body_differences(shown: str, got: str) -> list[str]:
    shown, got = shown.strip(), got.strip()
    if not shown:
        return [] if not got else [f"a body: {got!r}, the README shows none"]
    if shown.startswith("data: "):
        if not got.startswith("data: "):
            return [f"not a Server-Sent Event: {got!r}"]
        shown, got = shown.removeprefix("data: "), got.removeprefix("data: ")
    try:
        decoded = json.loads(got)
    except ValueError:
        return [f"not JSON: {got!r}"]
    return differences(json.loads(ELIDED.sub("", shown)), decoded)


def answer_differences(shown: str, got: str) -> list[str]:
    if not shown.startswith("HTTP/"):
        return body_differences(shown, got)
    shown_head, _, shown_body = shown.partition("\n\n")
    head, _, body = got.replace("\r\n", "\n").partition("\n\n")
    status, *shown_headers = shown_head.splitlines()
    got_status, *got_headers = head.splitlines()
    found = [] if got_status.strip() == status.strip() else [f"status: {got_status!r}"]
    headers = {}
    for line in got_headers:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    for line in shown_headers:
        name, _, value = line.partition(":")
        got_value = headers.get(name.strip().lower())
        if got_value is None or not text_matches(value.strip(), got_value):
            found.append(
                f"header {name.strip()}: {got_value!r}, the README shows {value.strip()!r}"
            )
    return found + body_differences(shown_body, body)


def make_run_admin_token() -> str:
    """The admin token `make run` gives the service, which the walk-through uses."""
    found = re.search(r"^BOXOFFICE_ADMIN_TOKEN \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert found, "the Makefile no longer sets a default admin token"
    return found.group(1)


async def _drop_database(url: str) -> None:
    u = make_url(url)
    conn = await asyncpg.connect(
        host=u.host, port=u.port or 5432, user=u.username, password=u.password, database="postgres"
    )
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{u.database}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def fresh_service(settings: Settings) -> Iterator[ApiServer]:
    """`make run`'s two processes on an empty Redis and an empty, migrated database."""
    db = make_url(settings.database_url)
    url = db.set(database=f"{db.database}_readme_{uuid.uuid4().hex[:8]}")
    database_url = url.render_as_string(hide_password=False)
    migrate.ensure_database(database_url)
    try:
        migrate.upgrade(database_url)
        with RedisServer() as redis_server:
            env = {
                "BOXOFFICE_REDIS_URL": redis_server.url,
                "BOXOFFICE_DATABASE_URL": database_url,
                "BOXOFFICE_ADMIN_TOKEN": make_run_admin_token(),
                "BOXOFFICE_PASS_SECRET": "readme-pass-secret-0123456789",
            }
            api, worker = ApiServer(env, workers=1), Worker(env)
            worker.start()
            try:
                api.start()
                wait_for_worker(redis_server.url, worker)
                yield api
            finally:
                api.stop()
                worker.stop()
                print(api.log(), worker.log())
    finally:
        asyncio.run(_drop_database(database_url))


def wait_for_worker(redis_url: str, worker: Worker, timeout: float = 30) -> None:
    """Until the worker keeps its liveness key: it is then reading the outboxes."""
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout
        while not client.keys("bo:worker:*:alive"):
            assert worker.running, worker.log()
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.1)
    finally:
        client.close()


@pytest.mark.parametrize("doc", WALKTHROUGHS, ids=lambda p: p.name)
def test_the_walkthrough_is_parsed(doc: Path) -> None:
    """The markers are there and the parser finds what the README shows."""
    steps = walkthrough(doc.read_text())
    assert len(steps) >= 10
    with_answers = [s for s in steps if s.answer is not None]
    assert len(with_answers) >= len(steps) - 2
    assert any("/holds" in s.command for s in with_answers)
    assert all(ADDRESS in s.command for s in with_answers)


def test_a_changed_answer_is_caught() -> None:
    """The comparison fails on what a broken command would print."""
    shown = 'HTTP/1.1 201 Created\nlocation: /events/x\n\n{"id": "x", "at": "2026-01-01T00:00:00Z"}'
    good = (
        "HTTP/1.1 201 Created\r\nLocation: /events/x\r\nx-other: 1\r\n\r\n"
        '{"id": "x", "at": "2030-05-01T10:00:00.123Z", "more": 1}'
    )
    assert answer_differences(shown, good) == []
    assert answer_differences(shown, good.replace("201 Created", "409 Conflict"))
    assert answer_differences(shown, good.replace('"id": "x"', '"id": "y"'))
    assert answer_differences(shown, good.replace("/events/x", "/events/y"))
    assert answer_differences(shown, good.replace('"at": "2030-05-01T10:00:00.123Z"', '"at": 1'))
    assert answer_differences(shown, "curl: (7) Failed to connect")
    assert differences([1, 2], [1, 2, 3]) and differences({"a": 1}, {"a": True})
    assert differences({"hold_id": "abcd"}, {"hold_id": "abc"}) == [
        "$.hold_id: 'abc' is not shaped like 'abcd'"
    ]
    # A queue ticket's place is a number of any length; its parts are what it must keep.
    shown_ticket = {"ticket": "1a24aa799cd.pa903121486064.YW5u.TdLP_xz1wYLnhRf8RGQ3Dw"}
    assert not differences(shown_ticket, {"ticket": "1a24b40c0ba.pbfa9951852ba.YW5u.i97Xy"})
    assert differences(shown_ticket, {"ticket": "1a24b40c0ba.pbfa9951852ba.YW5u"})
    assert differences(shown_ticket, {"ticket": "1a24b40c0ba..YW5u.i97Xy"})


@pytest.mark.parametrize("doc", WALKTHROUGHS, ids=lambda p: p.name)
def test_the_walkthrough_works_when_pasted(doc: Path, fresh_service: ApiServer) -> None:
    steps = walkthrough(doc.read_text())
    with tempfile.TemporaryDirectory(prefix="boxoffice-readme-") as workdir:
        results = run_steps(steps, fresh_service.url.removeprefix("http://"), Path(workdir))
    for step, (rc, out, err) in zip(steps, results, strict=True):
        where = f"{doc.relative_to(ROOT)} line {step.line}:\n{step.command}\n"
        assert rc == 0 and not err, f"{where}exit status {rc}, stderr {err!r}, stdout {out!r}"
        if step.answer is None:
            assert not out, f"{where}prints {out!r}, the README shows nothing"
        else:
            found = answer_differences(step.answer, out)
            assert not found, f"{where}answered:\n{out}\n" + "\n".join(found)
