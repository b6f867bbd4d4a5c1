"""`locust -f FILE --help` lists the options FILE adds, as well as Locust's own.

A locustfile adds options through `events.init_command_line_parser` (loadtest/locustfile.py
does), but Locust 2.47 prints its help before it imports the locustfile, so they never show
there (locustio/locust#2917, closed unfixed). The project installs a startup hook,
loadtest/boxoffice_locust.pth (pyproject.toml: force-include), that imports this module
when the `locust` command is asked for help; it imports the named locustfiles first, so
their listeners are registered when Locust builds the parser that prints the help.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

HELP = frozenset({"-h", "--help"})


def asked_for_help(argv: Sequence[str]) -> bool:
    return bool(argv) and os.path.basename(argv[0]) == "locust" and not HELP.isdisjoint(argv)


def locustfiles(argv: Sequence[str]) -> list[str]:
    """The .py files that -f/--locustfile names (comma-separated, as Locust takes them)."""
    named: list[str] = []
    for i, arg in enumerate(argv):
        if arg in ("-f", "--locustfile") and i + 1 < len(argv):
            named += argv[i + 1].split(",")
        elif arg.startswith("--locustfile="):
            named += arg.split("=", 1)[1].split(",")
    return [path for path in named if path.endswith(".py") and os.path.isfile(path)]


def register_options(argv: Sequence[str]) -> None:
    from locust.util.load_locustfile import load_locustfile

    for path in locustfiles(argv):
        load_locustfile(path)


if asked_for_help(sys.argv):
    register_options(sys.argv)
