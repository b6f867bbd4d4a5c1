"""The `boxoffice` command: serve, worker, migrate, reconcile, archive, dead-letters.

A setting that cannot be used, or a server the command cannot do without, is one line on
stderr and exit status 2. A command is a Command (settings, args) -> exit status, registered
in _parser() with command(name, run, summary).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import resource
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from service.core import cpusched
from service.core.settings import SettingError, Settings

log = logging.getLogger("boxoffice.cli")

# What a subcommand runs: its exit status.
Command = Callable[[Settings, argparse.Namespace], int]

# File descriptors an API process keeps for itself (Redis and PostgreSQL pools, the metrics
# files, the interpreter's own): connections get what the open-file limit leaves.
RESERVED_FILES = 256
# A worker process that has not stopped this long after SIGTERM is killed: granian loses a
# SIGTERM that reaches a worker still starting up, and would wait for it forever.
WORKER_KILL_TIMEOUT_SECONDS = 10


def serve(settings: Settings, args: argparse.Namespace) -> int:
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings

    from service.server import Server
    from service.web.started import STARTED_DIR_ENV

    check_port_free(settings.host, settings.port)
    connections = connection_limit(settings.http_max_connections)
    # Each worker process writes its HTTP metrics to files here; /metrics sums them. Set
    # before any worker imports prometheus_client. And notes there that it has started.
    state = Path(tempfile.mkdtemp(prefix="boxoffice-serve-"))
    (state / "metrics").mkdir()
    (state / "started").mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(state / "metrics")
    os.environ[STARTED_DIR_ENV] = str(state / "started")
    share_pass_secret(settings)
    rsgi = settings.interface == "rsgi"
    # Before the workers start: they and their threads inherit it.
    if cpusched.ask(settings.cpu_slice_us, settings.cpu_policy):
        log.info(
            "API processes run %s in %s slices",
            settings.cpu_policy,
            f"{settings.cpu_slice_us} µs" if settings.cpu_slice_us else "the kernel's",
        )
    try:
        Server(
            # Each worker process builds its own app (factory) on its own connections.
            "service.web.rsgi:create_rsgi_from_env"
            if rsgi
            else "service.web.app:create_app_from_env",
            started_dir=state / "started",
            factory=True,
            address=settings.host,
            port=settings.port,
            workers=settings.workers,
            interface=Interfaces.RSGI if rsgi else Interfaces.ASGI,
            loop=Loops.uvloop,
            working_dir=Path.cwd(),
            log_access=False,
            # HTTP/1 only: the auto-detection of HTTP/2 waits for a connection's first bytes
            # with no time limit, so a client that connects and sends nothing would hold its
            # connection forever. The header timeout also closes idle keep-alive connections.
            http=HTTPModes.http1,
            http1_settings=HTTP1Settings(
                header_read_timeout=round(settings.http_idle_timeout_seconds * 1000)
            ),
            # Connections per process, idle ones included; beyond it new ones wait unaccepted.
            backpressure=connections,
            # A worker process that dies (killed, out of memory) is replaced; the others
            # serve meanwhile. Only one that keeps dying before it has started stops the
            # server (service/server.py).
            respawn_failed_workers=True,
            workers_kill_timeout=WORKER_KILL_TIMEOUT_SECONDS,
        ).serve()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return 0


def share_pass_secret(settings: Settings) -> None:
    """Every API process of this server must sign and check waiting-room passes with the
    same secret: without BOXOFFICE_PASS_SECRET, one is made here, before they start, and
    handed to them all through the environment."""
    if settings.pass_secret:
        return
    os.environ["BOXOFFICE_PASS_SECRET"] = secrets.token_urlsafe(32)
    log.warning(
        "BOXOFFICE_PASS_SECRET is not set: this server's processes share a secret of their"
        " own; passes they issue are refused after a restart and by any other server"
    )


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another server listens on. granian binds with SO_REUSEPORT, which lets a
    second server share the port and take half its requests; a socket without it cannot bind
    there while the first one listens. A socket that is not a listener (another process's
    outbound connection, or one in TIME_WAIT) may hold the port too: then the port is
    granian's if granian's own bind would succeed."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        raise SettingError("host", f"{host!r} is not an IP address, such as 127.0.0.1") from None
    try:
        # SO_REUSEADDR: connections of a server that just stopped (TIME_WAIT) do not count.
        _bind(family, host, port, reuse_port=False)
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            raise SettingError("host", f"{host} is not an address of this machine") from None
        if e.errno != errno.EADDRINUSE:
            raise SettingError("port", f"cannot listen on {host}:{port}: {e.strerror}") from None
        if _listened_on(family, host, port):
            raise SettingError("port", f"{host}:{port} is already in use") from None
        try:  # nothing listens: the holder is a connection; does it let granian in?
            _bind(family, host, port, reuse_port=True)
        except OSError:
            raise SettingError(
                "port",
                f"{host}:{port} is held by another process's connection (nothing listens"
                " there, but it does not let a server bind the port): choose another port"
                " or wait for it to close",
            ) from None


def _bind(family: socket.AddressFamily, host: str, port: int, *, reuse_port: bool) -> None:
    """Bind a socket as a server would (SO_REUSEADDR; SO_REUSEPORT as granian does), then let
    it go: raises what the bind raised."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind((host, port))


