# One image for every command: `serve` (the default), `worker`, `migrate`, `reconcile`,
# `dead-letters`. Configuration comes from BOXOFFICE_* variables, as outside a container.
#
#   docker build -t boxoffice .
#   docker run --rm --network host -e BOXOFFICE_DATABASE_URL=... boxoffice migrate
#
# PYTHON_IMAGE must be a Debian with python3 and its venv module (tests/test_image.py builds
# an equivalent one from Debian's packages where this one cannot be pulled).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG UV_VERSION=0.13.9
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=python3 \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# uv from PyPI, in a venv of its own: a distribution's python3 may refuse `pip install`
# into the system (PEP 668), and nothing of uv goes into the final image.
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir "uv==${UV_VERSION}"
WORKDIR /app
# The dependencies first, from the lock alone: this layer is rebuilt only when they change.
COPY pyproject.toml uv.lock ./
RUN /opt/uv/bin/uv sync --frozen --no-dev --no-install-project --no-cache
# Then the project itself, installed as its wheel (not editable): service/ with lua/ and
# migrations/ inside it as package data (pyproject.toml), so the final stage needs the
# virtual environment alone.
COPY README.md ./
# pyproject.toml puts this .pth into the project's wheel: the build fails without it.
COPY loadtest/boxoffice_locust.pth ./loadtest/
COPY service ./service
COPY lua ./lua
COPY migrations ./migrations
RUN /opt/uv/bin/uv sync --frozen --no-dev --no-cache --no-editable

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 boxoffice \
    && useradd --system --uid 10001 --gid boxoffice --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin boxoffice
WORKDIR /app
# Compiled in the build stage (UV_COMPILE_BYTECODE): the service's user writes nothing here.
COPY --from=build /app/.venv ./.venv
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BOXOFFICE_HOST=0.0.0.0 \
    BOXOFFICE_PORT=8000
USER boxoffice
EXPOSE 8000
# For `serve` only: compose and `docker run` turn it off for the other commands.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('BOXOFFICE_PORT', '8000') + '/ready', timeout=2)"]
ENTRYPOINT ["boxoffice"]
CMD ["serve"]
