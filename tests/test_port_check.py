"""`boxoffice serve`'s port check: a port is taken when a server listens on it, not when
another process's connection merely holds it (outbound, or in TIME_WAIT)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from service.cli import check_port_free
from service.core.settings import SettingError, Settings
from tests.apiserver import BOXOFFICE
from tests.conftest import server_env

# Another process makes an outbound connection, closes it first (so that its side, the
# port it connected from, stays in TIME_WAIT) and says which port that was.
_TIME_WAIT = textwrap.dedent(
    """
    import socket, sys, time
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.socket()
    if sys.argv[1] == "reuseport":
        client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    client.bind(("127.0.0.1", 0))  # a port no other socket has (connect() may share one)
    client.connect(server.getsockname())
    port = client.getsockname()[1]
    accepted, _ = server.accept()
    client.close()
    time.sleep(0.1)
    accepted.close()
    print(port)
    """
)


def time_wait_port(options: str) -> int:
    """A port on which only another process's outbound connection, in TIME_WAIT, is left."""
    out = subprocess.run(
        [sys.executable, "-c", _TIME_WAIT, options], capture_output=True, text=True, check=True
    )
    port = int(out.stdout)
    states = tcp_states(port)
    assert "06" in states and "0A" not in states, states  # TIME_WAIT; nothing listens
    return port


def tcp_states(port: int) -> set[str]:
    """The states of the IPv4 TCP sockets whose local port is `port` (/proc/net/tcp)."""
    states = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            states.add(fields[3])
    return states


def test_a_port_held_by_a_time_wait_connection_that_lets_servers_in_is_free() -> None:
    """The connection was made with SO_REUSEPORT: granian's bind succeeds there, so the
    check must not refuse the port."""
    check_port_free("127.0.0.1", time_wait_port("reuseport"))


def test_serve_starts_on_such_a_port(settings: Settings) -> None:
    port = time_wait_port("reuseport")
    env = {
        **os.environ,
        **server_env(settings),
        "BOXOFFICE_HOST": "127.0.0.1",
        "BOXOFFICE_PORT": str(port),
        "BOXOFFICE_WORKERS": "1",
    }
    proc = subprocess.Popen(
        [BOXOFFICE, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if s.recv(100).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve did not answer /health"
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_connection_that_keeps_servers_out_is_named_as_such() -> None:
    """Without SO_REUSEADDR or SO_REUSEPORT on the connection, Linux lets no server bind
    its port until TIME_WAIT ends (granian's bind fails too): the check says why, rather
    than that a server listens there."""
    port = time_wait_port("plain")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            pass
        else:
            pytest.skip("this kernel lets a server bind a port in TIME_WAIT")
    with pytest.raises(SettingError, match="nothing listens there"):
        check_port_free("127.0.0.1", port)


def test_a_listening_port_is_still_taken() -> None:
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(SettingError, match="already in use"):
            check_port_free("127.0.0.1", port)
