"""`boxoffice worker`: the write-behind, the expiry listener, the sweeper, the waiting
rooms' background step and the archiving of events that are over, together."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket

from service.core import errors
from service.core.settings import Settings
from service.durable.archive import Archiver
from service.durable.writebehind import WriteBehind
from service.hotpath.context import Services
from service.selling.expiry import Listener, Sweeper
from service.selling.waitingroom import Ticker

log = logging.getLogger("boxoffice.worker")


async def run(settings: Settings) -> None:
    svc = Services.open(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        while not stop.is_set():
            try:
                await svc.start()
                await svc.scripts.load()
                break
            except Exception as e:
                errors.log_failure(log, "waiting for Redis", e)
                await asyncio.sleep(1)
        log.info("worker %s started", consumer)
        # On SIGTERM each part finishes what it holds (the write-behind its batch in
        # flight, written and acknowledged) and returns.
        await asyncio.gather(
            WriteBehind(svc, consumer).run(stop),
            Listener(svc).run(stop),
            Sweeper(svc).run(stop),
            Ticker(svc).run(stop),
            Archiver(svc).run(stop),
        )
    finally:
        await svc.close()
        log.info("worker %s stopped", consumer)