def _listened_on(family: socket.AddressFamily, host: str, port: int) -> bool:
    """Whether a server accepts connections on the port: a connection to it is answered
    (on a wildcard host, through loopback)."""
    address = ipaddress.ip_address(host)
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    target = str(address)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_SECONDS)
        try:
            probe.connect((target, port))
        except TimeoutError:  # a listener too busy to answer is still one
            return True
        except OSError:  # refused: nothing listens
            return False
    return True


# How long the port check waits for a listener to take its connection.
PROBE_SECONDS = 1.0


def connection_limit(wanted: int) -> int:
    """Connections are open files: raise this process's soft limit (its worker processes
    inherit it) toward the hard one, and keep to what fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + RESERVED_FILES
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft - RESERVED_FILES < wanted:
        limit = max(1, soft - RESERVED_FILES)
        log.warning(
            "BOXOFFICE_HTTP_MAX_CONNECTIONS lowered from %d to %d: the open-file limit is %d",
            wanted,
            limit,
            soft,
        )
        return limit
    return wanted


def migrate(settings: Settings, args: argparse.Namespace) -> int:
    # The summary below says what alembic's INFO lines would (some are logged on import).
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from service.durable.migrate import current_revision, ensure_database, head_revision, upgrade

    name = ensure_database(settings.database_url)
    before = current_revision(settings.database_url)
    upgrade(settings.database_url)
    after = current_revision(settings.database_url)
    latest = " (the latest)" if after == head_revision() else ""
    if before == after:
        print(f"database {name} is at revision {after}{latest}; nothing to do")
    else:
        print(f"database {name} migrated from {before or 'no revision'} to {after}{latest}")
    return 0


def worker(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from service.worker import run

    asyncio.run(run(settings))
    return 0


RECONCILE_EXIT = """\
exit status:
  0  Redis and PostgreSQL agree (after --repair: nothing is left to repair)
  1  drift found (after --repair: some remains)
  2  could not run: a setting cannot be used, Redis or PostgreSQL unreachable, no such event
"""


def reconcile(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    import msgspec

    from service.durable.findings import Report
    from service.durable.reconcile import reconcile, render
    from service.hotpath.context import Services

    def progress(done: int, total: int, event_id: str) -> None:
        if total > 1 and sys.stderr.isatty():
            width = 30
            bar = "#" * (width * done // total)
            sys.stderr.write(f"\r[{bar:<{width}}] {done}/{total} {event_id[:40]:<40}")
            sys.stderr.flush()

    async def run() -> Report:
        svc = Services.open(settings)
        try:
            await svc.start()
            return await reconcile(svc, args.event, args.repair, progress)
        finally:
            await svc.close()

    report = asyncio.run(run())
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


# Commands that use Redis: each checks at start-up that Redis has the URL's database.
USES_REDIS = frozenset({"serve", "worker", "reconcile", "dead-letters", "archive"})
# Redis's replies to SELECT of a database it does not have (a standalone server past its
# `databases`, any but 0 on a cluster node): every connection would fail alike.
_NO_SUCH_DATABASE = ("DB index is out of range", "SELECT is not allowed in cluster mode")


def refused_database(exc: BaseException) -> str | None:
    """Redis's refusal of the URL's database number, when that is what `exc` is."""
    import redis.exceptions

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, redis.exceptions.ResponseError) and any(
            reply in str(seen) for reply in _NO_SUCH_DATABASE
        ):
            return f"Redis refuses the URL's database number: {seen}"
        seen = seen.__cause__ or seen.__context__
    return None


def check_redis_database(settings: Settings) -> None:
    """Ask Redis once whether it has the URL's database, so that a wrong number is one
    line and exit 2, not a traceback in every request or a loop. A Redis that is away is
    left to the command: serving and the worker wait for it."""
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.exceptions.RedisError as e:
        problem = refused_database(e)
        if problem:
            raise SettingError("redis_url", problem) from None
    finally:
        client.close()


def unreachable(settings: Settings, exc: BaseException) -> str:
    """Which server an "unavailable" error is about, where it was looked for, and why."""
    from redis.connection import parse_url
    from sqlalchemy.engine import make_url

    from service.core.errors import server_of

    cause = getattr(exc, "orig", None) or exc
    reason = (str(cause) or type(cause).__name__).splitlines()[0]
    if server_of(exc) == "Redis":
        o = parse_url(settings.redis_url)  # type: ignore[no-untyped-call]
        where = o.get("path") or f"{o.get('host', '127.0.0.1')}:{o.get('port', 6379)}"
        return f"cannot reach Redis at {where} (BOXOFFICE_REDIS_URL): {reason}"
    url = make_url(settings.database_url)
    where = f"{url.host or 'localhost'}:{url.port or 5432}/{url.database}"
    return f"cannot reach PostgreSQL at {where} (BOXOFFICE_DATABASE_URL): {reason}"


ARCHIVE_EXIT = """\
exit status:
  0  every event named is out of Redis
  1  archiving has begun for some, which wait for live holds, the outbox or dead
     letters (the worker finishes them as soon as it may)
  2  could not run: a setting cannot be used, Redis or PostgreSQL unreachable, no such
     event, or the event is not over
