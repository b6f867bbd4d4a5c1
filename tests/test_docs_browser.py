"""The API reference pages in a real browser with no outside network: headless Chromium
(Debian's package) that can reach nothing but loopback, against `boxoffice serve`. Swagger
UI (/schema/swagger) and Redoc (/schema, /schema/redoc) render every operation of the
OpenAPI document from scripts and styles the service serves itself (service/web/docsui.py);
with Litestar's defaults, which load them from public CDNs, both pages stay blank here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.core.settings import Settings
from tests.apiserver import ApiServer
from tests.browser import Browser, chromium
from tests.conftest import server_env

CHROMIUM = chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium (Debian package `chromium`): `make test` installs it with apt-get"
    " where it can; these browser tests need it",
)

# Every host name but localhost fails to resolve, and whatever is not loopback goes to a
# proxy on a port where nothing listens: the browser reaches the service and nothing else.
OFFLINE = (
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# Loaded by the old pages: the check that the browser really cannot reach it.
CDN_SCRIPT = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"
METHODS = ("get", "post", "put", "patch", "delete")
# Redoc's "API docs by Redocly" credit shows its logo from Redocly's CDN, hard-coded in the
# bundle; offline the image is left out and nothing else changes.
REDOC_CREDIT_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[ApiServer]:
    api = ApiServer(server_env(settings))
    api.start(timeout=90)  # a loaded machine: the first worker may take a while
    yield api
    api.stop()


@pytest.fixture(scope="module")
def document(server: ApiServer) -> dict[str, Any]:
    found: dict[str, Any] = httpx.get(f"{server.url}/schema/openapi.json").json()
    return found


@pytest.fixture(scope="module")
def operations(document: dict[str, Any]) -> list[tuple[str, str]]:
    """(method, path) of every operation the OpenAPI document lists."""
    found = [
        (method, path)
        for path, item in document["paths"].items()
        for method in METHODS
        if method in item
    ]
    assert len(found) > 20
    return found


@pytest.fixture
def browser() -> Iterator[Browser]:
    assert CHROMIUM is not None
    with Browser(CHROMIUM, extra=OFFLINE) as b:
        yield b


def resources(browser: Browser) -> list[str]:
    """What the page loaded (scripts, styles, images, fetches), as URLs."""
    names: list[str] = browser.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    return names


def test_the_browser_reaches_nothing_but_the_service(browser: Browser, server: ApiServer) -> None:
    browser.open(f"{server.url}/health")
    browser.wait_for("document.body && document.body.innerText.includes('ok')")
    outcome = browser.evaluate(
        f"fetch({CDN_SCRIPT!r}, {{mode: 'no-cors'}}).then(() => 'reached', () => 'failed')"
    )
    assert outcome == "failed"


def test_swagger_ui_shows_every_operation_offline(
    browser: Browser, server: ApiServer, operations: list[tuple[str, str]], tmp_path: Path
) -> None:
    browser.open(f"{server.url}/schema/swagger")
    shown = browser.wait_for(
        f"document.querySelectorAll('.opblock').length >= {len(operations)}"
        " && [...document.querySelectorAll('.opblock')].map(b => ["
        "b.querySelector('.opblock-summary-method').innerText.toLowerCase(),"
        "b.querySelector('.opblock-summary-path').dataset.path])",
        within=60,
    )
    browser.screenshot(tmp_path / "swagger.png")
    assert sorted(map(tuple, shown)) == sorted(operations)
    # Styled by its own stylesheet: the method badges have Swagger UI's colours.
    colour = browser.evaluate(
        "getComputedStyle(document.querySelector('.opblock-post .opblock-summary-method'))"
        ".backgroundColor"
    )
    assert colour == "rgb(73, 204, 144)"
    assert all(url.startswith(server.url) for url in resources(browser)), resources(browser)


@pytest.mark.parametrize("page", ["/schema", "/schema/redoc"])
def test_redoc_shows_every_operation_offline(
    browser: Browser, server: ApiServer, document: dict[str, Any], page: str, tmp_path: Path
) -> None:
    ids = sorted(
        f"operation/{item[method]['operationId']}"
        for item in document["paths"].values()
        for method in METHODS
        if method in item
    )
    browser.open(f"{server.url}{page}")
    # Redoc gives each operation a section of its own, named by its operationId.
    sections = "[...document.querySelectorAll('[data-section-id^=\"operation/\"]')]"
    shown = browser.wait_for(
        f"{sections}.length >= {len(ids)} && {sections}.map(s => s.dataset.sectionId)",
        within=60,
    )
    browser.screenshot(tmp_path / "redoc.png")
    assert sorted(shown) == ids
    # Styled by the styles Redoc's script brings: the method badge is "get", shown upper-case.
    verb = f"{sections}[0].querySelector('.http-verb')"
    assert browser.evaluate(f"[{verb}.textContent, {verb}.innerText]") == ["get", "GET"]
    elsewhere = [url for url in resources(browser) if not url.startswith(server.url)]
    assert elsewhere in ([], [REDOC_CREDIT_LOGO]), elsewhere
