"""The hot routes leave nothing for the garbage collector: each of their requests is freed
by reference counting alone. A reference cycle per request (a refusal's error held by a
frame of its own traceback, 15 objects each) cost a sold-out refusal 31 µs of collection
at the API processes' young-generation threshold (service/web/app.py), more than the
refusal's own work; a profile shows such work wherever an allocation sets the collector
off, never where the cycle is made. The requests go in-process, on ASGI and on RSGI, as
`python -m loadtest.bench_app --cycles` sends them."""

from __future__ import annotations

import gc

import msgspec

from loadtest import bench_app
from service.core.settings import Settings
from service.web.app import App, create_app
from service.web.rsgi import RSGIApp

REQUESTS = 100


async def _refused_by_script(app: App) -> bench_app.Call:
    """A hold the event's script refuses (a seat it does not have): the sold-out shortcut
    knows nothing of seats."""
    event_id = await bench_app._event(app, 10)
    body = b'{"customer_id":"c","seats":["NO-1"]}'

    async def once() -> None:
        status, answer = await bench_app.request(app, "POST", f"/events/{event_id}/holds", body)
        assert status == 400, answer

    return once


async def test_hot_routes_leave_no_reference_cycles(settings: Settings) -> None:
    own = msgspec.structs.replace(settings, admin_token=bench_app.ADMIN_TOKEN)
    app = create_app(own)
    assert isinstance(app, App)
    async with bench_app.running(app):
        calls = {
            **await bench_app.targets(app),
            **await bench_app.targets(app, ":rsgi", RSGIApp(app, own)),
            "refused_by_script": await _refused_by_script(app),
        }
        left = {}
        for name, once in calls.items():
            for _ in range(20):  # caches, connections, first-time imports
                await once()
            gc.collect()
            gc.disable()
            try:
                for _ in range(REQUESTS):
                    await once()
                left[name] = gc.collect()
            finally:
                gc.enable()
    assert left == dict.fromkeys(calls, 0)
