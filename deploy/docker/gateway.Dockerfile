# syntax=docker/dockerfile:1.7
# dexserve gateway: grpc.aio front door on :50051, the OpenAI-compatible HTTP door on :8000, metrics on :9464.
# Build from the repo root:  docker build -f deploy/docker/gateway.Dockerfile -t dexserve/gateway:0.1.0 .
FROM python:3.11.9-slim-bookworm

# Caches go to /tmp: the chart mounts an emptyDir there under a read-only root filesystem.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEX_HOST=0.0.0.0 \
    DEX_PORT=50051 \
    DEX_HTTP_PORT=8000 \
    DEX_METRICS_PORT=9464 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/huggingface

# Fixed uid/gid 10001: the Helm chart's securityContext.runAsUser matches it.
RUN groupadd --system --gid 10001 dex \
 && useradd --system --uid 10001 --gid dex --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin dex

WORKDIR /app

# 1) Dependencies only (cached until pyproject.toml changes): the base install,
#    which has no torch and no transformers (pyproject's `engine` extra is not installed).
COPY pyproject.toml setup.py ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 2) Source last: code edits rebuild only these layers. Only the API and the
#    service layer: setup.py packages what is present, so no engine code ships here.
COPY README.md ./
COPY proto/ proto/
COPY service/ service/
RUN pip install --no-deps . \
 && rm -rf /app/build
COPY deploy/docker/healthcheck.py /usr/local/bin/dex-healthcheck

USER 10001:10001
EXPOSE 50051 8000 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "/usr/local/bin/dex-healthcheck", "gateway"]
ENTRYPOINT ["dex"]
CMD ["gateway"]
