#!/usr/bin/env bash
# A local Redis Cluster: 3 primaries with CLUSTER_REPLICAS replicas each (default 2: the
# topology that heals a failover by itself, see README "Scaling out"), on ports
# CLUSTER_PORT.. (default 7000..7008; bus ports +10000), data and logs under
# .data/cluster/<port>/. cluster-node-timeout 2000 ms: a killed primary is replaced by one of
# its replicas within seconds (production uses more: the default is 15000), and its other
# replica follows the promoted one.
#   .ci/cluster.sh        start (or restart what was stopped) and wait until it serves
#   .ci/cluster.sh stop   stop every node started here (their data stays: start again)
# Then: BOXOFFICE_REDIS_URL=redis://127.0.0.1:7000/0 (any node does).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA=$PWD/.data/cluster
FIRST=${CLUSTER_PORT:-7000}
REPLICAS=${CLUSTER_REPLICAS:-2}
LAST=$((FIRST + 3 * (1 + REPLICAS) - 1))
PORTS=$(seq "$FIRST" "$LAST")

die() { echo "cluster: $*" >&2; exit 1; }

running() { # port -> pid of our redis-server on it, if it runs
    local pidfile=$DATA/$1/redis.pid pid
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    # A stale pidfile may name a pid that now belongs to something else.
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == redis-server* ]] && echo "$pid"
}

stop() {
    local port pid
    for port in $PORTS; do
        if pid=$(running "$port"); then
            kill "$pid"
            for _ in $(seq 100); do [[ -e /proc/$pid ]] || break; sleep 0.1; done
            echo "cluster: stopped node $port (pid $pid)"
        fi
        rm -f "$DATA/$port/redis.pid"
    done
}

state() { redis-cli -p "$1" cluster info 2>/dev/null | tr -d '\r' | sed -n 's/^cluster_state://p'; }

start() {
    command -v redis-server >/dev/null || die "redis-server not found"
    command -v redis-cli >/dev/null || die "redis-cli not found"
    local port fresh=0
    for port in $PORTS; do
        running "$port" >/dev/null && continue
        mkdir -p "$DATA/$port"
        [[ -f $DATA/$port/nodes.conf ]] || fresh=1
        redis-server --daemonize yes --port "$port" --bind 127.0.0.1 --dir "$DATA/$port" \
            --pidfile "$DATA/$port/redis.pid" --logfile "$DATA/$port/redis.log" \
            --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
            --appendonly yes --save "" --repl-diskless-sync-delay 0 \
            --cluster-migration-barrier 1 --cluster-allow-replica-migration yes >/dev/null ||
            die "node $port did not start (see $DATA/$port/redis.log)"
    done
    for port in $PORTS; do
        for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    done
    if [[ $fresh == 1 ]]; then
        # shellcheck disable=SC2046
        redis-cli --cluster create $(printf '127.0.0.1:%s ' $PORTS) --cluster-replicas "$REPLICAS" \
            --cluster-yes >"$DATA/create.log" || die "cluster create failed (see $DATA/create.log)"
    fi
    for _ in $(seq 300); do
        local ok=1
        for port in $PORTS; do [[ $(state "$port") == ok ]] || ok=0; done
        # Until every replica has found its primary (right after create they say master).
        [[ $(redis-cli -p "$FIRST" cluster nodes | grep -c slave) == $((3 * REPLICAS)) ]] || ok=0
        if [[ $ok == 1 ]]; then
            echo "cluster: serving on 127.0.0.1:$FIRST..$LAST (.data/cluster)"
            redis-cli -p "$FIRST" cluster nodes | awk '{print "  " $2, $3}' | sed 's/@[0-9]*//'
            echo "  BOXOFFICE_REDIS_URL=redis://127.0.0.1:$FIRST/0"
            return
        fi
        sleep 0.1
    done
    die "the cluster did not reach cluster_state:ok in 30 s"
}

case ${1:-up} in
    up) start ;;
    stop) stop ;;
    *) die "usage: $0 [up|stop]" ;;
esac
