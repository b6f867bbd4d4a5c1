#!/usr/bin/env bash
# The ticket-drop scenario (loadtest/locustfile.py), headless, against $BOXOFFICE_URL.
#
#   loadtest/drop.sh                              # 200 buyers, 50/s, 60 s, then the checks
#   loadtest/drop.sh --processes 2                # the same from a master and two workers
#   loadtest/drop.sh -u 500 -t 30s --ga-stock 5000 --hold-ttl 10 --expire-wait
#
# Environment: BOXOFFICE_URL (default http://127.0.0.1:8000), BOXOFFICE_ADMIN_TOKEN
# (default dev-admin-token, what `make run` uses), USERS, SPAWN_RATE, RUN_TIME, LOCUST, and
# the scenario's DROP_* variables (see the locustfile). Extra arguments go to locust after
# the defaults, so they override them. Exits with locust's exit code: non-zero on request
# failures, drift found by the reconcile check, or anything oversold.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
locust="${LOCUST:-$root/.venv/bin/locust}"
url="${BOXOFFICE_URL:-http://127.0.0.1:8000}"
export BOXOFFICE_ADMIN_TOKEN="${BOXOFFICE_ADMIN_TOKEN:-dev-admin-token}"
# Each buyer forwards for an address of its own: the per-address limits (on by default)
# would take this one machine for one household. `make run` believes 127.0.0.1's
# X-Forwarded-For; a service that does not (BOXOFFICE_TRUSTED_PROXIES) counts the machine.
export DROP_FORWARDED_FOR="${DROP_FORWARDED_FOR:-true}"

if [[ ! -x "$locust" ]]; then
    echo "drop.sh: no locust at $locust (run 'make test' or 'uv sync' first, or set LOCUST)" >&2
    exit 2
fi
if ! curl -fsS -o /dev/null --max-time 5 "$url/ready" 2>/dev/null; then
    echo "drop.sh: $url/ready does not answer 200; is the service running (make run)?" >&2
    exit 2
fi

status=0
"$locust" -f "$here/locustfile.py" --headless \
    -u "${USERS:-200}" -r "${SPAWN_RATE:-50}" -t "${RUN_TIME:-60s}" \
    --host "$url" "$@" || status=$?
exit "$status"
