"""A redis-server of a test's own, for tests that kill or restart Redis."""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self

import redis
from redis.crc import key_slot

from service.core.keys import event_keys

# The ports of the tests' own servers: below Linux's ephemeral range (32768-60999), where no
# outgoing connection takes one, and each claimed with a lock file before it is handed out.
# Bind-and-release alone is not race-safe across processes: two xdist workers (or sessions)
# could both find a port free before either's server binds it. A cluster node's bus port
# (port + 10000) lands in 22000-31999, where free_port hands out none.
PORTS = range(12000, 22000)
BUS_OFFSET = 10000
PORT_LOCKS = Path(tempfile.gettempdir()) / "boxoffice-test-ports"
# The locks this process holds, oldest first. Beyond this many the oldest is let go: its
# server has long since bound the port, and a bound port fails everyone's bind check.
HELD_LOCKS = 256
_held: dict[int, IO[bytes]] = {}


def _search_order() -> Iterator[int]:
    """PORTS round and round, from a start of each xdist worker's own (gw3: 3000 in), so
    that workers seldom even contend for a lock."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    start = (int(worker) * 1000 if worker.isdigit() else 0) % len(PORTS)
    return itertools.cycle([*PORTS[start:], *PORTS[:start]])


_search = _search_order()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _claim(ports: Sequence[int]) -> bool:
    """Lock every one of the ports, if nobody (this process included) has locked any and
    each is free to bind; held until the process ends or HELD_LOCKS newer ones push it out."""
    if any(port in _held for port in ports):
        return False
    PORT_LOCKS.mkdir(exist_ok=True)
    locks: list[IO[bytes]] = []
    for port in ports:
        locks.append(lock := (PORT_LOCKS / str(port)).open("ab"))
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            break
        if not _bindable(port):
            break
    else:
        _held.update(zip(ports, locks, strict=True))
        while len(_held) > HELD_LOCKS:
            _held.pop(next(iter(_held))).close()
        return True
    for unwanted in locks:
        unwanted.close()
    return False


def free_port() -> int:
    """A port on 127.0.0.1 free to bind, which no other test process will be handed."""
    for _ in PORTS:
        if _claim([port := next(_search)]):
            return port
    raise RuntimeError(f"no free port in {PORTS}")


class Started:
    """`with`: start() on entering (closing what a failed start left), close() on leaving."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RedisServer(Started):
    """redis-server on a free port in a temp dir; restart() keeps port and dir, so an AOF
    written before a kill() is replayed on the next start."""

    def __init__(
        self,
        *,
        appendonly: bool = False,
        appendfsync: Literal["always", "everysec", "no"] = "everysec",
        args: Sequence[str] = (),
        port: int | None = None,
        timeout: float = 10.0,
    ) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not on PATH")
        self.port = port if port is not None else free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="boxoffice-redis-"))
        self.timeout = timeout
        self._argv = [
            executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--logfile", "redis.log",
            "--save", "",
            "--appendonly", "yes" if appendonly else "no",
            "--appendfsync", appendfsync,
            *args,
        ]  # fmt: skip
        self._proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"redis-server already running on port {self.port}")
        self._proc = subprocess.Popen(
            self._argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        self._wait_ready(self._proc)

    def stop(self) -> None:
        """SIGTERM: Redis flushes the AOF and exits cleanly."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash; only what already reached the AOF survives."""
        self._signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the server holds its connections but answers nothing, as a hung one."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)
        self.paused = False

    @property
    def answering(self) -> bool:
        """Running and not paused: a node to ask about the cluster."""
        return self.running and not self.paused

    def restart(self, *, kill: bool = False) -> None:
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _signal(self, signum: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        self.paused = False
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signum)
        try:
            proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.timeout
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            while True:
                if proc.poll() is not None:
                    self._proc = None
                    raise RuntimeError(
                        f"redis-server exited with {proc.returncode}:\n{self._log_tail()}"
                    )
                try:
                    # The pid check keeps another server that holds the port from passing for
                    # ours; BusyLoadingError (still replaying the AOF) is a ConnectionError.
                    if client.info("server")["process_id"] == proc.pid:
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(
                        f"redis-server on port {self.port} did not answer PING "
                        f"within {self.timeout}s:\n{self._log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.dir / "redis.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def free_cluster_port() -> int:
    """A port as free_port's whose cluster bus port (port + 10000) is claimed too."""
    for _ in PORTS:
        if _claim([port := next(_search), port + BUS_OFFSET]):
            return port
    raise RuntimeError(f"no free port pair (port, port + {BUS_OFFSET}) in {PORTS}")


class LocalCluster(Started):
    """A Redis Cluster of its own: `primaries` primaries with `replicas` replicas each (one
    by default; none for the bench, where they would only take CPU), on free ports.

    A small cluster-node-timeout makes a failover take seconds: a primary killed with
    kill() is replaced by its replica once the others have marked it failed."""

    def __init__(self, primaries: int = 3, node_timeout_ms: int = 2000, replicas: int = 1) -> None:
        executable = shutil.which("redis-cli")
        if executable is None:
            raise RuntimeError("redis-cli is not on PATH")
        self._cli = executable
        self._replicas = replicas
        self._layout: dict[int, int] = {}
        self.nodes: list[RedisServer] = []
        for _ in range(primaries * (1 + replicas)):
            port = free_cluster_port()
            args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                # Replicas sync at once instead of waiting 5 s for others to share a transfer.
                "--repl-diskless-sync-delay", "0",
            ]  # fmt: skip
            self.nodes.append(RedisServer(args=args, port=port))

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        create = [self._cli, "--cluster", "create", *self.addresses]
        subprocess.run(
            [*create, "--cluster-replicas", str(self._replicas), "--cluster-yes"],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        self.wait_ok()
        # The layout as created, which reset() puts back: replica port -> its primary's.
        self._layout = {
            node.port: int(info["master_port"])
            for node in self.nodes
            if (info := self.call(node, "INFO", "replication"))["role"] == "slave"
        }

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def client(self, node: RedisServer) -> redis.Redis:
        return redis.Redis(port=node.port, socket_timeout=2, socket_connect_timeout=2)

    def call(self, node: RedisServer, *args: str | bytes | int) -> Any:
        with self.client(node) as client:
            return client.execute_command(*args)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every running node says cluster_state:ok, every slot is served by a running
        primary, every node agrees on it, and every replica has synced with its primary."""
        deadline = time.monotonic() + timeout
        while not self._settled():
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not settle in time")
            time.sleep(0.05)

    def _settled(self) -> bool:
        pictures = set()
        try:
            for node in self.nodes:
                if not node.running:
                    continue
                with self.client(node) as client:
                    if client.cluster("info")["cluster_state"] != "ok":
                        return False
                    info = client.info("replication")
                    if info["role"] == "slave" and info["master_link_status"] != "up":
                        return False
                    pictures.add(self._owners(client))
        except (redis.ConnectionError, redis.TimeoutError):
            return False
        if len(pictures) != 1:
            return False
        running = {node.port for node in self.nodes if node.running}
        return all(port in running for _, _, port in pictures.pop())

    @staticmethod
    def _owners(client: redis.Redis) -> tuple[tuple[int, int, int], ...]:
        raw = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
        return tuple(sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in raw))

    def primaries(self) -> list[RedisServer]:
        """The running primaries, ordered by their first slot."""
        node = next(n for n in self.nodes if n.answering)
        with self.client(node) as client:
            owners = self._owners(client)
        by_port = {n.port: n for n in self.nodes}
        ordered = [by_port[port] for _, _, port in owners]
        return list(dict.fromkeys(ordered))

    def owner(self, slot: int) -> RedisServer:
        """The primary that serves a slot, as the cluster sees it now."""
        node = next(n for n in self.nodes if n.answering)
        with self.client(node) as client:
            owners = self._owners(client)
        port = next(port for first, last, port in owners if first <= slot <= last)
        return next(n for n in self.nodes if n.port == port)

    def node_id(self, node: RedisServer) -> str:
        node_id: bytes | str = self.call(node, "CLUSTER", "MYID")
        return node_id.decode() if isinstance(node_id, bytes) else node_id

    def replica_of(self, primary: RedisServer) -> RedisServer:
        primary_id = self.node_id(primary)
        for node in self.nodes:
            if node is not primary and node.answering:
                info = self.call(node, "INFO", "replication")
                if info.get("role") == "slave" and info.get("master_port") == primary.port:
                    return node
        raise LookupError(f"no replica of {primary.port} ({primary_id})")

    def move_slot(
        self, slot: int, target: RedisServer, *, batch: int = 10, pause: float = 0.0
    ) -> int:
        """Move a slot and its keys to another primary as `redis-cli --cluster reshard`
        does (IMPORTING, MIGRATING, MIGRATE in batches, SETSLOT NODE everywhere); a pause
        between batches stretches the migration for tests of traffic during one. Returns
        the number of keys moved."""
        source = self.owner(slot)
        if source is target:
            return 0
        source_id, target_id = self.node_id(source), self.node_id(target)
        self.call(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        self.call(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        moved = 0
        while keys := self.call(source, "CLUSTER", "GETKEYSINSLOT", slot, batch):
            self.call(source, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            if pause:
                time.sleep(pause)
        for node in [target, source, *self.nodes]:
            if node.running and self.call(node, "ROLE")[0] == b"master":
                self.call(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        return moved

    def event_ids(self, per_primary: int, prefix: str = "ev") -> dict[int, list[str]]:
        """Event ids whose hash slot ({ev:<id>}) is on each primary, by primary port."""
        node = next(n for n in self.nodes if n.answering)
        with self.client(node) as client:
            owners = self._owners(client)
        found: dict[int, list[str]] = {port: [] for _, _, port in owners}
        while any(len(ids) < per_primary for ids in found.values()):
            event_id = f"{prefix}-{uuid.uuid4().hex[:12]}"
            slot = key_slot(event_keys(event_id).meta.encode())
            port = next(port for first, last, port in owners if first <= slot <= last)
            if len(found[port]) < per_primary:
                found[port].append(event_id)
        return found

    def kill(self, node: RedisServer) -> None:
        """SIGKILL: the node is gone at once; its replica takes over after the timeout."""
        node.kill()

    def heal(self) -> None:
        """Start the killed nodes again (they rejoin from nodes.conf, as replicas of the
        primaries that replaced them) and wait for the cluster to settle."""
        for node in self.nodes:
            if not node.running:
                node.start()
        self.wait_ok()

    def reset(self) -> None:
        """As if new, for the next module of a session's cluster: killed nodes back (heal),
        each in its first role (_restore_layout), no key, script or stat left, and the
        keyspace events a service switched on off."""
        self.heal()
        self._restore_layout()
        for node in self.nodes:
            self.call(node, "CONFIG", "SET", "notify-keyspace-events", "")
            self.call(node, "CONFIG", "RESETSTAT")
            self.call(node, "SCRIPT", "FLUSH")
        for node in self.primaries():
            self.call(node, "FLUSHALL")
            self.call(node, "WAIT", self._replicas, 5000)

    def _restore_layout(self, timeout: float = 60.0) -> None:
        """The primaries and replicas of start() again, after failovers swapped them: the
        tests were written against that layout (tests/test_waiting_room_cluster.py's lost
        primary failed, reproducibly, after the failovers of the modules before it). Tried
        again until it holds: a node may not yet see a new primary as one."""
        deadline = time.monotonic() + timeout
        while not self._in_layout():
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster's first layout did not come back in time")
            time.sleep(0.5)
        self.wait_ok()

    def _in_layout(self) -> bool:
        """Whether the layout of start() holds; if not, a step towards it (a manual failover
        of a first primary now a replica, or a replica sent back to its first primary)."""
        by_port = {node.port: node for node in self.nodes}
        demoted = [
            by_port[port]
            for port in dict.fromkeys(self._layout.values())
            if self.call(by_port[port], "ROLE")[0] != b"master"
        ]
        try:
            if demoted:
                for node in demoted:  # its current primary consents: nothing is lost
                    self.call(node, "CLUSTER", "FAILOVER")
                return False
            for replica, primary in self._layout.items():
                if self.call(by_port[replica], "INFO", "replication").get("master_port") != primary:
                    self.wait_ok()
                    self.call(
                        by_port[replica], "CLUSTER", "REPLICATE", self.node_id(by_port[primary])
                    )
                    return False
        except redis.ResponseError:  # a node does not yet see the new roles: next round
            return False
        return True


def wait_synced(primary: RedisServer, replica: RedisServer, timeout: float = 20.0) -> None:
    """Until the replica's link to its primary is up and the primary counts it."""
    deadline = time.monotonic() + timeout
    with redis.Redis(port=replica.port) as r, redis.Redis(port=primary.port) as p:
        while True:
            link = r.info("replication").get("master_link_status")
            if link == "up" and p.info("replication").get("connected_slaves") == 1:
                return
            if time.monotonic() > deadline:
                raise AssertionError("the replica did not sync in time")
            time.sleep(0.05)
