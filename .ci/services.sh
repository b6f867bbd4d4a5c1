#!/usr/bin/env bash
# Make sure Redis and PostgreSQL answer at BOXOFFICE_REDIS_URL / BOXOFFICE_DATABASE_URL. A
# service on 127.0.0.1/localhost that does not answer is started locally under .data/; then the
# configured database and its "_test" twin are created if missing.
#   .ci/services.sh        check, start if needed, create databases
#   .ci/services.sh stop   stop whatever .data/ started
# Needs .venv (make venv): the checks use redis-py and asyncpg, so no redis-cli or psql.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
DATA=$ROOT/.data
PY=$ROOT/.venv/bin/python
TIMEOUT=${BOXOFFICE_SERVICES_TIMEOUT:-30}
export BOXOFFICE_REDIS_URL=${BOXOFFICE_REDIS_URL:-redis://127.0.0.1:6379/0}
export BOXOFFICE_DATABASE_URL=${BOXOFFICE_DATABASE_URL:-postgresql+asyncpg://127.0.0.1:5432/boxoffice}

die() { echo "services: $*" >&2; exit 1; }

# helper check: print the URLs' parts and whether each service answers now, as shell variables.
# helper ready SECONDS: wait (bounded) for both, then create the databases if missing.
# Stdlib URL parsing, redis-py and asyncpg only: importing SQLAlchemy would cost seconds.
helper() {
    "$PY" - "$@" <<'PY'
import asyncio, os, shlex, sys, time
from urllib.parse import unquote, urlsplit

import asyncpg
import redis

redis_url = os.environ["BOXOFFICE_REDIS_URL"]
r = urlsplit(redis_url)
u = urlsplit(os.environ["BOXOFFICE_DATABASE_URL"])
pg = {
    "host": u.hostname, "port": u.port or 5432,
    "user": unquote(u.username) if u.username else None,
    "password": unquote(u.password) if u.password else None,
}
db = unquote(u.path.lstrip("/"))

def redis_check():
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    finally:
        client.close()

async def pg_connect():
    # The "postgres" database, since the configured one may not exist yet.
    return await asyncpg.connect(**pg, database="postgres", timeout=2)

def pg_check():
    async def check():
        await (await pg_connect()).close()
    asyncio.run(check())

def answers(check):
    try:
        check()
        return 1
    except Exception:
        return 0

def wait(what, check, deadline):
    while True:
        try:
            return check()
        except Exception as exc:
            if time.monotonic() >= deadline:
                sys.exit(f"services: {what} does not answer: {type(exc).__name__}: {exc}")
        time.sleep(0.2)

async def create_databases():
    conn = await pg_connect()
    try:
        for name in (db, f"{db}_test"):
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                await conn.execute('CREATE DATABASE "{}"'.format(name.replace('"', '""')))
    finally:
        await conn.close()

if sys.argv[1] == "check":
    for name, value in [
        ("REDIS_HOST", r.hostname or ""), ("REDIS_PORT", r.port or 6379),
        ("PG_HOST", pg["host"] or ""), ("PG_PORT", pg["port"]),
        ("PG_USER", pg["user"] or ""), ("PG_DB", db),
        ("REDIS_UP", answers(redis_check)), ("PG_UP", answers(pg_check)),
    ]:
        print(f"{name}={shlex.quote(str(value))}")
else:
    deadline = time.monotonic() + float(sys.argv[2])
    wait(f"Redis at {r.hostname}:{r.port or 6379}", redis_check, deadline)
    wait(f"PostgreSQL at {pg['host']}:{pg['port']}", pg_check, deadline)
    if not db:
        sys.exit("services: no database name in BOXOFFICE_DATABASE_URL")
    asyncio.run(create_databases())
PY
}

is_local() { [[ $1 == 127.0.0.1 || $1 == localhost || $1 == ::1 ]]; }

# PostgreSQL refuses to run as root, so a root caller runs its tools as "postgres".
as_pg() {
    if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_bin() {
    local dir
    if dir=$(dirname "$(command -v pg_ctl)" 2>/dev/null) && [[ -x $dir/initdb ]]; then
        echo "$dir"
    elif dir=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1) && [[ -x $dir/initdb ]]
    then
        echo "$dir"
    else
        die "PostgreSQL server binaries (initdb, pg_ctl) not found"
    fi
}

tail_log() { if [[ -f $1 ]]; then tail -n 20 "$1" >&2; fi; }

start_redis() {
    command -v redis-server >/dev/null || die "redis-server not found"
    mkdir -p "$DATA/redis"
    # No persistence: a test and dev server only.
    redis-server --daemonize yes --port "$REDIS_PORT" --bind 127.0.0.1 -::1 \
        --dir "$DATA/redis" --pidfile "$DATA/redis/redis.pid" --logfile "$DATA/redis/redis.log" \
        --save "" --appendonly no >/dev/null ||
        { tail_log "$DATA/redis/redis.log"; die "redis-server did not start"; }
}

start_pg() {
    local bin pgdata=$DATA/pg run=$DATA/pg-run
    bin=$(pg_bin)
    mkdir -p "$pgdata" "$run"
    if [[ $(id -u) == 0 ]]; then
        chown postgres: "$pgdata" "$run"
        runuser -u postgres -- test -w "$pgdata" ||
            die "user postgres cannot reach $pgdata (a parent directory is closed to it)"
    fi
    chmod 700 "$pgdata"
    if [[ ! -f $pgdata/PG_VERSION ]]; then
        as_pg "$bin/initdb" -D "$pgdata" -U "${PG_USER:-$(id -un)}" -A trust -E UTF8 \
            --locale=C --no-instructions >"$run/initdb.log" 2>&1 ||
            { tail_log "$run/initdb.log"; die "initdb failed"; }
        # Throwaway cluster: durability only costs time here.
        cat >>"$pgdata/postgresql.conf" <<EOF
listen_addresses = 'localhost'
unix_socket_directories = '$run'
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    fi
    as_pg "$bin/pg_ctl" -D "$pgdata" -l "$run/postgres.log" -o "-p $PG_PORT" -w -t "$TIMEOUT" \
        start >/dev/null ||
        { tail_log "$run/postgres.log"; die "PostgreSQL did not start"; }
}

stop_all() {
    local pid
    if [[ -f $DATA/redis/redis.pid ]]; then
        pid=$(<"$DATA/redis/redis.pid")
        # A stale pidfile may name a pid that now belongs to something else.
        if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == redis-server* ]]; then
            kill "$pid"
            for _ in $(seq 100); do [[ -e /proc/$pid ]] || break; sleep 0.1; done
            echo "redis: stopped local redis-server (pid $pid)"
        fi
        rm -f "$DATA/redis/redis.pid"
    fi
    if [[ -f $DATA/pg/postmaster.pid ]] && as_pg "$(pg_bin)/pg_ctl" -D "$DATA/pg" status >/dev/null
    then
        as_pg "$(pg_bin)/pg_ctl" -D "$DATA/pg" -m fast -w stop >/dev/null
        echo "postgres: stopped local PostgreSQL ($DATA/pg)"
    fi
}

case ${1:-up} in
    up) ;;
    stop) stop_all; exit ;;
    *) die "usage: $0 [up|stop]" ;;
esac

[[ -x $PY ]] || die "$PY missing: run 'make venv' first"
vars=$(helper check) || die "cannot check the services"
eval "$vars"

redis_msg="up at $REDIS_HOST:$REDIS_PORT"
if [[ $REDIS_UP == 0 ]] && is_local "$REDIS_HOST"; then
    start_redis
    redis_msg="started local redis-server at $REDIS_HOST:$REDIS_PORT (.data/redis)"
fi
pg_msg="up at $PG_HOST:$PG_PORT"
if [[ $PG_UP == 0 ]] && is_local "$PG_HOST"; then
    start_pg
    pg_msg="started local PostgreSQL at $PG_HOST:$PG_PORT (.data/pg)"
fi
helper ready "$TIMEOUT"
echo "redis: $redis_msg"
echo "postgres: $pg_msg; databases $PG_DB, ${PG_DB}_test ready"
