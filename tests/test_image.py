"""The container image (Dockerfile) and the compose file (compose.yaml).

The image is built here and its API and worker containers run on the host's network against
the test's own Redis and PostgreSQL: a hold, its confirmation, the booking read from
PostgreSQL. Marked `image`: `pytest -m image` runs these alone, `-m "not image"` leaves them
out. Without a Docker engine (`docker info` fails) the image test skips and says why, in a
second or two. Where the Dockerfile's base image cannot be pulled (a machine that reaches
only Debian's and PyPI's package servers), an equivalent one is built from Debian's packages
with debootstrap and tagged with the base's name, and the test says so.

Where no engine answers but Debian's docker.io is installed and we are root (`make test`
installs docker.io and debootstrap when it can), the test starts a dockerd of its own for the
session and stops it afterwards (tests/dockerd.py); otherwise, or when that dockerd fails to
start, it skips with dockerd's or `docker info`'s reason.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from service.core.db import bookings
from service.core.settings import Settings
from service.hotpath.context import Services
from tests.conftest import ADMIN, create_event, eventually, server_env
from tests.dockerd import Dockerd
from tests.servers import free_port

pytestmark = [pytest.mark.image, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "boxoffice:test"
# The equivalent of python:3.11-slim-<suite>: Debian's python3 (3.11 on bookworm) with venv.
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# CA certificates this machine adds to Debian's: an equivalent base trusts what it trusts
# (a proxy between the build and PyPI, say).
LOCAL_CAS = Path("/usr/local/share/ca-certificates")
# What the official image sets and a bare root file system lacks; SSL_CERT_FILE: uv trusts
# the system's certificates, local ones included, and not only its own.
CHANGES = (
    "ENV LANG=C.UTF-8",
    "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
    'CMD ["python3"]',
)


def say(config: pytest.Config, line: str) -> None:
    """A line in pytest's own output, captured or not: what was built, and how."""
    reporter: Any = config.pluginmanager.get_plugin("terminalreporter")
    capture: Any = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"test_image: {line}")


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])}…: {done.stderr[-3000:]}")
    return done


