# Developer and CI entry points. `make run` starts everything locally; `make test` is what CI
# runs. A bare `make` lists the targets: the `## ` comment after a target's colon is its line.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

BIN := .venv/bin
BOXOFFICE := $(BIN)/boxoffice
BOXOFFICE_ADMIN_TOKEN ?= dev-admin-token

.PHONY: help venv services services-stop cluster cluster-stop migrate run lint chromium docker \
	test test-fast bench clean

help: ## list the targets (what a bare `make` does)
	@echo "usage: make TARGET"
	@sed -nE 's/^([a-z-]+):.*## (.*)/  \1\t\2/p' $(MAKEFILE_LIST) | expand -t 18

# uv from PyPI when the machine lacks it: --user fails inside a virtualenv, plain fails on a
# system Python (PEP 668), hence the chain. `python3 -m uv` works with pip's bin dir off PATH.
venv: ## create or update .venv from uv.lock (installs uv if it is missing)
	@if command -v uv >/dev/null; then uv=uv; \
	elif python3 -m uv --version >/dev/null 2>&1; then uv="python3 -m uv"; else \
		echo "uv not found: installing it with pip"; \
		pip="python3 -m pip install --quiet uv"; \
		$$pip --user 2>/dev/null || $$pip 2>/dev/null || $$pip --user --break-system-packages; \
		uv="python3 -m uv"; \
	fi; \
	$$uv sync --frozen --quiet

services: venv ## start Redis and PostgreSQL in .data/, or check the running ones
	@.ci/services.sh

services-stop: ## stop the Redis and PostgreSQL that `make services` started
	@.ci/services.sh stop

# A local Redis Cluster (3 primaries with 2 replicas each, ports 7000-7008, .data/cluster;
# CLUSTER_REPLICAS=1 for one each); any node's
# URL names it: redis://127.0.0.1:7000/0.
cluster: ## start a local Redis Cluster (ports 7000-7008)
	@.ci/cluster.sh

cluster-stop: ## stop the local Redis Cluster
	@.ci/cluster.sh stop

migrate: venv services ## create the database if missing and apply the migrations
	$(BOXOFFICE) migrate

# The waiting room's pass secret (docs/waiting-room.md): made once into .data/, so that a
# restart keeps passes valid, and handed to the API processes unless the environment sets one.
PASS_SECRET_FILE := .data/pass-secret

$(PASS_SECRET_FILE):
	@mkdir -p $(@D)
	@umask 077 && $(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(32))' >$@

# Both in the foreground: Ctrl-C, or either one exiting, stops the other. Background jobs of a
# non-interactive shell ignore SIGINT, hence the trap that forwards a TERM. Stopped by a
# signal, the recipe exits 0 (a wanted stop, not an error for make to report); it ignores
# further signals meanwhile (resetting them to the default would kill it with status 143).
run: export BOXOFFICE_ADMIN_TOKEN := $(BOXOFFICE_ADMIN_TOKEN)
# X-Forwarded-For from this machine believed, so that loadtest/drop.sh's buyers (each
# forwarding for an address of its own) are not one address to the per-address limits.
run: export BOXOFFICE_TRUSTED_PROXIES ?= 127.0.0.1
run: venv services migrate $(PASS_SECRET_FILE) ## set up what is missing, then serve the API and run the worker
	@export BOXOFFICE_PASS_SECRET="$${BOXOFFICE_PASS_SECRET:-$$(<$(PASS_SECRET_FILE))}"; \
	pids=; stop() { trap '' INT TERM; kill $$pids 2>/dev/null || true; wait; exit 0; }; \
	trap stop INT TERM; \
	$(BOXOFFICE) serve & pids="$$pids $$!"; \
	$(BOXOFFICE) worker & pids="$$pids $$!"; \
	rc=0; wait -n || rc=$$?; \
	kill $$pids 2>/dev/null || true; wait || true; exit $$rc

lint: venv ## ruff check, ruff format --check, mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The dashboard's browser tests need Chromium: Debian's package, installed when missing and
# apt-get can (as root, or with sudo that asks for no password). Otherwise those tests skip
# and say why; the rest runs as ever.
chromium: ## install Chromium for the browser tests (Debian, when it can)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
		export DEBIAN_FRONTEND=noninteractive; apt=apt-get; [ "$$(id -u)" = 0 ] || apt="sudo -n apt-get"; \
		echo "installing chromium (Debian package) for the dashboard's browser tests"; \
		{ $$apt install -y -qq chromium || { $$apt update -qq && $$apt install -y -qq chromium; }; } \
			>/dev/null 2>&1 || echo "chromium could not be installed: the browser tests will skip"; \
	}

# The image test (tests/test_image.py) needs a Docker engine and, where the base image cannot
# be pulled, debootstrap: Debian's docker.io and debootstrap, installed as chromium above when
# missing. As root it starts a dockerd of its own when none answers; otherwise it skips and
# says why. --no-remove: never replace another Docker (docker-ce) to make room for docker.io.
docker: ## install Docker and debootstrap for the image test
	@missing=; \
	command -v dockerd >/dev/null || timeout 20 docker info >/dev/null 2>&1 || missing=" docker.io"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	[ -z "$$missing" ] || { \
		export DEBIAN_FRONTEND=noninteractive; apt="apt-get --no-remove"; \
		[ "$$(id -u)" = 0 ] || apt="sudo -n $$apt"; \
		echo "installing$$missing (Debian packages) for the image test"; \
		{ $$apt install -y -qq $$missing || { $$apt update -qq && $$apt install -y -qq $$missing; }; } \
			>/dev/null 2>&1 || echo "could not install$$missing: the image test may skip"; \
	}

# In parallel (pytest-xdist): the tests mostly wait, on servers and on time, so more workers
# than cores pay; each has a Redis and a test database of its own (tests/conftest.py).
# --dist loadgroup: the tests on the session's Redis Cluster share one worker, one cluster,
# and so do a module's tests that share a module-scoped server (tests/conftest.py). Without
# reordering each group starts where its first test stands, as before the groups worked;
# sorted by size, the groups (and their servers) all started at once, and a timed test among
# them (test_load's 200,000 seats: each Lua call under 100 ms) failed in 2 of 3 runs on a
# busy machine.
# TEST_WORKERS=0 runs them in one process, as a plain `$(BIN)/pytest` does. Three, not
# four, on two cores: with four, tests that time a background step (a worker's, a server's
# shutdown) were starved of CPU now and then (README, "Two commands"), and still were with
# the tests' CPU cut by half (test-fast: 398 s -> 206 s; four workers took 235 s).
TEST_WORKERS ?= 3
PARALLEL := -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

test: venv services lint chromium docker ## lint, then the whole test suite (what CI runs)
	$(BIN)/pytest $(PARALLEL)

# All but the cluster, browser and slow tiers (the markers in pyproject.toml): the same
# set-up and lint, then the tests a change most often needs, in a few minutes.
test-fast: venv services lint ## lint, then all tests but the cluster, browser and slow ones
	$(BIN)/pytest $(PARALLEL) -m "not cluster and not browser and not slow"

# BENCH_ARGS go to loadtest/bench.py: e.g. BENCH_ARGS="--room-buyers 1000000" for the waiting
# room's row at its full scale (docs/benchmarks.md), or "--only twin,room".
bench: venv services ## the benchmarks (docs/benchmarks.md)
	$(BIN)/python -m loadtest.bench $(BENCH_ARGS)

clean: services-stop cluster-stop ## stop the servers, remove .data/ and the caches
	rm -rf .data .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
