"""docs/API.md, the reference a reader of the repository gets, is what the running
service documents: regenerated from the live server's OpenAPI document, it must not differ."""

from __future__ import annotations

from typing import Any

import httpx

from service.web import apidoc


async def served_document(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/schema/openapi.json")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def test_api_reference_is_up_to_date(client: httpx.AsyncClient) -> None:
    expected = apidoc.render(await served_document(client))
    committed = apidoc.DOC_PATH.read_text() if apidoc.DOC_PATH.exists() else ""
    assert committed == expected, (
        f"{apidoc.DOC_PATH} differs from the service's OpenAPI document: "
        f"run `{apidoc.COMMAND}` and commit the result"
    )


async def test_the_generator_documents_what_the_server_serves(client: httpx.AsyncClient) -> None:
    assert apidoc.openapi_document() == await served_document(client)


def test_check_mode(monkeypatch: Any, tmp_path: Any) -> None:
    stale = tmp_path / "API.md"
    stale.write_text("# stale\n")
    monkeypatch.setattr(apidoc, "DOC_PATH", stale)
    assert apidoc.main(["--check"]) == 1
    assert apidoc.main([]) == 0
    assert apidoc.main(["--check"]) == 0
    assert stale.read_text().startswith("# Boxoffice HTTP API")


def test_retry_after_is_documented_only_where_it_is_sent() -> None:
    """Of the 409s only idempotency_in_progress sends Retry-After: a 409 without it does
    not list the header, and one that shares its status with other codes says so."""
    doc = apidoc.openapi_document()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            conflict = op.get("responses", {}).get("409")
            if conflict is None:
                continue
            header = (conflict.get("headers") or {}).get("Retry-After")
            where = f"{method} {path}"
            if "idempotency_in_progress" not in conflict["description"]:
                assert header is None, where
            elif "` or `" in conflict["description"]:
                assert header is not None, where
                assert "idempotency_in_progress` only" in header["description"], where
    admin = doc["paths"]["/admin/events"]["post"]["responses"]["409"]
    assert "Retry-After" in admin["headers"]
