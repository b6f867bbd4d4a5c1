"""One Redis node against a Redis Cluster in `make bench`: the spread, cluster and
cluster_one rows, each service on a Redis of the run's own, measured in alternation."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import redis

from loadtest.bench_rows import CLUSTER_PRIMARIES, CLUSTER_TARGETS, SPREAD_EVENTS, Result, Stat
from loadtest.bench_session import Bench
from loadtest.bench_tools import Server, own_redis, say


def spread_once(
    bench: Bench,
    name: str,
    server: Server,
    event_ids: list[str],
    r: Any,
    nodes: Sequence[redis.Redis],
) -> Callable[[bool], Result]:
    """One measure() of holds over several events in turn (loadtest/wrk/holds_spread.lua)."""
    stat = Stat(r, tuple(event_ids), "created")
    return lambda first: bench.measure(
        name, server, "holds_spread.lua", "/", args=event_ids, warmup=first, stat=stat,
        nodes=nodes,
    )  # fmt: skip


def compared(bench: Bench) -> None:
    """The spread and cluster rows, in alternation. Each service has a Redis of the
    run's own: on the shared one, other clients' commands would slow one side only."""
    server_bin = shutil.which("redis-server")
    if server_bin is None:
        say("spread and cluster rows skipped: redis-server not found (Debian: redis-server)")
        return
    with ExitStack() as stack:
        rows: dict[str, Callable[[bool], Result]] = {}
        if bench.wanted("spread"):
            port, r = stack.enter_context(own_redis(server_bin, bench.logs))
            say(f"service on a Redis node of its own (port {port}, no persistence)")
            ids = [f"bench-spread-{i}-{secrets.token_hex(4)}" for i in range(SPREAD_EVENTS)]
            url = f"redis://127.0.0.1:{port}/0"
            server = stack.enter_context(bench.serving("single", url, ids))
            rows["spread"] = spread_once(bench, "spread", server, ids, r, [r])
        if bench.wanted(*CLUSTER_TARGETS):
            rows.update(stack.enter_context(on_cluster(bench)))
        bench.paired(rows)


@contextmanager
def on_cluster(bench: Bench) -> Iterator[dict[str, Callable[[bool], Result]]]:
    """A Redis Cluster and `boxoffice serve` on it, with the spread row's number of hot
    events over its primaries (and as many on one primary); yields one measure() of
    each wanted cluster row; all stopped at the end."""
    from tests.servers import LocalCluster

    with LocalCluster(CLUSTER_PRIMARIES, replicas=0) as cluster:
        say(
            f"service on a Redis Cluster ({CLUSTER_PRIMARIES} primaries on ports"
            f" {', '.join(str(n.port) for n in cluster.nodes)}, no replicas;"
            f" BOXOFFICE_REDIS_URL {cluster.url})"
        )
        nodes = [redis.Redis(port=n.port) for n in cluster.nodes]
        routed = redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
        by_primary = cluster.event_ids(SPREAD_EVENTS // CLUSTER_PRIMARIES, "bench-cluster")
        # Interleaved, so that consecutive requests go to different primaries.
        spread = [e for group in zip(*by_primary.values(), strict=True) for e in group]
        one_primary = next(iter(cluster.event_ids(SPREAD_EVENTS, "bench-one").values()))
        wanted = {
            name: ids
            for name, ids in (("cluster", spread), ("cluster_one", one_primary))
            if bench.wanted(name)
        }
        try:
            events = [e for ids in wanted.values() for e in ids]
            with bench.serving("cluster", cluster.url, events) as server:
                yield {
                    name: spread_once(bench, name, server, ids, routed, nodes)
                    for name, ids in wanted.items()
                }
        finally:
            routed.close()
            for node in nodes:
                node.close()