"""


def archive(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    import msgspec

    from service.core import errors
    from service.core.schemas import ArchiveState
    from service.durable.archive import ask, ask_all_over
    from service.hotpath.context import Services

    async def run() -> list[ArchiveState]:
        svc = Services.open(settings)
        try:
            await svc.start()
            await svc.scripts.load()
            if args.all_over:
                return await ask_all_over(svc)
            return [await ask(svc, args.event)]
        finally:
            await svc.close()

    try:
        outcomes = asyncio.run(run())
    except (errors.EventNotFound, errors.EventNotOver) as e:
        print(f"boxoffice archive: {e.detail}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(outcomes)).decode() + "\n")
    for o in [] if args.json else outcomes:
        print(f"{o.event_id}: " + ("archived" if o.archived else f"waiting for {o.waiting_for}"))
    if not outcomes and not args.json:
        print("no event is over that is not archived already")
    return 0 if all(o.archived for o in outcomes) else 1


def dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from service.durable.deadletters import command

    return command(settings, args.action, args.event, getattr(args, "ids", []), args.json)


# Here, not beside the command: building the parser (every command, --help too) would
# otherwise import the dead letters' module, and with it redis-py's asyncio client,
# SQLAlchemy's and litestar: 0.5 s of CPU for a `boxoffice` that refuses a setting.
DEAD_LETTERS_EXIT = """exit status:
  0  listed, or every ID replayed or discarded
  1  some ID was not found (the others were replayed or discarded)
  2  could not run: Redis or PostgreSQL unreachable, no such event, no --event"""


def _dead_letters_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = DEAD_LETTERS_EXIT
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
            epilog=DEAD_LETTERS_EXIT,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # SUPPRESS: an --event given before the action is not reset by this one's default.
        action.add_argument("--event", default=argparse.SUPPRESS, help="the event (required)")
        action.add_argument("ids", nargs="+", metavar="ID", help="dead letter ids (from the list)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="boxoffice",
        description="Boxoffice: ticket reservations. Configured by BOXOFFICE_* environment "
        "variables (README, Configuration).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('boxoffice')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, run: Command, summary: str, epilog: str | None = None
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(run=run)
        return sub

    command(
        "serve",
        serve,
        "the HTTP API (BOXOFFICE_HOST, _PORT, _WORKERS, _HTTP_MAX_CONNECTIONS, "
        "_HTTP_IDLE_TIMEOUT_SECONDS)",
    )
    command("worker", worker, "write-behind to PostgreSQL, expiry listener and sweeper")
    command(
        "migrate",
        migrate,
        "create the database if missing, migrate it, and say at which revision it is",
    )
    check = command(
        "reconcile", reconcile, "compare Redis with PostgreSQL, and repair", epilog=RECONCILE_EXIT
    )
    check.add_argument("--event", help="only this event (default: every event)")
    check.add_argument("--repair", action="store_true", help="put Redis back in line")
    check.add_argument(
        "--json", action="store_true", help="the report as JSON (docs/reconciliation.md)"
    )
    out = command(
        "archive",
        archive,
        "take events that are over out of Redis now (PostgreSQL keeps everything)",
        epilog=ARCHIVE_EXIT,
    )
    which = out.add_mutually_exclusive_group(required=True)
    which.add_argument("--event", help="this event (it must be over: closed, or long past)")
    which.add_argument("--all-over", action="store_true", help="every event that is over")
    out.add_argument("--json", action="store_true", help="the outcomes as JSON")
    _dead_letters_arguments(
        command("dead-letters", dead_letters, "list, replay or discard dead letters")
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    sys.exit(run(args))


def run(args: argparse.Namespace) -> int:
    from service.core import errors

    name = f"boxoffice {args.command}"
    try:
        settings = Settings.from_env()
    except SettingError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    try:
        if args.command in USES_REDIS:
            check_redis_database(settings)
        status: int = args.run(settings, args)
    except SettingError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        problem = refused_database(e)  # Redis lost databases after start-up (a new config)
        if problem:
            print(f"{name}: {SettingError('redis_url', problem)}", file=sys.stderr)
            return 2
        if not errors.unavailable(e):
            raise
        print(f"{name}: {unreachable(settings, e)}", file=sys.stderr)
        return 2
    return status