def engine_version() -> str:
    """The engine's version, or a skip that says why there is none."""
    try:
        done = docker("info", "--format", "{{.ServerVersion}}", timeout=20, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("the Docker engine did not answer `docker info` within 20 s")
    if done.returncode != 0 or not done.stdout.strip():
        reason = (done.stderr.strip().splitlines() or ["no answer"])[-1]
        pytest.skip(f"no Docker engine runs here (`docker info`: {reason})")
    return done.stdout.strip()


@pytest.fixture(scope="session")
def engine(pytestconfig: pytest.Config) -> Iterator[str]:
    """The Docker engine's version: the one that answers, or else one of the test's own."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client on PATH (Debian: apt-get install docker.io)")
    try:
        version = engine_version()
    except pytest.skip.Exception as no_engine:
        if shutil.which("dockerd") is None or os.geteuid() != 0:
            how = "that needs root" if os.geteuid() else "dockerd is not installed (docker.io)"
            pytest.skip(f"{no_engine.msg}, and the test cannot start one: {how}")
    else:
        yield version
        return
    own = Dockerd()
    try:
        own.start()
    except RuntimeError as failed:
        own.close()
        pytest.skip(f"no Docker engine runs here, and one of the test's own failed: {failed}")
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("DOCKER_HOST", own.host)
            version = engine_version()
            say(pytestconfig, f"started dockerd {version} of its own (data-root {own.data_root})")
            yield version
    finally:
        own.close()


def base_image() -> str:
    """The base the Dockerfile builds on: its ARG PYTHON_IMAGE's default."""
    found = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert found, "Dockerfile: no ARG PYTHON_IMAGE=<image>"
    return found.group(1)


def ensure_base(config: pytest.Config, name: str) -> None:
    """The base image, pulled, or else built from Debian's packages under its name."""
    if docker("image", "inspect", name, check=False).returncode == 0:
        return
    try:
        pulled = docker("pull", name, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        pulled = subprocess.CompletedProcess([], 1, "", "timed out after 300 s")
    if pulled.returncode == 0:
        return
    why = (pulled.stderr.strip().splitlines() or ["no reason given"])[-1]
    suite = name.rsplit("-", 1)[-1]
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None or os.geteuid() != 0:
        pytest.skip(
            f"{name} cannot be pulled ({why}) and no equivalent can be built here: that needs"
            " root and debootstrap (apt-get install debootstrap)"
        )
    say(config, f"{name} cannot be pulled ({why})")
    say(config, f"building an equivalent from Debian's packages: debootstrap {suite} + python3")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="boxoffice-base-") as tmp:
        root = Path(tmp) / "root"
        packages = f"--include={BASE_PACKAGES}"
        subprocess.run(
            [debootstrap, "--variant=minbase", packages, suite, str(root), DEBIAN_MIRROR],
            capture_output=True,
            timeout=900,
            check=True,
        )
        trust_local_cas(root)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (root / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        changes = [arg for change in CHANGES for arg in ("--change", change)]
        imported = subprocess.run(
            ["docker", "import", *changes, "-", name],
            stdin=tar.stdout,
            capture_output=True,
            timeout=300,
            check=False,
        )
        assert tar.wait() == 0 and imported.returncode == 0, imported.stderr
    say(config, f"tagged it {name} in {time.monotonic() - started:.0f} s")


def trust_local_cas(root: Path) -> None:
    cas = sorted(LOCAL_CAS.glob("*.crt")) if LOCAL_CAS.is_dir() else []
    if not cas:
        return
    target = root / LOCAL_CAS.relative_to("/")
    target.mkdir(parents=True, exist_ok=True)
    for ca in cas:
        shutil.copy(ca, target / ca.name)
    subprocess.run(["chroot", str(root), "update-ca-certificates"], capture_output=True, check=True)


@pytest.fixture(scope="session")
def image(engine: str, pytestconfig: pytest.Config) -> str:
    ensure_base(pytestconfig, base_image())
    started = time.monotonic()
    # The host's network: the build's RUN steps reach PyPI as this machine does.
    built = docker("build", "--network", "host", "-t", IMAGE, str(ROOT), timeout=1200, check=False)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    size = int(docker("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    say(
        pytestconfig,
        f"built {IMAGE} (Docker {engine}) in {time.monotonic() - started:.0f} s:"
        f" {size / 1e6:.0f} MB",
    )
    return IMAGE


def container_env(settings: Settings, port: int) -> list[str]:
    """The test servers' settings for a container: its user is no PostgreSQL role, so the
    database URL names this process's user, as the tests' own connections use it."""
    url = make_url(settings.database_url)
    database_url = url.set(username=url.username or getpass.getuser())
    env = {
        **server_env(settings),
        "BOXOFFICE_DATABASE_URL": database_url.render_as_string(hide_password=False),
        "BOXOFFICE_HOST": "127.0.0.1",
        "BOXOFFICE_PORT": str(port),
        "BOXOFFICE_SWEEP_INTERVAL_SECONDS": "0.5",
    }
    return [arg for name, value in env.items() for arg in ("-e", f"{name}={value}")]


@pytest.fixture
def containers() -> Iterator[list[str]]:
    """Names of the containers a test starts: removed afterwards, their logs shown first."""
    names: list[str] = []
    yield names
    for name in names:
        logs = docker("logs", "--tail", "40", name, check=False)
        print(f"--- {name}\n{logs.stdout}{logs.stderr}")
        docker("rm", "--force", name, check=False)


def health(name: str) -> str:
    return docker("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()


async def test_image_serves_and_its_worker_writes_bookings_to_postgresql(
    image: str, settings: Settings, svc: Services, containers: list[str]
) -> None:
    assert docker("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip() != "0"
    port = free_port()
    env = container_env(settings, port)
    run = ["run", "--network", "host", *env]
    migrated = docker(*run, "--rm", "--no-healthcheck", image, "migrate", timeout=120)
    assert "(the latest)" in migrated.stdout, migrated.stdout + migrated.stderr

    suffix = uuid.uuid4().hex[:8]
    containers += [f"boxoffice-test-api-{suffix}", f"boxoffice-test-worker-{suffix}"]
    docker(*run, "--detach", "--name", containers[0], image)  # serve: the image's default
    docker(*run, "--detach", "--name", containers[1], "--no-healthcheck", image, "worker")

    # The image's own HEALTHCHECK (GET /ready) says when the API is up.
    deadline = time.monotonic() + 90
    while (status := health(containers[0])) != "healthy":
        assert status in ("starting", ""), f"the API container is {status}"
        assert time.monotonic() < deadline, "the API container was not healthy within 90 s"
        await asyncio.sleep(1)

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        event_id = await create_event(client)
        r = await client.post(
            f"/events/{event_id}/holds",
            json={"customer_id": "c-image", "items": [{"category": "GA", "quantity": 2}]},
        )
        assert r.status_code == 201, r.text
        r = await client.post(f"/events/{event_id}/holds/{r.json()['hold_id']}/confirm")
        assert r.status_code == 200, r.text
        booking_id = r.json()["booking_id"]

        async def in_postgresql() -> bool:
            async with svc.engine.connect() as conn:
                row = await conn.execute(
                    sa.select(bookings.c.status, bookings.c.customer_id).where(
                        bookings.c.booking_id == uuid.UUID(booking_id)
                    )
                )
                return row.first() == ("confirmed", "c-image")

        await eventually(in_postgresql, within=30)
        r = await client.get(f"/admin/events/{event_id}/bookings", headers=ADMIN)
        assert [b["booking_id"] for b in r.json()["bookings"]] == [booking_id], r.text

    # reconcile from the image too: Redis and PostgreSQL agree (exit 0).
    done = docker(*run, "--rm", "--no-healthcheck", image, "reconcile", "--event", event_id)
    assert done.returncode == 0


def test_compose_file_is_valid() -> None:
    """compose.yaml as the compose client reads it where there is one (needs no engine),
    and its shape in any case: what starts, in which order, with what."""
    compose = ROOT / "compose.yaml"
    env = {**os.environ, "BOXOFFICE_ADMIN_TOKEN": "t", "BOXOFFICE_PASS_SECRET": "s" * 32}
    for client in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(client[0]) is None:
            continue
        if subprocess.run([*client, "version"], capture_output=True, check=False).returncode:
            continue
        for profile in ([], ["--profile", "cluster"]):
            checked = subprocess.run(
                [*client, "-f", str(compose), *profile, "config", "-q"],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            assert checked.returncode == 0, checked.stderr
        break
    yaml = pytest.importorskip("yaml")
    spec = yaml.safe_load(compose.read_text())
    services = spec["services"]
    assert "--appendonly" in services["redis"]["command"]
    assert services["migrate"]["command"] == ["migrate"]
    for name in ("api", "worker", "api-cluster", "worker-cluster"):
        assert services[name]["image"] == "boxoffice:latest"
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }
    assert services["worker"]["healthcheck"] == {"disable": True}
    nodes = [name for name, s in services.items() if s.get("profiles") == ["cluster"]]
    assert {"redis-node-1", "redis-node-2", "redis-node-3"} <= set(nodes)
    assert "api" not in nodes and "api-cluster" in nodes
