"""A screenshot of the dashboard watched in real time (docs/dashboard.png), so that its
moving charts have history: headless Chromium opens the page, waits, then captures it.

    BOXOFFICE_ADMIN_TOKEN=... .venv/bin/python -m loadtest.screenshot \\
        --url http://127.0.0.1:8000 --event drop-demo --after 40 --out docs/dashboard.png

Run it while loadtest/drop.sh runs a drop against the same service (docs/live-view.md, "Watching
a drop"). `chromium --headless --screenshot` alone would capture the page after a budget of
virtual time, in which the once-a-second figures arrive only once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tests.browser import Browser, chromium


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("BOXOFFICE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--event", required=True, help="the event to show")
    parser.add_argument("--after", type=float, default=40, help="seconds to watch first")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args()
    binary = chromium()
    if binary is None:
        print("no chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    token = os.environ.get("BOXOFFICE_ADMIN_TOKEN", "dev-admin-token")
    with Browser(binary, args.width, args.height) as browser:
        browser.open(f"{args.url}/admin/dashboard#token={token}&event={args.event}")
        browser.wait_for("document.body.dataset.state === 'live'")
        time.sleep(args.after)
        browser.screenshot(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
