"""The service as the ticket drop's master sees it (loadtest/locustfile.py): the admin API
for the setup and the final checks."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from locust.env import Environment
from locust.runners import WorkerRunner

HTTP_TIMEOUT = 30.0  # seconds, for the admin calls of the master


class ServiceError(Exception):
    pass


class Api:
    """Plain blocking HTTP (cooperative under gevent) for the setup and the final checks."""

    def __init__(self, base_url: str, token: str) -> None:
        if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
            raise ServiceError(f"--host must be an http(s) URL, not {base_url!r}")
        self.base = base_url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)  # noqa: S310
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token and path.startswith("/admin/"):
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:  # noqa: S310
                status, raw = int(response.status), response.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except OSError as e:
            raise ServiceError(f"{method} {path}: {e}") from e
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str) -> Any:
        status, body = self.call("GET", path)
        if status != 200:
            raise ServiceError(f"GET {path}: {status} {body}")
        return body

    def reconcile(self, event_id: str) -> dict[str, Any]:
        report: dict[str, Any] = self.get(f"/admin/events/{event_id}/reconcile")
        return report

    def bookings(self, event_id: str) -> list[dict[str, Any]]:
        """Every confirmed booking PostgreSQL has, page by page."""
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            query = {"status": "confirmed", "limit": "1000"}
            if cursor:
                query["cursor"] = cursor
            page = self.get(f"/admin/events/{event_id}/bookings?{urllib.parse.urlencode(query)}")
            found.extend(page["bookings"])
            cursor = page.get("next_cursor")
            if not cursor:
                return found


def admin_api(environment: Environment) -> Api:
    token = os.environ.get("BOXOFFICE_ADMIN_TOKEN", "")
    return Api(environment.host or "http://127.0.0.1:8000", token)


def is_controller(environment: Environment) -> bool:
    """The master, or the single process of a local run: not a worker."""
    return not isinstance(environment.runner, WorkerRunner)
