"""The `boxoffice` command: serve, worker, migrate, reconcile, dead-letters."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from service.settings import Settings


def serve(settings: Settings) -> None:
    from granian import Granian
    from granian.constants import Interfaces, Loops

    # Each worker process writes its HTTP metrics to files here; /metrics sums them. Set
    # before any worker imports prometheus_client.
    metrics_dir = tempfile.mkdtemp(prefix="boxoffice-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        Granian(
            "service.api:create_app_from_env",
            factory=True,
            address=settings.host,
            port=settings.port,
            workers=settings.workers,
            interface=Interfaces.ASGI,
            loop=Loops.uvloop,
            working_dir=Path.cwd(),
            log_access=False,
        ).serve()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def migrate(settings: Settings) -> None:
    from service.migrate import ensure_database, upgrade

    ensure_database(settings.database_url)
    upgrade(settings.database_url)


def worker(settings: Settings) -> None:
    import asyncio

    from service.worker import run

    asyncio.run(run(settings))


def reconcile(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when consistent, 1 when drift was found (or remains after --repair), 2 when
    it could not run."""
    import asyncio

    import msgspec

    from service import errors
    from service.context import Services
    from service.reconcile import Report, reconcile, render

    def progress(done: int, total: int, event_id: str) -> None:
        if total > 1 and sys.stderr.isatty():
            width = 30
            bar = "#" * (width * done // total)
            sys.stderr.write(f"\r[{bar:<{width}}] {done}/{total} {event_id[:40]:<40}")
            sys.stderr.flush()

    async def run() -> Report:
        svc = Services.open(settings)
        try:
            return await reconcile(svc, args.event, args.repair, progress)
        finally:
            await svc.close()

    try:
        report = asyncio.run(run())
    except Exception as e:
        if not errors.unavailable(e):
            raise
        print(
            f"boxoffice reconcile: cannot run, Redis or PostgreSQL unreachable: {e}",
            file=sys.stderr,
        )
        return 2
    if sys.stderr.isatty() and len(report.events) > 1:
        sys.stderr.write("\r" + " " * 80 + "\r")
    if args.event is not None and not report.events:
        print(f"boxoffice reconcile: no event {args.event!r}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(report)).decode() + "\n")
    else:
        sys.stdout.write(render(report))
    return 0 if report.consistent else 1


def dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from service.deadletters import command

    return command(settings, args.action, args.event, getattr(args, "ids", []), args.json)


def _dead_letters_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from service.deadletters import USAGE

    parser = commands.add_parser(
        "dead-letters",
        help="list, replay or discard dead letters",
        description="Without an action: list the dead letters.",
        epilog=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--event", help="only this event (default: every live event)")
    parser.add_argument("--json", action="store_true", help="the list as JSON")
    actions = parser.add_subparsers(dest="action", metavar="{replay,discard}")
    for name, what in (
        ("replay", "put dead letters back in the outbox (once their cause is fixed)"),
        ("discard", "drop dead letters for good (reconcile then reports their bookings)"),
    ):
        action = actions.add_parser(
            name,
            help=what,
            description=what,
            epilog=USAGE,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # SUPPRESS: an --event given before the action is not reset by this one's default.
        action.add_argument("--event", default=argparse.SUPPRESS, help="the event (required)")
        action.add_argument("ids", nargs="+", metavar="ID", help="dead letter ids (from the list)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="boxoffice", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="the HTTP API (BOXOFFICE_HOST, _PORT, _WORKERS)")
    commands.add_parser("worker", help="write-behind, expiry listener and sweeper")
    commands.add_parser("migrate", help="create the database if missing and migrate it")
    check = commands.add_parser("reconcile", help="compare Redis with PostgreSQL, and repair")
    check.add_argument("--event", help="only this event (default: every event)")
    check.add_argument("--repair", action="store_true", help="put Redis back in line")
    check.add_argument("--json", action="store_true", help="the report as JSON (README)")
    _dead_letters_parser(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings.from_env()
    if args.command == "reconcile":
        sys.exit(reconcile(settings, args))
    if args.command == "dead-letters":
        sys.exit(dead_letters(settings, args))
    {"serve": serve, "worker": worker, "migrate": migrate}[args.command](settings)
