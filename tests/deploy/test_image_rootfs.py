"""Both images build without a Docker daemon or registry: `deploy/tools/rootfs-build.sh` runs each
Dockerfile's steps in a chroot on a debootstrapped Debian bookworm (substitutions listed in the
script: base image, Python build, CPU torch, a host-made wheelhouse), then starts the image's
ENTRYPOINT as uid 10001 and runs its HEALTHCHECK command until it passes.

The script's steps are checked against the Dockerfiles here too, so the two cannot drift apart
unnoticed: the COPY list, the user, the entrypoint and command, the healthcheck script.
The debootstrapped base and the wheelhouse are cached under .tools/rootfs.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from dexserve.queue.embedded import EmbeddedRedis, free_port

from ._chart import ROOT

SCRIPT = ROOT / "deploy" / "tools" / "rootfs-build.sh"
WORK = ROOT / ".tools" / "rootfs"


def _dockerfile(role: str) -> str:
    return (ROOT / "deploy" / "docker" / f"{role}.Dockerfile").read_text()


@pytest.mark.parametrize("role, dirs", [("gateway", ["proto", "service"]), ("worker", ["proto", "service", "worker"])])
def test_script_mirrors_the_dockerfile(role: str, dirs: list[str]) -> None:
    text, script = _dockerfile(role), SCRIPT.read_text()
    copied = re.findall(r"^COPY (\w+)/ \1/$", text, re.M)
    assert copied == dirs
    assert ('DIRS=(proto service)' in script) and ('[ "$ROLE" = worker ] && DIRS+=(worker)' in script)
    assert "USER 10001:10001" in text and "--uid 10001" in script and "--userspec=10001:10001" in script
    assert re.search(r'^ENTRYPOINT \["dex"\]$', text, re.M) and re.search(rf'^CMD \["{role}"\]$', text, re.M)
    assert 'dex "$ROLE"' in script
    assert "COPY deploy/docker/healthcheck.py /usr/local/bin/dex-healthcheck" in text
    assert '/usr/local/bin/dex-healthcheck "$ROLE"' in script
    assert "pip install --no-deps ." in text and "--no-deps ." in script


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    srv = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    yield srv.url
    srv.stop()


@pytest.mark.parametrize("role", ["gateway", "worker"])
def test_image_builds_and_its_entrypoint_passes_the_healthcheck(role: str, redis_url: str) -> None:
    if os.geteuid() != 0:
        pytest.fail("the rootfs build needs root (chroot, debootstrap); CI runs as root")
    if not shutil.which("debootstrap"):
        pytest.fail("debootstrap missing: `make debootstrap` installs it (apt-get install -y debootstrap)")
    env = {**os.environ, "PYTHON": sys.executable, "DEX_PORT": str(free_port()), "DEX_METRICS_PORT": str(free_port())}
    try:
        res = subprocess.run(["bash", str(SCRIPT), role, str(WORK), redis_url], env=env, capture_output=True,
                             text=True, timeout=900)
    finally:
        shutil.rmtree(WORK / role, ignore_errors=True)   # keep only the cached base and wheelhouse
    assert res.returncode == 0 and res.stdout.strip().endswith("healthy"), res.stdout[-3000:] + res.stderr[-5000:]
