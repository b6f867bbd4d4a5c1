"""`locust -f loadtest/locustfile.py --help` lists the scenario's own options.

Locust prints its help before it imports the locustfile; the project's startup hook
(loadtest/boxoffice_locust.pth, loadtest/locusthelp.py) imports it first. The locustfile
is not imported here: importing Locust would monkey-patch this process with gevent."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from loadtest.locusthelp import asked_for_help, locustfiles

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
OPTIONS = ROOT / "loadtest" / "drop_scenario.py"  # where the locustfile's options are added
LOCUST = str(Path(sys.executable).parent / "locust")


def scenario_options() -> list[tuple[str, str]]:
    """(flag, environment variable) of every option the locustfile adds for its users."""
    source = OPTIONS.read_text()
    found = re.findall(r'option\(\s*"(--[a-z-]+)",.*?env_var="(DROP_[A-Z_]+)"', source, re.S)
    return [(flag, env) for flag, env in found]


def test_locust_help_lists_the_scenario_options() -> None:
    options = scenario_options()
    assert len(options) >= 18, options  # the parse above still finds them
    done = subprocess.run(
        [LOCUST, "-f", "loadtest/locustfile.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps the help text
    for flag, env in options:
        assert re.search(rf"{flag}\b", text), f"{flag} missing from locust --help"
        assert env in text, f"{env} ({flag}) missing from locust --help"
    assert "--ga-stock GA_STOCK general-admission tickets" in text
    assert "--on-sale-epoch" not in text  # set by the master for its workers, not by hand


def test_the_hook_stays_out_of_other_commands() -> None:
    check = "import sys; print('loadtest.locusthelp' in sys.modules, 'locust' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", check], cwd="/", capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split() == ["False", "False"], done.stdout + done.stderr
    assert not asked_for_help(["/x/bin/locust", "-f", "a.py", "--headless"])
    assert not asked_for_help(["/x/bin/python", "--help"])
    assert asked_for_help(["/x/bin/locust", "-f", "a.py", "-h"])
    assert locustfiles(["locust", "-f", f"{LOCUSTFILE},nope.py", "--help"]) == [str(LOCUSTFILE)]
    assert locustfiles(["locust", f"--locustfile={LOCUSTFILE}"]) == [str(LOCUSTFILE)]
