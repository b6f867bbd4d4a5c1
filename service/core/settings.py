"""Settings, built once from the environment and passed in explicitly."""

from __future__ import annotations

import os
from collections.abc import Mapping
from ipaddress import ip_network
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec
from redis.connection import parse_url
from sqlalchemy.engine import make_url

from service.core import cpusched, retries

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Count = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class SettingError(ValueError):
    """A setting that cannot be used; the message names its environment variable."""

    def __init__(self, name: str, problem: str) -> None:
        self.variable = f"BOXOFFICE_{name.upper()}"
        super().__init__(f"{self.variable}: {problem}")


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis Cluster: more start-up nodes (comma-separated host:port) for when the URL's is down.
    redis_seed_nodes: str = ""
    # How long a call on a cluster waits out a failover or a slot migration (retries.py).
    redis_cluster_retry_seconds: Seconds = retries.BUDGET_SECONDS
    # How long a Redis call waits for its reply: a hung single node costs a request this
    # once, then 503 (service/core/retries.py). Above any script's run time and WAIT's timeout.
    redis_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=60)] = retries.TIMEOUT_SECONDS
    # Replicas of an event's primary that must have a confirmation, refund or cancellation
    # before it is acknowledged (WAIT), and how long to wait for them: fewer in time is a
    # 503, and the retry with the same Idempotency-Key gets the booking. 0: no WAIT.
    confirm_wait_replicas: Annotated[int, msgspec.Meta(ge=0)] = 0
    confirm_wait_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=4000)] = 1000
    # A primary with fewer replicas than that (its failover promoted a replica that has
    # none yet): `refuse` answers 503 until one is back, `accept` acknowledges with the
    # replicas it has (service/hotpath/replicas.py).
    confirm_wait_shortfall: Literal["refuse", "accept"] = "refuse"
    database_url: str = "postgresql+asyncpg://127.0.0.1:5432/boxoffice"
    admin_token: str = ""
    # Customer tokens (service/web/customers.py): set, every customer call needs a JWT signed
    # HS256 with it; empty, the service trusts the body's `customer_id` (a trusted backend).
    customer_token_secret: str = ""
    host: str = "127.0.0.1"
    port: Port = 8000
    workers: Count = 1
    # Connections one API process keeps open at once (idle ones included), and how long a
    # connection may take to send a request head (new, or idle between keep-alive requests)
    # before it is closed: together they bound what idle or slow clients can hold.
    http_max_connections: Count = 4096
    http_idle_timeout_seconds: Annotated[float, msgspec.Meta(ge=0.001, le=60)] = 10.0
    # How long a request body may take to arrive, from the end of its head: a client that
    # trickles it is answered 408 and changes nothing.
    http_body_timeout_seconds: Annotated[float, msgspec.Meta(ge=0.001, le=600)] = 20.0
    # Holds reclaimed lazily by each hold script before it decides; bounded so that one
    # request never pays for a backlog of thousands.
    reclaim_batch: Count = 50
    idempotency_ttl_seconds: Count = 86400
    # Idempotency-Keys an event's hold, confirm, release and cancel remember at once (at
    # most twice this many within a TTL), so that no client can grow Redis without end.
    idempotency_max_keys_per_event: Count = 200_000
    # Of answers that changed nothing (refusals, no-ops), how many an event remembers per
    # TTL window; past it they are answered without being remembered, never refused.
    idempotency_max_refusals_per_event: Count = 100_000
    # How long a process remembers that an event id is unknown to PostgreSQL, so that
    # requests for unknown events do not each cost a query (0: not at all).
    unknown_event_cache_seconds: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    # How long ended holds stay readable (the contract promises at least 24 hours).
    hold_retention_seconds: Count = 86400
    max_body_bytes: Count = 64 * 1024
    # The hot routes (hold, confirm, release, reading a hold, join, poll) served by the
    # lean lane (service/web/lane.py) rather than through Litestar: the same answers, less CPU.
    # Off: every route through Litestar (to compare, or should the lane misbehave).
    lean_lane: bool = True
    # granian's interface to the app: RSGI (service/web/rsgi.py; the same answers, fewer
    # wake-ups of the event loop per request) or ASGI (to compare, or should RSGI misbehave).
    interface: Literal["rsgi", "asgi"] = "rsgi"
    # The time slice, in microseconds, the API processes ask the kernel for: a woken thread
    # waits at most about this long for a core (service/core/cpusched.py; Linux 6.12+).
    # 100 to 100000, or 0: the kernel's default.
    cpu_slice_us: Annotated[int, msgspec.Meta(ge=0, le=cpusched.LONGEST)] = cpusched.SHORTEST
    # The scheduling policy they ask for: "batch" (SCHED_BATCH: a thread woken does not
    # preempt the one that woke it, which holds the GIL, until the waker's slice ends or it
    # sleeps) or "normal" (the kernel's default, SCHED_OTHER). service/core/cpusched.py.
    cpu_policy: Literal["batch", "normal"] = "batch"
    # Hold attempts one customer_id may make per event per window (0: no limit), counted
    # inside the event's hold script (GCRA: a burst of this many, then one every
    # window/limit). A human makes a few a minute; a bot thousands.
    rate_limit_customer_holds: Annotated[int, msgspec.Meta(ge=0)] = 20
    rate_limit_customer_window_seconds: Count = 60
    # Requests per client address per window on the public routes (0: no per-address limit
    # at all, for a trusted backend in front that sends every buyer's request from one
    # address); of those, joins of a waiting room, and tickets asked for in holds (a hold of
    # n tickets counts n), each limited beside it in the same window (0: that one off).
    # Sized for an office behind one address: 30 buyers at a drop's peak (README, Rate
    # limits); a bot flood from one address gets its burst, then a trickle.
    rate_limit_address: Annotated[int, msgspec.Meta(ge=0)] = 600
    rate_limit_address_joins: Annotated[int, msgspec.Meta(ge=0)] = 30
    rate_limit_address_tickets: Annotated[int, msgspec.Meta(ge=0)] = 40
    rate_limit_address_window_seconds: Count = 60
    # Requests per client address per window on the admin routes (0: no limit, the default).
    rate_limit_admin: Annotated[int, msgspec.Meta(ge=0)] = 0
    rate_limit_admin_window_seconds: Count = 60
    # Proxies (addresses or networks, comma-separated) whose X-Forwarded-For is believed:
    # a request from one of them is counted against the last address it forwarded for.
    trusted_proxies: str = ""
    # The worker: how often the sweeper runs, and the write-behind's batches.
    sweep_interval_seconds: Seconds = 2.0
    outbox_batch: Count = 1000
    outbox_block_ms: Count = 500
    # A consumer silent this long is taken for dead: its pending entries are claimed.
    outbox_claim_idle_ms: Count = 30_000
    # Failures of one outbox entry before it moves to the dead-letter stream.
    outbox_max_attempts: Count = 3
    # An event is over once closed, or once it started this long ago (or was reopened
    # this long ago): then the worker takes its live state out of Redis, once drained
    # (service/durable/archive.py), looking for such events this often.
    archive_after_seconds: Count = 86400
    archive_interval_seconds: Seconds = 30.0

    # A worker that has not refreshed its liveness key this long is dead: another takes
    # over its pending entries at once, and forgets it.
    worker_liveness_ms: Count = 3000
    # PostgreSQL: connecting, one statement, and waiting for a pooled connection. A server
    # that hangs is then an error to retry (and a log line), not a silent stall.
    database_connect_timeout_seconds: Seconds = 5.0
    database_command_timeout_seconds: Seconds = 10.0
    database_pool_timeout_seconds: Seconds = 10.0
    # The waiting room's admission passes are signed with this (HMAC-SHA256): every API
    # process that may check a pass needs the same one. Empty: `boxoffice serve` makes one
    # for its processes (`make run` keeps one in .data/pass-secret).
    pass_secret: str = ""

    def __post_init__(self) -> None:
        if 0 < len(self.pass_secret) < 16:
            raise ValueError("at least 16 characters, or none")
        if 0 < self.cpu_slice_us < cpusched.SHORTEST:
            raise ValueError(f"{cpusched.SHORTEST} or more (the kernel's shortest), or 0")
        # Here rather than in from_env, so that every Settings, however built, holds URLs
        # the drivers accept. A ValueError raised here names no variable: from_env adds it.
        check_redis_url(self.redis_url)
        parse_seed_nodes(self.redis_seed_nodes)
        msgspec.structs.force_setattr(self, "database_url", asyncpg_url(self.database_url))
        check_token_secret(self.customer_token_secret)
        for part in self.trusted_proxies.split(","):
            if part.strip():
                try:
                    ip_network(part.strip(), strict=False)
                except ValueError:
                    raise ValueError(f"{part.strip()!r} is not an address or network") from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Raises SettingError for the first variable that cannot be used."""
        env = os.environ if env is None else env
        fields: dict[str, object] = {}
        for name in cls.__struct_fields__:
            raw = env.get(f"BOXOFFICE_{name.upper()}")
            if raw is None:
                continue
            # One field at a time (every other one keeps its default) so that the error
            # names its variable. str_values: "8000" becomes 8000, "eight" is refused.
            try:
                one = msgspec.convert({name: raw}, cls, strict=False)
            except msgspec.ValidationError as e:
                raise SettingError(name, _reason(e, raw, _choices(cls, name))) from None
            fields[name] = getattr(one, name)
        return cls(**fields)  # type: ignore[arg-type]


def _choices(cls: type[Settings], name: str) -> tuple[object, ...]:
    """The values a setting of a few named ones takes; () for any other."""
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    field = next(f for f in info.fields if f.name == name)
    return field.type.values if isinstance(field.type, msgspec.inspect.LiteralType) else ()


def _reason(error: msgspec.ValidationError, raw: str, choices: tuple[object, ...] = ()) -> str:
    text = str(error).split(" - at `$", 1)[0]
    if choices:
        return f"{raw!r} is not one of {', '.join(map(str, choices))}"
    if not text.startswith("Expected"):
        return text  # from __post_init__, which does not repeat the value: it may hold a password
    for type_, words in (("`int`", "a whole number"), ("`float`", "a number")):
        text = text.replace(f"Expected {type_}, got `str`", f"is not {words}")
        text = text.replace(f"Expected {type_}", f"must be {words}")
    return f"{raw!r} {text}"


# RFC 7518 3.2: an HS256 key has at least as many bits as the hash (256), or it can be
# guessed offline from any one token.
MIN_SECRET_CHARS = 32


def check_token_secret(secret: str) -> None:
    # The message never repeats the value: it is a secret.
    if secret and len(secret.encode()) < MIN_SECRET_CHARS:
        raise ValueError(
            f"too short: at least {MIN_SECRET_CHARS} bytes (HS256 wants 256 bits),"
            " e.g. from `openssl rand -hex 32`"
        )


def check_redis_url(url: str) -> None:
    hint = "expected redis://[:password@]host:port/db, rediss://… or unix://path"
    try:
        options = parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError:
        raise ValueError(f"not a Redis URL ({hint})") from None
    db = urlsplit(url).path.strip("/")
    if "path" not in options and (not options.get("host") or (db and not db.isdigit())):
        raise ValueError(f"no host or a database that is not a number ({hint})")


def asyncpg_url(url: str) -> str:
    """The URL with the driver this service uses: postgresql:// and postgres:// mean the same
    database as postgresql+asyncpg://."""
    hint = "expected postgresql://user:password@host:port/name"
    try:
        parsed = make_url(url)
    except Exception:
        raise ValueError(f"not a database URL ({hint})") from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend not in ("postgresql", "postgres") or driver not in ("", "asyncpg"):
        raise ValueError(f"unsupported database driver {parsed.drivername!r} ({hint})")
    if not parsed.database:
        raise ValueError(f"no database name ({hint})")
    query = dict(parsed.query)
    if "sslmode" in query:  # libpq's name; asyncpg takes the same modes as `ssl`
        mode = query.pop("sslmode")
        if query.setdefault("ssl", mode) != mode:
            raise ValueError("sslmode and ssl disagree")
    unknown = sorted(set(query) - {"ssl"})
    if unknown:
        raise ValueError(f"unsupported query parameter {unknown[0]!r} (only sslmode is supported)")
    if "ssl" in query and query["ssl"] not in SSL_MODES:
        raise ValueError(f"sslmode must be one of {', '.join(SSL_MODES)}")
    if parsed.drivername == "postgresql+asyncpg" and query == parsed.query:
        return url
    return parsed.set(drivername="postgresql+asyncpg", query=query).render_as_string(
        hide_password=False
    )


# libpq's sslmode values, which asyncpg's `ssl` argument takes as they are.
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


Address = tuple[str, int]


def parse_address(text: str, default_host: str = "127.0.0.1") -> Address:
    """`host:port` (the host may be an IPv6 address, or empty for the node's own)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not a host:port: {text!r}")
    return host.strip("[]") or default_host, int(port)


def parse_seed_nodes(text: str) -> list[Address]:
    """BOXOFFICE_REDIS_SEED_NODES: comma-separated host:port, empty for none."""
    return [parse_address(part) for part in text.split(",") if part.strip()]
