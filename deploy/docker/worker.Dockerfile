# syntax=docker/dockerfile:1.7
# dexserve worker: K depth explorers, one GPU each; metrics/health on :9465.
# Build from the repo root:  docker build -f deploy/docker/worker.Dockerfile -t dexserve/worker:0.1.0 .
# CUDA userspace comes from the base image; the torch wheel bundles its own CUDA libraries
# for the same major/minor (cu128), so only the NVIDIA driver is needed on the node.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ARG DEBIAN_FRONTEND=noninteractive
# Caches go to /tmp: the chart mounts an emptyDir there under a read-only root filesystem.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DEX_METRICS_PORT=9465 \
    HF_HUB_OFFLINE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/huggingface

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 (Ubuntu 22.04 ships 3.10): deadsnakes builds, pinned to the 3.11 series.
# DL3008: deadsnakes drops superseded package versions, so an exact apt pin breaks builds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && apt-get purge -y --auto-remove software-properties-common gpg-agent \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv "$VIRTUAL_ENV" \
 && groupadd --system --gid 10001 dex \
 && useradd --system --uid 10001 --gid dex --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin dex

WORKDIR /app

# 1) Dependencies (cached until pyproject.toml changes): CUDA torch first, pinned, from
#    the official PyTorch index, so the PyPI requirement torch==2.13.0 is already met.
#    The base install plus the `engine` extra.
COPY pyproject.toml setup.py ./
RUN pip install --index-url https://download.pytorch.org/whl/cu128 "torch==2.13.0" \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml','rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['engine']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 2) Source last.
COPY README.md ./
COPY proto/ proto/
COPY service/ service/
COPY worker/ worker/
RUN pip install --no-deps . \
 && rm -rf /app/build
COPY deploy/docker/healthcheck.py /usr/local/bin/dex-healthcheck

USER 10001:10001
EXPOSE 9465
# Model loading can take minutes: a long start period before failures count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "/usr/local/bin/dex-healthcheck", "worker"]
ENTRYPOINT ["dex"]
CMD ["worker"]
