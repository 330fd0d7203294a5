#!/usr/bin/env bash
# Build an image's root filesystem with no Docker daemon and no registry, by running the
# Dockerfile's steps in a chroot, then start its ENTRYPOINT as the image user and run its
# HEALTHCHECK command. Needs root (chroot, debootstrap) and Debian's package mirror.
#
#   bash deploy/tools/rootfs-build.sh gateway|worker WORKDIR [REDIS_URL]
#
# Substitutions, each because the original cannot be had offline here:
#   base image    python:3.11.9-slim-bookworm (gateway) / nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
#                 (worker)  ->  Debian bookworm from debootstrap (the gateway base *is* bookworm;
#                 CUDA userspace is not needed on CPU)
#   Python        the image's 3.11.9 / deadsnakes 3.11  ->  bookworm's python3 (3.11.2), in a venv at
#                 /opt/venv for both (bookworm's system Python refuses pip installs, PEP 668)
#   torch         cu128 wheel from download.pytorch.org  ->  torch==2.13.0 CPU wheel
#   pip index     PyPI  ->  a wheelhouse downloaded on the host (`pip download`, same cp311 ABI),
#                 installed with --no-index
# Everything else (ENV, user 10001, WORKDIR /app, the COPY list, the requirements taken from
# pyproject.toml, `pip install --no-deps .`, the healthcheck script, ENTRYPOINT dex) is the
# Dockerfile's own step.
set -euo pipefail
ROLE=${1:?gateway|worker}
WORK=${2:?work dir}
REDIS_URL=${3:-}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
BASE=$WORK/base
ROOT=$WORK/$ROLE
mkdir -p "$WORK"

log() { printf '[rootfs %s] %s\n' "$ROLE" "$*" >&2; }

# 1) Base: Debian bookworm minbase with python3 + venv (shared by both roles).
if [ ! -x "$BASE/usr/bin/python3" ]; then
  log "debootstrap bookworm -> $BASE"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$BASE" \
    http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1
fi
rm -rf "$ROOT"
cp -a "$BASE" "$ROOT"

# 2) Wheelhouse on the host: the Dockerfile's requirement list (pyproject dependencies, plus the
#    engine extra and torch for the worker) and the build backend.
REQ=$WORK/req-$ROLE.txt
"$PY" - "$REPO/pyproject.toml" "$ROLE" >"$REQ" <<'EOF'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = list(p["dependencies"])
if sys.argv[2] == "worker":
    reqs = ["torch==2.13.0"] + reqs + p["optional-dependencies"]["engine"]
print("\n".join(reqs))
EOF
log "pip download -> $WORK/wheelhouse"
# async-timeout: redis requires it below Python 3.11.3 (bookworm has 3.11.2; the host may be newer).
"$PY" -m pip download -q -d "$WORK/wheelhouse" -r "$REQ" "setuptools>=68" wheel "async-timeout>=4.0.3" 2>&1 | grep -v '^WARNING: Location' >&2 || true
mkdir -p "$ROOT/tmp/wheelhouse"
cp "$WORK/wheelhouse"/* "$ROOT/tmp/wheelhouse/"
cp "$REQ" "$ROOT/tmp/requirements.txt"

# 3) ENV of the Dockerfile (the worker's; the gateway's adds DEX_HOST/DEX_PORT).
ENVS=(PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
      VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
      HOME=/tmp XDG_CACHE_HOME=/tmp/.cache HF_HOME=/tmp/huggingface HF_HUB_OFFLINE=1)
if [ "$ROLE" = gateway ]; then
  ENVS+=(DEX_HOST=127.0.0.1 DEX_PORT=${DEX_PORT:-50051} DEX_METRICS_PORT=${DEX_METRICS_PORT:-9464})
else
  ENVS+=(DEX_METRICS_PORT=${DEX_METRICS_PORT:-9465})
fi
in_root() { chroot "$ROOT" /usr/bin/env -i "${ENVS[@]}" /bin/bash -o pipefail -c "$1"; }

# 4) RUN: venv, the dex user (uid/gid 10001), the requirements.
log "venv, user, requirements"
in_root 'python3 -m venv "$VIRTUAL_ENV" \
 && groupadd --system --gid 10001 dex \
 && useradd --system --uid 10001 --gid dex --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin dex \
 && pip install -q --no-index --find-links /tmp/wheelhouse -r /tmp/requirements.txt'

# 5) COPY the source (gateway: proto/ and service/ only, as its Dockerfile), then RUN pip install --no-deps .
mkdir -p "$ROOT/app"
cp "$REPO/pyproject.toml" "$REPO/setup.py" "$REPO/README.md" "$ROOT/app/"
DIRS=(proto service)
[ "$ROLE" = worker ] && DIRS+=(worker)
for d in "${DIRS[@]}"; do
  (cd "$REPO" && git ls-files -z "$d" | tar --null -T - -cf -) | tar -xf - -C "$ROOT/app"
done
in_root 'cd /app && pip install -q --no-index --find-links /tmp/wheelhouse --no-deps . && rm -rf /app/build /tmp/wheelhouse /tmp/requirements.txt'
install -m 0755 "$REPO/deploy/docker/healthcheck.py" "$ROOT/usr/local/bin/dex-healthcheck"
chmod 1777 "$ROOT/tmp"
if [ "$ROLE" = gateway ] && chroot "$ROOT" /opt/venv/bin/python -c "import torch" 2>/dev/null; then
  log "FAIL: torch in the gateway root filesystem"; exit 1
fi
du -sh "$ROOT" >&2

# 6) ENTRYPOINT ["dex"] CMD [ROLE] as USER 10001:10001, then the HEALTHCHECK command.
[ -n "$REDIS_URL" ] || { log "built (no REDIS_URL: not started)"; exit 0; }
log "starting: dex $ROLE (uid 10001)"
chroot --userspec=10001:10001 "$ROOT" /usr/bin/env -i "${ENVS[@]}" REDIS_URL="$REDIS_URL" dex "$ROLE" \
  >"$WORK/$ROLE.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  if chroot --userspec=10001:10001 "$ROOT" /usr/bin/env -i "${ENVS[@]}" python /usr/local/bin/dex-healthcheck "$ROLE" \
      >/dev/null 2>&1; then
    log "HEALTHCHECK ok"
    echo "healthy"
    exit 0
  fi
  kill -0 $PID 2>/dev/null || { log "entrypoint exited"; tail -30 "$WORK/$ROLE.log" >&2; exit 1; }
  sleep 1
done
log "HEALTHCHECK never passed"; tail -30 "$WORK/$ROLE.log" >&2; exit 1
