"""GET /admin/dashboard: the operator's live page, one static file (dashboard.html, its
script and style inline: no build step, nothing fetched from elsewhere)."""

from __future__ import annotations

import functools
from importlib.resources import files

PAGE = files("service.web").joinpath("dashboard.html")

# The page may talk to this service only, and runs only its own inline script and style:
# no asset from the internet, and nothing injected into it could send the token away.
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


@functools.cache
def page() -> bytes:
    return PAGE.read_bytes()
