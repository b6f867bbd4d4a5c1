"""Headless Chromium for the dashboard's tests: `--dump-dom` runs, and a small DevTools
client over `--remote-debugging-pipe` (no library: JSON messages separated by NUL bytes
on file descriptors 3 and 4) for a page watched in real time."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import Any, Self

# `make test` installs Debian's chromium when it can (Makefile, target chromium).
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium() -> str | None:
    configured = os.environ.get("BOXOFFICE_TEST_CHROMIUM")
    if configured:
        return configured
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


def _args(binary: str, profile: str, width: int, height: int) -> list[str]:
    return [
        binary,
        "--headless",
        "--no-sandbox",  # as root, in a container: the sandbox needs what neither gives
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",  # never another run's profile
        f"--window-size={width},{height}",
    ]


def dump_dom(binary: str, url: str, budget_ms: int = 5000, timeout: float = 60) -> str:
    """The DOM after the page ran for `budget_ms` of virtual time (timers run at once;
    what arrives from the network arrives in real time)."""
    with tempfile.TemporaryDirectory(prefix="boxoffice-chromium-") as profile:
        done = subprocess.run(
            [
                *_args(binary, profile, 1400, 1000),
                f"--virtual-time-budget={budget_ms}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            timeout=timeout,
            check=True,
        )
    return done.stdout.decode()


class Browser:
    """One headless Chromium driven over the DevTools protocol, one page open."""

    def __init__(
        self, binary: str, width: int = 1400, height: int = 1000, extra: Sequence[str] = ()
    ) -> None:
        """`extra`: more command-line switches (tests/test_docs_browser.py: no network but
        loopback)."""
        self._profile = tempfile.mkdtemp(prefix="boxoffice-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds() -> None:  # in the child: the pipe ends where Chromium expects them
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self._proc = subprocess.Popen(
            [
                *_args(binary, self._profile, width, height),
                *extra,
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),
            preexec_fn=fds,  # safe here: the test process has started no thread of its own
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if getattr(self, "_session", None) and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self._session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium exited")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        parsed: dict[str, Any] = json.loads(message)
        return parsed

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, within: float = 20) -> Any:
        """The value of `expression` once it is truthy."""
        deadline = time.monotonic() + within
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError as e:  # the page is still loading (no body yet)
                value = e
            if value and not isinstance(value, RuntimeError):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {within}s: {expression} (last: {value!r})")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=5)
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Dashboard(HTMLParser):
    """What a dumped dashboard shows: its state, each category's figures, each seat, the
    waiting room's figures (as shown: text)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.state = ""
        self.hidden: dict[str, bool] = {}
        self.figures: dict[str, dict[str, int]] = {}
        self.seats: dict[str, str] = {}  # label -> state
        self.map_counts: dict[str, int] = {}
        self.queue: dict[str, str] = {}  # figure -> its text
        self.text: list[str] = []
        self._category: str | None = None
        self._figure: tuple[str, str] | None = None
        self._in_queue = False
        self._queue_figure: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "body":
            self.state = a.get("data-state") or ""
        if a.get("id") in ("board", "refusal"):
            self.hidden[a["id"] or ""] = "hidden" in a
        if tag == "div" and "cat" in classes:
            self._category = a.get("data-category")
        if tag == "b" and self._category and a.get("data-figure"):
            self._figure = (self._category, a["data-figure"] or "")
        if tag == "i" and "seat" in classes:
            states = [c for c in classes if c != "seat"]
            self.seats[a.get("title") or ""] = states[0] if states else ""
        if tag == "dl" and a.get("id") == "queue":
            self._in_queue = True
        if tag == "dd" and self._in_queue:
            self._queue_figure = a.get("data-figure")
        if a.get("id") == "mapcounts":
            self.map_counts = {
                k[5:]: int(v or 0) for k, v in a.items() if k.startswith("data-") and v
            }

    def handle_endtag(self, tag: str) -> None:
        if tag == "dl":
            self._in_queue = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._queue_figure is not None:
            self.queue[self._queue_figure] = data
            self._queue_figure = None
        if self._figure is not None:
            category, name = self._figure
            self.figures.setdefault(category, {})[name] = int(data.replace(",", ""))
            self._figure = None
