# dask-memory-exporter: Prometheus exporter for the Dask worker memory breakdown.
#
#   docker build -t dask-memory-exporter .
#   docker run --read-only --tmpfs /tmp -p 9787:9787 \
#       -e DASK_SCHEDULER_ADDRESS=tcp://scheduler:8786 dask-memory-exporter
#
# BASE must be a Debian-like image with python3 and its venv module; the builder and the final
# stage share it, so the virtualenv's interpreter path is valid in both. Runs as UID 10001 and
# writes nothing outside /tmp (mount an emptyDir or tmpfs there with a read-only root).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python3 -m venv /opt/venv
# Pinned runtime dependencies first: this layer is reused until requirements.lock changes.
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --no-cache-dir --require-virtualenv -r requirements.lock
COPY pyproject.toml README.md ./
COPY exporter ./exporter
# The package itself, without letting pip resolve anything beyond the lock; then prove the
# environment is consistent and the entry point imports. pip and setuptools are not needed at
# run time: leave them out of the image.
RUN /opt/venv/bin/pip install --no-cache-dir --require-virtualenv --no-deps ./ \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/dask-memory-exporter --version \
    && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools

FROM ${BASE}
ARG UID=10001
LABEL org.opencontainers.image.title="dask-memory-exporter" \
      org.opencontainers.image.description="Prometheus exporter for Dask worker memory" \
      org.opencontainers.image.licenses="BSD-3-Clause"
RUN groupadd --gid "${UID}" exporter \
    && useradd --no-log-init --uid "${UID}" --gid "${UID}" \
       --home-dir /tmp --no-create-home --shell /usr/sbin/nologin exporter
COPY --from=builder /opt/venv /opt/venv
# Read-only root filesystem: no bytecode writes, home and Dask's config/temp dirs under /tmp.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    DASK_CONFIG=/tmp/dask \
    DASK_TEMPORARY_DIRECTORY=/tmp \
    DASK_MEMORY_EXPORTER_LISTEN=0.0.0.0:9787
USER ${UID}:${UID}
WORKDIR /tmp
EXPOSE 9787
# Liveness only (the process answers HTTP); readiness, which needs the scheduler, is /readyz.
# Follows DASK_MEMORY_EXPORTER_LISTEN's port; a --listen given as an argument is not seen here.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; p = os.environ.get('DASK_MEMORY_EXPORTER_LISTEN', ':9787').rpartition(':')[2]; u.urlopen(f'http://127.0.0.1:{p}/healthz', timeout=4)"]
ENTRYPOINT ["dask-memory-exporter", "serve"]
