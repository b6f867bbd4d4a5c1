"""How an API process tells `boxoffice serve` (service/server.py) that it has started: a
file named for its pid, in the directory serve names. A process that got this far is
always replaced when it dies; one that never gets here counts toward a crash loop."""

from __future__ import annotations

import os
from pathlib import Path

STARTED_DIR_ENV = "BOXOFFICE_SERVE_STARTED_DIR"


def mark_started() -> None:
    """Called by an API process once its app has started (nothing when not under serve)."""
    directory = os.environ.get(STARTED_DIR_ENV)
    if directory:
        (Path(directory) / str(os.getpid())).touch()
