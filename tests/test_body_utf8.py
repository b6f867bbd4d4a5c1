"""A body whose bytes are not UTF-8 is a 400 validation_error that changes nothing."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import create_event
from tests.test_errors import assert_problem, json_headers, unchanged

# Every answer of the lean lane's routes agrees with the OpenAPI document.
pytestmark = pytest.mark.openapi_checked

# Bytes that are not UTF-8: a stray 0xff, and a surrogate encoded as UTF-8 (CESU-8).
NOT_UTF8 = {"0xff": b"\xff", "encoded surrogate": b"\xed\xa0\x80"}


@pytest.mark.parametrize("bad", NOT_UTF8.values(), ids=NOT_UTF8.keys())
@pytest.mark.parametrize("key", [None, "utf8-order"], ids=["no key", "Idempotency-Key"])
async def test_hold_body_that_is_not_utf8_is_400_not_500(
    client: httpx.AsyncClient, bad: bytes, key: str | None
) -> None:
    event_id = await create_event(client)
    body = b'{"customer_id": "a' + bad + b'b", "items": [{"category": "GA", "quantity": 1}]}'
    headers = json_headers(**({"idempotency-key": key} if key else {}))
    async with unchanged(client, event_id):
        r = await client.post(f"/events/{event_id}/holds", content=body, headers=headers)
        assert_problem(r, 400, "validation_error")
